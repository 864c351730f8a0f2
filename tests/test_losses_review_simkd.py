"""ReviewKD and SimKD: losses and state modules against float64 numpy loops, then end to end.

The references are plain loops (convolutions, batch norm, nearest resizing, adaptive pooling,
attention fusion), sharing no code path with the implementations.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import protege as pg
from protege.config import load_config
from protege.engine.checkpoint import checkpoint_dir
from protege.errors import ProtegeError
from protege.losses.registry import BuildContext, get_loss
from protege.losses.reuse import SimKDProjector, SimKDStudent, simkd, simkd_projector
from protege.losses.review import ReviewFusion, hcl, reviewkd
from references import np_adaptive_pool, rand, t64

CONFIGS = Path(__file__).parent.parent / "configs"


def np_map(f: np.ndarray) -> np.ndarray:
    return f.reshape(*f.shape, 1, 1) if f.ndim == 2 else f


def np_mse(a: np.ndarray, b: np.ndarray) -> float:
    return sum((x - y) ** 2 for x, y in zip(a.ravel(), b.ravel(), strict=True)) / a.size


def np_nearest(f: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest resizing as PyTorch defines it: source index floor(dst * in / out)."""
    n, c, h, w = f.shape
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            out[:, :, i, j] = f[:, :, math.floor(i * h / out_h), math.floor(j * w / out_w)]
    return out


