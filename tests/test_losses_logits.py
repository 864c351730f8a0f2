"""Logit-family losses, each checked against an independent float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protege.errors import ProtegeError
from protege.losses.logits import (
    CTKDTemperature,
    GradientReversal,
    ce,
    ctkd,
    ctkd_lambda,
    dist,
    dkd,
    kd,
    multi_kd,
    standardize_logits,
)
from protege.losses.registry import get_loss

# A tiny hand-written example: 2 samples x 3 classes.
S = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
TE = np.array([[1.5, 0.2, 0.3], [-0.3, 3.0, 0.4]])
Y = np.array([0, 2])


def t64(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) from probabilities."""
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def np_kd(s: np.ndarray, t: np.ndarray, T: float) -> float:
    ps = np.exp(np_log_softmax(s / T))
    pt = np.exp(np_log_softmax(t / T))
    return float(T**2 * np_kl(pt, ps).mean())


def np_zscore(z: np.ndarray) -> np.ndarray:
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def rand(*shape: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * scale


# --------------------------------------------------------------------------- CE


def test_ce_by_hand() -> None:
    # sample 0: softmax([2, 1, 0.1]) written out.
    e = [math.exp(2.0), math.exp(1.0), math.exp(0.1)]
    p0 = [x / sum(e) for x in e]
    e = [math.exp(0.5), math.exp(2.5), math.exp(-1.0)]
    p1 = [x / sum(e) for x in e]
    eps = 0.1
    ref0 = (1 - eps) * -math.log(p0[0]) + eps * sum(-math.log(p) for p in p0) / 3
    ref1 = (1 - eps) * -math.log(p1[2]) + eps * sum(-math.log(p) for p in p1) / 3
    got = ce(t64(S), torch.tensor(Y), label_smoothing=eps)
    assert got.item() == pytest.approx((ref0 + ref1) / 2, rel=1e-12)
    plain = ce(t64(S), torch.tensor(Y))
    assert plain.item() == pytest.approx((-math.log(p0[0]) - math.log(p1[2])) / 2, rel=1e-12)


def test_ce_accepts_column_target_and_rejects_bad_shape() -> None:
    a = ce(t64(S), torch.tensor(Y).reshape(2, 1))
    b = ce(t64(S), torch.tensor(Y))
    assert a.item() == pytest.approx(b.item())
    with pytest.raises(ValueError):
        ce(t64(S), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- KD


def test_kd_by_hand() -> None:
    T = 2.0
    total = 0.0
    for s_row, t_row in zip(S, TE, strict=True):
        es = [math.exp(v / T) for v in s_row]
        et = [math.exp(v / T) for v in t_row]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
    ref = T * T * total / 2
    assert kd(t64(S), t64(TE), T=T).item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0, 7.5])
def test_kd_matches_numpy(T: float) -> None:
    s, t = rand(8, 10, seed=1), rand(8, 10, seed=2)
    assert kd(t64(s), t64(t), T=T).item() == pytest.approx(np_kd(s, t, T), rel=1e-10)


def test_kd_zero_when_equal_and_gradients() -> None:
    s = rand(4, 5, seed=3)
    assert kd(t64(s), t64(s)).item() == pytest.approx(0.0, abs=1e-12)
    student = t64(s, grad=True)
    teacher = t64(rand(4, 5, seed=4))
    kd(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and not teacher.requires_grad


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_exact_for_extreme_logits(T: float) -> None:
    # The teacher's softmax is exactly one-hot in float32 (exp(-1e4 / T) underflows to 0), so with a
    # uniform student KL = -log(1/3) = log 3 and L = T^2 log 3; dL/ds = T (p_s - p_t) = T [-2/3, 1/3, 1/3].
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1e4, -1e4, 0.0]])
    loss = kd(s, t, T=T)
    loss.backward()
    assert loss.item() == pytest.approx(T * T * math.log(3.0), rel=1e-6)
    torch.testing.assert_close(s.grad, T * torch.tensor([[-2 / 3, 1 / 3, 1 / 3]]), rtol=0.0, atol=1e-6)


