"""Synthetic image sets on disk, and the ``synthetic`` data source that reads them.

A set is what data-free synthesis (:mod:`protege.strategies.synthesis`, ``protege synthesize``)
writes: a directory with ``images.safetensors`` (images stored as uint8 pixels or float16 in the
data's normalized range, with the class each was made for and the teacher's prediction and
confidence), ``index.json`` (format, fingerprint and its parts, options, geometry) and
``grid.png`` (a preview). It is written atomically (:func:`protege.files.staged_dir`).
``data: {source: synthetic, root: <set>}`` then trains on it like any labelled data set.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import ProtegeError
from ..files import commit_dir, staged_dir
from .splits import DataSplits, TensorImageDataset, stratified_split

__all__ = [
    "SetSpec",
    "SyntheticSet",
    "grid_png",
    "load_synthetic_set",
    "load_synthetic_source",
    "pixel_range",
    "read_index",
    "save_synthetic_set",
]


FORMAT = "protege-synthetic-set"
VERSION = 1
IMAGES = "images.safetensors"
GRID = "grid.png"


# -- pixel range and storage --------------------------------------------------------------------


def pixel_range(
    in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[Tensor, Tensor]:
    """The normalized values of pixel 0 and pixel 1 per channel, each ``(C, 1, 1)``: what a real
    image can hold. Without ``mean``/``std`` the images are in [0, 1]."""
    if mean is None or std is None:
        return torch.zeros(in_chans, 1, 1), torch.ones(in_chans, 1, 1)
    m = torch.tensor([float(v) for v in mean]).expand(in_chans) if len(mean) == 1 else torch.tensor(mean)
    s = torch.tensor([float(v) for v in std]).expand(in_chans) if len(std) == 1 else torch.tensor(std)
    m, s = m.float().reshape(-1, 1, 1), s.float().reshape(-1, 1, 1)
    return (0.0 - m) / s, (1.0 - m) / s


def encode_pixels(images: Tensor, lo: Tensor, hi: Tensor, dtype: str) -> Tensor:
    """Normalized images → storage: uint8 pixels (0-255) or float16 normalized values."""
    if dtype == "float16":
        return images.half()
    pixels = (images - lo) / (hi - lo)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def decode_pixels(stored: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Storage → normalized float32 images."""
    if stored.dtype == torch.uint8:
        return lo + stored.float() / 255.0 * (hi - lo)
    return stored.float()


