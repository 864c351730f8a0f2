"""Zero-cost proxies and the DisWOT+ losses, each checked against a float64 numpy or hand computation.

The references recompute every quantity from the models' weights with plain numpy (explicit
forward passes, closed-form gradients, loops over classes and samples), sharing no code path with
the implementations; tiny models (a few channels, 8x8 inputs, batches of 3-8) keep the file fast.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protege.errors import ProtegeError
from protege.losses.diswot import (
    class_channel_correlation,
    classifier_weight_grad,
    relation_distance,
    semantic_distance,
)
from protege.losses.registry import get_loss
from protege.models import build_model
from protege.search import proxies
from protege.search.proxies import get_proxy, list_proxies, needs_teacher

# --------------------------------------------------------------------------- tiny models and references


class TinyCNN(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU (``body``), global average pool, linear classifier."""

    def __init__(self, width: int = 4, classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, classes)
        self.feature_modules = ["stem", "body"]
        self.classifier_name = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.body(self.stem(x))).flatten(1)))


class MLP(nn.Module):
    """Linear - ReLU - Linear on the flattened input."""

    def __init__(self, d_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.fc = nn.Linear(hidden, classes)
        self.classifier_name = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.l1(x.flatten(1))))


def tiny(width: int, classes: int = 3, seed: int = 0, **kw) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(width, classes, **kw).double()