def test_kd_standardize_matches_numpy_and_is_invariant() -> None:
    s, t = rand(6, 7, seed=5), rand(6, 7, seed=6)
    ref = np_kd(np_zscore(s), np_zscore(t), 2.0)
    assert kd(t64(s), t64(t), T=2.0, standardize=True).item() == pytest.approx(ref, rel=1e-8)
    moved = kd(t64(3.7 * s + 11.0), t64(t), T=2.0, standardize=True)
    assert moved.item() == pytest.approx(ref, rel=1e-6)
    assert kd(t64(3.7 * s + 11.0), t64(t), T=2.0).item() != pytest.approx(ref, rel=1e-3)


def test_standardize_logits() -> None:
    z = standardize_logits(t64(rand(3, 9, seed=7)))
    assert torch.allclose(z.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.std(1), torch.ones(3, dtype=torch.float64), atol=1e-6)


# --------------------------------------------------------------------------- DKD


def np_dkd(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float, T: float) -> float:
    total = 0.0
    for s_row, t_row, yi in zip(s, t, y, strict=True):
        ps, pt = np.exp(np_log_softmax(s_row / T)), np.exp(np_log_softmax(t_row / T))
        bs = np.array([ps[yi], 1.0 - ps[yi]])
        bt = np.array([pt[yi], 1.0 - pt[yi]])
        others = np.arange(len(s_row)) != yi
        ns = ps[others] / ps[others].sum()  # renormalised non-target distribution
        nt = pt[others] / pt[others].sum()
        total += alpha * np_kl(bt, bs) + beta * np_kl(nt, ns)
    return float(T**2 * total / len(y))


def test_dkd_by_hand_example() -> None:
    ref = np_dkd(S, TE, Y, alpha=1.0, beta=8.0, T=4.0)
    assert dkd(t64(S), t64(TE), torch.tensor(Y)).item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize(("alpha", "beta", "T"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 3.0)])
def test_dkd_matches_numpy(alpha: float, beta: float, T: float) -> None:
    s, t = rand(10, 6, seed=8), rand(10, 6, seed=9)
    y = np.random.default_rng(10).integers(0, 6, size=10)
    got = dkd(t64(s), t64(t), torch.tensor(y), alpha=alpha, beta=beta, T=T)
    assert got.item() == pytest.approx(np_dkd(s, t, y, alpha, beta, T), rel=1e-9)


def test_dkd_reformulates_kd() -> None:
    # Paper Eq. (the reformulation): KD = TCKD + (1 - p^t_y) NCKD, checked per single sample.
    for i in range(2):
        s, t, y = S[i : i + 1], TE[i : i + 1], Y[i : i + 1]
        pt_y = np.exp(np_log_softmax(t[0] / 4.0))[y[0]]
        got = dkd(t64(s), t64(t), torch.tensor(y), alpha=1.0, beta=1.0 - pt_y, T=4.0)
        assert got.item() == pytest.approx(np_kd(s, t, 4.0), rel=1e-10)


def np_dkd_confident(
    s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float
) -> tuple[float, np.ndarray]:
    """DKD (T = 1) and its gradient for teachers sure of the target: p^t_y = 1 - O(e^-200), so the
    binary teacher distribution is (1, 0) and TCKD = -log p^s_y with gradient p^s - onehot(y) (the
    rest is below 1e-80); NCKD is the KL of the non-target softmaxes, with gradient p~^s - p~^t on
    the non-target columns. Float64, one sample at a time."""
    n = len(y)
    value, grad = 0.0, np.zeros_like(s)
    for i in range(n):
        ps = np.exp(np_log_softmax(s[i]))
        others = np.arange(s.shape[1]) != y[i]
        ns, nt = np.exp(np_log_softmax(s[i][others])), np.exp(np_log_softmax(t[i][others]))
        value += alpha * -np.log(ps[y[i]]) + beta * np_kl(nt, ns)
        grad[i] = alpha * (ps - np.eye(s.shape[1])[y[i]])
        grad[i][others] += beta * (ns - nt)
    return value / n, grad / n


