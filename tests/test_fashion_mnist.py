"""The ``fashion-mnist`` source: idx parsing, search order, splits and options on a tiny fake set in
tmp; the real files (``make data``) only for their counts, and skipped when absent."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from protege.data import fashion_mnist as fm
from protege.data import load_data
from protege.data.sources import _TORCHVISION
from protege.errors import ProtegeError

MEAN, STD = _TORCHVISION["FashionMNIST"].mean[0], _TORCHVISION["FashionMNIST"].std[0]
N_TRAIN, N_TEST = 200, 50  # 20 / 5 per class


def _images(n: int, start: int) -> np.ndarray:
    """Image ``i`` is a gradient whose first pixel is ``(start + i) % 256``: offsets are visible."""
    x = (np.arange(784)[None, :] + np.arange(start, start + n)[:, None]) % 256
    return x.reshape(n, 28, 28).astype(np.uint8)


def _labels(n: int) -> np.ndarray:
    return (np.arange(n) * 7 % 10).astype(np.uint8)  # every class, interleaved


def _write_idx(path: Path, data: np.ndarray, gz: bool = True) -> None:
    magic = 0x0803 if data.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    raw = header + data.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_fake(folder: Path, gz: bool = True, skip: tuple[str, ...] = ()) -> Path:
    """A fake Fashion-MNIST: 200 train and 50 test images, correct idx headers."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train_images": _images(N_TRAIN, 0),
        "train_labels": _labels(N_TRAIN),
        "test_images": _images(N_TEST, 100),
        "test_labels": _labels(N_TEST),
    }
    for role, name in fm.FILES.items():
        if role not in skip:
            _write_idx(folder / name, data[role], gz)
    return folder


