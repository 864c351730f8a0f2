"""The vision-language losses (VLM-OOD, DC-CLIP, CLIP, TinyCLIP) against float64 references written as
plain loops over samples, classes and embedding coordinates (no torch code path shared with the
implementation), their gradients, their precision under bf16, their shape errors, and the default
keys through which a term reads the vision_language task's outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import protege as pg
from protege.config import TermConfig
from protege.errors import ProtegeError
from protege.losses import get_loss
from protege.losses.logits import kd
from protege.losses.vision_language import (
    affinity_mimic,
    clip_cls,
    clip_contrastive,
    feat_mse,
    img_contrast,
    vl_align,
)
from references import rand, t64

N, C, D = 6, 5, 4


# --------------------------------------------------------------------------- references (loops)


def np_unit(v: np.ndarray) -> list[float]:
    norm = math.sqrt(sum(float(x) * float(x) for x in v))
    return [float(x) / norm for x in v]


def np_cos_matrix(a: np.ndarray, b: np.ndarray) -> list[list[float]]:
    """cos(a_i, b_j) by loops."""
    ua, ub = [np_unit(r) for r in a], [np_unit(r) for r in b]
    return [[sum(x * y for x, y in zip(u, v)) for v in ub] for u in ua]


def np_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def np_kl(t_row: list[float], s_row: list[float]) -> float:
    """KL(softmax(t_row) || softmax(s_row))."""
    lt, ls = np_log_softmax(t_row), np_log_softmax(s_row)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def np_columns(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


def np_info_nce(m: list[list[float]], positives: list[list[int]]) -> float:
    """Mean over rows of -1/|P_i| sum_{j in P_i} log softmax(row i)_j."""
    total = 0.0
    for row, pos in zip(m, positives):
        logp = np_log_softmax(row)
        total += -sum(logp[j] for j in pos) / len(pos)
    return total / len(m)


def np_clip_cls(s, t, y, T):
    cos = np_cos_matrix(s, t)
    return sum(-np_log_softmax([c / T for c in row])[int(y[i])] for i, row in enumerate(cos)) / len(cos)


def np_vl_align(s, t, k, T):
    total = 0.0
    for s_row, t_row in zip(s, t):
        order = sorted(range(len(t_row)), key=lambda c: -t_row[c])[: (k or len(t_row))]
        total += np_kl([t_row[c] / T for c in order], [s_row[c] / T for c in order])
    return T * T * total / len(s)


def np_smooth_l1(d: float, beta: float) -> float:
    return d * d / (2 * beta) if abs(d) < beta else abs(d) - beta / 2


def np_feat(s, t, normalize, kind, reduction, beta=1.0):
    total = 0.0
    for a, b in zip(s, t):
        if normalize:
            a, b = np_unit(a), np_unit(b)
        errs = [(x - y) ** 2 if kind == "mse" else np_smooth_l1(x - y, beta) for x, y in zip(a, b)]
        total += sum(errs) if reduction == "sample" else sum(errs) / len(errs)
    return total / len(s)


def np_img_contrast(s, t, T, symmetric):
    m = [[c / T for c in row] for row in np_cos_matrix(s, t)]
    diag = [[i] for i in range(len(m))]
    forward = np_info_nce(m, diag)
    return 0.5 * (forward + np_info_nce(np_columns(m), diag)) if symmetric else forward


def np_clip_contrastive(image, text, y, T, same_class):
    m = [[c / T for c in row] for row in np_cos_matrix(image, text)]
    n = len(m)
    if same_class:
        pos = [[j for j in range(n) if y[j] == y[i]] for i in range(n)]
    else:
        pos = [[i] for i in range(n)]
    return 0.5 * (np_info_nce(m, pos) + np_info_nce(np_columns(m), pos))


def np_affinity(s_img, s_txt, t_img, t_txt, T_s, T_t):
    a_s = [[c / T_s for c in row] for row in np_cos_matrix(s_img, s_txt)]
    a_t = [[c / T_t for c in row] for row in np_cos_matrix(t_img, t_txt)]
    i2t = sum(np_kl(t, s) for t, s in zip(a_t, a_s)) / len(a_s)
    t2i = sum(np_kl(t, s) for t, s in zip(np_columns(a_t), np_columns(a_s))) / len(a_s)
    return 0.5 * (i2t + t2i)


# --------------------------------------------------------------------------- clip_cls


@pytest.mark.parametrize("T", [0.07, 0.5])
def test_clip_cls_matches_loops(T: float) -> None:
    s, t = rand(N, D, seed=1), rand(C, D, seed=2)
    y = np.array([0, 4, 2, 2, 1, 3])
    got = clip_cls(t64(s), t64(t), target=torch.tensor(y), T=T)
    assert got.item() == pytest.approx(np_clip_cls(s, t, y, T), rel=1e-10)


def test_clip_cls_is_the_cross_entropy_of_the_task_logits() -> None:
    """With the teacher's class embeddings normalised (as the task gives them) the loss is the CE of
    ``logit_scale * cos`` with ``logit_scale = 1 / T``."""
    s, t = t64(rand(N, D, seed=3)), F.normalize(t64(rand(C, D, seed=4)), dim=1)
    y = torch.tensor([1, 1, 0, 4, 3, 2])
    logits = (1 / 0.07) * F.normalize(s, dim=1) @ t.t()
    assert clip_cls(s, t, target=y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)


def test_clip_cls_gradient_reaches_the_student() -> None:
    s, t = t64(rand(N, D, seed=5), grad=True), t64(rand(C, D, seed=6))
    clip_cls(s, t, target=torch.arange(N) % C).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # the embedding's norm does not matter: the gradient is orthogonal to each row
    assert (s.grad * s.detach()).sum(dim=1).abs().max() < 1e-12


def test_clip_cls_errors() -> None:
    y = torch.arange(N) % C
    with pytest.raises(ValueError, match="embed_dim equal to the teacher's.*adapter"):
        clip_cls(torch.randn(N, D), torch.randn(C, D + 1), target=y)
    with pytest.raises(ValueError, match="non-empty"):
        clip_cls(torch.randn(0, D), torch.randn(C, D), target=y[:0])
    with pytest.raises(ValueError, match="one class index per sample"):
        clip_cls(torch.randn(N, D), torch.randn(C, D), target=y[:-1])
    with pytest.raises(ValueError, match="temperature"):
        clip_cls(torch.randn(N, D), torch.randn(C, D), target=y, T=0.0)


# --------------------------------------------------------------------------- vl_align


@pytest.mark.parametrize(("k", "T"), [(None, 1.0), (2, 1.0), (3, 2.5), (C, 0.5), (100, 1.0)])
def test_vl_align_matches_loops(k, T) -> None:
    s, t = rand(N, C, seed=7, scale=3.0), rand(N, C, seed=8, scale=3.0)
    got = vl_align(t64(s), t64(t), k=k, T=T)
    assert got.item() == pytest.approx(np_vl_align(s, t, k if k is None or k < C else None, T), rel=1e-10)


def test_vl_align_k1_is_zero_and_k_all_is_hinton_kd() -> None:
    s, t = t64(rand(N, C, seed=9, scale=3.0)), t64(rand(N, C, seed=10, scale=3.0))
    assert vl_align(s, t, k=1).item() == 0.0
    full = kd(s, t, T=2.0).item()
    assert vl_align(s, t, k=C, T=2.0).item() == pytest.approx(full, rel=1e-12)
    assert vl_align(s, t, T=2.0).item() == pytest.approx(full, rel=1e-12)
    assert vl_align(s, t, k=C - 1, T=2.0).item() != pytest.approx(full, rel=1e-6)


def test_vl_align_gradient_only_on_the_teachers_top_k() -> None:
    s, t = t64(rand(N, C, seed=11, scale=3.0), grad=True), t64(rand(N, C, seed=12, scale=3.0))
    vl_align(s, t, k=2).backward()
    top = t.topk(2, dim=1).indices
    chosen = torch.zeros(N, C, dtype=torch.bool).scatter(1, top, True)
    assert s.grad is not None
    assert (s.grad[~chosen] == 0).all() and s.grad[chosen].abs().sum() > 0


def test_vl_align_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        vl_align(torch.randn(N, C), torch.randn(N, C + 1))
    with pytest.raises(ValueError, match="non-empty"):
        vl_align(torch.randn(0, C), torch.randn(0, C))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            vl_align(torch.randn(N, C), torch.randn(N, C), k=bad)


# --------------------------------------------------------------------------- feat_mse


@pytest.mark.parametrize(
    ("normalize", "kind", "reduction", "beta"),
    [
        (True, "mse", "sample", 1.0),
        (False, "mse", "sample", 1.0),
        (True, "mse", "element", 1.0),
        (False, "smooth_l1", "sample", 1.0),
        (False, "smooth_l1", "element", 0.5),
        (True, "smooth_l1", "sample", 0.05),
    ],
)
def test_feat_mse_matches_loops(normalize, kind, reduction, beta) -> None:
    s, t = rand(N, D, seed=13, scale=1.5), rand(N, D, seed=14, scale=1.5)
    got = feat_mse(t64(s), t64(t), normalize=normalize, kind=kind, reduction=reduction, beta=beta)
    assert got.item() == pytest.approx(np_feat(s, t, normalize, kind, reduction, beta), rel=1e-10)


def test_feat_mse_normalised_is_two_minus_two_cosines() -> None:
    """VLM-OOD's L-mse on unit vectors: ||s - t||^2 = 2 - 2 cos(s, t), averaged over the batch."""
    s, t = t64(rand(N, D, seed=15)), t64(rand(N, D, seed=16))
    expected = (2 - 2 * F.cosine_similarity(s, t, dim=1)).mean()
    assert feat_mse(s, t).item() == pytest.approx(expected.item(), rel=1e-12)
    assert feat_mse(s, t, reduction="element").item() == pytest.approx(expected.item() / D, rel=1e-12)


