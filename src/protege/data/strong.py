"""The ``"strong"`` augmentation of the in-memory image sources, as integer parameters and a replay.

The "strong augmentation" recipe of Hao et al., "Revisit the Power of Vanilla Knowledge
Distillation: from Small Scale to Large Scale" (NeurIPS 2023), sized for small 1-channel images
(``mnist5k``, ``digits``, ``fashion-mnist``), in this order:

1. ``RandomResizedCrop`` of the (normalised) image back to its own size: area scale in
   ``[0.35, 1]``, aspect ratio in ``[3/4, 4/3]`` (log-uniform), the box drawn with torchvision's
   algorithm (10 tries, else the central crop), resized bilinearly with antialias on;
2. a horizontal flip with probability 0.5, only where a mirror keeps the label (``flip=True``:
   ``fashion-mnist``; never for digits, a mirrored digit is not that digit);
3. random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020) with probability
   0.25: a box of area fraction in ``[0.02, 0.2]`` and aspect ratio in ``[0.3, 3.3]``, drawn with
   torchvision's ``RandomErasing`` algorithm, filled with the background value ``fill`` (the
   normalised 0, as the shift pads with).

:class:`StrongAugment` draws a view's integer parameters from any generator with numpy's
``uniform``/``integers``/``random`` methods -- :class:`TorchRng` (torch's global RNG:
:class:`~protege.data.splits.TensorImageDataset` in ``__getitem__``) or a seeded
``numpy.random.Generator`` (:mod:`protege.data.views`, for a teacher-output cache) -- and
:meth:`StrongAugment.apply` replays them deterministically, so the random transform is exactly
``apply(x, draw(x, rng))``. Parameters: ``top, left, height, width`` (the crop box), ``flip``
(0/1, only with ``flip=True``), ``on, y, x, h, w`` (the erased box; all 0 when nothing is erased);
all fit ``int16`` for images up to 32767 pixels a side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "CROP_RATIO",
    "CROP_SCALE",
    "ERASE_P",
    "ERASE_RATIO",
    "ERASE_SCALE",
    "FLIP_P",
    "StrongAugment",
    "TorchRng",
]

CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5
ERASE_P = 0.25
ERASE_SCALE = (0.02, 0.2)
ERASE_RATIO = (0.3, 3.3)


class Rng(Protocol):
    """What the draws need: numpy ``Generator``'s ``uniform``, ``integers`` (high exclusive), ``random``."""

    def uniform(self, low: float, high: float) -> float: ...

    def integers(self, low: int, high: int) -> int: ...

    def random(self) -> float: ...


class TorchRng:
    """:class:`Rng` on torch's global RNG (what a random transform in ``__getitem__`` draws from)."""

    def uniform(self, low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(float(low), float(high)).item())

    def integers(self, low: int, high: int) -> int:
        return int(torch.randint(int(low), int(high), (1,)).item())

    def random(self) -> float:
        return float(torch.rand(1).item())


def _sides(area: int, scale: Sequence[float], ratio: Sequence[float], rng: Rng) -> tuple[int, int]:
    """A box of ``area * U(scale)`` pixels and log-uniform aspect in ``ratio``, as torchvision draws
    it: ``(round(sqrt(target * aspect)), round(sqrt(target / aspect)))``, the scale drawn first."""
    target = area * rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
    return int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))


def draw_resized_crop(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: Rng
) -> list[int]:
    """``top, left, height, width`` of a ``RandomResizedCrop`` box, drawn as torchvision draws it."""
    for _ in range(10):
        w, h = _sides(height * width, scale, ratio, rng)
        if 0 < w <= width and 0 < h <= height:
            return [int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w]
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return [(height - h) // 2, (width - w) // 2, h, w]


def draw_erase(
    height: int, width: int, p: float, scale: Sequence[float], ratio: Sequence[float], rng: Rng
) -> list[int]:
    """``on, y, x, h, w`` of a ``RandomErasing`` box, drawn as torchvision draws it (``on = 0`` and
    the rest 0 when the coin says no or 10 tries find no box smaller than the image)."""
    if rng.random() >= p:
        return [0, 0, 0, 0, 0]
    for _ in range(10):
        h, w = _sides(height * width, scale, ratio, rng)
        if not (h < height and w < width):
            continue
        return [1, int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w]
    return [0, 0, 0, 0, 0]


class StrongAugment:
    """The ``"strong"`` recipe (see the module docs): ``draw`` a view's parameters, ``apply`` them.

    Args:
        flip: include the horizontal flip (only where a mirror keeps the label).
        fill: the value erased pixels get (the background: the normalised 0).
    """

    def __init__(self, flip: bool, fill: float) -> None:
        self.flip = bool(flip)
        self.fill = float(fill)
        self.names: tuple[str, ...] = (
            "top",
            "left",
            "height",
            "width",
            *(("flip",) if self.flip else ()),
            "on",
            "y",
            "x",
            "h",
            "w",
        )

    def __repr__(self) -> str:
        return (
            f"StrongAugment(crop_scale={CROP_SCALE}, crop_ratio={CROP_RATIO}, bilinear, antialias, "
            f"flip={FLIP_P if self.flip else 0}, erase={ERASE_P}, erase_scale={ERASE_SCALE}, "
            f"erase_ratio={ERASE_RATIO}, fill={self.fill!r})"
        )

    def draw(self, x: torch.Tensor, rng: Rng) -> list[int]:
        """One view's parameters for the ``(C, H, W)`` image ``x``, in the order of :attr:`names`."""
        height, width = int(x.shape[-2]), int(x.shape[-1])
        params = draw_resized_crop(height, width, CROP_SCALE, CROP_RATIO, rng)
        if self.flip:
            params.append(int(rng.random() < FLIP_P))
        return params + draw_erase(height, width, ERASE_P, ERASE_SCALE, ERASE_RATIO, rng)

    def apply(self, x: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        """The view of ``x`` with ``params``: deterministic; ``x`` itself is never modified."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        params = [int(p) for p in params]
        if len(params) != len(self.names):
            raise ValueError(f"expected {len(self.names)} parameters ({', '.join(self.names)}), got {params}")
        top, left, h, w = params[:4]
        size = [int(x.shape[-2]), int(x.shape[-1])]
        out = F.resized_crop(
            x, top, left, h, w, size=size, interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        at = 4
        if self.flip:
            if params[at]:
                out = F.horizontal_flip(out)
            at += 1
        on, ey, ex, eh, ew = params[at : at + 5]
        if on:
            out = out.clone()
            out[..., ey : ey + eh, ex : ex + ew] = self.fill
        return out
