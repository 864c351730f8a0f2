"""Feature-map and relation losses, each checked against an independent float64 numpy reference.

The references are written as plain loops over samples, channels, positions, pairs and triplets,
not as vectorised tensor code, so they share no code path with the implementations.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import protege.losses.features  # noqa: F401  (registers on import)
import protege.losses.relations  # noqa: F401  (registers on import)
from protege.losses.features import at, attention_map, fitnet, ickd, match_spatial, nst
from protege.losses.registry import get_loss
from protege.losses.relations import cc, correlation_matrix, pkt, rkd, sp
from references import np_adaptive_pool, rand, t64

# Tiny feature maps: N=3, C=2, H=W=2 (teacher with 3 channels where channels may differ).
FS = rand(3, 2, 2, 2, seed=1)
FT = rand(3, 2, 2, 2, seed=2)
FT3 = rand(3, 3, 2, 2, seed=3)


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else list(v)


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- FitNets


def test_fitnet_by_hand() -> None:
    total = sum((a - b) ** 2 for a, b in zip(FS.ravel(), FT.ravel(), strict=True))
    assert fitnet(t64(FS), t64(FT)).item() == pytest.approx(total / FS.size, rel=1e-12)
    s2, t2 = rand(4, 5, seed=4), rand(4, 5, seed=5)  # (N, D) features too
    assert fitnet(t64(s2), t64(t2)).item() == pytest.approx(((s2 - t2) ** 2).mean(), rel=1e-12)
    assert fitnet(t64(FS), t64(FS)).item() == 0.0


# --------------------------------------------------------------------------- AT


def np_at(s: np.ndarray, t: np.ndarray, p: float) -> float:
    n, _, h, w = s.shape
    total = 0.0
    for i in range(n):
        maps = []
        for f in (s[i], t[i]):
            q = [
                sum(abs(f[c, y, x]) ** p for c in range(f.shape[0])) / f.shape[0]
                for y in range(h)
                for x in range(w)
            ]
            maps.append(unit(q))
        total += sum((a - b) ** 2 for a, b in zip(*maps, strict=True))
    return total / (n * h * w)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_at_matches_loops_with_different_channels(p: float) -> None:
    assert at(t64(FS), t64(FT3), p=p).item() == pytest.approx(np_at(FS, FT3, p), rel=1e-12)
    assert at(t64(FS), t64(FS), p=p).item() == pytest.approx(0.0, abs=1e-15)


def test_at_pools_the_larger_map() -> None:
    s = rand(3, 2, 3, 5, seed=6)  # larger: pooled to (2, 4)
    t = rand(3, 4, 2, 4, seed=7)
    ref = np_at(np_adaptive_pool(s, 2, 4), t, 2.0)
    assert at(t64(s), t64(t)).item() == pytest.approx(ref, rel=1e-12)
    assert at(t64(t), t64(s)).item() == pytest.approx(np_at(t, np_adaptive_pool(s, 2, 4), 2.0), rel=1e-12)
    # Mixed: student taller, teacher wider -> both pooled to (min H, min W).
    a, b = match_spatial(t64(rand(1, 1, 4, 2, seed=8)), t64(rand(1, 1, 2, 6, seed=9)))
    assert a.shape[-2:] == b.shape[-2:] == (2, 2)


def test_at_invariances() -> None:
    base = at(t64(FS), t64(FT3)).item()
    # Scaling the student changes no normalised attention map.
    assert at(t64(7.5 * FS), t64(FT3)).item() == pytest.approx(base, rel=1e-10)
    # Duplicating the student's channels (C: 2 -> 4) leaves the channel mean unchanged.
    assert at(t64(np.concatenate([FS, FS], axis=1)), t64(FT3)).item() == pytest.approx(base, rel=1e-10)
    q = attention_map(t64(FS))
    assert q.shape == (3, 4) and torch.allclose(q.norm(dim=1), torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------- NST


def np_nst(s: np.ndarray, t: np.ndarray, degree: int = 2, c: float = 0.0) -> float:
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        vs = [unit(list(s[i, k].ravel())) for k in range(s.shape[1])]
        vt = [unit(list(t[i, k].ravel())) for k in range(t.shape[1])]

        def k(a, b):
            return (dot(a, b) + c) ** degree

        tt = sum(k(a, b) for a in vt for b in vt) / len(vt) ** 2
        ss = sum(k(a, b) for a in vs for b in vs) / len(vs) ** 2
        st = sum(k(a, b) for a in vs for b in vt) / (len(vs) * len(vt))
        total += tt + ss - 2 * st
    return total / n


def test_nst_matches_loops() -> None:
    assert nst(t64(FS), t64(FT3)).item() == pytest.approx(np_nst(FS, FT3), rel=1e-10)
    assert nst(t64(FS), t64(FT), degree=3, c=0.5).item() == pytest.approx(np_nst(FS, FT, 3, 0.5), rel=1e-10)
    s = rand(3, 2, 4, 4, seed=10)  # pooled to the teacher's 2x2
    assert nst(t64(s), t64(FT3)).item() == pytest.approx(np_nst(np_adaptive_pool(s, 2, 2), FT3), rel=1e-10)


def test_nst_zero_and_invariances() -> None:
    assert nst(t64(FS), t64(FS)).item() == pytest.approx(0.0, abs=1e-14)
    base = nst(t64(FS), t64(FT3)).item()
    # Channels are a set of normalised samples: positive per-channel scaling and order do not matter.
    scaled = FS * np.array([3.0, 0.2]).reshape(1, 2, 1, 1)
    assert nst(t64(scaled), t64(FT3)).item() == pytest.approx(base, rel=1e-10)
    assert nst(t64(FS[:, ::-1].copy()), t64(FT3)).item() == pytest.approx(base, rel=1e-10)


# --------------------------------------------------------------------------- ICKD


def np_ickd(s: np.ndarray, t: np.ndarray, normalize: bool) -> float:
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        grams = []
        for f in (s[i], t[i]):
            rows = [list(f[m].ravel()) for m in range(c)]
            g = [[dot(rows[a], rows[b]) for b in range(c)] for a in range(c)]
            g = [unit(r) for r in g] if normalize else [[v / len(rows[0]) for v in r] for r in g]
            grams.append(g)
        total += sum((grams[0][a][b] - grams[1][a][b]) ** 2 for a in range(c) for b in range(c))
    return total / (n * c) if normalize else total / (n * c * c)


@pytest.mark.parametrize("normalize", [True, False])
def test_ickd_matches_loops(normalize: bool) -> None:
    got = ickd(t64(FS), t64(FT), normalize=normalize)
    assert got.item() == pytest.approx(np_ickd(FS, FT, normalize), rel=1e-10)
    assert ickd(t64(FS), t64(FS), normalize=normalize).item() == pytest.approx(0.0, abs=1e-15)


def test_ickd_spatial_sizes_may_differ_and_normalised_form_is_scale_invariant() -> None:
    s, t = rand(3, 2, 3, 3, seed=11), rand(3, 2, 2, 2, seed=12)
    assert ickd(t64(s), t64(t), normalize=False).item() == pytest.approx(np_ickd_mixed(s, t), rel=1e-10)
    a = ickd(t64(s), t64(t)).item()
    assert ickd(t64(4.0 * s), t64(t)).item() == pytest.approx(a, rel=1e-10)


def np_ickd_mixed(s: np.ndarray, t: np.ndarray) -> float:
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for a, b in itertools.product(range(c), range(c)):
            gs = dot(s[i, a].ravel(), s[i, b].ravel()) / s[i, a].size
            gt = dot(t[i, a].ravel(), t[i, b].ravel()) / t[i, a].size
            total += (gs - gt) ** 2
    return total / (n * c * c)


def test_ickd_rejects_channel_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(3, 2, 2, 2\).*\(3, 3, 2, 2\).*adapter"):
        ickd(t64(FS), t64(FT3))


# --------------------------------------------------------------------------- SP

ES = rand(4, 3, seed=13)  # embeddings: N=4, D_s=3
ET = rand(4, 5, seed=14)  # D_t=5


def np_sp(s: np.ndarray, t: np.ndarray) -> float:
    n = s.shape[0]
    s, t = s.reshape(n, -1), t.reshape(n, -1)
    gs = [unit([dot(s[i], s[j]) for j in range(n)]) for i in range(n)]
    gt = [unit([dot(t[i], t[j]) for j in range(n)]) for i in range(n)]
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def test_sp_matches_loops() -> None:
    assert sp(t64(ES), t64(ET)).item() == pytest.approx(np_sp(ES, ET), rel=1e-12)
    assert sp(t64(FS), t64(FT3)).item() == pytest.approx(np_sp(FS, FT3), rel=1e-12)  # maps flattened
    assert sp(t64(ES), t64(ES)).item() == pytest.approx(0.0, abs=1e-15)
    assert sp(t64(0.01 * ES), t64(ET)).item() == pytest.approx(np_sp(ES, ET), rel=1e-10)


# --------------------------------------------------------------------------- CC


def np_cc(s: np.ndarray, t: np.ndarray, kernel: str, gamma: float, P: int) -> float:
    n = s.shape[0]

    def corr(x: np.ndarray) -> list[list[float]]:
        xs = [unit(list(x[i].ravel())) for i in range(n)]
        out = []
        for i in range(n):
            row = []
            for j in range(n):
                d = dot(xs[i], xs[j])
                if kernel == "bilinear":
                    row.append(d)
                else:
                    row.append(
                        sum(
                            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * d**p
                            for p in range(P + 1)
                        )
                    )
            out.append(row)
        return out

    cs, ct = corr(s), corr(t)
    return sum((cs[i][j] - ct[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


@pytest.mark.parametrize(
    ("kernel", "gamma", "P"), [("gaussian", 0.4, 2), ("gaussian", 1.0, 4), ("bilinear", 0.4, 2)]
)
def test_cc_matches_loops(kernel: str, gamma: float, P: int) -> None:
    got = cc(t64(ES), t64(ET), kernel=kernel, gamma=gamma, P=P)
    assert got.item() == pytest.approx(np_cc(ES, ET, kernel, gamma, P), rel=1e-10)
    assert cc(t64(ES), t64(ES), kernel=kernel).item() == pytest.approx(0.0, abs=1e-15)


def test_cc_taylor_series_approaches_the_gaussian_rbf() -> None:
    x = ES / np.linalg.norm(ES, axis=1, keepdims=True)
    exact = np.array([[math.exp(-0.4 * np.sum((a - b) ** 2)) for b in x] for a in x])
    approx = correlation_matrix(t64(ES), "gaussian", gamma=0.4, P=20).numpy()
    assert np.allclose(approx, exact, atol=1e-12)
    with pytest.raises(ValueError, match="kernel"):
        cc(t64(ES), t64(ET), kernel="poly")


# --------------------------------------------------------------------------- RKD


def huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def loop_rkd(s: torch.Tensor, t: torch.Tensor, w_dist: float, w_angle: float) -> torch.Tensor:
    """RKD by its definition, one pair and one triplet at a time, on float64 tensors (so autograd
    gives the reference gradient). A zero difference (i == j, or duplicate samples) has neither
    length nor direction: its distance and unit vector are the constants 0 (no gradient)."""
    n = s.shape[0]
    s, t = s.reshape(n, -1), t.reshape(n, -1)

    def diff_or_none(x, i, j):
        v = x[i] - x[j]
        return v if bool((v != 0).any()) else None

    def dists(x):
        d = [[x.new_zeros(()) for _ in range(n)] for _ in range(n)]
        for i, j in itertools.product(range(n), repeat=2):
            v = diff_or_none(x, i, j)
            if v is not None:
                d[i][j] = (v * v).sum().sqrt()
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    def unit(x, i, j):
        v = diff_or_none(x, i, j)
        return x.new_zeros(x.shape[1]) if v is None else v / (v * v).sum().sqrt()

    def angle(x, i, j, k):  # cosine at vertex j
        return (unit(x, i, j) * unit(x, k, j)).sum()

    ds, dt = dists(s), dists(t)
    loss_d = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    triplets = list(itertools.product(range(n), repeat=3))
    loss_a = sum(huber(angle(s, i, j, k), angle(t, i, j, k)) for i, j, k in triplets) / n**3
    return w_dist * loss_d + w_angle * loss_a


def np_rkd(s: np.ndarray, t: np.ndarray, w_dist: float, w_angle: float) -> float:
    return float(loop_rkd(t64(s), t64(t), w_dist, w_angle))


@pytest.mark.parametrize(("w_dist", "w_angle"), [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_loops(w_dist: float, w_angle: float) -> None:
    got = rkd(t64(ES), t64(ET), w_dist=w_dist, w_angle=w_angle)
    assert got.item() == pytest.approx(np_rkd(ES, ET, w_dist, w_angle), rel=1e-10)


def test_rkd_huber_branches_are_both_exercised() -> None:
    # Spread-out teacher vs clustered student: some normalised distances differ by more than 1.
    s = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]])
    t = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
    assert rkd(t64(s), t64(t)).item() == pytest.approx(np_rkd(s, t, 25.0, 50.0), rel=1e-10)
    assert rkd(t64(FS), t64(FT3)).item() == pytest.approx(np_rkd(FS, FT3, 25.0, 50.0), rel=1e-10)


def test_rkd_zero_and_invariances() -> None:
    assert rkd(t64(ES), t64(ES)).item() == pytest.approx(0.0, abs=1e-14)
    base = rkd(t64(ES), t64(ET)).item()
    dist_only = rkd(t64(ES), t64(ET), w_angle=0.0).item()
    assert rkd(t64(3.0 * ES), t64(ET), w_angle=0.0).item() == pytest.approx(dist_only, rel=1e-10)
    # Full RKD: invariant to a similarity transform (rotation, uniform scaling, translation).
    q, _ = np.linalg.qr(rand(3, 3, seed=15))
    moved = 0.3 * ES @ q + np.array([1.0, -2.0, 0.5])
    assert rkd(t64(moved), t64(ET)).item() == pytest.approx(base, rel=1e-9)


def test_rkd_with_duplicate_samples_matches_the_reference() -> None:
    # Samples 0 and 1 coincide: their difference has no direction, so it adds a cosine of 0 and no
    # gradient, as the reference says (F.normalize would pass 1/eps = 1e12 times the upstream one).
    x = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [-1.0, 0.5]])
    t = rand(4, 4, seed=16)
    s = t64(x, grad=True)
    loss = rkd(s, t64(t))
    loss.backward()
    ref_s = t64(x, grad=True)
    ref = loop_rkd(ref_s, t64(t), 25.0, 50.0)
    ref.backward()
    # rel 1e-6: the duplicate pair's distance is sqrt(1e-12) = 1e-6, not 0 (the clamp before the root,
    # as in the authors' pdist), which moves the value by 2e-7 of itself
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(s.grad.numpy(), ref_s.grad.numpy(), rtol=1e-5, atol=1e-6)  # (the same floor)
    assert s.grad.abs().max() < 10.0 and s.grad[2:].abs().sum() > 0


def test_rkd_needs_two_samples() -> None:
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 5\)"):
        rkd(t64(ES[:1]), t64(ET[:1]))


# --------------------------------------------------------------------------- PKT


def np_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    n = s.shape[0]
    s, t = s.reshape(n, -1), t.reshape(n, -1)

    def cond(x):
        xs = [[v / (math.sqrt(dot(x[i], x[i])) + eps) for v in x[i]] for i in range(n)]
        k = [[(dot(xs[i], xs[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[v / sum(row) for v in row] for row in k]

    q, p = cond(s), cond(t)
    return (
        sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(n) for j in range(n)) / n**2
    )


def test_pkt_matches_loops() -> None:
    assert pkt(t64(ES), t64(ET)).item() == pytest.approx(np_pkt(ES, ET), rel=1e-10)
    assert pkt(t64(FS), t64(FT3)).item() == pytest.approx(np_pkt(FS, FT3), rel=1e-10)
    assert pkt(t64(ES), t64(ES)).item() == 0.0
    assert pkt(t64(ES), t64(ET)).item() > 0
    assert pkt(t64(100.0 * ES), t64(ET)).item() == pytest.approx(np_pkt(ES, ET), rel=1e-6)


# --------------------------------------------------------------------------- gradients, shapes, registry

FEATURE_LOSSES = {
    "fitnet": (fitnet, FT),
    "at": (at, FT3),
    "nst": (nst, FT3),
    "ickd": (ickd, FT),
}
RELATION_LOSSES = {"sp": sp, "cc": cc, "rkd": rkd, "pkt": pkt}


@pytest.mark.parametrize("name", [*FEATURE_LOSSES, *RELATION_LOSSES])
def test_gradients_reach_the_student_only(name: str) -> None:
    if name in FEATURE_LOSSES:
        fn, t = FEATURE_LOSSES[name]
        student, teacher = t64(FS, grad=True), t64(t)
    else:
        fn = RELATION_LOSSES[name]
        student, teacher = t64(ES, grad=True), t64(ET)
    loss = fn(student, teacher)
    assert loss.dim() == 0
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_float32_runs() -> None:
    s, t = torch.randn(4, 3, 4, 4, requires_grad=True), torch.randn(4, 5, 2, 2)
    for fn in (at, nst, sp, cc, rkd, pkt):
        loss = fn(s, t)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("fn", "s_shape", "t_shape"),
    [
        (fitnet, (3, 2, 2, 2), (3, 4, 2, 2)),
        (at, (3, 2, 2, 2), (4, 2, 2, 2)),
        (at, (3, 4), (3, 4)),
        (nst, (3, 2, 2, 2), (4, 2, 2, 2)),
        (ickd, (3, 2, 2, 2), (4, 2, 2, 2)),
        (sp, (3, 4), (5, 4)),
        (cc, (3, 4), (5, 4)),
        (rkd, (3, 4), (5, 4)),
        (pkt, (3, 4), (5, 4)),
        (pkt, (3,), (3,)),
    ],
)
def test_shape_mismatch_names_both_shapes(fn, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
    pattern = re_shape(s_shape) + ".*" + re_shape(t_shape)
    with pytest.raises(ValueError, match=pattern):
        fn(torch.zeros(s_shape), torch.zeros(t_shape))


def re_shape(shape: tuple[int, ...]) -> str:
    return r"\(" + r",\s*".join(str(d) for d in shape) + (r",\)" if len(shape) == 1 else r"\)")


def test_registry_entries() -> None:
    expected = {
        "fitnet": ("features", {}),
        "at": ("features", {"p": 2.0}),
        "nst": ("features", {"degree": 2, "c": 0.0}),
        "ickd": ("features", {"normalize": True}),
        "sp": ("embeddings", {}),
        "cc": ("embeddings", {"kernel": "gaussian", "gamma": 0.4, "P": 2}),
        "rkd": ("embeddings", {"w_dist": 25.0, "w_angle": 50.0}),
        "pkt": ("embeddings", {"eps": 1e-7}),
    }
    for name, (reads, params) in expected.items():
        info = get_loss(name)
        assert info.reads == reads and info.params == params, name
        assert info.uses_teacher and not info.uses_target and not info.multi_teacher and info.state is None
        assert info.paper and info.summary and not info.summary.startswith(" ")


def test_called_like_the_term() -> None:
    # The term calls fn(student, teacher, **params).
    for name, (s, t) in {"at": (FS, FT3), "rkd": (ES, ET), "cc": (ES, ET)}.items():
        info = get_loss(name)
        student = t64(s, grad=True)
        info.fn(student, t64(t), **info.params).backward()
        assert student.grad is not None
