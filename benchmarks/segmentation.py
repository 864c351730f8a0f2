"""TinySAM's recipe measured: a small SAM distilled from a bigger one, stage by stage, with hard prompts.

No SAM weights or SA-1B images are available offline, so everything here is built from real parts and
says so: the teacher is the ``segment_anything`` SAM architecture at a small size (ViT image encoder,
128-px images, a 16×16 embedding grid, SAM's prompt encoder and two-way mask decoder at width 64),
**trained here** with SAM's own loss (``configs/segmentation/sam-tiny-teacher-long.yaml``: 6,000 images;
the students train on 1,000) on composites of real Fashion-MNIST objects and scikit-image shapes on
real scikit-image textures, whose instance masks are exact (``protege.data.segmentation``). The
students have a small CNN image encoder + SAM's neck (~5× fewer encoder FLOPs) and the teacher's prompt
encoder and mask decoder (copied, then trained).

Rows (``--seeds`` seeds each, the same student, initialisation and schedule):

- ``gt only``: SAM's loss against the ground truth (focal 20 : dice 1 + IoU head), no teacher;
- ``+ embedding KD``: + the teacher's image embedding (MSE, MobileSAM's decoupled term);
- ``+ full-stage KD``: + the decoder's output tokens (MSE) and the teacher's mask logits (``mask_kd``),
  TinySAM's full-stage distillation;
- ``+ hard prompts``: the same with TinySAM's online hard-prompt sampling (``sampler: hard``);
- ``int8``: the best row's first seed exported to ONNX and quantized (W8A8, onnxruntime), when
  ``protege.export.sam_onnx`` is available.

Columns: mask mIoU on the held-out composites with one point, three points and a box, against the
ground truth and against the teacher's masks; parameters; FLOPs of the image encoder (per image) and of
the decoder (per prompt); latency of each, measured side by side (teacher and students in turn).
"Everything" mode: the dense point grid vs TinySAM's hierarchical strategy on test images (time,
prompts decoded, mIoU/recall of matched masks against the ground truth and against the dense result).

    python benchmarks/segmentation.py --json benchmarks/results/segmentation-tinysam.json

Finished runs are reused when the command is run again (``--output-dir``, default runs/seg-bench).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protege.analysis.runs import finished_summary, run_or_reuse, seed_cell, seed_stats
from protege.config import load_config
from protege.engine import evaluate, make_loader
from protege.metrics.cost import count_flops, count_params
from protege.pipeline import load_run
from protege.tasks import build_task

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "segmentation"
EMBEDDING = {"loss": "fitnet", "name": "embedding", "student": "embedding", "teacher": "embedding"}
TOKENS = {"loss": "fitnet", "name": "tokens", "student": "tokens", "teacher": "tokens"}
ROWS: dict[str, dict[str, Any]] = {
    "gt only": {"terms": [{"loss": "sam_gt"}], "sampler": "uniform", "mode": "train"},
    "+ embedding KD": {"terms": [{"loss": "sam_gt"}, EMBEDDING], "sampler": "uniform", "mode": "distill"},
    "+ full-stage KD": {
        "terms": [{"loss": "sam_gt"}, EMBEDDING, TOKENS, {"loss": "mask_kd"}],
        "sampler": "uniform",
        "mode": "distill",
    },
    "+ hard prompts": {
        "terms": [{"loss": "sam_gt"}, EMBEDDING, TOKENS, {"loss": "mask_kd"}],
        "sampler": "hard",
        "mode": "distill",
    },
}
SLUG = {"gt only": "gt", "+ embedding KD": "emb", "+ full-stage KD": "full", "+ hard prompts": "hard"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--teacher", default="runs/seg/sam-tiny-teacher-long", help="the trained teacher's run directory"
    )
    ap.add_argument(
        "--train-size", type=int, default=1000,
        help="the students' training composites (the teacher saw 6,000: TinySAM and MobileSAM distil on 1%% "
        "of SA-1B)",
    )  # fmt: skip
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", default="all", help="comma list of row slugs: gt,emb,full,hard")
    ap.add_argument(
        "--only-seeds", type=int, nargs="*", default=None,
        help="with --train-only: train only these seeds (lanes: processes side by side on disjoint runs)",
    )  # fmt: skip
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--everything-images", type=int, default=20, help="test images for the everything mode")
    ap.add_argument(
        "--train-only", action="store_true", help="train the rows' runs, skip costs and everything mode"
    )
    ap.add_argument(
        "--reuse-only",
        action="store_true",
        help="tabulate the finished runs only (up to --seeds per row); train none",
    )
    ap.add_argument(
        "--multimask", choices=("auto", "on", "off"), default="auto",
        help="everything mode with SAM's three masks per point: auto = for each model trained with "
        "prompts.multimask (the long teacher), one mask for the others",
    )  # fmt: skip
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output-dir", default="runs/seg-bench")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def data_section(args: argparse.Namespace, sampler: str) -> dict[str, Any]:
    return {
        "source": "composites",
        "batch_size": 16,
        "options": {
            "size": 128,
            "train": args.train_size,
            "val": 200,
            "test": args.test_size,
            "max_objects": 4,
            "prompts": {"point_prompts": 4, "box_prompts": 2, "sampler": sampler, "rounds": 2},
        },
    }


def teacher_section(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": "sam", "kwargs": {"variant": "tiny"}, "weights": args.teacher}


def run_cfg(args: argparse.Namespace, row: str, seed: int) -> tuple[dict[str, Any], str]:
    spec = ROWS[row]
    cfg = {
        "name": f"{SLUG[row]}-s{seed}",
        "output_dir": args.output_dir,
        "task": "promptable_segmentation",
        "seed": seed,
        "epochs": args.epochs,
        "cpu": True,
        "progress": False,
        "keep_checkpoints": "last+best",
        "data": data_section(args, spec["sampler"]),
        # the teacher is named in every row: the student copies its mask decoder (the same start for
        # all rows); a ``train`` run never runs it
        "teacher": teacher_section(args),
        "student": {"model": "sam_student", "kwargs": {"encoder": "cnn"}},
        "terms": spec["terms"],
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.01},
        "schedule": {"name": "cosine"},
    }
    return cfg, spec["mode"]


def finished(cfg_dict: dict[str, Any]) -> bool:
    """Whether the run of ``cfg_dict`` completed with test metrics."""
    return finished_summary(Path(cfg_dict["output_dir"]) / cfg_dict["name"]) is not None


def train(cfg_dict: dict[str, Any], mode: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary = run_or_reuse(load_config(None, **cfg_dict), mode)  # type: ignore[arg-type]
    print(f"{cfg_dict['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
    return summary


class _Encoder(nn.Module):
    """``model.encode`` as a module (latency and FLOPs of the image encoder alone)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)


