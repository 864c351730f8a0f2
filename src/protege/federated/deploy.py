"""Deployment mode: a SuperLink and N SuperNodes as real processes on loopback, and ``flwr run``.

:func:`deploy` does on one machine what an operator does across machines, with Flower's own
commands (flwr 1.41 flags):

1. TLS (default): :func:`make_certificates` writes a CA and a server certificate for
   ``127.0.0.1``/``localhost`` signed by it (``cryptography``);
2. ``flower-superlink --host 127.0.0.1 --port P --ssl-certfile server.pem --ssl-keyfile
   server.key --ssl-ca-certfile ca.pem --disable-runtime-dependency-installation``
   (``--insecure`` instead of the three TLS flags without TLS); Fleet, Control and
   ServerApp-runtime APIs share the one HTTP(S) port;
3. for each client ``i``: ``flower-supernode --superlink 127.0.0.1:P --root-certificates ca.pem
   --port Q_i --node-config "partition-id=i num-partitions=N"`` (each SuperNode serves its
   ClientApp runtime on a port of its own);
4. ``flwr run <app> protege-deploy --format json`` with a Flower config (``FLWR_HOME``) whose
   connection ``protege-deploy`` names the SuperLink and the CA; the app directory holds only a
   ``pyproject.toml`` naming :data:`protege.federated.apps.server_app` / ``client_app`` and the
   resolved federation config (JSON), so the FAB is a few kB;
5. ``flwr ls protege-deploy --run-id ID --format json`` until the run is ``finished``
   (asked when the summary appears, and every :data:`STATUS_EVERY_S` to catch a failed run).

Everything goes to ``runs/<name>/``: the ServerApp writes the metrics and summary there as in
simulation, and ``runs/<name>/deploy/`` keeps the certificates, the app, the Flower config and one
log per process. Every process started is stopped at the end, on error and on Ctrl-C/SIGTERM
(each runs in a session of its own; its whole process group, with the ``flwr-serverapp`` /
``flwr-clientapp`` processes it spawned, gets SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import ProtegeError
from ..files import atomic_write_text
from .config import FederationConfig

#: name of the Flower CLI connection written into the run's ``FLWR_HOME``
CONNECTION = "protege-deploy"
#: seconds a process gets to exit after SIGTERM before SIGKILL
GRACE_S = 10.0
#: seconds between two ``flwr ls`` status queries while the run has not written its summary
STATUS_EVERY_S = 20.0


@dataclass(frozen=True)
class Certificates:
    """PEM files for TLS on loopback: the CA certificate (clients trust it) and the server's pair."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(
    directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 30
) -> Certificates:
    """Write a self-signed CA (``ca.pem``) and a server certificate (``server.pem``, key
    ``server.key``, mode 0600) for ``hosts`` signed by it; EC P-256 keys, valid ``days`` days.

    The openssl equivalent, for an operator who prefers it::

        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \\
            -subj /CN=protege-ca -keyout ca.key -out ca.pem
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \\
            -keyout server.key -out server.csr
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \\
            -extfile <(printf "subjectAltName=IP:127.0.0.1,DNS:localhost") -out server.pem
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not hosts:
        raise ProtegeError("make_certificates needs at least one host name or IP address")
    now = dt.datetime.now(dt.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def builder(subject: str, issuer: str, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        builder("protege-ca", "protege-ca", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        builder(hosts[0], "protege-ca", key.public_key())
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    out = Certificates(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    atomic_write_text(out.ca, ca_cert.public_bytes(pem).decode())
    atomic_write_text(out.cert, cert.public_bytes(pem).decode())
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_text(out.key, key_pem.decode())
    out.key.chmod(0o600)
    return out


# ----------------------------------------------------------------------------- processes


def _tool(name: str) -> str:
    """The path of a Flower command, next to this Python first (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise ProtegeError(
            f'{name} not found: deployment mode needs Flower, pip install "protege[federated]"'
        )
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Processes:
    """Long-running processes of one deployment, each in its own session and with its own log;
    :meth:`stop` ends each process group that :meth:`start` created, and only those."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        try:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        except BaseException:
            log.close()
            raise
        self.procs[name] = (proc, log)

    def check_alive(self) -> None:
        """Raise if a process has exited (they all run until :meth:`stop`)."""
        for name, (proc, _) in self.procs.items():
            if proc.poll() is not None:
                log = self.log_dir / f"{name}.log"
                raise ProtegeError(
                    f"{name} exited with code {proc.returncode}; the end of {log}:\n{_tail(log)}"
                )

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for proc, log in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the group may hold app processes still
            proc.wait()
            log.close()
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the process group id is the process id
    except ProcessLookupError:
        pass


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (main thread only), so cleanup runs as on Ctrl-C."""
    if sys.platform == "win32" or not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- deployment


def _write_app(app_dir: Path, cfg: FederationConfig) -> None:
    """A Flower App directory naming protege's apps, with the resolved config as run config."""
    # a JSON string literal is a valid TOML basic string (same escapes; non-ASCII kept as is)
    config = json.dumps(cfg.to_json(), ensure_ascii=False)
    atomic_write_text(
        app_dir / "pyproject.toml",
        f"""[project]
name = "protege-federation"
version = "1.0.0"
description = "protege federated distillation ({cfg.strategy.name})"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "protege"

[tool.flwr.app.components]
serverapp = "protege.federated.apps:server_app"
clientapp = "protege.federated.apps:client_app"

[tool.flwr.app.config]
config = {config}
""",
    )


def _write_flower_home(home: Path, port: int, certs: Certificates | None) -> None:
    security = f'root-certificates = "{certs.ca}"' if certs else "insecure = true"
    atomic_write_text(
        home / "config.toml",
        f"""[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "127.0.0.1:{port}"
{security}
""",
    )


def _flwr(args: list[str], env: dict[str, str], timeout: float = 120.0) -> dict[str, Any]:
    """Run a ``flwr`` CLI command with ``--format json`` and return its JSON answer."""
    argv = [_tool("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProtegeError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None
    out = done.stdout
    try:
        answer = json.loads(out[out.index("{") :])
    except ValueError:
        answer = {}
    if done.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (done.stderr or out).strip()[-500:]
        raise ProtegeError(f"`flwr {' '.join(args)}` failed: {detail}")
    return answer


def _wait_for_port(port: int, procs: Processes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise ProtegeError(f"the SuperLink did not open port {port} within {timeout:.0f} s")


def deploy(
    cfg: FederationConfig,
    tls: bool = True,
    timeout: float | None = None,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """Run ``cfg`` in Flower's deployment engine on loopback and return its summary.

    Starts one SuperLink and ``cfg.clients`` SuperNodes (client ``i`` with node config
    ``partition-id=i``), submits the run with ``flwr run``, waits until it is finished, and stops
    every process it started whatever happens.

    Args:
        cfg: the federation (as for :func:`protege.federated.federate`).
        tls: serve the SuperLink over TLS with certificates made by :func:`make_certificates`
            (the SuperNodes and ``flwr`` trust the generated CA); ``False``: plain HTTP.
        timeout: seconds the whole run may take; default ``cfg.timeout · (2 · rounds + 1)``
            (every exchange may wait for its timeout). Past it the run is stopped.
        poll_s: seconds between two checks of the processes and the run's summary file.
    """
    run_dir = cfg.run_dir
    work = run_dir / "deploy"
    work.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    certs = make_certificates(work / "certs") if tls else None
    port = free_port()
    _write_app(work / "app", cfg)
    _write_flower_home(work / "flower", port, certs)
    env = {
        **os.environ,
        "FLWR_HOME": str(work / "flower"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    link_security = (
        [
            "--ssl-certfile",
            str(certs.cert),
            "--ssl-keyfile",
            str(certs.key),
            "--ssl-ca-certfile",
            str(certs.ca),
        ]
        if certs
        else ["--insecure"]
    )
    node_security = ["--root-certificates", str(certs.ca)] if certs else ["--insecure"]
    limit = timeout if timeout is not None else cfg.timeout * (2 * cfg.rounds + 1)
    procs = Processes(work, env)
    with _sigterm_as_interrupt():
        try:
            procs.start(
                "superlink",
                [
                    _tool("flower-superlink"),
                    *link_security,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            _wait_for_port(port, procs, timeout=120)
            for i in range(cfg.clients):
                procs.start(
                    f"supernode-{i}",
                    [
                        _tool("flower-supernode"),
                        *node_security,
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions={cfg.clients}",
                    ],
                )
            run_id = _flwr(["run", str(work / "app"), CONNECTION], env)["run-id"]
            status = _wait_for_run(str(run_id), env, procs, limit, poll_s, summary_path)
        finally:
            procs.stop()
    if status != "finished:completed" or not summary_path.is_file():
        raise ProtegeError(
            f"the deployed run ended as {status!r} without a summary; the end of "
            f"{work / 'superlink.log'}:\n{_tail(work / 'superlink.log')}"
        )
    return json.loads(summary_path.read_text())


def _wait_for_run(
    run_id: str, env: dict[str, str], procs: Processes, limit: float, poll_s: float, summary: Path
) -> str:
    """Wait until run ``run_id`` is finished; its status (``finished:completed`` ...).

    ``flwr ls`` is a Python process of its own (seconds of CPU), so it is asked every
    :data:`STATUS_EVERY_S` only, and at every poll once the server has written ``summary``.
    """
    deadline = time.monotonic() + limit
    asked = -float("inf")
    while True:
        procs.check_alive()
        if summary.is_file() or time.monotonic() - asked > STATUS_EVERY_S:
            asked = time.monotonic()
            runs = _flwr(["ls", CONNECTION, "--run-id", run_id], env)["runs"]
            status = str(runs[0]["status"]) if runs else "unknown"
            if status.startswith("finished"):
                return status
            if time.monotonic() > deadline:
                _flwr(["stop", run_id, CONNECTION], env)
                raise ProtegeError(
                    f"the deployed run did not finish within {limit:.0f} s (status {status}); stopped it"
                )
        time.sleep(poll_s)
