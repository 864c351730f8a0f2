"""The promptable-segmentation losses against values computed independently (loops, by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from protege.losses import get_loss
from protege.losses.segmentation import mask_kd, sam_gt


def _focal_by_hand(z: torch.Tensor, y: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> float:
    total, n = 0.0, 0
    for zz, yy in zip(z.flatten().tolist(), y.flatten().tolist()):
        p = 1 / (1 + math.exp(-zz))
        p_t = p if yy == 1 else 1 - p
        a_t = alpha if yy == 1 else 1 - alpha
        total += -a_t * (1 - p_t) ** gamma * math.log(p_t)
        n += 1
    return total / n


def _dice_by_hand(p: torch.Tensor, t: torch.Tensor) -> float:
    values = []
    for pm, tm in zip(
        p.reshape(-1, p.shape[-2] * p.shape[-1]).tolist(), t.reshape(-1, t.shape[-2] * t.shape[-1]).tolist()
    ):
        inter = sum(a * b for a, b in zip(pm, tm))
        values.append(1 - (2 * inter + 1) / (sum(pm) + sum(tm) + 1))
    return sum(values) / len(values)


def test_sam_gt_matches_focal_dice_and_iou_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g) * 2
    target = torch.rand(2, 3, 4, 4, generator=g) > 0.5
    iou_pred = torch.rand(2, 3, generator=g)
    y = target.float()
    focal = _focal_by_hand(logits, y)
    dice = _dice_by_hand(torch.sigmoid(logits), y)
    ious = []
    for zm, ym in zip(logits.reshape(6, 16).tolist(), target.reshape(6, 16).tolist()):
        pred = [z > 0 for z in zm]
        inter = sum(a and b for a, b in zip(pred, ym))
        union = sum(a or b for a, b in zip(pred, ym))
        ious.append(inter / union if union else 1.0)
    iou = sum((u - a) ** 2 for u, a in zip(iou_pred.flatten().tolist(), ious)) / 6
    expected = 20 * focal + dice + iou
    got = sam_gt([logits, iou_pred], target=target)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sam_gt_resizes_low_res_logits_to_the_target() -> None:
    logits = torch.zeros(1, 1, 2, 2)
    logits[..., 0, :] = 8.0  # top half foreground
    target = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    target[..., :2, :] = True
    good = sam_gt([logits, torch.ones(1, 1)], target=target)
    bad = sam_gt([-logits, torch.ones(1, 1)], target=target)
    assert good < bad
    assert get_loss("sam_gt").uses_target and not get_loss("sam_gt").uses_teacher


def test_mask_kd_by_hand_and_minimum_at_the_teacher() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, 2, 3, 3, generator=g)
    t = torch.randn(1, 2, 3, 3, generator=g)
    T = 2.0
    q = torch.sigmoid(t / T)
    p = torch.sigmoid(s / T)
    bce = (
        sum(
            -(qq * math.log(pp) + (1 - qq) * math.log(1 - pp))
            for pp, qq in zip(p.flatten().tolist(), q.flatten().tolist())
        )
        / p.numel()
    )
    expected = T * T * bce + 0.5 * _dice_by_hand(p, q)
    assert mask_kd(s, t, T=T, dice_weight=0.5).item() == pytest.approx(expected, rel=1e-5)
    # the gradient vanishes where the student's logits are the teacher's (BCE part)
    s2 = t.clone().requires_grad_(True)
    mask_kd(s2, t, dice_weight=0.0).backward()
    assert s2.grad.abs().max() < 1e-6


def test_mask_kd_shape_error() -> None:
    with pytest.raises(ValueError, match="agree on B and P"):
        mask_kd(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


def test_losses_compute_in_float32_under_bf16() -> None:
    s = torch.randn(1, 2, 4, 4).bfloat16()
    t = torch.randn(1, 2, 4, 4).bfloat16()
    assert mask_kd(s, t).dtype == torch.float32
    assert sam_gt([s, torch.rand(1, 2).bfloat16()], target=t > 0).dtype == torch.float32


def test_sam_gt_with_several_masks_backpropagates_only_the_best_one() -> None:
    """SAM's multimask rule: per prompt, the candidate of lowest focal+dice counts; the IoU head's
    error is over all candidates. Checked against a loop over prompts with the one-mask formula."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 3, 3, 4, 4, generator=g) * 2).requires_grad_()
    target = torch.rand(2, 3, 4, 4, generator=g) > 0.5
    iou_pred = torch.rand(2, 3, 3, generator=g)
    y = target.float()
    best, chosen, iou_terms = [], [], []
    for b in range(2):
        for p in range(3):
            per = []
            for m in range(3):
                z = logits[b, p, m].detach()
                per.append(
                    20 * _focal_by_hand(z, y[b, p]) + _dice_by_hand(torch.sigmoid(z)[None], y[b, p][None])
                )
                pred = z > 0
                ref = target[b, p]
                actual = float((pred & ref).sum()) / max(float((pred | ref).sum()), 1.0)
                iou_terms.append((float(iou_pred[b, p, m]) - actual) ** 2)
            best.append(min(per))
            chosen.append(per.index(min(per)))
    want = sum(best) / len(best) + sum(iou_terms) / len(iou_terms)
    got = sam_gt([logits, iou_pred], target=target)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    grads = logits.grad.flatten(-2).abs().sum(-1)  # (B, P, M)
    for k, m in enumerate(chosen):
        b, p = divmod(k, 3)
        assert grads[b, p, m] > 0 and all(grads[b, p, o] == 0 for o in range(3) if o != m)
    # one candidate per prompt: the same as the (B, P, h, w) form
    one = sam_gt([logits.detach()[:, :, :1], iou_pred[:, :, :1]], target=target)
    assert one.item() == pytest.approx(
        sam_gt([logits.detach()[:, :, 0], iou_pred[:, :, 0]], target=target).item(), rel=1e-6
    )


def test_mask_kd_on_several_masks_pairs_candidate_with_candidate() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 3, 4, 4, generator=g), torch.randn(2, 3, 3, 8, 8, generator=g)
    want = mask_kd(s.flatten(1, 2), t.flatten(1, 2), T=2.0)  # masks as prompts: the same numbers
    assert mask_kd(s, t, T=2.0).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="agree on B and P"):
        mask_kd(s, t[:, :, :2])
