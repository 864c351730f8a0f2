"""The shifted proxy pool (protege.data.pools, source ``shifted-pool``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protege.data import DataSplits, load_data, pools
from protege.data.pools import PARTS, generate_shifted_pool, part_counts, shifted_pool
from protege.errors import ProtegeError

SIZE = 1000


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pools")


@pytest.fixture(scope="module")
def pool_data(cache: Path) -> DataSplits:
    return load_data("shifted-pool", root=str(cache), size=SIZE)


@pytest.fixture(scope="module")
def mnist() -> DataSplits:
    return load_data("mnist5k")


def test_part_counts_largest_remainder() -> None:
    assert part_counts(6000) == {
        "digits": 1500,
        "rendered": 1500,
        "letters": 900,
        "shapes": 1200,
        "noise": 900,
    }
    # 10 * (1/3, 1/3, 1/3) = 3.33 each: the one left over goes to the earliest part
    assert part_counts(10, {"noise": 1, "digits": 1, "shapes": 1}) == {"digits": 4, "shapes": 3, "noise": 3}
    assert part_counts(7, {"letters": 2, "noise": 0}) == {"letters": 7}


@pytest.mark.parametrize(
    "parts, message",
    [
        ({"digit": 1.0}, "did you mean: digits"),
        ({"digits": -1.0}, "non-negative"),
        ({"digits": 0, "noise": 0}, "positive share"),
        ({"digits": "lots"}, "must be a number"),
        ([0.5, 0.5], "must map part names"),
    ],
)
def test_bad_parts(parts: object, message: str) -> None:
    with pytest.raises(ProtegeError, match=message):
        part_counts(100, parts)  # type: ignore[arg-type]


def test_bad_size_through_load_data(tmp_path: Path) -> None:
    with pytest.raises(ProtegeError, match="size"):
        load_data("shifted-pool", root=str(tmp_path), size=0)
    with pytest.raises(ProtegeError, match="unknown option"):
        load_data("shifted-pool", root=str(tmp_path), shares={"digits": 1})


def test_shapes_and_normalisation_match_mnist5k(pool_data: DataSplits, mnist: DataSplits) -> None:
    train = pool_data.train
    assert len(train) == SIZE and len(pool_data.val) == 0 and pool_data.test is None
    x, y = train[0]
    assert x.shape == mnist.train[0][0].shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert (pool_data.in_chans, pool_data.input_size, pool_data.num_classes) == (1, 28, 10)
    assert (pool_data.mean, pool_data.std) == (mnist.mean, mnist.std)
    images = train.images  # type: ignore[attr-defined]
    # same affine map from pixels: background 0 and full ink 255 land on mnist5k's extremes
    assert images.min().item() == pytest.approx(mnist.train.images.min().item(), abs=1e-6)  # type: ignore[attr-defined]
    assert images.max().item() == pytest.approx(mnist.train.images.max().item(), abs=1e-6)  # type: ignore[attr-defined]


def test_domain_tags_labels_and_proportions(pool_data: DataSplits) -> None:
    train = pool_data.train
    domains, labels = train.domains.numpy(), train.labels.numpy()  # type: ignore[attr-defined]
    assert train.domain_names == PARTS  # type: ignore[attr-defined]
    assert pool_data.val.domain_names == PARTS and len(pool_data.val.domains) == 0  # type: ignore[attr-defined]
    counts = {name: int((domains == i).sum()) for i, name in enumerate(PARTS)}
    assert (
        counts
        == part_counts(SIZE)
        == {"digits": 250, "rendered": 250, "letters": 150, "shapes": 200, "noise": 150}
    )
    in_dist = np.isin(domains, [PARTS.index("digits"), PARTS.index("rendered")])
    assert (labels[~in_dist] == -1).all()
    assert ((labels[in_dist] >= 0) & (labels[in_dist] <= 9)).all()
    assert len(np.unique(labels[in_dist])) == 10
    # shuffled: the parts are mixed, not in blocks
    assert len(np.unique(domains[:50])) == len(PARTS)
    # every image has ink (no empty frame that a generator failed to draw)
    assert (train.tensors[0].flatten(1).amax(1) > train.tensors[0].min()).all()  # type: ignore[attr-defined]


def test_no_sample_equals_an_mnist5k_image(pool_data: DataSplits, cache: Path) -> None:
    from protege.data.sources import _mnist5k_arrays

    X, _ = _mnist5k_arrays()
    mnist_rows = {row.tobytes() for row in np.rint(X).astype(np.uint8)}
    pool = shifted_pool(SIZE, 0, cache_dir=cache)  # the uint8 pixels of pool_data, from its cache
    pool_rows = {img.tobytes() for img in pool.images}
    assert len(pool_rows) == SIZE  # no repeats inside the pool either
    assert not pool_rows & mnist_rows


def test_digit_parts_are_digits_but_shifted(pool_data: DataSplits, mnist: DataSplits) -> None:
    """A 5-NN classifier fit on MNIST-5k train reads the in-distribution parts' true digits far
    above chance (the labels are right), but clearly worse than MNIST's own test split (shifted)."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(5).fit(mnist.train.images.flatten(1).numpy(), mnist.train.labels.numpy())  # type: ignore[attr-defined]
    test_acc = knn.score(mnist.test.images.flatten(1).numpy(), mnist.test.labels.numpy())  # type: ignore[union-attr]
    train = pool_data.train
    for name in ("digits", "rendered"):
        keep = train.domains == PARTS.index(name)  # type: ignore[attr-defined]
        acc = knn.score(train.images[keep].flatten(1).numpy(), train.labels[keep].numpy())  # type: ignore[attr-defined]
        assert 0.4 < acc < test_acc - 0.1, (name, acc, test_acc)


