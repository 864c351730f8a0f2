"""Named image transform recipes for the PIL/array-based data sources.

Every recipe turns one image (a PIL image, a ``(H, W[, C])`` numpy array or a ``(C, H, W)`` uint8
tensor) into a plain ``float32`` tensor of shape ``(C, H, W)``:

- ``"cifar"``: train ``RandomCrop(input_size, padding=4)`` + ``RandomHorizontalFlip``; eval no
  geometry. Then scale to [0, 1] and ``Normalize`` (CIFAR-10 statistics unless given).
- ``"imagenet"``: train ``RandomResizedCrop(input_size)`` + ``RandomHorizontalFlip``; eval
  ``Resize(input_size * 256 / 224)`` + ``CenterCrop(input_size)`` (``Resize(256)`` +
  ``CenterCrop(224)`` at the default size). ImageNet statistics unless given.
- ``"mnist"``: scale to [0, 1] and ``Normalize`` (MNIST statistics unless given); no augmentation.
- ``"resize"``: ``Resize(input_size)`` + ``CenterCrop(input_size)`` for train and eval alike, then
  scale and ``Normalize`` (ImageNet statistics for 3 channels, 0.5/0.5 otherwise, unless given).
  What ``"auto"`` picks for folders of arbitrary images.
- ``"none"``: scale to [0, 1] only (the ``ToTensor`` of torchvision), no normalisation.

``"auto"`` is resolved per source by :func:`auto_recipe`. The in-memory bundled sources
(``mnist5k``, ``digits``) do not use these recipes: they are stored as normalised tensors and only
accept ``"auto"``, ``"none"`` or ``"augment"`` (see :mod:`protege.data.sources`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ProtegeError, unknown

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

RECIPES = ("cifar", "imagenet", "mnist", "resize", "none")

_DEFAULT_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "resize": (IMAGENET_MEAN, IMAGENET_STD),
}


def list_recipes() -> list[str]:
    """Names accepted by :func:`build_transforms` (plus ``"auto"``, resolved per source)."""
    return list(RECIPES)


def default_stats(recipe: str, in_chans: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a recipe normalises with when none is given.

    ``"resize"`` uses ImageNet statistics for 3 channels and 0.5/0.5 otherwise.
    """
    if recipe not in _DEFAULT_STATS:
        raise unknown("normalising transform recipe", recipe, _DEFAULT_STATS)
    if recipe == "resize" and in_chans != 3:
        return (0.5,) * in_chans, (0.5,) * in_chans
    return _DEFAULT_STATS[recipe]


def fit_stats(
    mean: Sequence[float], std: Sequence[float], in_chans: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Adapt per-channel ``mean``/``std`` to ``in_chans`` channels.

    Equal lengths and single values pass through; 3 values for 1 channel are averaged (e.g.
    ImageNet statistics for a grey image). Anything else raises :class:`ProtegeError`.
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std):
        raise ProtegeError(f"mean and std need the same length, got {len(mean)} and {len(std)}")
    if len(mean) in (1, in_chans):
        return mean, std
    if in_chans == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    raise ProtegeError(f"{len(mean)} normalisation values do not fit {in_chans}-channel images")


def auto_recipe(source: str) -> str:
    """The recipe ``"auto"`` stands for with ``source`` (e.g. ``"torchvision:CIFAR10"`` -> ``"cifar"``).

    CIFAR-like sources get ``"cifar"``; MNIST-like (MNIST, FashionMNIST, KMNIST, QMNIST) get
    ``"mnist"``; other torchvision sets (SVHN, STL10) get ``"mnist"``-style plain normalisation with
    their own statistics; ``imagefolder`` and ``hf`` get ``"resize"``.
    """
    name = source.split(":", 1)[-1].lower()
    if name.startswith("cifar"):
        return "cifar"
    if source.startswith("torchvision:"):
        return "mnist"
    return "resize"


