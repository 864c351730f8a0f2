"""Fashion-MNIST's four idx files: where they are looked for, and how they are read.

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, MIT licence): 70,000 28x28 grayscale photos of
Zalando articles in 10 classes, 60,000 train and 10,000 test (``t10k``). The ``fashion-mnist``
source (:mod:`protege.data.sources`) builds its splits on :func:`read_arrays`.

The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not. An idx
file is a big-endian header (magic number ``0x0801`` labels / ``0x0803`` images, then one 32-bit
size per dimension: 8 bytes for labels, 16 for images) followed by unsigned bytes.

Search order (:func:`search_dirs`), the first folder holding all four files wins:

1. ``root``, when given, and torchvision's layout under it (``root/FashionMNIST/raw``, where
   ``download: true`` puts them);
2. :data:`SYSTEM_DIR`, where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs them
   (``sudo apt-get install dataset-fashion-mnist``);
3. protege's cache, :func:`cache_dir`: ``$PROTEGE_CACHE/fashion-mnist``, by default
   ``~/.cache/protege/fashion-mnist`` (``make data`` unpacks the Debian package there, no root
   needed), then torchvision's layout under it (where ``download: true`` without a ``root``
   puts them).

Decoded arrays are kept in memory (per folder and file version), so a second load in the same
process costs nothing; decoding all four files takes about half a second.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ProtegeError

__all__ = [
    "CLASS_NAMES",
    "FILES",
    "SYSTEM_DIR",
    "FashionArrays",
    "cache_dir",
    "find_dir",
    "read_arrays",
    "read_idx",
    "search_dirs",
]

#: the class names, in label order (the dataset's own).
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: the four files (without ``.gz``), by role.
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: where the Debian package ``dataset-fashion-mnist`` installs the files.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_MAGIC = {1: 0x0801, 3: 0x0803}  # idx1: labels, idx3: images (unsigned byte data)


@dataclass(frozen=True)
class FashionArrays:
    """The decoded files: uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)``, read-only."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    directory: Path


def cache_dir() -> Path:
    """protege's cache folder for the files: ``$PROTEGE_CACHE/fashion-mnist``, by default
    ``~/.cache/protege/fashion-mnist``."""
    base = os.environ.get("PROTEGE_CACHE") or Path.home() / ".cache" / "protege"
    return Path(base).expanduser() / "fashion-mnist"


def search_dirs(root: str | Path | None = None) -> list[Path]:
    """The folders looked in, in order (see the module docstring)."""
    tv = ("FashionMNIST", "raw")  # torchvision's layout, where `download: true` puts the files
    dirs: list[Path] = []
    if root is not None and str(root) != "":
        r = Path(root).expanduser()
        dirs += [r, r.joinpath(*tv)]
    return [*dirs, SYSTEM_DIR, cache_dir(), cache_dir().joinpath(*tv)]


def _file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def find_dir(root: str | Path | None = None) -> Path:
    """The first folder of :func:`search_dirs` that holds all four files.

    Raises:
        ProtegeError: none does; the message lists where it looked and what to run.
    """
    dirs = search_dirs(root)
    partial: list[str] = []
    for d in dirs:
        missing = [n for n in FILES.values() if _file(d, n) is None]
        if not missing:
            return d
        if len(missing) < len(FILES):
            partial.append(f"{d} lacks {', '.join(f'{n}.gz' for n in missing)}")
    raise ProtegeError(missing_message(dirs, partial))


def missing_message(dirs: list[Path], partial: list[str] | None = None) -> str:
    """What :func:`find_dir` says when no folder has the files: where it looked, what to run."""
    names = ", ".join(f"{n}.gz" for n in FILES.values())
    looked = "\n".join(f"  {d}" for d in dirs)
    lacks = "".join(f"\n  ({p})" for p in partial or [])
    cache = cache_dir()
    return (
        f"Fashion-MNIST files not found. Looked for {names} in:\n{looked}{lacks}\n"
        "Get them with one of:\n"
        "  make data    (in a protege checkout: unpacks the Debian package dataset-fashion-mnist into "
        f"{cache}, no root needed)\n"
        "  sudo apt-get install dataset-fashion-mnist    (Debian/Ubuntu: installs them into "
        f"{SYSTEM_DIR})\n"
        "  apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb pkg && "
        f"mkdir -p {cache} && cp pkg{SYSTEM_DIR}/*.gz {cache}/\n"
        "  download: true in the data config (load_data(..., download=True)): torchvision downloads "
        "them from the internet into `root` (default: the cache folder)\n"
        "or point `root` at a folder holding the four files."
    )


def read_idx(path: str | Path, dims: int) -> np.ndarray:
    """Decode one idx file of unsigned bytes (gzipped when its name ends in ``.gz``).

    Args:
        path: the file.
        dims: 1 for a labels file (header: 8 bytes), 3 for an images file (16 bytes).

    Raises:
        ProtegeError: the header is not an idx header of that kind, or the data is short.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ProtegeError(f"cannot read {path}: {e}") from None
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ProtegeError(f"{path} is not an idx file: {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _MAGIC[dims]:
        raise ProtegeError(
            f"{path} is not an idx{dims} file of unsigned bytes: magic number {magic:#06x}, expected "
            f"{_MAGIC[dims]:#06x}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ProtegeError(f"{path}: header says {shape}, but it holds {data.size} values")
    return data.reshape(shape)


def read_arrays(root: str | Path | None = None) -> FashionArrays:
    """The four files of :func:`find_dir`, decoded (cached in memory until a file changes).

    Raises:
        ProtegeError: no folder has the files, a file is damaged, or the counts disagree.
    """
    directory = find_dir(root)
    paths = tuple(str(_file(directory, n)) for n in FILES.values())
    versions = tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)
    return _decode(str(directory), paths, versions)


@lru_cache(maxsize=2)
def _decode(directory: str, paths: tuple[str, ...], versions: tuple[tuple[int, int], ...]) -> FashionArrays:
    del versions  # part of the cache key only
    train_x, train_y, test_x, test_y = (read_idx(p, 3 if "images" in Path(p).name else 1) for p in paths)
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        if len(images) != len(labels):
            raise ProtegeError(f"Fashion-MNIST in {directory}: {len(images)} images but {len(labels)} labels")
        if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
            raise ProtegeError(f"Fashion-MNIST in {directory}: label {int(labels.max())} is not in 0-9")
    arrays = FashionArrays(
        train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), Path(directory)
    )
    for a in (arrays.train_images, arrays.train_labels, arrays.test_images, arrays.test_labels):
        a.setflags(write=False)
    return arrays
