"""VID, FT, FSP and AB: each checked against an independent float64 numpy reference (plain loops),
for gradients (student, state modules), the registry, and end to end through ``protege.Distiller``.

The references are loops over samples, channels and positions; they share no code path with the
implementations.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import protege as pg
import protege.losses.features  # noqa: F401  (registers on import)
from protege.config import load_config
from protege.core.distiller import Term
from protege.errors import ProtegeError
from protege.losses.features import (
    FTModules,
    Paraphraser,
    Translator,
    VIDRegressor,
    ab,
    factor_transfer,
    fsp,
    fsp_matrix,
    ft,
    paraphraser_reconstruction,
    vid,
    vid_nll,
)
from protege.losses.registry import get_loss
from references import np_adaptive_pool, rand, t64

CONFIGS = Path(__file__).parent.parent / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else list(v)


class TinyCNN(nn.Module):
    """conv-BN-ReLU(-pool) blocks on 1x8x8 images: layer1 (w0 @ 4x4), layer2 (w1 @ 4x4), fc."""

    def __init__(self, widths: tuple[int, int] = (4, 8), num_classes: int = 3) -> None:
        super().__init__()
        w0, w1 = widths
        self.layer1 = nn.Sequential(
            nn.Conv2d(1, w0, 3, padding=1), nn.BatchNorm2d(w0), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.layer2 = nn.Sequential(nn.Conv2d(w0, w1, 3, padding=1), nn.BatchNorm2d(w1), nn.ReLU())
        self.fc = nn.Linear(w1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(x)).mean(dim=(2, 3)))


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def models(student_widths=(4, 8), teacher_widths=(6, 12)) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = TinyCNN(teacher_widths)
    torch.manual_seed(1)
    return TinyCNN(student_widths), teacher


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


# =========================================================================== VID


def np_nll(mu: np.ndarray, t: np.ndarray, var: np.ndarray) -> float:
    n, c, h, w = t.shape
    total = 0.0
    for i in range(n):
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    total += 0.5 * (math.log(var[k]) + (t[i, k, y, x] - mu[i, k, y, x]) ** 2 / var[k])
    return total / (n * c * h * w)


def np_regress(s: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Three 1x1 convolutions (no bias) with ReLUs between them, pixel by pixel."""
    n, _, h, w = s.shape
    out = np.zeros((n, weights[-1].shape[0], h, w))
    for i in range(n):
        for y in range(h):
            for x in range(w):
                v = list(s[i, :, y, x])
                for layer, wm in enumerate(weights):
                    v = [dot(row, v) for row in wm]
                    if layer < len(weights) - 1:
                        v = [max(a, 0.0) for a in v]
                out[i, :, y, x] = v
    return out


def test_vid_nll_matches_loops() -> None:
    mu, t = rand(2, 3, 2, 2, seed=1), rand(2, 3, 2, 2, seed=2)
    var = np.array([0.5, 2.0, 5.0])
    assert vid_nll(t64(mu), t64(t), t64(var)).item() == pytest.approx(np_nll(mu, t, var), rel=1e-12)
    # A perfect mean leaves only the log-variance term.
    assert vid_nll(t64(t), t64(t), t64(var)).item() == pytest.approx(0.5 * np.log(var).mean(), rel=1e-12)


def test_vid_pools_the_larger_map_before_the_regressor() -> None:
    s, t = rand(2, 3, 4, 4, seed=3), rand(2, 3, 2, 2, seed=4)
    var = np.array([1.0, 3.0, 0.25])
    seen = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x

    got = vid(t64(s), t64(t), regressor=identity, variance=t64(var)).item()
    assert seen == [(2, 3, 2, 2)]
    assert got == pytest.approx(np_nll(np_adaptive_pool(s, 2, 2), t, var), rel=1e-12)
    # The teacher is pooled when it is the larger one.
    got = vid(t64(t), t64(s), regressor=identity, variance=t64(var)).item()
    assert got == pytest.approx(np_nll(t, np_adaptive_pool(s, 2, 2), var), rel=1e-12)


