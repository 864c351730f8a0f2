"""Distilled vs CE-only student over several seeds: the quickstart's pair (``protege quickstart``).

The teacher is trained once (seed 0, the quickstart's recipe); for each seed the baseline student
(cross-entropy only) and the distilled student (the quickstart's KD terms) are trained with the same
initial weights, data order and schedule, and evaluated at the last epoch and at the best epoch
chosen on the validation split. ``--split val`` reports the validation split (use it to choose a
setting: ``best`` is then chosen on the split it is measured on, so read ``last``); ``--split
test`` (the default) the test split, once a setting is chosen.

    python benchmarks/quickstart_seeds.py [--seeds 0 1 2 3 4] [--split val|test] [--fast]
        [--json out.json] [--output runs/bench-quickstart-seeds]
        [--set KEY=VALUE ...]            # both students, e.g. epochs=60 or optim.lr=0.02
        [--distill-set KEY=VALUE ...]    # the distilled student only, e.g. terms.0.T=2
        [--teacher-set KEY=VALUE ...]    # the teacher only, e.g. epochs=10
        [--teacher RUN_DIR]              # reuse a trained teacher run instead of training one
        [--threads N]                    # torch intra-op threads (a shared machine: 1 or 2)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import protege as pg
from protege.quickstart import quickstart_configs

METRICS = ("acc", "agreement", "kl")


def mean_std(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.mean(xs):.{digits}f} ± {scale * sd:.{digits}f}"


def split_metrics(summary: dict[str, Any], split: str) -> dict[str, dict[str, float]]:
    """``{"last": {...}, "best": {...}}``: accuracy, agreement and KL(teacher‖student) on ``split``."""
    if split == "test":
        return {w: {m: summary["test"][w][m] for m in METRICS} for w in ("last", "best")}
    records = {"last": summary["final"], "best": summary["best"]}  # fit's epoch records
    return {w: {m: records[w][f"val/{m}"] for m in METRICS} for w, r in records.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--output", default="runs/bench-quickstart-seeds")
    parser.add_argument("--json", default=None)
    parser.add_argument("--teacher", default=None, help="a trained teacher run directory to reuse")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--distill-set", dest="distill_overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    parser.add_argument(
        "--teacher-set", dest="teacher_overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.output)
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    base = quickstart_configs(args.fast, root, seed=0)
    if args.teacher:
        teacher_dir = Path(args.teacher)
        teacher = json.loads((teacher_dir / "summary.json").read_text())
    else:
        cfg = pg.load_config(None, args.teacher_overrides, **base["teacher"])
        teacher = pg.run(cfg, mode="train", report=False)
        teacher_dir = cfg.run_dir
    teacher_split = (
        teacher["test"] if args.split == "test" else {"last": teacher["final"], "best": teacher["best"]}
    )
    teacher_acc = {
        w: teacher_split[w]["acc" if args.split == "test" else "val/acc"] for w in ("last", "best")
    }
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"baseline": [], "distilled": []}
    for seed in args.seeds:
        for method, mode in (("baseline", "train"), ("distilled", "distill")):
            cfg = {**base[method], "seed": seed, "name": f"{method}-s{seed}"}
            cfg["teacher"] = {**cfg["teacher"], "weights": str(teacher_dir)}
            overrides = args.overrides + (args.distill_overrides if method == "distilled" else [])
            summary = pg.run(pg.load_config(None, overrides, **cfg), mode=mode, report=False)
            runs[method].append(split_metrics(summary, args.split))
    wall = time.perf_counter() - start

    def column(method: str, which: str, metric: str) -> list[float]:
        return [r[which][metric] for r in runs[method]]

    gains = {
        w: [d - b for d, b in zip(column("distilled", w, "acc"), column("baseline", w, "acc"))]
        for w in ("last", "best")
    }
    report = {
        "split": args.split,
        "seeds": args.seeds,
        "fast": args.fast,
        "teacher": {
            "model": base["teacher"]["student"]["model"],
            "acc": teacher_acc,
            "run": str(teacher_dir),
        },
        "overrides": args.overrides,
        "distill_overrides": args.distill_overrides,
        "teacher_overrides": args.teacher_overrides,
        "runs": runs,
        "gain": gains,
        "wall_time_s": wall,
    }
    n = len(args.seeds)
    print(
        f"{args.split} split; teacher ({report['teacher']['model']}) acc {100 * teacher_acc['best']:.2f}% "
        f"(best epoch), {100 * teacher_acc['last']:.2f}% (last); mean ± std over {n} seed(s)"
    )
    print(f"{'student':<10} {'epoch':<5} {'acc %':>14} {'agreement %':>14} {'KL(t‖s)':>16}")
    for method in ("baseline", "distilled"):
        for w in ("last", "best"):
            print(
                f"{method:<10} {w:<5} {mean_std(column(method, w, 'acc')):>14} "
                f"{mean_std(column(method, w, 'agreement')):>14} "
                f"{mean_std(column(method, w, 'kl'), 1.0, 4):>16}"
            )
    for w in ("last", "best"):
        per_seed = ", ".join(f"{100 * g:+.2f}" for g in gains[w])
        positive = sum(g > 0 for g in gains[w])
        print(
            f"paired gain ({w} epoch, distilled − baseline, points): {mean_std(gains[w])}; per seed "
            f"{per_seed}; positive in {positive}/{n}"
        )
    print(f"wall time {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
