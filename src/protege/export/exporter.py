"""``protege export``: a run's student (or any model) to a new directory, in its native format, ONNX
or int8 ONNX, checked against PyTorch on real inputs and described by ``export.json`` + ``README.md``.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..build import build_from, load_run_data
from ..config import RunConfig, load_config
from ..core.fake_quant import FakeQuant
from ..data import DataSplits
from ..engine import make_loader
from ..errors import ProtegeError
from ..files import commit_dir, sha256_file, staged_dir
from ..metrics.cost import count_flops, count_params
from ..models import load_model
from ..pipeline import load_run
from ..tasks import ClassificationTask, Task, build_task
from ..tasks.classification import is_timm_model
from . import latency
from ._deps import require
from .card import model_card
from .onnx_io import run, session, to_onnx
from .quantize import quantize_int8

Format = Literal["native", "onnx", "int8"]
FORMATS: tuple[str, ...] = ("native", "onnx", "int8")
#: a re-loaded native model must give the student's logits up to float rounding
NATIVE_TOLERANCE = 1e-4
CALIBRATION_BATCH = 32


@dataclass
class _Source:
    """What is exported: the plain fp32 model, and what is known about it."""

    model: nn.Module
    task: Task
    data: DataSplits | None = None
    teachers: list[nn.Module] = field(default_factory=list)
    teacher_weights: list[float] = field(default_factory=list)
    spec: dict[str, Any] | None = None
    run_dir: Path | None = None
    cfg: RunConfig | None = None
    checkpoint: str | None = None
    qad_ranges: dict[str, tuple[float, float]] | None = None
    example: torch.Tensor | None = None
    #: a quantization-aware run's student as it trained and was tested: fake-quantized, in PyTorch
    fake_quant: nn.Module | None = None
    #: module paths (patterns) the quantization-aware run kept in float: the int8 model keeps them too
    float_modules: list[str] = field(default_factory=list)


def default_out(run_dir: str | Path, format: str) -> Path:
    """Where ``protege export RUN --format F`` writes: ``RUN/export-F/``."""
    return Path(run_dir) / f"export-{format}"


def export(
    source: str | Path | nn.Module,
    format: Format = "onnx",
    out: str | Path | None = None,
    *,
    calibration: int = 512,
    overwrite: bool = False,
    bench: bool = False,
    checkpoint: Literal["best", "last"] = "best",
    qad_ranges: bool = True,
    data: DataSplits | None = None,
    example: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    calibration_data: Dataset[Any] | Iterable[torch.Tensor] | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a run's student (or ``source``, a model) to a new directory ``out`` and return its ``export.json``.

    Formats:

    - ``native``: the format the model's ecosystem loads with one call, as its task declares
      (:attr:`protege.tasks.Task.native_format`): a timm model as ``config.json`` +
      ``model.safetensors`` (``timm.create_model("local-dir:<dir>", pretrained=True)``); a zoo or
      torchvision model as ``model.safetensors`` + ``protege_model.json`` (``pg.load_model(dir)``);
      an LM with ``save_pretrained`` and its tokenizer. Loaded back and compared with the student.
    - ``onnx``: ``model.onnx``, fp32, dynamic batch axis (:func:`protege.export.onnx_io.to_onnx`),
      run with onnxruntime on the run's test split (else val) and compared with PyTorch: max
      absolute logit difference, top-1 agreement, accuracy.
    - ``int8``: ``model.onnx``, int8 W8A8 by onnxruntime's ``quantize_static``
      (:mod:`protege.export.quantize`), calibrated on ``calibration`` samples of the run's training
      split; a quantization-aware run's (``quantize:``) observed input ranges are used for the layers
      it trained (``qad_ranges=False``: calibrate everything). Evaluated on the test split: accuracy,
      agreement with the fp32 student and with the teacher (run in PyTorch).

    Every export writes ``export.json`` (all that was measured, and the command that reproduces it)
    and a model card ``README.md``. ``bench``: also time teacher, student and exported model side
    by side (:func:`protege.export.latency.measure`). Nothing is written unless everything succeeds,
    and an existing ``out`` is replaced only with ``overwrite``.

    ``source`` a model (not a run directory): ``out`` is required; ``data`` (a
    :class:`~protege.data.DataSplits`) or ``example`` (an input batch) give its inputs;
    ``calibration_data`` (a dataset of ``(input, label)`` or an iterable of input batches) replaces
    the training split for int8; ``teacher`` is the reference for agreement; ``spec`` (``{"model",
    "kwargs", "num_classes", "in_chans"}``) is what ``--format native`` records to rebuild it.
    """
    if format not in FORMATS:
        raise ProtegeError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if calibration < 1:
        raise ProtegeError(f"--calibration is a number of training samples (≥ 1), got {calibration}")
    if checkpoint not in ("best", "last"):
        raise ProtegeError(f"--checkpoint is best or last, got {checkpoint!r}")
    if isinstance(source, nn.Module):
        if out is None:
            raise ProtegeError("exporting a model (not a run directory) needs out=: the directory to write")
    elif out is None:
        out = default_out(source, format)
    out = Path(out)
    _check_out(out, overwrite)
    if format != "native":
        require()
    src = (
        _from_model(source, data, example, teacher, spec)
        if isinstance(source, nn.Module)
        else open_run(Path(source), checkpoint, format, qad_ranges)
    )
    segmenter = src.task.name == "promptable_segmentation"
    embedder = src.task.name == "embedding"
    if format != "native" and not isinstance(src.task, ClassificationTask) and not (segmenter or embedder):
        raise ProtegeError(
            f"--format {format} covers classification, promptable-segmentation and sentence-embedding "
            f"students; task {src.task.name!r} exports with --format native (its own library's format)"
        )
    if embedder and format != "native" and calibration_data is not None:
        raise ProtegeError(
            "an embedding student's int8 is dynamic (no calibration): leave calibration_data out"
        )
    command = _command(source, format, out, calibration, overwrite, bench, checkpoint, qad_ranges)
    info: dict[str, Any] = {
        "format": format,
        "protege_version": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "source": _describe(src),
    }
    # the calibration samples first: a run that may not calibrate fails before any work
    calibrating = (
        _calibration(src, calibration, calibration_data)
        if format == "int8" and not (segmenter or embedder)
        else None
    )
    with staged_dir(out) as tmp:
        if format == "native":
            _native(src, tmp, info)
        elif segmenter:
            info |= _segmenter(src, format, tmp, calibration, calibration_data, bench)
        elif embedder:
            from .embedder import export_embedder

            info |= export_embedder(src.model, src.task, format, tmp, _eval_set(src), src.teachers, bench)
        else:
            with tempfile.TemporaryDirectory(prefix="protege-export-") as scratch:
                fp32 = (tmp if format == "onnx" else Path(scratch)) / "model.onnx"
                info["onnx"] = to_onnx(src.model, example_inputs(src), fp32)
                if format == "onnx":
                    _check_onnx(src, fp32, info)
                    onnx_files = {"onnx_fp32": fp32}
                else:
                    int8 = tmp / "model.onnx"
                    assert calibrating is not None
                    batches, cal = calibrating
                    info["quantization"] = quantize_int8(
                        fp32, int8, batches, src.qad_ranges if qad_ranges else None, src.float_modules
                    )
                    info["quantization"]["calibration"] = cal
                    _check_int8(src, fp32, int8, info)
                    onnx_files = {"onnx_fp32": fp32, "int8": int8}
                if bench:
                    info["latency"] = _bench(src, onnx_files)
        info["model"] = _model_info(src)
        info["files"] = {
            str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        (tmp / "README.md").write_text(model_card(info))
        commit_dir(tmp, out, info, index_name="export.json")
    info["path"] = str(out)
    return info


def _check_out(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ProtegeError(
            f"{out} already exists: pass --overwrite (overwrite=True) to replace it, or --out another directory"
        )
    if out.exists() and not out.is_dir():
        raise ProtegeError(f"{out} exists and is not a directory; choose another --out")


def _version() -> str:
    from .. import __version__

    return __version__


# -- the sources ----------------------------------------------------------------------------------


def open_run(run_dir: Path, which: str, format: str, qad_ranges: bool) -> _Source:
    if not (run_dir / "config.yaml").is_file():
        raise ProtegeError(f"{run_dir} is not a protege run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    try:
        data = load_run_data(cfg)
    except ProtegeError as e:
        needs = "calibrates on its training split and " if format == "int8" else ""
        raise ProtegeError(
            f"cannot export {run_dir}: its data ({cfg.data.source}) cannot be read ({e}). The export "
            f"{needs}checks the model on real inputs: make the data available again (data.root, data "
            "options), or export the model object with pg.export(model, out=..., example=...)"
        ) from None
    loaded = load_run(run_dir, which, data=data)  # type: ignore[arg-type]
    ranges = None
    fake_quant = None
    if loaded.quant is not None and cfg.quantize is not None and cfg.student is not None:
        ranges = loaded.quant.ranges() if qad_ranges else None
        # a second copy keeps its fake quantization (the graph QAD trained and tested), the first loses it
        fake_quant = build_from(cfg.student.model_copy(update={"weights": str(loaded.where)}), data)
        FakeQuant(fake_quant, **cfg.quantize.fake_quant_kwargs()).load_state_dict(loaded.quant.state_dict())
        fake_quant.eval()
        loaded.quant.remove()  # the plain fp32 student, with the weights quantization-aware training left
    assert cfg.student is not None
    spec = {
        "model": cfg.student.model,
        "kwargs": dict(cfg.student.kwargs),
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
    }
    model = loaded.student.eval()
    for t in loaded.teachers:
        t.eval()
    return _Source(
        model=model,
        task=loaded.task,
        data=data,
        teachers=loaded.teachers,
        teacher_weights=[s.weight for s in cfg.all_teachers()],
        spec=spec,
        run_dir=run_dir,
        cfg=cfg,
        checkpoint=f"{which} ({loaded.where.name if loaded.where else '?'})",
        qad_ranges=ranges,
        fake_quant=fake_quant,
        float_modules=list(cfg.quantize.exclude) if cfg.quantize is not None else [],
    )


def _from_model(
    model: nn.Module,
    data: DataSplits | None,
    example: torch.Tensor | None,
    teacher: nn.Module | None,
    spec: dict[str, Any] | None,
) -> _Source:
    if data is None and example is None:
        raise ProtegeError(
            "exporting a model needs its inputs: pass data= (a DataSplits) or example= (an input batch)"
        )
    task = (
        build_task(getattr(data, "task", "classification"), data)
        if data is not None
        else ClassificationTask()
    )
    teachers = [teacher.eval()] if teacher is not None else []
    return _Source(
        model=model.eval(),
        task=task,
        data=data,
        teachers=teachers,
        teacher_weights=[1.0] * len(teachers),
        spec=spec,
        example=example,
    )


def _describe(src: _Source) -> dict[str, Any]:
    d: dict[str, Any] = {"task": src.task.name}
    if src.cfg is not None:
        cfg = src.cfg
        final = cfg.stage_config(len(cfg.stages) - 1) if cfg.stages else cfg
        d.update(
            {
                "run": str(src.run_dir),
                "checkpoint": src.checkpoint,
                "student": {"model": cfg.student.model, "kwargs": cfg.student.kwargs}
                if cfg.student
                else None,
                "teachers": [{"model": t.model, "weights": t.weights} for t in cfg.all_teachers()],
                "terms": [t.model_dump(exclude_defaults=True) | {"loss": t.loss} for t in final.terms],
                "quantize": cfg.quantize.model_dump() if cfg.quantize is not None else None,
            }
        )
        summary = _read_json(src.run_dir / "summary.json") if src.run_dir else {}
        test = (summary.get("test") or {}).get(src.checkpoint.split(" ")[0] if src.checkpoint else "best")
        if isinstance(test, dict) and "acc" in test:
            d["run_test_acc"] = test["acc"]  # what the run measured (fake-quantized in PyTorch for QAD)
        elif isinstance(test, dict) and "miou" in test:
            d["run_test_miou"] = test["miou"]
    elif src.spec:
        d["student"] = {"model": src.spec.get("model"), "kwargs": src.spec.get("kwargs")}
    if src.data is not None:
        d["data"] = {"source": src.data.source, "options": src.data.options, "sizes": src.data.sizes()}
    return d


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _command(
    source: Any,
    format: str,
    out: Path,
    calibration: int,
    overwrite: bool,
    bench: bool,
    checkpoint: str,
    qad_ranges: bool,
) -> str:
    if isinstance(source, nn.Module):
        return f"pg.export(model, format={format!r}, out={str(out)!r}, ...)  # from Python"
    parts = ["protege", "export", str(source), "--format", format]
    if format == "int8":
        parts += ["--calibration", str(calibration)]
        if not qad_ranges:
            parts.append("--no-qad-ranges")
    if checkpoint != "best":
        parts += ["--checkpoint", checkpoint]
    if out != default_out(source, format):
        parts += ["--out", str(out)]
    if overwrite:
        parts.append("--overwrite")
    if bench:
        parts.append("--bench")
    return shlex.join(parts)


# -- inputs ---------------------------------------------------------------------------------------


def _eval_set(src: _Source) -> tuple[str, Dataset[Any]] | None:
    if src.data is None:
        return None
    if src.data.test is not None:
        return "test", src.data.test
    return "val", src.data.val


def _batches(dataset: Dataset[Any], task: Task, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, Any]]:
    for batch in make_loader(dataset, batch_size, shuffle=False):
        inputs, target = task.split(batch)
        yield task.model_input(inputs).float().cpu(), target


def example_inputs(src: _Source) -> torch.Tensor:
    """Real inputs to export and time with: the first samples of the evaluation split (else ``example``)."""
    if src.example is not None:
        return src.example.float().cpu()
    found = _eval_set(src)
    assert found is not None
    inputs, _ = next(_batches(found[1], src.task, batch_size=32))
    return inputs


def _calibration(
    src: _Source, n: int, given: Dataset[Any] | Iterable[torch.Tensor] | None
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``n`` calibration samples in batches: from ``given``, else a seeded draw of the run's training split."""
    if given is None:
        cfg = src.cfg
        if cfg is not None and cfg.data.strategy != "original":
            raise ProtegeError(
                f"{src.run_dir} trained without access to its training data (data.strategy: "
                f"{cfg.data.strategy}); calibrating int8 on that split would use data the run never had. "
                "Calibrate on data you may use: pg.export(run_dir, format='int8', calibration_data=...)"
            )
        if src.data is None:
            raise ProtegeError(
                "int8 calibration needs training data: pass data= (a DataSplits) or calibration_data= "
                "(input batches), or export a run"
            )
        train = src.data.train
        total = len(train)  # type: ignore[arg-type]
        take = min(n, total)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:take].tolist()
        batches = []
        task = src.task
        for start in range(0, take, CALIBRATION_BATCH):
            items = [train[i] for i in order[start : start + CALIBRATION_BATCH]]
            inputs, _ = task.split(torch.utils.data.default_collate(items))
            batches.append(inputs.float().cpu())
        return batches, {"split": "train", "samples": take, "seed": 0, "asked": n}
    if isinstance(given, Dataset) or hasattr(given, "__getitem__"):
        items = [given[i] for i in range(min(n, len(given)))]  # type: ignore[arg-type]
        inputs = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()
        batches = list(inputs.split(CALIBRATION_BATCH))
    else:
        batches, count = [], 0
        for x in given:
            x = x.float().cpu()[: n - count]
            batches.append(x)
            count += len(x)
            if count >= n:
                break
    samples = sum(len(b) for b in batches)
    if samples == 0:
        raise ProtegeError("calibration_data holds no sample")
    return batches, {"split": "given", "samples": samples, "asked": n}


# -- checks ---------------------------------------------------------------------------------------


def _teacher_probs(src: _Source, x: torch.Tensor) -> np.ndarray | None:
    if not src.teachers:
        return None
    total = sum(src.teacher_weights) or 1.0
    probs = sum(
        (w / total) * torch.softmax(src.task.forward(t, x)["logits"].float(), dim=-1)
        for t, w in zip(src.teachers, src.teacher_weights)
    )
    return probs.numpy()  # type: ignore[union-attr]


def _predict(src: _Source, sessions: dict[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
    """Logits (or the teachers' probabilities) of the student in PyTorch, every onnxruntime session
    and the teacher(s), over the evaluation split; plus the targets."""
    found = _eval_set(src)
    if found is None:  # a model without data: its example, as random-free as it gets
        assert src.example is not None
        batches: Iterable[tuple[torch.Tensor, Any]] = [(src.example.float().cpu(), None)]
        split = "example"
    else:
        split, dataset = found
        batches = _batches(dataset, src.task)
    out: dict[str, list[np.ndarray]] = {"fp32": [], "target": [], "teacher": [], "fake_quant": []}
    for name in sessions:
        out[name] = []
    with torch.inference_mode():
        for x, target in batches:
            out["fp32"].append(src.task.forward(src.model, x)["logits"].float().numpy())
            if src.fake_quant is not None:
                out["fake_quant"].append(src.task.forward(src.fake_quant, x)["logits"].float().numpy())
            for name, sess in sessions.items():
                out[name].append(run(sess, x))
            probs = _teacher_probs(src, x)
            if probs is not None:
                out["teacher"].append(probs)
            if target is not None:
                out["target"].append(target.numpy())
    return split, {k: np.concatenate(v) for k, v in out.items() if v}


def _metrics(preds: dict[str, np.ndarray], name: str) -> dict[str, float]:
    top = preds[name].argmax(-1)
    m: dict[str, float] = {}
    if "target" in preds:
        m["acc"] = float((top == preds["target"]).mean())
    if name != "fp32":
        m["agreement_fp32"] = float((top == preds["fp32"].argmax(-1)).mean())
    if "teacher" in preds and name != "teacher":
        m["agreement_teacher"] = float((top == preds["teacher"].argmax(-1)).mean())
    if "fake_quant" in preds and name == "int8":  # parity with the graph quantization-aware training ran
        m["agreement_fake_quant"] = float((top == preds["fake_quant"].argmax(-1)).mean())
    return m


def _parity(preds: dict[str, np.ndarray], name: str, split: str) -> dict[str, Any]:
    diff = np.abs(preds[name] - preds["fp32"])
    return {
        "inputs": f"{split} split" if split != "example" else "example",
        "samples": int(len(diff)),
        "max_abs_diff": float(diff.max()),
        "top1_agreement": float((preds[name].argmax(-1) == preds["fp32"].argmax(-1)).mean()),
    }


def _evaluation(split: str, preds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    ev: dict[str, Any] = {"split": split, "samples": int(len(preds["fp32"]))}
    for name in ("teacher", "fp32", "fake_quant", *names):
        if name in preds:
            ev[name] = _metrics(preds, name)
    return ev


def _check_onnx(src: _Source, fp32: Path, info: dict[str, Any]) -> None:
    split, preds = _predict(src, {"onnx_fp32": session(fp32)})
    info["parity"] = _parity(preds, "onnx_fp32", split)
    info["evaluation"] = _evaluation(split, preds, ["onnx_fp32"])


def _check_int8(src: _Source, fp32: Path, int8: Path, info: dict[str, Any]) -> None:
    split, preds = _predict(src, {"onnx_fp32": session(fp32), "int8": session(int8)})
    info["parity"] = _parity(preds, "onnx_fp32", split)  # the fp32 graph that was quantized
    info["evaluation"] = _evaluation(split, preds, ["onnx_fp32", "int8"])
    ev = info["evaluation"]
    info["int8_vs_fp32"] = {
        "max_abs_diff": float(np.abs(preds["int8"] - preds["fp32"]).max()),
        "acc_change": ev["int8"]["acc"] - ev["fp32"]["acc"] if "acc" in ev["int8"] else None,
    }


def _segmenter(
    src: _Source,
    format: str,
    tmp: Path,
    calibration: int,
    calibration_data: Dataset[Any] | Iterable[torch.Tensor] | None,
    bench: bool,
) -> dict[str, Any]:
    """A promptable segmenter: an encoder graph and decoder graphs (:mod:`.segmenter`)."""
    from .segmenter import export_segmenter

    if calibration_data is not None:
        raise ProtegeError(
            "a promptable segmenter calibrates on its run's training images; leave calibration_data out"
        )
    if format == "int8" and src.cfg is not None and src.cfg.data.strategy != "original":
        raise ProtegeError(
            f"{src.run_dir} trained without access to its training data (data.strategy: {src.cfg.data.strategy}); "
            "int8 calibration on that split would use data the run never had"
        )
    train = src.data.train if src.data is not None else None
    return export_segmenter(
        src.model, src.task, format, tmp, _eval_set(src), train, calibration, src.teachers, bench
    )


def _native(src: _Source, tmp: Path, info: dict[str, Any]) -> None:
    if src.task.native_format is None:
        raise ProtegeError(f"task {src.task.name!r} declares no native format; export it with --format onnx")
    if not src.task.export(src.model, src.data, tmp, src.spec):
        raise ProtegeError(
            f"the student ({type(src.model).__name__}) cannot be written in task {src.task.name!r}'s native "
            f"format ({src.task.native_format}): it is neither a timm model nor one with a build spec "
            "(pg.export(model, ..., spec={'model': name, 'num_classes': ..., 'in_chans': ...})); "
            "--format onnx needs neither"
        )
    kind = (
        "timm"
        if is_timm_model(src.model)
        else ("transformers" if src.task.native_format == "transformers" else "protege")
    )
    info["native"] = {"format": src.task.native_format, "kind": kind}
    if not isinstance(src.task, ClassificationTask):
        return  # an LM directory: transformers' own format, verified by transformers when loaded
    reloaded = _reload(tmp, kind)
    x = example_inputs(src)
    with torch.inference_mode():
        a = src.task.forward(src.model, x)["logits"].float()
        b = src.task.forward(reloaded, x)["logits"].float()
    diff = float((a - b).abs().max())
    info["parity"] = {
        "inputs": "test split" if src.data is not None else "example",
        "samples": len(x),
        "max_abs_diff": diff,
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "reloaded_with": 'timm.create_model("local-dir:<dir>", pretrained=True)'
        if kind == "timm"
        else "pg.load_model(<dir>)",
    }
    if diff > NATIVE_TOLERANCE:
        raise ProtegeError(
            f"the model written to {tmp.name} does not reproduce the student (max |Δlogit| {diff:.3g}); "
            "nothing was written. Export it with --format onnx, and report this"
        )


def _reload(directory: Path, kind: str) -> nn.Module:
    if kind == "timm":
        import timm

        return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    return load_model(directory)


def _model_info(src: _Source) -> dict[str, Any]:
    if not isinstance(src.task, ClassificationTask):
        return {"params": count_params(src.model)}
    x = example_inputs(src)
    return {
        "params": count_params(src.model),
        "flops": count_flops(src.model, x[:1]),
        "input_shape": [None, *x.shape[1:]],
        "class": f"{type(src.model).__module__}.{type(src.model).__qualname__}",
    }


def _bench(src: _Source, onnx_files: dict[str, Path]) -> dict[str, Any]:
    candidates = []
    if src.teachers:
        candidates.append(latency.Candidate("teacher", "pytorch", "fp32", module=src.teachers[0]))
    candidates.append(latency.Candidate("student", "pytorch", "fp32", module=src.model))
    labels = {"onnx_fp32": ("student", "fp32"), "int8": ("student", "int8")}
    for key, path in onnx_files.items():
        who, precision = labels[key]
        candidates.append(latency.Candidate(f"{who} {precision}", "onnxruntime", precision, onnx=path))
    rows = latency.measure(candidates, example_inputs(src))
    return {"machine": latency.machine(), "rows": rows}