def test_vid_with_its_state_matches_loops() -> None:
    s, t = rand(2, 3, 2, 2, seed=5), rand(2, 5, 2, 2, seed=6)
    state = VIDRegressor(init_pred_var=2.0, mid_channels=4).double()
    assert state.pending
    state.build(t64(s), t64(t))
    state.double()
    assert not state.pending
    convs = [m for m in state.regressor.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(4, 3, 1, 1), (4, 4, 1, 1), (5, 4, 1, 1)]
    assert all(c.bias is None and c.kernel_size == (1, 1) for c in convs)
    with torch.no_grad():
        state.log_scale.copy_(torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0]))
    weights = [c.weight.detach().numpy()[:, :, 0, 0] for c in convs]
    var = [math.log1p(math.exp(a)) + 1e-5 for a in [-1.0, 0.0, 0.5, 1.0, 3.0]]
    ref = np_nll(np_regress(s, weights), t, np.array(var))
    assert vid(t64(s), t64(t), **state(0.0)).item() == pytest.approx(ref, rel=1e-10)


def test_vid_state_defaults_and_initial_variance() -> None:
    state = VIDRegressor()
    state.build(torch.zeros(2, 3, 4, 4), torch.zeros(2, 7, 2, 2))
    convs = [m for m in state.regressor.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [7, 7, 7]  # mid channels = teacher channels (RepDistiller)
    assert torch.allclose(state.variance(), torch.full((7,), 5.0))
    with pytest.raises(ValueError, match="init_pred_var"):
        VIDRegressor(init_pred_var=0.0)
    with pytest.raises(RuntimeError, match="prepare"):
        VIDRegressor()(0.0)


def test_vid_on_vectors() -> None:
    s, t = rand(4, 3, seed=7), rand(4, 2, seed=8)
    state = VIDRegressor()
    state.build(t64(s), t64(t))
    state.double()
    kwargs = state(0.0)
    convs = [m for m in state.regressor.modules() if isinstance(m, nn.Conv2d)]
    weights = [c.weight.detach().numpy()[:, :, 0, 0] for c in convs]
    var = state.variance().detach().numpy()  # 5.0 up to the float32 rounding of the initial alpha
    assert np.allclose(var, 5.0, rtol=1e-6)
    ref = np_nll(np_regress(s[:, :, None, None], weights), t[:, :, None, None], var)
    assert vid(t64(s), t64(t), **kwargs).item() == pytest.approx(ref, rel=1e-10)


def test_vid_gradients_reach_student_regressor_and_variance() -> None:
    s, t = t64(rand(2, 3, 2, 2, seed=9), grad=True), t64(rand(2, 4, 2, 2, seed=10))
    state = VIDRegressor()
    state.build(s, t)
    state.double()
    vid(s, t, **state(0.0)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    for name, p in state.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("s_shape", "t_shape"), [((2, 3, 2, 2), (3, 3, 2, 2)), ((2, 3, 2), (2, 3, 2)), ((2, 3), (2, 3, 1, 1))]
)
def test_vid_bad_shapes(s_shape, t_shape) -> None:
    with pytest.raises(ValueError, match=re_shape(s_shape) + ".*" + re_shape(t_shape)):
        VIDRegressor().build(torch.zeros(s_shape), torch.zeros(t_shape))


def test_vid_end_to_end_trains_regressor_and_variance() -> None:
    student, teacher = models()
    term = Term("vid", 1.0, student="layer2", teacher="layer2", init_pred_var=3.0)
    d = pg.Distiller(student, teacher, [pg.ce(1.0), term])
    assert d.needs_prepare
    d.prepare(batch())
    assert not d.needs_prepare and torch.allclose(term.state.variance(), torch.full((12,), 3.0))
    assert "terms.1.state.log_scale" in d.state_dict()
    opt = torch.optim.Adam(d.parameters(), lr=0.02)
    before_state, before_student = params_of(term.state), params_of(student)
    values = []
    for step in range(12):
        _, losses = d(batch(seed=step % 2))
        values.append(losses["vid:layer2"].item())
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
    assert changed(before_state, term.state) == set(before_state)
    assert changed(before_student, student)
    assert values[-1] < values[0]


# =========================================================================== FT


def np_factor_transfer(s: np.ndarray, t: np.ndarray, p: float) -> float:
    n = s.shape[0]
    total, count = 0.0, 0
    for i in range(n):
        a, b = unit(list(s[i].ravel())), unit(list(t[i].ravel()))
        total += sum(abs(x - y) ** p for x, y in zip(a, b, strict=True))
        count += len(a)
    return total / count


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_factor_transfer_matches_loops(p: float) -> None:
    s, t = rand(3, 2, 2, 2, seed=11), rand(3, 2, 2, 2, seed=12)
    assert factor_transfer(t64(s), t64(t), p).item() == pytest.approx(np_factor_transfer(s, t, p), rel=1e-12)
    big = rand(3, 2, 4, 4, seed=13)  # pooled down to 2x2
    got = factor_transfer(t64(big), t64(t), p).item()
    assert got == pytest.approx(np_factor_transfer(np_adaptive_pool(big, 2, 2), t, p), rel=1e-12)
    # Per-sample scale does not matter (factors are L2-normalised per sample).
    scaled = s * np.array([2.0, 0.1, 7.0]).reshape(3, 1, 1, 1)
    assert factor_transfer(t64(scaled), t64(s), p).item() == pytest.approx(0.0, abs=1e-15)


def test_paraphraser_reconstruction_by_hand() -> None:
    r, t = rand(2, 3, 2, 2, seed=14), rand(2, 3, 2, 2, seed=15)
    diffs = [a - b for a, b in zip(r.ravel(), t.ravel(), strict=True)]
    mse = sum(d * d for d in diffs) / len(diffs)
    l1 = sum(abs(d) for d in diffs) / len(diffs)
    assert paraphraser_reconstruction(t64(r), t64(t)).item() == pytest.approx(mse, rel=1e-12)
    assert paraphraser_reconstruction(t64(r), t64(t), "l1").item() == pytest.approx(l1, rel=1e-12)
    with pytest.raises(ValueError, match="'mse' or 'l1'"):
        paraphraser_reconstruction(t64(r), t64(t), "l2")


def test_paraphraser_and_translator_architecture() -> None:
    p = Paraphraser(6, 3)
    kinds = [type(m) for m in p.encoder] + [type(m) for m in p.decoder]
    assert kinds == [nn.Conv2d, nn.LeakyReLU] * 3 + [nn.ConvTranspose2d, nn.LeakyReLU] * 3
    convs = [m for m in p.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert all(m.negative_slope == 0.1 for m in p.modules() if isinstance(m, nn.LeakyReLU))
    x = torch.randn(2, 6, 5, 5)
    assert p.encode(x).shape == (2, 3, 5, 5) and p(x).shape == x.shape
    tr = Translator(4, 3, bn=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in tr.modules()) == 3
    assert tr(torch.randn(2, 4, 3, 3)).shape == (2, 3, 3, 3)

    state = FTModules(rate=0.5)
    assert state.pending
    state.build(torch.zeros(2, 4, 3, 3), torch.zeros(2, 7, 5, 5))
    assert not state.pending
    assert state.paraphraser.encode(torch.zeros(1, 7, 5, 5)).shape == (1, 4, 5, 5)  # round(3.5) = 4
    assert state.translator(torch.zeros(1, 4, 3, 3)).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 7, 5, 5\)"):
        FTModules().build(torch.zeros(2, 4), torch.zeros(2, 7, 5, 5))


def ft_setup(bn: bool = False):
    s = t64(rand(2, 3, 4, 4, seed=16), grad=True)
    t = t64(rand(2, 4, 2, 2, seed=17))
    state = FTModules(bn=bn)
    state.build(s, t)
    state.double()
    return s, t, state


def test_ft_paraphrase_phase_trains_only_the_paraphraser() -> None:
    s, t, state = ft_setup()
    loss = ft(s, t, phase="paraphrase", **state(0.0))
    expected = paraphraser_reconstruction(state.paraphraser(t), t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert s.grad is None  # the student gets no gradient in this phase
    for name, p in state.paraphraser.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in state.translator.parameters())


def test_ft_transfer_phase_trains_translator_and_student_not_the_paraphraser() -> None:
    s, t, state = ft_setup(bn=True)
    state.train()
    stats = {k: v.clone() for k, v in state.paraphraser.named_buffers()}
    loss = ft(s, t, **state(0.0))  # phase="transfer" is the default
    assert state.paraphraser.training  # its mode is restored
    assert all(torch.equal(stats[k], v) for k, v in state.paraphraser.named_buffers())  # BN stats untouched
    state.paraphraser.eval()
    with torch.no_grad():
        ref = factor_transfer(state.translator(s), state.paraphraser.encode(t))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    for name, p in state.translator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in state.paraphraser.parameters())


