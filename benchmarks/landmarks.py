"""Fard & Mahoor's claim tested: does a student guided by a Tough and a Tolerant teacher (ALoss + KD-Loss)
beat one teacher and no teacher?

No face-landmark dataset ships in any package reachable here, so the faces are procedural, with exact
68 points in the iBUG 300-W layout (``protege.data.landmarks.SyntheticFaces``: a parametric 3-D face
under pose, expression, lighting and occlusion over real scikit-image photographs and textures). The
numbers are therefore about the method on this data, not comparable to the paper's 300W NME.

Teachers (``configs/landmarks``): the Tough teacher trained on the hard points, the Tolerant teacher on
the training shapes projected on an ASM (PCA modes explaining 90 % of the shape variance), both the
same larger backbone (``--teacher``, default timm ``resnet18``); students a small one (``--student``,
default timm ``mobilenetv2_050``). Rows, ``--seeds`` seeds each (the same student, initialisation,
data and schedule; only the terms differ):

- ``hard only``: L2 to the ground truth (no teacher);
- ``+ tough KD``: 2 · L2 + ALoss of the tough teacher (α 1.9 / −0.45, band 0.15);
- ``+ tolerant KD``: 2 · L2 + ALoss of the tolerant teacher (α 1.8 / −0.4);
- ``both (KD-Loss)``: the paper's loss, 2 · main + ALoss(tough) + ALoss(tolerant);
- ``two-teacher L2``: L2 + the mean squared error to both teachers' points (the control).

Columns: test NME (inter-ocular and inter-pupil), FR@0.1, AUC@0.1 (inter-ocular), mean ± std over
seeds; parameters; batch-1 CPU latency of both teachers and the student measured side by side.

    python benchmarks/landmarks.py --json benchmarks/results/landmarks.json

Runs go through ``run_or_reuse`` (``--output-dir``, default runs/lm-bench): a finished run of the same
config is read, a begun one resumes, one of another config is refused. Lanes on a 2-core machine (one
thread each): the teachers side by side (``--roles tough --rows --train-only`` and ``--roles tolerant
--rows --train-only``), then two processes over disjoint rows / ``--only-seeds`` with ``--train-only``
(a run without a teacher costs about half one with two), then the plain command tabulates everything
(best and last checkpoints, mean ± std over seeds)::

    export OMP_NUM_THREADS=1
    for role in tough tolerant; do python benchmarks/landmarks.py --roles $role --rows --train-only & done; wait
    B="python benchmarks/landmarks.py --train-only"
    ($B --rows "hard only" "+ tough KD" && $B --rows "+ tolerant KD" --only-seeds 0 1) &
    ($B --rows "+ tolerant KD" --only-seeds 2 && $B --rows "both (KD-Loss)" "two-teacher L2") &
    wait; unset OMP_NUM_THREADS
    python benchmarks/landmarks.py --json benchmarks/results/landmarks.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from protege.analysis.runs import finished_summary, run_or_reuse, seed_paired, seed_stats
from protege.config import load_config
from protege.metrics.cost import count_params, measure_latencies
from protege.tasks.landmarks import build_landmark_model

TOUGH = {"loss": "aloss", "teacher_index": "tough", "alpha_pos": 1.9, "alpha_neg": -0.45}
TOLERANT = {"loss": "aloss", "teacher_index": "tolerant", "alpha_pos": 1.8, "alpha_neg": -0.4}
ROWS: dict[str, list[dict[str, Any]]] = {
    "hard only": [{"loss": "l2"}],
    "+ tough KD": [{"loss": "l2", "weight": 2.0}, TOUGH],
    "+ tolerant KD": [{"loss": "l2", "weight": 2.0}, TOLERANT],
    "both (KD-Loss)": [{"loss": "kd_loss", "teacher_index": ["tough", "tolerant"]}],
    "two-teacher L2": [{"loss": "l2"}, {"loss": "fitnet", "name": "l2_kd"}],
}
METRICS = ("nme_io", "nme_ip", "fr_io", "auc_io")


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row).strip("-").replace("--", "-")


def _base(args: argparse.Namespace, name: str, seed: int, teacher: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "task": "landmarks",
        "output_dir": str(args.teacher_dir if teacher else args.output_dir),
        "seed": seed,
        "epochs": args.epochs if teacher or args.student_epochs is None else args.student_epochs,
        "progress": False,
        "data": {
            "source": "faces",
            "batch_size": args.batch_size,
            "options": {"size": args.size, "train": args.train, "val": args.val, "test": args.test},
        },
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
    }


def _run(cfg: dict[str, Any], mode: str) -> dict[str, Any]:
    """A run's summary: read when it already completed with this config, resumed when begun, else
    trained now (:func:`protege.analysis.runs.run_or_reuse`)."""
    t = time.perf_counter()
    summary = run_or_reuse(load_config(None, **cfg), mode)  # type: ignore[arg-type]
    print(f"  {cfg['name']}: {time.perf_counter() - t:.0f} s", flush=True)
    return summary


def _teachers(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Train (or read) the Tough and the Tolerant teacher (those of ``--roles``); they use the first seed."""
    out = {}
    for role, extra in (("tough", {}), ("tolerant", {"targets": "asm", "asm_modes": args.asm_modes})):
        if role not in args.roles:
            continue
        cfg = _base(args, f"teacher-{role}", 0, teacher=True)
        cfg["data"]["options"].update(extra)
        cfg["student"] = {"model": args.teacher}
        cfg["terms"] = [{"loss": "l2"}]
        out[role] = _run(cfg, "train")
    return out


