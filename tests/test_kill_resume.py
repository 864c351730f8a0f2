"""kill -9 in the middle of a write, then ``--resume``: the run completes, nothing of the cut write
is left, and its metrics are those of a run that was never interrupted (exact resume).

The killed runs are forked children of one subprocess that SIGKILL themselves inside one of
protege's writes (see ``tests/kill_points.py``: a checkpoint folder half written, a
``metrics.jsonl`` line cut in half, a ``pointers.json`` temp file never renamed); they run while the
uninterrupted reference trains here. The resumes run in this process, like the reference (one
thread each)."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from kill_points import KILL_POINTS, NTH, metrics, start_killed, wait_killed, write_run_config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork and SIGKILL: POSIX only")


def _cli(*args: str) -> int:
    """``protege *args`` in this process; its exit code."""
    from protege import cli

    argv = sys.argv
    sys.argv = ["protege", *args]
    try:
        cli.main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def one_thread_module():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocesses: the same floats
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread_module):
    """The killed runs (started first, together) and the reference run, trained meanwhile."""
    killed = {point: tmp_path_factory.mktemp(f"killed-{point}") for point in KILL_POINTS}
    proc = start_killed(killed)
    reference = tmp_path_factory.mktemp("reference")
    assert _cli("train", str(write_run_config(reference))) == 0
    assert wait_killed(proc) == {point: signal.SIGKILL for point in KILL_POINTS}
    return killed, reference / "runs" / "k"


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_mid_write_resumes_exactly(runs, point, capsys):
    killed, reference = runs
    run_dir = killed[point] / "runs" / "k"
    ckpt = run_dir / "checkpoints"
    if point == "checkpoint":  # the cut checkpoint's temp folder, two files in it, never renamed
        (tmp,) = ckpt.glob(".epoch_*")
        assert sorted(p.name for p in tmp.iterdir()) == ["model.safetensors", "optimizer.safetensors"]
    elif point == "metrics":  # half a line
        assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")
    else:  # the new checkpoint is there, the pointers still name the one before it
        assert list(ckpt.glob(".pointers.json.*.tmp")) and (ckpt / f"epoch_{NTH - 1:04d}").is_dir()
    capsys.readouterr()
    code = _cli("train", str(killed[point] / "run.yaml"), "--resume")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    if point == "metrics":
        assert "dropped 1 unreadable line" in err
    else:
        assert "a checkpoint write that never finished" in err
    assert not list(ckpt.glob(".epoch_*")) and not list(ckpt.glob(".pointers.json.*"))
    assert metrics(run_dir) == metrics(reference)  # every key and value but time_s, every epoch
    last = ckpt / "epoch_0002" / "model.safetensors"
    assert last.read_bytes() == (reference / "checkpoints" / "epoch_0002" / "model.safetensors").read_bytes()