def test_ft_rejects_unknown_phase() -> None:
    s, t, state = ft_setup()
    with pytest.raises(ValueError, match="phase"):
        ft(s, t, phase="distill", **state(0.0))
    student, teacher = models()
    d = pg.Distiller(student, teacher, [Term("ft", 1.0, student="layer2", teacher="layer2", phase="x")])
    d.prepare(batch())
    with pytest.raises(ProtegeError, match="ft:layer2.*phase"):
        d(batch())


def test_ft_two_stages_paraphrase_then_transfer() -> None:
    student, teacher = models()
    taps = {"student": "layer2", "teacher": "layer2", "name": "ft"}

    # Stage 1: the paraphraser learns to reconstruct the teacher's map; the student is untouched.
    stage1 = Term("ft", 1.0, phase="paraphrase", **taps)
    d1 = pg.Distiller(student, teacher, [stage1])
    d1.prepare(batch())
    opt = torch.optim.Adam(d1.parameters(), lr=0.01)
    before_student = params_of(student)
    rec = []
    for step in range(15):
        _, losses = d1(batch(seed=step % 2))
        rec.append(losses["ft"].item())
        losses["ft"].backward()
        opt.step()
        opt.zero_grad()
    assert rec[-1] < 0.7 * rec[0]
    assert not changed(before_student, student)

    # Stage 2: a new term of the same name takes over the trained state (as run_stages does).
    stage2 = Term("ft", 200.0, phase="transfer", **taps)
    d2 = pg.Distiller(student, teacher, [pg.ce(1.0), stage2])
    d2.prepare(batch())
    stage2.load_state_dict(stage1.state_dict())
    trained = params_of(stage1.state.paraphraser)
    assert not changed(trained, stage2.state.paraphraser)
    opt = torch.optim.SGD(d2.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    before_translator, before_student = params_of(stage2.state.translator), params_of(student)
    ft_values = []
    for step in range(8):
        _, losses = d2(batch(seed=step % 2))
        ft_values.append(losses["ft"].item())
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
    assert not changed(trained, stage2.state.paraphraser)  # frozen in the transfer phase
    assert changed(before_translator, stage2.state.translator) == set(before_translator)
    assert changed(before_student, student)
    assert ft_values[-1] < ft_values[0]


# =========================================================================== FSP


def np_fsp_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    if a.shape[2:] != (h, w):
        a = np_adaptive_pool(a, h, w)
    if b.shape[2:] != (h, w):
        b = np_adaptive_pool(b, h, w)
    n, c1, c2 = a.shape[0], a.shape[1], b.shape[1]
    g = np.zeros((n, c1, c2))
    for i in range(n):
        for j in range(c1):
            for k in range(c2):
                g[i, j, k] = sum(a[i, j, y, x] * b[i, k, y, x] for y in range(h) for x in range(w)) / (h * w)
    return g


def np_fsp(ss: list[np.ndarray], ts: list[np.ndarray]) -> float:
    total = 0.0
    for k in range(len(ss) - 1):
        gs, gt = np_fsp_matrix(ss[k], ss[k + 1]), np_fsp_matrix(ts[k], ts[k + 1])
        total += sum((x - y) ** 2 for x, y in zip(gs.ravel(), gt.ravel(), strict=True)) / gs.size
    return total


def test_fsp_matrix_matches_loops() -> None:
    a, b = rand(2, 2, 4, 4, seed=18), rand(2, 3, 2, 2, seed=19)
    got = fsp_matrix(t64(a), t64(b))
    assert got.shape == (2, 2, 3)
    assert np.allclose(got.numpy(), np_fsp_matrix(a, b), rtol=1e-12, atol=0)
    assert np.allclose(fsp_matrix(t64(b), t64(a)).numpy(), np_fsp_matrix(b, a), rtol=1e-12, atol=0)


def test_fsp_matches_loops() -> None:
    ss = [rand(2, 2, 4, 4, seed=20), rand(2, 3, 2, 2, seed=21), rand(2, 3, 2, 2, seed=22)]
    ts = [rand(2, 2, 2, 2, seed=23), rand(2, 3, 2, 2, seed=24), rand(2, 3, 1, 1, seed=25)]
    got = fsp([t64(x) for x in ss], [t64(x) for x in ts]).item()
    assert got == pytest.approx(np_fsp(ss, ts), rel=1e-12)
    assert fsp([t64(x) for x in ss], [t64(x) for x in ss]).item() == 0.0
    # Two taps: one pair.
    assert fsp([t64(ss[1]), t64(ss[2])], [t64(ts[1]), t64(ts[2])]).item() == pytest.approx(
        np_fsp(ss[1:], ts[1:]), rel=1e-12
    )


def test_fsp_gradients_reach_every_student_layer() -> None:
    ss = [t64(rand(2, 2, 2, 2, seed=26 + k), grad=True) for k in range(3)]
    ts = [t64(rand(2, 2, 2, 2, seed=30 + k)) for k in range(3)]
    fsp(ss, ts).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in ss)