def test_deterministic_for_a_seed_and_parts_independent() -> None:
    a = generate_shifted_pool(60, seed=3)
    b = generate_shifted_pool(60, seed=3)
    c = generate_shifted_pool(60, seed=4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.domains, b.domains)
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    # a part's images depend on its own stream only: changing another part's share keeps them
    x = generate_shifted_pool(40, seed=1, parts={"digits": 1, "noise": 1})
    y = generate_shifted_pool(40, seed=1, parts={"digits": 1, "shapes": 3})
    digits = PARTS.index("digits")
    assert x.counts()["digits"] == 20 and y.counts()["digits"] == 10
    first = {img.tobytes() for img in x.images[x.domains == digits]}
    assert {img.tobytes() for img in y.images[y.domains == digits]} <= first


def test_cache_is_reused_and_keyed_by_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = shifted_pool(30, 2, {"shapes": 1, "noise": 1}, cache_dir=tmp_path)
    files = list(tmp_path.glob("shifted-pool-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp"))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated again instead of read from the cache")

    monkeypatch.setattr(pools, "generate_shifted_pool", fail)
    again = shifted_pool(30, 2, {"noise": 1, "shapes": 1}, cache_dir=tmp_path)  # same options, other order
    assert np.array_equal(first.images, again.images) and np.array_equal(first.domains, again.domains)
    with pytest.raises(AssertionError, match="generated again"):
        shifted_pool(30, 3, {"shapes": 1, "noise": 1}, cache_dir=tmp_path)  # another seed: another file


def test_fingerprint_follows_the_options(tmp_path: Path) -> None:
    a = load_data("shifted-pool", root=str(tmp_path), size=20, parts={"noise": 1})
    b = load_data("shifted-pool", root=str(tmp_path), size=20, parts={"noise": 1}, seed=1)
    c = load_data("shifted-pool", root=str(tmp_path), size=20, parts={"noise": 1})
    assert a.fingerprint() == c.fingerprint() != b.fingerprint()