class _Decoder(nn.Module):
    """``model.decode`` as a module (latency and FLOPs of prompt encoder + mask decoder)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> Any:
        return self.model.decode(embeddings, points=points, labels=labels)["masks"]


def costs(models: dict[str, Any], prompts: int = 16) -> dict[str, dict[str, Any]]:
    """Parameters and FLOPs of each PyTorch model's encoder and decoder, and the latency of every
    model (PyTorch or exported) measured side by side: one interleaved loop over all models, the
    encoder on one image and the decoder on ``prompts`` single points on the model's own embedding
    (``protege.export.segmenter.time_segmenters``, one thread)."""
    from protege.export.segmenter import time_segmenters

    any_model = next(iter(models.values()))
    size = int(any_model.img_size)
    image = torch.rand(1, 3, size, size)
    out: dict[str, dict[str, Any]] = {}
    g = torch.Generator().manual_seed(0)
    points = torch.rand(1, prompts, 1, 2, generator=g) * size
    labels = torch.ones(1, prompts, 1, dtype=torch.long)
    for name, m in models.items():
        if not isinstance(m, nn.Module):  # an exported model: no FLOP counter for onnxruntime graphs
            out[name] = {}
            continue
        with torch.no_grad():
            embedding = m.encode(image)
        out[name] = {
            "params": count_params(m),
            "encoder_params": count_params(m.image_encoder),
            "encoder_gflops": count_flops(_Encoder(m).eval(), image) / 1e9,
            "decoder_mflops_per_prompt": count_flops(
                _Decoder(m).eval(), {"embeddings": embedding, "points": points, "labels": labels}
            )
            / prompts
            / 1e6,
        }
    timing = time_segmenters(models, prompts=prompts, rounds=50)
    for name, row in timing["rows"].items():
        out[name]["encoder_ms"] = row["encoder_ms"]
        out[name]["decoder_ms_per_prompt"] = row["decoder_ms_per_prompt"]
    return out


def int8_row(
    args: argparse.Namespace, run_dir: Path, splits: Any, teacher: nn.Module
) -> tuple[dict[str, Any], Any]:
    """The run's student exported to int8 ONNX (``protege export``'s segmenter path: W8A8,
    calibrated on 64 training images) and evaluated beside the fp32 student on the test prompts."""
    from protege.export.segmenter import export_segmenter

    loaded = load_run(run_dir, "best", data=splits)
    out = Path(args.output_dir) / f"{run_dir.name}-int8"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    info = export_segmenter(
        loaded.student.eval(), loaded.task, "int8", out, ("test", splits.test), splits.train, 64, [teacher]
    )
    from protege.export.sam_onnx import OnnxSam

    ev = info["evaluation"]
    print(f"int8 of {run_dir.name}: fp32 {ev['fp32']} / int8 {ev['int8']}", flush=True)
    return ev, OnnxSam(out)


#: the filter thresholds the everything mode chooses among, on validation images (SAM's defaults,
#: 0.88 / 0.95, are tuned for SAM-H; a small model's predicted IoU sits lower)
IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
STABILITY_THRESHOLDS = (0.7, 0.8, 0.9)


def _reference(item: dict[str, Any]) -> torch.Tensor:
    from protege.data.segmentation import instance_masks

    return torch.as_tensor(instance_masks(item["instances"].numpy())).bool()


def choose_thresholds(model: Any, images: Any, multimask: bool, n: int = 10) -> dict[str, float]:
    """The (predicted-IoU, stability) filter of the dense mode with the best mean F1 of matched masks
    (IoU >= 0.5) against the ground truth on ``n`` validation images."""
    from protege.segment import match_masks, segment_everything

    best: tuple[float, dict[str, float]] = (-1.0, {})
    for iou_t in IOU_THRESHOLDS:
        for stab_t in STABILITY_THRESHOLDS:
            f1s = []
            for i in range(min(n, len(images))):
                item = images[i]
                res = segment_everything(
                    model, item["image"], mode="dense", multimask=multimask,
                    pred_iou_thresh=iou_t, stability_thresh=stab_t,
                )  # fmt: skip
                m = match_masks(res.masks, _reference(item))
                p, r = (0.0 if math.isnan(v) else v for v in (m["precision"], m["recall"]))
                f1s.append(2 * p * r / (p + r) if p + r else 0.0)
            score = statistics.mean(f1s)
            if score > best[0]:
                best = (score, {"pred_iou_thresh": iou_t, "stability_thresh": stab_t, "val_f1": score})
    return best[1]


def trained_multimask(run_dir: Path) -> bool:
    """Whether the run at ``run_dir`` trained SAM's three-mask outputs (``prompts.multimask``)."""
    cfg = load_config(run_dir / "config.yaml")
    prompts = (cfg.data.options or {}).get("prompts") or {}
    return bool(prompts.get("multimask", False))


