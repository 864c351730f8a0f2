"""Promptable-segmentation data: composite images with exact instance masks, a folder reader, and
the prompt samplers SAM-style training and evaluation draw from the masks.

No SAM weights or SA-1B images are available offline, so the benchmark is built from real parts
whose masks are known exactly (protege issue 22, TinySAM):

* :class:`SegmentationImages`: deterministic composites. The background is a random crop of a real
  photograph or texture shipped inside scikit-image (:data:`TEXTURES`), tinted, brightened and
  sometimes blurred; on it lie 1..``max_objects`` objects, Fashion-MNIST articles (Xiao et al.,
  2017: upscaled, silhouette = intensity above a threshold with holes filled, pixels = grey level
  times a random colour) and drawn shapes (ellipse, rotated rectangle, random polygon or star,
  disk; a flat colour with a little noise). Later objects occlude earlier ones; objects left with
  less than ``min_area`` visible pixels are removed (and not painted), the rest labelled 1..K in
  painting order. Every labelled pixel was painted by its object and by nothing else.
  The train and val composites use Fashion-MNIST's train images (train: items 0-49,999, val:
  50,000-59,999), the test composites its test images, so no article is shared between splits.
* :class:`SegmentationFolder`: a user's own images with instance label maps next to them
  (``<stem>.masks.png``), resized and padded to a square like SAM's ``ResizeLongestSide``.
* :func:`load_segmentation_splits`: either of them as :class:`~protege.data.splits.DataSplits`.

Items are dicts ``{"image": float32 (3, S, S) in [0, 1], "instances": int64 (S, S) label map,
"index": int}``; :func:`collate_segmentation` batches them.

Prompt samplers (SAM, Kirillov et al., 2023, section 3 and appendix A; TinySAM, Shu et al., 2023)
work on boolean masks, numpy arrays or torch tensors, and return the same kind; random ones take a
``numpy.random.Generator`` or a ``torch.Generator`` and are deterministic given it. Points are
pixel coordinates ``(x, y)`` where pixel (row r, column c) is the point ``(c + 0.5, r + 0.5)``;
boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` the exclusive edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ProtegeError, unknown
from .splits import DataSplits

__all__ = [
    "KINDS",
    "SAM_PIXEL_MEAN",
    "TEXTURES",
    "SegmentationFolder",
    "SegmentationImages",
    "collate_segmentation",
    "error_point",
    "error_points",
    "instance_masks",
    "interior_point",
    "letterbox",
    "load_segmentation_splits",
    "mask_box",
    "point_grid",
    "random_points",
]

#: scikit-image sample images used as backgrounds: those its wheel ships in ``skimage/data`` (they
#: load offline; the others need ``pooch`` and a download). Grey ones are tinted into colour.
TEXTURES: tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "coffee",
    "astronaut",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)

#: object kinds a composite may hold.
KINDS: tuple[str, ...] = ("fashion", "shapes")

#: the shapes of the ``shapes`` kind, in the order of their codes (``fashion`` is code 1).
SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "polygon", "disk")
_OBJECT_NAMES: tuple[str, ...] = ("none", "fashion", *SHAPES)

#: SAM's pixel mean (ImageNet's, in [0, 1]): the padding colour of letterboxed images, which SAM's
#: normalisation maps to 0, the value SAM pads with.
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675 / 255, 116.28 / 255, 103.53 / 255)

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_FM_VAL_START = 50_000  # Fashion-MNIST train items from here on are the val composites' pool
_FM_THRESHOLD = 32  # upscaled Fashion-MNIST intensity (0-255) above which a pixel is the article
_MAX_TEXTURE_SIDE = 512
_ATTEMPTS = 20

Array = np.ndarray | torch.Tensor
Gen = np.random.Generator | torch.Generator


# ------------------------------------------------------------------------------------ composites


@lru_cache(maxsize=1)
def _textures() -> tuple[tuple[str, Image.Image], ...]:
    """The :data:`TEXTURES` that load, as RGB PIL images of at most 512 px a side."""
    import skimage.data

    loaded: list[tuple[str, Image.Image]] = []
    for name in TEXTURES:
        try:
            array = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a stripped scikit-image install (files removed): use the others
            continue
        if array.dtype != np.uint8:
            continue
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        image = Image.fromarray(np.ascontiguousarray(array[..., :3]))
        if max(image.size) > _MAX_TEXTURE_SIDE:
            scale = _MAX_TEXTURE_SIDE / max(image.size)
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
            )
        loaded.append((name, image))
    if not loaded:
        raise ProtegeError(
            "none of scikit-image's bundled sample images loads (" + ", ".join(TEXTURES) + "); "
            "reinstall scikit-image from its wheel (pip install --force-reinstall scikit-image)"
        )
    return tuple(loaded)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 (S, S, 3) background in [0, 1]: crop, flip, tint, brightness, maybe a blur."""
    from scipy.ndimage import gaussian_filter

    textures = _textures()
    _, texture = textures[int(rng.integers(len(textures)))]
    side = int(rng.uniform(0.3, 1.0) * min(texture.size))
    x0 = int(rng.integers(texture.width - side + 1))
    y0 = int(rng.integers(texture.height - side + 1))
    crop = texture.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BILINEAR)
    bg = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    tint = rng.uniform(0.6, 1.2, 3) * rng.uniform(0.6, 1.1)
    bg = np.clip(bg * tint.astype(np.float32), 0.0, 1.0)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.5, 2.0))
        bg = gaussian_filter(bg, sigma=(sigma, sigma, 0))
    return np.ascontiguousarray(bg, dtype=np.float32)


