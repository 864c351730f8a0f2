"""The vision-language family: losses for distilling CLIP-style models (an image encoder and a text
encoder that embed into one space), read by the ``vision_language`` task.

The task's forward gives student and teacher alike these outputs, which the losses read by name
(each loss registers the keys it reads by default, so a term need not name them):

- ``image_embeds``: (N, D) image embeddings, not normalised;
- ``text_embeds``: (N, D) embeddings of the batch's captions (one per image), not normalised;
- ``class_embeds``: (C, D) L2-normalised text embeddings of the batch's classes (prompt-ensembled);
- ``logits``: (N, C) ``logit_scale * cos(image_embeds, class_embeds)``.

CLIP compares embeddings by their cosine and turns cosines into a distribution with a temperature
``T`` (``softmax(cos / T)``; CLIP writes ``logit_scale = 1 / T``, learned, initialised at
``1 / 0.07`` and clamped at 100, so a trained OpenAI CLIP has ``T = 0.01``). Here every temperature
is a fixed hyper-parameter; each docstring says where its default comes from.

The losses, by paper:

- Li, Fang, Ding, Yin & Su (VLM-OOD), "Distilling Large Vision-Language Model with
  Out-of-Distribution Generalizability", ICCV 2023: :func:`clip_cls` (L-cls), :func:`vl_align`
  (L-vlalign), :func:`feat_mse` (L-mse) and :func:`img_contrast` (L-im-cst). Defaults follow the
  authors' code (``main_experiments.py`` of ``xuanlinli17/large_vlm_distillation_ood``).
- DC-CLIP ("A Progressive Framework of Vision-language Knowledge Distillation and Alignment for
  Multilingual Scene"): :func:`feat_mse` with ``kind="smooth_l1"`` (stage 1, feature distillation)
  and :func:`clip_contrastive` (stage 2, image-text alignment; also how ``protege train`` trains a
  CLIP teacher: Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021).
- Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance", ICCV
  2023: :func:`affinity_mimic`.

Every loss is a pure function registered with :func:`~protege.losses.registry.register_loss`, so it
computes in float32 whatever its inputs' dtype.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss

__all__ = [
    "affinity_mimic",
    "clip_cls",
    "clip_contrastive",
    "feat_mse",
    "img_contrast",
    "vl_align",
]

VLM_OOD = (
    "Li, Fang, Ding, Yin & Su, Distilling Large Vision-Language Model with Out-of-Distribution "
    "Generalizability, ICCV 2023"
)
DC_CLIP = (
    "DC-CLIP: A Progressive Framework of Vision-language Knowledge Distillation and Alignment for "
    "Multilingual Scene, 2024"
)
CLIP = (
    "Radford et al., Learning Transferable Visual Models From Natural Language Supervision (CLIP), ICML 2021"
)
TINYCLIP = "Wu et al., TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance, ICCV 2023"

_IMAGE_TEXT = ("image_embeds", "text_embeds")


# --------------------------------------------------------------------------- checks


def _embeddings(x: Tensor, who: str, loss: str) -> None:
    """``x`` must be a non-empty (rows, D) matrix."""
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{loss}: {who} of shape {tuple(x.shape)}: expected a non-empty (N, D) matrix")


def _same_rows(a: Tensor, b: Tensor, what: str, loss: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{loss}: {what} have {a.shape[0]} and {b.shape[0]} rows: they must describe the same N samples"
        )


def _same_width(a: Tensor, b: Tensor, what: str, loss: str, fix: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{loss}: {what} have widths {a.shape[1]} and {b.shape[1]}, which must be equal; {fix}"
        )


def _positive(value: float, name: str, loss: str) -> None:
    if not value > 0:
        raise ValueError(f"{loss}: the temperature {name} must be positive, got {value}")


def _image_text(value: object, who: str, loss: str) -> tuple[Tensor, Tensor]:
    """The (image, text) embeddings a feature-list term hands over, checked."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, Tensor) for v in value)
    ):
        raise ValueError(
            f"{loss} reads two {who} outputs, [image embeddings, text embeddings] "
            f"(e.g. {who}=['image_embeds', 'text_embeds']), got {type(value).__name__}"
        )
    image, text = value
    _embeddings(image, f"{who} image embeddings", loss)
    _embeddings(text, f"{who} text embeddings", loss)
    _same_rows(image, text, f"{who} image and text embeddings", loss)
    _same_width(
        image, text, f"{who} image and text embeddings", loss, "they are compared in one embedding space"
    )
    return image, text


