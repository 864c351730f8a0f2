"""Probe numbers of the run report (what got distilled) for several methods and seeds, as a table.

Builds each distilled run's report against the same student trained from scratch with the same
seed, then reads ``report.json``. Uses the runs of ``benchmarks/method_table.py`` (MNIST-5k,
teacher cnn_m -> student lenet5, 5 epochs): train them first, e.g.

    .venv/bin/python benchmarks/method_table.py --pairs cnn-lenet --seeds 3 --epochs 5 --teacher-epochs 10 --threads 1
    .venv/bin/python benchmarks/probes_table.py --root runs/method-table --pair cnn-lenet --methods kd fitnet crd
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from protege.analysis.report import build_report


def mean_sd(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/method-table"))
    parser.add_argument("--pair", default="cnn-lenet")
    parser.add_argument("--methods", nargs="+", default=["kd", "fitnet", "crd"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the per-run numbers here")
    args = parser.parse_args()
    rows, raw = [], {}
    for method in args.methods:
        per = []
        for seed in range(args.seeds):
            run = args.root / f"{args.pair}-{method}-s{seed}"
            baseline = args.root / f"{args.pair}-scratch-s{seed}"
            out = build_report(run, baseline=baseline)
            per.append(json.loads(out.with_suffix(".json").read_text()))
        raw[method] = per
        probes = [p["probes"] for p in per]
        pgd = [[a for a in p["adversarial"] if a["attack"] == "pgd"][-1] for p in probes]
        shift = [
            next(v for k, v in p["invariance"].items() if "trained)" in k and "not" not in k) for p in probes
        ]
        summary = [list(p["summary"].values()) for p in per]  # teacher, baseline, distilled
        rows.append(
            [
                method,
                mean_sd([s[2]["acc_best"] for s in summary]),
                mean_sd([s[1]["acc_best"] for s in summary]),
                mean_sd([s[2]["agreement"] for s in summary]),
                mean_sd([s[1]["agreement"] for s in summary]),
                mean_sd([p["localization"]["distilled_closer"] for p in probes]),
                f"{pgd[0]['eps']:g}",
                mean_sd([a["success"]["teacher"] for a in pgd]),
                mean_sd([a["success"]["distilled"] for a in pgd]),
                mean_sd([a["success"]["baseline"] for a in pgd]),
                mean_sd([v["distilled"]["consistency"] for v in shift]),
                mean_sd([v["baseline"]["consistency"] for v in shift]),
            ]
        )
    header = [
        "method",
        "acc distilled",
        "acc scratch",
        "agreement distilled",
        "agreement scratch",
        "Grad-CAM closer (distilled)",
        "PGD ε",
        "PGD teacher",
        "PGD → distilled",
        "PGD → scratch",
        "shift consistency distilled",
        "shift consistency scratch",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