def test_fsp_bad_inputs() -> None:
    a, b = torch.zeros(2, 2, 2, 2), torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"tap 1.*\(2, 3, 2, 2\).*\(2, 4, 2, 2\).*channels"):
        fsp([a, b], [a, torch.zeros(2, 4, 2, 2)])
    with pytest.raises(ValueError, match="2 student and 3 teacher"):
        fsp([a, b], [a, b, b])
    with pytest.raises(ValueError, match="at least 2"):
        fsp([a], [a])
    with pytest.raises(ValueError, match="list"):
        fsp(a, a)
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*\(2, 2, 2, 2\)"):
        fsp([torch.zeros(2, 2, 2), b], [a, b])
    with pytest.raises(ValueError, match="batch size"):
        fsp([a, b], [torch.zeros(3, 2, 2, 2), torch.zeros(3, 3, 2, 2)])


def test_fsp_term_rejects_mismatched_widths() -> None:
    student, teacher = models((4, 8), (6, 12))
    d = pg.Distiller(
        student, teacher, [Term("fsp", 1.0, student=["layer1", "layer2"], teacher=["layer1", "layer2"])]
    )
    with pytest.raises(ProtegeError, match=r"fsp:layer1,layer2.*\(8, 4, 4, 4\).*\(8, 6, 4, 4\)"):
        d(batch())


