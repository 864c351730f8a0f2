"""A training run SIGKILLed at a chosen write, then resumed: shared by ``tests/test_kill_resume.py``
and ``benchmarks/reliability.py``.

:func:`start_killed` runs ``protege train`` (``protege.cli.main``) in processes that first replace
one of protege's internal writes (test code only: the product has no test hooks) so that the
process kills itself with SIGKILL in the middle of that write, the Nth time it happens:

``checkpoint``  the Nth checkpoint: after ``model.safetensors`` and ``optimizer.safetensors`` are in
                its ``.epoch_NNNN.*`` temp folder, before the folder is renamed into place;
``metrics``     the Nth ``metrics.jsonl`` append: half the line is written (and flushed);
``pointers``    the Nth ``pointers.json`` write: half the JSON is in its temp file, never renamed.

The subprocess imports protege once and forks one child per kill point (an import costs seconds).

Every run is one thread (so that a run in a subprocess and one in this process compute the same
floats), on digits with ``mlp_s``, 3 epochs; the killed run dies in its second epoch's write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

EPOCHS = 3
NTH = 2  # the second write of its kind: one checkpoint is complete, so the run can resume

KILL_POINTS = ("checkpoint", "metrics", "pointers")

_SCRIPT = r"""
import os, signal, sys, tempfile, pathlib
import torch
torch.set_num_threads(1)
import protege.cli  # imported once, before the forks: each child starts at once
import protege.engine.checkpoint as checkpoint

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point, nth):
    seen = {"n": 0}
    if point == "checkpoint":
        real_save = checkpoint.save_file
        def save_file(tensors, path, *args, **kwargs):
            real_save(tensors, path, *args, **kwargs)
            name = pathlib.Path(path).name
            if name == "model.safetensors":
                seen["n"] += 1
            if name == "optimizer.safetensors" and seen["n"] == nth:
                die()  # two files in the temp folder, no manifest, no rename
        checkpoint.save_file = save_file
    elif point == "metrics":
        real_open = pathlib.Path.open
        class Torn:
            def __init__(self, f):
                self.f = f
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.f.__exit__(*exc)
            def write(self, text):
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                os.fsync(self.f.fileno())
                die()
        def open_(self, mode="r", *args, **kwargs):
            f = real_open(self, mode, *args, **kwargs)
            if self.name == "metrics.jsonl" and "a" in mode:
                seen["n"] += 1
                if seen["n"] == nth:
                    return Torn(f)
            return f
        pathlib.Path.open = open_
    elif point == "pointers":
        real_write = checkpoint.atomic_write_text
        def atomic_write_text(path, text):
            if path.name == "pointers.json":
                seen["n"] += 1
                if seen["n"] == nth:  # what a kill between the write and the rename leaves
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                    os.write(fd, text[: len(text) // 2].encode())
                    os.fsync(fd)
                    die()
            return real_write(path, text)
        checkpoint.atomic_write_text = atomic_write_text
    else:
        raise SystemExit(f"unknown kill point {point}")

nth = int(sys.argv[1])
children = {}
for spec in sys.argv[2:]:
    point, config = spec.split("=", 1)
    pid = os.fork()
    if pid == 0:
        try:
            arm(point, nth)
            sys.argv = ["protege", "train", config]
            protege.cli.main()
        finally:
            os._exit(1)  # only reached if the kill never came
    children[pid] = point
for pid, point in children.items():
    _, status = os.waitpid(pid, 0)
    print(point, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status), flush=True)
"""


def write_run_config(root: Path, name: str = "k") -> Path:
    """A 3-epoch digits run writing to ``<root>/runs/<name>``; returns the YAML's path."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": name,
        "output_dir": str(root / "runs"),
        "data": {"source": "digits", "batch_size": 128},
        "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
        "epochs": EPOCHS,
        "progress": False,
        "measure_cost": False,
        "optim": {"lr": 0.1},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_killed(roots: Mapping[str, Path]) -> subprocess.Popen[str]:
    """Start the run of :func:`write_run_config` in ``roots[point]`` for each kill point: one
    subprocess imports protege once and forks one child per point, which SIGKILLs itself there (see
    the module docstring). :func:`wait_killed` waits for them."""
    specs = [f"{point}={write_run_config(root)}" for point, root in roots.items()]
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(NTH), *specs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_killed(proc: subprocess.Popen[str], timeout: float = 600) -> dict[str, int]:
    """The signal that ended each point's child (``SIGKILL``: it died in the write as planned;
    a negative number: the exit code of a child that was never killed)."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the kill script failed ({proc.returncode}):\n{err}")
    return {point: int(signal) for point, signal in (line.split() for line in out.splitlines())}


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` without the wall-clock times."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


def leftovers(run_dir: Path) -> list[str]:
    """Temp files and folders of an interrupted write still in the run."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*") if p.name != ".lock")
