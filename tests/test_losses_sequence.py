"""Token-level LM losses against independent float64 numpy references (plain loops over positions),
the continuity of JSD(β) at its end points, top-k with the rest bucket, and masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protege.core.distiller import Term
from protege.losses.registry import get_loss
from protege.losses.sequence import (
    IGNORE_INDEX,
    fkl,
    generalized_jsd,
    hidden_cosine,
    hidden_mse,
    minilm,
    rkl,
    skew_fkl,
    skew_rkl,
    tvd,
)
from references import rand, t64

pytestmark = pytest.mark.usefixtures("one_thread")

B, L, V = 2, 5, 7


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def target_with_prompt() -> np.ndarray:
    """Labels (B, L): the first two positions of sample 0 are prompt, the last of each is padding."""
    y = np.random.default_rng(3).integers(0, V, size=(B, L))
    y[0, :2] = IGNORE_INDEX
    y[:, -1] = IGNORE_INDEX
    return y


def reference(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, per_token, T: float = 1.0) -> float:
    values = [
        per_token(softmax(zs[b, i] / T), softmax(zt[b, i] / T))
        for b in range(zs.shape[0])
        for i in range(zs.shape[1])
        if y[b, i] != IGNORE_INDEX
    ]
    return float(np.mean(values))


def jsd_ref(ps: np.ndarray, pt: np.ndarray, beta: float) -> float:
    m = beta * pt + (1 - beta) * ps
    return (beta * kl(pt, m) + (1 - beta) * kl(ps, m)) / (beta * (1 - beta))


CASES = [
    (fkl, {}, lambda ps, pt: kl(pt, ps)),
    (fkl, {"T": 2.0}, lambda ps, pt: kl(pt, ps)),
    (rkl, {}, lambda ps, pt: kl(ps, pt)),
    (generalized_jsd, {"beta": 0.5}, lambda ps, pt: jsd_ref(ps, pt, 0.5)),
    (generalized_jsd, {"beta": 0.1}, lambda ps, pt: jsd_ref(ps, pt, 0.1)),
    (generalized_jsd, {"beta": 0.0}, lambda ps, pt: kl(pt, ps)),
    (generalized_jsd, {"beta": 1.0}, lambda ps, pt: kl(ps, pt)),
    (skew_fkl, {"alpha": 0.1}, lambda ps, pt: kl(pt, 0.1 * pt + 0.9 * ps)),
    (skew_rkl, {"alpha": 0.3}, lambda ps, pt: kl(ps, 0.3 * ps + 0.7 * pt)),
    (skew_fkl, {"alpha": 0.0}, lambda ps, pt: kl(pt, ps)),
    (tvd, {}, lambda ps, pt: 0.5 * float(np.abs(ps - pt).sum())),
]


@pytest.mark.parametrize("fn,params,per_token", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_divergences_match_numpy(fn, params, per_token) -> None:
    zs, zt = rand(B, L, V, seed=1, scale=2.0), rand(B, L, V, seed=2, scale=2.0)
    y = target_with_prompt()
    got = fn(t64(zs), t64(zt), torch.tensor(y), **params).item()
    expected = reference(zs, zt, y, per_token, T=params.get("T", 1.0))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_hand_computed_two_token_values() -> None:
    """One kept position, two tokens: p_t = (0.8, 0.2), p_s = (0.5, 0.5), by hand."""
    zt = torch.tensor([[[math.log(0.8), math.log(0.2)]]], dtype=torch.float64)
    zs = torch.zeros(1, 1, 2, dtype=torch.float64)
    y = torch.tensor([[1]])
    fwd = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # 0.19274...
    rev = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # 0.22314...
    assert fkl(zs, zt, y).item() == pytest.approx(fwd, rel=1e-12)
    assert fwd == pytest.approx(0.1927448, abs=1e-7)
    assert rkl(zs, zt, y).item() == pytest.approx(rev, rel=1e-12)
    assert tvd(zs, zt, y).item() == pytest.approx(0.3, rel=1e-12)
    # JSD(0.5): m = (0.65, 0.35)
    jsd = 0.5 * (0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.2 / 0.35))
    jsd += 0.5 * (0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.5 / 0.35))
    assert generalized_jsd(zs, zt, y, beta=0.5).item() == pytest.approx(4 * jsd, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jsd_is_continuous_at_both_ends(dtype) -> None:
    """JSD(β) → the end points' KLs as β → 0 and 1 (the gap shrinks like β), in float32 too."""
    zs, zt = rand(B, L, V, seed=4), rand(B, L, V, seed=5)
    s, t = torch.tensor(zs, dtype=dtype), torch.tensor(zt, dtype=dtype)
    y = torch.tensor(target_with_prompt())
    forward, reverse = fkl(s, t, y).item(), rkl(s, t, y).item()
    assert forward != pytest.approx(reverse, rel=0.02)  # the two ends really differ
    assert generalized_jsd(s, t, y, beta=0.0).item() == pytest.approx(forward, rel=1e-6)
    assert generalized_jsd(s, t, y, beta=1.0).item() == pytest.approx(reverse, rel=1e-6)
    gaps = []
    for eps in (1e-2, 1e-4, 1e-6):
        gaps.append(abs(generalized_jsd(s, t, y, beta=eps).item() - forward) / forward)
        gaps.append(abs(generalized_jsd(s, t, y, beta=1 - eps).item() - reverse) / reverse)
    assert gaps[0] > 1e-3 and gaps[1] > 1e-3  # β = 0.01 is visibly inside the interval
    assert gaps[2] < 3e-4 and gaps[3] < 3e-4 and gaps[4] < 1e-5 and gaps[5] < 1e-5