def test_fsp_two_stage_fit(tmp_path) -> None:
    """The paper's recipe through protege.fit: an FSP stage, then CE + KD on the same student."""
    student, teacher = models((4, 8), (4, 8))
    x, y = batch(32, seed=3)
    train = pg.make_loader(TensorDataset(x, y), 8, shuffle=True, seed=0)
    val = pg.make_loader(TensorDataset(*batch(16, seed=4)), 16, shuffle=False)
    fsp_term = Term("fsp", 1.0, student=["layer1", "layer2"], teacher=["layer1", "layer2"])
    d1 = pg.Distiller(student, teacher, [fsp_term])
    with torch.no_grad():
        first = d1(batch(8, seed=5))[1]["fsp:layer1,layer2"].item()
    cfg = pg.TrainConfig(epochs=3, progress=False, measure_cost=False, optim={"name": "adam", "lr": 0.01})
    summary = pg.fit(d1, train, val, cfg, tmp_path / "fsp")
    assert summary["status"] == "completed"
    d1.eval()
    with torch.no_grad():
        after = d1(batch(8, seed=5))[1]["fsp:layer1,layer2"].item()
    assert after < first
    d1.close()
    d2 = pg.Distiller(student, teacher, [pg.ce(1.0), pg.kd(1.0)])
    cfg2 = pg.TrainConfig(epochs=1, progress=False, measure_cost=False, optim={"lr": 0.01})
    assert pg.fit(d2, train, val, cfg2, tmp_path / "main")["status"] == "completed"