@pytest.fixture
def no_files(tmp_path, monkeypatch):
    """Empty system and cache folders: only what a test writes is found."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("PROTEGE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _pixels(x: torch.Tensor) -> np.ndarray:
    return np.rint((x.numpy() * STD + MEAN) * 255).astype(int)


def test_read_idx_headers_and_offsets(tmp_path):
    write_fake(tmp_path)
    images = fm.read_idx(tmp_path / "train-images-idx3-ubyte.gz", 3)
    labels = fm.read_idx(tmp_path / "train-labels-idx1-ubyte.gz", 1)
    assert images.shape == (N_TRAIN, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, _images(N_TRAIN, 0))  # offset 16: no header byte in the pixels
    assert np.array_equal(labels, _labels(N_TRAIN))  # offset 8
    with pytest.raises(ProtegeError, match="not an idx3 file"):
        fm.read_idx(tmp_path / "train-labels-idx1-ubyte.gz", 3)
    short = tmp_path / "short"
    short.write_bytes((0x0801).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x00\x01")
    with pytest.raises(ProtegeError, match="holds 2 values"):
        fm.read_idx(short, 1)


def test_splits_class_names_and_pixels(no_files):
    root = write_fake(no_files / "fm")
    data = load_data("fashion-mnist", root=str(root), val_fraction=0.1, seed=0)
    assert data.sizes() == {"train": 180, "val": 20, "test": 50}
    assert data.class_names == list(fm.CLASS_NAMES) and data.class_names[9] == "Ankle boot"
    assert (data.num_classes, data.in_chans, data.input_size) == (10, 1, 28)
    assert np.bincount(data.val.labels.numpy(), minlength=10).tolist() == [2] * 10  # stratified
    # train and val partition the 60k file; test is the t10k file, in order
    firsts = sorted(
        _pixels(data.train.images)[:, 0, 0, 0].tolist() + _pixels(data.val.images)[:, 0, 0, 0].tolist()
    )
    assert firsts == list(range(N_TRAIN))
    assert _pixels(data.test.images)[:, 0, 0, 0].tolist() == list(range(100, 100 + N_TEST))
    assert data.test.labels.tolist() == _labels(N_TEST).tolist()
    x, y = data.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and torch.as_tensor(y).dtype == torch.int64
    other = load_data("fashion-mnist", root=str(root), seed=1)
    assert not torch.equal(other.val.images, data.val.images)  # the holdout follows the seed
    assert other.fingerprint() != data.fingerprint()


def test_size_and_subsets(no_files):
    root = write_fake(no_files / "fm")
    data = load_data("fashion-mnist", root=str(root), size=14, train_size=50, val_size=10, test_size=20)
    assert data.sizes() == {"train": 50, "val": 10, "test": 20}
    assert data.input_size == 14 and data.train.images.shape[1:] == (1, 14, 14)
    assert np.bincount(data.train.labels.numpy(), minlength=10).tolist() == [5] * 10
    assert np.bincount(data.test.labels.numpy(), minlength=10).tolist() == [2] * 10
    # area downscaling: each 14x14 pixel is the mean of a 2x2 block
    full = load_data("fashion-mnist", root=str(root), train_size=50, val_size=10, test_size=20)
    pooled = torch.nn.functional.avg_pool2d(full.test.images, 2)
    assert torch.allclose(data.test.images, pooled, atol=1e-5)
    # the test subset is the same whatever the seed
    again = load_data("fashion-mnist", root=str(root), seed=3, test_size=20)
    assert torch.equal(again.test.labels, full.test.labels)
    assert data.options["train_size"] == 50 and data.options["size"] == 14
    aug = load_data("fashion-mnist", root=str(root), transforms="augment", train_size=50)
    assert aug.train.shift == 2 and aug.val.shift == 0
    with pytest.raises(ProtegeError, match="unknown option"):
        load_data("fashion-mnist", root=str(root), n_train=5)
    with pytest.raises(ProtegeError, match="positive integer"):
        load_data("fashion-mnist", root=str(root), train_size=0)


def test_search_order(no_files, monkeypatch):
    cache = write_fake(no_files / "cache" / "fashion-mnist")
    assert fm.find_dir() == cache
    system = write_fake(no_files / "system", gz=False)  # plain idx files are read too
    assert fm.find_dir() == system  # the Debian package's folder comes before the cache
    root = write_fake(no_files / "mine")
    assert fm.find_dir(root) == root
    tv = write_fake(no_files / "tv" / "FashionMNIST" / "raw")  # torchvision's layout under root
    assert fm.find_dir(no_files / "tv") == tv
    assert load_data("fashion-mnist").sizes()["test"] == N_TEST


def test_missing_files_say_what_to_run(no_files):
    write_fake(no_files / "cache" / "fashion-mnist", skip=("test_labels",))
    with pytest.raises(ProtegeError) as err:
        load_data("fashion-mnist", root=str(no_files / "empty"))
    text = str(err.value)
    for needle in (
        "make data",
        "apt-get install dataset-fashion-mnist",
        "apt-get download dataset-fashion-mnist",
        "download: true",
        str(no_files / "empty"),
        str(no_files / "system"),
        "lacks t10k-labels-idx1-ubyte.gz",
    ):
        assert needle in text, needle


def test_download_uses_torchvision_only_when_files_are_missing(no_files, monkeypatch):
    from protege.data import sources

    calls = []

    def fake_download(source, root, download, train):  # torchvision's downloader, offline
        calls.append((source, Path(root), download, train))
        write_fake(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(sources, "_torchvision_dataset", fake_download)
    data = load_data("fashion-mnist", download=True)
    cache = no_files / "cache" / "fashion-mnist"
    assert calls and calls[0][:3] == ("torchvision:FashionMNIST", cache, True)
    assert data.sizes()["test"] == N_TEST
    calls.clear()
    load_data("fashion-mnist", download=True)  # found now: nothing is downloaded
    assert calls == []


def test_real_files_counts():
    try:
        arrays = fm.read_arrays()
    except ProtegeError as e:
        pytest.skip(f"the real Fashion-MNIST files are not here: {e}")
    assert arrays.train_images.shape == (60000, 28, 28) and arrays.test_images.shape == (10000, 28, 28)
    assert np.bincount(arrays.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(arrays.test_labels, minlength=10).tolist() == [1000] * 10
    data = load_data("fashion-mnist", train_size=100, val_size=100, test_size=100)
    assert data.sizes() == {"train": 100, "val": 100, "test": 100}
    assert abs(float(data.test.images.mean())) < 0.3  # normalised with the set's own statistics
