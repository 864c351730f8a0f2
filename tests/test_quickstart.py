"""`protege quickstart --fast`: the main job end to end, as CI can afford it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_quickstart_fast(tmp_path):
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
    # even a few epochs on real MNIST digits learn far above chance (10%)
    assert rows["teacher"]["test"]["acc"] > 0.8
    assert rows["distilled"]["test"]["acc"] > 0.6
    for name in ("baseline", "distilled"):
        m = rows[name]["test"]
        assert 0 <= m["agreement"] <= 1 and m["kl"] >= 0 and 0 <= m["ece"] <= 1
        assert rows[name]["speedup"] > 1.0  # the student is measured faster than the teacher
    table = proc.stdout
    for text in ("teacher", "student, CE only", "student, distilled", "agreement", "speed-up"):
        assert text in table
    assert (root / "results.md").read_text().count("|") > 20
