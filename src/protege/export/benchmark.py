"""``protege bench``: a run's teacher and student in PyTorch, the student in onnxruntime fp32, and any
exports of it (int8 PTQ, int8 of a quantization-aware run), timed side by side."""

from __future__ import annotations

import json
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ProtegeError
from ..files import atomic_write_text
from ..metrics.cost import count_params
from . import latency
from ._deps import require
from .exporter import example_inputs, open_run
from .latency import machine
from .onnx_io import to_onnx


def _read_export(directory: Path) -> dict[str, Any]:
    index = directory / "export.json"
    if not index.is_file():
        raise ProtegeError(
            f"{directory} is not an export directory (no export.json); make one with protege export"
        )
    try:
        info = json.loads(index.read_text())
    except ValueError as e:
        raise ProtegeError(f"{index} is damaged ({e}); export again with --overwrite") from None
    if info.get("format") not in ("onnx", "int8") or not (directory / "model.onnx").is_file():
        raise ProtegeError(
            f"{directory} holds no ONNX model (format {info.get('format')!r}); bench times onnx/int8 exports"
        )
    return info


def _weights(model: Any) -> dict[str, int]:
    """Parameters and the bytes their fp32 values take (a PyTorch model's size)."""
    params = count_params(model)
    return {"params": params, "bytes": 4 * params}


def bench(
    run_dir: str | Path,
    exports: Sequence[str | Path] = (),
    batch_sizes: Sequence[int] = (1, 32),
    threads: Sequence[int] | None = None,
    max_seconds: float = 20.0,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Latency of ``run_dir``'s teacher and student (PyTorch eager, fp32), of the student in
    onnxruntime fp32 (exported for this, not kept) and of each export directory's ``model.onnx``,
    at each batch size with 1 thread and all threads, in interleaved rounds
    (:func:`protege.export.latency.measure`): median, spread, and speed-ups over the fp32 student
    and the teacher measured in the same rounds. Each export's size and accuracy come from its
    ``export.json``. ``out``: also write the result there (JSON)."""
    require()
    if any(b < 1 for b in batch_sizes):
        raise ProtegeError(f"batch sizes must be ≥ 1, got {list(batch_sizes)}")
    run_dir = Path(run_dir)
    infos = [(Path(d), _read_export(Path(d))) for d in exports]
    src = open_run(run_dir, "best", "onnx", qad_ranges=False)
    example = example_inputs(src)
    models: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="protege-bench-") as scratch:
        fp32 = Path(scratch) / "model.onnx"
        to_onnx(src.model, example, fp32)
        candidates = []
        if src.teachers:
            candidates.append(latency.Candidate("teacher", "pytorch", "fp32", module=src.teachers[0]))
            models["teacher"] = _weights(src.teachers[0])
        candidates.append(latency.Candidate("student", "pytorch", "fp32", module=src.model))
        models["student"] = _weights(src.model)
        candidates.append(latency.Candidate("student fp32", "onnxruntime", "fp32", onnx=fp32))
        models["student fp32"] = {"bytes": fp32.stat().st_size}
        for directory, info in infos:
            origin = Path(info.get("source", {}).get("run") or directory)
            qad = bool(info.get("source", {}).get("quantize"))
            label = f"{origin.name} {info['format']}" + (" (QAD)" if qad else "")
            if label in models:
                label = f"{label} [{directory.name}]"
            precision = "int8" if info["format"] == "int8" else "fp32"
            candidates.append(
                latency.Candidate(label, "onnxruntime", precision, onnx=directory / "model.onnx")
            )
            ev = info.get("evaluation", {})
            models[label] = {
                "export": str(directory),
                "bytes": (directory / "model.onnx").stat().st_size,
                "acc": (ev.get(precision if precision == "int8" else "onnx_fp32") or {}).get("acc"),
                "acc_fp32_student": (ev.get("fp32") or {}).get("acc"),
            }
        rows = latency.measure(candidates, example, batch_sizes, threads, max_seconds=max_seconds)
    parts = ["protege", "bench", str(run_dir)] + [a for d in exports for a in ("--export", str(d))]
    result = {
        "run": str(run_dir),
        "machine": machine(),
        "models": models,
        "rows": rows,
        "command": shlex.join(parts),
    }
    if out is not None:
        atomic_write_text(Path(out), json.dumps(result, indent=2))
    return result