def test_feat_mse_gradient_reaches_the_student_only() -> None:
    s, t = t64(rand(N, D, seed=17), grad=True), t64(rand(N, D, seed=18))
    feat_mse(s, t, normalize=False, kind="smooth_l1").backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_feat_mse_errors() -> None:
    with pytest.raises(ValueError, match="adapter"):
        feat_mse(torch.randn(N, D), torch.randn(N, D + 2))
    with pytest.raises(ValueError, match="same shape"):
        feat_mse(torch.randn(N, D), torch.randn(N + 1, D))
    with pytest.raises(ValueError, match="non-empty"):
        feat_mse(torch.randn(0, D), torch.randn(0, D))
    with pytest.raises(ValueError, match="kind"):
        feat_mse(torch.randn(N, D), torch.randn(N, D), kind="l1")
    with pytest.raises(ValueError, match="reduction"):
        feat_mse(torch.randn(N, D), torch.randn(N, D), reduction="mean")


# --------------------------------------------------------------------------- img_contrast


@pytest.mark.parametrize(("T", "symmetric"), [(0.07, True), (0.07, False), (0.5, True)])
def test_img_contrast_matches_loops(T, symmetric) -> None:
    s, t = rand(N, D, seed=19), rand(N, D, seed=20)
    got = img_contrast(t64(s), t64(t), T=T, symmetric=symmetric)
    assert got.item() == pytest.approx(np_img_contrast(s, t, T, symmetric), rel=1e-10)


