"""The logit family of distillation losses: CE, KD, DKD, DIST, CTKD and multi-teacher KD.

Every loss is a pure function of ``(N, C)`` logits returning a scalar (the batch mean), registered by
name with :func:`~protege.losses.registry.register_loss`. The one piece of trainable state, the
learnable CTKD temperature, is a separate :class:`CTKDTemperature` module named as the ``ctkd``
loss's ``state``.

Numerics: every KL divergence is computed from log-probabilities (``sum p_t (log p_t - log p_s)``
with ``p_t = exp(log p_t)``), so a teacher probability that underflows to zero contributes exactly
zero instead of ``0 * -inf = nan``; DKD's non-target distribution is built by dropping the target
column rather than by subtracting a large constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_loss

__all__ = [
    "CTKDTemperature",
    "GradientReversal",
    "ce",
    "ctkd",
    "ctkd_lambda",
    "dist",
    "dkd",
    "kd",
    "multi_kd",
    "standardize_logits",
]


# --------------------------------------------------------------------------- helpers


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each logit vector along the last dimension: ``(z - mean(z)) / (std(z) + eps)``.

    This is the pre-processing of Sun et al., "Logit Standardization in Knowledge Distillation",
    CVPR 2024. The result is invariant to adding a constant to ``z`` and to scaling ``z`` by a
    positive factor (up to ``eps``). ``std`` is the Bessel-corrected (``1/(C-1)``) standard
    deviation, as in the authors' released code (the paper writes ``1/C``; the two differ by the
    constant factor ``sqrt(C/(C-1))``, i.e. a slightly different effective temperature).
    """
    if z.shape[-1] < 2:
        raise ValueError(f"logit standardization needs at least 2 classes, got shape {tuple(z.shape)}")
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)


def _check_logits(student: Tensor, teacher: Tensor, loss: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{loss}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "must have the same shape (N, C): same batch and same number of classes"
        )
    if student.dim() != 2:
        raise ValueError(f"{loss}: expected logits of shape (N, C), got {tuple(student.shape)}")


def _check_T(T: float, loss: str) -> None:
    if not T > 0:
        raise ValueError(f"{loss}: temperature T must be positive, got {T}")


def _class_target(target: Tensor, n: int, loss: str) -> Tensor:
    """Class-index targets as a 1-D long tensor of length ``n``."""
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"{loss}: target must hold class indices (an integer tensor), got {target.dtype}")
    if target.numel() != n or target.dim() > 2 or (target.dim() == 2 and target.shape[1] != 1):
        raise ValueError(f"{loss}: target of shape {tuple(target.shape)} does not match a batch of {n}")
    return target.reshape(n).long()


def _kl_rows(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    """Per-row ``KL(p_t || p_s) = sum_c p_t (log p_t - log p_s)`` from log-probabilities."""
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)


# --------------------------------------------------------------------------- CE


