"""The feature-map family of distillation losses: FitNets hints, AT, NST, ICKD, VID, FT, FSP and AB.

Every loss is a pure function of a student and a teacher feature map of shape ``(N, C, H, W)``
(FitNets also takes any other ``(N, ...)`` shape, e.g. ``(N, D)``) returning a scalar, registered
by name with :func:`~protege.losses.registry.register_loss` and ``reads="features"``; FSP reads a
*list* of maps per model (``reads="feature-list"``: ``student=[...]``, ``teacher=[...]``). The
teacher tensor comes from a frozen model under ``no_grad``; the student tensor is whatever the
term's adapter (if any) made of the student's tap.

What the adapter must do differs per loss and is spelled out in each docstring: FitNets, ICKD and
AB compare channel by channel, so a regressor (AB: the paper's 1x1 conv + BN connector,
``adapter: conv_bn``) must map the student to the teacher's shape (channels); AT and NST compare
channel-free statistics, so they need no adapter and accept different channel counts; FSP needs
equal channel counts layer by layer and has no adapter. Where two maps differ in spatial size,
:func:`match_spatial` average-pools the larger one down to the smaller size (as RepDistiller does),
rather than upsampling the smaller one.

VID and FT train modules of their own, which live in the loss's ``state`` module (built from the
tap shapes by :meth:`protege.Distiller.prepare`, trained with the student, saved in checkpoints,
dropped at export): :class:`VIDRegressor` (VID's mean regressor and per-channel variance) and
:class:`FTModules` (FT's paraphraser and translator). The state hands these modules to the loss
function as keyword arguments, so the math stays in pure functions (:func:`vid_nll`,
:func:`factor_transfer`, :func:`paraphraser_reconstruction`) that are checked by hand. FT, FSP and
AB are staged methods (a pre-training stage, then the main one): see the configs
``configs/mnist-ft.yaml``, ``mnist-fsp.yaml`` and ``mnist-ab.yaml``.

Normalisations follow the authors' released code (or RepDistiller's port of it, which reproduces
the published numbers), so that the term weights of published recipes carry over; each docstring
states how that differs from the paper's formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import BuildContext, TeacherReduction, register_loss

__all__ = [
    "FTModules",
    "Paraphraser",
    "Translator",
    "VIDRegressor",
    "ab",
    "at",
    "at_teacher_map",
    "attention_map",
    "factor_transfer",
    "fitnet",
    "fsp",
    "fsp_matrix",
    "ft",
    "ickd",
    "match_spatial",
    "nst",
    "paraphraser_reconstruction",
    "vid",
    "vid_nll",
]


# --------------------------------------------------------------------------- helpers


def check_features(
    student: Tensor, teacher: Tensor, loss: str, ranks: tuple[int, ...] = (4,), same_rank: bool = True
) -> None:
    """Student and teacher features have an accepted rank (``ranks``; the same one when
    ``same_rank``) and the same batch size N; otherwise a ``ValueError`` naming both shapes."""
    if (
        student.dim() not in ranks
        or teacher.dim() not in ranks
        or (same_rank and student.dim() != teacher.dim())
    ):
        kinds = " or ".join(
            {2: "(N, D) vectors", 4: "feature maps (N, C, H, W)"}.get(r, f"{r}-d") for r in ranks
        )
        raise ValueError(
            f"{loss}: expected {kinds}, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{loss}: student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
            "must have the same batch size N"
        )


def _check_maps(student: Tensor, teacher: Tensor, loss: str) -> None:
    """Both tensors are (N, C, H, W) feature maps with the same batch size."""
    check_features(student, teacher, loss)


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


def at_teacher_map(teacher_features: Tensor, p: float = 2.0) -> Tensor:
    """AT's teacher-side reduction: the teacher's attention map ``q_t`` (:func:`attention_map`) as
    ``(N, H, W)``, i.e. everything :func:`at` computes from the teacher tensor alone.

    ``at(s, at_teacher_map(t, p), p)`` equals ``at(s, t, p)`` when the teacher map is not larger
    than the student's (:func:`_at_exact`); a term hands :func:`at` this map, and a teacher-output
    cache stores it (H*W floats per sample instead of C*H*W).
    """
    if teacher_features.dim() != 4:
        raise ValueError(
            f"at: expected a teacher feature map (N, C, H, W), got {tuple(teacher_features.shape)}"
        )
    return attention_map(teacher_features, p).view(-1, *teacher_features.shape[-2:])


def _at_exact(student_shape: torch.Size, teacher_shape: torch.Size) -> bool:
    """Whether AT on the teacher's attention map equals AT on its feature map: when :func:`match_spatial`
    would not pool the teacher, i.e. the teacher map is nowhere larger than the student's."""
    return all(t <= s for s, t in zip(student_shape[-2:], teacher_shape[-2:]))


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
    teacher_reduction=TeacherReduction("attention_map", at_teacher_map, params=("p",), exact=_at_exact),
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

    The teacher may also be given as its attention map ``q_t`` of shape (N, H_t, W_t), made with the
    same ``p`` by :func:`at_teacher_map` (AT's teacher-side reduction: what a term computes online
    and a teacher-output cache stores); the value is the same. That map cannot be pooled the way a
    feature map is, so the student's map must then be at least as large as the teacher's.
    """
    if not p > 0:
        raise ValueError(f"at: the exponent p must be positive, got {p}")
    if teacher_features.dim() == 3 and student_features.dim() == 4:
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError(
                f"at: student features {tuple(student_features.shape)} and teacher attention map "
                f"{tuple(teacher_features.shape)} must have the same batch size N"
            )
        if not _at_exact(student_features.shape, teacher_features.shape):
            raise ValueError(
                f"at: the teacher's attention map {tuple(teacher_features.shape[1:])} is larger than the "
                f"student's feature map {tuple(student_features.shape[2:])}; AT pools the teacher's feature "
                "map, not its attention map, so it needs the raw teacher feature map here"
            )
        s = match_spatial(student_features, teacher_features.unsqueeze(1))[0]
        return (attention_map(s, p) - teacher_features.flatten(1)).pow(2).mean()
    _check_maps(student_features, teacher_features, "at")
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


# --------------------------------------------------------------------------- VID


def _as_maps(student: Tensor, teacher: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Two (N, C, H, W) maps, or two (N, D) vectors viewed as (N, D, 1, 1) maps; same N."""
    check_features(student, teacher, loss, ranks=(4, 2))
    if student.dim() == 2:
        return student[:, :, None, None], teacher[:, :, None, None]
    return student, teacher