def batch(n: int = 8, classes: int = 3, seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def np_conv_bn_relu(x: np.ndarray, seq: nn.Sequential) -> np.ndarray:
    """3x3 same-padding conv (no bias), training-mode batch norm, ReLU, by loops over taps."""
    w = np_(seq[0].weight)
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    mean = out.mean(axis=(0, 2, 3), keepdims=True)
    var = out.var(axis=(0, 2, 3), keepdims=True)
    bn = seq[1]
    out = (out - mean) / np.sqrt(var + bn.eps) * np_(bn.weight)[None, :, None, None] + np_(bn.bias)[
        None, :, None, None
    ]
    return np.maximum(out, 0)


def np_tiny_forward(model: TinyCNN, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pre-pool features, pooled embedding, logits) of a TinyCNN in training mode."""
    feat = np_conv_bn_relu(np_conv_bn_relu(np_(x), model.stem), model.body)
    h = feat.mean(axis=(2, 3))
    return feat, h, h @ np_(model.fc.weight).T + np_(model.fc.bias)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_relation(ft: np.ndarray, fs: np.ndarray) -> float:
    b = ft.shape[0]
    grams = []
    for f in (ft, fs):
        flat = f.reshape(b, -1)
        g = np.array([[float(np.dot(flat[i], flat[j])) for j in range(b)] for i in range(b)])
        grams.append(g / np.linalg.norm(g, axis=1, keepdims=True))
    return float(((grams[0] - grams[1]) ** 2).sum() / b**2)


def np_pool_channels(m: np.ndarray, c: int) -> np.ndarray:
    k, width = m.shape
    return np.stack(
        [m[:, (i * width) // c : -(-((i + 1) * width) // c)].mean(axis=1) for i in range(c)], axis=1
    )


def np_semantic(gt: np.ndarray, gs: np.ndarray, align: str = "pool") -> float:
    c = min(gt.shape[1], gs.shape[1])
    fit = (lambda m: m[:, :c]) if align == "truncate" else (lambda m: np_pool_channels(m, c))
    gt, gs = (m if m.shape[1] == c else fit(m) for m in (gt, gs))
    total = 0.0
    for k in range(gt.shape[0]):
        mats = []
        for g in (gt[k], gs[k]):
            a = np.outer(g, g)
            mats.append(a / np.linalg.norm(a, axis=1, keepdims=True))
        total += ((mats[0] - mats[1]) ** 2).sum()
    return total / (gt.shape[0] * c)


def np_fc_grad(h: np.ndarray, logits: np.ndarray, y: torch.Tensor) -> np.ndarray:
    onehot = np.eye(logits.shape[1])[y.numpy()]
    return (np_softmax(logits) - onehot).T @ h / h.shape[0]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).normal(size=shape), dtype=torch.float64)


# --------------------------------------------------------------------------- DisWOT math (losses/diswot.py)


def test_relation_distance_matches_numpy_across_shapes() -> None:
    fs, ft = rand(4, 2, 3, 3, seed=1), rand(4, 5, 2, 2, seed=2)
    assert relation_distance(fs, ft).item() == pytest.approx(np_relation(np_(ft), np_(fs)), rel=1e-10)
    assert relation_distance(fs, fs).item() == 0.0
    with pytest.raises(ValueError, match="batch size"):
        relation_distance(fs, rand(3, 2, 3, 3))


def test_class_channel_correlation_is_the_row_normalised_outer_product() -> None:
    g = rand(3, 4, seed=3)
    out = class_channel_correlation(g).numpy()
    for k in range(3):
        a = np.outer(g[k].numpy(), g[k].numpy())
        np.testing.assert_allclose(out[k], a / np.linalg.norm(a, axis=1, keepdims=True), rtol=1e-12)
    tiny_grads = g * 1e-9  # products of 1e-9 gradients stay away from the 1e-12 normalisation floor
    np.testing.assert_allclose(class_channel_correlation(tiny_grads).numpy(), out, rtol=1e-9)


@pytest.mark.parametrize("align", ["pool", "truncate"])
def test_semantic_distance_aligned_channels(align: str) -> None:
    gs, gt = rand(3, 4, seed=4), rand(3, 6, seed=5)  # student 4 channels, teacher 6
    expected = np_semantic(np_(gt), np_(gs), align)
    assert semantic_distance(gs, gt, align).item() == pytest.approx(expected, rel=1e-10)
    assert semantic_distance(gt, gs, align).item() == pytest.approx(expected, rel=1e-10)  # symmetric


def test_pool_and_truncate_differ_and_equal_widths_need_no_alignment() -> None:
    gs, gt = rand(3, 4, seed=4), rand(3, 6, seed=5)
    assert semantic_distance(gs, gt, "pool").item() != pytest.approx(
        semantic_distance(gs, gt, "truncate").item()
    )
    same = rand(3, 4, seed=6)
    assert semantic_distance(gs, same, "pool").item() == semantic_distance(gs, same, "truncate").item()
    with pytest.raises(ValueError, match="align"):
        semantic_distance(gs, gt, "mean")
    with pytest.raises(ValueError, match="same number of classes"):
        semantic_distance(gs, rand(5, 4))


def test_classifier_weight_grad_is_the_linear_layers_gradient() -> None:
    torch.manual_seed(0)
    fc = nn.Linear(4, 3).double()
    h, y = rand(6, 4, seed=7), torch.tensor([0, 1, 2, 2, 1, 0])
    F.cross_entropy(fc(h), y).backward()
    np.testing.assert_allclose(
        classifier_weight_grad(h, fc(h), y).detach().numpy(), np_(fc.weight.grad), rtol=1e-10
    )


def test_diswot_losses_registered_and_hand_checked() -> None:
    relation, semantic = get_loss("diswot_relation"), get_loss("diswot_semantic")
    assert relation.reads == "features" and semantic.reads == "feature-list" and semantic.uses_target
    fs, ft = rand(4, 2, 2, 2, seed=8), rand(4, 3, 4, 4, seed=9)
    assert relation.fn(fs, ft).item() == pytest.approx(np_relation(np_(ft), np_(fs)), rel=1e-10)

    hs = rand(6, 4, seed=10).requires_grad_(True)
    zs, ht, zt = rand(6, 3, seed=11), rand(6, 5, seed=12), rand(6, 3, seed=13)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = semantic.fn([hs, zs], [ht, zt], target=y)
    expected = np_semantic(np_fc_grad(np_(ht), np_(zt), y), np_fc_grad(np_(hs), np_(zs), y))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert hs.grad is not None and hs.grad.abs().sum() > 0  # the student learns through its embedding
    with pytest.raises(ValueError, match="two taps"):
        semantic.fn(hs, ht, target=y)


# --------------------------------------------------------------------------- DisWOT proxy


@pytest.mark.parametrize("align", ["pool", "truncate"])
def test_diswot_proxy_matches_numpy_with_different_widths(align: str) -> None:
    teacher, student = tiny(6, seed=1), tiny(4, seed=2)
    x, y = batch()
    ft, ht, zt = np_tiny_forward(teacher, x)
    fs, hs, zs = np_tiny_forward(student, x)
    m_r = np_relation(ft, fs)
    m_s = np_semantic(np_fc_grad(ht, zt, y), np_fc_grad(hs, zs, y), align)
    assert m_r > 0 and m_s > 0
    terms = proxies.diswot_terms(teacher, student, (x, y), align=align)
    assert terms["relation"] == pytest.approx(m_r, rel=1e-6)
    assert terms["semantic"] == pytest.approx(m_s, rel=1e-6)
    assert get_proxy("diswot", align=align)(teacher, student, (x, y)) == pytest.approx(-(m_r + m_s), rel=1e-6)
    assert get_proxy("diswot_relation")(teacher, student, (x, y)) == pytest.approx(-m_r, rel=1e-6)
    assert get_proxy("diswot_semantic", align=align)(teacher, student, (x, y)) == pytest.approx(
        -m_s, rel=1e-6
    )


def test_diswot_reuses_the_teachers_side_until_its_weights_change() -> None:
    teacher = tiny(6, seed=1, dropout=0.3)
    fresh = copy.deepcopy(teacher)  # a teacher never seen before, same weights
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    x, y = batch()
    x2, y2 = batch(seed=5)
    first, second = tiny(4, seed=2, dropout=0.3), tiny(5, seed=3, dropout=0.3)
    a = proxies.diswot_terms(teacher, first, (x, y))
    b = proxies.diswot_terms(teacher, second, (x, y))
    assert len(calls) == 1  # the second candidate reused the teacher's features and fc gradient
    # exactly what a teacher never seen before computes (its dropout is seeded from the batch)
    assert proxies.diswot_terms(fresh, first, (x, y)) == a
    assert proxies.diswot_terms(fresh, second, (x, y)) == b
    proxies.diswot_terms(teacher, first, (x2, y2))  # another batch: computed
    proxies.diswot_terms(teacher, first, (x, y[[1, 0, *range(2, len(y))]]))  # other labels: computed
    assert len(calls) == 3
    with torch.no_grad():
        teacher.fc.weight.mul_(3.0)  # in place, like an optimizer step
    changed = proxies.diswot_terms(teacher, first, (x, y))
    assert len(calls) == 4 and changed["semantic"] != a["semantic"]
    teacher.load_state_dict(fresh.state_dict())  # back to the original weights: computed, not stale
    assert proxies.diswot_terms(teacher, first, (x, y)) == a and len(calls) == 5
    recompute = get_proxy("diswot", reuse_teacher=False)
    assert recompute(teacher, first, (x, y)) == -(a["relation"] + a["semantic"]) and len(calls) == 6


def test_diswot_tap_override_and_missing_feature_map() -> None:
    teacher, student = tiny(6, seed=1), tiny(4, seed=2)
    x, y = batch()
    auto = get_proxy("diswot_relation")(teacher, student, (x, y))
    assert (
        get_proxy("diswot_relation", student_tap="pool:in", teacher_tap="body")(teacher, student, (x, y))
        == auto
    )
    stem = get_proxy("diswot_relation", student_tap="stem")(teacher, student, (x, y))
    assert stem != pytest.approx(auto)

    mlp = MLP(3 * 8 * 8, 5, 3).double()  # no pooling, no feature_modules
    with pytest.raises(ProtegeError, match="student_tap"):
        get_proxy("diswot")(teacher, mlp, (x, y))
    assert math.isfinite(get_proxy("diswot", student_tap="act")(teacher, mlp, (x, y)))


def test_diswot_bad_input_names_the_problem() -> None:
    teacher, student = tiny(6, seed=1), tiny(4, seed=2)
    x, y = batch()
    with pytest.raises(ProtegeError, match="pass a teacher"):
        get_proxy("diswot")(None, student, (x, y))
    with pytest.raises(ProtegeError, match="different numbers of classes"):
        get_proxy("diswot")(tiny(6, classes=5), student, (x, y))
    headless = nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    with pytest.raises(ProtegeError, match="classifier"):
        get_proxy("diswot")(headless, student, (x, y))
    assert get_proxy("diswot_relation")(headless, student, (x, y)) < 0  # the relation term needs no head
    with pytest.raises(ProtegeError, match="labels range"):
        get_proxy("diswot")(teacher, student, (x, y + 3))
    with pytest.raises(ProtegeError, match="align"):
        get_proxy("diswot", align="mean")(teacher, student, (x, y))


# --------------------------------------------------------------------------- classic proxies by hand


def mlp_and_batch(seed: int = 0) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = MLP(4, 3, 2).double()
    x, y = rand(5, 4, seed=seed + 20), torch.tensor([0, 1, 1, 0, 1])
    return model, x, y


def np_mlp_grads(model: MLP, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Activations and CE gradients of the MLP, by the chain rule in numpy."""
    w1, b1, w2, b2 = (np_(t) for t in (model.l1.weight, model.l1.bias, model.fc.weight, model.fc.bias))
    a1 = np_(x) @ w1.T + b1
    r = np.maximum(a1, 0)
    a2 = r @ w2.T + b2
    g2 = (np_softmax(a2) - np.eye(2)[y.numpy()]) / x.shape[0]
    g1 = (g2 @ w2) * (a1 > 0)
    return {"a1": a1, "a2": a2, "g1": g1, "g2": g2, "dw1": g1.T @ np_(x), "dw2": g2.T @ r, "w1": w1, "w2": w2}


def test_grad_norm_and_snip_by_hand() -> None:
    model, x, y = mlp_and_batch()
    g = np_mlp_grads(model, x, y)
    expected_norm = math.sqrt((g["dw1"] ** 2).sum()) + math.sqrt(
        (g["dw2"] ** 2).sum()
    )  # per-layer norms, summed
    assert get_proxy("grad_norm")(None, model, (x, y)) == pytest.approx(expected_norm, rel=1e-10)
    expected_snip = np.abs(g["w1"] * g["dw1"]).sum() + np.abs(g["w2"] * g["dw2"]).sum()
    assert get_proxy("snip")(None, model, (x, y)) == pytest.approx(expected_snip, rel=1e-10)


def test_grasp_against_the_full_hessian() -> None:
    model, x, y = mlp_and_batch(1)
    names = ["l1.weight", "fc.weight"]
    shapes = [model.get_parameter(n).shape for n in names]
    theta = torch.cat([model.get_parameter(n).detach().flatten() for n in names])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [s.numel() for s in shapes])
        weights = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)

    grad = torch.autograd.functional.jacobian(loss_of, theta).numpy()
    hessian = torch.autograd.functional.hessian(loss_of, theta).numpy()
    expected = float(-(theta.numpy() * (hessian @ grad)).sum())
    assert expected != 0
    assert get_proxy("grasp")(None, model, (x, y)) == pytest.approx(expected, rel=1e-8)


