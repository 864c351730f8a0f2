"""Does vanilla KD catch up with the elaborate methods under strong augmentation and a longer schedule?

Hao, Guo, Han, Xu, Wang & Wang, "Revisit the Power of Vanilla Knowledge Distillation: from Small
Scale to Large Scale", NeurIPS 2023, report that the advantage of elaborate KD methods over vanilla
KD shrinks (on ImageNet-1k, vanishes) once the student trains longer with stronger augmentation.
This script tests the claim on our method table (``benchmarks/method_table.py``), pair by pair:

1. the *standard* schedule is the method table itself (its runs are read, not re-run: run the table
   first with the same arguments);
2. the *best elaborate method* of each pair is the one with the highest validation accuracy (the
   mean over seeds of the best epoch's ``val/acc``) among every method other than ``scratch`` and
   ``kd`` -- chosen on validation, never on test;
3. the *strong* schedule trains ``scratch``, ``kd`` and that method again, ``--long-factor`` times
   longer, with ``transforms: strong`` (random resized crop, mirror where it keeps the label, random
   erasing; ``protege.data.views``). Vanilla KD (and any method that reads only logits) learns from an
   augmentation-aware teacher-output cache (``--views`` stored views per image, replayed exactly:
   the teacher runs once per pair); a feature method runs its teacher online, on fresh views.

Then one table per pair: the three rows under both schedules (last and best epoch, mean ± std over
seeds) and the gap "best elaborate − KD" (paired by seed). The claim holds here if that gap is
smaller under the strong schedule.

    python benchmarks/method_table.py $MT                      # the standard schedule (see BENCHMARKS.md)
    python benchmarks/vanilla_kd_revisit.py $MT --json runs/vanilla-kd-revisit.json

Finished runs are skipped when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import method_table as mt  # noqa: E402

from protege.caching import build_cache  # noqa: E402
from protege.config import load_config  # noqa: E402

BASELINES = ("scratch", "kd")
LOGIT_METHODS = {"kd", "kd_ls", "ctkd", "dkd", "dist"}  # terms that read only the teacher's logits


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="resnet,cnn-lenet")
    ap.add_argument("--source", default="fashion-mnist")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="the standard schedule (the method table's)")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--long-factor", type=int, default=3, help="strong schedule: epochs x this")
    ap.add_argument("--views", type=int, default=8, help="augmented views per image in the cache")
    ap.add_argument("--elaborate", default="auto", help="auto (best on validation) or a method name")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clip-grad-norm", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-dir", default="runs/method-table-fm")
    ap.add_argument("--methods", default=",".join(mt.METHODS), help="the table's methods (for the choice)")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def summary_of(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if "test" in summary else None


def standard_cells(args: argparse.Namespace, pair: str) -> dict[str, list[dict[str, Any]]]:
    """The method table's finished runs of ``pair``: method -> one summary per seed."""
    out = Path(args.output_dir)
    cells: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods.split(","):
        runs = [summary_of(out / f"{pair}-{method}-s{seed}") for seed in range(args.seeds)]
        if all(r is not None for r in runs):
            cells[method] = [r for r in runs if r is not None]
    missing = [m for m in BASELINES if m not in cells]
    if missing or summary_of(out / f"{pair}-teacher") is None:
        raise SystemExit(
            f"{out}: the method table's runs of pair {pair!r} are missing ({', '.join(missing) or 'teacher'}); "
            "run benchmarks/method_table.py with the same arguments first"
        )
    return cells


def best_val(runs: list[dict[str, Any]]) -> float:
    return statistics.fmean(r["best"]["val/acc"] for r in runs)


def choose_elaborate(
    args: argparse.Namespace, cells: dict[str, list[dict[str, Any]]]
) -> tuple[str, dict[str, float]]:
    scores = {m: best_val(runs) for m, runs in cells.items() if m not in BASELINES}
    if args.elaborate != "auto":
        if args.elaborate not in cells:
            raise SystemExit(f"--elaborate {args.elaborate}: no finished runs of it in the method table")
        return args.elaborate, scores
    return max(scores, key=lambda m: scores[m]), scores