def test_dkd_exact_for_confident_teacher() -> None:
    s = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[200.0, 0.0, -50.0], [0.0, 0.0, 3000.0]])
    y = np.array([0, 2])
    loss = dkd(s, t, torch.tensor(y), alpha=1.0, beta=8.0, T=1.0)
    loss.backward()
    ref, grad = np_dkd_confident(s.detach().double().numpy(), t.double().numpy(), y, 1.0, 8.0)
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    np.testing.assert_allclose(s.grad.numpy(), grad, rtol=0.0, atol=1e-6)


def test_dkd_standardize_invariant() -> None:
    s, t = rand(5, 6, seed=11), rand(5, 6, seed=12)
    y = torch.tensor([0, 1, 2, 3, 5])
    a = dkd(t64(s), t64(t), y, T=2.0, standardize=True)
    b = dkd(t64(0.2 * s - 4.0), t64(t), y, T=2.0, standardize=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    ref = np_dkd(np_zscore(s), np_zscore(t), y.numpy(), 1.0, 8.0, 2.0)
    assert a.item() == pytest.approx(ref, rel=1e-8)


def test_dkd_rejects_float_target() -> None:
    with pytest.raises(ValueError, match="class indices"):
        dkd(t64(S), t64(TE), torch.tensor([0.0, 2.0]))


# --------------------------------------------------------------------------- DIST


def np_dist(s: np.ndarray, t: np.ndarray, beta: float, gamma: float, T: float) -> float:
    ys, yt = np.exp(np_log_softmax(s / T)), np.exp(np_log_softmax(t / T))
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(ys.shape[0])])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(ys.shape[1])])
    return float(T**2 * (beta * inter + gamma * intra))


