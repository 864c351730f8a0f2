"""Replayable augmentation: a training transform split into *drawn parameters* and a deterministic replay.

A teacher-output cache (:mod:`protege.engine.cache`) stores the teacher's outputs for ``V`` augmented
*views* of every training sample. For the student to see exactly those views (as in FKD, Shen &
Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022, which stores
crop boxes and flips beside its soft labels), every random step of the training transform is
expressed as integer parameters drawn from a seeded generator, and :meth:`Replay.apply` replays a
raw sample with given parameters deterministically. ``apply(raw, params)`` equals what the random
transform produces when its own random draws give those parameters (tested against torchvision's
functional ops and against the random transforms themselves).

Replayable training transforms (:func:`replay_for`):

- in-memory sources (``mnist5k``, ``digits``, ``fashion-mnist``): ``"augment"`` (a shift of up to
  ``s`` pixels: pad by ``s`` with the background value, crop back; parameters ``dy, dx`` in
  ``[0, 2s]``), ``"strong"`` (:mod:`protege.data.strong`, Hao et al., NeurIPS 2023: random resized
  crop ``top, left, height, width``; horizontal flip ``flip``, ``fashion-mnist`` only; random
  erasing ``on, y, x, h, w``) and ``"none"``/``"auto"`` (no randomness: one view);
- the recipes of :mod:`protege.data.transforms` on file-based sources: ``"cifar"``
  (``RandomCrop`` with padding: ``top, left``; ``RandomHorizontalFlip``: ``flip``), ``"imagenet"``
  (``RandomResizedCrop``: ``top, left, height, width`` of the box in the image it sees, drawn as
  torchvision draws it; ``flip``), ``"mnist"``, ``"resize"`` and ``"none"`` (no randomness: one
  view). More generally any ``v2.Compose`` of the deterministic steps those recipes use plus
  ``RandomCrop``/``RandomResizedCrop``/``RandomHorizontalFlip``;
- datasets of fixed in-memory samples with no transform (point clouds: ``shapes3d`` classification,
  ``pointfolder``), which expose ``fixed_tensors() -> (inputs, labels, description)``: one view.

Anything else (a custom transform, colour jitter, …) raises :class:`ProtegeError` naming the
replayable recipes.

Views by epoch: with ``V`` views, sample ``i`` at epoch ``e`` uses view
``(e + offset[i]) % V`` (:func:`view_offsets`: a fixed pseudo-random offset per sample from the
seed), so over any ``V`` consecutive epochs every sample sees each of its views exactly once,
and different samples are at different views in the same epoch. A loader tells a dataset the
epoch through the index itself: index ``e * n + i`` means sample ``i`` at epoch ``e`` (see
:func:`split_index`; :class:`protege.engine.cache.ViewEpochSampler` yields such indices).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ProtegeError
from .splits import TensorImageDataset, TransformSubset
from .strong import StrongAugment, draw_resized_crop
from .transforms import RECIPES, ToChannels, ToImageTensor

__all__ = [
    "REPLAYABLE",
    "Replay",
    "ReplayDataset",
    "content_hash",
    "replay_for",
    "sample_rng",
    "split_index",
    "view_offsets",
]

REPLAYABLE = ("augment (in-memory sources)", "strong (in-memory sources)", "none", "auto", *RECIPES)
"""What :func:`replay_for` can replay, for error messages."""


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws sample ``index``'s view parameters: independent of the order in
    which samples are visited, so a cache built in any order or in parallel holds the same views."""
    return np.random.default_rng([int(seed), int(index)])


def view_offsets(n: int, views: int, seed: int) -> np.ndarray:
    """Per-sample view offsets: sample ``i`` at epoch ``e`` uses view ``(e + offsets[i]) % views``."""
    return np.random.default_rng([int(seed), 7_919]).integers(0, views, size=n)


def split_index(index: int, n: int, epoch: int = 0) -> tuple[int, int]:
    """``(epoch, sample)`` of a dataset index: ``e * n + i`` stands for sample ``i`` at epoch ``e``;
    a plain index ``i < n`` is at ``epoch`` (the dataset's own, set with ``set_epoch``)."""
    index = int(index)
    if index < 0:
        raise IndexError(f"negative index {index}")
    e, i = divmod(index, n)
    return (e if e else epoch), i


# ---------------------------------------------------------------------------------------- steps


class _Step:
    """One step of a replayable transform: ``names`` are the integer parameters it draws."""

    names: tuple[str, ...] = ()

    def draw(self, x: torch.Tensor, rng: np.random.Generator) -> list[int]:
        return []

    def apply(self, x: Any, params: Sequence[int]) -> Any:
        raise NotImplementedError


