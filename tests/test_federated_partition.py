import numpy as np
import pytest

from protege.errors import ProtegeError
from protege.federated.partition import label_histograms, partition

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class


def _disjoint_cover(parts, n):
    every = np.concatenate([p.all for p in parts])
    assert len(every) == len(set(every.tolist()))
    return set(every.tolist()) <= set(range(n))


def test_iid_equal_sizes_and_disjoint():
    parts = partition(LABELS, 4, "iid", seed=1).parts
    assert _disjoint_cover(parts, len(LABELS))
    assert [len(p.all) for p in parts] == [250] * 4
    hist = label_histograms(LABELS, [p.all for p in parts], 10)
    assert hist.min() >= 10  # every client sees every class


def test_dirichlet_counts_follow_the_drawn_proportions():
    part = partition(LABELS, 5, "dirichlet", alpha=0.5, seed=3, min_samples=1)
    hist = label_histograms(LABELS, [p.all for p in part.parts], 10)  # (N, C)
    q = part.proportions  # (C, N)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-9)
    # class c's 100 samples are cut at floor(cumsum(q_c) * 100)
    cuts = np.floor(np.cumsum(q, axis=1)[:, :-1] * 100)
    bounds = np.concatenate([np.zeros((10, 1)), cuts, np.full((10, 1), 100)], axis=1)
    expected = np.diff(bounds, axis=1)
    np.testing.assert_array_equal(hist.T, expected)
    assert _disjoint_cover(part.parts, len(LABELS))


def _skew(alpha):
    parts = partition(LABELS, 10, "dirichlet", alpha=alpha, seed=0, min_samples=1).parts
    hist = label_histograms(LABELS, [p.all for p in parts], 10).astype(float)
    dist = hist / hist.sum(1, keepdims=True)
    return 0.5 * np.abs(dist - 0.1).sum(1).mean()  # mean total variation to the global distribution


def test_dirichlet_small_alpha_is_more_skewed():
    assert _skew(0.1) > 0.6 > 0.2 > _skew(10.0)


def test_k_classes_per_client():
    parts = partition(LABELS, 5, "classes", classes_per_client=2, seed=2).parts
    seen = set()
    for p in parts:
        classes = set(LABELS[p.all].tolist())
        assert len(classes) == 2
        assert set(LABELS[p.test].tolist()) == classes  # the client's test set has its own classes
        seen |= classes
    assert seen == set(range(10))
    assert _disjoint_cover(parts, len(LABELS))


def test_per_client_test_split_keeps_the_class_mix():
    parts = partition(LABELS, 3, "dirichlet", alpha=1.0, test_fraction=0.25, seed=4).parts
    for p in parts:
        for c in np.unique(LABELS[p.all]):
            n_c = int((LABELS[p.all] == c).sum())
            want = max(int(round(0.25 * n_c)), 1 if n_c >= 2 else 0)
            assert int((LABELS[p.test] == c).sum()) == want


def test_samples_per_client_caps_the_local_size():
    parts = partition(LABELS, 4, "iid", samples_per_client=40, seed=0).parts
    assert [len(p.all) for p in parts] == [40] * 4


def test_seeded():
    a = partition(LABELS, 4, "dirichlet", alpha=0.3, seed=7, min_samples=1).parts
    b = partition(LABELS, 4, "dirichlet", alpha=0.3, seed=7, min_samples=1).parts
    assert all(np.array_equal(x.train, y.train) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "shards"}, "unknown partition scheme"),
        ({"scheme": "classes", "classes_per_client": 1}, "cannot cover"),
        ({"scheme": "dirichlet", "alpha": 0.01, "min_samples": 200, "max_tries": 5}, "raise alpha"),
    ],
)
def test_bad_parameters_say_what_to_do(kwargs, match):
    with pytest.raises(ProtegeError, match=match):
        partition(LABELS, 5, **kwargs)