def top_k_reference(ps: np.ndarray, pt: np.ndarray, k: int, per_token) -> float:
    order = np.argsort(-pt)[:k]
    bs = np.append(ps[order], 1 - ps[order].sum())
    bt = np.append(pt[order], 1 - pt[order].sum())
    return per_token(bs, bt)


@pytest.mark.parametrize("fn,params,per_token", [CASES[0], CASES[2], CASES[3], CASES[-1]], ids=str)
def test_top_k_keeps_the_missing_mass_in_a_rest_bucket(fn, params, per_token) -> None:
    zs, zt = rand(B, L, V, seed=6, scale=2.0), rand(B, L, V, seed=7, scale=2.0)
    y = target_with_prompt()
    got = fn(t64(zs), t64(zt), torch.tensor(y), top_k=3, **params).item()
    expected = reference(zs, zt, y, lambda ps, pt: top_k_reference(ps, pt, 3, per_token))
    assert got == pytest.approx(expected, rel=1e-6)
    full = fn(t64(zs), t64(zt), torch.tensor(y), **params).item()
    assert got < full  # coarse-graining never increases a divergence (data processing)
    assert fn(t64(zs), t64(zt), torch.tensor(y), top_k=V, **params).item() == pytest.approx(full, rel=1e-12)


def test_top_k_penalises_mass_outside_the_teachers_top_k() -> None:
    """Renormalising over the top-k would call these equal; the rest bucket does not."""
    zt = torch.tensor([[[5.0, 4.0, 0.0, 0.0]]], dtype=torch.float64)
    same_head = torch.tensor([[[5.0, 4.0, 8.0, 8.0]]], dtype=torch.float64)  # same ratio on the top-2
    y = torch.tensor([[0]])
    assert fkl(same_head, zt, y, top_k=2).item() > 0.5
    assert fkl(zt.clone(), zt, y, top_k=2).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "fn", [fkl, rkl, generalized_jsd, skew_fkl, skew_rkl, tvd, hidden_mse, hidden_cosine]
)
def test_ignored_positions_contribute_nothing(fn) -> None:
    zs, zt = rand(B, L, V, seed=8), rand(B, L, V, seed=9)
    y = torch.tensor(target_with_prompt())
    s = t64(zs, grad=True)
    base = fn(s, t64(zt), y)
    base.backward()
    ignored = y == IGNORE_INDEX
    assert torch.all(s.grad[ignored] == 0) and s.grad[~ignored].abs().sum() > 0
    changed_s, changed_t = zs.copy(), zt.copy()
    changed_s[ignored.numpy()] = 1e3  # anything at all on prompt and padding positions
    changed_t[ignored.numpy()] = -1e3
    assert fn(t64(changed_s), t64(changed_t), y).item() == pytest.approx(base.item(), rel=1e-12)
    nothing = torch.full_like(y, IGNORE_INDEX)
    assert fn(t64(zs), t64(zt), nothing).item() == 0.0


def test_hidden_losses_match_numpy() -> None:
    hs, ht = rand(B, L, 6, seed=10), rand(B, L, 6, seed=11)
    y = target_with_prompt()
    kept = [(b, i) for b in range(B) for i in range(L) if y[b, i] != IGNORE_INDEX]
    mse = np.mean([np.mean((hs[b, i] - ht[b, i]) ** 2) for b, i in kept])
    cos = np.mean(
        [1 - hs[b, i] @ ht[b, i] / np.linalg.norm(hs[b, i]) / np.linalg.norm(ht[b, i]) for b, i in kept]
    )
    assert hidden_mse(t64(hs), t64(ht), torch.tensor(y)).item() == pytest.approx(mse, rel=1e-6)
    assert hidden_cosine(t64(hs), t64(ht), torch.tensor(y)).item() == pytest.approx(cos, rel=1e-6)


def test_hidden_loss_with_a_learned_projection_through_a_term() -> None:
    """A thinner student: the term's linear adapter (TinyBERT's W_h) maps D_s=4 onto D_t=6 and trains."""
    term = Term("hidden_mse", 1.0, student="h", teacher="h", adapter="linear")
    hs, ht = torch.randn(B, L, 4), torch.randn(B, L, 6)
    y = torch.tensor(target_with_prompt())
    term.build_adapter(hs, ht)
    loss = term({"h": hs}, [{"h": ht}], y, [1.0])
    w, b = term.adapter.weight.detach().numpy(), term.adapter.bias.detach().numpy()
    projected = hs.numpy() @ w.T + b
    kept = y.numpy() != IGNORE_INDEX
    assert loss.item() == pytest.approx(np.mean((projected - ht.numpy())[kept] ** 2), rel=1e-5)
    loss.backward()
    assert term.adapter.weight.grad.abs().sum() > 0