def to_unit_range(images: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Normalized images → pixels in [0, 1] (for a preview)."""
    return ((images - lo) / (hi - lo)).clamp(0, 1)


def grid_png(
    pixels: Tensor, labels: Tensor, num_classes: int, per_class: int = 8, max_classes: int = 16
) -> bytes:
    """A PNG with one row per class (the first ``max_classes``; row ``c`` is class ``c``, blank where
    there is no image of it) of up to ``per_class`` images. ``pixels``: ``(N, C, H, W)`` in [0, 1];
    small images are enlarged (nearest)."""
    from PIL import Image
    from torchvision.utils import make_grid

    rows = []
    for c in range(min(num_classes, max_classes)):
        picked = pixels[labels == c][:per_class]
        pad = torch.ones(per_class - len(picked), *pixels.shape[1:])
        rows.append(torch.cat([picked, pad]))
    tiles = torch.cat(rows) if rows else pixels[:0]
    scale = max(1, 64 // max(pixels.shape[-1], 1))
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    grid = make_grid(tiles, nrow=per_class, padding=2, pad_value=1.0)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class SetSpec:
    """What a synthesized set is made from: the data's image geometry and normalization, the
    options and the seed. With the teacher's (and competing student's) weights it decides the
    set's fingerprint."""

    num_classes: int
    in_chans: int
    size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    seed: int

    @classmethod
    def of(cls, data: DataSplits, seed: int) -> SetSpec:
        return cls(
            data.num_classes,
            data.in_chans,
            data.input_size,
            None if data.mean is None else tuple(data.mean),
            None if data.std is None else tuple(data.std),
            int(seed),
        )

    def data_part(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "shape": [self.in_chans, self.size, self.size],
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    def range(self) -> tuple[Tensor, Tensor]:
        return pixel_range(self.in_chans, self.mean, self.std)


@dataclass
class SyntheticSet:
    """Synthesized images (normalized float32, as stored) with the class each was made for and the
    teacher's prediction and confidence on it; ``index`` is what ``index.json`` holds."""

    images: Tensor
    target: Tensor
    teacher_pred: Tensor
    teacher_conf: Tensor
    index: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


# -- a set on disk ------------------------------------------------------------------------------


def save_synthetic_set(sset: SyntheticSet, out: str | Path, spec: SetSpec, dtype: str) -> Path:
    """Write ``sset`` to the directory ``out`` (images, index.json, grid.png), atomically: the
    directory is assembled beside ``out`` and renamed into place."""
    out = Path(out)
    lo, hi = spec.range()
    index = {
        "format": FORMAT,
        "version": VERSION,
        **sset.index,
        **spec.data_part(),
        "dtype": dtype,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tensors = {
        "images": encode_pixels(sset.images, lo, hi, dtype),
        "target": sset.target.long(),
        "teacher_pred": sset.teacher_pred.long(),
        "teacher_conf": sset.teacher_conf.float(),
    }
    with staged_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / IMAGES)
        (tmp / GRID).write_bytes(grid_png(to_unit_range(sset.images, lo, hi), sset.target, spec.num_classes))
        commit_dir(tmp, out, index)
    return out


def read_index(path: str | Path) -> dict[str, Any] | None:
    """``index.json`` of the set at ``path``; ``None`` when there is no set there."""
    file = Path(path) / "index.json"
    if not file.is_file():
        return None
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ProtegeError(f"{file} is not valid JSON ({e}): remove {path} to synthesize it again") from None
    if index.get("format") != FORMAT:
        raise ProtegeError(f"{path} is not a protege synthetic set (its index.json has no format {FORMAT!r})")
    return index


def load_synthetic_set(path: str | Path) -> SyntheticSet:
    """Read a set written by :func:`save_synthetic_set` (images normalized float32)."""
    path = Path(path)
    index = read_index(path)
    if index is None:
        raise ProtegeError(f"no synthetic set at {path} (no index.json): write one with 'protege synthesize'")
    try:
        tensors = load_file(path / IMAGES)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ProtegeError(
            f"cannot read {path / IMAGES} ({e}): remove {path} and synthesize it again"
        ) from None
    c = index["shape"][0]
    lo, hi = pixel_range(c, index.get("mean"), index.get("std"))
    images = decode_pixels(tensors["images"], lo, hi)
    return SyntheticSet(images, tensors["target"], tensors["teacher_pred"], tensors["teacher_conf"], index)


# -- a set as a data source ---------------------------------------------------------------------


def load_synthetic_source(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    seed: int,
    options: dict[str, Any],
    **_: Any,
) -> DataSplits:
    """``data: {source: synthetic, root: <set>}``: a synthesized set as a labelled data set. Labels
    are the teacher's predictions (option ``labels: target``: the classes the images were made
    for); a stratified ``val_fraction`` is held out with ``seed``; no test split."""
    if root is None:
        raise ProtegeError("data source 'synthetic' needs root: the directory of a synthesized set")
    labels_from = options.get("labels", "teacher")
    if labels_from not in ("teacher", "target"):
        raise ProtegeError(
            f"option labels of source 'synthetic' is 'teacher' or 'target', got {labels_from!r}"
        )
    sset = load_synthetic_set(root)
    labels = sset.teacher_pred if labels_from == "teacher" else sset.target
    keep, held = stratified_split(labels.numpy(), val_fraction, seed)
    index = sset.index
    c, size = index["shape"][0], index["shape"][-1]
    lo, _ = pixel_range(c, index.get("mean"), index.get("std"))
    fill = float(lo.flatten()[0])
    shift = 2 if transforms == "augment" else 0

    def part(ix: np.ndarray, s: int = 0) -> TensorImageDataset:
        t = torch.from_numpy(ix)
        return TensorImageDataset(sset.images[t], labels[t], shift=s, fill=fill)

    n = index["num_classes"]
    return DataSplits(
        train=part(keep, shift),
        val=part(held),
        test=None,
        num_classes=n,
        in_chans=c,
        input_size=size,
        class_names=[str(i) for i in range(n)],
        source=source,
        options={
            "root": str(Path(root).resolve()),
            "fingerprint": index.get("fingerprint"),
            "labels": labels_from,
            "transforms": "augment" if shift else "none",
            "val_fraction": val_fraction,
            "seed": seed,
        },
        mean=None if index.get("mean") is None else tuple(index["mean"]),
        std=None if index.get("std") is None else tuple(index["std"]),
    )
