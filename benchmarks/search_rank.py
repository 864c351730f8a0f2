"""Ground truth for student search: do zero-cost proxies rank students like distillation does?

Issue 4, "Ground truth and proof". Four parts, each ``--part``:

``gt``
    Train every architecture of the ResNet-20 depth space (1/3/5/7 BasicBlocks per stage, 64
    students) and ``--nb201-samples`` NAS-Bench-201 cells drawn with ``--nb201-seed``, each twice
    per seed: distilled from one trained teacher (0.1·CE + 0.9·KD, T=4) and with CE only, all with
    one fixed schedule (SGD, cosine, ``--epochs``), for ``--seeds`` seeds. The teacher (default
    ResNet-56 shape: 9 blocks per stage, trained ``--teacher-epochs`` with CE) serves both spaces.
    The accuracy is the test split at the last epoch (no selection). Results go to
    ``<output-dir>/ground_truth.json`` (written atomically after every run); the runs themselves
    to ``<output-dir>/runs/``. Run the command again to go on: finished runs are reused. The
    noise ceiling is Kendall's τ between the seeds' accuracies over the same architectures.
``proxies``
    Every proxy of ``protege.search.list_proxies()`` (the three DisWOT proxies both with a
    randomly initialised teacher, as the paper does, and with the trained one; ``diswot_relation``
    is M_r, ``diswot_semantic`` M_s) scores every architecture on ``--batches`` proxy batches
    (replicate ``r``: batch ``r`` of the training split and student/random-teacher init seed
    ``r``); Kendall τ and Spearman ρ against the KD accuracy and the CE-only accuracy (means over
    seeds) per replicate, then mean ± std over the replicates. One markdown table per space,
    printed and saved to ``<output-dir>/proxies-<space>.md``.
``search``
    Regularized evolution (population ``--population``, tournament ``--tournament``, budget
    ``--search-candidates`` candidates scored, at most ``--max-params`` parameters; default: the
    params of ResNet-20 3-3-3 for the ResNet space, the median of the sampled cells for NB201)
    scored three ways with the same seed: DisWOT with a random teacher, DisWOT with the trained
    teacher, and a short KD training run of ``--search-epochs`` epochs (its validation accuracy is
    the score). Wall time of each search, the ratio to the training-based one, and the winner's
    distilled accuracy with the ground-truth schedule (looked up in the ground truth, or trained
    with it and added there).
``throughput``
    Candidates scored per minute in the ResNet-20 depth space per proxy (build, params and FLOPs
    count, one proxy batch: exactly what the search pays per candidate), proxies interleaved
    candidate by candidate so the ratios are side by side.

Commands (``--json`` also writes everything to one file)::

    # smoke test on 2 CPU cores (digits 16x16, 4 archs per space, 1 epoch, 2 batches, tiny widths)
    .venv/bin/python benchmarks/search_rank.py --quick --json search-rank-quick.json

    # the full benchmark (GPU: bf16; resumable, run it again after an interruption)
    .venv/bin/python benchmarks/search_rank.py --part all --space both --device cuda --json search-rank.json

    # only proxy throughput on the real ResNet-20 depth space (no training; all 19 proxy variants
    # take ~45 s per candidate on the loaded 2-core box, so --archs 12 measures a seeded dozen)
    .venv/bin/python benchmarks/search_rank.py --part throughput --space resnet --archs 12 --json throughput.json

    # proxies on a seeded subset of 12 ResNet students (runs their ground truth first)
    .venv/bin/python benchmarks/search_rank.py --part gt,proxies --space resnet --archs 12

Defaults of the full run: MNIST-5k (bundled, 28x28, 3,500 train / 1,000 test, random 2-px
shifts), batch 64, SGD lr 0.05 momentum 0.9 wd 5e-4, cosine, 15 epochs, 2 seeds; ResNet widths
16/16/32/64 (the real ResNet-20); NB201 skeleton 8 channels, 2 cells per stage, 3 stages; teacher
ResNet-56 shape trained 30 epochs; proxies on 5 batches of 64; search: 20 candidates, population 8,
2-epoch KD runs as the training scorer.

Everything that fixes the ground truth (data, widths, skeleton, schedule, teacher) is stored in
``ground_truth.json``; running with other settings into the same ``--output-dir`` is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import protege as pg
import protege.search  # noqa: F401  (registers the resnet_depth and nb201 builders)
from protege.build import build_from
from protege.config import ModelConfig, load_config
from protege.files import atomic_write_text
from protege.metrics.cost import count_params
from protege.search import (
    Budget,
    CandidateScorer,
    NB201Space,
    ResNetDepthSpace,
    correlate,
    get_proxy,
    kendall_tau,
    list_proxies,
    needs_teacher,
    regularized_evolution,
    spearman_rho,
)

SPACES = ("resnet", "nb201")
PARTS = ("gt", "proxies", "search", "throughput")
DISWOT = ("diswot", "diswot_relation", "diswot_semantic")
KD_TERMS = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]


# --------------------------------------------------------------------------- arguments and settings


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", help="gt | proxies | search | throughput | all, or a comma list")
    ap.add_argument("--space", default="both", choices=["resnet", "nb201", "both"])
    ap.add_argument(
        "--quick", action="store_true", help="smoke mode: 4 archs, 1 epoch, 2 batches, tiny widths"
    )
    ap.add_argument(
        "--dataset",
        default=None,
        choices=["mnist5k", "digits", "fashion-mnist"],
        help="default mnist5k (quick: digits); fashion-mnist needs `make data`",
    )
    ap.add_argument("--train-size", type=int, default=None, help="fashion-mnist: training images drawn")
    ap.add_argument("--val-size", type=int, default=None, help="fashion-mnist: validation images drawn")
    ap.add_argument("--test-size", type=int, default=None, help="fashion-mnist: test images drawn")
    ap.add_argument(
        "--size", type=int, default=None, help="resize images to SIZE x SIZE (default: digits 16, mnist5k 28)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="ground-truth schedule (default 15)")
    ap.add_argument("--seeds", type=int, default=None, help="ground-truth seeds (default 2)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--widths", default=None, help="ResNet stem,s1,s2,s3 channels (default 16,16,32,64)")
    ap.add_argument("--nb201-channels", type=int, default=None, help="NB201 first-stage channels (default 8)")
    ap.add_argument("--nb201-cells", type=int, default=None, help="NB201 cells per stage (default 2)")
    ap.add_argument("--nb201-samples", type=int, default=None, help="NB201 cells drawn (default 50)")
    ap.add_argument("--nb201-seed", type=int, default=0)
    ap.add_argument(
        "--resnet-archs",
        type=int,
        default=None,
        help="ResNet depth variants trained (a seeded sample of the 64; default --archs, else all)",
    )
    ap.add_argument(
        "--archs",
        type=int,
        default=None,
        help="only N archs per space (ResNet: a subset drawn with --nb201-seed; NB201: the first N)",
    )
    ap.add_argument(
        "--kd-cache-views",
        type=int,
        default=None,
        help="KD ground-truth runs read the teacher from an augmentation-aware cache of this many views per "
        "training image, built once (the teacher never runs in them, also not for val/test fidelity); "
        "default: the teacher runs online",
    )
    ap.add_argument("--teacher-depths", default="9,9,9", help="teacher blocks per stage (ResNet-56: 9,9,9)")
    ap.add_argument("--teacher-widths", default=None, help="teacher channels (default: --widths)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default 30")
    ap.add_argument(
        "--teacher-train-size",
        type=int,
        default=None,
        help="fashion-mnist: training images the teacher is trained on (default --train-size; drawn from "
        "the same training pool, never from the validation or test images); a teacher trained on more "
        "data than its students leaves KD room to rank them",
    )
    ap.add_argument("--batches", type=int, default=None, help="proxy batches/replicates (default 5)")
    ap.add_argument("--proxy-batch-size", type=int, default=None, help="default 64")
    ap.add_argument("--proxies", default=None, help="comma list of proxies (default: list_proxies())")
    ap.add_argument("--search-candidates", type=int, default=None, help="default 20")
    ap.add_argument(
        "--search-epochs", type=int, default=None, help="epochs of the training scorer (default 2)"
    )
    ap.add_argument(
        "--search-batch-size",
        type=int,
        default=64,
        help="batch size of the training scorer (its few epochs need enough steps: at 256 an epoch of "
        "MNIST-5k is 14 steps and a 2-epoch run stays at chance)",
    )
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--population", type=int, default=None, help="default 8")
    ap.add_argument("--tournament", type=int, default=3)
    ap.add_argument("--max-params", type=int, default=None, help="search budget (default: see --help)")
    ap.add_argument("--redo-search", action="store_true", help="re-run searches stored in results.json")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads per process")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="ground truth: train in this many processes at once (one GPU or many CPU cores); each "
        "writes its records to its own shard file, merged into ground_truth.json when all are done",
    )
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "I/N": internal, one worker
    # internal: "space|arch,space|arch": KD runs (every seed) the workers also train (search winners)
    ap.add_argument("--extra-kd", default="", help=argparse.SUPPRESS)
    ap.add_argument(
        "--output-dir", default=None, help="default runs/search-rank (quick: runs/search-rank-quick)"
    )
    ap.add_argument("--json", default=None, help="also write every result to this file")
    args = ap.parse_args(argv)

    quick = args.quick
    defaults = {
        "dataset": "digits" if quick else "mnist5k",
        "size": None,
        "epochs": 1 if quick else 15,
        "seeds": 2,
        "widths": "4,4,8,16" if quick else "16,16,32,64",
        "nb201_channels": 4 if quick else 8,
        "nb201_cells": 1 if quick else 2,
        "nb201_samples": 4 if quick else 50,
        "archs": 4 if quick else None,
        "teacher_epochs": 1 if quick else 30,
        "batches": 2 if quick else 5,
        "proxy_batch_size": 16 if quick else 64,
        "search_candidates": 4 if quick else 20,
        "search_epochs": 1 if quick else 2,
        "population": 2 if quick else 8,
        "output_dir": "runs/search-rank-quick" if quick else "runs/search-rank",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size is None:
        args.size = 16 if args.dataset == "digits" else 28
    if quick and args.teacher_depths == "9,9,9":
        args.teacher_depths = "3,3,3"
    if args.teacher_widths is None:
        args.teacher_widths = args.widths
    args.parts = PARTS if args.part == "all" else tuple(p.strip() for p in args.part.split(","))
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        ap.error(f"unknown --part {bad}; choose among {', '.join(PARTS)} or all")
    args.spaces = SPACES if args.space == "both" else (args.space,)
    if args.population < args.tournament:
        args.tournament = args.population
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.seeds < 1 or args.batches < 1 or args.epochs < 1 or args.workers < 1:
        ap.error("--seeds, --batches, --epochs and --workers must be at least 1")
    if args.shard is not None:
        i, _, n = args.shard.partition("/")
        args.shard = (int(i), int(n))
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that fixes a ground-truth accuracy (seeds and arch counts only extend it)."""
    return {
        "data": data_spec(args),
        "epochs": args.epochs,
        "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "kd_terms": KD_TERMS,
        "resnet_widths": _ints(args.widths),
        "nb201_skeleton": {"channels": args.nb201_channels, "cells_per_stage": args.nb201_cells, "stages": 3},
        "teacher": {
            "depths": _ints(args.teacher_depths),
            "widths": _ints(args.teacher_widths),
            "epochs": args.teacher_epochs,
            **({"train_size": args.teacher_train_size} if args.teacher_train_size else {}),
        },
        "nb201_seed": args.nb201_seed,
        "accuracy": "test split, last epoch",
        **({"kd_cache_views": args.kd_cache_views} if args.kd_cache_views else {}),  # older results: absent
    }


