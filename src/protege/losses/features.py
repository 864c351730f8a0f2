"""The feature-map family of distillation losses: FitNets hints, AT, NST and ICKD.

Every loss is a pure function of a student and a teacher feature map of shape ``(N, C, H, W)``
(FitNets also takes any other ``(N, ...)`` shape, e.g. ``(N, D)``) returning a scalar, registered
by name with :func:`~protege.losses.registry.register_loss` and ``reads="features"``. The teacher
tensor comes from a frozen model under ``no_grad``; the student tensor is whatever the term's
adapter (if any) made of the student's tap.

What the adapter must do differs per loss and is spelled out in each docstring: FitNets and ICKD
compare channel by channel, so a regressor must map the student to the teacher's shape (channels);
AT and NST compare channel-free statistics, so they need no adapter and accept different channel
counts. Where two maps differ in spatial size, :func:`match_spatial` average-pools the larger one
down to the smaller size (as RepDistiller does), rather than upsampling the smaller one.

Normalisations follow the authors' released code (or RepDistiller's port of it, which reproduces
the published numbers), so that the term weights of published recipes carry over; each docstring
states how that differs from the paper's formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss

__all__ = ["at", "attention_map", "fitnet", "ickd", "match_spatial", "nst"]


# --------------------------------------------------------------------------- helpers


def _check_maps(student: Tensor, teacher: Tensor, loss: str) -> None:
    """Both tensors are (N, C, H, W) feature maps with the same batch size."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{loss}: expected feature maps of shape (N, C, H, W), got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{loss}: student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
            "must have the same batch size N"
        )


def match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two (N, C, H, W) maps to a common spatial size by pooling the larger one down.

    The common size is ``(min(H_s, H_t), min(W_s, W_t))``; a map larger than that along either axis
    is reduced with :func:`torch.nn.functional.adaptive_avg_pool2d`, a map already that size is
    returned unchanged. This is RepDistiller's rule for AT and NST (which compares heights only and
    assumes square maps), applied to each axis separately. Channels are left alone.
    """
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if (ht, wt) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map of AT: channel mean of ``|F|^p``, flattened and L2-normalised per sample.

    ``features`` is (N, C, H, W); the result is (N, H*W) with unit L2 norm per row (a zero map stays
    zero: the normalisation divides by ``max(norm, 1e-12)``). Zagoruyko & Komodakis define the map
    as the channel *sum* of ``|A_c|^p``; the mean differs by the factor ``C``, which the
    normalisation removes.
    """
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), p=2.0, dim=1)


# --------------------------------------------------------------------------- FitNets