@pytest.mark.parametrize(("beta", "gamma", "T"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_corrcoef(beta: float, gamma: float, T: float) -> None:
    s, t = rand(12, 5, seed=13, scale=1.5), rand(12, 5, seed=14, scale=1.5)
    got = dist(t64(s), t64(t), beta=beta, gamma=gamma, T=T)
    assert got.item() == pytest.approx(np_dist(s, t, beta, gamma, T), rel=1e-6)


def test_dist_by_hand_example_and_zero_when_equal() -> None:
    # With N = 2 the column deviations are tiny, so the loss's eps = 1e-8 in the correlation's
    # denominator shows at the 1e-5 level; np.corrcoef has no eps.
    assert dist(t64(S), t64(TE)).item() == pytest.approx(np_dist(S, TE, 1.0, 1.0, 1.0), rel=1e-4)
    s = rand(6, 4, seed=15)
    assert dist(t64(s), t64(s)).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- CTKD


def test_ctkd_with_fixed_temperature_is_kd() -> None:
    s, t = rand(6, 5, seed=16), rand(6, 5, seed=17)
    for temp in (3.0, torch.tensor(3.0, dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)):
        assert ctkd(t64(s), t64(t), temperature=temp).item() == pytest.approx(np_kd(s, t, 3.0), rel=1e-10)


def test_ctkd_per_instance_temperature() -> None:
    s, t = rand(3, 5, seed=18), rand(3, 5, seed=19)
    temps = np.array([1.0, 2.5, 6.0])
    ref = np.mean([np_kd(s[i : i + 1], t[i : i + 1], temps[i]) for i in range(3)])
    for shape in ((3,), (3, 1)):
        got = ctkd(t64(s), t64(t), temperature=t64(temps).reshape(shape))
        assert got.item() == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError):
        ctkd(t64(s), t64(t), temperature=t64(np.ones(2)))


def test_ctkd_gradient_reaches_temperature() -> None:
    s, t = rand(4, 5, seed=20), rand(4, 5, seed=21)
    h = 1e-5  # dL/dT of the numpy reference by central differences
    dL_dT = (np_kd(s, t, 2.0 + h) - np_kd(s, t, 2.0 - h)) / (2 * h)
    assert dL_dT > 0.5  # for these logits a hotter softmax raises the loss
    temp = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ctkd(t64(s), t64(t), temperature=temp).backward()
    assert temp.grad.item() == pytest.approx(dL_dT, rel=1e-6)

    # Through the state: T = 1 + 20 sigmoid(GRL(raw)), with raw at T = 2, so dT/draw = 20 * 0.05 * 0.95;
    # at epoch 2.5 of the 10-epoch cosine curriculum lambda = (1 + cos(1.25 pi)) / 2 = (1 - cos(pi/4)) / 2.
    state = CTKDTemperature(init_T=2.0).double()
    lam = (1.0 - math.cos(math.pi / 4)) / 2.0
    assert state.lambda_at(2.5) == pytest.approx(lam, rel=1e-12) and lam == pytest.approx(0.1464466094)
    ctkd(t64(s), t64(t), **state(2.5)).backward()
    reversed_grad = state.raw_T.grad.item()
    assert reversed_grad == pytest.approx(-lam * dL_dT * 0.95, rel=1e-6)
    assert reversed_grad < 0  # opposite to dL/draw: gradient descent on raw ascends the loss
    with torch.no_grad():
        state.raw_T -= 0.5 * state.raw_T.grad  # one SGD step
    assert state.temperature > 2.0 and np_kd(s, t, state.temperature) > np_kd(s, t, 2.0)


def test_gradient_reversal() -> None:
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = GradientReversal.apply(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([3.0, 4.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-1.5, -2.0]))


def test_ctkd_temperature_gradient_is_reversed() -> None:
    s, t = t64(rand(4, 5, seed=22)), t64(rand(4, 5, seed=23))
    state = CTKDTemperature().double()
    # Plain gradient of the loss w.r.t. the raw parameter, without reversal.
    T_plain = state.T_min + (state.T_max - state.T_min) * torch.sigmoid(state.raw_T)
    (plain,) = torch.autograd.grad(ctkd(s, t, temperature=T_plain.reshape(())), state.raw_T)
    ctkd(s, t, **state(progress=10.0)).backward()  # lambda = 1: pure reversal
    assert plain.item() != 0.0
    assert torch.allclose(state.raw_T.grad, -plain)
    state.raw_T.grad = None
    ctkd(s, t, **state(progress=5.0)).backward()  # lambda = 0.5
    assert torch.allclose(state.raw_T.grad, -0.5 * plain)


def test_ctkd_lambda_schedule() -> None:
    state = CTKDTemperature()
    expected = {0.0: 0.0, 5.0: 0.5, 10.0: 1.0, 20.0: 1.0}
    for epoch, lam in expected.items():
        assert state.lambda_at(epoch) == pytest.approx(lam, abs=1e-12)
        assert ctkd_lambda(epoch) == pytest.approx(lam, abs=1e-12)
    # Cosine, not linear: a quarter of the way in, lambda = (1 - cos(pi/4)) / 2.
    assert ctkd_lambda(2.5) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert ctkd_lambda(5.0, lambda_min=0.2, lambda_max=0.6, curriculum_epochs=10) == pytest.approx(0.4)


def test_ctkd_temperature_init_and_range() -> None:
    state = CTKDTemperature()
    assert state.raw_T.item() == pytest.approx(1.0, abs=1e-6)  # official code: raw parameter = 1
    assert state.temperature == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)
    custom = CTKDTemperature(init_T=4.0)
    out = custom(0.0)["temperature"]
    assert out.shape == () and out.item() == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError):
        CTKDTemperature(init_T=30.0)


# --------------------------------------------------------------------------- multi-teacher KD


def test_multi_kd_one_teacher_is_kd() -> None:
    s, t = t64(rand(5, 6, seed=24)), t64(rand(5, 6, seed=25))
    assert multi_kd(s, [t], weights=[1.0]).item() == pytest.approx(kd(s, t).item(), rel=1e-12)
    assert multi_kd(s, [t], weights=[1.0], T=2.0, standardize=True).item() == pytest.approx(
        kd(s, t, T=2.0, standardize=True).item(), rel=1e-12
    )


