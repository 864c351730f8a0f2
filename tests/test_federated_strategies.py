import math

import pytest
import torch

from protege.federated.strategies import (
    consensus,
    distill_towards,
    divergence_matrix,
    fedavg,
    fuse,
    knfu_weights,
    predict_logits,
)


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# three clients, two transfer samples, two classes: clients 0 and 1 nearly agree, client 2 is an outlier
P = torch.tensor(
    [
        [[0.9, 0.1], [0.2, 0.8]],
        [[0.8, 0.2], [0.3, 0.7]],
        [[0.1, 0.9], [0.9, 0.1]],
    ]
)


def test_divergence_matrix_matches_hand_kl():
    d = divergence_matrix(P, "kl")
    for i in range(3):
        for j in range(3):
            want = 0.5 * (_kl(P[i, 0].tolist(), P[j, 0].tolist()) + _kl(P[i, 1].tolist(), P[j, 1].tolist()))
            assert d[i, j].item() == pytest.approx(want, abs=1e-5)
    js = divergence_matrix(P, "js")
    assert torch.allclose(js, js.T, atol=1e-6) and js.max() <= math.log(2) + 1e-6


def test_knfu_outlier_gets_no_weight():
    w = knfu_weights(P, beta=10.0)
    assert torch.allclose(w.sum(1), torch.ones(3))
    d01 = 0.5 * (_kl([0.9, 0.1], [0.8, 0.2]) + _kl([0.2, 0.8], [0.3, 0.7]))
    d02 = 0.5 * (_kl([0.9, 0.1], [0.1, 0.9]) + _kl([0.2, 0.8], [0.9, 0.1]))
    z = 1 + math.exp(-10 * d01) + math.exp(-10 * d02)
    assert w[0, 1].item() == pytest.approx(math.exp(-10 * d01) / z, rel=1e-4)  # the neighbour counts: ~0.55
    assert w[0, 1].item() > 0.3
    assert w[0, 2].item() < 1e-4 and w[1, 2].item() < 1e-4  # the outlier's knowledge is not fused into 0 or 1
    assert w[2, 2].item() > 0.999  # and the outlier keeps its own
    target = fuse(P, w)
    assert torch.allclose(target[2], P[2], atol=1e-3)
    assert torch.allclose(target[0], w[0, 0] * P[0] + w[0, 1] * P[1] + w[0, 2] * P[2], atol=1e-6)


def test_knfu_neighbours_and_self():
    w = knfu_weights(P, beta=10.0, neighbours=1, include_self=False)
    assert w.argmax(1).tolist() == [1, 0, 0] or w.argmax(1).tolist() == [1, 0, 1]
    assert torch.all((w > 0).sum(1) == 1) and torch.all(w.diagonal() == 0)
    small_beta = knfu_weights(P, beta=1e-6)
    assert torch.allclose(small_beta, torch.full((3, 3), 1 / 3), atol=1e-5)  # β → 0: FedMD's plain mean


def test_consensus_is_the_mean():
    assert torch.allclose(consensus(P), P.mean(0))


def test_fedavg_weights_by_examples_and_copies_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    out = fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].item() == 7


def test_distill_towards_moves_the_model_to_the_target():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(64, 1, 2, 2)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    target = torch.softmax(predict_logits(teacher, x) * 3, dim=1)

    def kl():
        logq = torch.log_softmax(predict_logits(model, x), 1)
        return float((target * (target.log() - logq)).sum(1).mean())

    before = kl()
    distill_towards(model, x, target, epochs=30, batch_size=16, lr=0.1)
    assert kl() < 0.3 * before