@register_loss(
    "fitnet",
    paper="Romero, Ballas, Kahou, Chassang, Gatta & Bengio, FitNets: Hints for Thin Deep Nets, ICLR 2015",
    reads="features",
)
def fitnet(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    r"""FitNets hint loss: mean squared error between the regressed student feature and the teacher's.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    With ``r(v)`` the regressor applied to the student's guided layer ``v`` and ``u`` the teacher's
    hint layer:

        L = mean over all elements of (r(v) - u)^2

    The paper writes ``1/2 ||u - r(v)||^2`` summed over elements; like the reference code (an
    ``MSELoss``, RepDistiller's CIFAR weight 100) this averages over all ``N * C * H * W`` elements
    instead, so the loss does not grow with the feature size.

    Shapes: student and teacher of the same shape ``(N, C, H, W)``, or ``(N, D)`` (any ``(N, ...)``
    shape). Adapter: the regressor ``r`` is the term's adapter and must map the student feature to
    exactly the teacher's shape (the paper's convolutional regressor, e.g. a 1x1 or kxk convolution
    to the teacher's channels, with pooling or striding if the spatial sizes differ).
    """
    if student_features.shape != teacher_features.shape or student_features.dim() < 2:
        raise ValueError(
            f"fitnet: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same (N, ...) shape; map the student to the "
            "teacher's shape with the term's adapter (the FitNets regressor)"
        )
    return F.mse_loss(student_features, teacher_features)


# --------------------------------------------------------------------------- AT


@register_loss(
    "at",
    paper="Zagoruyko & Komodakis, Paying More Attention to Attention: Improving the Performance of "
    "Convolutional Neural Networks via Attention Transfer, ICLR 2017",
    reads="features",
)
def at(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention Transfer: match the L2-normalised spatial attention maps of student and teacher.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017. With the attention map
    ``Q = vec(mean_c |F_c|^p)`` of each sample (:func:`attention_map`) and ``q = Q / ||Q||_2``:

        L = 1/(N * H * W) * sum_i || q^s_i - q^t_i ||_2^2

    i.e. the mean over batch and positions of the squared difference, as in the authors' code and
    RepDistiller (``(at(s) - at(t)).pow(2).mean()``); this is the batch mean of the squared L2
    distance divided by ``H * W``. The paper writes ``(beta/2) * sum_j || q^s_j - q^t_j ||_p``
    (a norm, not squared) with ``beta = 1000``; ``beta/2`` is a term weight here: the paper's
    setting is a weight of 500 per attention pair, RepDistiller's CIFAR recipe uses 1000. ``p = 2``
    is the paper's choice.

    Shapes: (N, C_s, H_s, W_s) and (N, C_t, H_t, W_t). Channel counts may differ (the map averages
    them out), so no adapter is needed. Spatial sizes may differ: the larger map is adaptively
    average-pooled down to the smaller size first (:func:`match_spatial`), as in RepDistiller.
    """
    _check_maps(student_features, teacher_features, "at")
    if not p > 0:
        raise ValueError(f"at: the exponent p must be positive, got {p}")
    s, t = match_spatial(student_features, teacher_features)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


# --------------------------------------------------------------------------- NST


@register_loss(
    "nst",
    paper="Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, "
    "arXiv:1707.01219, 2017",
    reads="features",
)
def nst(student_features: Tensor, teacher_features: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    r"""Neuron Selectivity Transfer: squared MMD between the student's and teacher's channel activations.

    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    arXiv:1707.01219, 2017. Each channel's spatial activation vector ``f^k`` (length ``H * W``) is
    one sample of a distribution, L2-normalised: ``f^k <- f^k / ||f^k||_2``. With the polynomial
    kernel ``k(x, y) = (x . y + c)^d`` (paper: ``d = 2``, ``c = 0``), per sample:

        MMD^2 = 1/C_t^2 sum_{i,i'} k(t^i, t^i') + 1/C_s^2 sum_{j,j'} k(s^j, s^j')
              - 2/(C_s C_t) sum_{i,j} k(s^j, t^i)
        L = mean over the batch of MMD^2

    as in RepDistiller's port (the full biased estimator, including the teacher-only term, so the
    loss is zero when the maps agree). The paper adds ``lambda/2 * MMD^2`` to the cross-entropy;
    ``lambda/2`` is the term weight (RepDistiller's CIFAR recipe uses 50).

    Shapes: (N, C_s, H_s, W_s) and (N, C_t, H_t, W_t). Channel counts may differ (they index the
    samples of the two distributions), so no adapter is needed. The activation vectors must have the
    same length: if the spatial sizes differ, the larger map is adaptively average-pooled down to the
    smaller size first (:func:`match_spatial`), as in AT.
    """
    _check_maps(student_features, teacher_features, "nst")
    if int(degree) != degree or degree < 1:
        raise ValueError(f"nst: the kernel degree must be a positive integer, got {degree}")
    s, t = match_spatial(student_features, teacher_features)
    fs = F.normalize(s.flatten(2), p=2.0, dim=2)  # (N, C_s, HW)
    ft = F.normalize(t.flatten(2), p=2.0, dim=2)  # (N, C_t, HW)

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        return (torch.bmm(a, b.transpose(1, 2)) + c).pow(int(degree)).mean()

    return kernel_mean(ft, ft) + kernel_mean(fs, fs) - 2.0 * kernel_mean(fs, ft)


# --------------------------------------------------------------------------- ICKD


@register_loss(
    "ickd",
    paper="Liu, Huang, Lin, Xie, Wang, Chang & Liang, Exploring Inter-Channel Correlation for "
    "Diversity-preserved Knowledge Distillation, ICCV 2021",
    reads="features",
)
def ickd(student_features: Tensor, teacher_features: Tensor, normalize: bool = True) -> Tensor:
    r"""Inter-Channel Correlation KD: match the per-sample channel Gram matrices of student and teacher.

    Liu, Huang, Lin, Xie, Wang, Chang & Liang, "Exploring Inter-Channel Correlation for
    Diversity-preserved Knowledge Distillation", ICCV 2021. With ``F_i`` the (C, H*W) matrix of
    sample ``i`` (one row per channel), the inter-channel correlation (ICC) matrix is the C x C Gram
    matrix ``G_i = F_i F_i^T``.

    ``normalize=True`` (default; the authors' released code, CIFAR-100 and ImageNet): each row of
    ``G`` is L2-normalised, ``G~_i[m, :] = G_i[m, :] / ||G_i[m, :]||_2``, and

        L = 1/(N * C) * sum_i || G~^s_i - G~^t_i ||_F^2

    (the code's ``sum / (ch * bsz)``; its CIFAR-100 recipe weights this term by 2.5). The row
    normalisation makes the loss invariant to the scale of each sample's features.

    ``normalize=False`` (the paper's formula, which averages the squared differences of the
    unnormalised ICC matrices over the ``C^2`` entries): ``G_i = F_i F_i^T / (H * W)`` (divided by the
    number of positions so that its magnitude does not grow with the map size), and

        L = 1/(N * C^2) * sum_i || G^s_i - G^t_i ||_F^2

    i.e. the mean squared difference of the Gram matrices. This form is sensitive to the feature
    scale, so its weight has to be tuned separately.

    Shapes: (N, C, H_s, W_s) and (N, C, H_t, W_t). The channel counts must match: the Gram matrices
    are compared entry by entry, so the term's adapter must map the student to the teacher's
    channels (the authors use a 1x1 convolution followed by batch normalisation); a mismatch raises
    ``ValueError``. The spatial sizes may differ (each Gram matrix is C x C whatever the map size).
    """
    _check_maps(student_features, teacher_features, "ickd")
    if student_features.shape[1] != teacher_features.shape[1]:
        raise ValueError(
            f"ickd: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same number of channels C; map the student "
            "to the teacher's channels with the term's adapter (e.g. a 1x1 convolution)"
        )
    n, ch = student_features.shape[:2]
    fs = student_features.flatten(2)  # (N, C, H_s W_s)
    ft = teacher_features.flatten(2)  # (N, C, H_t W_t)
    gs = torch.bmm(fs, fs.transpose(1, 2))
    gt = torch.bmm(ft, ft.transpose(1, 2))
    if normalize:
        gs = F.normalize(gs, p=2.0, dim=2)
        gt = F.normalize(gt, p=2.0, dim=2)
        return (gs - gt).pow(2).sum() / (n * ch)
    return (gs / fs.shape[2] - gt / ft.shape[2]).pow(2).mean()
