"""PyTorch to ONNX and back: the export (dynamo exporter, TorchScript fallback), onnxruntime sessions,
and a readable error naming the operator and module an exporter could not convert."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ProtegeError
from ._deps import require

#: the opset the dynamo exporter targets (its oldest well-supported one for torch 2.9+); the
#: TorchScript fallback uses 17, its newest. The file records which (export.json: onnx.opset)
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
INPUT, OUTPUT = "input", "logits"
#: models whose weights take more bytes are written with their tensors in ``model.onnx.data``
EXTERNAL_DATA_BYTES = 1 << 30


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters and the quantizer: Python warnings, log records up to WARNING, and what
    they print to stdout/stderr (the TorchScript exporter prints its IR graph from C++ on failure,
    so the file descriptors are redirected too)."""
    saved: list[tuple[int, int]] = []
    sink = tempfile.TemporaryFile()
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):  # a captured stream without a descriptor
                continue
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
        disabled = logging.root.manager.disable
        logging.disable(logging.WARNING)  # onnxruntime.quantization logs advice on the root logger
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                warnings.simplefilter("ignore")
                yield
        finally:
            logging.disable(disabled)
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        sink.close()


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Write ``model`` (in ``eval()``, on the CPU) to ``path`` with a dynamic batch axis: one input
    tensor :data:`INPUT`, one output :data:`OUTPUT` (see :func:`export_graph`)."""
    if len(example) < 2:  # a batch of 1 would be specialized: the batch axis must stay dynamic
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = {0: "batch"}
    return export_graph(model, (example,), path, [INPUT], [OUTPUT], {INPUT: batch, OUTPUT: batch})


def export_graph(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]],
    opset: int | None = None,
) -> dict[str, Any]:
    """Write ``model`` (in ``eval()``, on the CPU) called on ``args`` to ``path``, its inputs and
    outputs named ``inputs`` and ``outputs``; ``dynamic`` names the axes that vary (``{tensor name:
    {axis: dimension name}}``; axes sharing a dimension name vary together). The example sizes of
    dynamic axes must be at least 2 (the dynamo exporter specializes sizes 0 and 1).

    The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript's optimizer folds
    BatchNorms into convolutions) first; where it fails, the TorchScript-based one. ``opset``: the
    TorchScript exporter's opset (default :data:`TORCHSCRIPT_OPSET`); the dynamo exporter writes
    ``max(opset, DYNAMO_OPSET)``. Returns ``{"exporter", "opset", "dynamo_error"?}``. Both failing
    is a :class:`ProtegeError` naming the operator and the module path that could not be converted
    (see :func:`diagnose`).
    """
    require("onnx", "onnxscript")
    import onnx

    model = model.eval().cpu()
    # one self-contained file, unless the weights pass protobuf's 2 GB limit (then <file>.data beside it)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    dims = {name: torch.export.Dim(name) for axes in dynamic.values() for name in axes.values()}
    dynamic_shapes = tuple(
        {axis: dims[dim] for axis, dim in dynamic[name].items()} if name in dynamic else None
        for name in inputs
    )
    errors: dict[str, BaseException] = {}
    for exporter in ("dynamo", "torchscript"):
        path.unlink(missing_ok=True)
        try:
            with quiet(), torch.no_grad():
                if exporter == "dynamo":
                    torch.onnx.export(
                        model,
                        args,
                        str(path),
                        dynamo=True,
                        verbose=False,
                        opset_version=max(opset or DYNAMO_OPSET, DYNAMO_OPSET),
                        input_names=list(inputs),
                        output_names=list(outputs),
                        dynamic_shapes=dynamic_shapes,
                        optimize=True,
                        external_data=external,
                    )
                else:
                    torch.onnx.export(
                        model,
                        args,
                        str(path),
                        dynamo=False,
                        opset_version=opset or TORCHSCRIPT_OPSET,
                        input_names=list(inputs),
                        output_names=list(outputs),
                        dynamic_axes={name: dict(axes) for name, axes in dynamic.items()},
                        do_constant_folding=True,
                    )
            proto = onnx.load(str(path))
            onnx.checker.check_model(str(path))
            names = [i.name for i in proto.graph.input]
            if names != list(inputs) or len(proto.graph.output) != len(outputs):
                raise ValueError(
                    f"the ONNX graph has inputs {names} and {len(proto.graph.output)} outputs; "
                    f"inputs {list(inputs)} and {len(outputs)} outputs were expected"
                )
        except Exception as e:  # any exporter failure: try the next, then explain both
            errors[exporter] = e
            continue
        info: dict[str, Any] = {"exporter": exporter, "opset": opset_of(proto)}
        if "dynamo" in errors:
            info["dynamo_error"] = _summary(errors["dynamo"])
        return info
    path.unlink(missing_ok=True)
    raise ProtegeError(diagnose(model, args, errors))


def opset_of(proto: Any) -> int:
    """The default-domain opset an ONNX model imports."""
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _summary(error: BaseException) -> str:
    """The line of an exporter error that says what went wrong (not its advice on filing issues)."""
    text = "\n".join(str(e) for e in _chain(error))
    for pattern in (r"No ONNX function found for [^\n]*", r"[^\n]*unrecognized namespace[^\n]*"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"{type(error).__name__}: {first}"[:300]


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return out


def _ops_named(errors: dict[str, BaseException]) -> list[str]:
    """Operator names (``namespace.op[.overload]``) the exporters' messages name."""
    text = "\n".join(str(e) for err in errors.values() for e in _chain(err))
    ops = re.findall(r"target=torch\.ops\.([\w.]+)", text)
    ops += re.findall(r"op='([\w.]+)'", text)
    ops += [m.replace("::", ".") for m in re.findall(r"(?:namespace|operator) '?(\w+::[\w.]+)", text)]
    return list(dict.fromkeys(op for op in ops))


