"""`protege quickstart --fast`: the main job end to end, as CI can afford it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protege.data import fashion_mnist
from protege.errors import ProtegeError


def test_quickstart_fast(tmp_path):
    try:
        fashion_mnist.find_dir()
    except ProtegeError as e:  # `make data` could not get them; it said why
        pytest.skip(f"the quickstart reads Fashion-MNIST: {e}")
    proc = subprocess.run(
        [sys.executable, "-m", "protege.cli", "quickstart", "--fast", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "quickstart"
    for run in ("teacher", "baseline", "distilled"):
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/pointers.json"):
            assert (root / run / name).is_file(), f"{run}/{name}"
    result = json.loads((root / "summary.json").read_text())
    rows = result["rows"]
    assert rows["teacher"]["params"] >= 5 * rows["distilled"]["params"]
    assert rows["baseline"]["params"] == rows["distilled"]["params"]
    # even 2-3 epochs on 500 real Fashion-MNIST images learn far above chance (10%)
    assert rows["teacher"]["test"]["acc"] > 0.5
    assert rows["distilled"]["test"]["acc"] > 0.3
    for name in ("baseline", "distilled"):
        m = rows[name]["test"]
        assert 0 <= m["agreement"] <= 1 and m["kl"] >= 0 and 0 <= m["ece"] <= 1
        assert rows[name]["speedup"] > 1.0  # the student is measured faster than the teacher
    table = proc.stdout
    for text in ("teacher", "student, CE only", "student, distilled", "agreement", "speed-up", "--fast"):
        assert text in table
    assert "One seed is not evidence" in table and "quickstart_seeds.py --seeds 0 1 2 3 4" in table
    assert (root / "results.md").read_text().count("|") > 20
