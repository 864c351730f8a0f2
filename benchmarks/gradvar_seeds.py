"""Gradient-variance sweep (``protege analyze gradvar``) over several seeds, as one table.

Runs the sweep once per seed on a run config (default: the quickstart's distilled run, made by
``make demo``) unless ``--table-only``, then prints mean ± std over the seeds of the final test
accuracy, the minibatch-gradient variance with the KD objective and with plain CE at the same weights,
their ratio, and the relative variance (variance / ‖mean gradient‖²) of each::

    .venv/bin/python benchmarks/gradvar_seeds.py --seeds 0 1 2 --epochs 3 --batches 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def mean_sd(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs) * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def table(sweeps: list[dict]) -> str:
    lines = [
        "| λ | final test acc (%) | variance, with KD | variance, CE only (same weights) | ratio "
        "| relative variance, with KD | relative, CE only |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, first in enumerate(sweeps[0]["rows"]):
        rows = [s["rows"][i] for s in sweeps]
        vk, vc = [r["var_kd_final"] for r in rows], [r["var_ce_final"] for r in rows]
        rel_kd = [r["var_kd_final"] / r["mean_sq_kd_final"] for r in rows]
        rel_ce = [r["var_ce_final"] / r["mean_sq_ce_final"] for r in rows]
        lines.append(
            f"| {first['lambda']:g} | {mean_sd([r['acc'] for r in rows], 100, 1)} | {mean_sd(vk)} | {mean_sd(vc)} "
            f"| {mean_sd([a / b for a, b in zip(vk, vc)])} | {mean_sd(rel_kd, 1, 1)} | {mean_sd(rel_ce, 1, 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="runs/quickstart/distilled/config.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--output", default="runs/bench-gradvar")
    ap.add_argument("--table-only", action="store_true", help="only read the sweeps already in --output")
    args = ap.parse_args()
    protege = str(Path(sys.executable).with_name("protege"))
    sweeps = []
    for seed in args.seeds:
        out = Path(args.output) / f"s{seed}"
        if not args.table_only:
            cmd = [protege, "analyze", "gradvar", args.config, "--set", f"seed={seed}", "--epochs",
                   str(args.epochs), "--batches", str(args.batches), "--out", str(out), "--overwrite"]  # fmt: skip
            subprocess.run(cmd, check=True)
        sweeps.append(json.loads((out / "gradvar.json").read_text()))
    print(table(sweeps))
    print("least variance at λ =", [s["argmin_lambda"] for s in sweeps], "; best accuracy at λ =",
          [s["argmax_acc_lambda"] for s in sweeps])  # fmt: skip


if __name__ == "__main__":
    main()