def everything(
    args: argparse.Namespace, models: dict[str, Any], splits: Any, multimask: dict[str, bool]
) -> dict[str, Any]:
    """Dense grid vs hierarchical "segment everything" on test images (``protege.segment``), each
    model with the filter thresholds chosen on validation images (:func:`choose_thresholds`) and
    with SAM's three masks per point where ``multimask[name]``."""
    try:
        from protege.segment import match_masks, segment_everything
    except ImportError:
        return {}

    images = splits.test.images  # the unprompted composites
    n = min(args.everything_images, len(images))
    out: dict[str, Any] = {}
    for name, model in models.items():
        if isinstance(model, nn.Module):
            model.eval()
        multi = multimask[name]
        chosen = choose_thresholds(model, splits.val.images, multi)
        filters = {k: v for k, v in chosen.items() if k != "val_f1"}
        acc: dict[str, list[float]] = {}
        for i in range(n):
            item = images[i]
            ref = _reference(item)
            dense = segment_everything(model, item["image"], mode="dense", multimask=multi, **filters)
            hier = segment_everything(model, item["image"], mode="hierarchical", multimask=multi, **filters)
            for label, res in (("dense", dense), ("hierarchical", hier)):
                m = match_masks(res.masks, ref)
                acc.setdefault(f"{label}/miou", []).append(m["miou"])
                acc.setdefault(f"{label}/recall", []).append(m["recall"])
                acc.setdefault(f"{label}/precision", []).append(m["precision"])
                acc.setdefault(f"{label}/seconds", []).append(res.total_seconds)
                acc.setdefault(f"{label}/prompts", []).append(float(res.prompts))
            if len(dense):
                acc.setdefault("hierarchical_vs_dense/recall", []).append(
                    match_masks(hier.masks, dense.masks)["recall"]
                )
        # precision is undefined on an image where nothing was kept: averaged over the others
        out[name] = {
            k: statistics.mean([x for x in v if not math.isnan(x)] or [math.nan]) for k, v in acc.items()
        }
        out[name]["filters"] = chosen
        out[name]["multimask"] = multi
        d, h = out[name]["dense/seconds"], out[name]["hierarchical/seconds"]
        out[name]["speedup"] = d / h if h else float("nan")
        shown = {k: round(v, 3) for k, v in out[name].items() if isinstance(v, float)}
        print(f"everything {name} ({chosen}): {shown}", flush=True)
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = None if args.rows == "all" else set(args.rows.split(","))
    if not (Path(args.teacher) / "summary.json").is_file():
        sys.exit(
            f"no trained teacher at {args.teacher}: run `protege train {CONFIGS / 'sam-tiny-teacher-long.yaml'} "
            "--set output_dir=runs/seg` first (or pass --teacher)"
        )
    task = build_task("promptable_segmentation")
    splits = task.load_data(data_section(args, "uniform"), [teacher_section(args)], [])
    loader = make_loader(splits.test, 16, shuffle=False)
    teacher = task.build_model("sam", args.teacher, {"variant": "tiny"}, splits).eval()
    results: dict[str, Any] = {"settings": vars(args) | {"sizes": splits.sizes()}, "rows": {}}
    t_metrics = evaluate(teacher, loader, task)
    results["rows"]["teacher"] = {"metrics": t_metrics}
    print(f"teacher: { {k: round(v, 4) for k, v in t_metrics.items()} }", flush=True)
    models: dict[str, nn.Module] = {"teacher": teacher}
    for row in ROWS:
        if wanted is not None and SLUG[row] not in wanted:
            continue
        summaries, seeds = [], []
        for seed in range(args.seeds) if args.only_seeds is None else args.only_seeds:
            cfg, mode = run_cfg(args, row, seed)
            if args.reuse_only and not finished(cfg):
                continue
            summaries.append(train(cfg, mode))
            seeds.append(seed)
        if not summaries:
            continue
        best, best_std = seed_stats(summaries, "best")
        last, last_std = seed_stats(summaries, "last")
        wall = statistics.mean(float(s.get("wall_time_s", 0.0)) for s in summaries)
        results["rows"][row] = {"metrics": best, "std": best_std, "last": last, "last_std": last_std,
                                "wall_s": wall, "seeds": len(summaries),
                                "per_seed": {seed: s["test"]["best"] for seed, s in zip(seeds, summaries)}}  # fmt: skip
        print(
            f"{row}: { {k: round(v, 4) for k, v in best.items()} } (± { {k: round(v, 4) for k, v in best_std.items()} })",
            flush=True,
        )
        if not args.train_only:
            models[row] = load_run(Path(args.output_dir) / f"{SLUG[row]}-s0", "best").student.eval()
    if args.train_only:
        return
    best_row = max(
        (r for r in ROWS if r in results["rows"]),
        key=lambda r: results["rows"][r]["metrics"].get("miou", 0.0),
    )
    if not args.no_int8:  # the best row's first seed, quantized (the "int8 of the best")
        ev, exported = int8_row(args, Path(args.output_dir) / f"{SLUG[best_row]}-s0", splits, teacher)
        label = f"int8 of {best_row} (s0)"
        metrics = {k: v for k, v in ev["int8"].items() if k.startswith("miou")}
        metrics |= {
            f"t{k[len('teacher_') :]}": v for k, v in ev["int8"].items() if k.startswith("teacher_miou")
        }
        results["rows"][label] = {
            "metrics": metrics,
            "fp32_s0": ev["fp32"],
            "int8_vs_fp32": ev["int8"],
            "seeds": 1,
        }
        models[label] = exported
    print("costs: side by side ...", flush=True)
    for name, c in costs(models).items():
        results["rows"].setdefault(name, {})["cost"] = c
    wanted_everything = ("teacher", best_row, "+ full-stage KD")
    run_dirs = {"teacher": Path(args.teacher)} | {
        row: Path(args.output_dir) / f"{SLUG[row]}-s0" for row in ROWS if row in models
    }
    multimask = {
        name: trained_multimask(run_dirs[name]) if args.multimask == "auto" else args.multimask == "on"
        for name in wanted_everything
        if name in models
    }
    results["everything"] = everything(
        args, {k: models[k] for k in models if k in wanted_everything}, splits, multimask
    )
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


