"""PointDistiller's loss against a loop written from the paper's formula, and inside the Distiller."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import protege as pg
from protege.errors import ProtegeError
from protege.losses.pointcloud import PointDistillerEncoders, pointdistiller
from protege.models import build_model


def reference(s, t, enc_s, enc_t, k, m, tau, reweight, graph, edge, importance, pool):
    """Point by point, with Python loops and sorting, independent of the vectorised code."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        score = [
            float(t[b, i].max()) if importance == "max" else float(t[b, i].norm()) for i in range(t.shape[1])
        ]
        chosen = sorted(range(len(score)), key=lambda i: -score[i])[:m]
        space = t[b] if graph == "teacher" else s[b]
        losses = []
        for i in chosen:
            dists = [float(((space[j] - space[i]) ** 2).sum()) for j in range(space.shape[0])]
            nbrs = sorted(range(len(dists)), key=lambda j: dists[j])[:k]

            def encode(x, enc, i=i, nbrs=nbrs):
                rows = []
                for j in nbrs:
                    first = x[j] - x[i] if edge == "diff" else x[j]
                    rows.append(enc(torch.cat([first, x[i]])))
                h = torch.stack(rows)
                return h.max(0).values if pool == "max" else h

            diff = encode(s[b], enc_s) - encode(t[b], enc_t)
            losses.append(float((diff**2).mean()))
        if reweight:
            z = [math.exp(score[i] / tau) for i in chosen]
            w = [m * v / sum(z) for v in z]
        else:
            w = [1.0] * m
        total += sum(wi * li for wi, li in zip(w, losses))
        count += m
    return total / count


@pytest.mark.parametrize(
    "graph, edge, importance, pool, reweight",
    [
        ("teacher", "diff", "max", "max", True),
        ("student", "concat", "norm", "none", True),
        ("teacher", "diff", "norm", "max", False),
    ],
)
def test_pointdistiller_matches_a_loop(graph, edge, importance, pool, reweight):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 12, 3, generator=g), torch.randn(2, 12, 5, generator=g)
    enc_s, enc_t = nn.Linear(6, 4), nn.Linear(10, 4)
    args = dict(k=4, tau=0.7, reweight=reweight, graph=graph, edge=edge, importance=importance, pool=pool)
    got = pointdistiller(s, t, num_points=5, student_encoder=enc_s, teacher_encoder=enc_t, **args)
    with torch.no_grad():
        want = reference(s, t, enc_s, enc_t, m=5, **args)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)


def test_reweighting_focuses_on_important_points():
    """With a small tau the mean of w_i * l_i is (nearly) the loss of the most important point alone."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 10, 3, generator=g), torch.rand(1, 10, 3, generator=g)
    t[0, 7] += 5.0  # by far the most important point
    enc = nn.Linear(6, 3)
    kw = dict(k=3, student_encoder=enc, teacher_encoder=enc)
    sharp = pointdistiller(s, t, num_points=10, tau=1e-3, **kw).detach()
    alone = pointdistiller(s, t, num_points=1, reweight=False, **kw).detach()
    flat = pointdistiller(s, t, num_points=10, reweight=False, **kw).detach()
    assert float(sharp) == pytest.approx(float(alone), rel=1e-4)
    assert abs(float(flat) - float(alone)) > 1e-3  # the weighting changed something


def test_identical_features_give_zero_and_gradients_reach_both_encoders():
    x = torch.randn(2, 16, 4)
    state = PointDistillerEncoders()
    state.build(x, x)
    state.teacher_encoder.load_state_dict(state.student_encoder.state_dict())
    assert float(pointdistiller(x, x, k=4, num_points=8, **state()).detach()) == pytest.approx(0.0, abs=1e-7)
    s = torch.randn(2, 16, 4, requires_grad=True)
    pointdistiller(s, x, k=4, num_points=8, **state()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None for p in state.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "s, t, match",
    [
        (torch.randn(2, 8), torch.randn(2, 8), "per-point features"),
        (torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4), "per-point features"),
        (torch.randn(2, 4, 8), torch.randn(2, 6, 8), "channels"),
    ],
)
def test_layouts_that_are_not_per_point_are_refused(s, t, match):
    with pytest.raises(ValueError, match=match):
        PointDistillerEncoders().build(s, t)


def test_fewer_points_than_k_is_refused():
    enc = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="at least k points"):
        pointdistiller(
            torch.randn(1, 4, 3), torch.randn(1, 4, 3), k=8, student_encoder=enc, teacher_encoder=enc
        )


def test_distiller_trains_the_encoders_with_a_narrow_student():
    torch.manual_seed(0)
    teacher = build_model("dgcnn", num_classes=5, k=6, width=0.25).eval()
    student = build_model("pointnet", num_classes=5, width=0.125)
    terms = [pg.ce(1.0), pg.term("pointdistiller", 1.0, student="mlp3", teacher="edge2", k=6, num_points=16)]
    distiller = pg.Distiller(student, teacher, terms=terms)
    batch = (torch.randn(4, 32, 3), torch.randint(0, 5, (4,)))
    distiller.prepare(batch)
    state = distiller.terms[1].state
    assert (
        state.student_encoder.linear.in_features == 2 * 8
        and state.teacher_encoder.linear.in_features == 2 * 16
    )
    names = {n for n, _ in distiller.named_parameters()}
    assert any("teacher_encoder" in n for n in names)
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    before = state.teacher_encoder.linear.weight.detach().clone()
    _, losses = distiller(batch)
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, state.teacher_encoder.linear.weight)
    with pytest.raises(ProtegeError, match="per-point"):
        bad = pg.Distiller(
            student, teacher, terms=[pg.term("pointdistiller", student="pool", teacher="pool")]
        )
        bad.prepare(batch)