def test_fisher_by_hand() -> None:
    model, x, y = mlp_and_batch(2)
    g = np_mlp_grads(model, x, y)
    per_channel = [0.5 * ((g[a] * g[d]) ** 2).mean(axis=0) for a, d in (("a1", "g1"), ("a2", "g2"))]
    expected = per_channel[0].sum() * 4 + per_channel[1].sum() * 3  # broadcast to the fan-in weights
    assert get_proxy("fisher")(None, model, (x, y)) == pytest.approx(expected, rel=1e-10)


def test_synflow_two_layer_linear_net_by_hand_with_batchnorm_removed() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():  # batch norm must not matter: the reference scores a copy without it
        net[1].running_mean.fill_(5.0)
        net[1].weight.fill_(-7.0)
    w1, b1, w2 = (np.abs(np_(t)) for t in (net[0].weight, net[0].bias, net[2].weight))
    hidden = w1 @ np.ones(3) + b1  # R = sum_i (|W2| (|W1| 1 + |b1|) + |b2|)_i
    d_w1 = np.outer(w2.sum(axis=0), np.ones(3))
    d_w2 = np.outer(np.ones(2), hidden)
    expected = (w1 * d_w1).sum() + (w2 * d_w2).sum()
    x = torch.randn(4, 3)
    assert get_proxy("synflow")(None, net, (x, torch.zeros(4, dtype=torch.long))) == pytest.approx(
        expected, rel=1e-12
    )
    assert net[1].weight[0].item() == -7.0 and next(net.parameters()).dtype == torch.float32