def paired(results: dict[str, Any]) -> None:
    """Seed-paired differences (best checkpoints, percentage points): each distillation row minus
    ``gt only`` of the same seed (same initialisation and data order), and hard minus uniform prompts."""
    rows = results["rows"]
    pairs = [(r, "gt only") for r in ("+ embedding KD", "+ full-stage KD", "+ hard prompts")]
    pairs += [("+ full-stage KD", "+ embedding KD"), ("+ hard prompts", "+ full-stage KD")]
    keys = ("miou_1pt", "miou_3pt", "miou_box", "tmiou_1pt", "tmiou_box")
    print("\nseed-paired differences (pp; one number per seed):")
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        sa, sb = rows[a]["per_seed"], rows[b]["per_seed"]
        common = sorted(set(sa) & set(sb))
        cells = {k: [round(100 * (sa[i][k] - sb[i][k]), 1) for i in common] for k in keys}
        rows[a].setdefault("paired", {})[b] = cells
        print(f"  {a} - {b}: " + "; ".join(f"{k} {v}" for k, v in cells.items()))


def print_table(results: dict[str, Any]) -> None:
    head = ["row", "mIoU 1pt", "mIoU 3pt", "mIoU box", "vs teacher 1pt", "vs teacher box", "params",
            "enc GFLOPs", "dec MFLOPs/prompt", "enc ms", "dec ms/prompt"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row, r in results["rows"].items():
        m, sd, c = r.get("metrics", {}), r.get("std", {}), r.get("cost", {})

        def f(key: str, m: dict[str, Any] = m, sd: dict[str, Any] = sd) -> str:
            return seed_cell(m, sd, key)

        cells = [row, f("miou_1pt"), f("miou_3pt"), f("miou_box"), f("tmiou_1pt"), f("tmiou_box")]

        def num(key: str, fmt: str, scale: float = 1.0, c: dict[str, Any] = c) -> str:
            return format(c[key] / scale, fmt) if key in c else "—"

        cells += [
            num("params", ".2f", 1e6) + ("M" if "params" in c else ""),
            num("encoder_gflops", ".3f"),
            num("decoder_mflops_per_prompt", ".1f"),
            num("encoder_ms", ".2f"),
            num("decoder_ms_per_prompt", ".3f"),
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nlast epoch (the best checkpoint above is chosen by validation mIoU):")
    head = ["row", "mIoU 1pt", "mIoU 3pt", "mIoU box", "vs teacher 1pt", "vs teacher box"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row, r in results["rows"].items():
        if "last" not in r:
            continue
        keys = ("miou_1pt", "miou_3pt", "miou_box", "tmiou_1pt", "tmiou_box")
        print("| " + " | ".join([row] + [seed_cell(r["last"], r["last_std"], k) for k in keys]) + " |")
    paired(results)
    if results.get("everything"):
        print("\nsegment everything (test images; matched masks IoU >= 0.5 vs the ground truth):")
        head = ["model", "masks/point", "mode", "prompts", "seconds", "mIoU", "recall", "precision",
                "recall of dense masks"]  # fmt: skip
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name, e in results["everything"].items():
            for mode in ("dense", "hierarchical"):
                vs_dense = e.get("hierarchical_vs_dense/recall", math.nan) if mode == "hierarchical" else 1.0
                cells = [name, "3" if e["multimask"] else "1", mode, f"{e[mode + '/prompts']:.0f}",
                         f"{e[mode + '/seconds']:.3f}", f"{100 * e[mode + '/miou']:.1f}",
                         f"{100 * e[mode + '/recall']:.1f}", f"{100 * e[mode + '/precision']:.1f}",
                         f"{100 * vs_dense:.1f}"]  # fmt: skip
                print("| " + " | ".join(cells) + " |")
            print(f"  {name}: hierarchical {e['speedup']:.2f}x faster than dense")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