def vid_nll(mean: Tensor, teacher_features: Tensor, variance: Tensor) -> Tensor:
    r"""Gaussian negative log-likelihood of the teacher features under VID's variational distribution.

    With ``mu`` the predicted mean (same shape as the teacher features ``t``, (N, C, H, W)) and
    ``sigma^2_c`` one variance per channel (shape (C,), positive), without the constant
    ``0.5 * log(2 pi)``:

        L = 1/(N*C*H*W) * sum_{n,c,h,w} 0.5 * ( log sigma^2_c + (t_{nchw} - mu_{nchw})^2 / sigma^2_c )

    the mean over all elements, as in the VID authors' code (RepDistiller's ``VIDLoss``).
    """
    if mean.shape != teacher_features.shape or mean.dim() < 2:
        raise ValueError(
            f"vid: the predicted mean {tuple(mean.shape)} and the teacher features "
            f"{tuple(teacher_features.shape)} must have the same (N, C, ...) shape"
        )
    if variance.shape != (teacher_features.shape[1],):
        raise ValueError(
            f"vid: expected one variance per teacher channel, shape ({teacher_features.shape[1]},), got "
            f"{tuple(variance.shape)}"
        )
    var = variance.reshape(1, -1, *([1] * (teacher_features.dim() - 2)))
    return 0.5 * ((teacher_features - mean).pow(2) / var + var.log()).mean()