# =========================================================================== AB


def np_ab(s: np.ndarray, t: np.ndarray, m: float) -> float:
    total = 0.0
    for a, b in zip(s.ravel(), t.ravel(), strict=True):
        if a > -m and b <= 0:
            total += (a + m) ** 2
        if a <= m and b > 0:
            total += (a - m) ** 2
    return total / s.shape[0]


@pytest.mark.parametrize("margin", [1.0, 0.5, 0.0])
def test_ab_matches_loops(margin: float) -> None:
    s, t = rand(3, 2, 2, 2, seed=40, scale=1.5), rand(3, 2, 2, 2, seed=41)
    assert ab(t64(s), t64(t), margin=margin).item() == pytest.approx(np_ab(s, t, margin), rel=1e-12)


def test_ab_boundaries() -> None:
    m = 1.0
    # Student exactly at -m / +m, teacher exactly 0 (counts as "off").
    s = np.array([[-1.0, 1.0, -1.0, 1.0, 0.3, -0.3, 2.0, -2.0]])
    t = np.array([[0.0, 0.0, 0.5, 0.5, 0.0, 2.0, -1.0, 1.0]])
    # (-1, off): s > -m is False -> 0;  (1, off): (1+1)^2 = 4;  (-1, on): (-1-1)^2 = 4;
    # (1, on): s <= m -> 0;  (0.3, off): 1.3^2;  (-0.3, on): 1.3^2;  (2, off): 9;  (-2, on): 9
    assert ab(t64(s), t64(t), margin=m).item() == pytest.approx(4 + 4 + 2 * 1.69 + 9 + 9, rel=1e-12)
    assert np_ab(s, t, m) == pytest.approx(4 + 4 + 2 * 1.69 + 9 + 9, rel=1e-12)
    # Beyond the margin on the teacher's side: no loss.
    agree = np.array([[1.5, -1.5, 3.0]])
    assert ab(t64(agree), t64(np.array([[0.2, -0.1, 5.0]]))).item() == 0.0


