"""Losses of promptable segmentation (the ``promptable_segmentation`` task, SAM and its students).

- ``sam_gt``: SAM's own training loss against ground-truth masks (focal 20 : dice 1, and the IoU
  head's squared error), what a teacher is trained with and the "no distillation" baseline;
- ``mask_kd``: distillation of the teacher's mask logits (TinySAM's output-level term).

TinySAM's image-embedding and output-token terms are mean squared errors between two tensors of the
same shape: the registered ``fitnet`` loss (no adapter) on the task's ``embedding`` and ``tokens``
outputs, not a second copy here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss

SAM_PAPER = "Kirillov et al., Segment Anything, ICCV 2023"
TINYSAM_PAPER = "Shu et al., TinySAM: Pushing the Envelope for Efficient Segment Anything Model, AAAI 2025"


def _to_size(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, P, h, w)`` mask logits bilinearly resized to ``size`` (SAM's post-processing)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _dice(prob: Tensor, target: Tensor) -> Tensor:
    """Per-mask dice loss ``1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)`` over the last two dims."""
    p, t = prob.flatten(-2), target.flatten(-2)
    return 1.0 - (2.0 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)


def _check(logits: Tensor, other: Tensor, name: str, what: str) -> None:
    """Mask logits ``(B, P, h, w)``, or ``(B, P, M, h, w)`` (M candidate masks per prompt), against
    ``other`` of ``(B, P, H, W)`` (one per prompt) or, with candidates, ``(B, P, M, H, W)``."""
    ok = logits.dim() in (4, 5) and other.dim() in (4, logits.dim()) and logits.shape[:2] == other.shape[:2]
    if ok and other.dim() == 5:
        ok = logits.shape[2] == other.shape[2]
    if not ok:
        raise ValueError(
            f"{name}: mask logits (B, P, h, w) or (B, P, M, h, w) {tuple(logits.shape)} and {what} "
            f"{tuple(other.shape)} must agree on B and P (and M)"
        )


def _resized(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`_to_size` for ``(B, P, h, w)`` or ``(B, P, M, h, w)`` logits."""
    if logits.dim() == 4:
        return _to_size(logits, size)
    b, p, m = logits.shape[:3]
    return _to_size(logits.reshape(b, p * m, *logits.shape[-2:]), size).reshape(b, p, m, *size)


@register_loss(
    "sam_gt",
    paper=SAM_PAPER,
    reads="feature-list",
    uses_teacher=False,
    uses_target=True,
    default_keys=(("logits", "iou"), ("logits", "iou")),
)
def sam_gt(
    student: list[Tensor],
    *,
    target: Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    r"""SAM's supervised loss: focal + dice on the mask, squared error of the predicted IoU.

    Kirillov et al., "Segment Anything", ICCV 2023 (§3 and appendix A: focal and dice 20 : 1, the IoU
    head trained with the mean squared error between its prediction and the IoU of the predicted mask
    with the ground truth; with several output masks, only the one of lowest loss is backpropagated).
    With ``z`` a prompt's mask logits (resized to the target's size, bilinear), ``p = sigmoid(z)``,
    ``y`` its binary target and ``u`` its predicted IoU:

        focal(z) = mean over pixels of -a_t (1 - p_t)^gamma log p_t    (Lin et al. 2017; torchvision's)
        dice(z)  = 1 - (2 Σ p y + 1) / (Σ p + Σ y + 1)
        mask(z)  = focal_weight * focal(z) + dice_weight * dice(z)
        L = mean over prompts of min over the prompt's M masks of mask(z_m)
            + iou_weight * mean over prompts and masks of (u_m - IoU(z_m > 0, y))^2   (IoU a constant)

    ``student``: ``[logits (B, P, h, w), iou (B, P)]`` (one mask per prompt, ``M = 1``: the min is
    that mask) or ``[multi_logits (B, P, M, h, w), multi_iou (B, P, M)]`` (SAM's multimask output);
    ``target``: ``(B, P, H, W)`` masks (bool or 0/1).
    """
    from torchvision.ops import sigmoid_focal_loss

    logits, iou_pred = student[0].float(), student[1].float()
    _check(logits, target, "sam_gt", "target masks")
    if logits.dim() == 4:
        logits, iou_pred = logits.unsqueeze(2), iou_pred.reshape(*logits.shape[:2], 1)
    b, p, m = logits.shape[:3]
    size = tuple(target.shape[-2:])
    z = _resized(logits, size)  # (B, P, M, H, W)
    y = target.to(z.dtype).unsqueeze(2).expand_as(z)
    focal = sigmoid_focal_loss(z, y, alpha=alpha, gamma=gamma, reduction="none").flatten(-2).mean(-1)
    dice = _dice(torch.sigmoid(z), y)
    per_mask = focal_weight * focal + dice_weight * dice  # (B, P, M)
    with torch.no_grad():
        pred, ref = z > 0, y > 0.5
        inter = (pred & ref).flatten(-2).sum(-1).float()
        union = (pred | ref).flatten(-2).sum(-1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou = F.mse_loss(iou_pred.reshape(b, p, m).float(), actual)
    return per_mask.min(dim=2).values.mean() + iou_weight * iou


@register_loss("mask_kd", paper=TINYSAM_PAPER, reads="masks")
def mask_kd(student: Tensor, teacher: Tensor, T: float = 1.0, dice_weight: float = 1.0) -> Tensor:
    r"""Distillation of mask logits: each pixel's foreground probability and each mask's overlap.

    TinySAM's full-stage distillation matches the mask decoder's outputs of student and teacher for the
    same prompts (Shu et al., AAAI 2025). Here, with ``s`` and ``t`` the two models' mask logits of a
    prompt (the student's resized to the teacher's size), ``q = sigmoid(t / T)`` the teacher's soft
    mask and ``p = sigmoid(s / T)``:

        bce  = mean over pixels of -(q log p + (1 - q) log(1 - p))      (Hinton KD per pixel, 2 classes)
        dice = mean over masks of 1 - (2 Σ p q + 1) / (Σ p + Σ q + 1)
        L = T^2 * bce + dice_weight * dice

    Zero-gradient exactly where ``p = q``; the BCE's minimum is the teacher's entropy, not 0. The
    paper's exact distance is not given in the text we could read; this is the per-pixel form of KD
    with a dice term so small objects count as much as large ones (as SAM's own dice).
    Shapes: ``(B, P, h, w)`` both, or ``(B, P, M, h, w)`` both (SAM's multimask outputs, mask ``m``
    of the student against mask ``m`` of the teacher); any spatial sizes (the student's is resized).
    """
    _check(student, teacher, "mask_kd", "teacher mask logits")
    if student.dim() != teacher.dim():
        raise ValueError(
            f"mask_kd: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in rank"
        )
    s = _resized(student.float(), tuple(teacher.shape[-2:]))
    q = torch.sigmoid(teacher.float() / T)
    bce = F.binary_cross_entropy_with_logits(s / T, q, reduction="mean")
    dice = _dice(torch.sigmoid(s / T), q).mean()
    return T * T * bce + dice_weight * dice
