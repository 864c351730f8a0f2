"""Deployment mode: generated certificates make a real TLS handshake, every started process group
is ended, and a 1-round, 2-client federation completes on loopback with a TLS SuperLink."""

import json
import os
import socket
import ssl
import sys
import threading
import time

import pytest

pytest.importorskip("flwr")
pytest.importorskip("cryptography")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from protege.errors import ProtegeError  # noqa: E402
from protege.federated.config import validate_federation_config  # noqa: E402
from protege.federated.deploy import Processes, deploy, make_certificates  # noqa: E402


def _handshake(certs, client_ctx, server_name="127.0.0.1"):
    """One TLS handshake on loopback between a server holding ``certs`` and ``client_ctx``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.sendall(b"x")
                return tls.version()
    finally:
        thread.join(5)
        listener.close()


def test_certificates_verify_for_loopback_names_only(tmp_path):
    certs = make_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    key = serialization.load_pem_private_key(certs.key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert os.stat(certs.key).st_mode & 0o777 == 0o600
    trusted = ssl.create_default_context(cafile=str(certs.ca))
    assert _handshake(certs, trusted).startswith("TLS")
    assert _handshake(certs, trusted, server_name="localhost").startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not hold
        _handshake(certs, trusted, server_name="example.org")
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
        _handshake(certs, ssl.create_default_context(cafile=str(make_certificates(tmp_path / "other").ca)))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by its parent) is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_ends_each_started_process_and_its_children(tmp_path):
    procs = Processes(tmp_path, dict(os.environ))
    spawn = "import subprocess, sys, time; c = subprocess.Popen(['sleep', '600']); print(c.pid, flush=True); time.sleep(600)"
    procs.start("parent", [sys.executable, "-c", spawn])
    log = tmp_path / "parent.log"
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().split()[0])
    parent = procs.procs["parent"][0].pid
    assert _alive(parent) and _alive(child)
    procs.check_alive()
    procs.stop()
    time.sleep(0.5)
    assert not _alive(parent) and not _alive(child)
    assert procs.procs == {}

    procs.start("short", [sys.executable, "-c", "print('bye')"])
    procs.procs["short"][0].wait()
    with pytest.raises(ProtegeError, match="short exited with code 0"):
        procs.check_alive()
    procs.stop()


def test_deployment_with_tls_one_round_two_clients(tmp_path):
    cfg = validate_federation_config(
        {
            "name": "dep",
            "output_dir": str(tmp_path),
            "dataset": "digits",
            "clients": 2,
            "transfer_size": 100,
            "global_test_size": 200,
            "rounds": 1,
            "timeout": 240,
            "strategy": {"name": "knfu"},
        }
    )
    summary = deploy(cfg, tls=True)
    run = tmp_path / "dep"
    assert summary["rounds"] == 1 and summary["rejected"] == 0
    assert 0.3 < summary["alma"] <= 1.0
    clients = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(x["client"] for x in clients if x["kind"] == "client") == [0, 1]
    log = (run / "deploy" / "superlink.log").read_text()
    assert "https://127.0.0.1" in log  # the SuperLink served TLS
    assert log.count("Activated node_id") == 2
    port = int((run / "deploy" / "flower" / "config.toml").read_text().split("127.0.0.1:")[1].split('"')[0])
    with socket.socket() as s:  # the SuperLink was stopped: nothing listens on its port
        assert s.connect_ex(("127.0.0.1", port)) != 0
    for name in ("superlink", "supernode-0", "supernode-1"):
        assert (run / "deploy" / f"{name}.log").is_file()


def test_cli_insecure_needs_deploy(tmp_path):
    from typer.testing import CliRunner

    from protege.cli import app

    (tmp_path / "fed.yaml").write_text("name: x\nclients: 2\n")
    result = CliRunner().invoke(app, ["federate", str(tmp_path / "fed.yaml"), "--insecure"])
    assert isinstance(result.exception, ProtegeError)  # main() prints it without a traceback, exit 2
    assert "--insecure only applies to --deploy" in str(result.exception)