def test_ab_gradients_and_shapes() -> None:
    s = t64(rand(3, 2, 2, 2, seed=42), grad=True)
    ab(s, t64(rand(3, 2, 2, 2, seed=43))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(3, 2, 2, 2\).*\(3, 4, 2, 2\).*conv_bn"):
        ab(torch.zeros(3, 2, 2, 2), torch.zeros(3, 4, 2, 2))
    with pytest.raises(ValueError, match="margin"):
        ab(torch.zeros(3, 2), torch.zeros(3, 2), margin=-1.0)


def test_ab_end_to_end_with_connector_on_pre_relu_taps() -> None:
    student, teacher = models((4, 8), (6, 12))
    terms = [
        Term("ab", 1.0, student="layer2.2:in", teacher="layer2.2:in", adapter="conv_bn"),
        Term("ab", 0.5, student="layer1.1", teacher="layer1.1", adapter="conv_bn", name="ab1"),
    ]
    d = pg.Distiller(student, teacher, terms)
    d.prepare(batch())
    assert isinstance(terms[0].adapter, nn.Sequential)  # conv 1x1 + BN: 8 -> 12 channels
    assert [type(m) for m in terms[0].adapter] == [nn.Conv2d, nn.BatchNorm2d]
    with torch.no_grad():
        pre = d.teacher_outputs(batch()[0])[0]["layer2.2:in"]
    assert (pre < 0).any()  # the tap reads the pre-activation
    opt = torch.optim.Adam(d.parameters(), lr=0.02)
    before_student, before_connector = params_of(student), params_of(terms[0].adapter)
    values = []
    for step in range(15):
        _, losses = d(batch(seed=step % 2))
        values.append(losses["ab:layer2.2:in"].item())
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
    assert values[-1] < 0.7 * values[0]
    assert changed(before_student, student) and changed(before_connector, terms[0].adapter)


def test_ab_term_without_connector_names_the_shapes() -> None:
    student, teacher = models((4, 8), (6, 12))
    d = pg.Distiller(student, teacher, [Term("ab", 1.0, student="layer2.1", teacher="layer2.1")])
    with pytest.raises(ProtegeError, match=r"ab:layer2.1.*\(8, 8, 4, 4\).*\(8, 12, 4, 4\).*adapter"):
        d(batch())


# =========================================================================== registry and configs


def re_shape(shape: tuple[int, ...]) -> str:
    return r"\(" + r",\s*".join(str(d) for d in shape) + r"\)"


def test_registry_entries() -> None:
    expected = {
        "vid": ("features", {}, VIDRegressor, {"init_pred_var": 5.0, "eps": 1e-5, "mid_channels": None}),
        "ft": (
            "features",
            {"phase": "transfer", "p": 1.0, "reconstruction": "mse"},
            FTModules,
            {"rate": 0.5, "bn": False},
        ),
        "fsp": ("feature-list", {}, None, {}),
        "ab": ("features", {"margin": 1.0}, None, {}),
    }
    for name, (reads, params, state, state_params) in expected.items():
        info = get_loss(name)
        assert (info.reads, info.params, info.state, info.state_params) == (
            reads,
            params,
            state,
            state_params,
        )
        assert info.uses_teacher and not info.uses_target and not info.uses_index and not info.multi_teacher
        assert info.paper and info.summary and not info.summary.startswith(" ")
    assert "Ahn" in get_loss("vid").paper and "Kim, Park & Kwak" in get_loss("ft").paper
    assert "Yim" in get_loss("fsp").paper and "Heo" in get_loss("ab").paper
    with pytest.raises(ProtegeError, match="did you mean 'rate'"):
        Term("ft", 1.0, student="a", teacher="b", rat=0.5)


MY_CONFIGS = ["mnist-vid.yaml", "mnist-ft.yaml", "mnist-fsp.yaml", "mnist-ab.yaml"]


@pytest.mark.parametrize("name", MY_CONFIGS)
def test_config_builds_and_runs_one_step(name: str) -> None:
    """Every stage's terms build on the configured models (random weights) and give finite losses."""
    cfg = load_config(CONFIGS / name)
    stage_cfgs = [cfg.stage_config(i) for i in range(len(cfg.stages))] if cfg.stages else [cfg]
    torch.manual_seed(0)
    build = pg.build_model
    teacher = build(cfg.teacher.model, num_classes=10, in_chans=1, **cfg.teacher.kwargs)
    student = build(cfg.student.model, num_classes=10, in_chans=1, **cfg.student.kwargs)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    carried: dict[str, dict] = {}
    for scfg in stage_cfgs:
        terms = [Term(**t.term_kwargs()) for t in scfg.terms]
        d = pg.Distiller(student, teacher, terms)
        d.prepare((x, y))
        for term in d.terms:
            if term.name in carried:
                term.load_state_dict(carried[term.name])
        _, losses = d((x, y))
        assert losses and all(torch.isfinite(v) for v in losses.values()), (name, losses)
        carried = {t.name: t.state_dict() for t in d.terms}
        d.close()


def test_staged_configs_have_the_papers_stages() -> None:
    ft_cfg = load_config(CONFIGS / "mnist-ft.yaml")
    first, second = ft_cfg.stages
    assert first.freeze_student and not second.freeze_student
    (para,) = [t for t in first.terms if t.loss == "ft"]
    (transfer,) = [t for t in second.terms if t.loss == "ft"]
    assert para.name == transfer.name  # the paraphraser carries over
    assert para.params["phase"] == "paraphrase" and transfer.params["phase"] == "transfer"
    for path, loss in (("mnist-fsp.yaml", "fsp"), ("mnist-ab.yaml", "ab")):
        cfg = load_config(CONFIGS / path)
        assert len(cfg.stages) == 2, path
        assert {t.loss for t in cfg.stages[0].terms} == {loss}
        assert loss not in {t.loss for t in cfg.stages[1].terms}