def np_conv(f: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Stride-1 convolution with 'same' zero padding for an odd kernel."""
    n, cin, h, w = f.shape
    cout, _, kh, kw = weight.shape
    ph, pw = kh // 2, kw // 2
    out = np.zeros((n, cout, h, w))
    for a in range(n):
        for o in range(cout):
            for y in range(h):
                for x in range(w):
                    acc = 0.0 if bias is None else bias[o]
                    for i in range(cin):
                        for dy in range(kh):
                            for dx in range(kw):
                                yy, xx = y + dy - ph, x + dx - pw
                                if 0 <= yy < h and 0 <= xx < w:
                                    acc += f[a, i, yy, xx] * weight[o, i, dy, dx]
                    out[a, o, y, x] = acc
    return out


def np_bn(f: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    """Batch norm in eval mode (running statistics)."""
    out = np.zeros_like(f)
    for c in range(f.shape[1]):
        mean, var = bn.running_mean[c].item(), bn.running_var[c].item()
        gamma, beta = bn.weight[c].item(), bn.bias[c].item()
        out[:, c] = (f[:, c] - mean) / math.sqrt(var + bn.eps) * gamma + beta
    return out


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def w(p: torch.Tensor) -> np.ndarray:
    return p.detach().numpy()


def randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is checked for real."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(c, generator=g, dtype=m.running_var.dtype) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(c, generator=g, dtype=m.bias.dtype))


def tiny_cnn(widths: tuple[int, int, int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return pg.build_model("cnn_m", num_classes=5, in_chans=1, widths=widths)


# =========================================================================== ReviewKD: HCL


def np_hcl(students: list[np.ndarray], teachers: list[np.ndarray], levels=(4, 2, 1)) -> float:
    total = 0.0
    for s, t in zip(students, teachers, strict=True):
        s, t = np_map(s), np_map(t)
        h, w_ = s.shape[-2:]
        terms, weights, weight = [np_mse(s, t)], [1.0], 1.0
        for level in levels:
            if level < min(h, w_):
                weight /= 2
                terms.append(
                    weight * np_mse(np_adaptive_pool(s, level, level), np_adaptive_pool(t, level, level))
                )
                weights.append(weight)
        total += sum(terms) / sum(weights)
    return total


def test_hcl_by_hand() -> None:
    # One 2x2 map, one non-zero entry: full MSE 1/4; 1x1 pooled: (1/4)^2, weight 1/2; / (1 + 1/2).
    s = np.zeros((1, 1, 2, 2))
    s[0, 0, 0, 0] = 1.0
    t = np.zeros((1, 1, 2, 2))
    assert hcl([t64(s)], [t64(t)]).item() == pytest.approx((0.25 + 0.5 * 0.0625) / 1.5, rel=1e-12)
    # A 4x4 map of ones against zeros: every pooled MSE is 1, so the weighted mean is 1; a vector
    # (N, D) is a 1x1 map: its MSE alone. Stages are summed.
    ones, vec_s, vec_t = np.ones((1, 3, 4, 4)), np.array([[1.0, 3.0]]), np.array([[0.0, 1.0]])
    value = hcl([t64(ones), t64(vec_s)], [t64(np.zeros((1, 3, 4, 4))), t64(vec_t)]).item()
    assert value == pytest.approx(1.0 + (1.0 + 4.0) / 2, rel=1e-12)


@pytest.mark.parametrize("levels", [(4, 2, 1), (2,), (8, 3)])
def test_hcl_matches_loops(levels) -> None:
    shapes = [(2, 3, 8, 8), (2, 2, 5, 5), (2, 4, 3, 6), (2, 3)]
    s = [rand(*sh, seed=i) for i, sh in enumerate(shapes)]
    t = [rand(*sh, seed=10 + i) for i, sh in enumerate(shapes)]
    got = hcl([t64(x) for x in s], [t64(x) for x in t], levels=levels).item()
    assert got == pytest.approx(np_hcl(s, t, levels), rel=1e-10)
    assert hcl([t64(x) for x in s], [t64(x) for x in s], levels=levels).item() == 0.0


# =========================================================================== ReviewKD: fusion

# Student stages (shallow to deep): a 4x4 map, a 2x2 map, the pooled vector; the teacher's second
# stage is larger (4x4) than the student's (2x2), so the fused map is resized to it.
S_SHAPES = [(2, 2, 4, 4), (2, 3, 2, 2), (2, 3)]
T_SHAPES = [(2, 3, 4, 4), (2, 2, 4, 4), (2, 4)]


def np_fusion(fusion: ReviewFusion, students: list[np.ndarray], t_sizes: list[tuple[int, int]]) -> list:
    outs: list = [None] * len(students)
    residual = None
    for i in reversed(range(len(students))):
        abf = fusion.abfs[i]
        x = np_map(students[i])
        x = np_bn(np_conv(x, w(abf.conv1[0].weight)), abf.conv1[1])
        if abf.att_conv is not None:
            y = np_nearest(residual, *x.shape[-2:])
            z = np_sigmoid(
                np_conv(np.concatenate([x, y], axis=1), w(abf.att_conv[0].weight), w(abf.att_conv[0].bias))
            )
            fused = np.zeros_like(x)
            for a in range(x.shape[0]):
                for c in range(x.shape[1]):
                    fused[a, c] = x[a, c] * z[a, 0] + y[a, c] * z[a, 1]
            x = fused
        if x.shape[-2:] != t_sizes[i]:
            x = np_nearest(x, *t_sizes[i])
        residual = x
        outs[i] = np_bn(np_conv(x, w(abf.conv2[0].weight)), abf.conv2[1])
    return outs


def built_fusion(mid_channels: int | None = None) -> tuple[ReviewFusion, list[np.ndarray], list[np.ndarray]]:
    s = [rand(*sh, seed=20 + i) for i, sh in enumerate(S_SHAPES)]
    t = [rand(*sh, seed=30 + i) for i, sh in enumerate(T_SHAPES)]
    torch.manual_seed(0)
    fusion = ReviewFusion(mid_channels=mid_channels)
    assert fusion.pending
    fusion.build([t64(x) for x in s], [t64(x) for x in t], BuildContext())
    assert not fusion.pending
    fusion.double()
    randomise_bn(fusion)
    return fusion.eval(), s, t


def test_fusion_and_loss_match_loops() -> None:
    fusion, s, t = built_fusion(mid_channels=3)
    t_sizes = [np_map(x).shape[-2:] for x in t]
    got = fusion.fuse([t64(x) for x in s], t_sizes)
    want = np_fusion(fusion, s, t_sizes)
    for g, ref, tshape in zip(got, want, T_SHAPES, strict=True):
        assert g.shape == np_map(np.zeros(tshape)).shape
        np.testing.assert_allclose(g.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    loss = reviewkd([t64(x) for x in s], [t64(x) for x in t], **fusion(0.0))
    assert loss.item() == pytest.approx(np_hcl(want, t), rel=1e-10)


def test_fusion_layout_and_mid_channels() -> None:
    fusion, _, _ = built_fusion()
    assert fusion.mid_channels == 3  # min(512, channels of the deepest student feature)
    assert [a.att_conv is None for a in fusion.abfs] == [False, False, True]  # the deepest does not fuse
    assert [a.conv1[0].in_channels for a in fusion.abfs] == [2, 3, 3]
    assert [a.conv2[0].out_channels for a in fusion.abfs] == [3, 2, 4]
    assert built_fusion(mid_channels=7)[0].abfs[0].conv1[0].out_channels == 7
    wide = ReviewFusion()
    wide.build([torch.zeros(2, 600, 2, 2)], [torch.zeros(2, 8, 2, 2)], BuildContext())
    assert wide.mid_channels == 512


def test_gradients_reach_student_and_every_fusion_block() -> None:
    fusion, s, t = built_fusion()
    fusion.train()
    students = [t64(x, grad=True) for x in s]
    teachers = [t64(x) for x in t]
    reviewkd(students, teachers, **fusion(0.0)).backward()
    for x in students:
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(x.grad is None for x in teachers)
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("student", "teacher", "pattern"),
    [
        ([(2, 3, 4, 4), (2, 3)], [(2, 3, 4, 4)], r"2 student features.*1 teacher features"),
        ([(2, 3, 4)], [(2, 3, 4, 4)], r"student feature 0 has shape \(2, 3, 4\)"),
        ([(2, 3, 4, 4), (3, 3)], [(2, 3, 4, 4), (3, 3)], r"stage 1: student \(3, 3\) and teacher \(3, 3\)"),
        ((2, 3, 4, 4), [(2, 3, 4, 4)], r"list of features.*\(2, 3, 4, 4\)"),
    ],
)
def test_reviewkd_bad_input_names_shapes(student, teacher, pattern: str) -> None:
    def make(spec):
        return torch.zeros(spec) if isinstance(spec[0], int) else [torch.zeros(sh) for sh in spec]

    with pytest.raises(ValueError, match=pattern):
        ReviewFusion().build(make(student), make(teacher), BuildContext())


def test_hcl_rejects_unequal_shapes() -> None:
    with pytest.raises(ValueError, match=r"stage 0: student \(2, 3, 4, 4\) and teacher \(2, 5, 4, 4\)"):
        hcl([torch.zeros(2, 3, 4, 4)], [torch.zeros(2, 5, 4, 4)])


# =========================================================================== SimKD: loss


def np_simkd(s: np.ndarray, t: np.ndarray, weight: np.ndarray) -> float:
    """Pool the larger map down (per axis), a 1x1 conv as the projector, MSE."""
    s, t = np_map(s), np_map(t)
    h, w_ = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    if s.shape[2:] != (h, w_):
        s = np_adaptive_pool(s, h, w_)
    if t.shape[2:] != (h, w_):
        t = np_adaptive_pool(t, h, w_)
    return np_mse(np_conv(s, weight), t)


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [
        ((2, 3, 4, 4), (2, 5, 2, 2)),
        ((2, 3, 2, 2), (2, 5, 4, 4)),
        ((2, 3, 3, 3), (2, 5, 3, 3)),
        ((2, 3), (2, 5)),
    ],
)
def test_simkd_loss_matches_loops(s_shape, t_shape) -> None:
    s, t, weight = rand(*s_shape, seed=1), rand(*t_shape, seed=2), rand(5, 3, 1, 1, seed=3)
    conv = nn.Conv2d(3, 5, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(t64(weight))
    student = t64(s, grad=True)
    loss = simkd(student, t64(t), projector=conv)
    assert loss.item() == pytest.approx(np_simkd(s, t, weight), rel=1e-10)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and conv.weight.grad is not None


def test_simkd_bad_input_names_shapes() -> None:
    identity = nn.Identity()
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 4, 4\)"):
        simkd(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 4), projector=identity)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(3, 3, 4, 4\).*batch size"):
        simkd(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4), projector=identity)
    with pytest.raises(ValueError, match=r"projected student feature \(2, 3, 4, 4\).*\(2, 5, 4, 4\)"):
        simkd(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4), projector=identity)
    with pytest.raises(ValueError, match="one student tap"):
        SimKDProjector(tap="x").build([torch.zeros(2, 3, 4, 4)], torch.zeros(2, 3, 4, 4), BuildContext())


def test_projector_is_the_papers_bottleneck() -> None:
    proj = simkd_projector(16, 64)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    convs = [m for m in proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (16, 32, (1, 1)),
        (32, 32, (3, 3)),
        (32, 64, (1, 1)),
    ]
    assert all(c.bias is None for c in convs)
    assert simkd_projector(16, 64, factor=4)[0].out_channels == 16


# =========================================================================== SimKD: state and inference


def simkd_distiller(student_tap: str = "layer3", teacher_tap: str = "layer3", **params) -> pg.Distiller:
    teacher = tiny_cnn((4, 6, 8), seed=1)
    student = tiny_cnn((2, 3, 4), seed=2)
    term = pg.term("simkd", 1.0, student=student_tap, teacher=teacher_tap, tap=student_tap, **params)
    return pg.Distiller(student, teacher, [term])


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_build_copies_the_teachers_head_frozen() -> None:
    d = simkd_distiller()
    assert d.needs_prepare
    d.prepare(batch())
    state = d.terms[0].state
    teacher_fc = d.teachers["teacher"].fc
    assert state.head is not teacher_fc
    assert torch.equal(state.head.weight, teacher_fc.weight) and torch.equal(state.head.bias, teacher_fc.bias)
    assert all(not p.requires_grad for p in state.head.parameters())
    with torch.no_grad():  # a copy: later changes to the teacher do not reach it
        teacher_fc.weight.add_(1.0)
    assert not torch.equal(state.head.weight, teacher_fc.weight)
    d.train()
    assert not state.head.training and state.projector.training
    assert state.projector[0].in_channels == 4 and state.projector[-2].num_features == 8
    keys = d.state_dict()
    assert "terms.0.state.head.weight" in keys and "terms.0.state.projector.0.weight" in keys


def test_inference_logits_by_hand() -> None:
    # The student's layer1 (6x6 for 12x12 inputs) is pooled to the teacher's layer3 size (3x3).
    d = simkd_distiller(student_tap="layer1")
    d.prepare(batch())
    x, _ = batch(seed=1)
    d.eval()
    model = d.inference_model()
    assert isinstance(model, SimKDStudent) and isinstance(d.export(), SimKDStudent)
    state, teacher = d.terms[0].state, d.teachers["teacher"]
    feature = {}
    handle = d.student.layer1.register_forward_hook(lambda _m, _a, out: feature.setdefault("f", out))
    with torch.no_grad():
        d.student(x)
        handle.remove()
        assert feature["f"].shape[-2:] == (6, 6)
        projected = state.projector(F.adaptive_avg_pool2d(feature["f"], 3))
        by_hand = F.linear(projected.mean(dim=(2, 3)), teacher.fc.weight, teacher.fc.bias)
        got = model(x)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, d.student(x))  # not the student's own head


def test_reused_head_gets_no_gradient_and_no_update() -> None:
    d = simkd_distiller()
    d.prepare(batch())
    state = d.terms[0].state
    head_before = {k: v.clone() for k, v in state.head.state_dict().items()}
    proj_before = state.projector[0].weight.detach().clone()
    own_fc_before = d.student.fc.weight.detach().clone()
    opt = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(3):
        _, losses = d(batch(seed=step))
        sum(losses.values()).backward()
        assert all(p.grad is None for p in state.head.parameters())
        assert state.projector[0].weight.grad is not None
        opt.step()
        opt.zero_grad()
    for k, v in state.head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    assert not torch.equal(state.projector[0].weight, proj_before)
    assert torch.equal(d.student.fc.weight, own_fc_before)  # the student's own head is never trained


def test_simkd_state_errors() -> None:
    d = simkd_distiller(head="classifier")
    with pytest.raises(ProtegeError, match=r"no module 'classifier' in the teacher.*fc"):
        d.prepare(batch())
    teacher, student = tiny_cnn((4, 6, 8), 1), tiny_cnn((2, 3, 4), 2)
    no_tap = pg.Distiller(student, teacher, [pg.term("simkd", student="layer3", teacher="layer3")])
    assert no_tap.terms[0].state.tap == "layer3"  # the term tells its state what it reads
    with pytest.raises(ProtegeError, match="differs"):
        pg.term("simkd", student="layer3", teacher="layer3", tap="layer2")
    with pytest.raises(ProtegeError, match="adapter"):
        pg.term("simkd", student="layer3", teacher="layer3", adapter="conv_bn")
    bad_head = pg.Distiller(
        student, teacher, [pg.term("simkd", student="layer3", teacher="layer2", tap="layer3")]
    )
    with pytest.raises(ProtegeError, match=r"head 'fc' does not take.*C_t=6"):
        bad_head.prepare(batch())
    with pytest.raises(ValueError, match="no teacher model"):
        SimKDProjector(tap="layer3").build(torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2), BuildContext())
    with pytest.raises(ProtegeError, match="not built yet"):
        SimKDProjector(tap="layer3").inference(student)(torch.zeros(1, 1, 12, 12))


def test_tap_comes_from_the_build_context_when_it_names_one() -> None:
    def Context(**kw):  # noqa: N802
        return BuildContext(student_key="layer3", **kw)

    state = SimKDProjector()
    state.build(torch.zeros(2, 4, 3, 3), torch.zeros(2, 8, 3, 3), Context(teachers=[tiny_cnn((4, 6, 8), 1)]))
    assert state.tap == "layer3"
    with pytest.raises(ValueError, match="differs"):
        SimKDProjector(tap="layer2").build(
            torch.zeros(2, 4, 3, 3), torch.zeros(2, 8, 3, 3), Context(teachers=[tiny_cnn((4, 6, 8), 1)])
        )


def test_registry_entries() -> None:
    review = get_loss("reviewkd")
    assert review.reads == "feature-list" and review.state is ReviewFusion
    assert review.params == {"levels": (4, 2, 1)} and review.state_params == {"mid_channels": None}
    assert "Knowledge Review" in review.paper and "CVPR 2021" in review.paper
    sim = get_loss("simkd")
    assert sim.reads == "features" and sim.state is SimKDProjector and sim.params == {}
    assert sim.state_params == {"head": "fc", "factor": 2, "tap": None}
    assert "Reused Teacher Classifier" in sim.paper and "CVPR 2022" in sim.paper
    for info in (review, sim):
        assert info.uses_teacher and not info.uses_target and info.summary


# =========================================================================== end to end


def test_reviewkd_trains_through_the_distiller_with_warmup() -> None:
    teacher, student = tiny_cnn((4, 6, 8), 1), tiny_cnn((2, 3, 4), 2)
    taps = ["layer1", "layer2", "layer3", "fc:in"]
    term = pg.term("reviewkd", 2.0, student=taps, teacher=taps, warmup=2.0, mid_channels=5)
    d = pg.Distiller(student, teacher, [pg.ce(1.0), term])
    d.prepare(batch())
    fusion = d.terms[1].state
    assert len(fusion.abfs) == 4 and fusion.abfs[0].conv1[0].out_channels == 5
    before = [p.detach().clone() for p in fusion.parameters()]
    opt = torch.optim.SGD(d.parameters(), lr=0.05, momentum=0.9)
    d.set_progress(0.0)
    _, losses = d(batch())
    assert losses[term.name].item() == 0.0  # the warm-up starts at zero
    values = []
    for progress in (1.0, 2.0, 3.0):
        d.set_progress(progress)
        _, losses = d(batch(seed=5))
        values.append(losses[term.name].item())
    assert values[0] == pytest.approx(values[1] / 2, rel=1e-5) and values[1] == pytest.approx(
        values[2], rel=1e-5
    )
    for step in range(2):
        _, losses = d(batch(seed=step))
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, fusion.parameters()) if b.dim() > 1)
    assert any(k.startswith("terms.1.state.abfs.3.") for k in d.state_dict())
    assert type(d.export()) is type(student)  # ReviewKD does not change what the student is


def test_reviewkd_bad_taps_become_protege_errors() -> None:
    teacher, student = tiny_cnn((4, 6, 8), 1), tiny_cnn((2, 3, 4), 2)
    term = pg.term("reviewkd", student=["layer1", "layer2"], teacher=["layer1"])
    with pytest.raises(ProtegeError, match=r"reviewkd.*2 student features.*1 teacher features"):
        pg.Distiller(student, teacher, [term]).prepare(batch())


def test_simkd_fit_evaluates_through_the_reused_head_and_checkpoints_restore_it(tmp_path) -> None:
    d = simkd_distiller(student_tap="layer1")  # 6x6, pooled to the teacher's 3x3
    teacher = d.teachers["teacher"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 12, 12, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)  # labels the teacher's head can reach
    train = pg.make_loader(TensorDataset(x[:32], y[:32]), 8, shuffle=True, seed=0)
    val = pg.make_loader(TensorDataset(x[32:], y[32:]), 16, shuffle=False)
    own_fc = d.student.fc.weight.detach().clone()
    cfg = pg.TrainConfig(epochs=2, progress=False, measure_cost=False, optim={"lr": 0.05})
    summary = pg.fit(d, train, val, cfg, run_dir=tmp_path / "run")

    model = d.inference_model().eval()
    with torch.no_grad():
        logits = model(x[32:])
    acc = (logits.argmax(1) == y[32:]).float().mean().item()
    assert summary["final"]["val/acc"] == pytest.approx(acc, abs=1e-6)
    assert set(summary["final"]) >= {"train/simkd:layer1", "val/acc"}
    assert torch.equal(d.student.fc.weight, own_fc)

    # The checkpoint holds the projector and the reused head; a fresh distiller restores both.
    where = checkpoint_dir(tmp_path / "run", "last")
    extra = load_file(where / "distiller.safetensors")
    assert torch.equal(extra["terms.0.state.head.weight"], teacher.fc.weight)
    fresh = simkd_distiller(student_tap="layer1")
    fresh.prepare(batch())
    fresh.student.load_state_dict(load_file(where / "model.safetensors"))
    fresh.load_state_dict(extra, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh.inference_model().eval()(x[32:]), logits, rtol=0, atol=0)

    # Without the teacher: an unbuilt state rebuilds itself from the saved tensors.
    state = SimKDProjector(tap="layer1")
    prefix = "terms.0.state."
    state.load_state_dict({k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)})
    assert not state.pending and not any(p.requires_grad for p in state.head.parameters())
    with torch.no_grad():
        torch.testing.assert_close(state.inference(fresh.student).eval()(x[32:]), logits, rtol=0, atol=0)


# =========================================================================== configs


@pytest.mark.parametrize(
    "name", ["mnist-reviewkd.yaml", "mnist-simkd.yaml", "cifar100-resnet32x4-resnet8x4-reviewkd.yaml"]
)
def test_configs_build_and_run_one_step(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    cifar = "cifar" in name
    classes, chans, side = (100, 3, 32) if cifar else (10, 1, 28)
    torch.manual_seed(0)
    student = pg.build_model(cfg.student.model, num_classes=classes, in_chans=chans)
    teacher = pg.build_model(cfg.teacher.model, num_classes=classes, in_chans=chans)
    terms = [pg.Term(**t.term_kwargs()) for t in cfg.terms]
    d = pg.Distiller(student, teacher, terms)
    example = (torch.randn(2, chans, side, side), torch.randint(0, classes, (2,)))
    d.prepare(example)
    d.set_progress(100.0)  # past any warm-up
    _, losses = d(example)
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values()), losses
    assert re.search("reviewkd|simkd", ",".join(losses))
    if "simkd" in name:  # the prediction path: student, projector, the teacher's head
        d.eval()
        with torch.no_grad():
            assert d.inference_model()(example[0]).shape == (2, classes)


def test_evaluate_run_predicts_through_the_simkd_head(tmp_path):
    """`protege evaluate` of a SimKD run scores the reused-head predictor, not the untrained fc."""
    import protege as pg
    from protege.config import load_config

    base = {
        "output_dir": str(tmp_path),
        "data": {"source": "digits", "batch_size": 64},
        "progress": False,
        "measure_cost": False,
    }
    mlp = {"model": "mlp", "kwargs": {"input_size": 8}}
    pg.run(load_config(None, **base, name="teacher", student=mlp, epochs=3), mode="train")
    cfg = load_config(
        None,
        **base,
        name="simkd",
        epochs=3,
        teacher={**mlp, "weights": str(tmp_path / "teacher")},
        student={"model": "mlp_s", "kwargs": {"input_size": 8}},
        terms=[{"loss": "simkd", "student": "fc:in", "teacher": "fc:in"}],
    )
    summary = pg.run(cfg)
    evaluated = pg.evaluate_run(tmp_path / "simkd", split="test", which="best", latency=False)
    assert evaluated["metrics"]["acc"] == pytest.approx(summary["test"]["best"]["acc"])
    assert evaluated["metrics"]["acc"] > 0.5  # the student's own fc was never trained
