"""Quantization-aware distillation (QAD): int8 fake quantization of a student, by module path.

ModelOpt's QAD idea: fine-tune the student *as it will run in int8* — its weights and the inputs of
its matrix products rounded to 8 bits in the forward pass, gradients passed straight through — with
the teacher's terms, so that it recovers what post-training quantization loses.

:class:`FakeQuant` prepares any ``nn.Module`` in place, without changing its module paths (taps keep
reading ``layer3`` or ``fc:in``) or its checkpoint format:

- **weights** of every ``Conv1d/2d/3d`` and ``Linear``: a parametrization
  (:mod:`torch.nn.utils.parametrize`) rounds them per output channel, symmetric int8 in
  ``[-127, 127]`` (``torch.fake_quantize_per_channel_affine``, scale ``max|w| / 127``), the scheme
  onnxruntime's ``quantize_static`` applies to weights (``per_channel=True``, int8 weights are
  symmetric). A BatchNorm folded into the convolution afterwards scales each output channel, which
  per-channel quantization is invariant to, so the exported int8 weights are the ones trained with.
  The module's ``state_dict`` keeps its plain keys (``fc.weight``, not
  ``fc.parametrizations.weight.original``): checkpoints load into the plain model.
- **inputs** of the same modules: a forward pre-hook rounds them per tensor, asymmetric uint8
  (``torch.fake_quantize_per_tensor_affine``), with the range an observer keeps: the min/max of
  the first training batch, then an exponential moving average (``averaging_constant``) of each
  batch's min/max, the range always containing 0 (as onnxruntime's calibration does). The ranges
  move only while the quantized module is training; in ``eval()`` they are
  fixed. The observers are modules of the :class:`FakeQuant` (not of the student),
  so their ranges are saved where the Distiller keeps its own trainable state
  (``distiller.safetensors`` of each checkpoint) and restored on resume.

``protege export --format int8`` of a QAD run uses these ranges for the inputs of the quantized
layers and calibrates the other tensors (see :mod:`protege.export`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ProtegeError

#: the module types whose weights and inputs are fake-quantized (what ORT quantizes as Conv/Gemm/MatMul)
QUANTIZED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: activations: uint8, asymmetric (onnxruntime's fast path on x86: u8 activations x s8 weights)
ACT_QMIN, ACT_QMAX = 0, 255
#: weights: int8, symmetric, per output channel
WEIGHT_QMAX = 127
_ORIGINAL = "parametrizations.weight.original"


class WeightFakeQuant(nn.Module):
    """The parametrization ``w -> fake_quant(w)``: symmetric int8 per output channel (axis 0)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        dims = list(range(1, w.dim()))
        absmax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
        scale = (absmax / WEIGHT_QMAX).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        out = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)
        return out.to(weight.dtype)


def activation_qparams(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of asymmetric uint8 for the range ``[low, high]`` (widened to contain 0),
    as onnxruntime computes them (``quant_utils.compute_scale_zp``)."""
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    scale = ((high - low) / (ACT_QMAX - ACT_QMIN)).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(ACT_QMIN - low / scale).clamp(ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale.float(), zero


class ActivationFakeQuant(nn.Module):
    """Observer + fake quantizer of one module's input tensor (uint8 per tensor, EMA range).

    Buffers: ``min``, ``max`` (the range) and ``updates`` (training batches observed; until the
    first one the input passes unchanged). ``forward(x, observe)``: the range moves only when
    ``observe`` — the quantized module is training (its mode, not this observer's, decides: whatever
    puts the student in ``eval()`` freezes its ranges)."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.averaging_constant = float(averaging_constant)
        self.register_buffer("min", torch.zeros(()))
        self.register_buffer("max", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach().float())
        if int(self.updates) == 0:
            self.min.copy_(low)
            self.max.copy_(high)
        else:
            c = self.averaging_constant
            self.min.mul_(1 - c).add_(c * low)
            self.max.mul_(1 - c).add_(c * high)
        self.updates += 1

    def forward(self, x: torch.Tensor, observe: bool = False) -> torch.Tensor:
        if observe:
            self.observe(x)
        if int(self.updates) == 0:
            return x
        scale, zero = activation_qparams(self.min, self.max)
        out = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, ACT_QMIN, ACT_QMAX)
        return out.to(x.dtype)