def test_jacob_cov_by_hand() -> None:
    model, x, y = mlp_and_batch(4)
    g = np_mlp_grads(model, x, y)
    jac = ((g["a1"] > 0) * (g["w2"].sum(axis=0))) @ g["w1"]  # d(sum of logits)/dx per sample
    v = np.linalg.eigvalsh(np.corrcoef(jac))
    expected = -np.sum(np.log(v + 1e-5) + 1 / (v + 1e-5))
    assert get_proxy("jacob_cov")(None, model, (x, y)) == pytest.approx(expected, rel=1e-8)


def test_nwot_codes_enumerated_by_hand() -> None:
    model = MLP(2, 2, 2).double()
    with torch.no_grad():
        model.l1.weight.copy_(torch.eye(2))
        model.l1.bias.zero_()
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    # codes 11, 10, 01: K_ij = positions where codes agree -> [[2,1,1],[1,2,0],[1,0,2]], det 4
    assert get_proxy("nwot")(None, model, (x, torch.zeros(3, dtype=torch.long))) == pytest.approx(
        math.log(4.0)
    )
    dup = torch.tensor([[1.0, 1.0], [2.0, 3.0], [-1.0, 1.0]], dtype=torch.float64)  # two identical codes
    assert get_proxy("nwot")(None, model, (dup, torch.zeros(3, dtype=torch.long))) == -math.inf
    functional = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ProtegeError, match="ReLU"):
        get_proxy("nwot")(None, functional, (x.float(), torch.zeros(3, dtype=torch.long)))


