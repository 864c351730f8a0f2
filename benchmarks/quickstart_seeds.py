"""Distilled vs CE-only student on MNIST-5k over several seeds (the quickstart pair).

The teacher is trained once (seed 0, the quickstart recipe); for each seed the baseline student
(cross-entropy only) and the distilled student (0.1·CE + 0.9·KD, T=4) are trained with the same
initial weights, data order and schedule, and evaluated on the 1,000-image test split at the
last epoch and at the best epoch chosen on the validation split.

    python benchmarks/quickstart_seeds.py [--seeds 0 1 2] [--fast] [--json out.json]
        [--set KEY=VALUE ...]            # both students, e.g. optim.lr=0.02 or epochs=60
        [--distill-set KEY=VALUE ...]    # the distilled student only, e.g. terms.1.T=2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import protege as pg
from protege.quickstart import quickstart_configs


def mean_std(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0.0):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--output", default="runs/bench-quickstart-seeds")
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--distill-set", dest="distill_overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    args = parser.parse_args()

    root = Path(args.output)
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    base = quickstart_configs(args.fast, root, seed=0)
    teacher = pg.run(pg.load_config(None, **base["teacher"]), mode="train")
    results: dict[str, dict[str, list[float]]] = {
        m: {"last": [], "best": []} for m in ("baseline", "distilled")
    }
    for seed in args.seeds:
        for method, mode in (("baseline", "train"), ("distilled", "distill")):
            cfg = {**base[method], "seed": seed, "name": f"{method}-s{seed}"}
            overrides = args.overrides + (args.distill_overrides if method == "distilled" else [])
            summary = pg.run(pg.load_config(None, overrides, **cfg), mode=mode, report=False)
            for which in ("last", "best"):
                results[method][which].append(summary["test"][which]["acc"])
    report = {
        "teacher_test_acc": teacher["test"]["best"]["acc"],
        "seeds": args.seeds,
        "fast": args.fast,
        "overrides": args.overrides,
        "distill_overrides": args.distill_overrides,
        "test_acc": results,
        "wall_time_s": time.perf_counter() - start,
    }
    print(f"teacher ({base['teacher']['student']['model']}) test acc {100 * report['teacher_test_acc']:.2f}%")
    print(
        f"{'student':<12} {'last epoch':>16} {'best epoch':>16}   (test acc %, mean ± std over {len(args.seeds)} seeds)"
    )
    for method in ("baseline", "distilled"):
        print(f"{method:<12} {mean_std(results[method]['last']):>16} {mean_std(results[method]['best']):>16}")
    gain = [d - b for d, b in zip(results["distilled"]["best"], results["baseline"]["best"])]
    print(
        f"gain (best epoch, paired by seed): {mean_std(gain)} points; wall time {report['wall_time_s']:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