def _key(path: str) -> str:
    """A module path as a ``ModuleDict`` key (which may not contain dots)."""
    return path.replace(".", "/")


class FakeQuant(nn.Module):
    """Int8 fake quantization of ``model``'s Conv/Linear layers, in place (see the module docstring).

    Args:
        model: the student; its modules are changed in place (parametrized weights, input hooks),
            its module paths and ``state_dict`` keys stay as they are.
        averaging_constant: weight of each new batch in the observers' moving average of the
            input ranges (PyTorch's ``MovingAverageMinMaxObserver`` default, 0.01).
        exclude: module paths (shell patterns, e.g. ``"fc"``) left in float.

    ``remove()`` undoes everything and leaves the plain fp32 model (its latest weights).
    """

    def __init__(
        self, model: nn.Module, averaging_constant: float = 0.01, exclude: Sequence[str] = ()
    ) -> None:
        super().__init__()
        if not 0 < averaging_constant <= 1:
            raise ProtegeError(f"quantize.averaging_constant must be in (0, 1], got {averaging_constant}")
        paths = [
            path
            for path, module in model.named_modules()
            if isinstance(module, QUANTIZED_TYPES)
            and not any(fnmatch.fnmatchcase(path, pattern) for pattern in exclude)
        ]
        if not paths:
            raise ProtegeError(
                f"quantize: {type(model).__name__} has no Conv/Linear layer to quantize"
                + (f" outside {list(exclude)}" if exclude else "")
                + "; int8 quantization-aware distillation needs one"
            )
        for path in paths:
            if parametrize.is_parametrized(model.get_submodule(path)):
                raise ProtegeError(
                    f"quantize: {path!r} already carries a parametrization (fake quantization applied twice?)"
                )
        self.paths = paths
        self.inputs = nn.ModuleDict({_key(p): ActivationFakeQuant(averaging_constant) for p in paths})
        handles: list[Any] = []
        modules: list[nn.Module] = []
        for path in paths:
            module = model.get_submodule(path)
            parametrize.register_parametrization(module, "weight", WeightFakeQuant())
            handles.append(module.register_forward_pre_hook(self._pre_hook(path)))
            handles.append(module.register_state_dict_post_hook(_plain_keys))
            handles.append(module.register_load_state_dict_pre_hook(_parametrized_keys))
            modules.append(module)
        object.__setattr__(self, "_handles", handles)  # not submodules: the student stays the student's
        object.__setattr__(self, "_modules_quantized", modules)

    def _pre_hook(self, path: str):
        observer = self.inputs[_key(path)]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            return (observer(args[0], observe=module.training), *args[1:])

        return hook

    def forward(self, *args: Any) -> None:  # pragma: no cover - a holder of state, not a layer
        raise TypeError("FakeQuant is not called: it changes its model's layers in place")

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The observed input range ``(min, max)`` of each quantized module, by path (observed ones only)."""
        out = {}
        for path in self.paths:
            obs = self.inputs[_key(path)]
            if int(obs.updates) > 0:
                out[path] = (float(obs.min), float(obs.max))
        return out

    def remove(self) -> None:
        """Take the fake quantization out: plain fp32 weights (the latest), no hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._modules_quantized:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self._modules_quantized.clear()


def _plain_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """``state_dict`` post-hook: ``<prefix>parametrizations.weight.original`` is saved as ``<prefix>weight``."""
    key = prefix + _ORIGINAL
    if key in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(key)


def _parametrized_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    """``load_state_dict`` pre-hook: a plain ``<prefix>weight`` loads into the parametrized original."""
    key = prefix + "weight"
    if key in state_dict and prefix + _ORIGINAL not in state_dict:
        state_dict[prefix + _ORIGINAL] = state_dict.pop(key)
