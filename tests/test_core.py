"""Taps and Distiller: the contract every feature plugs into."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import protege as pg
from protege.errors import ProtegeError


def _nested() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()), nn.AdaptiveAvgPool2d(1)),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_taps_record_nested_outputs_and_inputs():
    model = _nested()
    x = torch.randn(3, 1, 6, 6)
    with pg.Taps(model, ["1.0.0", "3:in", "0"]) as taps:
        y = model(x)
        out = taps.pop()
    assert out["1.0.0"].shape == (3, 8, 6, 6)
    expected = model[1](model[0](x))
    assert torch.allclose(out["3:in"], expected.flatten(1))
    assert torch.allclose(model[3](out["3:in"]), y)
    assert taps.outputs == {}
    # hooks are gone after the context
    model(x)
    assert taps.outputs == {}


def test_taps_unknown_path_names_closest():
    model = pg.build_model("resnet20", num_classes=10, in_chans=1)
    with pytest.raises(ProtegeError) as e:
        pg.Taps(model, ["layer4"])
    assert "layer1" in str(e.value) or "layer3" in str(e.value)
    with pytest.raises(ProtegeError, match="layer3"):
        pg.Taps(model, ["layr3"])


def test_taps_on_timm_and_torchvision():
    timm_model = pg.build_model("resnet18", num_classes=10)
    tv_model = pg.build_model("torchvision:resnet18", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    for model in (timm_model, tv_model):
        with pg.Taps(model, ["layer3", "fc:in"]) as taps:
            model.eval()(x)
            assert taps.outputs["layer3"].shape == (1, 256, 4, 4)
            assert taps.outputs["fc:in"].shape == (1, 512)


def _pair():
    torch.manual_seed(0)
    teacher = _nested()
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 5))
    return student, teacher


def test_teacher_frozen_no_grad_no_bn_update_not_in_state_dict():
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = pg.Distiller(student, teacher, [pg.ce(0.5), pg.kd(0.5, T=2.0)])
    d.train()
    assert not teacher.training  # train() on the distiller leaves the teacher in eval
    opt = torch.optim.SGD(d.parameters(), lr=0.5)
    for _ in range(3):
        x, y = torch.randn(8, 1, 6, 6) * 3 + 1, torch.randint(0, 5, (8,))
        _, losses = d((x, y))
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
    after = teacher.state_dict()
    for k in before:  # weights and BN running statistics unchanged
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not k.startswith("teacher") for k in d.state_dict())
    assert {id(p) for p in d.parameters()} == {id(p) for p in student.parameters()}


def test_distiller_losses_match_pure_functions():
    student, teacher = _pair()
    d = pg.Distiller(student, teacher, [pg.ce(0.3), pg.kd(0.7, T=3.0)])
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 5, (4,))
    out, losses = d((x, y))
    assert set(losses) == {"ce", "kd"}
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    fn = pg.get_loss("kd").fn
    assert torch.allclose(losses["kd"], 0.7 * fn(s, t, T=3.0))
    assert torch.allclose(losses["ce"], 0.3 * nn.functional.cross_entropy(s, y))
    assert torch.allclose(out["logits"], s)


def test_feature_term_reads_taps_with_adapter():
    student, teacher = _pair()
    student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 5))

    @pg.register_loss("test_mse", paper="test only", reads="features")
    def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (s - t).pow(2).mean()

    adapter = nn.Conv2d(2, 4, 1)
    term = pg.term("test_mse", 2.0, student="0", teacher="0.2", adapter=adapter)
    assert term.name == "test_mse:0"
    d = pg.Distiller(student, teacher, [term])
    x = torch.randn(2, 1, 6, 6)
    _, losses = d((x, torch.zeros(2, dtype=torch.long)))
    with torch.no_grad():
        t_feat = teacher[0](x)
    assert torch.allclose(losses["test_mse:0"], 2.0 * (adapter(student[0](x)) - t_feat).pow(2).mean())
    assert any(k.startswith("terms.0.adapter") for k in d.state_dict())


def test_multi_teacher_weighting():
    student, t1 = _pair()
    t2 = nn.Sequential(nn.Flatten(), nn.Linear(36, 5))
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 5, (4,))
    d = pg.Distiller(student, [t1, t2], [pg.multi_kd(1.0, T=2.0), pg.kd(1.0, T=2.0)], teacher_weights=[3, 1])
    _, losses = d((x, y))
    with torch.no_grad():
        a, b = t1(x), t2(x)
    s = student(x)
    kd = pg.get_loss("kd").fn
    assert torch.allclose(losses["kd"], 0.75 * kd(s, a, T=2.0) + 0.25 * kd(s, b, T=2.0))
    p = 0.75 * (a / 2).softmax(-1) + 0.25 * (b / 2).softmax(-1)
    manual = 4 * (p * (p.log() - (s / 2).log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(losses["multi_kd"], manual, atol=1e-6)


def test_term_warmup_and_errors():
    term = pg.dkd(1.0, warmup=4)
    assert term.factor(1.0) == pytest.approx(0.25)
    assert term.factor(10.0) == 1.0
    with pytest.raises(ProtegeError, match="did you mean 'T'"):
        pg.term("kd", 1.0, t=3)
    student, teacher = _pair()
    with pytest.raises(ProtegeError, match="no teacher"):
        pg.Distiller(student, None, [pg.kd(1.0)])
    with pytest.raises(ProtegeError, match="no module 'missing_key'"):
        pg.Distiller(student, teacher, [pg.term("kd", student="missing_key")])


def _kd64(zs: torch.Tensor, zt: torch.Tensor, T: float) -> float:
    """T^2 mean KL(softmax(zt / T) || softmax(zs / T)), written out in float64."""
    pt = torch.softmax(zt.double() / T, -1)
    return float(T * T * (pt * (pt.log() - torch.log_softmax(zs.double() / T, -1))).sum(-1).mean())


def test_ctkd_temperature_trains_through_distiller():
    student, teacher = _pair()
    # float64: at T ~ 15.6 dL/dT is the small difference of 2T KL and T^2 dKL/dT (~1e-4 of each), which
    # float32 resolves to ~2% only
    d = pg.Distiller(student, teacher, [pg.ctkd(1.0)]).to(torch.float64)
    params = dict(d.named_parameters())
    assert list(k for k in params if k.startswith("terms.0.state")) == ["terms.0.state.raw_T"]
    state = d.terms[0].state
    d.set_progress(5.0)  # half-way through the 10-epoch cosine curriculum: lambda = (1 + cos(1.5 pi)) / 2
    assert state.lambda_at(5.0) == pytest.approx(0.5, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    out, losses = d((x, torch.zeros(4, dtype=torch.long)))
    losses["ctkd"].backward()
    # The reversed gradient: -lambda * dL/dT * dT/draw, with dL/dT by central differences of the
    # float64 KD formula on the same logits and dT/draw = 20 sigmoid(raw) (1 - sigmoid(raw)).
    zs, zt, T = out["logits"].detach(), teacher(x).detach(), state.temperature
    h = 1e-3
    dL_dT = (_kd64(zs, zt, T + h) - _kd64(zs, zt, T - h)) / (2 * h)
    sig = (T - 1.0) / 20.0
    expected = -0.5 * dL_dT * 20.0 * sig * (1.0 - sig)
    assert state.raw_T.grad.item() == pytest.approx(expected, rel=1e-6)
    assert state.raw_T.grad.item() * dL_dT < 0  # reversed: descending it moves T up the KD loss
    torch.optim.SGD([state.raw_T], lr=1.0).step()
    assert (state.temperature - T) * dL_dT > 0
    assert _kd64(zs, zt, state.temperature) > _kd64(zs, zt, T)


def test_distiller_to_moves_teacher():
    student, teacher = _pair()
    d = pg.Distiller(student, teacher, [pg.kd()])
    d.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64
    assert next(student.parameters()).dtype == torch.float64


def test_shape_mismatch_is_a_user_error():
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    _, teacher = _pair()
    d = pg.Distiller(student, teacher, [pg.kd()])
    with pytest.raises(ProtegeError, match="term 'kd'.*same shape"):
        d((torch.randn(2, 1, 6, 6), torch.zeros(2, dtype=torch.long)))
