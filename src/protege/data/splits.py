"""What a data source returns: :class:`DataSplits` (train/val/test and metadata), and the in-memory
datasets and the stratified split the sources build on (:mod:`protege.data.sources`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ProtegeError
from .strong import StrongAugment, TorchRng

__all__ = ["DataSplits", "TensorImageDataset", "TransformSubset", "stratified_split", "stratified_subset"]

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass
class DataSplits:
    """The datasets and metadata one :func:`load_data` call returns.

    Attributes:
        train, val, test: datasets of ``(float32 (C, H, W) image, int64 label)``; ``test`` is
            ``None`` when the source has no test split.
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        in_chans: image channels ``C``.
        input_size: side length of the square images the model sees (``H == W``).
        class_names: one name per class index.
        source: the source name, e.g. ``"mnist5k"``.
        options: everything besides the source that decided the contents (root, transforms,
            seed, fractions, source options); part of :meth:`fingerprint`.
        mean, std: the per-channel normalisation applied, or ``None`` when images are in [0, 1].
    """

    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any] | None
    num_classes: int
    in_chans: int
    input_size: int
    class_names: list[str]
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def sizes(self) -> dict[str, int]:
        """Number of items per split (``test`` is 0 when absent)."""
        return {
            "train": len(self.train),  # type: ignore[arg-type]
            "val": len(self.val),  # type: ignore[arg-type]
            "test": 0 if self.test is None else len(self.test),  # type: ignore[arg-type]
        }

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the source, split sizes, shapes and options.

        Stable across runs and processes (no object ids, sorted JSON keys); use it as a cache key
        for anything computed from the data, e.g. teacher logits.
        """
        payload = {
            "source": self.source,
            "sizes": self.sizes(),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "input_size": self.input_size,
            "options": self.options,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


class TensorImageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """In-memory images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64.

    With ``shift > 0`` each item is shifted by a random offset of up to ``shift`` pixels in each
    direction (padding with ``fill``), drawn from torch's global RNG. With ``strong=True`` each item
    gets the ``"strong"`` augmentation instead (:class:`protege.data.strong.StrongAugment`: random
    resized crop, a horizontal flip only if ``flip``, random erasing with ``fill``), also drawn from
    torch's global RNG; ``shift`` and ``strong`` exclude each other.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        shift: int = 0,
        fill: float = 0.0,
        strong: bool = False,
        flip: bool = False,
    ) -> None:
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"bad shapes: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
        if strong and shift:
            raise ValueError("shift and strong exclude each other: the strong augmentation has no shift")
        if flip and not strong:
            raise ValueError("flip is part of the strong augmentation: pass strong=True with it")
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()
        self.shift = int(shift)
        self.fill = float(fill)
        self.strong = bool(strong)
        self.flip = bool(flip)
        self.augment: StrongAugment | None = StrongAugment(self.flip, self.fill) if self.strong else None

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)``, like :class:`torch.utils.data.TensorDataset`."""
        return self.images, self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if self.shift:
            s = self.shift
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (s, s, s, s), value=self.fill)
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = padded[:, dy : dy + h, dx : dx + w]
        elif self.augment is not None:
            x = self.augment.apply(x, self.augment.draw(x, TorchRng()))
        return x, self.labels[index]


class TransformSubset(Dataset[tuple[torch.Tensor, int]]):
    """Items ``indices`` of ``base`` (which yields ``(raw image, label)``) with ``transform`` applied.

    Lets the train and val splits share one base dataset with different transforms.
    """

    def __init__(
        self, base: Dataset[Any], indices: Sequence[int], transform: Callable[[Any], torch.Tensor]
    ) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[self.indices[index]]
        return self.transform(img), int(label)


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into ``(kept, held_out)`` with ``fraction`` held out.

    Stratified by label (scikit-learn ``train_test_split``) when every class can be split,
    otherwise a plain random split. Both index arrays are sorted. ``fraction == 0`` holds out
    nothing.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    if fraction <= 0 or len(idx) == 0:
        return idx, idx[:0]
    try:
        kept, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError:
        try:
            kept, held = train_test_split(idx, test_size=fraction, random_state=seed)
        except ValueError as e:
            raise ProtegeError(f"cannot hold out {fraction:g} of {len(idx)} items: {e}") from e
    return np.sort(kept), np.sort(held)


def stratified_subset(
    labels: Sequence[int] | np.ndarray, indices: np.ndarray, size: int | None, seed: int
) -> np.ndarray:
    """``size`` of ``indices``, stratified by ``labels[indices]`` and drawn with ``seed``; sorted.

    All of ``indices`` when ``size`` is ``None`` or not below their number; a plain random draw
    when a class has too few items to be stratified.
    """
    from sklearn.model_selection import train_test_split

    indices = np.asarray(indices)
    if size is None or size >= len(indices):
        return indices
    strata = np.asarray(labels)[indices]
    try:
        kept, _ = train_test_split(indices, train_size=int(size), stratify=strata, random_state=seed)
    except ValueError:
        kept, _ = train_test_split(indices, train_size=int(size), random_state=seed)
    return np.sort(kept)


# --------------------------------------------------------------------------------------- registry


# ------------------------------------------------------------------------------ in-memory sources


# ----------------------------------------------------------------------------- file-based sources