def diagnose(model: nn.Module, args: tuple[torch.Tensor, ...], errors: dict[str, BaseException]) -> str:
    """The message for a model neither exporter converts: the operator(s) named in their errors and
    the module path(s) that call them (from ``torch.export``'s ``nn_module_stack``), and what to do."""
    ops = _ops_named(errors)
    places: dict[str, list[str]] = {}
    if ops:
        try:
            with quiet():
                program = torch.export.export(model, args)
            for node in program.graph.nodes:
                if node.op != "call_function":
                    continue
                target = str(node.target)
                op = next((o for o in ops if target == o or target.startswith(o + ".")), None)
                if op is None:
                    continue
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                path, cls = stack[-1] if stack else ("", type(model).__qualname__)
                where = f"{path!r} ({str(cls).rsplit('.', 1)[-1]})" if path else "the model's own forward"
                places.setdefault(target, [])
                if where not in places[target]:
                    places[target].append(where)
        except Exception:  # torch.export itself fails: the exporters' messages are all there is
            pass
    details = "; ".join(f"{name}: {_summary(e)}" for name, e in errors.items())
    if places:
        named = "; ".join(f"operator {op} in module {', '.join(where)}" for op, where in places.items())
        return (
            f"ONNX export failed: {named} has no ONNX conversion (tried the dynamo and the TorchScript "
            f"exporters). Replace that operation in the module with ones ONNX supports, or register an "
            f"ONNX function for it (torch.onnx's custom_translation_table); --format native needs no "
            f"conversion. Exporters said: {details}"
        )
    if ops:
        return (
            f"ONNX export failed on operator {', '.join(ops)} (tried the dynamo and the TorchScript "
            f"exporters). Replace it, or register an ONNX function for it; --format native needs no "
            f"conversion. Exporters said: {details}"
        )
    return (
        f"ONNX export failed in both the dynamo and the TorchScript exporter: {details}. "
        "--format native needs no conversion"
    )


# -- onnxruntime --------------------------------------------------------------------------------


def session(path: Path, threads: int | None = None, spin: bool = True) -> Any:
    """An onnxruntime CPU session of the model at ``path``, all graph optimizations on;
    ``threads``: intra-op threads (``None``: onnxruntime's default, one per physical core);
    ``spin=False``: its worker threads sleep when a run ends instead of spinning for the next one
    (timed beside other models, a spinning pool holds cores the next model needs)."""
    ort = require("onnxruntime")["onnxruntime"]
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The logits an onnxruntime session computes for the batch ``x``."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return sess.run(None, {INPUT: np.ascontiguousarray(array, dtype=np.float32)})[0]