class ToChannels:
    """Make a ``(C, H, W)`` image tensor have ``channels`` channels.

    Grey to RGB repeats the channel; RGB(A) to grey uses the ITU-R 601 luma weights; an alpha
    channel is dropped.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c == self.channels:
            return img
        if c in (2, 4):  # grey+alpha, RGB+alpha
            img, c = img[..., : c - 1, :, :], c - 1
            if c == self.channels:
                return img
        if c == 1 and self.channels == 3:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
        if c == 3 and self.channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            grey = (img.float() * w).sum(dim=-3, keepdim=True)
            return grey.round().clamp(0, 255).to(img.dtype) if not img.is_floating_point() else grey
        raise ValueError(f"cannot turn a {c}-channel image into {self.channels} channels")

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"


def to_image_tensor(img: Any) -> torch.Tensor:
    """Turn a PIL image, numpy array or tensor into a ``(C, H, W)`` tensor (uint8 kept as uint8).

    Arrays are read as ``(H, W)`` or ``(H, W, C)``; an array shaped ``(C, H, W)`` with ``C`` in
    1/3/4 and a last side not in 1/3/4 is taken as channels-first. Integer arrays are cast to
    uint8 (values 0-255); float arrays are taken to be in [0, 1] already.
    """
    from torchvision.transforms.v2 import functional as F

    if isinstance(img, torch.Tensor):
        t = img if img.ndim == 3 else img.unsqueeze(0)
        return t.as_subclass(torch.Tensor)
    if not hasattr(img, "getbands"):  # not a PIL image: an array-like
        arr = np.asarray(img)
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        else:
            arr = arr.astype(np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)
        if arr.ndim != 3:
            raise ValueError(f"expected an image array of 2 or 3 dimensions, got shape {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    return F.pil_to_tensor(img)


class ToImageTensor:
    """Transform wrapper around :func:`to_image_tensor`."""

    def __call__(self, img: Any) -> torch.Tensor:
        return to_image_tensor(img)

    def __repr__(self) -> str:
        return "ToImageTensor()"


def build_transforms(
    recipe: str,
    train: bool,
    input_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    in_chans: int | None = None,
    resize: bool = False,
) -> Callable[[Any], torch.Tensor]:
    """Build the transform for one named ``recipe`` (see the module docstring).

    Args:
        recipe: one of :func:`list_recipes` (``"auto"`` must be resolved with :func:`auto_recipe`).
        train: the training-split transform (with augmentation) or the eval one.
        input_size: side length of the square image the model sees.
        mean, std: per-channel normalisation; the recipe's own statistics when ``None``.
        in_chans: force this many channels (grey/RGB conversion) when given.
        resize: first bring every image to ``input_size`` x ``input_size`` (``Resize`` of the short
            side + ``CenterCrop``); for sources whose images may differ in size. ``"imagenet"`` and
            ``"resize"`` always size their output.

    Returns:
        A callable mapping one image to a plain float32 ``(C, H, W)`` tensor.
    """
    from torchvision.transforms import v2

    if recipe not in RECIPES:
        raise unknown("transform recipe", recipe, [*RECIPES, "auto"])
    steps: list[Callable[[Any], Any]] = [ToImageTensor()]
    if in_chans is not None:
        steps.append(ToChannels(in_chans))
    if resize and recipe not in ("imagenet", "resize"):
        steps += [v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)]
    if recipe == "cifar" and train:
        steps += [v2.RandomCrop(input_size, padding=4), v2.RandomHorizontalFlip()]
    elif recipe == "imagenet":
        if train:
            steps += [v2.RandomResizedCrop(input_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [
                v2.Resize(round(input_size * 256 / 224), antialias=True),
                v2.CenterCrop(input_size),
            ]
    elif recipe == "resize":
        steps += [v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if recipe != "none":
        if mean is None or std is None:
            d_mean, d_std = default_stats(recipe, 3 if in_chans is None else in_chans)
            mean = d_mean if mean is None else mean
            std = d_std if std is None else std
        if in_chans is not None:
            mean, std = fit_stats(mean, std, in_chans)
        steps.append(v2.Normalize(list(mean), list(std)))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