class VIDRegressor(nn.Module):
    r"""VID's trainable parts: the mean regressor ``mu(s)`` and the per-channel variance ``sigma^2``.

    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019, as in the authors' code (RepDistiller's ``VIDLoss``):

    - ``regressor``: 1x1 conv (C_s -> C_mid) -> ReLU -> 1x1 conv (C_mid -> C_mid) -> ReLU -> 1x1 conv
      (C_mid -> C_t), no biases; ``C_mid`` = ``mid_channels``, by default the teacher's channel
      count ``C_t`` (RepDistiller builds ``VIDLoss(C_s, C_t, C_t)``).
    - ``log_scale`` (alpha, one per teacher channel): ``sigma^2_c = softplus(alpha_c) + eps``,
      initialised so that ``sigma^2`` starts at exactly ``init_pred_var`` (5.0 in the paper's code).

    Built by :meth:`build` from the first batch's student and teacher tensors (``pending`` until
    then). ``forward(progress)`` returns ``{"regressor": ..., "variance": ...}``, the keyword
    arguments :func:`vid` takes.
    """

    def __init__(
        self, init_pred_var: float = 5.0, eps: float = 1e-5, mid_channels: int | None = None
    ) -> None:
        super().__init__()
        if not init_pred_var > eps > 0:
            raise ValueError(f"VIDRegressor: need init_pred_var > eps > 0, got {init_pred_var} and {eps}")
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"VIDRegressor: mid_channels must be a positive integer, got {mid_channels}")
        self.init_pred_var = float(init_pred_var)
        self.eps = float(eps)
        self.mid_channels = mid_channels
        self.regressor: nn.Module | None = None
        self.log_scale: nn.Parameter | None = None
        self.pending = True

    def build(self, student: Tensor, teacher: Tensor, context: BuildContext | None = None) -> None:
        """Size the regressor from the student's and the teacher's channel counts."""
        s, t = _as_maps(student, teacher, "vid")
        cin, cout = s.shape[1], t.shape[1]
        mid = self.mid_channels or cout
        self.regressor = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, cout, 1, bias=False),
        )
        # softplus^{-1}(v - eps) = log(exp(v - eps) - 1), so that softplus(alpha) + eps = init_pred_var
        alpha = math.log(math.expm1(self.init_pred_var - self.eps))
        self.log_scale = nn.Parameter(torch.full((cout,), alpha))
        self.pending = False

    def variance(self) -> Tensor:
        """The per-channel variance ``softplus(alpha) + eps``, shape (C_t,)."""
        assert self.log_scale is not None, "VIDRegressor.build has not run"
        return F.softplus(self.log_scale) + self.eps

    def forward(self, progress: float = 0.0) -> dict[str, Any]:
        if self.regressor is None:
            raise RuntimeError("VIDRegressor is used before build(): call distiller.prepare(batch) first")
        return {"regressor": self.regressor, "variance": self.variance()}

    def extra_repr(self) -> str:
        return f"init_pred_var={self.init_pred_var}, eps={self.eps}" + (", pending" if self.pending else "")


@register_loss(
    "vid",
    paper="Ahn, Hu, Damianou, Lawrence & Dai, Variational Information Distillation for Knowledge Transfer, "
    "CVPR 2019",
    reads="features",
    state=VIDRegressor,
)
def vid(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    regressor: Callable[[Tensor], Tensor],
    variance: Tensor,
) -> Tensor:
    r"""Variational Information Distillation: maximise a Gaussian lower bound on I(teacher; student).

    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019. The teacher feature ``t`` is modelled, given the student feature ``s``, as
    a Gaussian with mean ``mu(s)`` (a trained regressor) and one trained variance ``sigma^2_c`` per
    channel; minimising its negative log-likelihood maximises a variational lower bound on the
    mutual information between the two layers:

        L = mean_{n,c,h,w} 0.5 * ( log sigma^2_c + (t_{nchw} - mu(s)_{nchw})^2 / sigma^2_c )

    (:func:`vid_nll`; the mean over all elements, as in the authors' code and RepDistiller). The
    regressor and the variance (``sigma^2 = softplus(alpha) + eps``, alpha trained) are the loss's
    state, :class:`VIDRegressor`, built from the tap shapes by ``distiller.prepare`` and passed in
    as ``regressor`` and ``variance``; its settings ``init_pred_var`` (5.0), ``eps`` (1e-5) and
    ``mid_channels`` (default: the teacher's channels) are set like loss parameters. The paper and
    RepDistiller distill several layer pairs (the ends of the residual groups) with weight 1 each
    next to a cross-entropy of weight 1: add one ``vid`` term per pair.

    Shapes: (N, C_s, H_s, W_s) and (N, C_t, H_t, W_t); channel counts may differ (the regressor maps
    C_s -> C_t). If the spatial sizes differ, the larger map is adaptively average-pooled down to the
    smaller size first, *before* the regressor (:func:`match_spatial`), as in RepDistiller. Two
    (N, D) vectors also work (viewed as 1x1 maps: the regressor is then an MLP), as the paper does
    for the last layer.
    """
    s, t = _as_maps(student_features, teacher_features, "vid")
    s, t = match_spatial(s, t)
    mean = regressor(s)
    if mean.shape != t.shape:
        raise ValueError(
            f"vid: the regressor maps student features {tuple(s.shape)} to {tuple(mean.shape)}, not to the "
            f"teacher's shape {tuple(t.shape)}: was the VID state built for other taps?"
        )
    return vid_nll(mean, t, variance)