class _Fixed(_Step):
    """A deterministic step, run as it is."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def apply(self, x: Any, params: Sequence[int]) -> Any:
        return self.fn(x)


def _hw(x: torch.Tensor) -> tuple[int, int]:
    return int(x.shape[-2]), int(x.shape[-1])


class _Shift(_Step):
    """:class:`TensorImageDataset`'s shift: pad by ``s`` with ``fill``, crop ``H x W`` at ``(dy, dx)``."""

    names = ("dy", "dx")

    def __init__(self, shift: int, fill: float) -> None:
        self.shift = int(shift)
        self.fill = float(fill)

    def draw(self, x: torch.Tensor, rng: np.random.Generator) -> list[int]:
        return [int(v) for v in rng.integers(0, 2 * self.shift + 1, size=2)]

    def apply(self, x: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        s, (dy, dx) = self.shift, params
        h, w = _hw(x)
        padded = torch.nn.functional.pad(x, (s, s, s, s), value=self.fill)
        return padded[..., dy : dy + h, dx : dx + w]


class _RandomCrop(_Step):
    """``v2.RandomCrop`` (padding, ``pad_if_needed``, constant/edge/reflect/symmetric padding)."""

    names = ("top", "left")

    def __init__(self, t: Any) -> None:
        if isinstance(t.fill, dict):
            raise ProtegeError(f"{t!r}: a per-type fill has no replayable form; use a number")
        self.size = tuple(int(s) for s in t.size)
        self.padding = list(t.padding) if t.padding is not None else None  # left, right, top, bottom
        self.pad_if_needed = bool(t.pad_if_needed)
        self.fill = t.fill
        self.padding_mode = t.padding_mode

    def _geometry(self, x: torch.Tensor) -> tuple[list[int], int, int]:
        """Padding ``[left, top, right, bottom]`` and padded ``(H, W)``, as torchvision computes them."""
        h, w = _hw(x)
        left, right, top, bottom = self.padding if self.padding is not None else (0, 0, 0, 0)
        h, w = h + top + bottom, w + left + right
        ch, cw = self.size
        if self.pad_if_needed:
            if h < ch:
                d = ch - h
                top, bottom, h = top + d, bottom + d, h + 2 * d
            if w < cw:
                d = cw - w
                left, right, w = left + d, right + d, w + 2 * d
        if h < ch or w < cw:
            raise ProtegeError(f"RandomCrop of {self.size} is larger than the padded image ({h}, {w})")
        return [left, top, right, bottom], h, w

    def draw(self, x: torch.Tensor, rng: np.random.Generator) -> list[int]:
        _, h, w = self._geometry(x)
        ch, cw = self.size
        return [int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))]

    def apply(self, x: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        padding, _, _ = self._geometry(x)
        if any(padding):
            x = F.pad(x, padding=padding, fill=self.fill, padding_mode=self.padding_mode)
        top, left = params
        return F.crop(x, int(top), int(left), *self.size)


class _RandomResizedCrop(_Step):
    """``v2.RandomResizedCrop``: the box is drawn with torchvision's algorithm (10 tries of a
    random area in ``scale`` and log-uniform aspect ratio in ``ratio``, else the central crop)."""

    names = ("top", "left", "height", "width")

    def __init__(self, t: Any) -> None:
        self.size = list(t.size)
        self.scale = tuple(float(s) for s in t.scale)
        self.ratio = tuple(float(r) for r in t.ratio)
        self.interpolation = t.interpolation
        self.antialias = t.antialias

    def draw(self, x: torch.Tensor, rng: np.random.Generator) -> list[int]:
        return draw_resized_crop(*_hw(x), self.scale, self.ratio, rng)

    def apply(self, x: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = (int(p) for p in params)
        return F.resized_crop(
            x, top, left, h, w, size=self.size, interpolation=self.interpolation, antialias=self.antialias
        )


class _HorizontalFlip(_Step):
    """``v2.RandomHorizontalFlip(p)``: ``flip`` is 1 with probability ``p``."""

    names = ("flip",)

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def draw(self, x: torch.Tensor, rng: np.random.Generator) -> list[int]:
        return [int(rng.random() < self.p)]

    def apply(self, x: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        return F.horizontal_flip(x) if params[0] else x


class _Strong(_Step):
    """:class:`TensorImageDataset`'s ``"strong"`` augmentation (:class:`~protege.data.strong.StrongAugment`):
    the very draws and replay the dataset makes, here from a seeded numpy generator."""

    def __init__(self, augment: StrongAugment) -> None:
        self.augment = augment
        self.names = augment.names

    def draw(self, x: torch.Tensor, rng: np.random.Generator) -> list[int]:
        return self.augment.draw(x, rng)

    def apply(self, x: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        return self.augment.apply(x, params)


def _v2_steps(transform: Any) -> list[_Step]:
    """The steps of a ``v2.Compose`` training transform, or a ProtegeError if one is not replayable."""
    from torchvision.transforms import v2

    fixed = (
        ToImageTensor,
        ToChannels,
        v2.Resize,
        v2.CenterCrop,
        v2.Pad,
        v2.ToDtype,
        v2.Normalize,
        v2.ToPureTensor,
        v2.ToImage,
        v2.Grayscale,
        v2.Identity,
    )
    if not isinstance(transform, v2.Compose):
        raise _not_replayable(f"the training transform {type(transform).__name__}")
    steps: list[_Step] = []
    for t in transform.transforms:
        if isinstance(t, v2.Compose):
            steps += _v2_steps(t)
        elif type(t) is v2.RandomCrop:
            steps.append(_RandomCrop(t))
        elif type(t) is v2.RandomResizedCrop:
            steps.append(_RandomResizedCrop(t))
        elif type(t) is v2.RandomHorizontalFlip:
            steps.append(_HorizontalFlip(t.p))
        elif isinstance(t, fixed):
            steps.append(_Fixed(t))
        else:
            raise _not_replayable(f"the transform step {t!r}")
    return steps


def _not_replayable(what: str) -> ProtegeError:
    return ProtegeError(
        f"{what} has no replayable form, so a teacher-output cache cannot store its views. "
        f"Replayable training transforms: {', '.join(REPLAYABLE)} (data.transforms); "
        "or distill online (remove `cache:` from the config)"
    )


# --------------------------------------------------------------------------------------- replay


class Replay:
    """The training split as raw samples plus a replayable transform.

    Attributes:
        names: the integer parameters one view draws, e.g. ``("RandomCrop.top", "RandomCrop.left",
            "HorizontalFlip.flip")``; empty when the transform has no randomness.
        description: what decides the views (for fingerprints): the transform's steps and options.
    """

    def __init__(
        self,
        raw: Callable[[int], tuple[Any, Any]],
        n: int,
        steps: list[_Step],
        description: str,
    ) -> None:
        self._raw = raw
        self.n = n
        self.steps = steps
        self.names = tuple(f"{type(s).__name__.lstrip('_')}.{p}" for s in steps for p in s.names)
        self.description = description
        self._views: Callable[[Sequence[int], torch.Tensor], list[tuple[torch.Tensor, Any]]] | None = None

    @property
    def random(self) -> bool:
        """Whether the transform draws anything (otherwise a sample has one view)."""
        return bool(self.names)

    def __len__(self) -> int:
        return self.n

    def raw(self, i: int) -> tuple[Any, Any]:
        """Sample ``i`` before the transform: ``(raw image, label)``."""
        return self._raw(i)

    def draw(self, raw: Any, rng: np.random.Generator) -> tuple[list[int], torch.Tensor]:
        """Draw one view's parameters for ``raw`` from ``rng``; return them with the view itself."""
        params: list[int] = []
        x = raw
        for step in self.steps:
            p = step.draw(x, rng) if step.names else []
            x = step.apply(x, p)
            params += p
        return params, x

    def views(self, indices: Sequence[int], params: torch.Tensor) -> list[tuple[torch.Tensor, Any]]:
        """``(apply(raw_i, p_i), label_i)`` for a batch of samples, faster where possible (in-memory
        images with the shift augmentation are padded once and sliced: no per-sample copy)."""
        if self._views is not None:
            return self._views(indices, params)
        out = []
        for i, p in zip(indices, params):
            raw, label = self.raw(i)
            out.append((self.apply(raw, p.tolist()), label))
        return out

    def apply(self, raw: Any, params: Sequence[int]) -> torch.Tensor:
        """The view of ``raw`` with ``params``: deterministic."""
        params = [int(p) for p in params]
        if len(params) != len(self.names):
            raise ValueError(
                f"expected {len(self.names)} view parameters ({', '.join(self.names)}), got {params}"
            )
        x, at = raw, 0
        for step in self.steps:
            k = len(step.names)
            x = step.apply(x, params[at : at + k])
            at += k
        return x


class _PaddedSlices:
    """The shift views of in-memory images: every image padded once (lazily, ~1.3× the images'
    memory), each view a slice of it, exactly what :class:`_Shift` computes per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int, fill: float) -> None:
        self.images, self.labels, self.shift, self.fill = images, labels, int(shift), float(fill)
        self.padded: torch.Tensor | None = None

    def __call__(self, indices: Sequence[int], params: torch.Tensor) -> list[tuple[torch.Tensor, Any]]:
        if self.padded is None:
            s = self.shift
            self.padded = torch.nn.functional.pad(self.images, (s, s, s, s), value=self.fill)
        h, w = self.images.shape[-2:]
        return [
            (self.padded[i, :, dy : dy + h, dx : dx + w], self.labels[i])
            for i, (dy, dx) in zip(indices, params.tolist())
        ]


def replay_for(dataset: Any) -> Replay:
    """The :class:`Replay` of a training split made by :func:`protege.data.load_data`.

    Raises:
        ProtegeError: the dataset or its transform has no replayable form (see the module docs).
    """
    if isinstance(dataset, TensorImageDataset):
        images, labels = dataset.images, dataset.labels
        steps: list[_Step] = [_Shift(dataset.shift, dataset.fill)] if dataset.shift else []
        desc = f"TensorImageDataset(shift={dataset.shift}, fill={dataset.fill!r})"
        if dataset.augment is not None:
            steps = [_Strong(dataset.augment)]
            desc = f"TensorImageDataset(strong={dataset.augment!r})"
        replay = Replay(lambda i: (images[i], labels[i]), len(labels), steps, desc)
        if dataset.shift:
            replay._views = _PaddedSlices(images, labels, dataset.shift, dataset.fill)
        return replay
    if isinstance(dataset, TransformSubset):
        base, indices = dataset.base, dataset.indices
        steps = _v2_steps(dataset.transform)

        def raw(i: int) -> tuple[Any, Any]:
            img, label = base[indices[i]]
            return img, int(label)

        return Replay(raw, len(indices), steps, repr(dataset.transform))
    fixed = getattr(dataset, "fixed_tensors", None)
    if callable(fixed):  # in-memory samples read as they are (point clouds): one view each
        inputs, labels, desc = fixed()
        return Replay(lambda i: (inputs[i], labels[i]), len(labels), [], desc)
    raise _not_replayable(f"a training set of type {type(dataset).__name__}")


class ReplayDataset(Dataset):
    """The training split with each sample's stored views replayed: ``(view, label)``.

    ``params`` is ``(n, V, P)`` (from a cache); sample ``i`` at epoch ``e`` is replayed with view
    ``(e + offsets[i]) % V``. Indices ``e * n + i`` carry the epoch (see :func:`split_index`);
    :meth:`set_epoch` sets it for plain indices. What a cached run trains on, without the cache.
    """

    def __init__(self, replay: Replay, params: torch.Tensor, seed: int = 0) -> None:
        if params.ndim != 3 or params.shape[0] != len(replay) or params.shape[2] != len(replay.names):
            raise ValueError(
                f"view parameters of shape {tuple(params.shape)} do not fit {len(replay)} samples with "
                f"{len(replay.names)} parameters each; expected (n, views, params)"
            )
        self.replay = replay
        self.params = params
        self.views = int(params.shape[1])
        self.offsets = view_offsets(len(replay), self.views, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.replay)

    def view_of(self, epoch: int, i: int) -> int:
        return int((epoch + self.offsets[i]) % self.views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        epoch, i = split_index(index, len(self.replay), self.epoch)
        raw, label = self.replay.raw(i)
        return self.replay.apply(raw, self.params[i, self.view_of(epoch, i)].tolist()), label


# ------------------------------------------------------------------------------ content hashing


def content_hash(dataset: Any) -> str | None:
    """A cheap SHA-256 of a split's raw contents, or ``None`` where there is no cheap way.

    In-memory tensors hash their bytes; image folders hash each file's path and size (not the
    pixels: reading every image would cost as much as the teacher pass); torchvision sets with a
    ``data`` array hash the array (selected rows).
    """
    h = hashlib.sha256()
    fixed = getattr(dataset, "fixed_tensors", None)
    if callable(fixed):
        inputs, labels, _ = fixed()
        h.update(inputs.numpy().tobytes())
        h.update(labels.numpy().tobytes())
        return h.hexdigest()
    if isinstance(dataset, TensorImageDataset):
        h.update(dataset.images.numpy().tobytes())
        h.update(dataset.labels.numpy().tobytes())
        return h.hexdigest()
    if isinstance(dataset, TransformSubset):
        base, indices = dataset.base, dataset.indices
        samples = getattr(base, "samples", None)
        data = getattr(base, "data", None)
        if samples is not None:
            for i in indices:
                path, label = samples[i]
                p = Path(path)
                size = p.stat().st_size if p.exists() else -1
                h.update(f"{p.name}|{p.parent.name}|{size}|{label}\n".encode())
            return h.hexdigest()
        if data is not None:
            arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
            h.update(np.ascontiguousarray(arr[np.asarray(indices, dtype=np.int64)]).tobytes())
            targets = (
                getattr(base, "targets", None) if hasattr(base, "targets") else getattr(base, "labels", None)
            )
            if targets is not None:
                h.update(np.asarray(targets)[np.asarray(indices, dtype=np.int64)].tobytes())
            return h.hexdigest()
    return None