def test_img_contrast_gradient_reaches_the_student() -> None:
    s, t = t64(rand(N, D, seed=21), grad=True), t64(rand(N, D, seed=22))
    img_contrast(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_img_contrast_errors() -> None:
    with pytest.raises(ValueError, match="same N samples"):
        img_contrast(torch.randn(N, D), torch.randn(N + 1, D))
    with pytest.raises(ValueError, match="adapter"):
        img_contrast(torch.randn(N, D), torch.randn(N, D + 1))
    with pytest.raises(ValueError, match="non-empty"):
        img_contrast(torch.randn(0, D), torch.randn(0, D))


# --------------------------------------------------------------------------- clip_contrastive


def test_clip_contrastive_with_distinct_labels_is_clips_loss() -> None:
    image, text = rand(N, D, seed=23), rand(N, D, seed=24)
    y = np.arange(N)
    clip = np_clip_contrastive(image, text, y, 0.07, same_class=False)
    for same in (True, False):
        got = clip_contrastive([t64(image), t64(text)], target=torch.tensor(y), same_class_positive=same)
        assert got.item() == pytest.approx(clip, rel=1e-10)
    # and CLIP's loss written with torch's cross-entropy on the explicit logit matrix
    logits = F.normalize(t64(image), dim=1) @ F.normalize(t64(text), dim=1).t() / 0.07
    arange = torch.arange(N)
    ref = 0.5 * (F.cross_entropy(logits, arange) + F.cross_entropy(logits.t(), arange))
    assert clip == pytest.approx(ref.item(), rel=1e-10)


def test_clip_contrastive_multi_positive_on_repeated_classes() -> None:
    """Repeated classes (Fashion-MNIST's captions repeat per class): every same-class pair is a
    positive, by hand: row 0 (class 0, positives {0, 3}) of a 4-sample batch checked on its own."""
    image, text = rand(4, D, seed=25), rand(4, D, seed=26)
    y = np.array([0, 1, 2, 0])
    T = 0.3
    got = clip_contrastive([t64(image), t64(text)], target=torch.tensor(y), T=T)
    assert got.item() == pytest.approx(np_clip_contrastive(image, text, y, T, same_class=True), rel=1e-10)
    # not CLIP's loss, which counts the other image of class 0 as a negative
    clip = clip_contrastive([t64(image), t64(text)], target=torch.tensor(y), T=T, same_class_positive=False)
    assert got.item() != pytest.approx(clip.item(), rel=1e-6)
    # one row written out: -(log p_00 + log p_03) / 2 with p_0j = exp(m_0j) / sum_k exp(m_0k)
    m = np.array(np_cos_matrix(image, text)) / T
    row0 = -0.5 * (m[0, 0] + m[0, 3] - 2 * math.log(np.exp(m[0]).sum()))
    rows = [
        -np.mean([m[i, j] - math.log(np.exp(m[i]).sum()) for j in range(4) if y[j] == y[i]]) for i in range(4)
    ]
    cols = [
        -np.mean([m[i, j] - math.log(np.exp(m[:, j]).sum()) for i in range(4) if y[i] == y[j]])
        for j in range(4)
    ]
    assert rows[0] == pytest.approx(row0, rel=1e-12)
    assert got.item() == pytest.approx(0.5 * (np.mean(rows) + np.mean(cols)), rel=1e-10)


def test_clip_contrastive_trains_both_towers() -> None:
    image, text = t64(rand(N, D, seed=27), grad=True), t64(rand(N, D, seed=28), grad=True)
    clip_contrastive([image, text], target=torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_clip_contrastive_errors() -> None:
    y = torch.arange(N)
    with pytest.raises(ValueError, match="image embeddings, text embeddings"):
        clip_contrastive([torch.randn(N, D)], target=y)
    with pytest.raises(ValueError, match="image embeddings, text embeddings"):
        clip_contrastive(torch.randn(N, D), target=y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same N samples"):
        clip_contrastive([torch.randn(N, D), torch.randn(N - 1, D)], target=y)
    with pytest.raises(ValueError, match="widths"):
        clip_contrastive([torch.randn(N, D), torch.randn(N, D + 1)], target=y)
    with pytest.raises(ValueError, match="class labels"):
        clip_contrastive([torch.randn(N, D), torch.randn(N, D)])
    # without same-class positives the labels are not needed
    assert torch.isfinite(clip_contrastive([torch.randn(N, D), torch.randn(N, D)], same_class_positive=False))


# --------------------------------------------------------------------------- affinity_mimic


@pytest.mark.parametrize(("T_s", "T_t"), [(0.01, 0.01), (0.1, 0.05)])
def test_affinity_mimic_matches_loops(T_s, T_t) -> None:
    s_img, s_txt = rand(N, D, seed=29), rand(N, D, seed=30)
    t_img, t_txt = rand(N, D + 3, seed=31), rand(N, D + 3, seed=32)  # the teacher is wider
    got = affinity_mimic([t64(s_img), t64(s_txt)], [t64(t_img), t64(t_txt)], T_s=T_s, T_t=T_t)
    assert got.item() == pytest.approx(np_affinity(s_img, s_txt, t_img, t_txt, T_s, T_t), rel=1e-9)


def test_affinity_mimic_is_tinyclips_cross_entropy_minus_the_teachers_entropy() -> None:
    """TinyCLIP's code uses CE(p_t, p_s) per direction; the KL differs by H(p_t), a constant."""
    s = [t64(rand(N, D, seed=33)), t64(rand(N, D, seed=34))]
    t = [t64(rand(N, D, seed=35)), t64(rand(N, D, seed=36))]
    a_s = F.normalize(s[0], dim=1) @ F.normalize(s[1], dim=1).t() / 0.1
    a_t = F.normalize(t[0], dim=1) @ F.normalize(t[1], dim=1).t() / 0.1
    ce, entropy = 0.0, 0.0
    for zs, zt in ((a_s, a_t), (a_s.t(), a_t.t())):
        pt = zt.softmax(dim=1)
        ce += 0.5 * F.cross_entropy(zs, pt).item()
        entropy += 0.5 * -(pt * pt.log()).sum(dim=1).mean().item()
    assert affinity_mimic(s, t, T_s=0.1, T_t=0.1).item() == pytest.approx(ce - entropy, rel=1e-9)


def test_affinity_mimic_is_zero_when_the_student_is_the_teacher() -> None:
    img, txt = t64(rand(N, D, seed=37)), t64(rand(N, D, seed=38))
    assert affinity_mimic([img, txt], [img.clone(), txt.clone()]).item() == pytest.approx(0.0, abs=1e-12)
    # a scaled copy has the same cosines
    assert affinity_mimic([img, txt], [3 * img, 0.5 * txt]).item() == pytest.approx(0.0, abs=1e-12)


def test_affinity_mimic_gradient_reaches_both_student_towers_only() -> None:
    s = [t64(rand(N, D, seed=39), grad=True), t64(rand(N, D, seed=40), grad=True)]
    t = [t64(rand(N, D, seed=41)), t64(rand(N, D, seed=42))]
    affinity_mimic(s, t, T_s=0.1, T_t=0.1).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


def test_affinity_mimic_errors() -> None:
    s = [torch.randn(N, D), torch.randn(N, D)]
    with pytest.raises(ValueError, match="same N samples"):
        affinity_mimic(s, [torch.randn(N + 1, D), torch.randn(N + 1, D)])
    with pytest.raises(ValueError, match="teacher image and text embeddings have widths"):
        affinity_mimic(s, [torch.randn(N, D), torch.randn(N, D + 1)])
    with pytest.raises(ValueError, match="two teacher outputs"):
        affinity_mimic(s, torch.randn(N, D))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature T_t"):
        affinity_mimic(s, s, T_t=-1.0)


# --------------------------------------------------------------------------- precision


CASES = {
    "clip_cls": lambda: ((torch.randn(N, D), torch.randn(C, D)), {"target": torch.arange(N) % C}),
    "vl_align": lambda: ((3 * torch.randn(N, C), 3 * torch.randn(N, C)), {"k": 3}),
    "feat_mse": lambda: ((torch.randn(N, D), torch.randn(N, D)), {}),
    "img_contrast": lambda: ((torch.randn(N, D), torch.randn(N, D)), {}),
    "clip_contrastive": lambda: (([torch.randn(N, D), torch.randn(N, D)],), {"target": torch.arange(N) % 3}),
    "affinity_mimic": lambda: (
        ([torch.randn(N, D), torch.randn(N, D)], [torch.randn(N, D + 1), torch.randn(N, D + 1)]),
        {},
    ),
}


def _bf16(value):
    return [_bf16(v) for v in value] if isinstance(value, list) else value.bfloat16()


def _fp32(value):
    return [_fp32(v) for v in value] if isinstance(value, list) else value.float()


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_under_bf16_inputs(name: str) -> None:
    """bf16 inputs under autocast: a float32 result equal to the call on the same values in float32."""
    torch.manual_seed(0)
    args, kwargs = CASES[name]()
    low = [_bf16(a) for a in args]
    fn = get_loss(name).fn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*low, **kwargs)
    ref = fn(*[_fp32(a) for a in low], **kwargs)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


# --------------------------------------------------------------------------- registry and terms


def test_registry_flags() -> None:
    expected = {  # reads, uses_teacher, uses_target, default keys
        "clip_cls": ("embeddings", True, True, ("image_embeds", "class_embeds")),
        "vl_align": ("logits", True, False, ("logits", "logits")),
        "feat_mse": ("embeddings", True, False, ("image_embeds", "image_embeds")),
        "img_contrast": ("embeddings", True, False, ("image_embeds", "image_embeds")),
        "clip_contrastive": (
            "feature-list",
            False,
            True,
            (("image_embeds", "text_embeds"), ("image_embeds", "text_embeds")),
        ),
        "affinity_mimic": (
            "feature-list",
            True,
            False,
            (("image_embeds", "text_embeds"), ("image_embeds", "text_embeds")),
        ),
    }
    for name, (reads, teacher, target, keys) in expected.items():
        info = get_loss(name)
        assert (info.reads, info.uses_teacher, info.uses_target, info.default_keys) == (
            reads,
            teacher,
            target,
            keys,
        )
        assert info.state is None and not info.uses_index and not info.multi_teacher
        assert "target" not in info.params
    assert get_loss("clip_cls").params == {"T": 0.07}
    assert get_loss("vl_align").params == {"k": None, "T": 1.0}
    assert get_loss("clip_contrastive").params == {"T": 0.07, "same_class_positive": True}
    assert get_loss("affinity_mimic").params == {"T_s": 0.01, "T_t": 0.01}


def test_terms_read_the_default_keys() -> None:
    assert (pg.term("clip_cls").student_key, pg.term("clip_cls").teacher_key) == (
        "image_embeds",
        "class_embeds",
    )
    assert pg.term("clip_contrastive").student_key == ["image_embeds", "text_embeds"]
    assert pg.term("affinity_mimic").teacher_key == ["image_embeds", "text_embeds"]
    assert pg.term("kd").student_key == "logits"  # the others are unchanged
    assert pg.term("clip_cls", student="img").student_key == "img"
    assert pg.term("clip_cls", student="img").teacher_key == "class_embeds"
    # a config's term that names no keys reads the loss's default keys; named keys win
    assert (TermConfig(loss="clip_cls").student, TermConfig(loss="clip_cls").teacher) == (
        "image_embeds",
        "class_embeds",
    )
    assert TermConfig(loss="feat_mse", teacher="text_embeds").model_dump()["student"] == "image_embeds"
    assert TermConfig(loss="feat_mse", teacher="text_embeds").teacher == "text_embeds"
    assert TermConfig(loss="clip_contrastive").student == ["image_embeds", "text_embeds"]
    assert TermConfig(loss="ce").student == "logits" and TermConfig(loss="nonsense").student == "logits"


@pytest.mark.parametrize(
    ("term", "loss", "student", "teacher"),
    [
        (pg.clip_cls(), "clip_cls", "image_embeds", "class_embeds"),
        (pg.vl_align(k=5), "vl_align", "logits", "logits"),
        (pg.feat_mse(), "feat_mse", "image_embeds", "image_embeds"),
        (pg.img_contrast(), "img_contrast", "image_embeds", "image_embeds"),
        (
            pg.clip_contrastive(),
            "clip_contrastive",
            ["image_embeds", "text_embeds"],
            ["image_embeds", "text_embeds"],
        ),
        (
            pg.affinity_mimic(),
            "affinity_mimic",
            ["image_embeds", "text_embeds"],
            ["image_embeds", "text_embeds"],
        ),
    ],
)
def test_constructors(term, loss, student, teacher) -> None:
    assert term.loss == loss and term.weight == 1.0 and term.info is get_loss(loss)
    assert term.student_key == student and term.teacher_key == teacher


def test_constructor_params_reach_the_loss() -> None:
    assert pg.vl_align(k=5, T=2.0).params == {"k": 5, "T": 2.0}
    assert pg.feat_mse(kind="smooth_l1", normalize=False).params["kind"] == "smooth_l1"
    assert pg.clip_contrastive(same_class_positive=False).params["same_class_positive"] is False


def test_a_term_reads_the_task_outputs() -> None:
    """Through a Term, as the Distiller calls it: the outputs dicts of the vision_language task."""
    torch.manual_seed(1)
    student = {
        "image_embeds": torch.randn(N, D),
        "text_embeds": torch.randn(N, D),
        "logits": torch.randn(N, C),
    }
    teacher = {
        "image_embeds": torch.randn(N, D),
        "text_embeds": torch.randn(N, D),
        "class_embeds": F.normalize(torch.randn(C, D), dim=1),
        "logits": torch.randn(N, C),
    }
    y = torch.arange(N) % C
    value = pg.clip_cls(2.0)(student, [teacher], y, [1.0])
    expected = 2.0 * clip_cls(student["image_embeds"], teacher["class_embeds"], target=y)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value = pg.clip_contrastive()(student, [teacher], y, [1.0])  # reads no teacher
    expected = clip_contrastive([student["image_embeds"], student["text_embeds"]], target=y)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ProtegeError, match="embed_dim"):
        pg.clip_cls()(student, [{**teacher, "class_embeds": torch.randn(C, D + 1)}], y, [1.0])
    with pytest.raises(ProtegeError, match="needs labels"):
        pg.clip_contrastive()(student, [teacher], None, [1.0])
