"""Point-cloud distillation: PointDistiller's local distillation with importance reweighting.

``pointdistiller`` reads per-point features in the ``(B, N, C)`` layout (points first, channels last:
the layout of :mod:`protege.models.pointcloud`'s taps) of any backbone, student and teacher, for the
same ``N`` points. The classic terms compare with it unchanged: ``kd`` on the logits, ``fitnet`` on a
per-point tap with ``adapter: linear`` (a per-point channel projection), ``rkd`` on a pooled vector
(``pool`` or ``fc:in``).

The kNN helpers here are a few lines of their own: losses sit beside models in the layers and
import nothing from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import BuildContext, register_loss

__all__ = ["EdgeEncoder", "PointDistillerEncoders", "importance_scores", "local_graph", "pointdistiller"]

PAPER = (
    "Zhang, Dong, Tai & Ma, PointDistiller: Structured Knowledge Distillation Towards Efficient and "
    "Compact 3D Detection, CVPR 2023"
)
IMPORTANCE = ("max", "norm")
GRAPHS = ("teacher", "student")
EDGES = ("diff", "concat")
POOLS = ("max", "none")


def _check_per_point(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(
            "pointdistiller reads per-point features (B, N, C) (points first, channels last); got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}: tap a per-point layer (e.g. "
            "pointnet's mlp3, dgcnn's edge2, pointnet2's sa1), not a pooled vector or an image map"
        )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"pointdistiller: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must hold "
            "the same B clouds of the same N points in the (B, N, C) layout; a (B, C, N) tap (channels "
            "first) must be transposed, and both taps must come from layers at the same point resolution"
        )


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of ``x`` ``(B, N, C)`` at ``idx`` ``(B, ...)``: ``(B, ..., C)``."""
    flat = idx.reshape(idx.shape[0], -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


def importance_scores(teacher: Tensor, importance: str = "max") -> Tensor:
    """Each point's importance ``(B, N)`` from the teacher's per-point features ``(B, N, C)``:
    ``"max"``, the largest channel (what the authors' code uses for point-based detectors, a
    max-pool over channels), or ``"norm"``, the L2 norm of the feature."""
    if importance == "max":
        return teacher.amax(dim=-1)
    if importance == "norm":
        return teacher.norm(dim=-1)
    raise ValueError(f"pointdistiller: importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")


def local_graph(space: Tensor, centres: Tensor, k: int) -> Tensor:
    """The ``k`` nearest neighbours ``(B, M, k)`` in ``space`` ``(B, N, C)`` of the points ``centres``
    ``(B, M)`` (indices into ``N``), nearest first: each centre is its own first neighbour. No gradient
    flows through the choice."""
    with torch.no_grad():
        queries = _gather(space, centres)
        d = torch.cdist(queries.float(), space.float())
        return d.topk(k, dim=-1, largest=False).indices


def _edges(x: Tensor, centres: Tensor, graph: Tensor, edge: str) -> Tensor:
    """EdgeConv inputs ``(B, M, k, 2C)`` of the centres' local graphs: ``[x_j - x_i, x_i]`` (``diff``,
    DGCNN's edge function) or ``[x_j, x_i]`` (``concat``, the authors' released default)."""
    centre = _gather(x, centres).unsqueeze(2).expand(-1, -1, graph.shape[-1], -1)
    neighbours = _gather(x, graph)
    first = neighbours - centre if edge == "diff" else neighbours
    return torch.cat([first, centre], dim=-1)


class EdgeEncoder(nn.Module):
    """One side's local encoder: a shared ``Linear(2C → C') → BatchNorm → ReLU`` on edge features
    ``(..., 2C)`` (the authors' 1x1 Conv-BN-ReLU ``gcn_adapt`` modules)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return F.relu(self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape))


class PointDistillerEncoders(nn.Module):
    """PointDistiller's trainable parts: a student-side and a teacher-side :class:`EdgeEncoder`, both
    mapping edge features to ``channels`` (default: the student's per-point channels). Built from the
    first batch's taps (``pending`` until then), trained with the student, dropped at export."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        if channels is not None and channels < 1:
            raise ValueError(f"pointdistiller: channels must be a positive integer, got {channels}")
        self.channels = channels
        self.student_encoder: EdgeEncoder | None = None
        self.teacher_encoder: EdgeEncoder | None = None
        self.pending = True

    def build(self, student: Tensor, teacher: Tensor, context: BuildContext | None = None) -> None:
        """Size both encoders from the student's and the teacher's channel counts."""
        _check_per_point(student, teacher)
        out = self.channels or student.shape[-1]
        self.student_encoder = EdgeEncoder(2 * student.shape[-1], out)
        self.teacher_encoder = EdgeEncoder(2 * teacher.shape[-1], out)
        self.pending = False

    def forward(self, progress: float = 0.0) -> dict[str, Any]:
        if self.student_encoder is None:
            raise RuntimeError(
                "PointDistillerEncoders used before build(): call distiller.prepare(batch) first"
            )
        return {"student_encoder": self.student_encoder, "teacher_encoder": self.teacher_encoder}


@register_loss("pointdistiller", paper=PAPER, reads="point-features", state=PointDistillerEncoders)
def pointdistiller(
    student: Tensor,
    teacher: Tensor,
    k: int = 16,
    num_points: int = 256,
    tau: float = 1.0,
    reweight: bool = True,
    graph: str = "teacher",
    edge: str = "diff",
    importance: str = "max",
    pool: str = "max",
    *,
    student_encoder: Callable[[Tensor], Tensor],
    teacher_encoder: Callable[[Tensor], Tensor],
) -> Tensor:
    r"""PointDistiller's local distillation with reweighting (Zhang, Dong, Tai & Ma, CVPR 2023).

    With per-point features ``s_i`` (student) and ``t_i`` (teacher) of the same points of a cloud:

    1. importance ``a_i`` = the teacher's ``max_c t_ic`` (``importance="max"``, as the authors' code
       for point-based detectors) or ``||t_i||_2`` (``"norm"``); the ``M = min(num_points, N)`` points
       of highest ``a_i`` are distilled (the paper's top-N points/voxels);
    2. each selected point ``i`` gets its ``k`` nearest neighbours ``j in N(i)`` (itself included) in
       the teacher's feature space (``graph="teacher"``, the paper's) or the student's
       (``"student"``); both sides use that same graph;
    3. EdgeConv-style local encoding, on each side with its own trainable encoder
       ``h = ReLU(BN(W e))`` (:class:`PointDistillerEncoders`) of the edges
       ``e_ij = [x_j - x_i, x_i]`` (``edge="diff"``, DGCNN's) or ``[x_j, x_i]`` (``"concat"``),
       aggregated by a max over ``j`` (``pool="max"``, EdgeConv's) or kept per edge (``"none"``);
    4. the per-point loss ``l_i = mean((h_s(i) - h_t(i))^2)``, reweighted (``reweight=True``) by
       ``w = softmax(a / tau) * M`` over the cloud's selected points (mean weight 1), so that the
       crucial points dominate; ``reweight=False`` is the ablation row (``w = 1``):

        L = mean over clouds and selected points of w_i * l_i

    The authors' released code weights by voxel point counts (PointPillars, ``tau = 1e-2``) or by the
    teacher's max-pooled feature (PointRCNN, where the weight is computed but not applied); this is
    the paper's formula. ``tau`` is in the importance's units (the default 1 suits ReLU features of
    unit scale; a small ``tau`` puts all the weight on a few points). The teacher-side encoder trains
    too (its BatchNorm keeps it from collapsing onto the student's).

    Shapes: ``(B, N, C_s)`` and ``(B, N, C_t)``; ``k <= N``.
    """
    _check_per_point(student, teacher)
    n = teacher.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pointdistiller: k={k} neighbours need clouds of at least k points, got {n}")
    for name, value, allowed in (("graph", graph, GRAPHS), ("edge", edge, EDGES), ("pool", pool, POOLS)):
        if value not in allowed:
            raise ValueError(f"pointdistiller: {name} must be one of {', '.join(allowed)}, got {value!r}")
    if tau <= 0:
        raise ValueError(f"pointdistiller: tau must be > 0, got {tau}")
    if num_points < 1:
        raise ValueError(f"pointdistiller: num_points must be >= 1, got {num_points}")
    m = min(int(num_points), n)
    scores = importance_scores(teacher, importance)
    top = scores.topk(m, dim=-1).indices  # (B, M)
    neighbours = local_graph(teacher if graph == "teacher" else student, top, k)
    hs = student_encoder(_edges(student, top, neighbours, edge))
    ht = teacher_encoder(_edges(teacher, top, neighbours, edge))
    if pool == "max":
        hs, ht = hs.amax(dim=2), ht.amax(dim=2)
    per_point = (hs - ht).pow(2).flatten(2).mean(-1)  # (B, M)
    if reweight:
        weights = torch.softmax(torch.gather(scores, 1, top) / tau, dim=-1) * m
        per_point = per_point * weights.detach()
    return per_point.mean()
