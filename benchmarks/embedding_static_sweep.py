"""The static student's recipe chosen on validation: epochs x learning rate, per width.

Trains ``benchmarks/embedding.py``'s static row (model2vec-style init, then the ``cosine`` term through a
linear adapter; AdamW, cosine schedule, batch 64) for each combination, seed 0, reading the teacher's
vectors from the cache that ``embedding.py`` builds in ``--cache-dir``, and reports each run's best and
last validation knn10 (500 validation texts; the test split is never read). The table's recipe is the
combination with the highest mean best-epoch validation knn10 over the widths.

    python benchmarks/embedding_static_sweep.py --json benchmarks/results/embedding-static-sweep.json

Finished runs are reused when the command is run again (``--output-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embedding as bench  # noqa: E402

from protege.analysis.report import read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,256")
    ap.add_argument("--epochs", default="2,6,12")
    ap.add_argument("--lrs", default="0.003,0.01")
    ap.add_argument("--max-train", type=int, default=6000)
    ap.add_argument("--cache-dir", default="runs/embedding-bench-cached", help="embedding.py's --output-dir")
    ap.add_argument("--output-dir", default="runs/embedding-static-sweep")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bargs = bench.parse_args(
        ["--threads", str(args.threads), "--max-train", str(args.max_train), "--output-dir", args.cache_dir]
    )
    bench.ensure_teacher_cache(bargs)
    results: dict[str, dict[str, float]] = {}
    for d in (int(x) for x in args.dims.split(",")):
        for epochs in (int(x) for x in args.epochs.split(",")):
            for lr in (float(x) for x in args.lrs.split(",")):
                bargs.epochs = epochs
                name = f"static-{d}-e{epochs}-lr{lr:g}-s0"
                cfg = bench.run_cfg(bargs, name, 0, {"model": "static", "kwargs": {"dim": d}}, lr)
                cfg["output_dir"] = args.output_dir
                bench.train(cfg)
                rows = [r for r in read_metrics(Path(args.output_dir) / name) if "val/knn10" in r]
                best = max(rows, key=lambda r: r["val/knn10"])
                results[name] = {
                    "dim": d,
                    "epochs": epochs,
                    "lr": lr,
                    "best_val_knn10": best["val/knn10"],
                    "best_epoch": best["epoch"] + 1,
                    "last_val_knn10": rows[-1]["val/knn10"],
                }
                print(name, results[name], flush=True)
    print("| dim | epochs | lr | best val knn10 (epoch) | last val knn10 |\n|---|---|---|---|---|")
    for r in results.values():
        print(
            f"| {r['dim']} | {r['epochs']} | {r['lr']:g} | {100 * r['best_val_knn10']:.2f} ({r['best_epoch']}) "
            f"| {100 * r['last_val_knn10']:.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