# --------------------------------------------------------------------------- FT


def _conv_stack(kinds: Sequence[type[nn.Module]], channels: Sequence[int], bn: bool) -> nn.Sequential:
    """3x3 stride-1 (transposed) convolutions, each followed by [BN and] LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for kind, cin, cout in zip(kinds, channels[:-1], channels[1:]):
        layers.append(kind(cin, cout, 3, stride=1, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's paraphraser: a convolutional autoencoder of the teacher's feature map.

    Encoder: three 3x3 convolutions ``C -> C -> F -> F`` (``F`` the factor channels), decoder: three
    3x3 transposed convolutions ``F -> F -> C -> C``, each followed by LeakyReLU(0.1) (and batch
    normalisation with ``bn=True``), stride 1, so the spatial size is kept; as in the authors' code.
    """

    def __init__(self, channels: int, factor_channels: int, bn: bool = False) -> None:
        super().__init__()
        self.encoder = _conv_stack(
            [nn.Conv2d] * 3, [channels, channels, factor_channels, factor_channels], bn
        )
        self.decoder = _conv_stack(
            [nn.ConvTranspose2d] * 3, [factor_channels, factor_channels, channels, channels], bn
        )

    def encode(self, x: Tensor) -> Tensor:
        """The teacher factor ``F_T`` of a teacher map."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``decoder(encoder(x))``, same shape as ``x``."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """FT's translator: three 3x3 convolutions ``C_s -> C_s -> F -> F`` with LeakyReLU(0.1) (and BN with
    ``bn=True``), mapping the student's feature map to a factor ``F_S`` like the paraphraser's."""

    def __init__(self, channels: int, factor_channels: int, bn: bool = False) -> None:
        super().__init__()
        self.encoder = _conv_stack(
            [nn.Conv2d] * 3, [channels, channels, factor_channels, factor_channels], bn
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class FTModules(nn.Module):
    r"""FT's trainable parts: the teacher's :class:`Paraphraser` and the student's :class:`Translator`.

    Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018. Both are built by :meth:`build` from the first batch (``pending`` until then): the
    paraphraser from the teacher's channels ``C_t``, the translator from the student's ``C_s``; both
    produce factors of ``round(rate * C_t)`` channels (``rate`` = the paper's paraphrase rate k,
    0.5). ``bn`` adds batch normalisation after every convolution (the authors' code has none;
    RepDistiller's port uses it in the translator only).

    Both modules always exist, whatever the ``phase`` of the :func:`ft` term, so the state trained in
    a ``paraphrase`` stage loads into the ``transfer`` stage's term of the same name. Which module
    trains in which phase is decided by :func:`ft`. ``forward(progress)`` returns
    ``{"paraphraser": ..., "translator": ...}``.
    """

    def __init__(self, rate: float = 0.5, bn: bool = False) -> None:
        super().__init__()
        if not rate > 0:
            raise ValueError(f"ft: the paraphrase rate must be positive, got {rate}")
        self.rate = float(rate)
        self.bn = bool(bn)
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None
        self.pending = True

    def build(self, student: Tensor, teacher: Tensor, context: BuildContext | None = None) -> None:
        """Size the paraphraser from the teacher's channels and the translator from the student's."""
        _check_maps(student, teacher, "ft")
        factor = max(1, int(round(teacher.shape[1] * self.rate)))
        self.paraphraser = Paraphraser(teacher.shape[1], factor, self.bn)
        self.translator = Translator(student.shape[1], factor, self.bn)
        self.pending = False

    def forward(self, progress: float = 0.0) -> dict[str, Any]:
        if self.paraphraser is None or self.translator is None:
            raise RuntimeError("FTModules is used before build(): call distiller.prepare(batch) first")
        return {"paraphraser": self.paraphraser, "translator": self.translator}

    def extra_repr(self) -> str:
        return f"rate={self.rate}, bn={self.bn}" + (", pending" if self.pending else "")


def factor_transfer(student_factor: Tensor, teacher_factor: Tensor, p: float = 1.0) -> Tensor:
    r"""FT's factor loss between a student and a teacher factor map.

    Each factor is flattened per sample and L2-normalised, ``f = vec(F) / ||vec(F)||_2``; then

        L = 1/(N*D) * sum_{n,d} | f^S_{nd} - f^T_{nd} |^p

    (``D`` the factor size C*H*W). For ``p = 1`` this is the authors' code exactly
    (``nn.L1Loss()(FT(factor_s), FT(factor_t))`` with ``FT(x) = F.normalize(x.view(N, -1))``); the
    paper writes the per-sample p-norm ``|| f^S - f^T ||_p``, i.e. the code divides the ``p = 1``
    norm by ``D`` and averages over the batch. ``p = 2`` gives the mean squared difference. If the
    spatial sizes differ, the larger map is average-pooled down first (:func:`match_spatial`, as in
    RepDistiller). Shapes: (N, F, H_s, W_s) and (N, F, H_t, W_t), same ``F``.
    """
    _check_maps(student_factor, teacher_factor, "ft")
    if student_factor.shape[1] != teacher_factor.shape[1]:
        raise ValueError(
            f"ft: student factor {tuple(student_factor.shape)} and teacher factor "
            f"{tuple(teacher_factor.shape)} must have the same number of channels"
        )
    if not p > 0:
        raise ValueError(f"ft: the norm exponent p must be positive, got {p}")
    s, t = match_spatial(student_factor, teacher_factor)
    diff = F.normalize(s.flatten(1), p=2.0, dim=1) - F.normalize(t.flatten(1), p=2.0, dim=1)
    return diff.abs().mean() if p == 1 else diff.abs().pow(p).mean()


def paraphraser_reconstruction(reconstruction: Tensor, teacher_features: Tensor, kind: str = "mse") -> Tensor:
    r"""The paraphraser's reconstruction loss: ``mean (P(x) - x)^2`` (``"mse"``) or ``mean |P(x) - x|`` (``"l1"``).

    The paper trains the paraphraser with the L2 reconstruction loss ``|| x - P(x) ||^2``; RepDistiller
    uses ``nn.MSELoss`` (``"mse"``, the mean over elements, the default), the authors' code
    ``nn.L1Loss`` (``"l1"``).
    """
    if reconstruction.shape != teacher_features.shape:
        raise ValueError(
            f"ft: reconstruction {tuple(reconstruction.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same shape"
        )
    if kind == "mse":
        return F.mse_loss(reconstruction, teacher_features)
    if kind == "l1":
        return F.l1_loss(reconstruction, teacher_features)
    raise ValueError(f"ft: reconstruction must be 'mse' or 'l1', got {kind!r}")


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in ``eval()`` (batch-norm statistics untouched) under ``no_grad``, then restore."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


FT_PHASES = ("paraphrase", "transfer")


@register_loss(
    "ft",
    paper="Kim, Park & Kwak, Paraphrasing Complex Network: Network Compression via Factor Transfer, "
    "NeurIPS 2018",
    reads="features",
    state=FTModules,
)
def ft(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    paraphraser: Paraphraser,
    translator: Translator,
    phase: str = "transfer",
    p: float = 1.0,
    reconstruction: str = "mse",
) -> Tensor:
    r"""Factor Transfer: the student's translated factor imitates the teacher's paraphrased factor.

    Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018. Two stages, chosen by ``phase`` (run them as two stages of one run, with the same
    term ``name`` so the trained paraphraser carries over):

    1. ``phase="paraphrase"``: the paraphraser ``P`` (an autoencoder of the teacher map ``x``, see
       :class:`Paraphraser`) learns to reconstruct it, ``L_rec = mean (P(x) - x)^2``
       (:func:`paraphraser_reconstruction`; ``reconstruction="l1"`` for the authors' L1). The loss
       does not read the student: only the paraphraser gets gradients (freeze the student in this
       stage: ``freeze_student: true``). RepDistiller trains it for 30 epochs.
    2. ``phase="transfer"`` (default): the teacher factor ``F_T = encoder(x)`` is computed with the
       paraphraser frozen (``eval()``, no gradient), the student factor ``F_S = translator(s)`` is
       trained with the student, and

           L_FT = mean_{n,d} | F_S/||F_S||_2 - F_T/||F_T||_2 |^p        (:func:`factor_transfer`)

       with ``p = 1`` (the paper's choice), factors flattened per sample. This is the authors'
       normalisation (an L1 *mean* over the ``N * D`` elements, where the paper writes the per-sample
       norm); their CIFAR recipe weights it by beta = 500 next to a cross-entropy of weight 1.
       RepDistiller's port instead compares AT-style maps (channel mean of ``F^2``) with weight 200;
       this function follows the authors.

    The paraphraser and translator are the loss's state (:class:`FTModules`, settings ``rate`` =
    0.5 and ``bn`` = False), built from the tap shapes by ``distiller.prepare``. Shapes: (N, C_s,
    H_s, W_s) and (N, C_t, H_t, W_t); channels may differ; the factors are pooled to the smaller
    spatial size if theirs differ.
    """
    if phase not in FT_PHASES:
        raise ValueError(f"ft: phase must be one of {', '.join(FT_PHASES)}, got {phase!r}")
    _check_maps(student_features, teacher_features, "ft")
    if phase == "paraphrase":
        return paraphraser_reconstruction(paraphraser(teacher_features), teacher_features, reconstruction)
    with _frozen(paraphraser):
        teacher_factor = paraphraser.encode(teacher_features)
    return factor_transfer(translator(student_features), teacher_factor, p)


# --------------------------------------------------------------------------- FSP


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    r"""The FSP ("flow of solution procedure") matrix between two feature maps of one model.

    Yim, Joo, Bae & Kim, CVPR 2017: for maps ``F1`` (N, C1, H, W) and ``F2`` (N, C2, H, W),

        G_{n,i,j} = 1/(H*W) * sum_{h,w} F1_{n,i,h,w} * F2_{n,j,h,w}        (shape (N, C1, C2))

    If the spatial sizes differ, the larger map is adaptively average-pooled down to the smaller
    size first (:func:`match_spatial`), as in RepDistiller (the paper assumes equal sizes).
    """
    _check_maps(first, second, "fsp")
    a, b = match_spatial(first, second)
    a, b = a.flatten(2), b.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]


@register_loss(
    "fsp",
    paper="Yim, Joo, Bae & Kim, A Gift from Knowledge Distillation: Fast Optimization, Network "
    "Minimization and Transfer Learning, CVPR 2017",
    reads="feature-list",
)
def fsp(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    r"""FSP: match the Gram-like matrices between consecutive layers of student and teacher.

    Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017. The term reads a list of ``K >= 2`` taps per
    model (``student: [a, b, c]``, ``teacher: [a', b', c']``); for every consecutive pair
    ``(k, k+1)`` the FSP matrix :func:`fsp_matrix` ``G_k`` (C_k x C_{k+1}) is compared:

        L = sum_{k=1}^{K-1} mean_{n,i,j} ( G^S_{k,nij} - G^T_{k,nij} )^2

    as in RepDistiller's port (the mean squared difference per pair, summed over pairs, every pair
    with the same weight). The paper writes ``1/N sum_n sum_k lambda_k ||G^T_k - G^S_k||_2^2`` with
    equal ``lambda_k``: the sum over the ``C_k * C_{k+1}`` entries instead of their mean. In the paper
    (and RepDistiller) FSP is a *pre-training* stage of the student, followed by the main task
    (cross-entropy, or CE + KD) as a second stage: see ``configs/mnist-fsp.yaml``.

    Shapes: lists of (N, C_k, H_k, W_k) maps of equal length; student and teacher must have the same
    channel count ``C_k`` at every tapped layer (FSP has no adapter in the paper), otherwise
    ``ValueError``: tap layers of equal width (e.g. a student of the teacher's widths but fewer
    blocks, as in the paper). Spatial sizes may differ between student and teacher (each ``G`` is
    C_k x C_{k+1}).
    """
    if isinstance(student_features, Tensor) or isinstance(teacher_features, Tensor):
        raise ValueError(
            "fsp: reads a list of at least two taps per model (student: [a, b, ...], teacher: [a', b', ...]), "
            "got a single tensor"
        )
    s_list, t_list = list(student_features), list(teacher_features)
    if len(s_list) != len(t_list) or len(s_list) < 2:
        raise ValueError(
            f"fsp: needs the same number (at least 2) of student and teacher taps, got {len(s_list)} "
            f"student and {len(t_list)} teacher tensors"
        )
    for k, (s, t) in enumerate(zip(s_list, t_list)):
        _check_maps(s, t, "fsp")
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"fsp: tap {k}: student features {tuple(s.shape)} and teacher features {tuple(t.shape)} "
                "must have the same number of channels (FSP compares C_k x C_k+1 matrices entry by entry "
                "and has no adapter); tap layers of equal width"
            )
    losses = [
        (fsp_matrix(s_list[k], s_list[k + 1]) - fsp_matrix(t_list[k], t_list[k + 1])).pow(2).mean()
        for k in range(len(s_list) - 1)
    ]
    return torch.stack(losses).sum()


# --------------------------------------------------------------------------- AB


@register_loss(
    "ab",
    paper="Heo, Lee, Yun & Choi, Knowledge Transfer via Distillation of Activation Boundaries Formed by "
    "Hidden Neurons, AAAI 2019",
    reads="features",
)
def ab(student_features: Tensor, teacher_features: Tensor, margin: float = 1.0) -> Tensor:
    r"""Activation-boundary distillation: the student's neurons switch on and off where the teacher's do.

    Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019. On *pre-ReLU* features, with ``s`` the connected student response,
    ``t`` the teacher's and margin ``m``, the alternative (hinge-like, squared) loss of the paper
    penalises every neuron whose activation (``> 0``) differs from the teacher's:

        l(s, t) = (s + m)^2 * 1[s > -m] * 1[t <= 0]  +  (s - m)^2 * 1[s <= m] * 1[t > 0]
        L = 1/N * sum_{n,c,h,w} l(s_{nchw}, t_{nchw})

    i.e. the per-sample *sum* over neurons averaged over the batch, as in the authors' code and
    RepDistiller. Their CIFAR recipe weights the layers (from the deepest up) by ``3/1000 * 1``,
    ``3/1000 * 1/2``, ``3/1000 * 1/4``: set those as the term weights, one ``ab`` term per layer.
    AB is an *initialisation* stage (the student and connectors trained with AB only), followed by
    the main training (CE, or CE + KD) as a second stage: see ``configs/mnist-ab.yaml``.

    Taps must be pre-activation: tap the batch-norm (or conv) module that feeds the ReLU, e.g.
    ``"layer2.1"`` in a ``conv, bn, relu`` ``nn.Sequential``, or the ReLU's input with the ``:in``
    suffix (``"layer2.2:in"``). An *in-place* ReLU (``nn.ReLU(inplace=True)``) overwrites that tensor
    after the hook has recorded it, so the tap would read post-ReLU values: such a model needs its
    ReLUs set to ``inplace=False``. The student connector (the paper's 1x1 conv + BN) is the term's
    adapter: ``adapter: conv_bn``.

    Shapes: student and teacher of the same shape (N, C, H, W) (any (N, ...) shape works); a
    mismatch raises ``ValueError`` (map the student with the term's adapter).
    """
    if student_features.shape != teacher_features.shape or student_features.dim() < 2:
        raise ValueError(
            f"ab: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same (N, ...) shape; map the student to the "
            "teacher's shape with the term's adapter (the paper's connector: adapter: conv_bn)"
        )
    if not margin >= 0:
        raise ValueError(f"ab: the margin must be non-negative, got {margin}")
    s, t = student_features, teacher_features
    off = ((s + margin).pow(2) * ((s > -margin) & (t <= 0))).sum()
    on = ((s - margin).pow(2) * ((s <= margin) & (t > 0))).sum()
    return (off + on) / s.shape[0]
