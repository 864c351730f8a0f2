"""ReviewKD: distillation via knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021).

The student's stage features, shallow to deep, are *reviewed* from the deepest down: each stage is
fused with the already-fused deeper ones by an attention-based fusion (ABF) block, and every fused
map is compared with the teacher's feature of the same stage by the hierarchical context loss
(HCL, :func:`hcl`). The term reads *lists* of taps, the same number for student and teacher::

    {loss: reviewkd, weight: 5.0, warmup: 20,
     student: [layer1, layer2, layer3, "fc:in"], teacher: [layer1, layer2, layer3, "fc:in"]}

The fusion blocks are the trainable state of the term (:class:`ReviewFusion`, built from the tap
shapes by :meth:`protege.Distiller.prepare`); they train with the student and are dropped at
export. Per-sample vectors ``(N, D)`` (the pooled feature a classifier sees) are treated as
``(N, D, 1, 1)`` maps, as the official code does with the pooled feature.

Differences from the official code (``dvlab-research/ReviewKD``, mdistiller's port), all forced by
reading features with hooks instead of editing the models: the teacher's stage features are
whatever its taps return (post-activation for the zoo's ResNets), where the official code takes
them *before* the last ReLU of each stage; maps need not be square (sizes are handled per axis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import BuildContext, register_loss

__all__ = ["ABF", "ReviewFusion", "as_map", "hcl", "reviewkd"]


# --------------------------------------------------------------------------- helpers


def as_map(x: Tensor) -> Tensor:
    """A feature as a 4-D map: ``(N, C, H, W)`` unchanged, a vector ``(N, D)`` as ``(N, D, 1, 1)``."""
    return x[:, :, None, None] if x.dim() == 2 else x


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_lists(student: Any, teacher: Any | None, who: str) -> None:
    """Two equally long, non-empty lists of (N, C, H, W) or (N, D) tensors with one batch size."""
    lists = [("student", student)] + ([("teacher", teacher)] if teacher is not None else [])
    for side, feats in lists:
        if isinstance(feats, Tensor) or not isinstance(feats, (list, tuple)) or not feats:
            raise ValueError(
                f"{who}: the {side} must be a non-empty list of features, shallow to deep (got "
                f"{_shape(feats)}); make the term read a list of taps, e.g. student: [layer1, layer2, "
                "layer3, 'fc:in'] and the same number of teacher taps"
            )
        for i, f in enumerate(feats):
            if not isinstance(f, Tensor) or f.dim() not in (2, 4):
                raise ValueError(
                    f"{who}: {side} feature {i} has shape {_shape(f)}; expected a map (N, C, H, W) "
                    "or a vector (N, D)"
                )
    if teacher is None:
        return
    if len(student) != len(teacher):
        raise ValueError(
            f"{who}: {len(student)} student features {[tuple(f.shape) for f in student]} but "
            f"{len(teacher)} teacher features {[tuple(f.shape) for f in teacher]}; give one teacher "
            "tap per student tap, stage by stage"
        )
    n = student[0].shape[0]
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape[0] != n or t.shape[0] != n:
            raise ValueError(
                f"{who}: stage {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must have "
                f"the batch size N={n} of every other stage"
            )


# --------------------------------------------------------------------------- HCL


def hcl(
    student_features: Sequence[Tensor], teacher_features: Sequence[Tensor], levels: Sequence[int] = (4, 2, 1)
) -> Tensor:
    r"""Hierarchical context loss of ReviewKD: MSE at full size and at coarser pooled sizes, per stage.

    Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. For each stage
    ``i`` with maps ``F_s, F_t`` of shape (N, C, H, W), ``P_l`` adaptive average pooling to
    ``l x l``, and the levels ``l_1, l_2, ...`` of ``levels`` smaller than the map
    (``l < min(H, W)``; a level the size of the map would repeat the full-size term):

        L_i = ( MSE(F_s, F_t) + sum_k 2^-k * MSE(P_{l_k}(F_s), P_{l_k}(F_t)) ) / (1 + sum_k 2^-k)
        L   = sum_i L_i

    with ``MSE`` the mean over all elements and ``k = 1, 2, ...`` counting only the levels used:
    for an 8x8 map and the default levels (4, 2, 1) the weights are 1, 1/2, 1/4, 1/8 (sum 1.875),
    for a 4x4 map 1 (full), 1/2 (2x2), 1/4 (1x1), for a 1x1 map only the full-size term. This is
    the official code's rule (the paper describes the pyramid with levels 4, 2, 1 without the
    weights). The stages are summed, not averaged, as in the official code, so the term weight
    of published recipes (5 for resnet32x4 -> resnet8x4) carries over.

    Shapes: two equally long lists of student and teacher features of equal shapes, stage by
    stage; vectors ``(N, D)`` count as ``(N, D, 1, 1)`` maps.
    """
    _check_lists(student_features, teacher_features, "hcl")
    if any(int(level) != level or level < 1 for level in levels):
        raise ValueError(f"hcl: levels must be positive integers (pooled sizes), got {list(levels)}")
    total = student_features[0].new_zeros(())
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        fs, ft = as_map(fs), as_map(ft)
        if fs.shape != ft.shape:
            raise ValueError(
                f"hcl: stage {i}: student {tuple(fs.shape)} and teacher {tuple(ft.shape)} must have the "
                "same shape (ReviewKD's fusion blocks map the student to the teacher's shapes)"
            )
        loss = F.mse_loss(fs, ft)
        weight, weights = 1.0, 1.0
        for level in levels:
            if level >= min(fs.shape[-2:]):
                continue
            weight /= 2.0
            pooled = (int(level), int(level))
            loss = loss + weight * F.mse_loss(
                F.adaptive_avg_pool2d(fs, pooled), F.adaptive_avg_pool2d(ft, pooled)
            )
            weights += weight
        total = total + loss / weights
    return total


# --------------------------------------------------------------------------- fusion (the state)


class ABF(nn.Module):
    """Attention-based fusion block of one stage of ReviewKD.

    ``conv1`` (1x1 conv ``C_s -> mid`` + BN) transforms the student feature ``x``; for every stage
    but the deepest, the fused feature ``y`` of the next deeper stage is upsampled (nearest) to
    ``x``'s size and the two are mixed by two attention maps ``a = sigmoid(conv1x1([x, y]))``:
    ``x <- x * a_0 + y * a_1``. The result, resized (nearest) to the teacher's size when that
    differs, is both handed to the next shallower stage and mapped by ``conv2`` (3x3 conv
    ``mid -> C_t`` + BN) to the output compared with the teacher. Initialisation as in the
    official code (Kaiming-uniform with ``a = 1`` for the two convolutions).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(output for the teacher, fused feature for the next shallower stage)``."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing stage needs the deeper stage's fused feature")
            y = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            att = self.att_conv(torch.cat([x, y], dim=1))
            x = x * att[:, 0:1] + y * att[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """ReviewKD's trainable part: one :class:`ABF` per stage, run from the deepest stage down.

    Built by :meth:`build` from one batch of student and teacher features (lists, shallow to deep):
    stage ``i`` maps ``C_s[i]`` student channels to the teacher's ``C_t[i]`` at the teacher's
    spatial size, through ``mid_channels`` channels shared by all stages (they are added during
    fusion).

    Args:
        mid_channels: width of the fused features. ``None`` (default): ``min(512, C_s)`` of the
            deepest student feature, the official rule (256 for resnet8x4, 128 for wrn_16_2).

    ``forward(progress)`` returns ``{"fusion": self.fuse}``, the keyword :func:`reviewkd` expects.
    """

    def __init__(self, mid_channels: int | None = None) -> None:
        super().__init__()
        if mid_channels is not None and int(mid_channels) < 1:
            raise ValueError(f"ReviewFusion: mid_channels must be a positive integer, got {mid_channels}")
        self.mid_channels = None if mid_channels is None else int(mid_channels)
        self.abfs = nn.ModuleList()
        self.pending = True

    def build(self, student: Any, teacher: Any, context: BuildContext | None = None) -> None:
        """Create the fusion blocks for these student/teacher feature lists (shapes only are read)."""
        _check_lists(student, teacher, "reviewkd")
        s_maps = [as_map(f) for f in student]
        t_maps = [as_map(f) for f in teacher]
        mid = self.mid_channels or min(512, s_maps[-1].shape[1])
        last = len(s_maps) - 1
        self.abfs = nn.ModuleList(
            ABF(s.shape[1], mid, t.shape[1], fuse=i < last) for i, (s, t) in enumerate(zip(s_maps, t_maps))
        )
        self.mid_channels = mid
        self.pending = False

    def fuse(self, student: Sequence[Tensor], out_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """The fused student features, shallow to deep, the ``i``-th of spatial size ``out_sizes[i]``."""
        if self.pending:
            raise ValueError("reviewkd: the fusion blocks are not built yet; call distiller.prepare(batch)")
        _check_lists(student, None, "reviewkd")
        maps = [as_map(f) for f in student]
        if len(maps) != len(self.abfs) or len(out_sizes) != len(self.abfs):
            raise ValueError(
                f"reviewkd: the fusion was built for {len(self.abfs)} stages, got {len(maps)} student "
                f"features {[tuple(f.shape) for f in maps]}"
            )
        for i, (f, abf) in enumerate(zip(maps, self.abfs)):
            expected = abf.conv1[0].in_channels
            if f.shape[1] != expected:
                raise ValueError(
                    f"reviewkd: student feature {i} has shape {tuple(f.shape)}, but its fusion block was "
                    f"built for {expected} channels"
                )
        outputs: list[Tensor] = [maps[0]] * len(maps)
        residual = None
        for i in reversed(range(len(maps))):
            outputs[i], residual = self.abfs[i](maps[i], residual, out_sizes[i])
        return outputs

    def forward(self, progress: float = 0.0) -> dict[str, Callable[..., list[Tensor]]]:
        return {"fusion": self.fuse}

    def extra_repr(self) -> str:
        return "pending: built on distiller.prepare" if self.pending else f"mid_channels={self.mid_channels}"


# --------------------------------------------------------------------------- the loss


@register_loss(
    "reviewkd",
    paper="Chen, Liu, Zhao & Jia, Distilling Knowledge via Knowledge Review, CVPR 2021",
    reads="feature-list",
    state=ReviewFusion,
)
def reviewkd(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    *,
    fusion: Callable[[Sequence[Tensor], Sequence[Sequence[int]]], list[Tensor]],
    levels: Sequence[int] = (4, 2, 1),
) -> Tensor:
    r"""ReviewKD: review the student's stages deep to shallow, fuse them, and match the teacher's (HCL).

    Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. With the student
    features ``F_s^1 .. F_s^n`` (shallow to deep), the fused features are computed from the deepest
    stage down, ``Z^n = ABF_n(F_s^n)``, ``Z^i = ABF_i(F_s^i, Z^{i+1})`` (:class:`ABF`), and

        L = sum_i HCL(conv2_i(Z^i), F_t^i)

    with the hierarchical context loss of :func:`hcl` (levels 4, 2, 1). ``fusion`` is the term's
    :class:`ReviewFusion` (its ``fuse`` method), supplied by the term's state; the paper's
    schedule ramps the term weight up linearly over the first 20 epochs (the term's ``warmup``).

    Shapes: two equally long lists (the term's student and teacher taps, shallow to deep) of maps
    ``(N, C, H, W)`` or vectors ``(N, D)``, the same N everywhere. Channels and sizes may differ
    between student and teacher: the fusion maps each stage to the teacher's.
    """
    _check_lists(student_features, teacher_features, "reviewkd")
    t_maps = [as_map(t) for t in teacher_features]
    fused = fusion(student_features, [tuple(t.shape[-2:]) for t in t_maps])
    return hcl(fused, t_maps, levels=levels)