def test_zen_score_replayed_by_hand() -> None:
    model = tiny(4, seed=5).float()
    x, y = batch(size=8)
    x = x.float()
    # replay the proxy's random stream: Gaussian init of convs (in module order) and fc, then 2 inputs
    torch.manual_seed(proxies._batch_seed(x))
    ref = copy.deepcopy(model)
    for m in (ref.stem[0], ref.body[0], ref.fc):
        nn.init.normal_(m.weight)
    x1, x2 = torch.randn(x.shape), torch.randn(x.shape)
    f1 = np_conv_bn_relu(np_(x1), ref.stem)
    stem_pre = _conv_np(np_(x1), ref.stem[0])
    body_pre = _conv_np(f1, ref.body[0])
    feat1 = np_conv_bn_relu(f1, ref.body)
    feat2 = np_conv_bn_relu(np_conv_bn_relu(np_(x1 + 0.01 * x2), ref.stem), ref.body)
    delta = np.abs(feat1 - feat2).reshape(len(x), -1).sum(axis=1).mean()
    bn = sum(math.log(math.sqrt(p.var(axis=(0, 2, 3)).mean())) for p in (stem_pre, body_pre))
    assert get_proxy("zen")(None, model, (x, y)) == pytest.approx(math.log(delta) + bn, rel=1e-4)


def test_zen_of_a_network_that_ignores_its_input_is_minus_infinity() -> None:
    # an NB201 cell whose every path to the output is "none": the features are constant
    cell = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    net = build_model("nb201", num_classes=3, in_chans=3, cell=cell, channels=4, cells_per_stage=1, stages=3)
    x, y = batch(size=8)
    assert get_proxy("zen")(None, net, (x.float(), y)) == -math.inf


