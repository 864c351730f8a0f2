"""PointDistiller (Zhang et al., CVPR 2023) against the image-style KD methods, on point clouds.

No ModelNet, ShapeNet or KITTI is reachable offline, so the data is ``shapes3d``
(``protege.data.pointcloud``): surface samples of 14 parametric primitives and compositions (random
proportions, partial views, rotations about the up axis, noise) and of pyvista's real meshes
(airplane, ant, nut), 17 classes; for ``--task parts`` the part labels are which primitive a point
came from. Detection (the paper's setting) is not measured here.

A teacher (``--teacher-model`` at ``--teacher-width``) is trained first (``protege train``), then a
student of the same family ``--student-width`` wide (4x narrower by default) in these rows, ``--seeds``
seeds each, the same initialisation, schedule and data:

- ``student``: cross-entropy alone;
- ``kd``: + Hinton KD on the logits (T = 4; per point for parts);
- ``fitnet``: + FitNets on a per-point tap (a per-point linear adapter to the teacher's channels);
- ``rkd``: + RKD (distance + angle) on the global feature (``pool``; PointNet++ parts: ``sa3``);
- ``pd_noreweight``: + PointDistiller on the per-point tap without reweighting (the ablation);
- ``pd``: + PointDistiller (top-``--pd-points`` points by teacher importance, kNN graph in the
  teacher's feature space, EdgeConv encoders on both sides, softmax(importance / tau) * N weights).

Every distillation row keeps CE at weight 1 and adds its term at weight 1 (RKD's inner weights are
the paper's 25 / 50). Columns: accuracy (``--task cls``) or class / instance mIoU (``--task parts``)
on the test split, mean ± std over seeds; agreement with the teacher; parameters; FLOPs and latency
per cloud (batch 1, measured side by side, this machine).

    python benchmarks/pointcloud.py --json benchmarks/results/pointcloud-cls.json
    python benchmarks/pointcloud.py --task parts --json benchmarks/results/pointcloud-parts.json

Finished runs are reused when the command is run again (``--output-dir``, default runs/pc-bench).
With ``--task cls`` the distillation rows read the teacher's outputs (logits, the per-point tap, the
pooled feature; float32) from a cache built once right after the teacher (``<output-dir>/cls/teacher-cache``):
the clouds have no random transform, so this is bit-identical to running the teacher live
(``--online``), without the teacher's forward pass in every step.
Two lanes on a 2-core machine: the teacher first (one writer per run), then disjoint rows, then the
table from the finished runs (add ``--task parts`` to each line for segmentation):

    python benchmarks/pointcloud.py --threads 2 --rows student --seeds 1      # the teacher, its cache, one run
    for rows in student,kd,fitnet rkd,pd_noreweight,pd; do
        OMP_NUM_THREADS=1 python benchmarks/pointcloud.py --threads 1 --rows $rows & done; wait
    python benchmarks/pointcloud.py --json benchmarks/results/pointcloud-cls.json   # reuses every run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protege.analysis.runs import run_or_reuse, seed_cell, seed_paired, seed_stats
from protege.caching import build_cache
from protege.config import load_config
from protege.metrics.cost import count_flops, count_params, measure_latencies
from protege.pipeline import load_run

#: the per-point tap each family exposes to FitNets and PointDistiller (same resolution in both models)
TAPS = {"pointnet": "mlp3", "dgcnn": "edge3", "pointnet2": "sa1"}
ROWS = ("student", "kd", "fitnet", "rkd", "pd_noreweight", "pd")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("cls", "parts"), default="cls")
    ap.add_argument("--teacher-model", default="dgcnn", choices=sorted(TAPS))
    ap.add_argument("--teacher-width", type=float, default=0.5)
    ap.add_argument("--student-width", type=float, default=0.125)
    ap.add_argument("--k", type=int, default=16, help="kNN neighbours of the backbones (dgcnn, pointnet2)")
    ap.add_argument("--num-points", type=int, default=256)
    ap.add_argument("--train-size", type=int, default=1696, help="a multiple of the batch size")
    ap.add_argument("--val-size", type=int, default=340)
    ap.add_argument("--test-size", type=int, default=680)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", default="all", help=f"comma list of {','.join(ROWS)}")
    ap.add_argument(
        "--only-seeds", type=int, nargs="+", default=None,
        help="train only these seeds of the rows and print no table (a lane of the recipe)",
    )  # fmt: skip
    ap.add_argument("--pd-k", type=int, default=16, help="PointDistiller's graph neighbours")
    ap.add_argument("--pd-points", type=int, default=128, help="PointDistiller's N important points")
    ap.add_argument("--pd-tau", type=float, default=1.0)
    ap.add_argument(
        "--online", action="store_true",
        help="distil from the live teacher (default for --task cls: from its output cache, bit-identical)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output-dir", default="runs/pc-bench")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def task_name(args: argparse.Namespace) -> str:
    return "classification" if args.task == "cls" else "pointcloud_parts"


def model(args: argparse.Namespace, width: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"width": width}
    if args.teacher_model != "pointnet":
        kwargs["k"] = args.k
    return {"model": args.teacher_model, "kwargs": kwargs}


def base_cfg(args: argparse.Namespace, name: str, seed: int, epochs: int) -> dict[str, Any]:
    return {
        "name": name,
        "output_dir": str(Path(args.output_dir) / args.task),
        "task": task_name(args),
        "seed": seed,
        "epochs": epochs,
        "cpu": not torch.cuda.is_available(),
        "progress": False,
        "data": {
            "source": "shapes3d",
            "batch_size": args.batch_size,
            "options": {
                "num_points": args.num_points,
                "train": args.train_size,
                "val": args.val_size,
                "test": args.test_size,
            },
        },
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 1e-4},
        "schedule": {"name": "cosine"},
    }


def row_terms(args: argparse.Namespace, row: str) -> list[dict[str, Any]]:
    tap = TAPS[args.teacher_model]
    # RKD's one vector per cloud: the max-pool, or PointNet++'s last set abstraction (one centroid) when
    # a part head replaces its pooled classifier
    glob = "sa3" if args.task == "parts" and args.teacher_model == "pointnet2" else "pool"
    pd = {"loss": "pointdistiller", "student": tap, "teacher": tap, "k": args.pd_k,
          "num_points": args.pd_points, "tau": args.pd_tau}  # fmt: skip
    extra = {
        "student": [],
        "kd": [{"loss": "kd", "T": 4.0}],
        "fitnet": [{"loss": "fitnet", "student": tap, "teacher": tap, "adapter": "linear"}],
        "rkd": [{"loss": "rkd", "student": glob, "teacher": glob}],
        "pd_noreweight": [{**pd, "name": "pointdistiller", "reweight": False}],
        "pd": [pd],
    }[row]
    return [{"loss": "ce"}, *extra]


def teacher_cache(args: argparse.Namespace, teacher: dict[str, Any], teacher_dir: Path) -> dict[str, Any]:
    """The teacher's outputs on every split (logits, the per-point tap, the pooled feature), in float32,
    built once (the first command of the lane recipe) and read by every distillation run: the clouds
    have no random transform, so a cached run computes bit for bit what an online run computes
    (tests/test_pointcloud_task.py) without running the teacher."""
    cache = {"path": str(teacher_dir.parent / "teacher-cache"), "views": 1,
             "taps": [TAPS[args.teacher_model], "pool"], "dtype": "float32"}  # fmt: skip
    if not Path(cache["path"]).exists():
        cfg = {
            **base_cfg(args, "cache", 0, 1),
            "student": model(args, args.student_width),
            "teacher": teacher,
        }
        t0 = time.perf_counter()
        build_cache(load_config(None, **cfg, cache=cache))  # type: ignore[arg-type]
        print(f"teacher cache: {time.perf_counter() - t0:.0f} s", flush=True)
    return cache


def train(cfg_dict: dict[str, Any], mode: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary = run_or_reuse(load_config(None, **cfg_dict), mode)  # type: ignore[arg-type]
    print(f"{cfg_dict['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
    return summary


def costs(models: dict[str, nn.Module], num_points: int) -> dict[str, dict[str, float]]:
    example = torch.randn(1, num_points, 3)
    wrapped = {name: m.eval().cpu() for name, m in models.items()}  # timed on one cloud (batch 1)
    out = {
        name: {"params": count_params(m), "mflops": count_flops(m, example) / 1e6}
        for name, m in wrapped.items()
    }
    for name, lat in measure_latencies(wrapped, example, iters=50, max_seconds=10).items():
        out[name]["ms"] = lat["ms"]
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = ROWS if args.rows == "all" else tuple(args.rows.split(","))
    bad = set(rows) - set(ROWS)
    if bad:
        sys.exit(f"unknown rows {sorted(bad)}; choose from {', '.join(ROWS)}")
    teacher_cfg = {
        **base_cfg(args, "teacher", 0, args.teacher_epochs),
        "student": model(args, args.teacher_width),
    }
    teacher_summary = train(teacher_cfg, "train")
    teacher_dir = Path(teacher_cfg["output_dir"]) / "teacher"
    # the students distil from the teacher's best checkpoint: its row shows that checkpoint's test metrics
    teacher_test = teacher_summary["test"].get("best") or teacher_summary["test"]["last"]
    results: dict[str, Any] = {"settings": vars(args), "rows": {"teacher": {"metrics": teacher_test}}}
    models: dict[str, nn.Module] = {"teacher": load_run(teacher_dir, "best").student}
    teacher = {**model(args, args.teacher_width), "weights": str(teacher_dir)}
    cache = None if args.online or args.task != "cls" else teacher_cache(args, teacher, teacher_dir)
    for row in rows:
        summaries = []
        for seed in range(args.seeds):
            if args.only_seeds is not None and seed not in args.only_seeds:
                continue
            cfg = {
                **base_cfg(args, f"{row}-s{seed}", seed, args.epochs),
                "student": model(args, args.student_width),
                "teacher": teacher,
                "terms": row_terms(args, row),
                **({"cache": cache} if cache and row != "student" else {}),
            }
            summaries.append(train(cfg, "train" if row == "student" else "distill"))
        if args.only_seeds is not None:
            continue
        mean, std = seed_stats(summaries, "last")
        best, best_std = seed_stats(summaries, "best")  # the checkpoint with the best validation score
        wall = statistics.mean(float(s.get("wall_time_s", 0.0)) for s in summaries)
        results["rows"][row] = {
            "metrics": mean, "std": std, "best": best, "best_std": best_std,
            "seeds": len(summaries), "wall_s": wall,
            "per_seed": {k: {i: float(s["test"]["last"][k]) for i, s in enumerate(summaries)} for k in mean},
        }  # fmt: skip
        print(f"{row}: { {k: round(v, 4) for k, v in mean.items()} }", flush=True)
        models[row] = load_run(Path(args.output_dir) / args.task / f"{row}-s0", "last").student
    if args.only_seeds is not None:
        return
    for name, c in costs(models, args.num_points).items():
        results["rows"][name]["cost"] = c
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print_table(results, args.task)
    results["paired"] = paired(results["rows"], args.task)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


def paired(rows: dict[str, Any], task: str) -> dict[str, dict[str, Any]]:
    """Seed-paired differences of the last-epoch test metrics (percentage points), printed: every
    row against ``student`` (what distillation adds), and ``pd`` against each other method (the
    paper's claim: local-geometry distillation with reweighting beats the image-style terms)."""
    keys = ["acc"] if task == "cls" else ["class_miou", "instance_miou"]
    pairs = [(r, "student") for r in ROWS[1:]] + [("pd", r) for r in ROWS[1:-1]]
    out: dict[str, dict[str, Any]] = {}
    print("\nseed-paired differences, last epoch (pp: mean ± std [per seed], seeds the first row wins):")
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        out[f"{a} - {b}"] = cells = {
            k: seed_paired(rows[a]["per_seed"][k], rows[b]["per_seed"][k])
            for k in keys + ["agreement"]
            if k in rows[a]["per_seed"] and k in rows[b]["per_seed"]
        }
        text = [
            f"{k} {100 * c['mean']:+.2f} ± {100 * c['std']:.2f} "
            f"[{', '.join(f'{100 * x:+.1f}' for x in c['per_seed'])}] {c['better']}/{c['seeds']}"
            for k, c in cells.items() if c
        ]  # fmt: skip
        print(f"  {a} - {b}: " + "; ".join(text))
    return out


def print_table(results: dict[str, Any], task: str) -> None:
    keys = ["acc"] if task == "cls" else ["class_miou", "instance_miou"]
    head = ["row", *keys, f"{keys[0]} (best epoch)", "agreement", "params", "MFLOPs", "ms (batch 1)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row, r in results["rows"].items():
        m, sd, c = r.get("metrics", {}), r.get("std", {}), r.get("cost", {})

        def f(key: str, m: dict[str, Any] = m, sd: dict[str, Any] = sd) -> str:
            return seed_cell(m, sd, key)

        best = seed_cell(r["best"], r.get("best_std", {}), keys[0]) if "best" in r else "—"
        cells = [row, *(f(k) for k in keys), best, f("agreement")]
        cells += [f"{c['params'] / 1e6:.3f}M", f"{c['mflops']:.1f}", f"{c['ms']:.2f}"] if c else ["—"] * 3
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