def data_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": args.dataset, "batch_size": args.batch_size, "transforms": "augment"}
    if args.dataset == "digits" or args.size != 28:  # mnist5k at its native 28: no option (older results)
        spec["options"] = {"size": args.size}
    sizes = {"train_size": args.train_size, "val_size": args.val_size, "test_size": args.test_size}
    if any(v is not None for v in sizes.values()):
        if args.dataset != "fashion-mnist":
            raise SystemExit("--train-size, --val-size and --test-size apply to --dataset fashion-mnist only")
    if args.teacher_train_size is not None and args.dataset != "fashion-mnist":
        raise SystemExit("--teacher-train-size applies to --dataset fashion-mnist only")
        spec.setdefault("options", {}).update({k: v for k, v in sizes.items() if v is not None})
    return spec


def fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- spaces and architectures


def build_space(args: argparse.Namespace, name: str) -> Any:
    if name == "resnet":
        return ResNetDepthSpace((1, 3, 5, 7), _ints(args.widths))
    return NB201Space(args.nb201_channels, args.nb201_cells, 3)


def arch_list(args: argparse.Namespace, name: str, space: Any) -> list[Any]:
    """The space's ground-truth architectures: all 64 ResNets, or the seeded NB201 sample."""
    if name == "resnet":
        archs = list(space.enumerate())
        n = args.archs if args.resnet_archs is None else args.resnet_archs
        if n is not None and n < len(archs):
            archs = sorted(random.Random(args.nb201_seed).sample(archs, n))
        return archs
    rng, seen, archs = random.Random(args.nb201_seed), set(), []
    n = args.nb201_samples if args.archs is None else min(args.nb201_samples, args.archs)
    while len(archs) < n:  # a prefix of a longer sample: more samples extend the ground truth
        arch = space.sample(rng)
        if space.encode(arch) not in seen:
            seen.add(space.encode(arch))
            archs.append(arch)
    return archs


