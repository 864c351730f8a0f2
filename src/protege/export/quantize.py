"""Post-training static int8 quantization of an ONNX model with onnxruntime, and what the result holds.

Why onnxruntime's ``quantize_static`` (and not PyTorch's pt2e flow): the int8 model it writes runs
on any CPU with onnxruntime — what users deploy an ONNX model with — with no PyTorch at all, while
the pt2e flow's x86 backend (X86InductorQuantizer) needs ``torch.compile``/Inductor at inference to
turn its quantized graph into int8 kernels, which is heavier to set up and to ship.

The scheme, W8A8 in the QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantized
operator, which onnxruntime fuses into int8 kernels when it loads the model):

- weights: int8, symmetric, per output channel (``per_channel=True``);
- activations: uint8, asymmetric, per tensor, ranges from min/max calibration on real samples
  (:data:`ACTIVATION_TYPE`: u8 activations x s8 weights is onnxruntime's fast path on x86 — on the
  project's CPU (AVX-512 VNNI, one thread) resnet8x4 ran in 0.96 ms at batch 1 and 28.7 ms at
  batch 32 with uint8 activations, against 2.24 and 70.8 ms with int8 ones;
  ``benchmarks/int8_activation_type.py``, BENCHMARKS.md);
- a quantization-aware run's observed ranges replace the calibrated ones on the inputs of the layers
  it trained fake-quantized (``overrides``; onnxruntime's ``TensorQuantOverrides``).

This is the same scheme :mod:`protege.core.fake_quant` trains with.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ProtegeError
from ._deps import require
from .onnx_io import INPUT, quiet

#: the operator types whose weights are quantized (Conv: convolutions; Gemm/MatMul: linear layers)
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
ACTIVATION_TYPE = "QUInt8"
WEIGHT_TYPE = "QInt8"


#: a calibration batch: the model's one input (named :data:`INPUT`), or ``{input name: tensor}``
#: for a model with several (floating tensors are fed as float32, integer ones keep their type)
Batch = torch.Tensor | Mapping[str, torch.Tensor]


def _feed(x: torch.Tensor) -> np.ndarray:
    array = np.ascontiguousarray(x.detach().cpu().numpy())
    return array.astype(np.float32) if x.is_floating_point() else array


def _reader(batches: Iterable[Batch]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            if x is None:
                return None
            if isinstance(x, torch.Tensor):
                return {INPUT: x.detach().cpu().numpy().astype(np.float32)}
            return {name: _feed(value) for name, value in x.items()}

    return Reader()


def weighted_nodes(fp32: Path) -> dict[str, list[str]]:
    """``{module path: [names of the ONNX nodes whose weight is <path>.weight]}`` (dynamo's names)."""
    import onnx

    proto = onnx.load(str(fp32), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) >= 2 and node.input[1] in inits:
            if node.input[1].endswith(".weight"):
                found.setdefault(node.input[1].removesuffix(".weight"), []).append(node.name)
    return found


def module_inputs(fp32: Path) -> dict[str, list[str]]:
    """For each weighted operator of the ONNX model whose weight initializer is named after a module
    (``<path>.weight``, as the dynamo exporter keeps parameter names), ``{module path: [its input
    tensor]}``: where a module's input range is a tensor of the graph."""
    import onnx

    proto = onnx.load(str(fp32), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) >= 2 and node.input[1] in inits:
            name = node.input[1]
            if name.endswith(".weight"):
                found.setdefault(name.removesuffix(".weight"), []).append(node.input[0])
    return found


def quantize_int8(
    fp32: Path,
    out: Path,
    calibration: Iterable[Batch],
    ranges: Mapping[str, tuple[float, float]] | None = None,
    exclude: Sequence[str] = (),
    float_op_types: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the int8 model of the fp32 ONNX model ``fp32`` to ``out``, calibrated on the batches of
    ``calibration`` (tensors for a model with one input, ``{input name: tensor}`` for several);
    ``ranges`` (``{module path: (min, max)}``, a quantization-aware run's) fix the input ranges of
    the modules they name; the modules matching ``exclude`` (shell patterns of module paths, a
    quantization-aware run's ``quantize.exclude``) stay float; so do all operators of the types
    ``float_op_types`` (e.g. ``("Concat",)``: a Concat forces one scale on all its inputs, ruinous
    when they have very different ranges). Returns what was done (for ``export.json``)."""
    require("onnx", "onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    overrides: dict[str, list[dict[str, Any]]] = {}
    unmatched: list[str] = []
    if ranges:
        where = module_inputs(fp32)
        for path, (low, high) in ranges.items():
            tensors = where.get(path)
            if not tensors:
                unmatched.append(path)
                continue
            for tensor in tensors:
                old = overrides.get(tensor, [{}])[0]
                lo = min(low, float(old["rmin"])) if old else low  # a tensor two modules read: both ranges
                hi = max(high, float(old["rmax"])) if old else high
                overrides[tensor] = [
                    {"rmin": np.array(lo, dtype=np.float32), "rmax": np.array(hi, dtype=np.float32)}
                ]
    extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    op_types = None
    if float_op_types:  # onnxruntime's own default list (QDQ + QLinear registries) minus those
        op_types = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - set(float_op_types))
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    excluded: dict[str, list[str]] = {}
    if exclude:
        excluded = {
            path: nodes
            for path, nodes in weighted_nodes(fp32).items()
            if any(fnmatch.fnmatchcase(path, pattern) for pattern in exclude)
        }
    try:
        with quiet():
            quantize_static(
                str(fp32),
                str(out),
                _reader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=getattr(QuantType, ACTIVATION_TYPE),
                weight_type=getattr(QuantType, WEIGHT_TYPE),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra,
                nodes_to_exclude=[n for nodes in excluded.values() for n in nodes] or None,
                op_types_to_quantize=op_types,
            )
    except ProtegeError:
        raise
    except Exception as e:
        raise ProtegeError(
            f"onnxruntime could not quantize the model ({type(e).__name__}: {str(e)[:300]}); "
            "export it as fp32 onnx (--format onnx)"
        ) from None
    info: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor, MinMax calibration",
        "graph": graph_summary(out),
    }
    if exclude:
        info["excluded"] = {"patterns": list(exclude), "modules": sorted(excluded)}
    if float_op_types:
        info["float_op_types"] = list(float_op_types)
    if ranges is not None:
        info["qad_ranges"] = {
            "modules": len(ranges) - len(unmatched),
            "tensors": len(overrides),
            "unmatched": unmatched,
        }
    return info


#: operators of onnxruntime's dynamic quantization that multiply int8 weights
INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def graph_summary(path: Path) -> dict[str, Any]:
    """What an ONNX model holds: operator counts, QuantizeLinear/DequantizeLinear and QLinear*
    nodes, int8/uint8 initializers, and which weighted operators read int8 weights."""
    import onnx

    proto = onnx.load(str(path))
    ops = Counter(node.op_type for node in proto.graph.node)
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    inits = {i.name: i for i in proto.graph.initializer}
    int8_inits = sorted(name for name, i in inits.items() if i.data_type in int8)
    dequantized = {
        node.output[0]
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in inits
        and inits[node.input[0]].data_type in int8
    }
    weighted = [n for n in proto.graph.node if n.op_type in WEIGHTED_OPS]
    quantized = [n for n in weighted if len(n.input) > 1 and n.input[1] in dequantized]
    # dynamic quantization's operators read int8 weights directly (QOperator format)
    integer = sum(v for k, v in ops.items() if k in INTEGER_OPS)
    return {
        "ops": dict(sorted(ops.items())),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "qlinear_ops": sum(v for k, v in ops.items() if k.startswith("QLinear")),
        "int8_initializers": len(int8_inits),
        "weighted_ops": len(weighted) + integer,
        "weighted_ops_int8": len(quantized)
        + integer
        + sum(v for k, v in ops.items() if k in ("QLinearConv", "QGemm")),
    }
