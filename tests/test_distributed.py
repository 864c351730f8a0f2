"""Two processes (torch.distributed on CPU, gloo): the same config, no code change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import protege as pg


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun missing"
)
def test_two_process_training_gathers_full_evaluation(tmp_path):
    cfg = {
        "name": "ddp",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 32},
        "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
        "epochs": 2,
        "cpu": True,
        "progress": False,
        "measure_cost": False,
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "protege.cli", "train", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2
    # each process saw half the batches: 1257 training images / (32 × 2) → 20 steps per epoch
    assert summary["final"]["step"] == 2 * 20
    # the validation metric gathered from both processes equals a single-process evaluation
    single = pg.evaluate_run(run, split="val", which="last", latency=False)
    assert summary["final"]["val/acc"] == pytest.approx(single["metrics"]["acc"], abs=1e-6)