@register_loss(
    "ce",
    paper="Szegedy et al., Rethinking the Inception Architecture for Computer Vision, CVPR 2016 "
    "(label smoothing)",
    uses_teacher=False,
    uses_target=True,
)
def ce(student_logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    r"""Cross-entropy with the ground truth, optionally with label smoothing (no teacher).

    Label smoothing: Szegedy, Vanhoucke, Ioffe, Shlens & Wojna, "Rethinking the Inception
    Architecture for Computer Vision", CVPR 2016. With ``p = softmax(s)``, target class ``y``,
    ``C`` classes and smoothing ``eps``:

        L = mean_i [ (1 - eps) * (-log p_{i,y_i}) + eps * (1/C) sum_c (-log p_{i,c}) ]

    ``target`` holds class indices of shape (N,); a float (N, C) tensor of class probabilities
    (soft labels, e.g. from mixup) is also accepted, as by :func:`torch.nn.functional.cross_entropy`.
    Token logits ``(B, L, C)`` with next-token targets ``(B, L)`` (a language model's) are scored per
    token, ignoring targets of ``-100`` (prompt and padding), the mean over the scored tokens.
    """
    if (
        student_logits.dim() == 3
        and not target.is_floating_point()
        and target.shape == student_logits.shape[:2]
    ):
        student_logits, target = student_logits.flatten(0, 1), target.flatten()
    if student_logits.dim() != 2:
        raise ValueError(f"ce: expected logits of shape (N, C), got {tuple(student_logits.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"ce: label_smoothing must be in [0, 1], got {label_smoothing}")
    n = student_logits.shape[0]
    if target.is_floating_point():
        if target.shape != student_logits.shape:
            raise ValueError(
                f"ce: soft target {tuple(target.shape)} must match the logits {tuple(student_logits.shape)}"
            )
    else:
        target = _class_target(target, n, "ce")
    return F.cross_entropy(student_logits, target, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------- KD


@register_loss(
    "kd",
    paper="Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, NIPS Deep Learning "
    "Workshop 2015 (arXiv:1503.02531); standardize: Sun et al., Logit Standardization in Knowledge "
    "Distillation, CVPR 2024",
)
def kd(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0, standardize: bool = False) -> Tensor:
    r"""Vanilla KD: T^2-scaled KL divergence between temperature-softened teacher and student.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
    Workshop (arXiv:1503.02531, 2015):

        L = T^2 * mean_i KL( softmax(t_i / T) || softmax(s_i / T) )
          = T^2 * mean_i sum_c p^t_{ic} (log p^t_{ic} - log p^s_{ic})

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.

    ``standardize=True`` applies logit standardization (Sun, Ren, Li, Wang & Cao, "Logit
    Standardization in Knowledge Distillation", CVPR 2024): both logit vectors are z-scored
    (:func:`standardize_logits`) before dividing by ``T``, so ``T`` becomes a *base* temperature and
    the effective per-sample temperature is ``T * std(z)``. The paper (Algorithm 1) and its code
    keep the ``T^2`` factor, and so does this function; the paper's CIFAR-100/ImageNet recipe uses
    base ``T = 2`` with KD weight 9 (set these through the term's params and weight).
    """
    _check_logits(student_logits, teacher_logits, "kd")
    _check_T(T, "kd")
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits)
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits / T, dim=1)
    return _kl_rows(log_pt, log_ps).mean() * (T * T)


# --------------------------------------------------------------------------- DKD


def _binary_and_nontarget(z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Log of the binary (target, rest) distribution, shape (N, 2), and of the non-target one, (N, C-1).

    The non-target distribution is the softmax over the non-target logits alone (the target column
    is dropped by a gather, not pushed to a large negative value), so everything stays finite, and
    nothing here synchronises with the device.
    """
    n, c = z.shape
    lse_all = torch.logsumexp(z, dim=1)
    z_gt = z.gather(1, target.unsqueeze(1)).squeeze(1)
    cols = torch.arange(c - 1, device=z.device).unsqueeze(0).expand(n, c - 1)
    z_other = z.gather(1, cols + (cols >= target.unsqueeze(1)).long())  # skips column target[i]
    lse_other = torch.logsumexp(z_other, dim=1)
    log_binary = torch.stack([z_gt - lse_all, lse_other - lse_all], dim=1)
    log_nontarget = z_other - lse_other.unsqueeze(1)
    return log_binary, log_nontarget


@register_loss(
    "dkd",
    paper="Zhao, Cui, Song, Qiu & Liang, Decoupled Knowledge Distillation, CVPR 2022",
    uses_target=True,
)
def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    r"""Decoupled KD: KD split into a target-class (TCKD) and a non-target-class (NCKD) term.

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022. With
    ``p = softmax(z / T)`` and target class ``y``:

        b   = [p_y, 1 - p_y]                          (binary target-vs-rest distribution)
        p~  = softmax over the non-target logits z_{c != y} / T
        TCKD = KL(b^t || b^s),   NCKD = KL(p~^t || p~^s)
        L = T^2 * mean_i ( alpha * TCKD_i + beta * NCKD_i )

    Defaults are the paper's CIFAR-100 setting (``alpha = 1``, ``beta = 8``, ``T = 4``); for
    ImageNet the paper uses ``beta = 0.5`` and ``T = 1``. The paper's linear warm-up of the DKD loss
    over the first 20 epochs is not part of this function: express it with the generic term weight
    schedule. ``standardize=True`` z-scores both logit vectors first (Sun et al., CVPR 2024), as
    in the logit-standardization authors' DKD variant.

    Implemented in log space: ``log(1 - p_y)`` is ``logsumexp(z_{c!=y}/T) - logsumexp(z/T)`` and the
    non-target softmax drops the target column, so there is no ``log 0`` and no masking constant.
    """
    _check_logits(student_logits, teacher_logits, "dkd")
    _check_T(T, "dkd")
    n, c = student_logits.shape
    if c < 2:
        raise ValueError(f"dkd: needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}")
    tgt = _class_target(target, n, "dkd").to(student_logits.device)
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits)
    log_bs, log_ns = _binary_and_nontarget(student_logits / T, tgt)
    log_bt, log_nt = _binary_and_nontarget(teacher_logits / T, tgt)
    tckd = _kl_rows(log_bt, log_bs)
    nckd = _kl_rows(log_nt, log_ns)
    return (alpha * tckd + beta * nckd).mean() * (T * T)


# --------------------------------------------------------------------------- DIST


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation between matching rows of ``a`` and ``b``, shape (rows,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss(
    "dist",
    paper="Huang, You, Wang, Qian & Xu, Knowledge Distillation from A Stronger Teacher, NeurIPS 2022",
)
def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    T: float = 1.0,
) -> Tensor:
    r"""DIST: match teacher and student by Pearson correlation of predictions, across and within classes.

    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
    With ``Y^s = softmax(S / T)`` and ``Y^t = softmax(T_logits / T)`` (rows: samples, columns:
    classes) and ``rho`` the Pearson correlation coefficient:

        L_inter = 1 - (1/N) sum_i rho(Y^s_{i,:}, Y^t_{i,:})      (inter-class relation, per sample)
        L_intra = 1 - (1/C) sum_c rho(Y^s_{:,c}, Y^t_{:,c})      (intra-class relation, per class)
        L = T^2 * (beta * L_inter + gamma * L_intra)

    Defaults ``beta = gamma = 1``, ``T = 1`` are those of the authors' loss module; the paper's
    ImageNet recipe multiplies the whole DIST term by 2 (i.e. ``beta = gamma = 2``) next to a
    cross-entropy of weight 1, and its CIFAR-100 recipe additionally uses ``T = 4``; set the term
    weight (and ``T``) accordingly. The intra-class relation correlates columns over the batch, so
    it needs a batch of more than one sample (with ``N = 1`` it is the constant 1). A small
    ``eps = 1e-8`` in the correlation's denominator keeps constant rows/columns finite.
    """
    _check_logits(student_logits, teacher_logits, "dist")
    _check_T(T, "dist")
    ys = F.softmax(student_logits / T, dim=1)
    yt = F.softmax(teacher_logits / T, dim=1)
    inter = 1.0 - _pearson_rows(ys, yt).mean()
    intra = 1.0 - _pearson_rows(ys.t(), yt.t()).mean()
    return (beta * inter + gamma * intra) * (T * T)


# --------------------------------------------------------------------------- CTKD


class GradientReversal(torch.autograd.Function):
    """Gradient reversal layer: identity forward, gradient multiplied by ``-lambda_`` backward.

    Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015. Use as
    ``GradientReversal.apply(x, lambda_)``; ``lambda_`` is a float and receives no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = float(lambda_)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output * (-ctx.lambda_), None


def ctkd_lambda(
    progress: float, lambda_min: float = 0.0, lambda_max: float = 1.0, curriculum_epochs: float = 10.0
) -> float:
    r"""CTKD's cosine curriculum for the gradient-reversal strength at training position ``progress``.

    Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023, with ``n`` the epoch
    and ``E`` the curriculum length:

        lambda_n = lambda_min + 1/2 (lambda_max - lambda_min) (1 + cos((1 + min(n, E) / E) * pi))

    rising from ``lambda_min`` at ``n = 0`` to ``lambda_max`` at ``n = E`` and constant afterwards.
    ``progress`` is a float epoch, so the schedule is continuous rather than stepped per epoch.
    """
    if curriculum_epochs <= 0:
        return float(lambda_max)
    frac = min(max(float(progress), 0.0), float(curriculum_epochs)) / float(curriculum_epochs)
    return float(lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + math.cos((1.0 + frac) * math.pi)))


# Official CTKD code: raw parameter initialised to 1, temperature = 1 + 20 * sigmoid(raw).
_CTKD_T_MIN = 1.0
_CTKD_T_MAX = 21.0
_CTKD_INIT_T = _CTKD_T_MIN + (_CTKD_T_MAX - _CTKD_T_MIN) / (1.0 + math.exp(-1.0))  # ~= 15.62


class CTKDTemperature(nn.Module):
    r"""CTKD's learnable global temperature, trained adversarially through a gradient-reversal layer.

    Li, Li, Yang, Zhao, Song, Luo, Li & Yang, "Curriculum Temperature for Knowledge Distillation",
    AAAI 2023. One scalar parameter ``theta`` is trained with the student by the same optimizer;
    the temperature is

        T = T_min + (T_max - T_min) * sigmoid(GRL_lambda(theta))

    so it stays in ``(T_min, T_max)``. The gradient-reversal layer makes the temperature *maximise*
    the distillation loss (the student minimises it), with a strength ``lambda`` that follows the
    cosine curriculum of :func:`ctkd_lambda` from ``lambda_min`` to ``lambda_max`` over
    ``curriculum_epochs`` epochs (easy to hard).

    Constructor arguments (these are the state module's settings, separate from the ``ctkd``
    loss's registry ``params``, which come from the loss function's signature and are empty):

    - ``init_T``: initial temperature. Default ~15.62, i.e. the official code's raw parameter
      ``theta = 1`` mapped through ``1 + 20 * sigmoid(theta)``.
    - ``lambda_max`` = 1, ``lambda_min`` = 0, ``curriculum_epochs`` = 10: the paper's curriculum.
    - ``T_min`` = 1, ``T_max`` = 21: the range of the official code (``t_start = 1`` plus a sigmoid
      scaled by ``t_end = 20``).

    ``forward(progress)`` takes the training position in (float) epochs and returns
    ``{"temperature": T}`` with ``T`` a 0-dim tensor, the keyword argument :func:`ctkd` expects.
    """

    def __init__(
        self,
        init_T: float = _CTKD_INIT_T,
        lambda_max: float = 1.0,
        lambda_min: float = 0.0,
        curriculum_epochs: float = 10.0,
        T_min: float = _CTKD_T_MIN,
        T_max: float = _CTKD_T_MAX,
    ) -> None:
        super().__init__()
        if not 0 < T_min < T_max:
            raise ValueError(f"CTKDTemperature: need 0 < T_min < T_max, got T_min={T_min}, T_max={T_max}")
        if not T_min < init_T < T_max:
            raise ValueError(f"CTKDTemperature: init_T={init_T} must lie strictly in ({T_min}, {T_max})")
        if curriculum_epochs < 0:
            raise ValueError(f"CTKDTemperature: curriculum_epochs must be >= 0, got {curriculum_epochs}")
        self.lambda_max = float(lambda_max)
        self.lambda_min = float(lambda_min)
        self.curriculum_epochs = float(curriculum_epochs)
        self.T_min = float(T_min)
        self.T_max = float(T_max)
        frac = (init_T - T_min) / (T_max - T_min)
        self.raw_T = nn.Parameter(torch.tensor([math.log(frac / (1.0 - frac))]))

    def lambda_at(self, progress: float) -> float:
        """Gradient-reversal strength at training position ``progress`` (epochs)."""
        return ctkd_lambda(progress, self.lambda_min, self.lambda_max, self.curriculum_epochs)

    @property
    def temperature(self) -> float:
        """The current temperature as a float (no gradient)."""
        return float(self.T_min + (self.T_max - self.T_min) * torch.sigmoid(self.raw_T.detach()).item())

    def forward(self, progress: float) -> dict[str, Tensor]:
        raw = GradientReversal.apply(self.raw_T, self.lambda_at(progress))
        T = self.T_min + (self.T_max - self.T_min) * torch.sigmoid(raw)
        return {"temperature": T.reshape(())}

    def extra_repr(self) -> str:
        return (
            f"T={self.temperature:.4g}, range=({self.T_min:g}, {self.T_max:g}), "
            f"lambda={self.lambda_min:g}->{self.lambda_max:g} over {self.curriculum_epochs:g} epochs"
        )


@register_loss(
    "ctkd",
    paper="Li, Li, Yang, Zhao, Song, Luo, Li & Yang, Curriculum Temperature for Knowledge Distillation, "
    "AAAI 2023",
    state=CTKDTemperature,
)
def ctkd(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float) -> Tensor:
    r"""Curriculum Temperature KD: vanilla KD at a learnable temperature that receives the gradient.

    Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023:

        L = mean_i T_i^2 * KL( softmax(t_i / T_i) || softmax(s_i / T_i) )

    ``temperature`` is a tensor: a scalar (global temperature, shape () or (1,)) or one per
    instance (shape (N,) or (N, 1)). It is not detached, so the gradient of ``L`` flows into it;
    :class:`CTKDTemperature` (this loss's ``state``) supplies it through a gradient-reversal layer so
    that the temperature is trained to *increase* the loss while the student decreases it. A plain
    float is accepted too (then this is :func:`kd`). Temperatures must be positive (not checked for
    tensors, to avoid a device synchronisation).
    """
    _check_logits(student_logits, teacher_logits, "ctkd")
    n = student_logits.shape[0]
    if not isinstance(temperature, Tensor):
        _check_T(float(temperature), "ctkd")
        temperature = torch.tensor(
            float(temperature), dtype=student_logits.dtype, device=student_logits.device
        )
    if temperature.numel() == 1:
        T = temperature.reshape(())
        scale = T * T
    elif temperature.numel() == n and temperature.dim() in (1, 2) and temperature.shape[0] == n:
        T = temperature.reshape(n, 1)
        scale = T.reshape(n) ** 2
    else:
        raise ValueError(
            f"ctkd: temperature of shape {tuple(temperature.shape)} must be a scalar or one per sample "
            f"(N={n})"
        )
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits / T, dim=1)
    return (scale * _kl_rows(log_pt, log_ps)).mean()