def _student(args: argparse.Namespace, row: str, seed: int) -> dict[str, Any]:
    cfg = _base(args, f"{_slug(row)}-s{seed}", seed)
    cfg["student"] = {"model": args.student}
    cfg["terms"] = ROWS[row]
    if row == "hard only":
        return _run(cfg, "train")
    cfg["teachers"] = [
        {"name": role, "model": args.teacher, "weights": str(Path(args.teacher_dir) / f"teacher-{role}")}
        for role in ("tough", "tolerant")
    ]
    return _run(cfg, "distill")


def _costs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    models = {
        "teacher": build_landmark_model(args.teacher, None, {}, 68).eval(),
        "student": build_landmark_model(args.student, None, {}, 68).eval(),
    }
    example = torch.rand(1, 3, args.size, args.size)
    lat = measure_latencies(models, example)
    return {k: {"params": count_params(m), "latency_ms": lat[k]["ms"]} for k, m in models.items()}


def _paired(
    rows: dict[str, Any],
    against: str,
    only: str | None = None,
    metrics: tuple[str, ...] = ("nme_io", "auc_io"),
) -> dict[str, Any]:
    """Each row's (or row ``only``'s) last-epoch metrics minus those of row ``against``'s run with the
    same seed (same initialisation, data and schedule: only the terms differ): mean, sample std, the
    per-seed differences and in how many seeds the row is better (lower NME, higher AUC)."""
    base = rows.get(against)
    out: dict[str, Any] = {}
    if base is None:
        return out
    for row, r in rows.items():
        if row == against or only not in (None, row):
            continue
        pairs = {
            m: seed_paired(
                dict(zip(r["seed_ids"], r["per_seed"][m])),
                dict(zip(base["seed_ids"], base["per_seed"][m])),
                lower_is_better=m.startswith(("nme", "fr")),
            )
            for m in metrics
        }
        if all(pairs.values()):
            out[row] = pairs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/lm-bench"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, help="the students' epochs (default: --epochs)")
    parser.add_argument(
        "--teacher-dir", type=Path, help="where the teachers are trained or read (default: --output-dir)"
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--asm-modes", type=float, default=0.9)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenetv2_050")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--roles", nargs="+", default=["tough", "tolerant"], choices=["tough", "tolerant"],
        help="the teachers to train or read (one per process trains them side by side); the table needs both",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--only-seeds", type=int, nargs="*", default=None,
        help="train only these seeds' student runs (lanes: processes side by side, then the full command "
        "reuses every run)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse-only", action="store_true", help="tabulate the finished student runs only; train none"
    )
    parser.add_argument("--train-only", action="store_true", help="train the runs; no costs, no table")
    args = parser.parse_args()
    args.teacher_dir = args.teacher_dir or args.output_dir
    t0 = time.perf_counter()
    teachers = _teachers(args)
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "teachers": {r: {w: s["test"][w] for w in ("best", "last")} for r, s in teachers.items()},
        "rows": {},
    }
    seeds = range(args.seeds) if args.only_seeds is None else args.only_seeds
    for row in args.rows:
        runs, used = [], []
        for seed in seeds:
            if args.reuse_only:
                done = finished_summary(args.output_dir / f"{_slug(row)}-s{seed}")
                if done is not None:
                    runs.append(done)
                    used.append(seed)
            else:
                runs.append(_student(args, row, seed))
                used.append(seed)
        if not runs:
            continue
        best, best_std = seed_stats(runs, "best")
        last, last_std = seed_stats(runs, "last")
        results["rows"][row] = {
            "best": best, "best_std": best_std, "last": last, "last_std": last_std, "seeds": len(runs),
            "per_seed": {m: [r["test"]["last"][m] for r in runs] for m in METRICS}, "seed_ids": used,
        }  # fmt: skip
    if args.train_only:
        return
    if len(teachers) < 2:
        parser.error("the table needs both teachers: leave --roles out (or use --train-only)")
    results["costs"] = _costs(args)
    results["wall_s"] = time.perf_counter() - t0
    costs = results["costs"]
    for which in ("best", "last"):
        print(
            f"\n{which} checkpoint"
            + (" (chosen by validation AUC@0.1)" if which == "best" else " (the last epoch)")
            + f"\n{'model':<18}"
            + "".join(f"{m:>16}" for m in METRICS)
            + f"{'params':>12}{'ms':>8}"
        )
        for role, t in results["teachers"].items():
            c = costs["teacher"]
            print(
                f"{'teacher ' + role:<18}"
                + "".join(f"{t[which][k]:>16.4f}" for k in METRICS)
                + f"{c['params']:>12,}{c['latency_ms']:>8.2f}"
            )
        for row, r in results["rows"].items():
            c = costs["student"]
            cells = "".join(f"{r[which][k]:>9.4f}±{r[which + '_std'][k]:<6.4f}" for k in METRICS)
            print(f"{row + ' (' + str(r['seeds']) + ')':<18}{cells}{c['params']:>12,}{c['latency_ms']:>8.2f}")
    # the claim: both teachers beat no teacher and each single one, seed by seed
    results["paired"] = {"hard only": _paired(results["rows"], "hard only")}
    for one in ("+ tough KD", "+ tolerant KD"):
        results["paired"][one] = _paired(results["rows"], one, only="both (KD-Loss)")
    for against, pairs in results["paired"].items():
        if pairs:
            print(
                f"\nminus the same seed's {against!r} run (last epoch; lower NME and higher AUC are better)"
            )
        for row, p in pairs.items():
            print(
                f"{row:<18}"
                + "   ".join(
                    f"Δ{m} {d['mean']:+.4f} ± {d['std']:.4f} (better in {d['better']}/{len(d['per_seed'])})"
                    for m, d in p.items()
                )
            )
    print(f"wall {results['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from protege.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
