"""``protege export`` of a promptable-segmentation run: ONNX graphs and int8, measured on the run's prompts.

A segmenter is not one graph but an image encoder and prompt decoders
(:mod:`protege.export.sam_onnx`), so :func:`protege.export.export` hands such runs here. The
exported model (:class:`~protege.export.sam_onnx.OnnxSam`) is evaluated exactly as the run was: the
task's own forward and evaluator on the run's fixed test prompts (1 point, 3 points, box per
object), giving mask mIoU against the ground truth, against the fp32 PyTorch student (how much the
export and the quantization changed) and against the teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..engine import make_loader
from ..errors import ProtegeError
from ..tasks import Task
from .latency import machine
from .sam_onnx import OnnxSam, export_sam_onnx, quantize_sam_int8

__all__ = ["calibration_images", "evaluate_segmenters", "export_segmenter", "time_segmenters"]

#: how the exported models are named in tables
LABELS = {"onnx_fp32": "fp32 (onnxruntime)", "int8": "int8 (onnxruntime)"}
#: images a batch of the evaluation holds
EVAL_BATCH = 16


def export_segmenter(
    model: nn.Module,
    task: Task,
    format: str,
    out: Path,
    eval_set: tuple[str, Dataset[Any]] | None,
    train: Dataset[Any] | None,
    calibration: int,
    teachers: Sequence[nn.Module] = (),
    bench: bool = False,
) -> dict[str, Any]:
    """Write ``model`` to ``out`` as ONNX (``format="onnx"``) or int8 ONNX (``"int8"``, calibrated
    on ``calibration`` images drawn from ``train`` with seed 0), evaluate it beside the PyTorch
    model on ``eval_set`` and, with ``bench``, time them side by side. Returns the ``export.json``
    entries (``onnx``, ``quantization``, ``evaluation``, ``latency``)."""
    if format not in ("onnx", "int8"):
        raise ProtegeError(f"a promptable segmenter exports as onnx or int8, not {format!r}")
    info: dict[str, Any] = {}
    calibrating = calibration_images(train, calibration, int(model.img_size)) if format == "int8" else None
    with tempfile.TemporaryDirectory(prefix="protege-export-") as scratch:
        fp32_dir = out if format == "onnx" else Path(scratch) / "fp32"
        paths = export_sam_onnx(model, fp32_dir)
        info["onnx"] = json.loads(paths["info"].read_text())
        exported: dict[str, OnnxSam] = {"onnx_fp32": OnnxSam(paths)}
        if calibrating is not None:
            images, drawn = calibrating
            int8 = quantize_sam_int8(paths, images, out)
            info["quantization"] = json.loads(int8["info"].read_text()) | {"calibration": drawn}
            exported["int8"] = OnnxSam(int8)
        if eval_set is not None:
            split, dataset = eval_set
            info["evaluation"] = {
                "split": split,
                "samples": len(dataset),  # type: ignore[arg-type]
                **evaluate_segmenters({"fp32": model, **exported}, dataset, task, teachers),
            }
        if bench:
            named: dict[str, Any] = {"teacher (PyTorch)": teachers[0]} if teachers else {}
            named["student fp32 (PyTorch)"] = model
            named |= {f"student {LABELS[k]}": m for k, m in exported.items()}
            info["latency"] = time_segmenters(named) | {"machine": machine()}
    return info


def calibration_images(train: Dataset[Any] | None, n: int, size: int) -> tuple[Tensor, dict[str, Any]]:
    """``n`` training images (a seeded draw, seed 0) as one ``(n, 3, S, S)`` tensor, and a record."""
    if train is None:
        raise ProtegeError("int8 calibration needs the run's training images; export --format onnx instead")
    total = len(train)  # type: ignore[arg-type]
    take = min(n, total)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:take].tolist()
    images = torch.stack([train[i]["image"] for i in order]).float()
    if tuple(images.shape[1:]) != (3, size, size):
        raise ProtegeError(
            f"the training images are {tuple(images.shape[1:])}, the model takes (3, {size}, {size})"
        )
    return images, {"split": "train", "samples": take, "seed": 0, "asked": n}


def evaluate_segmenters(
    models: Mapping[str, Any], dataset: Dataset[Any], task: Task, teachers: Sequence[nn.Module] = ()
) -> dict[str, dict[str, float]]:
    """Each model's metrics on ``dataset``'s prompts, through ``task``'s forward and evaluator.

    ``models["fp32"]`` (the PyTorch model) is the reference: every model gets ``miou_*`` (vs the
    ground truth), ``fp32_miou_*`` (mask IoU with the reference's masks: 1.0 is an exact export) and,
    with ``teachers``, ``teacher_miou_*`` (mask IoU with the first teacher's masks)."""
    if "fp32" not in models:
        raise ProtegeError("evaluate_segmenters needs the PyTorch model under 'fp32' as the reference")
    settings = getattr(task, "settings", None)
    if getattr(settings, "multimask", False):  # the metrics read the single-mask output only
        task = copy.copy(task)
        task.settings = dataclasses.replace(settings, multimask=False)  # type: ignore[attr-defined, arg-type]
    vs_fp32 = {name: task.evaluator(with_teacher=True) for name in models}
    vs_teacher = {name: task.evaluator(with_teacher=True) for name in models} if teachers else {}
    modes = {m: m.training for m in [*models.values(), *teachers] if isinstance(m, nn.Module)}
    try:
        for m in modes:
            m.eval()
        with torch.no_grad():
            for batch in make_loader(dataset, EVAL_BATCH, shuffle=False):
                inputs, target = task.split(batch)
                outs = {name: task.forward(m, inputs) for name, m in models.items()}
                t_out = task.forward(teachers[0], inputs) if teachers else None
                for name, out in outs.items():
                    vs_fp32[name].update(out, target, {"logits": outs["fp32"]["logits"]})
                    if t_out is not None:
                        vs_teacher[name].update(out, target, {"logits": t_out["logits"]})
    finally:
        for m, training in modes.items():
            m.train(training)
    result: dict[str, dict[str, float]] = {}
    for name in models:
        metrics = vs_fp32[name].compute()
        row = {k: v for k, v in metrics.items() if k.startswith("miou") or k == "iou_mae"}
        row |= {f"fp32_{k[1:]}": v for k, v in metrics.items() if k.startswith("tmiou")}
        if vs_teacher:
            row |= {
                f"teacher_{k[1:]}": v for k, v in vs_teacher[name].compute().items() if k.startswith("tmiou")
            }
        result[name] = row
    return result


def time_segmenters(
    models: Mapping[str, Any], prompts: int = 16, rounds: int = 30, warmup: int = 3, threads: int = 1
) -> dict[str, Any]:
    """Median milliseconds of each model's ``encode`` (one image) and ``decode`` (``prompts``
    single-point prompts on its own embedding), measured in interleaved rounds on ``threads``
    threads (PyTorch and onnxruntime alike), so machine load hits every model the same."""
    any_model = next(iter(models.values()))
    size = int(any_model.img_size)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    points = torch.rand(1, prompts, 1, 2, generator=g) * size
    labels = torch.ones(1, prompts, 1, dtype=torch.long)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls: dict[str, dict[str, Callable[[], Any]]] = {}
    try:
        for name, m in models.items():
            m = OnnxSam(m.paths, threads=threads) if isinstance(m, OnnxSam) else m.eval()
            with torch.no_grad():
                emb = m.encode(image)
            calls[name] = {
                "encoder": lambda m=m: m.encode(image),
                "decoder": lambda m=m, emb=emb: m.decode(emb, points, labels),
            }
        times: dict[str, dict[str, list[float]]] = {n: {"encoder": [], "decoder": []} for n in calls}
        with torch.no_grad():
            for r in range(warmup + rounds):
                for name, parts in calls.items():
                    for part, call in parts.items():
                        t0 = time.perf_counter()
                        call()
                        if r >= warmup:
                            times[name][part].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads,
        "prompts": prompts,
        "rounds": rounds,
        "rows": {
            name: {
                "encoder_ms": 1e3 * statistics.median(t["encoder"]),
                "decoder_ms": 1e3 * statistics.median(t["decoder"]),
                "decoder_ms_per_prompt": 1e3 * statistics.median(t["decoder"]) / prompts,
            }
            for name, t in times.items()
        },
    }
