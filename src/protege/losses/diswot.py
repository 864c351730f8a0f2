"""DisWOT's two similarity metrics, as pure functions and as the DisWOT+ distillation losses.

Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR 2023.
DisWOT ranks candidate students, before any training, by how similar they are to the teacher in
two respects, and DisWOT+ reuses the same two metrics as distillation losses:

* **relation similarity** ``M_r`` (:func:`relation_distance`, loss ``"diswot_relation"``): the
  sample-by-sample Gram matrices of the feature maps before global pooling;
* **semantic similarity** ``M_s`` (:func:`semantic_distance`, loss ``"diswot_semantic"``): the
  class-wise channel correlations of the gradient of the cross-entropy with respect to the
  classifier weight (the paper's "Grad-CAM of the fc layer").

The search proxy built from them (``score = -(M_r + M_s)``) lives in
:mod:`protege.search.proxies`; this module holds the math, so both share one code path.

Channel alignment. ``M_s`` compares ``C x C`` matrices, so the teacher's and the student's
classifier input widths must agree. When they differ, both gradients are brought to
``min(C_t, C_s)`` channels first (:func:`align_channels`): ``"pool"`` (default) averages
adjacent channels with adaptive average pooling over the channel axis (every channel contributes),
``"truncate"`` keeps the first ``min(C_t, C_s)`` channels. The reference code has no alignment (it
only works for equal widths). ``M_r`` compares ``B x B`` matrices and needs no alignment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss

__all__ = [
    "ALIGNMENTS",
    "align_channels",
    "batch_gram",
    "class_channel_correlation",
    "classifier_weight_grad",
    "diswot_relation",
    "diswot_semantic",
    "relation_distance",
    "semantic_distance",
]

ALIGNMENTS = ("pool", "truncate")


def batch_gram(features: Tensor) -> Tensor:
    r"""DisWOT's relation matrix: the row-normalised batch Gram matrix of a feature map.

    With ``F`` the (B, D) matrix of the features flattened per sample (``D = C*H*W``, any
    ``(B, ...)`` shape), ``G = F F^T`` (B x B) and every row of ``G`` is divided by its L2 norm:
    ``G~[i, :] = G[i, :] / max(||G[i, :]||_2, 1e-12)`` (``F.normalize``, as the reference code).
    """
    if features.dim() < 2:
        raise ValueError(f"diswot: expected features of shape (B, ...), got {tuple(features.shape)}")
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), p=2.0, dim=1)


def relation_distance(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    r"""DisWOT's relation metric ``M_r = ||G~_t - G~_s||_F^2 / B^2`` (:func:`batch_gram`).

    Dong, Li & Wei, CVPR 2023, Eq. (relation similarity); the ``1 / B^2`` normalisation is the
    reference code's. Feature shapes may differ in everything but the batch size ``B``.
    """
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(
            f"diswot_relation: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same batch size"
        )
    b = student_features.shape[0]
    diff = batch_gram(teacher_features) - batch_gram(student_features)
    return diff.pow(2).sum() / (b * b)


def class_channel_correlation(grad: Tensor) -> Tensor:
    r"""Class-wise channel correlation of a classifier-weight gradient, ICKD-style.

    ``grad`` is (K, C): one row ``g_k`` per class (the gradient of the loss with respect to that
    class's classifier weights). For each class the C x C correlation is the Gram matrix of the
    class's (C, 1) "map", ``A_k = g_k g_k^T``, and each row is L2-normalised, as ICKD normalises
    its channel Gram matrices. This is what the reference code's ``channel_similarity`` computes on
    ``fc.weight.grad`` (classes play ICKD's samples, ``H*W = 1``). Result: (K, C, C).

    Row ``m`` of ``A_k`` is ``g_km g_k``, so its normalised form is ``sign(g_km) g_k / ||g_k||``:
    each ``g_k`` is scaled to unit norm first, which changes nothing mathematically but keeps the
    float32 products of small gradients away from the normalisation's ``1e-12`` floor.
    """
    if grad.dim() != 2:
        raise ValueError(f"diswot: expected a (classes, channels) gradient, got {tuple(grad.shape)}")
    unit = F.normalize(grad, p=2.0, dim=1)
    return F.normalize(unit.unsqueeze(2) * unit.unsqueeze(1), p=2.0, dim=2)


def align_channels(student: Tensor, teacher: Tensor, align: str = "pool") -> tuple[Tensor, Tensor]:
    """Bring two (K, C) matrices to ``min(C_s, C_t)`` columns (see the module docstring).

    ``"pool"``: the wider one is adaptively average-pooled along the channel axis (window ``[floor(i
    C / c), ceil((i + 1) C / c))`` for output channel ``i`` of ``c``); ``"truncate"``: its first
    ``c`` channels are kept. Equal widths are returned unchanged.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"diswot: align must be one of {', '.join(ALIGNMENTS)}, got {align!r}")
    c = min(student.shape[1], teacher.shape[1])

    def fit(m: Tensor) -> Tensor:
        if m.shape[1] == c:
            return m
        if align == "truncate":
            return m[:, :c]
        return F.adaptive_avg_pool1d(m.unsqueeze(0), c).squeeze(0)

    return fit(student), fit(teacher)


def semantic_distance(student_grad: Tensor, teacher_grad: Tensor, align: str = "pool") -> Tensor:
    r"""DisWOT's semantic metric between two (K, C) classifier-weight gradients.

    After :func:`align_channels` to ``c`` channels, with ``A~`` the :func:`class_channel_correlation`:

        M_s = 1/(K * c) * sum_k || A~^t_k - A~^s_k ||_F^2

    the reference code's normalisation (ICKD's ``1/(N * C)`` with the K classes as samples).
    Both gradients must have the same number of classes ``K``.
    """
    if student_grad.dim() != 2 or teacher_grad.dim() != 2 or student_grad.shape[0] != teacher_grad.shape[0]:
        raise ValueError(
            f"diswot_semantic: student gradient {tuple(student_grad.shape)} and teacher gradient "
            f"{tuple(teacher_grad.shape)} must be (classes, channels) with the same number of classes"
        )
    s, t = align_channels(student_grad, teacher_grad, align)
    k, c = s.shape
    diff = class_channel_correlation(t) - class_channel_correlation(s)
    return diff.pow(2).sum() / (k * c)


def classifier_weight_grad(embeddings: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    r"""The gradient of the mean cross-entropy with respect to a linear classifier's weight, in closed form.

    For ``z = W h + b`` with ``h`` the (B, C) classifier input, ``p = softmax(z)`` and ``Y`` the
    one-hot labels, ``dCE/dW = (p - Y)^T h / B`` (K x C). It is a differentiable function of ``h``
    and ``z``, so the DisWOT+ semantic loss can train through it without double back-propagation.
    """
    if embeddings.dim() != 2 or logits.dim() != 2 or embeddings.shape[0] != logits.shape[0]:
        raise ValueError(
            f"diswot_semantic: expected the classifier input (B, C) and logits (B, K), got "
            f"{tuple(embeddings.shape)} and {tuple(logits.shape)}"
        )
    residual = logits.softmax(dim=1) - F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return residual.t() @ embeddings / logits.shape[0]


@register_loss(
    "diswot_relation",
    paper="Dong, Li & Wei, DisWOT: Student Architecture Search for Distillation WithOut Training, CVPR 2023",
    reads="features",
)
def diswot_relation(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    r"""DisWOT+ relation distiller: match the row-normalised batch Gram matrices of two feature maps.

    Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR
    2023 (DisWOT+ uses the search metrics as distillers). With ``F`` each map flattened per sample
    and ``G~`` the row-L2-normalised ``F F^T`` (:func:`batch_gram`):

        L = || G~_t - G~_s ||_F^2 / B^2

    Tap the maps before global pooling (e.g. ``layer3`` of a CIFAR ResNet). Shapes: (B, ...) each;
    channels and spatial sizes may differ (the matrices are B x B), so no adapter is needed.
    """
    return relation_distance(student_features, teacher_features)


@register_loss(
    "diswot_semantic",
    paper="Dong, Li & Wei, DisWOT: Student Architecture Search for Distillation WithOut Training, CVPR 2023",
    reads="feature-list",
    uses_target=True,
)
def diswot_semantic(
    student: Sequence[Tensor], teacher: Sequence[Tensor], *, target: Tensor, align: str = "pool"
) -> Tensor:
    r"""DisWOT+ semantic distiller: match the class-wise channel correlations of the fc-weight gradients.

    Dong, Li & Wei, CVPR 2023. Reads two tensors per model, the classifier's input and the logits:
    ``student: [fc:in, logits]``, ``teacher: [fc:in, logits]`` (use the model's ``classifier_name``
    for ``fc``). For each model ``g = dCE/dW = (softmax(z) - Y)^T h / B``
    (:func:`classifier_weight_grad`: exact for a linear classifier, bias or not), then

        L = 1/(K * c) * sum_k || A~^t_k - A~^s_k ||_F^2            (:func:`semantic_distance`)

    with ``A~_k`` the row-normalised ``g_k g_k^T`` and ``c`` the aligned width (``align``:
    ``"pool"`` or ``"truncate"``, see the module docstring). Choice: the search metric takes
    ``W.grad`` from a backward pass; inside a training step that would need double
    back-propagation, so the loss rebuilds the same gradient in closed form from what a term can
    read, and the student learns through ``h`` and ``z``.
    """
    if isinstance(student, Tensor) or isinstance(teacher, Tensor) or len(student) != 2 or len(teacher) != 2:
        raise ValueError(
            "diswot_semantic: reads two taps per model, the classifier input and the logits "
            "(student: [fc:in, logits], teacher: [fc:in, logits])"
        )
    g_s = classifier_weight_grad(student[0].flatten(1), student[1], target)
    g_t = classifier_weight_grad(teacher[0].flatten(1), teacher[1], target)
    return semantic_distance(g_s, g_t, align)
