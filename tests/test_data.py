"""Tests of protege.data: bundled sources, image folders, HuggingFace datasets, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from protege.data import DataSplits, build_transforms, list_recipes, list_sources, load_data
from protege.errors import ProtegeError


@pytest.fixture(scope="module")
def mnist() -> DataSplits:
    return load_data("mnist5k")


def _hashes(ds: torch.utils.data.Dataset) -> set[str]:
    return {hashlib.sha256(ds[i][0].numpy().tobytes()).hexdigest() for i in range(len(ds))}  # type: ignore[arg-type]


def _labels(ds: torch.utils.data.Dataset) -> np.ndarray:
    return np.array([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


def test_list_sources() -> None:
    names = list_sources()
    for name in ("mnist5k", "digits", "imagefolder", "hf", "torchvision:CIFAR10", "torchvision:SVHN"):
        assert name in names


def test_mnist5k_sizes_and_metadata(mnist: DataSplits) -> None:
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    assert (mnist.num_classes, mnist.in_chans, mnist.input_size) == (10, 1, 28)
    assert mnist.class_names == [str(i) for i in range(10)]
    x, y = mnist.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.as_tensor(y).dtype == torch.int64


def test_mnist5k_stratified(mnist: DataSplits) -> None:
    assert np.bincount(_labels(mnist.train), minlength=10).tolist() == [350] * 10
    assert np.bincount(_labels(mnist.val), minlength=10).tolist() == [50] * 10
    assert np.bincount(_labels(mnist.test), minlength=10).tolist() == [100] * 10


def test_mnist5k_splits_disjoint(mnist: DataSplits) -> None:
    train, val, test = _hashes(mnist.train), _hashes(mnist.val), _hashes(mnist.test)
    assert not train & val and not train & test and not val & test


def test_mnist5k_deterministic_and_normalised(mnist: DataSplits) -> None:
    again = load_data("mnist5k", seed=123)  # the split is fixed: seed does not change it
    for a, b in ((mnist.train, again.train), (mnist.val, again.val), (mnist.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)  # type: ignore[union-attr]
    images = mnist.train.images  # type: ignore[attr-defined]
    assert abs(float(images.mean())) < 0.05
    assert abs(float(images.std()) - 1.0) < 0.1
    assert mnist.fingerprint() == again.fingerprint()


def test_mnist5k_augment_shifts_train_only(mnist: DataSplits) -> None:
    aug = load_data("mnist5k", transforms="augment")
    torch.manual_seed(0)
    x0 = aug.train[0][0]
    assert x0.shape == (1, 28, 28)
    assert any(not torch.equal(aug.train[0][0], x0) for _ in range(20))
    assert torch.equal(aug.val[0][0], mnist.val[0][0])
    assert aug.fingerprint() != mnist.fingerprint()
    batch_x, batch_y = next(iter(DataLoader(aug.train, batch_size=8)))
    assert batch_x.shape == (8, 1, 28, 28) and batch_y.dtype == torch.int64


def test_digits_sizes_and_resize() -> None:
    d = load_data("digits")
    assert (len(d.train), len(d.val), len(d.test)) == (1257, 180, 360)
    assert d.input_size == 8 and d.train[0][0].shape == (1, 8, 8)
    assert abs(float(d.train.images.mean())) < 1e-4  # type: ignore[attr-defined]
    big = load_data("digits", size=16)
    assert big.input_size == 16 and big.train[0][0].shape == (1, 16, 16)
    assert big.fingerprint() != d.fingerprint()


def test_mnist5k_resize_averages_areas() -> None:
    full = load_data("mnist5k")
    small = load_data("mnist5k", size=14)
    assert small.input_size == 14 and small.test[0][0].shape == (1, 14, 14)
    assert small.options["size"] == 14 and small.fingerprint() != full.fingerprint()
    # 28 -> 14 is the mean of each 2x2 block of pixels (normalisation is affine, so it commutes)
    x = full.test[3][0]
    expected = x.reshape(1, 14, 2, 14, 2).mean(dim=(2, 4))
    assert torch.allclose(small.test[3][0], expected, atol=1e-5)
    assert int(small.test[3][1]) == int(full.test[3][1])


def test_bundled_rejects_pil_recipe() -> None:
    with pytest.raises(ProtegeError, match="augment"):
        load_data("mnist5k", transforms="cifar")


def _write_folder(root: Path, split: str, n: int, size: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(len(split))
    for cls, colour in (("cat", 0), ("dog", 2)):
        folder = root / split / cls
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[..., colour] += 180
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    _write_folder(tmp_path, "train", 6)
    _write_folder(tmp_path, "test", 2)
    d = load_data("imagefolder", root=str(tmp_path), val_fraction=0.3, seed=1)
    assert d.class_names == ["cat", "dog"] and d.num_classes == 2 and d.in_chans == 3
    assert d.input_size == 12
    assert (len(d.train), len(d.val), len(d.test)) == (8, 4, 4)  # type: ignore[arg-type]
    assert sorted(_labels(d.val).tolist()) == [0, 0, 1, 1]  # stratified carve
    x, y = d.val[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and isinstance(y, int)
    assert sorted(_labels(d.test).tolist()) == [0, 0, 1, 1]
    again = load_data("imagefolder", root=str(tmp_path), val_fraction=0.3, seed=1)
    assert again.fingerprint() == d.fingerprint()
    small = load_data("imagefolder", root=str(tmp_path), size=8, transforms="cifar")
    assert small.train[0][0].shape == (3, 8, 8)
    xb, yb = next(iter(DataLoader(small.train, batch_size=4)))
    assert xb.shape == (4, 3, 8, 8) and yb.dtype == torch.int64


def test_hf_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def part(n: int) -> object:
        images = [rng.integers(0, 255, (10, 10), dtype=np.uint8) for _ in range(n)]
        return datasets.Dataset.from_dict(
            {"image": images, "label": [i % 3 for i in range(n)]},
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "label": datasets.ClassLabel(names=["a", "b", "c"]),
                }
            ),
        )

    datasets.DatasetDict({"train": part(12), "test": part(6)}).save_to_disk(str(tmp_path / "ds"))
    d = load_data("hf", root=str(tmp_path / "ds"), val_fraction=0.25)
    assert d.class_names == ["a", "b", "c"] and d.num_classes == 3
    assert (len(d.train), len(d.val), len(d.test)) == (9, 3, 6)  # type: ignore[arg-type]
    assert sorted(_labels(d.val).tolist()) == [0, 1, 2]
    x, _ = d.train[0]
    assert x.shape == (1, 10, 10) and x.dtype == torch.float32
    assert d.in_chans == 1 and d.input_size == 10


def test_hf_array_column_single_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (20, 6, 6, 3)).tolist()
    ds = datasets.Dataset.from_dict({"img": pixels, "y": [i % 2 for i in range(20)]})
    ds.save_to_disk(str(tmp_path / "one"))
    d = load_data("hf", root=str(tmp_path / "one"), image_column="img", label_column="y")
    assert (len(d.train), len(d.val), len(d.test)) == (14, 2, 4)  # type: ignore[arg-type]
    assert d.class_names == ["0", "1"] and d.in_chans == 3
    assert d.train[0][0].shape == (3, 6, 6)
    with pytest.raises(ProtegeError, match="label_column"):
        load_data("hf", root=str(tmp_path / "one"), image_column="img")


def test_torchvision_missing_root() -> None:
    with pytest.raises(ProtegeError, match="download"):
        load_data("torchvision:CIFAR10")


def test_torchvision_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ProtegeError, match="download"):
        load_data("torchvision:CIFAR10", root=str(tmp_path))
    with pytest.raises(ProtegeError, match="data root not found"):
        load_data("torchvision:MNIST", root=str(tmp_path / "nope"))


def test_unknown_source_and_option() -> None:
    with pytest.raises(ProtegeError, match="mnist5k"):
        load_data("mnist5")
    with pytest.raises(ProtegeError, match="CIFAR10"):
        load_data("torchvision:CIFAR11")
    with pytest.raises(ProtegeError, match="download"):
        load_data("torchvision:cifar10", root="/nonexistent/protege-data")
    with pytest.raises(ProtegeError, match="size"):
        load_data("digits", sise=16)


def test_root_errors(tmp_path: Path) -> None:
    with pytest.raises(ProtegeError, match="root"):
        load_data("imagefolder")
    with pytest.raises(ProtegeError, match="data root not found"):
        load_data("imagefolder", root=str(tmp_path / "missing"))
    with pytest.raises(ProtegeError, match="train/"):
        load_data("imagefolder", root=str(tmp_path))


def test_fingerprint_differs_between_sources(mnist: DataSplits) -> None:
    digits = load_data("digits")
    assert len(mnist.fingerprint()) == 64
    assert mnist.fingerprint() != digits.fingerprint()
    assert digits.fingerprint() == load_data("digits").fingerprint()


@pytest.mark.parametrize("recipe", list_recipes())
def test_build_transforms_recipes(recipe: str) -> None:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8))
    for train in (True, False):
        out = build_transforms(recipe, train, 32, resize=True)(img)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    with pytest.raises(ProtegeError):
        build_transforms("cifar10", True, 32)


def test_imagefolder_val_dir_keeps_train_classes(tmp_path: Path) -> None:
    import pickle

    _write_folder(tmp_path, "train", 3)
    (tmp_path / "val" / "dog").mkdir(parents=True)  # val holds one class only
    for f in (tmp_path / "train" / "dog").iterdir():
        (tmp_path / "val" / "dog" / f.name).write_bytes(f.read_bytes())
    d = load_data("imagefolder", root=str(tmp_path), in_chans=1)
    assert d.test is None and (len(d.train), len(d.val)) == (6, 3)  # type: ignore[arg-type]
    assert _labels(d.val).tolist() == [1, 1, 1]  # "dog" keeps its train index
    assert d.in_chans == 1 and d.val[0][0].shape == (1, 12, 12)
    restored = pickle.loads(pickle.dumps(d.val))  # picklable for DataLoader workers
    assert torch.equal(restored[0][0], d.val[0][0])
    (tmp_path / "test" / "bird").mkdir(parents=True)
    with pytest.raises(ProtegeError, match="bird"):
        load_data("imagefolder", root=str(tmp_path))


def _write_fake_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    """Tiny files in the torchvision MNIST layout (idx format), so no download is needed."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_torchvision_local_files(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path)
    d = load_data("torchvision:MNIST", root=str(tmp_path), val_fraction=0.25)
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 20)  # type: ignore[arg-type]
    assert sorted(_labels(d.val).tolist()) == list(range(10))
    assert (d.num_classes, d.in_chans, d.input_size, d.mean) == (10, 1, 28, (0.1307,))
    x, y = d.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    big = load_data("torchvision:MNIST", root=str(tmp_path), transforms="imagenet", size=64)
    assert big.input_size == 64 and big.train[0][0].shape == (1, 64, 64)
