"""Losses of landmark (keypoint) regression: the ``landmarks`` task, or any model that outputs points.

A prediction, its target and a teacher's prediction are tensors of one shape, ``(N, K, 2)`` points
or flattened ``(N, 2K)``: every loss here is element-wise over coordinates, so any ``(N, ...)``
shape of regressed values works (the same losses serve any coordinate/regression head).

- ``l1``, ``l2``: mean absolute / squared error against the ground truth (hard targets);
- ``wing``: the Wing loss of Feng et al. (CVPR 2018) against the ground truth;
- ``aloss``: the Assistive Loss of Fard & Mahoor — one teacher's predictions, reflected onto the
  student's side of the ground truth, as a weighted attraction/repulsion (pick the teacher with the
  term's ``teacher_index``);
- ``kd_loss``: Fard & Mahoor's KD-Loss — both teachers at once (a two-teacher loss: the tough
  teacher first, the tolerant one second), ``main_weight · main + aloss(tough) + aloss(tolerant)``.

Plain two-teacher L2 distillation (the control) is the registered ``fitnet`` loss on ``logits``
with no ``teacher_index`` (the mean of the per-teacher squared errors), not another copy here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .registry import register_loss

KD_PAPER = (
    "Fard & Mahoor, Facial Landmark Points Detection Using Knowledge Distillation-Based Neural "
    "Networks, Computer Vision and Image Understanding 2022 (code: aliprf/KD-Loss)"
)
WING_PAPER = (
    "Feng, Kittler, Awais, Huber & Wu, Wing Loss for Robust Facial Landmark Localisation with "
    "Convolutional Neural Networks, CVPR 2018"
)


def _same(a: Tensor, b: Tensor, name: str, what: str) -> None:
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(
            f"{name}: predicted points {tuple(a.shape)} and {what} {tuple(b.shape)} must have the same "
            "(N, K, 2) or (N, 2K) shape (the model's point count must match the data's)"
        )


@register_loss(
    "l1", paper="mean absolute error (landmark regression)", reads="points", uses_teacher=False, uses_target=True
)
def l1(points: Tensor, *, target: Tensor) -> Tensor:
    r"""Mean absolute error against the ground truth: ``L = mean |s - y|`` over all coordinates."""
    _same(points, target, "l1", "target")
    return (points - target.to(points.dtype)).abs().mean()


@register_loss(
    "l2", paper="mean squared error (landmark regression)", reads="points", uses_teacher=False, uses_target=True
)
def l2(points: Tensor, *, target: Tensor) -> Tensor:
    r"""Mean squared error against the ground truth: ``L = mean (s - y)^2`` over all coordinates
    (the reference KD-Loss code's ``MSE``, what its teachers are trained with)."""
    _same(points, target, "l2", "target")
    return (points - target.to(points.dtype)).pow(2).mean()


@register_loss("wing", paper=WING_PAPER, reads="points", uses_teacher=False, uses_target=True)
def wing(points: Tensor, *, target: Tensor, w: float = 10.0, epsilon: float = 2.0) -> Tensor:
    r"""Wing loss: logarithmic for small errors, L1 for large ones.

    Feng et al., "Wing Loss for Robust Facial Landmark Localisation with CNNs", CVPR 2018, eq. 5.
    With ``x = |s - y|`` per coordinate:

        wing(x) = w ln(1 + x / epsilon)    if x < w
                  x - C                    otherwise,   C = w - w ln(1 + w / epsilon)

        L = mean over coordinates of wing(x)

    ``C`` joins the two pieces continuously. The paper's ``w = 10, epsilon = 2`` are for pixel
    coordinates; with normalised coordinates (the ``landmarks`` task: x / size - 0.5) scale both by
    the image size's inverse, e.g. ``w = 10 / 256``, ``epsilon = 2 / 256``. The paper sums over the
    coordinates of a shape; this averages (the scale of a loss weight only).
    """
    _same(points, target, "wing", "target")
    if not (w > 0 and epsilon > 0):
        raise ValueError(f"wing: w and epsilon must be > 0, got w={w}, epsilon={epsilon}")
    x = (points - target.to(points.dtype)).abs()
    c = w - w * torch.log1p(torch.tensor(w / epsilon, dtype=x.dtype, device=x.device))
    return torch.where(x < w, w * torch.log1p(x / epsilon), x - c).mean()


def assistive_loss(
    points: Tensor, teacher: Tensor, target: Tensor, alpha_pos: float, alpha_neg: float, band: float
) -> Tensor:
    r"""The Assistive Loss of one teacher (:func:`aloss`'s formula), without checks or registration."""
    y = target.to(points.dtype)
    side = torch.sign(points - y)  # the teacher reflected onto the student's side of the ground truth
    reach = (teacher.to(points.dtype) - y).abs()
    t = y + side * reach
    b = y + side * reach * band
    beyond = torch.sign(points - t) * torch.sign(t - y) > 0  # farther from y than the teacher
    between = torch.sign(t - points) * torch.sign(points - b) >= 0  # within [b, t]
    weight = beyond.to(points.dtype) * alpha_pos + between.to(points.dtype) * alpha_neg
    return (weight * (t - points).abs()).mean()


@register_loss("aloss", paper=KD_PAPER, reads="points", uses_target=True)
def aloss(
    points: Tensor,
    teacher: Tensor,
    *,
    target: Tensor,
    alpha_pos: float = 1.9,
    alpha_neg: float = -0.45,
    band: float = 0.15,
) -> Tensor:
    r"""Assistive Loss (ALoss) of one teacher: attraction toward the teacher where the student is
    beyond it, a push past it toward the ground truth where the student is near it.

    Fard & Mahoor, CVIU 2022, following the reference code (aliprf/KD-Loss, ``custom_Losses.kd_loss``).
    Per coordinate, with ``s`` the student, ``y`` the ground truth and ``t`` the teacher:

        t' = y + sign(s - y) |t - y|            (the teacher reflected onto the student's side of y)
        b  = y + sign(s - y) |t - y| * band     (a band near y)
        α  = alpha_pos    if sign(s - t') sign(t' - y) > 0     (s beyond t', farther from y)
             alpha_neg    if sign(t' - s) sign(s - b) >= 0     (s between b and t')
             0            otherwise                              (s within the band around y)
        L  = mean over coordinates of α |t' - s|

    The map ``α`` is a constant (no gradient through it). With ``alpha_neg < 0`` the loss pushes
    ``s`` away from ``t'``, i.e. past the teacher toward ``y``, until it enters the band. The
    reference uses ``alpha_pos = 1.9, alpha_neg = -0.45`` for the tough teacher (trained on the hard
    ground truth) and ``1.8, -0.4`` for the tolerant one (trained on ASM-projected soft landmarks),
    ``band = 0.15`` for both. Where ``s = y`` both sides' conditions hold trivially and the term is 0.
    """
    _same(points, teacher, "aloss", "teacher points")
    _same(points, target, "aloss", "target")
    return assistive_loss(points, teacher, target, alpha_pos, alpha_neg, band)


def kd_main(points: Tensor, tolerant: Tensor, target: Tensor) -> Tensor:
    r"""KD-Loss's main term (:func:`kd_loss`): ``3|e|`` inside the tolerant teacher's distance,
    quadratic outside, continuous at the boundary."""
    y = target.to(points.dtype)
    e = (y - points).abs()
    d = (y - tolerant.to(points.dtype)).abs()
    return torch.where(e <= d, 3.0 * e, e.pow(2) + 3.0 * d - d.pow(2)).mean()


@register_loss("kd_loss", paper=KD_PAPER, reads="points", uses_target=True, multi_teacher=True)
def kd_loss(
    points: Tensor,
    teachers: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    target: Tensor,
    main_weight: float = 2.0,
    tough_weight: float = 1.0,
    tolerant_weight: float = 1.0,
    tough_alpha_pos: float = 1.9,
    tough_alpha_neg: float = -0.45,
    tolerant_alpha_pos: float = 1.8,
    tolerant_alpha_neg: float = -0.4,
    band: float = 0.15,
) -> Tensor:
    r"""KD-Loss: a student guided toward the ground truth by a Tough and a Tolerant teacher at once.

    Fard & Mahoor, CVIU 2022, following the reference code (aliprf/KD-Loss, ``custom_Losses.kd_loss``
    with the weights of ``main.py``). ``teachers`` is ``[tough, tolerant]``: the tough teacher's and
    the tolerant teacher's predicted points (a run config orders them with the term's
    ``teacher_index: [tough, tolerant]``). Per coordinate, with ``s`` the student, ``y`` the ground
    truth, ``e = |y - s|`` and ``d = |y - tol|`` the tolerant teacher's distance:

        main = mean over coordinates of  3 e                    if e <= d
                                         e^2 + 3 d - d^2        otherwise
        L = main_weight * main
            + tough_weight * ALoss(s, tough; tough_alpha_pos, tough_alpha_neg, band)
            + tolerant_weight * ALoss(s, tol; tolerant_alpha_pos, tolerant_alpha_neg, band)

    (:func:`aloss`). The constant ``3d - d^2`` makes ``main`` continuous at ``e = d``. Defaults are
    the reference's (``main_weight = 2``, teacher weights 1, α 1.9/−0.45 and 1.8/−0.4, band 0.15).
    The distiller's teacher ``weights`` are not used: the roles, not an ensemble, decide.
    """
    if isinstance(teachers, Tensor) or len(teachers) != 2:
        raise ValueError(
            "kd_loss: needs exactly two teachers, [tough, tolerant] (give the term teacher_index: "
            f"[tough, tolerant]); got {1 if isinstance(teachers, Tensor) else len(teachers)}"
        )
    tough, tolerant = teachers
    _same(points, tough, "kd_loss", "tough teacher points")
    _same(points, tolerant, "kd_loss", "tolerant teacher points")
    _same(points, target, "kd_loss", "target")
    return (
        main_weight * kd_main(points, tolerant, target)
        + tough_weight * assistive_loss(points, tough, target, tough_alpha_pos, tough_alpha_neg, band)
        + tolerant_weight
        * assistive_loss(points, tolerant, target, tolerant_alpha_pos, tolerant_alpha_neg, band)
    )
