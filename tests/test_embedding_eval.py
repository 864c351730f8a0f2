"""The embedding task's fidelity and probe metrics against independent computations."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from protege.tasks.embedding import (
    EmbeddingEvaluator,
    knn_overlap,
    mapped_cosine,
    pair_spearman,
    probe_accuracy,
)


def _rand(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)))


def test_knn_overlap_by_hand_and_invariances() -> None:
    t = _rand(60, 8, 0)
    assert knn_overlap(t, t) == 1.0
    q, _ = torch.linalg.qr(_rand(8, 8, 1))
    assert knn_overlap(t @ q * 3.0, t) == pytest.approx(1.0)  # rotation and scale keep cosine neighbours
    s = _rand(60, 5, 2)
    # independent: sets of the 10 most similar other rows, by numpy
    def sets(x: np.ndarray) -> list[set[int]]:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return [set(np.argsort(-row)[:10].tolist()) for row in sim]

    expected = np.mean([len(a & b) / 10 for a, b in zip(sets(s.numpy()), sets(t.numpy()))])
    assert knn_overlap(s, t) == pytest.approx(expected)


def test_mapped_cosine_recovers_a_linear_map_and_is_cross_fitted() -> None:
    t = _rand(400, 12, 3)
    w = _rand(12, 6, 4)
    s = t @ w  # a lossy linear view of the teacher: the map back cannot be perfect
    wide = t @ _rand(12, 20, 5)  # an injective linear view: the map back is exact up to the normalisation
    assert mapped_cosine(wide, t) > 0.99
    assert 0.2 < mapped_cosine(s, t) < 0.99
    noise = _rand(400, 30, 6)  # no relation: the held-out half gets (nearly) nothing
    assert mapped_cosine(noise, t) < 0.35


def test_pair_spearman_matches_scipy_on_all_pairs() -> None:
    s, t = _rand(30, 4, 7), _rand(30, 4, 8)
    i, j = np.triu_indices(30, k=1)
    sn = s.numpy() / np.linalg.norm(s.numpy(), axis=1, keepdims=True)
    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    expected = spearmanr((sn[i] * sn[j]).sum(1), (tn[i] * tn[j]).sum(1)).statistic
    assert pair_spearman(s, t) == pytest.approx(expected)
    assert pair_spearman(t, t) == pytest.approx(1.0)


def test_probe_accuracy_on_separable_and_random_labels() -> None:
    rng = np.random.default_rng(9)
    centers = rng.normal(size=(3, 16)) * 5
    y = rng.integers(0, 3, size=300)
    x = torch.from_numpy(centers[y] + rng.normal(size=(300, 16)))
    assert probe_accuracy(x[:200], y[:200], x[200:], y[200:]) > 0.95
    shuffled = rng.permutation(y)
    assert probe_accuracy(x[:200], shuffled[:200], x[200:], shuffled[200:]) < 0.6


def test_evaluator_uses_folds_for_fidelity_and_probes() -> None:
    rng = np.random.default_rng(10)
    n = 90
    t = torch.from_numpy(rng.normal(size=(n, 6))).float()
    folds = torch.tensor([0] * 30 + [1] * 30 + [2] * 30)
    labels = torch.full((n, 1), -1)
    labels[30:, 0] = torch.from_numpy(rng.integers(0, 2, size=60))
    ev = EmbeddingEvaluator(["topic"], with_teacher=True)
    for lo in range(0, n, 32):  # batches
        sl = slice(lo, lo + 32)
        ev.update({"embedding": t[sl], "fold": folds[sl], "labels": labels[sl]}, None, {"logits": t[sl]})
    m = ev.compute()
    assert m["n_texts"] == 60  # folds 0 and 2: the texts the probes are not fitted on
    assert m["cos"] == pytest.approx(1.0) and m["knn10"] == pytest.approx(1.0)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["probe/topic"] == m["teacher/probe/topic"]  # the same embeddings, the same probe
    narrow = EmbeddingEvaluator([], with_teacher=True)
    narrow.update({"embedding": t[:, :3]}, None, {"logits": t})
    m = narrow.compute()
    assert "cos" not in m and "cos_mapped" in m  # widths differ: only the mapped cosine