def test_multi_kd_two_teachers_against_hand_average() -> None:
    s, t1, t2 = rand(5, 6, seed=26), rand(5, 6, seed=27), rand(5, 6, seed=28)
    T = 4.0
    q = 0.25 * np.exp(np_log_softmax(t1 / T)) + 0.75 * np.exp(np_log_softmax(t2 / T))
    ref = float(T**2 * np_kl(q, np.exp(np_log_softmax(s / T))).mean())
    got = multi_kd(t64(s), [t64(t1), t64(t2)], weights=[0.25, 0.75], T=T)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    # Weights are normalised, and may be a tensor.
    scaled = multi_kd(t64(s), [t64(t1), t64(t2)], weights=torch.tensor([2.0, 6.0]), T=T)
    assert scaled.item() == pytest.approx(ref, rel=1e-10)


def test_multi_kd_zero_weight_drops_teacher() -> None:
    s, t1, t2 = t64(rand(4, 5, seed=29)), t64(rand(4, 5, seed=30)), t64(rand(4, 5, seed=31))
    assert multi_kd(s, [t1, t2], weights=[0.0, 1.0]).item() == pytest.approx(kd(s, t2).item(), rel=1e-12)


def test_multi_kd_validates_weights() -> None:
    s, t = t64(S), t64(TE)
    with pytest.raises(ValueError, match="2 weights for 1 teachers"):
        multi_kd(s, [t], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        multi_kd(s, [t, t], weights=[1.5, -0.5])
    with pytest.raises(ValueError, match="all be zero"):
        multi_kd(s, [t, t], weights=[0.0, 0.0])


def test_multi_kd_standardize_invariant() -> None:
    s, t1, t2 = rand(4, 6, seed=32), rand(4, 6, seed=33), rand(4, 6, seed=34)
    a = multi_kd(t64(s), [t64(t1), t64(t2)], weights=[0.5, 0.5], standardize=True)
    b = multi_kd(t64(5.0 * s + 2.0), [t64(t1), t64(t2)], weights=[0.5, 0.5], standardize=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


# --------------------------------------------------------------------------- shapes and registry


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t: kd(s, t),
        lambda s, t: dkd(s, t, torch.tensor([0, 1])),
        lambda s, t: dist(s, t),
        lambda s, t: ctkd(s, t, temperature=2.0),
        lambda s, t: multi_kd(s, [t], weights=[1.0]),
    ],
)
def test_class_mismatch_names_both_shapes(call) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        call(torch.zeros(2, 3), torch.zeros(2, 4))


def test_registry_entries() -> None:
    assert get_loss("kd").params == {"T": 4.0, "standardize": False}
    assert get_loss("dkd").uses_target
    assert get_loss("dkd").params == {"alpha": 1.0, "beta": 8.0, "T": 4.0, "standardize": False}
    assert get_loss("dist").params == {"beta": 1.0, "gamma": 1.0, "T": 1.0}
    assert get_loss("ce").uses_target and not get_loss("ce").uses_teacher
    assert get_loss("multi_kd").multi_teacher
    assert get_loss("multi_kd").params == {"T": 4.0, "standardize": False}
    assert get_loss("ctkd").state is CTKDTemperature and get_loss("ctkd").params == {}
    for name in ("ce", "kd", "dkd", "dist", "ctkd", "multi_kd"):
        info = get_loss(name)
        assert info.paper and info.summary


def test_registry_unknown_name_suggests() -> None:
    with pytest.raises(ProtegeError, match=r"\bkd\b"):
        get_loss("kdd")


def test_state_called_like_the_term() -> None:
    # The term calls state(progress) and passes the result as keyword arguments to the loss.
    info = get_loss("ctkd")
    state = info.state()
    s = torch.randn(4, 5, requires_grad=True)
    loss = info.fn(s, torch.randn(4, 5), **state(1.5), **info.params)
    loss.backward()
    assert s.grad is not None and state.raw_T.grad is not None