# --------------------------------------------------------------------------- multi-teacher KD


def _teacher_weights(weights: Sequence[float] | Tensor | None, k: int, like: Tensor) -> Tensor:
    """Validated teacher weights as a 1-D tensor of length ``k`` summing to 1."""
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=like.dtype, device=like.device)
    if isinstance(weights, Tensor):
        w = weights.to(dtype=like.dtype).reshape(-1)
    else:  # validate on the CPU, then move: no device synchronisation for plain floats
        w = torch.tensor([float(x) for x in weights], dtype=like.dtype)
    if w.numel() != k:
        raise ValueError(f"multi_kd: got {w.numel()} weights for {k} teachers; give one weight per teacher")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"multi_kd: teacher weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if not float(total) > 0:
        raise ValueError(f"multi_kd: teacher weights must not all be zero, got {w.tolist()}")
    return (w / total).to(like.device)


@register_loss(
    "multi_kd",
    paper="You, Xu, Xu & Tao, Learning from Multiple Teacher Networks, KDD 2017; Hinton, Vinyals & Dean, "
    "Distilling the Knowledge in a Neural Network, 2015 (ensemble distillation)",
    multi_teacher=True,
)
def multi_kd(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    T: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    r"""Multi-teacher KD: KD against the weighted average of the teachers' softened distributions.

    You, Xu, Xu & Tao, "Learning from Multiple Teacher Networks", KDD 2017 (averaged soft targets of
    several teachers), and the ensemble distillation of Hinton, Vinyals & Dean, "Distilling the
    Knowledge in a Neural Network", 2015. With teachers ``t_k`` and weights ``w_k``:

        q_i = sum_k w_k softmax(t_{k,i} / T)
        L   = T^2 * mean_i KL( q_i || softmax(s_i / T) )

    ``weights`` holds one non-negative number per teacher and is normalised to sum to 1 (``None``:
    equal weights, as in You et al.). The mixture is formed in log space
    (``log q = logsumexp_k(log w_k + log_softmax(t_k / T))``). ``standardize=True`` z-scores the
    student and each teacher separately first (Sun et al., CVPR 2024). With one teacher this is
    :func:`kd`.
    """
    if isinstance(teacher_logits, Tensor):
        raise ValueError("multi_kd: teacher_logits must be a list of (N, C) tensors, one per teacher")
    teachers = list(teacher_logits)
    if not teachers:
        raise ValueError("multi_kd: needs at least one teacher")
    for t in teachers:
        _check_logits(student_logits, t, "multi_kd")
    _check_T(T, "multi_kd")
    w = _teacher_weights(weights, len(teachers), student_logits)
    if standardize:
        student_logits = standardize_logits(student_logits)
        teachers = [standardize_logits(t) for t in teachers]
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pts = torch.stack([F.log_softmax(t / T, dim=1) for t in teachers])  # (K, N, C)
    positive = w > 0
    log_w = torch.where(positive, torch.log(torch.where(positive, w, torch.ones_like(w))), -math.inf)
    log_q = torch.logsumexp(log_pts + log_w.reshape(-1, 1, 1), dim=0)
    return _kl_rows(log_q, log_ps).mean() * (T * T)