def _labels(target: Tensor | None, n: int, loss: str) -> Tensor:
    if target is None:
        raise ValueError(f"{loss} needs the batch's class labels (target)")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(
            f"{loss}: target of shape {tuple(target.shape)}: expected one class index per sample ({n},)"
        )
    return target


def _cosines(a: Tensor, b: Tensor) -> Tensor:
    """(rows of a) x (rows of b) cosine similarities."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of ``KL(softmax(teacher row) || softmax(student row))``."""
    log_pt = F.log_softmax(teacher_logits, dim=1)
    log_ps = F.log_softmax(student_logits, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()


# --------------------------------------------------------------------------- VLM-OOD


@register_loss(
    "clip_cls",
    paper=VLM_OOD,
    reads="embeddings",
    uses_target=True,
    default_keys=("image_embeds", "class_embeds"),
)
def clip_cls(student_image: Tensor, teacher_class: Tensor, *, target: Tensor, T: float = 0.07) -> Tensor:
    r"""Vision-language classification through the teacher's text embeddings (VLM-OOD's L-cls).

    Li, Fang, Ding, Yin & Su, "Distilling Large Vision-Language Model with Out-of-Distribution
    Generalizability", ICCV 2023. The student's image embedding ``f_i`` (N, D) is classified by its
    cosine to the teacher's class text embeddings ``t_c`` (C, D), a classifier that is not learned
    and that covers classes never seen in training (open vocabulary):

        L = 1/N * sum_i CE( [cos(f_i, t_c) / T]_{c=1..C}, y_i )

    ``T = 0.07``: the authors' code (``--temperature``, default 0.07, used by all their example
    runs and shared by L-cls, L-vlalign and L-im-cst); CLIP's own trained scale is ``T = 0.01``.
    The teacher's embeddings are L2-normalised here too (the task's ``class_embeds`` already are).

    Shapes: student (N, D), teacher (C, D) with the same ``D``: the student must embed into the
    teacher's space. Give the student an ``embed_dim`` equal to the teacher's, or the term an
    adapter (``adapter: linear``) that projects the student's embedding onto the teacher's width.
    ``target``: (N,) class indices into the C classes.
    """
    loss = "clip_cls"
    _embeddings(student_image, "student image embeddings", loss)
    _embeddings(teacher_class, "teacher class embeddings", loss)
    if student_image.shape[1] != teacher_class.shape[1]:
        raise ValueError(
            f"clip_cls: the student's image embeddings have width {student_image.shape[1]} but the "
            f"teacher's class embeddings {teacher_class.shape[1]}: the student classifies through the "
            "teacher's text space, so give the student an embed_dim equal to the teacher's, or the term "
            "an adapter (adapter: linear)"
        )
    _positive(T, "T", loss)
    y = _labels(target, student_image.shape[0], loss)
    return F.cross_entropy(_cosines(student_image, teacher_class) / T, y)


@register_loss("vl_align", paper=VLM_OOD, reads="logits")
def vl_align(student_logits: Tensor, teacher_logits: Tensor, k: int | None = None, T: float = 1.0) -> Tensor:
    r"""Vision-language alignment over the teacher's top-k classes (VLM-OOD's L-vlalign).

    Li, Fang, Ding, Yin & Su, "Distilling Large Vision-Language Model with Out-of-Distribution
    Generalizability", ICCV 2023. Both sides' image-to-text logits ``z`` (N, C), i.e. each model's
    image embedding against the class text embeddings, are restricted per sample to ``K_i``, the
    ``k`` classes the *teacher* scores highest, and the student's distribution over those classes
    is matched to the teacher's:

        p^t_i = softmax( z^t_i[K_i] / T ),   p^s_i = softmax( z^s_i[K_i] / T )
        L = T^2 * 1/N * sum_i KL(p^t_i || p^s_i)

    ``k = None`` (or ``k >= C``): all classes, i.e. Hinton KD on these logits. ``k = 1`` gives 0
    (one class: both distributions are one-hot). The student's logits outside ``K_i`` get no
    gradient.

    As in the authors' code, the classes are the teacher's top-k, gathered on both sides, with a
    softmax over the selected ``k`` only. Differences from it:

    - The logits are the task's ``logit_scale * cos`` (the models' own scales), divided by ``T``;
      the authors divide cosines by 0.07 on both sides. With ``T = 1`` and a logit scale of
      ``1 / 0.07`` the value is theirs; with CLIP's scale of 100, ``T = 7`` gives their
      distributions.
    - The ``T^2`` factor (Hinton's, keeping gradients comparable across temperatures; 1 at the
      default ``T = 1``) is not in their code: at ``T != 1`` divide the term weight by ``T^2`` to
      get their value.
    - Their runs use ``k = 256`` and drop the samples the teacher misclassifies
      (``--clip-filter-out-wrong-alignment``); this loss reads no labels and keeps every sample.

    Shapes: (N, C) logits on both sides, the same classes in the same order.
    """
    loss = "vl_align"
    if (
        student_logits.dim() != 2
        or student_logits.shape != teacher_logits.shape
        or student_logits.numel() == 0
    ):
        raise ValueError(
            f"vl_align: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must be non-empty (N, C) matrices of the same shape"
        )
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise ValueError(f"vl_align: k must be a positive whole number of classes or None (all), got {k!r}")
    _positive(T, "T", loss)
    s, t = student_logits / T, teacher_logits / T
    if k is not None and k < t.shape[1]:
        top = t.topk(int(k), dim=1).indices  # the teacher's k best classes, per sample
        s, t = s.gather(1, top), t.gather(1, top)
    return _kl_rows(t, s) * (T * T)


@register_loss(
    "feat_mse",
    paper=f"{VLM_OOD}; {DC_CLIP} (smooth L1)",
    reads="embeddings",
    default_keys=("image_embeds", "image_embeds"),
)
def feat_mse(
    student: Tensor,
    teacher: Tensor,
    normalize: bool = True,
    kind: str = "mse",
    reduction: str = "sample",
    beta: float = 1.0,
) -> Tensor:
    r"""Feature mimicry of embeddings: squared error (VLM-OOD's L-mse) or smooth L1 (DC-CLIP).

    With ``s_i``, ``t_i`` the student's and the teacher's embeddings of sample ``i``, L2-normalised
    when ``normalize`` (VLM-OOD's L-mse compares normalised embeddings; DC-CLIP's stage 1 distills
    the raw features, ``normalize=False``), and ``l`` the elementwise error:

        kind="mse":        l(d) = d^2
        kind="smooth_l1":  l(d) = d^2 / (2 beta) if |d| < beta, else |d| - beta / 2
                           (Huber's, torch's SmoothL1Loss; ``beta = 1`` its default)
        reduction="sample":  L = 1/N * sum_i sum_d l(s_id - t_id)
        reduction="element": L = 1/(N D) * sum_i sum_d l(s_id - t_id)

    ``reduction="sample"`` (default) is VLM-OOD's code (the squared distance per sample, averaged
    over the batch: for normalised embeddings ``2 - 2 cos(s_i, t_i)``, independent of ``D``);
    ``"element"`` is torch's ``mse_loss`` / ``smooth_l1_loss`` default, ``1/D`` of it. DC-CLIP's
    code was not available to check its reduction; its paper names the smooth L1 loss.

    Shapes: (N, D) on both sides, equal. When the widths differ, give the term an adapter
    (``adapter: linear``): it projects the student's embedding onto the teacher's width first.
    """
    loss = "feat_mse"
    _embeddings(student, "student embeddings", loss)
    _embeddings(teacher, "teacher embeddings", loss)
    if student.shape != teacher.shape:
        raise ValueError(
            f"feat_mse: student embeddings {tuple(student.shape)} and teacher embeddings "
            f"{tuple(teacher.shape)} must have the same shape; when the widths differ give the term an "
            "adapter (adapter: linear), which projects the student's embedding onto the teacher's width"
        )
    if kind not in ("mse", "smooth_l1"):
        raise ValueError(f"feat_mse: kind must be 'mse' or 'smooth_l1', got {kind!r}")
    if reduction not in ("sample", "element"):
        raise ValueError(f"feat_mse: reduction must be 'sample' or 'element', got {reduction!r}")
    if kind == "smooth_l1" and not beta > 0:
        raise ValueError(f"feat_mse: the smooth L1 threshold beta must be positive, got {beta}")
    if normalize:
        student, teacher = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    if kind == "mse":
        err = (student - teacher).pow(2)
    else:
        err = F.smooth_l1_loss(student, teacher, reduction="none", beta=beta)
    per_sample = err.sum(dim=1) if reduction == "sample" else err.mean(dim=1)
    return per_sample.mean()


@register_loss(
    "img_contrast",
    paper=VLM_OOD,
    reads="embeddings",
    default_keys=("image_embeds", "image_embeds"),
)
def img_contrast(student: Tensor, teacher: Tensor, T: float = 0.07, symmetric: bool = True) -> Tensor:
    r"""Image-image contrast between the student's and the teacher's embeddings (VLM-OOD's L-im-cst).

    Li, Fang, Ding, Yin & Su, "Distilling Large Vision-Language Model with Out-of-Distribution
    Generalizability", ICCV 2023. InfoNCE over the batch: the student's embedding of image ``i``
    must pick the teacher's embedding of the same image among the teacher's embeddings of the
    batch's images. With ``M_ij = cos(s_i, t_j) / T``:

        L_s->t = 1/N * sum_i -log softmax_j(M_ij)[j = i]
        L_t->s = 1/N * sum_j -log softmax_i(M_ij)[i = j]      (the columns of M)
        L = (L_s->t + L_t->s) / 2   if symmetric,   else L_s->t

    ``T = 0.07`` and ``symmetric=True``: the authors' code (``--temperature`` 0.07,
    ``--clip-align-image-contrastive-mode bidirectional`` by default).

    Shapes: (N, D) on both sides with the same ``D`` (cosines between the two spaces); when the
    widths differ, give the term an adapter (``adapter: linear``).
    """
    loss = "img_contrast"
    _embeddings(student, "student embeddings", loss)
    _embeddings(teacher, "teacher embeddings", loss)
    _same_rows(student, teacher, "student and teacher embeddings", loss)
    _same_width(
        student,
        teacher,
        "student and teacher embeddings",
        loss,
        "give the term an adapter (adapter: linear), which projects the student's embedding onto the teacher's width",
    )
    _positive(T, "T", loss)
    m = _cosines(student, teacher) / T
    same = torch.arange(m.shape[0], device=m.device)
    s_to_t = F.cross_entropy(m, same)
    return 0.5 * (s_to_t + F.cross_entropy(m.t(), same)) if symmetric else s_to_t


# --------------------------------------------------------------------------- CLIP / DC-CLIP


@register_loss(
    "clip_contrastive",
    paper=f"{CLIP}; {DC_CLIP} (stage 2)",
    reads="feature-list",
    uses_teacher=False,
    uses_target=True,
    default_keys=(_IMAGE_TEXT, _IMAGE_TEXT),
)
def clip_contrastive(
    student: list[Tensor],
    *,
    target: Tensor | None = None,
    T: float = 0.07,
    same_class_positive: bool = True,
) -> Tensor:
    r"""CLIP's symmetric image-text contrastive loss on the student's own embeddings (no teacher).

    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML
    2021; DC-CLIP's stage 2 (vision-language alignment of the distilled encoders). ``student`` is
    ``[image embeddings (N, D), text embeddings (N, D)]``, caption ``i`` describing image ``i``.
    With ``M_ij = cos(image_i, text_j) / T`` and ``P_i`` the positives of row ``i``:

        L_i2t = 1/N * sum_i -1/|P_i| * sum_{j in P_i} log softmax_j(M_ij)
        L_t2i = 1/N * sum_j -1/|P_j| * sum_{i in P_j} log softmax_i(M_ij)    (the columns of M)
        L = (L_i2t + L_t2i) / 2

    ``same_class_positive=False``: ``P_i = {i}``, CLIP's loss exactly. ``same_class_positive=True``
    (default): ``P_i = {j : y_j = y_i}``, every pair of the same class is a positive (the
    multi-positive InfoNCE of supervised contrastive learning and UniCL, with the target spread
    evenly over the positives). When captions repeat within a batch (Fashion-MNIST's are one per
    class), CLIP's loss would push an image away from its own caption's duplicates; this does not.
    With all labels distinct both are CLIP's loss. ``target`` is the batch's class labels (the
    term hands them over; with ``same_class_positive=False`` they are not used).

    ``T = 0.07``: CLIP's initial temperature. CLIP *learns* its temperature (``logit_scale``,
    clamped at 100); here it is fixed.

    Shapes: image and text embeddings (N, D) of the same shape.
    """
    loss = "clip_contrastive"
    image, text = _image_text(student, "student", loss)
    _positive(T, "T", loss)
    m = _cosines(image, text) / T
    n = m.shape[0]
    if not same_class_positive:
        same = torch.arange(n, device=m.device)
        return 0.5 * (F.cross_entropy(m, same) + F.cross_entropy(m.t(), same))
    y = _labels(target, n, loss)
    positive = (y.unsqueeze(0) == y.unsqueeze(1)).to(m.dtype)  # symmetric, diagonal included
    share = positive / positive.sum(dim=1, keepdim=True)
    i2t = -(share * F.log_softmax(m, dim=1)).sum(dim=1).mean()
    t2i = -(share * F.log_softmax(m.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


# --------------------------------------------------------------------------- TinyCLIP


@register_loss(
    "affinity_mimic",
    paper=TINYCLIP,
    reads="feature-list",
    default_keys=(_IMAGE_TEXT, _IMAGE_TEXT),
)
def affinity_mimic(
    student: list[Tensor], teacher: list[Tensor], T_s: float = 0.01, T_t: float = 0.01
) -> Tensor:
    r"""TinyCLIP's affinity mimicking: the student's image-text affinities within the batch follow
    the teacher's, in both directions.

    Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance", ICCV
    2023. ``student`` and ``teacher`` are each ``[image embeddings (N, D), text embeddings (N, D)]``
    of the same batch. Each model's affinities are ``A_ij = cos(image_i, text_j) / T`` (N x N),
    turned into image-to-text distributions (softmax over row ``i``) and text-to-image ones
    (softmax over column ``j``):

        L_i2t = 1/N * sum_i KL( softmax_j(A^t_ij) || softmax_j(A^s_ij) )
        L_t2i = 1/N * sum_j KL( softmax_i(A^t_ij) || softmax_i(A^s_ij) )
        L = (L_i2t + L_t2i) / 2

    The authors' code (``ClipSoftLoss`` in ``microsoft/Cream``, TinyCLIP) uses the cross-entropy
    ``H(p^t, p^s)`` instead of the KL: it is the KL plus the teacher's entropy, which has no
    gradient for the student, so the gradients are the same and this loss is 0 when the student's
    affinities equal the teacher's. Their temperatures are the two models' logit scales, the
    teacher's fixed and the student's learned; here both are fixed: ``T_s = T_t = 0.01`` (CLIP's
    trained scale of 100, the scale a student inheriting a CLIP teacher's weights starts from).

    Shapes: the student's image and text embeddings share a width, as do the teacher's; the two
    widths may differ (affinities are N x N), so no adapter is needed. N is the same on all four.
    """
    loss = "affinity_mimic"
    s_image, s_text = _image_text(student, "student", loss)
    t_image, t_text = _image_text(teacher, "teacher", loss)
    _same_rows(s_image, t_image, "student and teacher embeddings", loss)
    _positive(T_s, "T_s", loss)
    _positive(T_t, "T_t", loss)
    a_s = _cosines(s_image, s_text) / T_s
    a_t = _cosines(t_image, t_text) / T_t
    return 0.5 * (_kl_rows(a_t, a_s) + _kl_rows(a_t.t(), a_s.t()))