def strong_config(args: argparse.Namespace, pair: str, method: str, seed: int) -> tuple[dict[str, Any], str]:
    p = mt.PAIRS[pair]
    epochs = args.epochs * args.long_factor
    spec = mt.method_spec(method, p, epochs)
    if isinstance(spec, str):
        raise SystemExit(f"{method} does not apply to {pair}: {spec}")
    spec.pop("needs_equal_channels", None)
    cfg = mt.base_config(args, f"{pair}-{method}-strong-s{seed}", seed) | spec
    cfg["data"] = mt.data_spec(args, transforms="strong")
    cfg["epochs"] = epochs
    cfg["student"] = p["student"]
    if method == "scratch":
        return cfg, "train"
    cfg["teacher"] = p["teacher"] | {"weights": str(Path(args.output_dir) / f"{pair}-teacher")}
    if method in LOGIT_METHODS:
        cfg["cache"] = {"path": str(cache_path(args, pair)), "views": args.views, "top_k": "all"}
    return cfg, "distill"


def cache_path(args: argparse.Namespace, pair: str) -> Path:
    return Path(args.output_dir) / f"cache-{pair}-strong-v{args.views}"


def ensure_cache(args: argparse.Namespace, pair: str) -> float:
    """Build the pair's strong-augmentation cache once; returns the seconds it took (0 if it existed)."""
    if (cache_path(args, pair) / "index.json").is_file():
        return 0.0
    cfg, _ = strong_config(args, pair, "kd", 0)
    t0 = time.perf_counter()
    build_cache(load_config(None, **cfg))
    return time.perf_counter() - t0


def cell(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    return {
        "acc": [r["test"]["last"]["acc"] for r in runs],
        "best": [r["test"]["best"]["acc"] for r in runs],
        "val": [r["best"]["val/acc"] for r in runs],
    }


def _ms(values: list[float], scale: float = 100.0, sign: bool = False) -> str:
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.2f} ± {std:.2f}" if sign else f"{mean:.2f} ± {std:.2f}"


def gap(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    start = time.perf_counter()
    for pair in args.pairs.split(","):
        cells = standard_cells(args, pair)
        elaborate, scores = choose_elaborate(args, cells)
        print(f"{pair}: best elaborate method on validation: {elaborate} "
              f"(val {100 * scores[elaborate]:.2f}; KD {100 * best_val(cells['kd']):.2f})", flush=True)  # fmt: skip
        cache_s = ensure_cache(args, pair)
        rows: dict[str, Any] = {}
        for method in (*BASELINES, elaborate):
            strong = []
            for seed in range(args.seeds):
                cfg, mode = strong_config(args, pair, method, seed)
                summary = mt.run_one(cfg, mode)
                strong.append(summary)
                print(f"{pair:10s} {method:9s} strong seed {seed}: acc {summary['test']['last']['acc']:.4f} "
                      f"{time.perf_counter() - start:7.0f} s", flush=True)  # fmt: skip
            rows[method] = {
                "standard": cell(cells[method]),
                "strong": cell(strong),
                "from_cache": method in LOGIT_METHODS,
            }
        results[pair] = {
            "elaborate": elaborate,
            "val_scores": scores,
            "cache_build_s": cache_s,
            "rows": rows,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    print_tables(results, args)


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    long = args.epochs * args.long_factor
    for pair, res in results.items():
        if pair == "settings":
            continue
        p = mt.PAIRS[pair]
        e = res["elaborate"]
        print(f"\n{pair}: {p['teacher']['model']}→{p['student']['model']}; best elaborate method "
              f"(validation): {e}\n")  # fmt: skip
        print(f"| method | standard ({args.epochs} ep, shift) last | best epoch | "
              f"strong ({long} ep, strong aug) last | best epoch |")  # fmt: skip
        print("|---|---|---|---|---|")
        for method, row in res["rows"].items():
            s, g = row["standard"], row["strong"]
            note = " (strong: from the cache)" if row["from_cache"] else ""
            print(
                f"| {method}{note} | {_ms(s['acc'])} | {_ms(s['best'])} | {_ms(g['acc'])} | {_ms(g['best'])} |"
            )
        rows = res["rows"]
        cells = []
        for sched in ("standard", "strong"):
            for key in ("acc", "best"):
                cells.append(_ms(gap(rows[e][sched][key], rows["kd"][sched][key]), sign=True))
        print(f"| {e} − kd (paired) | " + " | ".join(cells) + " |")
        cells = []
        for sched in ("standard", "strong"):
            for key in ("acc", "best"):
                cells.append(_ms(gap(rows["kd"][sched][key], rows["scratch"][sched][key]), sign=True))
        print("| kd − scratch (paired) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