def slug(space_name: str, arch_id: str) -> str:
    if space_name == "resnet":
        return arch_id
    return hashlib.sha1(arch_id.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- ground truth


class GroundTruth:
    """``ground_truth.json``: the settings, the teacher and one record per (space, arch, mode, seed)."""

    def __init__(self, path: Path, settings_: dict[str, Any]) -> None:
        self.path = path
        fp = fingerprint(settings_)
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("fingerprint") != fp:
                raise SystemExit(
                    f"{path} holds a ground truth made with other settings:\n  stored  {data.get('settings')}\n"
                    f"  now     {settings_}\nchoose another --output-dir (or delete it to start over)"
                )
        else:
            data = {"settings": settings_, "fingerprint": fp, "teacher": None, "runs": {}}
        self.data = data

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        return self.data["runs"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    @staticmethod
    def key(space: str, arch_id: str, mode: str, seed: int) -> str:
        return f"{space}|{arch_id}|{mode}|s{seed}"

    def acc(self, space: str, arch_id: str, mode: str, seeds: int) -> float | None:
        """Mean test accuracy over the first ``seeds`` seeds, ``None`` unless all are there."""
        values = [self.runs.get(self.key(space, arch_id, mode, s), {}).get("acc") for s in range(seeds)]
        return None if any(v is None for v in values) else statistics.fmean(values)

    def accs(self, space: str, arch_ids: list[str], mode: str, seeds: int) -> dict[str, float]:
        out = {a: self.acc(space, a, mode, seeds) for a in arch_ids}
        return {a: v for a, v in out.items() if v is not None}


def base_config(args: argparse.Namespace, name: str, seed: int, epochs: int) -> dict[str, Any]:
    s = settings(args)
    cuda = args.device == "cuda"
    return {
        "name": name,
        "output_dir": str(Path(args.output_dir) / "runs"),
        "data": data_spec(args),
        "epochs": epochs,
        "optim": s["optim"],
        "schedule": s["schedule"],
        "seed": seed,
        "progress": False,
        "measure_cost": False,
        "keep_checkpoints": "last+best",
        "cpu": not cuda,
        "mixed_precision": "bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
    }


def run_one(cfg_dict: dict[str, Any], mode: str) -> dict[str, Any]:
    """``pg.run`` of a config, or the summary of the finished run already on disk."""
    cfg = load_config(None, **cfg_dict)
    done = cfg.run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if "test" in summary and summary.get("status") == "completed":
            return summary
    return pg.run(cfg, mode=mode, overwrite=True, report=False)  # type: ignore[arg-type]


def teacher_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "resnet_depth",
        "kwargs": {"depths": _ints(args.teacher_depths), "widths": _ints(args.teacher_widths)},
    }


def train_teacher(args: argparse.Namespace, gt: GroundTruth) -> dict[str, Any]:
    """Train the teacher once (CE); its spec with ``weights`` pointing at the run."""
    cfg = base_config(args, "teacher", 0, args.teacher_epochs) | {"student": teacher_spec(args)}
    if args.teacher_train_size:
        options = {**cfg["data"].get("options", {}), "train_size": args.teacher_train_size}
        cfg["data"] = {**cfg["data"], "options": options}
    t0 = time.perf_counter()
    summary = run_one(cfg, "train")
    if gt.data.get("teacher") is None:
        gt.data["teacher"] = {
            **teacher_spec(args),
            "acc": summary["test"]["last"]["acc"],
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        gt.save()
        print(
            f"teacher {args.teacher_depths} trained: test acc {summary['test']['last']['acc']:.4f}",
            flush=True,
        )
    return teacher_spec(args) | {"weights": str(Path(args.output_dir) / "runs" / "teacher")}


def gt_run(
    args: argparse.Namespace, gt: GroundTruth, space_name: str, space: Any, arch: Any, mode: str, seed: int
) -> dict[str, Any]:
    """One ground-truth run (``mode`` ``kd`` or ``ce``), reused when recorded already."""
    arch_id = space.encode(arch)
    key = gt.key(space_name, arch_id, mode, seed)
    if key in gt.runs:
        return gt.runs[key]
    teacher = train_teacher(args, gt) if mode == "kd" else None
    name = f"{space_name}-{slug(space_name, arch_id)}-{mode}-s{seed}"
    cfg = base_config(args, name, seed, args.epochs) | {"student": space.model_spec(arch)}
    if mode == "kd":
        cfg |= {"teacher": teacher, "terms": KD_TERMS, **kd_cache(args)}
    t0 = time.perf_counter()
    summary = run_one(cfg, "distill" if mode == "kd" else "train")
    wall = time.perf_counter() - t0
    torch.manual_seed(0)
    record = {
        "space": space_name,
        "arch": arch_id,
        "mode": mode,
        "seed": seed,
        "acc": summary["test"]["last"]["acc"],
        "acc_best_epoch": summary["test"]["best"]["acc"],
        "val_acc": summary["final"].get("val/acc"),
        "params": count_params(space.build(arch, 10, _in_chans(args))),
        "train_s": round(float(summary.get("wall_time_s", wall)), 2),
        "wall_s": round(wall, 2),
        "device": summary.get("device"),
        "run_dir": str(Path(cfg["output_dir"]) / name),
    }
    gt.runs[key] = record
    gt.save()
    return record


_DATA_CACHE: dict[str, Any] = {}


def load_splits(args: argparse.Namespace, transforms: str = "none") -> Any:
    key = f"{args.dataset}-{args.size}-{transforms}"
    if key not in _DATA_CACHE:
        options = data_spec(args).get("options", {})
        _DATA_CACHE[key] = pg.load_data(args.dataset, transforms=transforms, **options)
    return _DATA_CACHE[key]


def _in_chans(args: argparse.Namespace) -> int:
    return int(load_splits(args).in_chans)


def kd_cache(args: argparse.Namespace) -> dict[str, Any]:
    """The ``cache:`` section of a KD ground-truth run (empty when the teacher runs online)."""
    if not args.kd_cache_views:
        return {}
    path = Path(args.output_dir) / f"teacher-cache-v{args.kd_cache_views}"
    return {"cache": {"path": str(path), "views": args.kd_cache_views, "top_k": "all"}}


def build_kd_cache(args: argparse.Namespace, teacher: dict[str, Any]) -> None:
    """Run the teacher once over ``--kd-cache-views`` views of every training image (and val/test)."""
    section = kd_cache(args)
    if not section or (Path(section["cache"]["path"]) / "index.json").is_file():
        return
    from protege.caching import build_cache

    cfg = base_config(args, "teacher-cache", 0, args.epochs) | {
        "student": teacher_spec(args),
        "teacher": teacher,
        "terms": KD_TERMS,
        **section,
    }
    t0 = time.perf_counter()
    build_cache(load_config(None, **cfg))
    print(f"teacher-output cache: {args.kd_cache_views} views, {time.perf_counter() - t0:.0f} s", flush=True)


def part_gt(args: argparse.Namespace, gt: GroundTruth) -> dict[str, Any]:
    start = time.perf_counter()
    build_kd_cache(args, train_teacher(args, gt))  # before any worker starts: one writer
    jobs = []
    for space_name in args.spaces:
        space = build_space(args, space_name)
        for seed in range(args.seeds):  # seed-major: the first seed completes before the second starts
            for arch in arch_list(args, space_name, space):
                for mode in ("kd", "ce"):
                    jobs.append((space_name, space, arch, mode, seed))
        extra = [e.split("|", 1)[1] for e in args.extra_kd.split(",") if e.startswith(f"{space_name}|")]
        for seed in range(args.seeds):  # search winners outside the ground-truth archs (KD only)
            for arch_id in extra:
                jobs.append((space_name, space, space.decode(arch_id), "kd", seed))
    todo = [j for j in jobs if gt.key(j[0], j[1].encode(j[2]), j[3], j[4]) not in gt.runs]
    if args.shard is None:
        print(f"ground truth: {len(jobs)} runs, {len(todo)} to train", flush=True)
    if args.shard is not None:  # one worker of --workers: every n-th run still to do, the stride
        i, n = args.shard  # rotated each round so the alternating kd/ce runs spread over the workers
        jobs = [job for k, job in enumerate(todo) if (k + k // n) % n == i]
    elif args.workers > 1 and len(todo) > 1:
        run_workers(args, gt, min(args.workers, len(todo)))
        return summarize_gt(args, gt)
    for i, (space_name, space, arch, mode, seed) in enumerate(jobs):
        known = gt.key(space_name, space.encode(arch), mode, seed) in gt.runs
        rec = gt_run(args, gt, space_name, space, arch, mode, seed)
        if not known:
            print(
                f"[{i + 1}/{len(jobs)}] {space_name} {rec['arch']} {mode} s{seed}: acc {rec['acc']:.4f} "
                f"({rec['train_s']:.0f} s; {time.perf_counter() - start:.0f} s total)",
                flush=True,
            )
    return summarize_gt(args, gt)


def _shard_path(out: Path, index: int) -> Path:
    return out / "shards" / f"ground_truth.{index}.json"


def run_workers(args: argparse.Namespace, gt: GroundTruth, n: int) -> None:
    """Train the runs still to do in ``n`` processes of this script (``--shard i/n``), then merge.

    Each worker records into its own shard file (a ground truth with the same settings and teacher),
    so no two processes write one file; the shards are merged into ``gt`` (and removed) even when a
    worker failed, and what a failed worker did not finish is trained by the next invocation."""
    import subprocess

    out = Path(args.output_dir)
    for i in range(n):  # a shard left by an interrupted invocation is merged first
        merge_shard(gt, _shard_path(out, i))
    argv = [a for a in sys.argv[1:]]
    procs = []
    for i in range(n):
        shard = GroundTruth(_shard_path(out, i), gt.data["settings"])
        shard.data["teacher"] = gt.data["teacher"]
        shard.data["runs"] = dict(gt.runs)  # what is done already, so the worker skips it
        shard.save()
        cmd = [sys.executable, __file__, *argv, "--part", "gt", "--shard", f"{i}/{n}", "--json", ""]
        if args.extra_kd:
            cmd += ["--extra-kd", args.extra_kd]
        procs.append(subprocess.Popen(cmd))
    print(f"ground truth: {n} workers started", flush=True)
    codes = [p.wait() for p in procs]
    for i in range(n):
        merge_shard(gt, _shard_path(out, i))
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        raise SystemExit(f"ground-truth workers {failed} failed (see their output above); their finished "
                         "runs are kept: run the same command again to train the rest")  # fmt: skip


def merge_shard(gt: GroundTruth, path: Path) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if data.get("fingerprint") == gt.data["fingerprint"]:
        gt.runs.update(data.get("runs", {}))
        gt.save()
    path.unlink()


#: mean CE accuracy below which an arch counts as one that never learns (10 classes: chance 10 %)
CHANCE_MARGIN = 0.2


def summarize_gt(args: argparse.Namespace, gt: GroundTruth) -> dict[str, Any]:
    """Per space: accuracies, the noise ceiling (τ between seeds), τ between KD and CE rankings."""
    out: dict[str, Any] = {"teacher": gt.data.get("teacher")}
    for space_name in args.spaces:
        space = build_space(args, space_name)
        ids = [space.encode(a) for a in arch_list(args, space_name, space)]
        row: dict[str, Any] = {"archs": len(ids)}
        for mode in ("kd", "ce"):
            per_seed = [_seed_accs(gt, space_name, ids, mode, s) for s in range(args.seeds)]
            means = gt.accs(space_name, ids, mode, args.seeds)
            row[mode] = {
                "n": len(means),
                "mean": statistics.fmean(means.values()) if means else None,
                "min": min(means.values(), default=None),
                "max": max(means.values(), default=None),
                "noise_ceiling": _ceiling(per_seed),
                "between_archs": _anova(per_seed),
                "train_s_median": _median_time(gt, space_name, mode),
            }
        kd, ce = gt.accs(space_name, ids, "kd", args.seeds), gt.accs(space_name, ids, "ce", args.seeds)
        # archs that never learn (NB201 cells whose ops cut the input from the output) separate from
        # the rest by tens of points and make any ANOVA "significant": the test again without them
        dead = sorted(a for a, v in ce.items() if v < CHANCE_MARGIN)
        if dead:
            row["without_dead"] = {"excluded": dead} | {
                mode: _anova(
                    [
                        {a: v for a, v in p.items() if a not in dead}
                        for p in (_seed_accs(gt, space_name, ids, mode, s) for s in range(args.seeds))
                    ]
                )
                for mode in ("kd", "ce")
            }
        both = sorted(set(kd) & set(ce))
        row["kd_vs_ce"] = correlate(kd, ce) if len(both) >= 3 else None
        row["kd_gain_mean"] = statistics.fmean(kd[a] - ce[a] for a in both) if both else None
        out[space_name] = row
    return out


def _seed_accs(gt: GroundTruth, space: str, ids: list[str], mode: str, seed: int) -> dict[str, float]:
    recs = {a: gt.runs.get(gt.key(space, a, mode, seed)) for a in ids}
    return {a: r["acc"] for a, r in recs.items() if r is not None}


def _anova(per_seed: list[dict[str, float]]) -> dict[str, Any] | None:
    """Do the archs differ beyond seed noise? One-way ANOVA over the archs every seed has.

    ``F`` and its p-value (:func:`scipy.stats.f_oneway`, one group per arch, one value per seed),
    the spread of the archs' mean accuracy (``arch_sd``) beside the pooled seed-to-seed spread of
    one arch (``seed_sd``), and ICC(1) = (MSB − MSW) / (MSB + (k − 1)·MSW): the share of the accuracy variance that is the
    architecture's (0: a ranking of these archs is noise, 1: every seed agrees). ``None`` with
    fewer than 2 seeds or 3 archs.
    """
    from scipy.stats import f_oneway

    k = len(per_seed)
    common = sorted(set.intersection(*(set(p) for p in per_seed))) if k else []
    if k < 2 or len(common) < 3:
        return None
    groups = [[p[a] for p in per_seed] for a in common]
    res = f_oneway(*groups)
    f = float(res.statistic)
    icc = (f - 1.0) / (f + k - 1.0)  # MSB/MSW = F
    return {
        "F": f,
        "p": float(res.pvalue),
        "icc": icc,
        "arch_sd": statistics.pstdev(statistics.fmean(g) for g in groups),  # of the archs' means
        "seed_sd": math.sqrt(statistics.fmean(statistics.variance(g) for g in groups)),  # pooled, one arch
        "archs": len(common),
        "seeds": k,
    }


def _ceiling(per_seed: list[dict[str, float]]) -> dict[str, Any] | None:
    """Kendall τ / Spearman ρ between every pair of seeds over their common archs (mean over pairs)."""
    pairs = []
    for i in range(len(per_seed)):
        for j in range(i + 1, len(per_seed)):
            common = sorted(set(per_seed[i]) & set(per_seed[j]))
            if len(common) >= 3:
                a, b = [per_seed[i][k] for k in common], [per_seed[j][k] for k in common]
                pairs.append({"kendall": kendall_tau(a, b), "spearman": spearman_rho(a, b), "n": len(common)})
    if not pairs:
        return None
    return {
        "kendall": statistics.fmean(p["kendall"] for p in pairs),
        "spearman": statistics.fmean(p["spearman"] for p in pairs),
        "n": min(p["n"] for p in pairs),
        "pairs": len(pairs),
    }


def _median_time(gt: GroundTruth, space: str, mode: str) -> float | None:
    times = [r["train_s"] for r in gt.runs.values() if r["space"] == space and r["mode"] == mode]
    return statistics.median(times) if times else None


def gt_table(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Ground truth: test accuracy (%) at the last of {args.epochs} epochs, mean over {args.seeds} seeds; "
        "noise ceiling = Kendall τ between seeds; ANOVA p / ICC: do the archs differ beyond seed noise",
        "",
        "| space | archs | KD acc mean [min, max] | CE acc mean [min, max] | ceiling τ KD | ceiling τ CE "
        "| ANOVA p KD / CE | ICC KD / CE | τ(KD, CE) | KD − CE | s/run KD | s/run CE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    teacher = summary.get("teacher") or {}
    for space in args.spaces:
        row = summary.get(space)
        if not row:
            continue

        def acc(m: dict[str, Any]) -> str:
            if not m["n"]:
                return "—"
            return f"{100 * m['mean']:.2f} [{100 * m['min']:.2f}, {100 * m['max']:.2f}] (n={m['n']})"

        def tau(c: dict[str, Any] | None) -> str:
            return "—" if not c else f"{c['kendall']:.3f}"

        def anova(r: dict[str, Any], key: str, fmt: str) -> str:
            cells = [r[m].get("between_archs") for m in ("kd", "ce")]
            return " / ".join("—" if c is None else format(c[key], fmt) for c in cells)

        def sec(v: float | None) -> str:
            return "—" if v is None else f"{v:.1f}"

        gain = row["kd_gain_mean"]
        lines.append(
            f"| {space} | {row['archs']} | {acc(row['kd'])} | {acc(row['ce'])} | {tau(row['kd']['noise_ceiling'])} "
            f"| {tau(row['ce']['noise_ceiling'])} | {anova(row, 'p', '.2g')} | {anova(row, 'icc', '.2f')} "
            f"| {tau(row['kd_vs_ce'])} "
            f"| {'—' if gain is None else f'{100 * gain:+.2f}'} | {sec(row['kd']['train_s_median'])} "
            f"| {sec(row['ce']['train_s_median'])} |"
        )
    spreads = [
        f"{space} {mode.upper()}: {100 * b['arch_sd']:.2f} pt between archs' means vs {100 * b['seed_sd']:.2f} pt "
        "between seeds of one arch"
        for space in args.spaces
        for mode in ("kd", "ce")
        if (b := (summary.get(space) or {}).get(mode, {}).get("between_archs"))
    ]
    if spreads:
        lines += ["", "Spread (std): " + "; ".join(spreads)]
    for space in args.spaces:
        w = (summary.get(space) or {}).get("without_dead")
        if w and w.get("kd") and w.get("ce"):
            lines += [
                "",
                f"{space} without the {len(w['excluded'])} archs at chance (mean CE accuracy < "
                f"{100 * CHANCE_MARGIN:.0f} %): ANOVA p KD / CE {w['kd']['p']:.2g} / {w['ce']['p']:.2g}, "
                f"ICC {w['kd']['icc']:.2f} / {w['ce']['icc']:.2f}, {w['kd']['archs']} archs",
            ]
    if teacher.get("acc") is not None:
        lines += [
            "",
            f"Teacher resnet_depth {teacher['kwargs']['depths']}: test acc {100 * teacher['acc']:.2f}%",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- proxies


def proxy_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(label, proxy name, teacher: None | "random" | "trained") for every proxy to evaluate."""
    names = list_proxies() if args.proxies is None else [p.strip() for p in args.proxies.split(",")]
    variants = []
    for name in names:
        get_proxy(name)  # unknown names fail here, with the valid ones listed
        if name in DISWOT:
            for teacher in ("random", "trained"):
                variants.append({"label": f"{name} ({teacher} teacher)", "proxy": name, "teacher": teacher})
        else:
            variants.append(
                {"label": name, "proxy": name, "teacher": "trained" if needs_teacher(name) else None}
            )
    return variants


def proxy_batches(args: argparse.Namespace, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_splits(args)
    loader = pg.make_loader(data.train, args.proxy_batch_size, shuffle=True, seed=1234, drop_last=True)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == n:
            return batches
    raise SystemExit(f"the training split holds fewer than {n} batches of {args.proxy_batch_size}")


def teachers(
    args: argparse.Namespace, gt: GroundTruth, seed: int, train: bool = True
) -> dict[str | None, torch.nn.Module | None]:
    """The trained teacher and a random one (initialised from ``seed``), on ``args.device``.

    ``train=False`` (throughput, where only the cost counts): use the trained teacher if it is on
    disk, else a randomly initialised network of the same architecture in its place.
    """
    data = load_splits(args)
    torch.manual_seed(seed)
    random_t = build_from(ModelConfig(**teacher_spec(args)), data).to(args.device)
    weights = Path(args.output_dir) / "runs" / "teacher" / "summary.json"
    if train or weights.is_file():
        trained = build_from(ModelConfig(**train_teacher(args, gt)), data).to(args.device)
    else:
        print(
            "throughput: no trained teacher on disk; timing with a random one of the same shape", flush=True
        )
        trained = build_from(ModelConfig(**teacher_spec(args)), data).to(args.device)
    return {"trained": trained, "random": random_t, None: None}


def on_device(proxy: Any, device: str) -> Any:
    """The proxy with the student moved to ``device`` first (a scorer builds candidates on the CPU)."""
    if device == "cpu":
        return proxy

    def score(teacher: torch.nn.Module | None, student: torch.nn.Module, batch: Any) -> float:
        return proxy(teacher, student.to(device), batch)

    return score


def score_all(
    args: argparse.Namespace, gt: GroundTruth, space_name: str, store: dict[str, Any], save: Any
) -> dict[str, Any]:
    """Proxy scores ``store[label][replicate][arch_id]`` (``None``: failed), resumable; a rerun
    scores what is missing and retries what failed."""
    space = build_space(args, space_name)
    archs = arch_list(args, space_name, space)
    variants = proxy_variants(args)
    batches = proxy_batches(args, args.batches)
    data = load_splits(args)
    for rep, batch in enumerate(batches):
        models = teachers(args, gt, 10_000 + rep)
        for arch in archs:
            arch_id = space.encode(arch)
            todo = [  # new, or failed before (a failure is retried: it may have been a bug since fixed)
                v
                for v in variants
                if store.setdefault(v["label"], {}).setdefault(str(rep), {}).get(arch_id) is None
            ]
            if not todo:
                continue
            torch.manual_seed(rep)
            student = space.build(arch, data.num_classes, data.in_chans).to(args.device)
            for v in todo:
                proxy = get_proxy(v["proxy"])
                try:
                    value = float(proxy(models[v["teacher"]], student, batch))
                    value = value if math.isfinite(value) else None
                except Exception as e:  # noqa: BLE001 — a failing proxy is a result, not a crash
                    print(f"  {v['label']} failed on {arch_id}: {type(e).__name__}: {e}", flush=True)
                    value = None
                store[v["label"]][str(rep)][arch_id] = value
            save()
        print(f"proxies {space_name}: replicate {rep + 1}/{len(batches)} scored", flush=True)
    return store


def part_proxies(args: argparse.Namespace, gt: GroundTruth, results: dict[str, Any], save: Any) -> None:
    for space_name in args.spaces:
        space = build_space(args, space_name)
        ids = [space.encode(a) for a in arch_list(args, space_name, space)]
        section = results.setdefault("proxies", {}).setdefault(space_name, {})
        # the scores live in their own file: a --part gt run writing results.json at the same time
        # (another process) cannot drop them, and a rerun resumes from them
        fp = fingerprint([settings(args), args.proxy_batch_size])
        scores_path = Path(args.output_dir) / f"proxy-scores-{space_name}.json"
        stored = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
        if stored.get("fingerprint") != fp:
            stored = {"fingerprint": fp, "scores": {}}
        section.clear()
        section["fingerprint"] = fp
        store = section["scores"] = stored["scores"]

        def save_scores(path: Path = scores_path, data: dict[str, Any] = stored) -> None:
            atomic_write_text(path, json.dumps(data))

        score_all(args, gt, space_name, store, save_scores)
        save()
        truth = {mode: gt.accs(space_name, ids, mode, args.seeds) for mode in ("kd", "ce")}
        if min(len(t) for t in truth.values()) < 3:
            print(
                f"proxies {space_name}: fewer than 3 archs with ground truth; run --part gt first", flush=True
            )
            continue
        rows = {}
        for v in proxy_variants(args):
            rows[v["label"]] = correlations(store[v["label"]], truth, args.batches, ids)
        section["table"] = rows
        section["truth_n"] = {m: len(t) for m, t in truth.items()}
        section["diswot_term_ratio"] = term_ratio(store)
        save()
        table = proxies_table(space_name, rows, args, section["truth_n"])
        for teacher, r in section["diswot_term_ratio"].items():
            table += (
                f"\n\nM_s / M_r ({teacher} teacher, {r['n']} scores): median {r['median']:.0f}, "
                f"range {r['min']:.0f}–{r['max']:.0f}"
            )
        print("\n" + table + "\n", flush=True)
        atomic_write_text(Path(args.output_dir) / f"proxies-{space_name}.md", table + "\n")


def term_ratio(store: dict[str, Any]) -> dict[str, dict[str, float]]:
    """How much larger DisWOT's semantic term is than its relation term, per teacher variant.

    Both proxies store minus their term, so the ratio of the scores is ``M_s / M_r``; taken over
    every (replicate, arch) that both scored. Empty when the two were not both evaluated.
    """
    out = {}
    for teacher in ("random", "trained"):
        rel = store.get(f"diswot_relation ({teacher} teacher)", {})
        sem = store.get(f"diswot_semantic ({teacher} teacher)", {})
        ratios = [
            s / r
            for rep, scores in rel.items()
            for arch, r in scores.items()
            if r and (s := sem.get(rep, {}).get(arch)) is not None
        ]
        if ratios:
            out[teacher] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "n": len(ratios),
            }
    return out


def correlations(
    scores: dict[str, dict[str, float | None]], truth: dict[str, dict[str, float]], reps: int, ids: list[str]
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    failed = 0
    for mode, acc in truth.items():
        per_rep = []
        for rep in range(reps):
            s = {a: v for a, v in scores.get(str(rep), {}).items() if v is not None and a in ids}
            failed = max(failed, sum(1 for a in ids if scores.get(str(rep), {}).get(a, 0.0) is None))
            common = set(s) & set(acc)
            if len(common) < 3:
                continue
            c = correlate(s, acc)
            if not (math.isnan(c["kendall"]) or math.isnan(c["spearman"])):
                per_rep.append(c)
        row[mode] = pg_aggregate(per_rep)
    row["failed"] = failed
    return row


def pg_aggregate(per_rep: list[dict[str, float]]) -> dict[str, Any] | None:
    if not per_rep:
        return None
    from protege.search import aggregate

    return aggregate(per_rep)


def proxies_table(space: str, rows: dict[str, Any], args: argparse.Namespace, truth_n: dict[str, int]) -> str:
    lines = [
        f"Proxies vs ground truth, {space} space ({truth_n['kd']} archs with KD accuracy, {truth_n['ce']} with CE): "
        f"mean ± std over {args.batches} proxy batches of {args.proxy_batch_size} (replicate r: batch r, init seed r)",
        "",
        "| proxy | τ vs KD acc | ρ vs KD acc | τ vs CE acc | ρ vs CE acc | n | failed |",
        "|---|---|---|---|---|---|---|",
    ]

    def ms(agg: dict[str, Any] | None, key: str) -> str:
        if not agg:
            return "—"
        return f"{agg[key]['mean']:+.3f} ± {agg[key]['std']:.3f}"

    best_kd = max(
        (r["kd"]["kendall"]["mean"] for r in rows.values() if r["kd"]), default=None
    )  # bold the best τ vs KD
    for label, r in rows.items():
        tau_kd = ms(r["kd"], "kendall")
        if r["kd"] and best_kd is not None and r["kd"]["kendall"]["mean"] == best_kd:
            tau_kd = f"**{tau_kd}**"
        n = int(r["kd"]["n"]["mean"]) if r["kd"] else 0
        lines.append(
            f"| {label} | {tau_kd} | {ms(r['kd'], 'spearman')} | {ms(r['ce'], 'kendall')} "
            f"| {ms(r['ce'], 'spearman')} | {n} | {r['failed']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- search cost


class ShortKD:
    """A "proxy" that distills the candidate for a few epochs and returns its validation accuracy.

    Used as the proxy of a :class:`CandidateScorer`, so both searches pay the same build and
    budget checks and differ only in how a candidate is scored.
    """

    def __init__(self, args: argparse.Namespace, epochs: int, seed: int) -> None:
        self.args, self.epochs, self.seed = args, epochs, seed
        data = load_splits(args, "augment")
        self.train = pg.make_loader(data.train, args.search_batch_size, shuffle=True, seed=seed)
        self.val = pg.make_loader(data.val, 512, shuffle=False)
        self.runs = 0

    def __call__(self, teacher: torch.nn.Module | None, student: torch.nn.Module, batch: Any) -> float:
        cfg = base_config(self.args, "x", self.seed, self.epochs)
        train_cfg = pg.TrainConfig(
            epochs=self.epochs,
            optim=cfg["optim"],
            schedule=cfg["schedule"],
            seed=self.seed,
            progress=False,
            measure_cost=False,
            keep_checkpoints="last",
            cpu=cfg["cpu"],
            mixed_precision=cfg["mixed_precision"],
        )
        distiller = pg.Distiller(student, teacher, terms=[pg.ce(0.1), pg.kd(0.9, T=4)])
        with tempfile.TemporaryDirectory(prefix="search-rank-") as tmp:
            summary = pg.fit(distiller, self.train, self.val, train_cfg, run_dir=Path(tmp) / "run")
        distiller.close()
        self.runs += 1
        return float(summary["final"]["val/acc"])


def default_max_params(args: argparse.Namespace, space_name: str, space: Any) -> int:
    if args.max_params is not None:
        return args.max_params
    data = load_splits(args)
    if space_name == "resnet":
        return count_params(space.build((3, 3, 3), data.num_classes, data.in_chans))
    sizes = [
        count_params(space.build(a, data.num_classes, data.in_chans))
        for a in arch_list(args, space_name, space)
    ]
    return int(statistics.median(sizes))


def part_search(args: argparse.Namespace, gt: GroundTruth, results: dict[str, Any], save: Any) -> None:
    data = load_splits(args)
    for space_name in args.spaces:
        space = build_space(args, space_name)
        max_params = default_max_params(args, space_name, space)
        budget = Budget(max_params=max_params, max_candidates=args.search_candidates)
        key = fingerprint([settings(args), max_params, args.search_candidates, args.search_epochs,
                           args.population, args.tournament, args.search_seed, args.proxy_batch_size])  # fmt: skip
        section = results.setdefault("search", {}).setdefault(space_name, {})
        if section.get("fingerprint") != key or args.redo_search:
            section.clear()
            section.update({"fingerprint": key, "max_params": max_params, "runs": {}})
        batch = proxy_batches(args, 1)
        scorers = {
            "diswot (random teacher)": ("diswot", "random"),
            "diswot (trained teacher)": ("diswot", "trained"),
            f"short KD training ({args.search_epochs} ep, batch {args.search_batch_size})": (
                "train",
                "trained",
            ),
        }
        for label, (how, which) in scorers.items():
            if label in section["runs"]:
                continue
            models = teachers(args, gt, 10_000)
            proxy = (
                on_device(get_proxy("diswot"), args.device)
                if how == "diswot"
                else ShortKD(args, args.search_epochs, args.search_seed)
            )
            scorer = CandidateScorer(
                space,
                proxy,
                models[which],
                batch,
                budget,
                data.num_classes,
                data.in_chans,
                seed=args.search_seed,
            )
            print(f"search {space_name}: regularized evolution scored by {label} …", flush=True)
            hist = regularized_evolution(
                space,
                scorer,
                budget,
                population=args.population,
                sample=args.tournament,
                seed=args.search_seed,
                progress=False,
            )
            best = hist.best
            section["runs"][label] = {
                "seconds": round(hist.seconds, 2),
                "counts": hist.counts(),
                "winner": best.id,
                "winner_params": best.params,
                "winner_score": best.score,
                "score_s": round(sum(c.seconds for c in hist.candidates), 2),
                "scored_ids": [c.id for c in hist.ranked],
            }
            save()
        missing = [
            run["winner"]
            for run in section["runs"].values()
            if any(gt.key(space_name, run["winner"], "kd", s) not in gt.runs for s in range(args.seeds))
        ]
        missing = sorted(set(missing))
        if args.workers > 1 and missing:  # train them in parallel, as the ground truth was
            args.extra_kd = ",".join(f"{space_name}|{a}" for a in missing)
            run_workers(args, gt, min(args.workers, len(missing) * args.seeds))
            args.extra_kd = ""
        for run in section["runs"].values():  # the winners' distilled accuracy, ground-truth schedule
            arch = space.decode(run["winner"])
            for seed in range(args.seeds):
                gt_run(args, gt, space_name, space, arch, "kd", seed)
            run["winner_kd_acc"] = gt.acc(space_name, run["winner"], "kd", args.seeds)
        ids = [space.encode(a) for a in arch_list(args, space_name, space)]
        in_budget = {
            a: v
            for a, v in gt.accs(space_name, ids, "kd", args.seeds).items()
            if count_params(space.build(space.decode(a), data.num_classes, data.in_chans)) <= max_params
        }
        section["oracle"] = (
            {"best": max(in_budget, key=in_budget.get), "acc": max(in_budget.values()), "n": len(in_budget)}
            if in_budget
            else None
        )
        for run in section["runs"].values():
            run["winner_rank_in_budget"] = (
                1 + sum(v > run["winner_kd_acc"] for v in in_budget.values())
                if in_budget and run["winner_kd_acc"] is not None
                else None
            )
        save()
        table = search_table(space_name, section, args)
        print("\n" + table + "\n", flush=True)
        atomic_write_text(Path(args.output_dir) / f"search-{space_name}.md", table + "\n")


def search_table(space: str, section: dict[str, Any], args: argparse.Namespace) -> str:
    runs = section["runs"]
    train_label = next((k for k in runs if k.startswith("short KD")), None)
    train_s = runs[train_label]["seconds"] if train_label else None
    lines = [
        f"Search cost, {space} space: regularized evolution (population {args.population}, tournament "
        f"{args.tournament}, seed {args.search_seed}), {args.search_candidates} candidates scored, "
        f"max params {section['max_params']:,}; winner's accuracy = test acc after the ground-truth "
        f"schedule ({args.epochs} epochs KD, mean of {args.seeds} seeds)",
        "",
        "| scorer | scored | wall s | training-search s / this | winner | params | winner KD acc | rank among GT archs in budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        ratio = "—" if train_s is None else f"{train_s / max(r['seconds'], 1e-9):.1f}×"
        acc = "—" if r.get("winner_kd_acc") is None else f"{100 * r['winner_kd_acc']:.2f}"
        rank = r.get("winner_rank_in_budget")
        oracle = section.get("oracle")
        rank_s = "—" if rank is None or not oracle else f"{rank} of {oracle['n']}"
        lines.append(
            f"| {label} | {r['counts']['scored']} | {r['seconds']:.1f} | {ratio} | `{r['winner']}` "
            f"| {r['winner_params']:,} | {acc} | {rank_s} |"
        )
    oracle = section.get("oracle")
    if oracle:
        lines += [
            "",
            f"Best in budget by ground truth ({oracle['n']} archs known): `{oracle['best']}` at {100 * oracle['acc']:.2f}%",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- throughput


def part_throughput(args: argparse.Namespace, gt: GroundTruth, results: dict[str, Any], save: Any) -> None:
    """Candidates per minute in the ResNet-20 depth space, proxies interleaved per candidate."""
    data = load_splits(args)
    space = build_space(args, "resnet")
    archs = arch_list(args, "resnet", space)
    variants = proxy_variants(args)
    if any(v["proxy"] == "diswot" for v in variants):
        for teacher in ("random", "trained"):  # what reusing the teacher's side saves, side by side
            variants.append(
                {
                    "label": f"diswot ({teacher} teacher, teacher recomputed per candidate)",
                    "proxy": "diswot",
                    "teacher": teacher,
                    "options": {"reuse_teacher": False},
                }
            )
    batch = proxy_batches(args, 1)
    models = teachers(args, gt, 10_000, train=False)
    budget = Budget(max_candidates=len(archs))
    scorers = {
        v["label"]: CandidateScorer(
            space,
            on_device(get_proxy(v["proxy"], **v.get("options", {})), args.device),
            models[v["teacher"]],
            batch,
            budget,
            data.num_classes,
            data.in_chans,
        )
        for v in variants
    }
    for scorer in scorers.values():  # warm-up: first calls pay one-off allocation costs
        scorer(archs[0])
    times: dict[str, list[float]] = {k: [] for k in scorers}
    failed: dict[str, int] = dict.fromkeys(scorers, 0)
    for i, arch in enumerate(archs):
        order = list(scorers)
        order = order[i % len(order) :] + order[: i % len(order)]  # rotate who runs first
        for label in order:
            cand = scorers[label](arch, i)
            times[label].append(cand.seconds)
            failed[label] += cand.status != "scored"
        print(f"throughput: {i + 1}/{len(archs)} candidates", end="\r", flush=True)
    print()
    rows = {
        label: {
            # the median is robust to the box's load spikes; the mean rate is kept beside it
            "candidates_per_min": 60.0 / statistics.median(t),
            "candidates_per_min_mean": 60.0 * len(t) / sum(t),
            "median_s": statistics.median(t),
            "total_s": sum(t),
            "n": len(t),
            "failed": failed[label],
        }
        for label, t in times.items()
    }
    results["throughput"] = {
        "space": "resnet",
        "widths": _ints(args.widths),
        "proxy_batch_size": args.proxy_batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    save()
    table = throughput_table(results["throughput"], args)
    print("\n" + table + "\n", flush=True)
    atomic_write_text(Path(args.output_dir) / "throughput.md", table + "\n")


def throughput_table(section: dict[str, Any], args: argparse.Namespace) -> str:
    rows = section["rows"]
    n = max((r["n"] for r in rows.values()), default=0)
    lines = [
        f"Throughput, ResNet-20 depth space (widths {section['widths']}, {n} candidates, one batch of "
        f"{section['proxy_batch_size']}, device {section['device']}, {section['threads']} threads): build + "
        "params + FLOPs + proxy, interleaved per candidate",
        "",
        "| proxy | candidates / min (median) | candidates / min (mean) | median s / candidate | failed |",
        "|---|---|---|---|---|",
    ]
    for label, r in sorted(rows.items(), key=lambda kv: -kv[1]["candidates_per_min"]):
        lines.append(
            f"| {label} | {r['candidates_per_min']:.1f} | {r['candidates_per_min_mean']:.1f} "
            f"| {r['median_s']:.3f} | {r['failed']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.shard is not None:  # a worker of --workers: its runs into its own shard file, nothing else
        part_gt(args, GroundTruth(_shard_path(out, args.shard[0]), settings(args)))
        return
    gt = GroundTruth(out / "ground_truth.json", settings(args))
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save() -> None:
        atomic_write_text(results_path, json.dumps(results, indent=1))

    start = time.perf_counter()
    print(f"search_rank: parts {','.join(args.parts)}, spaces {','.join(args.spaces)}, device {args.device}, "
          f"output {out}", flush=True)  # fmt: skip
    if "gt" in args.parts:
        results["gt"] = part_gt(args, gt)
        save()
    if "gt" in args.parts or "proxies" in args.parts:
        results["gt"] = summarize_gt(args, gt)
        table = gt_table(results["gt"], args)
        print("\n" + table + "\n", flush=True)
        atomic_write_text(out / "ground-truth.md", table + "\n")
        save()
    if "proxies" in args.parts:
        part_proxies(args, gt, results, save)
    if "search" in args.parts:
        part_search(args, gt, results, save)
    if "throughput" in args.parts:
        part_throughput(args, gt, results, save)
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["total_s"] = round(time.perf_counter() - start, 1)
    save()
    if args.json:
        combined = {"settings": gt.data["settings"], "teacher": gt.data.get("teacher"), **results,
                    "ground_truth_runs": gt.runs}  # fmt: skip
        Path(args.json).write_text(json.dumps(combined, indent=1))
    print(f"done in {time.perf_counter() - start:.0f} s; results in {out}", flush=True)


if __name__ == "__main__":
    main()
