"""Landmark losses against element-by-element computations written from the reference's formulas."""

from __future__ import annotations

import math

import pytest
import torch

import protege as pg
from protege.errors import ProtegeError
from protege.losses import get_loss
from protege.losses.landmarks import aloss, kd_loss, l1, l2, wing


def _sign(v: float) -> float:
    return (v > 0) - (v < 0)


def _aloss_loop(s, t, y, a_pos, a_neg, band=0.15) -> float:
    """aliprf/KD-Loss custom_Losses.kd_loss's assistive term, one coordinate at a time."""
    total, n = 0.0, 0
    for sv, tv, yv in zip(s.flatten().tolist(), t.flatten().tolist(), y.flatten().tolist()):
        tr = yv + _sign(sv - yv) * abs(tv - yv)
        b = yv + _sign(sv - yv) * abs(tr - yv) * band
        w = 0.0
        if _sign(sv - tr) * _sign(tr - yv) > 0:
            w += a_pos
        if _sign(tr - sv) * _sign(sv - b) >= 0:
            w += a_neg
        total += w * abs(tr - sv)
        n += 1
    return total / n


def _main_loop(s, tol, y) -> float:
    total = 0.0
    vals = list(zip(s.flatten().tolist(), tol.flatten().tolist(), y.flatten().tolist()))
    for sv, tv, yv in vals:
        e, d = abs(yv - sv), abs(yv - tv)
        total += 3 * e if e <= d else e * e + 3 * d - d * d
    return total / len(vals)


@pytest.fixture
def pts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.rand(4, 68, 2, generator=g) - 0.5
    s = y + 0.05 * torch.randn(4, 68, 2, generator=g)
    tough = y + 0.02 * torch.randn(4, 68, 2, generator=g)
    tol = y + 0.04 * torch.randn(4, 68, 2, generator=g)
    return s, tough, tol, y


def test_plain_losses_match_loops(pts) -> None:
    s, _, _, y = pts
    diffs = (s - y).flatten().tolist()
    assert float(l1(s, target=y)) == pytest.approx(sum(abs(d) for d in diffs) / len(diffs), rel=1e-5)
    assert float(l2(s, target=y)) == pytest.approx(sum(d * d for d in diffs) / len(diffs), rel=1e-5)
    w, eps = 0.04, 0.01  # normalised-coordinate scale: both pieces of the wing are used
    c = w - w * math.log(1 + w / eps)
    ref = sum(w * math.log(1 + abs(d) / eps) if abs(d) < w else abs(d) - c for d in diffs) / len(diffs)
    assert float(wing(s, target=y, w=w, epsilon=eps)) == pytest.approx(ref, rel=1e-5)
    # continuity at |x| = w
    x = torch.tensor([[w - 1e-7, w + 1e-7]], dtype=torch.float64)
    a, b = (wing(x[:, i : i + 1], target=torch.zeros(1, 1, dtype=torch.float64), w=w, epsilon=eps) for i in (0, 1))
    assert float(a) == pytest.approx(float(b), abs=1e-6)


def test_aloss_matches_the_reference_code_and_its_regions(pts) -> None:
    s, tough, tol, y = pts
    for t, a, b in ((tough, 1.9, -0.45), (tol, 1.8, -0.4)):
        got = float(aloss(s, t, target=y, alpha_pos=a, alpha_neg=b))
        assert got == pytest.approx(_aloss_loop(s, t, y, a, b), rel=1e-5)
    # regions of one coordinate, y = 0, teacher at distance 1 on the other side (reflected)
    y0, t0 = torch.zeros(1, 1), torch.tensor([[-1.0]])
    beyond = torch.tensor([[2.0]], requires_grad=True)  # beyond the teacher: pulled back (α = 1.9)
    aloss(beyond, t0, target=y0).backward()
    assert float(aloss(beyond.detach(), t0, target=y0)) == pytest.approx(1.9 * 1.0)
    assert float(beyond.grad) == pytest.approx(1.9)
    near = torch.tensor([[0.5]], requires_grad=True)  # between band and teacher: pushed toward y
    value = aloss(near, t0, target=y0)
    value.backward()
    assert float(value.detach()) == pytest.approx(-0.45 * 0.5) and float(near.grad) == pytest.approx(0.45)
    inside = torch.tensor([[0.1]])  # within the band (0.15): no assistive term
    assert float(aloss(inside, t0, target=y0)) == 0.0


def test_kd_loss_is_two_main_plus_both_alosses(pts) -> None:
    s, tough, tol, y = pts
    ref = 2 * _main_loop(s, tol, y) + _aloss_loop(s, tough, y, 1.9, -0.45) + _aloss_loop(s, tol, y, 1.8, -0.4)
    assert float(kd_loss(s, [tough, tol], target=y)) == pytest.approx(ref, rel=1e-5)
    # the roles matter: swapping the teachers changes the loss
    assert float(kd_loss(s, [tol, tough], target=y)) != pytest.approx(ref, rel=1e-3)
    # the main term is continuous where the error reaches the tolerant teacher's distance
    y0, t0 = torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 0.3, dtype=torch.float64)
    lo, hi = (
        kd_loss(torch.full((1, 1), v, dtype=torch.float64), [y0, t0], target=y0, tough_weight=0, tolerant_weight=0)
        for v in (0.3 - 1e-9, 0.3 + 1e-9)
    )
    assert float(lo) == pytest.approx(float(hi), abs=1e-6)
    # teachers that predict the ground truth exactly add nothing: each ALoss is 0 and the band is 0,
    # so KD-Loss is 2 · L2 (BENCHMARKS.md's landmark analysis relies on this)
    assert float(aloss(s, y, target=y)) == 0.0
    assert float(kd_loss(s, [y, y], target=y)) == pytest.approx(2 * float(l2(s, target=y)), rel=1e-6)
    with pytest.raises(ValueError, match="exactly two teachers"):
        kd_loss(s, [tough], target=y)
    with pytest.raises(ValueError, match="must have the same"):
        kd_loss(s[:, :10], [tough, tol], target=y)


def test_registry_and_distiller_feed_kd_loss_its_teachers_in_role_order(pts) -> None:
    info = get_loss("kd_loss")
    assert info.multi_teacher and info.uses_target and info.params["main_weight"] == 2.0
    assert get_loss("aloss").uses_teacher and not get_loss("wing").uses_teacher
    s, tough, tol, y = pts

    class Fixed(torch.nn.Module):
        def __init__(self, out: torch.Tensor) -> None:
            super().__init__()
            self.out = out
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out + self.p

    teachers = [Fixed(tol), Fixed(tough)]  # given as [tolerant, tough]: the term reorders them
    task = pg.tasks.build_task("landmarks")
    term = pg.Term("kd_loss", teacher_index=[1, 0])
    distiller = pg.Distiller(Fixed(s), teachers, terms=[term, pg.Term("aloss", teacher_index=1)], task=task)
    _, losses = distiller({"image": torch.zeros(4, 3, 8, 8), "points": y})
    assert float(losses["kd_loss"].detach()) == pytest.approx(float(kd_loss(s, [tough, tol], target=y)), rel=1e-5)
    assert float(losses["aloss"].detach()) == pytest.approx(float(aloss(s, tough, target=y)), rel=1e-5)
    with pytest.raises(ProtegeError, match="teacher_index is \\[0, 2\\]"):
        pg.Distiller(Fixed(s), teachers, terms=[pg.Term("kd_loss", teacher_index=[0, 2])], task=task)
