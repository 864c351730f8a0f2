"""CKA and the probes of what got distilled, on constructed cases with known answers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from protege.analysis.probes import (
    adversarial_transfer,
    fgsm,
    gradcam,
    invariance,
    localization,
    map_similarity,
    per_class_agreement,
    pgd,
    predict,
    random_shift,
    saliency,
    share_closer,
    shift,
    spatial_layer,
)
from protege.metrics.cka import cka_matrix, linear_cka
from protege.metrics.fidelity import agreement


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(KHLH)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_by_hand_and_against_hsic():
    # one feature each side: CKA is the squared Pearson correlation; (1,2,3) vs (1,0,2): r = 0.5
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [2.0]])) == (
        pytest.approx(0.25)
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 7, generator=g), torch.randn(40, 90, generator=g)  # gram and feature paths
    y[:, :7] += 2 * x
    expected = _hsic_cka(x.double().numpy(), y.double().numpy())
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-9)
    assert linear_cka(y, x) == pytest.approx(expected, rel=1e-9)


def test_cka_identity_orthogonal_and_scale_invariance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=g, dtype=torch.float64)
    y = x @ torch.randn(12, 20, generator=g, dtype=torch.float64) + torch.randn(
        64, 20, generator=g, dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-10)
    base = linear_cka(x, y)
    assert 0.2 < base < 0.99
    assert linear_cka(x @ q * 0.01, y * 250.0) == pytest.approx(base, rel=1e-9)
    # not invariant to an anisotropic scaling (the test can fail)
    stretch = torch.ones(12, dtype=torch.float64)
    stretch[0] = 30.0
    assert abs(linear_cka(x * stretch, y) - base) > 0.01
    # feature maps are flattened; a constant representation has undefined similarity
    assert linear_cka(x.view(64, 3, 2, 2), x) == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(linear_cka(torch.ones(64, 3), x))


def test_cka_matrix_layout():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 5, generator=g), torch.randn(30, 8, generator=g)
    m = cka_matrix({"t1": a, "t2": b}, {"s1": b, "s2": a, "s3": a * 2})
    assert m.shape == (2, 3)
    assert m[0, 1] == pytest.approx(1.0) and m[1, 0] == pytest.approx(1.0) and m[0, 2] == pytest.approx(1.0)
    assert m[0, 0] == pytest.approx(linear_cka(a, b))
    with pytest.raises(ValueError, match="same inputs"):
        cka_matrix({"t": a}, {"s": a[:10]})


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def _flat_cnn() -> nn.Module:
    """A CNN whose classifier reads the whole feature map: varied predictions even at random init."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


def test_spatial_layer_gradcam_by_hand_and_saliency():
    torch.manual_seed(0)
    cnn, x = _TinyCNN(), torch.randn(5, 1, 6, 6)
    assert spatial_layer(cnn, x) == "conv"  # the pool's output is 1x1: not spatial
    assert spatial_layer(_mlp(), x) is None
    resized = nn.Sequential(nn.AdaptiveAvgPool2d(6), nn.Flatten(), nn.Linear(36, 3))  # a 4-D input step
    assert spatial_layer(resized, x) is None
    classes = torch.tensor([0, 1, 2, 0, 1])
    # by hand: y_c = w_c · mean_ij A[:, i, j] + b, so dy_c/dA_k[i,j] = w_ck / (h w): alpha_k = w_ck / 36
    cam = gradcam(cnn, x, classes, "conv")
    act = cnn.conv(x).detach()
    w = cnn.fc.weight.detach()[classes] / 36
    expected = torch.relu((w[:, :, None, None] * act).sum(1))
    torch.testing.assert_close(cam, expected)
    # saliency of a linear model is |w_c| everywhere (one channel)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    sal = saliency(lin, x, classes)
    torch.testing.assert_close(sal, lin[1].weight.detach()[classes].abs().view(5, 6, 6))
    assert cnn.training and lin.training  # modes restored


def test_identical_student_probes_match_the_teacher():
    torch.manual_seed(0)
    teacher = _flat_cnn()
    twin, other = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():  # another model that mostly agrees with the teacher
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(64, 1, 6, 6)
    y = predict(teacher, x).argmax(-1)  # labels the teacher gets right: all images count
    loc = localization(teacher, {"twin": twin, "other": other}, x)
    assert loc["method"] == "grad-cam" and loc["layers"]["twin"] == "1"  # the ReLU after the conv
    assert torch.allclose(loc["similarity"]["twin"], torch.ones(64), atol=1e-5)
    assert share_closer(loc["similarity"]["twin"], loc["similarity"]["other"]) > 0.9
    # a model without a spatial layer: saliency for every model
    assert localization(teacher, {"mlp": _mlp()}, x)["method"] == "saliency"

    assert agreement(predict(twin, x), predict(teacher, x)) == 1.0
    adv = adversarial_transfer(teacher, {"twin": twin, "other": other}, x, y, eps=0.5)
    assert adv["n"] == int((predict(other, x).argmax(-1) == y).sum()) > 0  # images all models get right
    assert adv["success"]["twin"] == adv["success"]["teacher"] > 0.5  # white-box on the teacher


def test_fgsm_and_pgd_by_hand():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [-1.0, 2.0]]))
    x, y = torch.tensor([[0.5, 0.0]]), torch.tensor([0])
    # dCE/dx = (p - onehot)·W has the sign of W[1] - W[0] = (-2, 4): step −eps on x0, +eps on x1
    torch.testing.assert_close(fgsm(lin, x, y, 0.1), torch.tensor([[0.4, 0.1]]))
    lo, hi = torch.tensor([0.45, -1.0]), torch.tensor([1.0, 0.05])  # per-feature bounds of valid inputs
    torch.testing.assert_close(fgsm(lin, x, y, 0.1, lo=lo, hi=hi), torch.tensor([[0.45, 0.05]]))
    adv = pgd(lin, x, y, eps=0.3, steps=7)
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    torch.testing.assert_close(adv, torch.tensor([[0.2, 0.3]]))  # the corner of the eps-ball


def test_shift_invariance_and_per_class():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    moved = shift(1, -1, fill=-5.0)(x)
    expected = torch.tensor([[-5, 4, 5, 6], [-5, 8, 9, 10], [-5, 12, 13, 14], [-5, -5, -5, -5]]).float()
    torch.testing.assert_close(moved[0, 0], expected)
    many = torch.randn(50, 1, 8, 8)
    out = random_shift(2, fill=0.0, seed=3)(many)
    assert not torch.equal(out, many) and torch.equal(out, random_shift(2, fill=0.0, seed=3)(many))

    class Mean(nn.Module):  # predicts from the image mean: invariant to flips, not to everything
        def forward(self, x):
            m = x.mean((1, 2, 3))
            return torch.stack([m, -m], 1)

    flipped = invariance(
        {"t": Mean(), "s": Mean()}, many, {"flip": lambda z: z.flip(-1), "neg": lambda z: -z}
    )
    assert flipped["flip"]["s"] == {"consistency": 1.0, "agreement": 1.0}
    assert flipped["neg"]["s"]["consistency"] == 0.0 and flipped["neg"]["s"]["agreement"] == 1.0

    s = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    t = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    pc = per_class_agreement(s, t, torch.tensor([0, 0, 1, 1]), num_classes=3)
    torch.testing.assert_close(pc["agreement"][:2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(pc["student_acc"][:2], torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(pc["teacher_acc"][:2], torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert pc["count"].tolist() == [2, 2, 0] and torch.isnan(pc["agreement"][2])
    assert map_similarity(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [0.0, 0.0]
