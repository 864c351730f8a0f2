"""Adapters: trainable projectors that map a student tensor onto the teacher tensor's shape.

Feature methods compare a student tap with a teacher tap; when their shapes differ (a thinner
student, a CNN student of a ViT teacher) the paper's projector is trained with the student and
dropped at export. :func:`build_adapter` makes one from the two shapes:

========================  ==========================================================================
kind                      what it is
========================  ==========================================================================
``linear``                ``nn.Linear(D_s, D_t)`` on the last dimension ((N, D) or (N, L, D) tokens)
``conv1x1``               1×1 convolution C_s → C_t (no bias)
``conv_bn``               1×1 convolution + BatchNorm (the usual FitNet/ICKD/CRD-style projector)
``conv_bn_relu``          3×3 convolution + BatchNorm + ReLU (RepDistiller's FitNet regressor)
``auto``                  ``linear`` for vectors and tokens, ``conv_bn`` for feature maps;
                          the identity when the shapes already match
========================  ==========================================================================

Spatial sizes are matched after the channel projection: adaptive average pooling when the student
map is larger, bilinear interpolation when it is smaller. Between layouts:

- feature map (N, C, H, W) → vector (N, D): global average pooling, then ``linear``;
- tokens (N, L, D) → feature map (N, C, H, W): tokens are reshaped to a (√L × √L) grid (a leading
  class token is dropped when L = 1 + H·W), then the map adapter;
- feature map → tokens (N, L, D): the map is flattened to (N, H·W, C), then ``linear``, and its
  token count must equal L (after pooling to the teacher's grid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ProtegeError

KINDS = ("auto", "linear", "conv1x1", "conv_bn", "conv_bn_relu")


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """(N, L, D) tokens → (N, D, H, W) on a square grid; a leading class token is dropped."""
    n, length, d = x.shape
    side = math.isqrt(length)
    if side * side != length:
        side = math.isqrt(length - 1)
        if side * side != length - 1:
            raise ProtegeError(
                f"cannot arrange {length} tokens on a square grid (nor {length - 1} without a class token)"
            )
        x = x[:, 1:]
    return x.transpose(1, 2).reshape(n, d, side, side)


class _Resize(nn.Module):
    """Match a feature map's spatial size: average-pool down or interpolate up."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class _Layout(nn.Module):
    """Change tensor layout before the projection (no parameters)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pool":
            return x.mean(dim=(-2, -1))
        if self.mode == "tokens_to_map":
            return tokens_to_map(x)
        return x.flatten(2).transpose(1, 2)  # map_to_tokens

    def extra_repr(self) -> str:
        return self.mode


def _conv(kind: str, cin: int, cout: int) -> list[nn.Module]:
    if kind == "conv1x1":
        return [nn.Conv2d(cin, cout, 1, bias=False)]
    if kind == "conv_bn":
        return [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def build_adapter(
    student_shape: torch.Size | tuple[int, ...],
    teacher_shape: torch.Size | tuple[int, ...],
    kind: str = "auto",
    where: str = "",
) -> nn.Module:
    """A trainable module mapping tensors of ``student_shape`` to ``teacher_shape`` (batch dims ignored).

    ``where`` names the taps in error messages. Raises :class:`ProtegeError` when no adapter of
    ``kind`` can connect the two shapes.
    """
    if kind not in KINDS:
        raise ProtegeError(f"unknown adapter {kind!r}{where}; choose one of: {', '.join(KINDS)}")
    s, t = tuple(student_shape), tuple(teacher_shape)
    if kind == "auto" and s[1:] == t[1:]:
        return nn.Identity()
    shown_s, shown_t = list(s), list(t)  # s is rewritten below as layout changes are planned

    def fail(why: str) -> ProtegeError:
        return ProtegeError(f"no {kind} adapter maps student {shown_s} onto teacher {shown_t}{where}: {why}")

    layers: list[nn.Module] = []
    if len(s) == 3 and len(t) == 4:  # tokens → map
        layers.append(_Layout("tokens_to_map"))
        side = math.isqrt(s[1]) if math.isqrt(s[1]) ** 2 == s[1] else math.isqrt(s[1] - 1)
        s = (s[0], s[2], side, side)
    if len(s) == 4 and len(t) == 2:  # map → vector
        layers.append(_Layout("pool"))
        s = (s[0], s[1])
    if len(s) == 4 and len(t) == 3:  # map → tokens
        side = math.isqrt(t[1]) if math.isqrt(t[1]) ** 2 == t[1] else None
        if side is None:
            raise fail("the teacher's tokens do not form a square grid without a class token")
        layers += [_Resize((side, side)), _Layout("map_to_tokens")]
        s = (s[0], side * side, s[1])

    if len(s) != len(t):
        raise fail(f"a {len(s)}-d student tensor cannot be projected onto a {len(t)}-d teacher tensor")
    if len(s) in (2, 3):
        if kind not in ("auto", "linear"):
            raise fail("vectors and tokens take a linear adapter")
        if len(s) == 3 and s[1] != t[1]:
            raise fail(f"token counts differ ({s[1]} vs {t[1]})")
        layers.append(nn.Linear(s[-1], t[-1]))
    elif len(s) == 4:
        if kind == "linear":
            raise fail("feature maps take a convolutional adapter (conv1x1, conv_bn, conv_bn_relu)")
        layers += _conv("conv_bn" if kind == "auto" else kind, s[1], t[1])
        if s[2:] != t[2:]:
            layers.append(_Resize((t[2], t[3])))
    else:
        raise fail("only (N, D), (N, L, D) and (N, C, H, W) tensors are supported")
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