def _fashion_object(
    rng: np.random.Generator, size: int, items: np.ndarray, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """A Fashion-MNIST article from ``items[lo:hi]``: (mask (S, S), colours (S, S, 3), item index)."""
    from scipy.ndimage import binary_fill_holes

    item = int(rng.integers(lo, hi))
    side = max(8, int(rng.uniform(0.2, 0.6) * size))
    grey = np.asarray(
        Image.fromarray(np.asarray(items[item])).resize((side, side), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    silhouette = binary_fill_holes(grey > _FM_THRESHOLD)
    colour = rng.uniform(0.15, 1.0, 3).astype(np.float32)
    y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    mask = np.zeros((size, size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = silhouette
    pixels = np.zeros((size, size, 3), dtype=np.float32)
    pixels[y0 : y0 + side, x0 : x0 + side] = (0.25 + 0.75 * grey / 255.0)[..., None] * colour
    return mask, pixels, item


def _shape_object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A drawn shape: (mask (S, S), colours (S, S, 3), shape code in :data:`SHAPES`)."""
    from skimage import draw

    code = int(rng.integers(len(SHAPES)))
    r = rng.uniform(0.1, 0.3) * size  # half the extent: the shape spans about 20-60 % of S
    cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
    theta = rng.uniform(0, math.pi)
    shape = (size, size)
    if SHAPES[code] == "ellipse":
        rr, cc = draw.ellipse(cy, cx, r, r * rng.uniform(0.4, 1.0), shape=shape, rotation=theta)
    elif SHAPES[code] == "rectangle":
        a, b = r, r * rng.uniform(0.3, 1.0)
        corners = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        ys, xs = (corners @ rot.T).T
        rr, cc = draw.polygon(cy + ys, cx + xs, shape=shape)
    elif SHAPES[code] == "polygon":
        if rng.random() < 0.5:  # a star: alternating outer and inner radii
            points = int(rng.integers(5, 8))
            angles = theta + np.arange(2 * points) * math.pi / points
            radii = np.where(np.arange(2 * points) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
        else:  # a random polygon, star-shaped about its centre
            angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 9))))
            radii = r * rng.uniform(0.4, 1.0, len(angles))
        rr, cc = draw.polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=shape)
    else:
        rr, cc = draw.disk((cy, cx), r, shape=shape)
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    noise = rng.uniform(-0.05, 0.05, (size, size, 3)).astype(np.float32)
    return mask, np.clip(colour + noise, 0.0, 1.0), 2 + code


def _composite(
    rng: np.random.Generator,
    size: int,
    kinds: Sequence[str],
    max_objects: int,
    min_area: int,
    items: np.ndarray | None,
    pool: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """One composite: uint8 image (S, S, 3), uint8 label map (S, S), per label (kind code, item)."""
    for _ in range(_ATTEMPTS):
        image = _background(rng, size)
        objects: list[tuple[np.ndarray, np.ndarray, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            if kinds[int(rng.integers(len(kinds)))] == "fashion":
                assert items is not None
                mask, pixels, item = _fashion_object(rng, size, items, *pool)
                objects.append((mask, pixels, 1, item))
            else:
                mask, pixels, code = _shape_object(rng, size)
                objects.append((mask, pixels, code, -1))
        # which objects stay visible enough once the later ones are on top
        order = np.zeros((size, size), dtype=np.int32)
        for k, (mask, *_rest) in enumerate(objects, start=1):
            order[mask] = k
        areas = np.bincount(order.ravel(), minlength=len(objects) + 1)
        kept = [obj for k, obj in enumerate(objects, start=1) if areas[k] >= min_area]
        if not kept:
            continue
        labels = np.zeros((size, size), dtype=np.uint8)
        for k, (mask, pixels, _code, _item) in enumerate(kept, start=1):
            labels[mask] = k
            image[mask] = pixels[mask]
        pixels8 = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        return pixels8, labels, [(code, item) for _m, _p, code, item in kept]
    raise ProtegeError(
        f"no object of {_ATTEMPTS} tries stayed at least min_area={min_area} px visible in a "
        f"{size}x{size} composite; lower `min_area` (default: 0.5 % of size², at least 16)"
    )


def _fashion_images(split: str, root: str | Path | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The Fashion-MNIST images a split's composites draw from, and the item range of its pool."""
    from . import fashion_mnist as fm

    try:
        arrays = fm.read_arrays(root)
    except ProtegeError as e:
        raise ProtegeError(f"{e}\nOr draw shapes only: kinds: [shapes]") from None
    if split == "test":
        return arrays.test_images, (0, len(arrays.test_images))
    images = arrays.train_images
    cut = min(_FM_VAL_START, len(images) * 5 // 6)  # the real files: 50,000; small test sets: 5/6
    if cut < 1 or cut >= len(images):
        raise ProtegeError(f"Fashion-MNIST in {arrays.directory} has too few train images ({len(images)})")
    return images, ((0, cut) if split == "train" else (cut, len(images)))


def _default_min_area(size: int) -> int:
    return max(16, math.ceil(0.005 * size * size))


class SegmentationImages(Dataset[dict[str, Any]]):
    """``n`` deterministic composites with exact instance masks (see the module docstring).

    Generated once, at construction (about 5 ms an image at S = 128), and stored as uint8 images
    ``images`` (n, S, S, 3) and uint8 label maps ``labels`` (n, S, S). Image ``i`` depends only on
    ``(seed, split, i)`` and the arguments, not on ``n`` or on other images.

    Args:
        n: number of composites.
        size: side ``S`` in pixels.
        seed: non-negative seed.
        split: ``"train"``, ``"val"`` or ``"test"``: the Fashion-MNIST pool (train items
            0-49,999, train items 50,000-59,999, test items) and part of the seed.
        max_objects: at most this many objects per image (1-255; at least one is kept).
        kinds: the object kinds, a non-empty subset of :data:`KINDS`.
        min_area: objects with fewer visible pixels are removed; default 0.5 % of S², at least 16.
        root: where to look for Fashion-MNIST first (:func:`protege.data.fashion_mnist.find_dir`).

    Raises:
        ProtegeError: a bad argument, or ``kinds`` holds ``"fashion"`` and its files are missing.
    """

    def __init__(
        self,
        n: int,
        size: int = 128,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 4,
        kinds: Sequence[str] = KINDS,
        min_area: int | None = None,
        root: str | Path | None = None,
    ) -> None:
        kinds = _kinds(kinds)
        if split not in _SPLIT_CODES:
            raise unknown("split", split, _SPLIT_CODES)
        for name, value, low in (("n", n, 1), ("size", size, 16), ("max_objects", max_objects, 1)):
            _check_int(name, value, low)
        if max_objects > 255:
            raise ProtegeError(f"max_objects must be at most 255 (labels are uint8), got {max_objects}")
        _check_int("seed", seed, 0)
        min_area = _default_min_area(size) if min_area is None else min_area
        _check_int("min_area", min_area, 1)
        items, pool = _fashion_images(split, root) if "fashion" in kinds else (None, (0, 0))
        self.size, self.seed, self.split = int(size), int(seed), split
        self.max_objects, self.kinds, self.min_area = int(max_objects), kinds, int(min_area)
        self.textures = tuple(name for name, _ in _textures())
        self.fashion_pool = pool
        self.images = np.zeros((n, size, size, 3), dtype=np.uint8)
        self.labels = np.zeros((n, size, size), dtype=np.uint8)
        #: per image and label 1..K: the object's kind code (0 none, 1 fashion, 2.. a shape) and
        #: its Fashion-MNIST item (in the train or, for ``split="test"``, the test images; -1 else)
        self.object_kinds = np.zeros((n, max_objects), dtype=np.uint8)
        self.object_items = np.full((n, max_objects), -1, dtype=np.int32)
        for i in range(n):
            rng = np.random.default_rng([self.seed, _SPLIT_CODES[split], i])
            image, labels, objs = _composite(rng, size, kinds, max_objects, self.min_area, items, pool)
            self.images[i], self.labels[i] = image, labels
            for k, (code, item) in enumerate(objs):
                self.object_kinds[i, k], self.object_items[i, k] = code, item

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float() / 255.0
        return {
            "image": image,
            "instances": torch.from_numpy(self.labels[index].astype(np.int64)),
            "index": int(index),
        }

    def objects(self, index: int) -> list[tuple[str, int]]:
        """Image ``index``'s objects, label 1 first: (``"fashion"`` or a :data:`SHAPES` name,
        Fashion-MNIST item or -1)."""
        return [
            (_OBJECT_NAMES[int(code)], int(item))
            for code, item in zip(self.object_kinds[index], self.object_items[index])
            if code
        ]


def collate_segmentation(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch items for a :class:`torch.utils.data.DataLoader`: ``{"image": (B, 3, S, S),
    "instances": int64 (B, S, S), "index": int64 (B,)}``."""
    return {
        "image": torch.stack([item["image"] for item in items]),
        "instances": torch.stack([torch.as_tensor(item["instances"]).long() for item in items]),
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
    }


# ----------------------------------------------------------------------------------- folder data

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MASK_SUFFIX = ".masks.png"


def letterbox(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longer side is ``size`` and pad bottom/right to a square, like SAM's
    ``ResizeLongestSide`` and ``Sam.preprocess``.

    Args:
        image: uint8 (H, W, 3).
        labels: integer label map (H, W).
        size: the square's side.

    Returns:
        float32 (3, size, size) in [0, 1] (bilinear; the padding is :data:`SAM_PIXEL_MEAN`, what SAM's
        zero padding after normalisation is), and an int64 (size, size) label map (nearest; padding 0).
    """
    h, w = labels.shape
    scale = size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)  # ResizeLongestSide.get_preprocess_shape
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    out = np.empty((size, size, 3), dtype=np.float32)
    out[:] = np.asarray(SAM_PIXEL_MEAN, dtype=np.float32)
    out[:nh, :nw] = resized.astype(np.float32) / 255.0
    # nearest neighbour on the label values themselves (PIL's "I" mode holds int32)
    small = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((nw, nh), Image.Resampling.NEAREST))
    lab = np.zeros((size, size), dtype=np.int64)
    lab[:nh, :nw] = small
    return np.ascontiguousarray(out.transpose(2, 0, 1)), lab


def _compact(labels: np.ndarray) -> np.ndarray:
    """Relabel a label map's objects 1..K in the order of their ids (0 stays background)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        return (inverse.reshape(labels.shape) + 1).astype(np.int64)
    return inverse.reshape(labels.shape).astype(np.int64)


def _read_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image_file, mask_file = path, path.with_name(path.stem + _MASK_SUFFIX)
    try:
        with Image.open(image_file) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(mask_file) as im:
            labels = np.asarray(im)
    except (OSError, ValueError) as e:
        raise ProtegeError(f"cannot read {image_file} or its mask {mask_file}: {e}") from None
    return image, labels


def _check_pair(path: Path) -> None:
    """Check an image and its mask without decoding them: both exist, are images, agree in size."""
    mask_file = path.with_name(path.stem + _MASK_SUFFIX)
    if not mask_file.is_file():
        raise ProtegeError(
            f"{path} has no mask {mask_file.name}: save its instance label map there (a single-channel "
            "PNG, 0 = background, 1..K = objects), or move the image out of the folder"
        )
    sizes = []
    for file in (path, mask_file):
        try:
            with Image.open(file) as im:
                sizes.append(im.size)
                mode = im.mode
        except (OSError, ValueError) as e:
            raise ProtegeError(f"{file} is not an image PIL can read: {e}") from None
    if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise ProtegeError(
            f"{mask_file} is a {mode} image; save the instance label map as a single-channel PNG "
            "(mode L, I;16 or I: 0 = background, 1..K = objects)"
        )
    if sizes[0] != sizes[1]:
        raise ProtegeError(
            f"{path} is {sizes[0][0]}x{sizes[0][1]} but its mask {mask_file.name} is "
            f"{sizes[1][0]}x{sizes[1][1]}; they must be the same size"
        )


def _image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ProtegeError(f"segmentation folder not found: {directory}")
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.endswith(_MASK_SUFFIX)
    )
    if not files:
        raise ProtegeError(
            f"{directory} holds no images (*.jpg, *.jpeg, *.png, each with a <stem>{_MASK_SUFFIX} next to it)"
        )
    for path in files:
        _check_pair(path)
    return files


class SegmentationFolder(Dataset[dict[str, Any]]):
    """Images with instance label maps on disk: ``<stem>.jpg|.jpeg|.png`` and ``<stem>.masks.png``.

    Every pair is checked at construction (mask present, both readable images, same size, a
    single-channel mask; ``check=False`` skips that for files checked already) and decoded on access, letterboxed to ``size`` (:func:`letterbox`), with its
    objects relabelled 1..K (ids that vanish in the resize are dropped).

    Raises:
        ProtegeError: a missing mask, an unreadable file, a size mismatch, a colour mask.
    """

    def __init__(self, files: Sequence[Path], size: int, check: bool = True) -> None:
        _check_int("size", size, 16)
        for path in files if check else ():
            _check_pair(Path(path))
        self.files = [Path(p) for p in files]
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, labels = _read_pair(self.files[index])
        x, lab = letterbox(image, labels.astype(np.int64), self.size)
        return {
            "image": torch.from_numpy(x),
            "instances": torch.from_numpy(_compact(lab)),
            "index": int(index),
        }


# ---------------------------------------------------------------------------------------- splits

_COMPOSITE_OPTIONS = {"source", "size", "train", "val", "test", "max_objects", "kinds", "min_area", "root"}
_FOLDER_OPTIONS = {"source", "size", "root", "val_fraction", "test_fraction"}


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ProtegeError(f"option `{name}` must be an integer of at least {low}, got {value!r}")
    return int(value)


def _kinds(kinds: Any) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [kinds]
    if not isinstance(kinds, Sequence) or not kinds:
        raise ProtegeError(f"option `kinds` must be a non-empty list of {', '.join(KINDS)}, got {kinds!r}")
    for kind in kinds:
        if kind not in KINDS:
            raise unknown("object kind", str(kind), KINDS)
    return tuple(dict.fromkeys(str(k) for k in kinds))


def _fraction(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ProtegeError(f"option `{key}` must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_keys(options: Mapping[str, Any], allowed: set[str], source: str) -> None:
    for key in options:
        if key not in allowed:
            raise ProtegeError(
                f"unknown option {key!r} for segmentation source {source!r}; valid: {', '.join(sorted(allowed))}"
            )


def load_segmentation_splits(options: Mapping[str, Any], seed: int) -> DataSplits:
    """Promptable-segmentation train/val/test splits.

    ``source: composites`` (the default; :class:`SegmentationImages`), options: ``size`` (128),
    ``train`` (2000), ``val`` (200), ``test`` (500; 0 for none), ``max_objects`` (4), ``kinds``
    (``[fashion, shapes]``), ``min_area`` (pixels; 0.5 % of size², at least 16), ``root`` (where
    Fashion-MNIST is looked for first).

    ``source: folder`` (:class:`SegmentationFolder`), options: ``root`` (required), ``size`` (128),
    ``val_fraction`` (0.1), ``test_fraction`` (0.1). With ``root/train`` present the splits are
    ``root/train``, ``root/val`` and ``root/test`` (val carved from train by ``val_fraction`` when
    ``root/val`` is missing; no test split when ``root/test`` is); otherwise the images of ``root``
    are shuffled with ``seed`` and split by the fractions.

    Returns:
        :class:`DataSplits` of dict items, ``num_classes=1`` (``"object"``), ``in_chans=3``,
        ``input_size=size``, no normalisation (images in [0, 1]).

    Raises:
        ProtegeError: an unknown option or source, a bad value, missing files.
    """
    options = dict(options)
    source = options.get("source", "composites")
    _check_int("seed", seed, 0)
    if source == "folder":
        return _folder_splits(options, seed)
    if source != "composites":
        raise unknown("segmentation source", str(source), ("composites", "folder"))
    _check_keys(options, _COMPOSITE_OPTIONS, source)
    size = _check_int("size", options.get("size", 128), 16)
    counts = {k: _check_int(k, options.get(k, d), 1) for k, d in (("train", 2000), ("val", 200))}
    counts["test"] = _check_int("test", options.get("test", 500), 0)
    max_objects = _check_int("max_objects", options.get("max_objects", 4), 1)
    kinds = _kinds(options.get("kinds", list(KINDS)))
    min_area = _check_int("min_area", options.get("min_area", _default_min_area(size)), 1)
    root = options.get("root")
    common = {
        "size": size,
        "seed": seed,
        "max_objects": max_objects,
        "kinds": kinds,
        "min_area": min_area,
        "root": root,
    }
    parts = {
        split: SegmentationImages(count, split=split, **common) if count else None
        for split, count in counts.items()
    }
    train = parts["train"]
    assert train is not None and parts["val"] is not None
    return DataSplits(
        train=train,
        val=parts["val"],
        test=parts["test"],
        num_classes=1,
        in_chans=3,
        input_size=size,
        class_names=["object"],
        source="composites",
        options={
            **counts,
            "size": size,
            "seed": seed,
            "max_objects": max_objects,
            "kinds": list(kinds),
            "min_area": min_area,
            "textures": list(train.textures),
        },
    )


def _folder_splits(options: dict[str, Any], seed: int) -> DataSplits:
    _check_keys(options, _FOLDER_OPTIONS, "folder")
    if not options.get("root"):
        raise ProtegeError("segmentation source 'folder' needs the option `root` (the folder of images)")
    root = Path(str(options["root"])).expanduser()
    size = _check_int("size", options.get("size", 128), 16)
    val_fraction = _fraction(options, "val_fraction", 0.1)
    test_fraction = _fraction(options, "test_fraction", 0.1)
    rng = np.random.default_rng(seed)

    def carve(files: list[Path], fraction: float) -> tuple[list[Path], list[Path]]:
        order = rng.permutation(len(files))
        held = int(round(fraction * len(files)))
        if fraction > 0 and held == 0 and len(files) > 1:
            held = 1
        if held >= len(files):
            raise ProtegeError(f"{root}: {len(files)} images are too few to hold out {fraction:g} of them")
        return sorted(files[i] for i in order[held:]), sorted(files[i] for i in order[:held])

    if (root / "train").is_dir():
        train_files = _image_files(root / "train")
        if (root / "val").is_dir():
            val_files = _image_files(root / "val")
        else:
            train_files, val_files = carve(train_files, val_fraction)
        test_files = _image_files(root / "test") if (root / "test").is_dir() else []
    else:
        files = _image_files(root)
        rest, test_files = carve(files, test_fraction)
        train_files, val_files = carve(rest, val_fraction / (1 - test_fraction))
    if not val_files:
        raise ProtegeError(f"{root}: the val split is empty; raise `val_fraction` or add root/val")
    return DataSplits(
        train=SegmentationFolder(train_files, size, check=False),
        val=SegmentationFolder(val_files, size, check=False),
        test=SegmentationFolder(test_files, size, check=False) if test_files else None,
        num_classes=1,
        in_chans=3,
        input_size=size,
        class_names=["object"],
        source="folder",
        options={
            "root": str(root.resolve()),
            "size": size,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "files": {
                name: [str(p.relative_to(root)) for p in part]
                for name, part in (("train", train_files), ("val", val_files), ("test", test_files))
            },
        },
    )


# --------------------------------------------------------------------------------- prompt samplers


def _numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _like(values: np.ndarray, ref: Any) -> Array:
    """``values`` as a tensor on ``ref``'s device when ``ref`` is a tensor, else as numpy."""
    if isinstance(ref, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(values)).to(ref.device)
    return values


def _draw(count: int, n: int, gen: Gen, replace: bool) -> np.ndarray:
    """``n`` indices into ``range(count)`` from ``gen``: uniform, with or without replacement."""
    if isinstance(gen, torch.Generator):
        if replace:
            return torch.randint(count, (n,), generator=gen).numpy()
        return torch.randperm(count, generator=gen)[:n].numpy()
    if isinstance(gen, np.random.Generator):
        return gen.choice(count, size=n, replace=replace) if not replace else gen.integers(count, size=n)
    raise TypeError(f"gen must be a numpy.random.Generator or a torch.Generator, not {type(gen).__name__}")


def _normal(n: int, gen: Gen) -> np.ndarray:
    if isinstance(gen, torch.Generator):
        return torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    if isinstance(gen, np.random.Generator):
        return gen.standard_normal(n)
    raise TypeError(f"gen must be a numpy.random.Generator or a torch.Generator, not {type(gen).__name__}")


def _centres(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pixel (row, col) pairs as float32 ``(x, y)`` points at pixel centres."""
    return np.stack([cols + 0.5, rows + 0.5], axis=-1).astype(np.float32)


def instance_masks(label_map: Array) -> Array:
    """Boolean masks ``(K, H, W)``, one per object id present in ``label_map`` (ids > 0, ascending:
    for a compact map, mask ``k`` is label ``k + 1``). Same kind (numpy/torch) as the input."""
    if isinstance(label_map, torch.Tensor):
        ids = torch.unique(label_map)
        ids = ids[ids > 0]
        return label_map[None] == ids[:, None, None]
    label_map = np.asarray(label_map)
    ids = np.unique(label_map)
    ids = ids[ids > 0]
    return label_map[None] == ids[:, None, None]


def interior_point(mask: Array) -> tuple[float, float]:
    """The mask pixel farthest from its boundary, as ``(x, y)`` at the pixel centre.

    Euclidean distance transform of the zero-padded mask (so the image edge counts as boundary),
    as SAM's and RITM's evaluation choose the first click. Ties (e.g. along a rectangle's long
    axis) go to the tied pixel nearest their mean, so a rectangle gives its centre.

    Raises:
        ValueError: the mask is empty.
    """
    from scipy.ndimage import distance_transform_edt

    m = _numpy(mask).astype(bool)
    if m.ndim != 2 or not m.any():
        raise ValueError(
            f"interior_point needs a non-empty 2-D mask, got shape {m.shape}, {int(m.sum())} pixels"
        )
    dist = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(dist >= dist.max() - 1e-6)
    r_mean, c_mean = rows.mean(), cols.mean()
    best = int(np.argmin((rows - r_mean) ** 2 + (cols - c_mean) ** 2))
    return float(cols[best] + 0.5), float(rows[best] + 0.5)


def random_points(mask: Array, n: int, gen: Gen) -> Array:
    """``n`` points ``(n, 2)`` float32 drawn uniformly from the mask's pixels (pixel centres), without
    replacement, or with it when the mask has fewer than ``n`` pixels.

    Raises:
        ValueError: the mask is empty.
    """
    m = _numpy(mask).astype(bool)
    rows, cols = np.nonzero(m)
    if len(rows) == 0:
        raise ValueError("random_points needs a non-empty mask")
    pick = _draw(len(rows), int(n), gen, replace=len(rows) < n)
    return _like(_centres(rows[pick], cols[pick]), mask)


def mask_box(mask: Array, gen: Gen | None = None, noise: float = 0.0) -> Array:
    """The mask's tight box ``(4,)`` float32 ``(x0, y0, x1, y1)`` (``x1``/``y1`` exclusive edges).

    With ``noise > 0`` (and ``gen``), SAM's box augmentation (Kirillov et al., 2023, appendix A):
    each coordinate moves by a draw of N(0, (noise × the box's side)²), the side being its width for
    x and its height for y, at most 20 px either way; the box is then clipped to the image and kept
    at least one pixel wide and high.

    Raises:
        ValueError: the mask is empty, or ``noise > 0`` without ``gen``.
    """
    m = _numpy(mask).astype(bool)
    rows, cols = np.nonzero(m)
    if len(rows) == 0:
        raise ValueError("mask_box needs a non-empty mask")
    box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)
    if noise > 0:
        if gen is None:
            raise ValueError("mask_box with noise needs a generator `gen`")
        w, h = box[2] - box[0], box[3] - box[1]
        shift = _normal(4, gen) * noise * np.array([w, h, w, h])
        box = box + np.clip(shift, -20.0, 20.0)
        height, width = m.shape
        x0, x1 = np.clip(np.sort(box[[0, 2]]), 0, width)
        y0, y1 = np.clip(np.sort(box[[1, 3]]), 0, height)
        x0, y0 = min(x0, width - 1.0), min(y0, height - 1.0)
        box = np.array([x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0)])
    return _like(box.astype(np.float32), mask)


def error_point(pred: Array, ref: Array, gen: Gen) -> tuple[tuple[float, float], int] | None:
    """A correction click: a point drawn uniformly from where ``pred`` and ``ref`` disagree.

    The label is 1 where ``ref`` is foreground (a missed pixel: a positive click), 0 where it is
    background (a false positive: a negative click), as SAM's and TinySAM's iterative training and
    evaluation add points. ``None`` when the masks agree everywhere.
    """
    p, r = _numpy(pred).astype(bool), _numpy(ref).astype(bool)
    if p.shape != r.shape:
        raise ValueError(f"pred {p.shape} and ref {r.shape} differ in shape")
    rows, cols = np.nonzero(p ^ r)
    if len(rows) == 0:
        return None
    i = int(_draw(len(rows), 1, gen, replace=True)[0])
    return (float(cols[i] + 0.5), float(rows[i] + 0.5)), int(r[rows[i], cols[i]])


def point_grid(n_per_side: int, size: int) -> np.ndarray:
    """SAM's ``build_point_grid(n_per_side)`` in pixels of a ``size`` image: float32 ``(n², 2)``
    ``(x, y)`` centres of an n × n grid of cells, x varying fastest."""
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be positive, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    one_side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(one_side[None, :], (n_per_side, 1))
    ys = np.tile(one_side[:, None], (1, n_per_side))
    return (np.stack([xs, ys], axis=-1).reshape(-1, 2) * size).astype(np.float32)


def error_points(pred: torch.Tensor, ref: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One point per mask drawn uniformly from where ``pred`` and ``ref`` disagree.

    ``pred``, ``ref``: boolean ``(M, H, W)``. Returns ``(xy (M, 2), label (M,), found (M,))``: pixel
    centres ``(col + 0.5, row + 0.5)``, label 1 where ``ref`` is foreground there (a missed part) and 0
    where it is not (a false positive), ``found`` False for masks that agree everywhere (their point is
    meaningless). Batched form of :func:`error_point` (TinySAM's hard-prompt sampling draws one per prompt).
    """
    wrong = (pred != ref).flatten(1)
    found = wrong.any(1)
    weights = wrong.float()
    weights[~found] = 1.0  # any pixel: the draw is discarded
    flat = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    w = ref.shape[-1]
    rows, cols = flat // w, flat % w
    xy = torch.stack([cols.float() + 0.5, rows.float() + 0.5], dim=1)
    label = ref.flatten(1).gather(1, flat[:, None]).squeeze(1).long()
    return xy, label, found