def np_relation(a: np.ndarray, b: np.ndarray, heads: int) -> np.ndarray:
    """(heads, L, L) causal softmax(a_h b_h^T / sqrt(d)) of one sample, by loops; keys repeated (GQA)."""
    length, da = a.shape
    d = da // heads
    kv_heads = b.shape[1] // d
    out = np.zeros((heads, length, length))
    for h in range(heads):
        g = h // (heads // kv_heads)
        for i in range(length):
            scores = [
                a[i, h * d : (h + 1) * d] @ b[j, g * d : (g + 1) * d] / math.sqrt(d) for j in range(i + 1)
            ]
            out[h, i, : i + 1] = softmax(np.array(scores))
    return out


def test_minilm_matches_loops_with_grouped_query_keys() -> None:
    # teacher: 4 query heads of width 4, 2 key/value heads (GQA); student: width 8, heads of 2
    y = target_with_prompt()
    tq, tk, tv = rand(B, L, 16, seed=12), rand(B, L, 8, seed=13), rand(B, L, 8, seed=14)
    sq, sk, sv = rand(B, L, 8, seed=15), rand(B, L, 8, seed=16), rand(B, L, 4, seed=17)
    heads = 4
    expected = 0.0
    for a_s, b_s, a_t, b_t in ((sq, sk, tq, tk), (sv, sv, tv, tv)):
        vals = []
        for b in range(B):
            rs, rt = np_relation(a_s[b], b_s[b], heads), np_relation(a_t[b], b_t[b], heads)
            for i in range(L):
                if y[b, i] != IGNORE_INDEX:
                    vals.append(np.mean([kl(rt[h, i, : i + 1], rs[h, i, : i + 1]) for h in range(heads)]))
        expected += float(np.mean(vals))
    got = minilm([t64(sq), t64(sk), t64(sv)], [t64(tq), t64(tk), t64(tv)], torch.tensor(y), heads=heads)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="relation heads"):
        minilm([t64(sq), t64(sk), t64(sv)], [t64(tq), t64(tk), t64(tv)], torch.tensor(y), heads=5)


def test_minilm_bidirectional_matches_loops_and_ignores_padding() -> None:
    """causal=False (MiniLM on an encoder): every kept position is a key; padding is neither."""
    y = np.zeros((2, 5), dtype=np.int64)
    y[1, 3:] = IGNORE_INDEX  # the second text is two tokens shorter (right padding)
    tq, tk, tv = rand(2, 5, 8, seed=20), rand(2, 5, 8, seed=21), rand(2, 5, 8, seed=22)
    sq, sk, sv = rand(2, 5, 4, seed=23), rand(2, 5, 4, seed=24), rand(2, 5, 4, seed=25)
    heads = 2

    def full(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:  # (heads, n, n) over the first n tokens
        d = a.shape[1] // heads
        out = np.zeros((heads, n, n))
        for h in range(heads):
            for i in range(n):
                scores = [a[i, h * d : (h + 1) * d] @ b[j, h * d : (h + 1) * d] / math.sqrt(d) for j in range(n)]
                out[h, i] = softmax(np.array(scores))
        return out

    expected = 0.0
    for a_s, b_s, a_t, b_t in ((sq, sk, tq, tk), (sv, sv, tv, tv)):
        vals = []
        for b, n in ((0, 5), (1, 3)):
            rs, rt = full(a_s[b], b_s[b], n), full(a_t[b], b_t[b], n)
            vals += [np.mean([kl(rt[h, i], rs[h, i]) for h in range(heads)]) for i in range(n)]
        expected += float(np.mean(vals))
    args = ([t64(sq), t64(sk), t64(sv)], [t64(tq), t64(tk), t64(tv)], torch.tensor(y))
    got = minilm(*args, heads=heads, causal=False)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert minilm(*args, heads=heads).item() != pytest.approx(expected, rel=1e-3)  # causal differs
    # what padding holds does not matter
    noisy = [t.clone() for t in args[0]]
    for t in noisy:
        t[1, 3:] += 100.0
    assert minilm(noisy, args[1], args[2], heads=heads, causal=False).item() == pytest.approx(expected, rel=1e-6)


def test_registry_entries() -> None:
    for name in ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "hidden_mse", "hidden_cosine", "minilm"):
        info = get_loss(name)
        assert info.uses_target and info.uses_teacher and info.paper
    assert get_loss("jsd").params == {"beta": 0.5, "T": 1.0, "top_k": 0}
    assert get_loss("minilm").reads == "feature-list"
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(
            torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), beta=1.5
        )
    with pytest.raises(ValueError, match="same tokenizer"):
        fkl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), torch.zeros(1, 2, dtype=torch.long))
