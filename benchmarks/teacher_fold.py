"""Frozen-teacher forward time with and without BatchNorm folding, side by side.

The same teacher is timed as built and after :func:`protege.core.fold.fold_batchnorm`, forward
passes interleaved (A, B, B, A, …) under ``torch.no_grad`` in ``eval()``; the figure is the median
per-round ratio. Also checks the largest logit difference.

    python benchmarks/teacher_fold.py [--model resnet20] [--in-chans 1] [--size 28] [--batch 64]
        [--rounds 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from protege.core.fold import fold_batchnorm
from protege.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = build_model(args.model, num_classes=10, in_chans=args.in_chans).eval().requires_grad_(False)
    folded = copy.deepcopy(plain)
    n = len(fold_batchnorm(folded))
    x = torch.randn(args.batch, args.in_chans, args.size, args.size)
    with torch.no_grad():
        diff = (plain(x) - folded(x)).abs().max().item()
        for _ in range(3):
            plain(x), folded(x)
        times: dict[str, list[float]] = {"plain": [], "folded": []}
        for r in range(args.rounds):
            order = ("plain", "folded") if r % 2 == 0 else ("folded", "plain")
            for name in order:
                model = plain if name == "plain" else folded
                t = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t)
    ratios = [f / p for f, p in zip(times["folded"], times["plain"])]
    print(
        f"{args.model} batch {args.batch}×{args.in_chans}×{args.size}² ({n} BatchNorms folded, max |Δlogit| {diff:.1e}): "
        f"plain {1000 * statistics.median(times['plain']):.1f} ms, folded {1000 * statistics.median(times['folded']):.1f} ms, "
        f"median ratio folded/plain {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