def _conv_np(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    w = np_(conv.weight)
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out


def test_params_and_flops_baselines() -> None:
    model, x, y = mlp_and_batch()
    assert get_proxy("params")(None, model, (x, y)) == 4 * 3 + 3 + 3 * 2 + 2
    assert get_proxy("flops")(None, model, (x, y)) == 2 * (4 * 3 + 3 * 2)


def test_kd_proxies_are_minus_the_loss_at_init() -> None:
    teacher, student = tiny(6, seed=1), tiny(4, seed=2)
    x, y = batch()
    zt, zs = np_tiny_forward(teacher, x)[2], np_tiny_forward(student, x)[2]
    for temp in (4.0, 1.0):
        pt, ps = np_softmax(zt / temp), np_softmax(zs / temp)
        kl = (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean() * temp**2
        proxy = get_proxy("kd:kd") if temp == 4.0 else get_proxy("kd:kd", T=temp)
        assert proxy(teacher, student, (x, y)) == pytest.approx(-kl, rel=1e-6)
    dkd = get_loss("dkd").fn(torch.tensor(zs), torch.tensor(zt), target=y).item()
    assert get_proxy("kd:dkd")(teacher, student, (x, y)) == pytest.approx(-dkd, rel=1e-6)
    with pytest.raises(ProtegeError, match="pass a teacher"):
        get_proxy("kd:kd")(None, student, (x, y))


# --------------------------------------------------------------------------- lookup


def test_lookup_names_options_and_teachers() -> None:
    names = list_proxies()
    for name in ("diswot", "diswot_relation", "diswot_semantic", "grad_norm", "snip", "grasp", "fisher"):
        assert name in names
    for name in ("synflow", "jacob_cov", "nwot", "zen", "params", "flops", "kd:kd", "kd:dkd"):
        assert name in names
    assert "kd:ce" not in names and "kd:ickd" not in names
    with pytest.raises(ProtegeError, match="synflow"):
        get_proxy("synflo")
    with pytest.raises(ProtegeError, match="logit KD loss"):
        get_proxy("kd:ickd")
    with pytest.raises(ProtegeError, match="unknown loss"):
        get_proxy("kd:nonsense")
    with pytest.raises(ProtegeError, match="no option"):
        get_proxy("snip", align="pool")
    with pytest.raises(ProtegeError, match="no option"):
        get_proxy("kd:kd", tau=2)
    assert needs_teacher("diswot") and needs_teacher("kd:kd") and not needs_teacher("snip")
    with pytest.raises(ProtegeError):
        needs_teacher("nope")
    with pytest.raises(ProtegeError, match="at least 2"):
        get_proxy("snip")(None, tiny(4), batch(n=1))


# --------------------------------------------------------------------------- no lasting effect


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
    }


@pytest.mark.parametrize("name", list_proxies())
def test_proxies_restore_models_and_are_deterministic(name: str) -> None:
    teacher, student = tiny(6, seed=1, dropout=0.3), tiny(4, seed=2, dropout=0.3)
    teacher.eval()  # a trained teacher is frozen: eval mode, no gradients
    teacher.requires_grad_(False)
    student.stem.eval()  # a mix of modes and flags to restore
    student.fc.bias.requires_grad_(False)
    student.fc.weight.grad = torch.ones_like(student.fc.weight)  # a stale gradient from elsewhere
    x, y = batch()
    before = {"t": snapshot(teacher), "s": snapshot(student)}
    rng = torch.get_rng_state()
    proxy = get_proxy(name)
    first = proxy(teacher, student, (x, y))
    second = proxy(teacher, student, (x, y))
    assert first == second and isinstance(first, float) and not math.isnan(first)
    assert torch.equal(rng, torch.get_rng_state())
    for key, model in (("t", teacher), ("s", student)):
        after = snapshot(model)
        assert after["modes"] == before[key]["modes"] and after["flags"] == before[key]["flags"]
        for k, v in before[key]["state"].items():
            assert torch.equal(v, after["state"][k]), f"{name} changed {key}:{k}"
        assert all(p.grad is None for p in model.parameters())
    other_batch = batch(seed=1)
    if name not in ("params", "flops", "synflow"):  # those read the input shape only
        assert proxy(teacher, student, other_batch) != first


def test_diswot_plus_terms_train_inside_a_distiller() -> None:
    from protege.core.distiller import Distiller, Term

    teacher, student = tiny(6, seed=1).float(), tiny(4, seed=2).float()
    x, y = batch()
    terms = [
        Term("diswot_relation", student="body", teacher="body"),
        Term("diswot_semantic", student=["fc:in", "logits"], teacher=["fc:in", "logits"], align="truncate"),
    ]
    d = Distiller(student, teacher, terms)
    d.prepare((x.float(), y))
    _, losses = d((x.float(), y))
    assert set(losses) == {"diswot_relation:body", "diswot_semantic:fc:in,logits"}
    assert all(v.item() > 0 for v in losses.values())
    total = sum(losses.values())
    total.backward()
    assert student.body[0].weight.grad is not None and student.body[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
