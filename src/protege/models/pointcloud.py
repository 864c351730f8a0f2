"""Point-cloud backbones: PointNet, DGCNN (EdgeConv) and a PointNet++-style set-abstraction net.

Everything is plain PyTorch (kNN, farthest-point sampling and grouping included), so no compiled
extension is needed. Each family takes ``width`` (a channel multiplier: ``width=0.25`` is the 4x
narrower student of the same design) and ``head``: ``"cls"`` (a class per cloud) or ``"parts"``
(a part label per point, as in ShapeNet-Part segmentation).

**Input**: ``(B, N, C)`` float points, ``C >= 3``: ``x, y, z`` first, then any per-point features
(normals, colour). A list of ``(N, C)`` clouds is stacked when they have the same ``N`` (else a
:class:`~protege.errors.ProtegeError`: resample them to a fixed ``N``, see
:func:`protege.data.pointcloud.resample`). NaN/inf coordinates, fewer points than a layer's ``k``
and other malformed inputs are refused with a :class:`~protege.errors.ProtegeError`.

**Output**: ``(B, num_classes)`` logits (``head="cls"``) or ``(B, N, num_classes)`` per-point
logits (``head="parts"``; ``num_classes`` is then the number of part labels).

**Tap layout**: every per-point feature module outputs ``(B, N, C)`` (points first, channels last,
like a transformer's tokens), so the Distiller's ``linear`` adapter maps a student's per-point
features onto the teacher's channels point by point, and the ``pointdistiller`` loss reads them as
they are. ``feature_modules`` lists them shallow to deep:

- ``pointnet`` (Qi et al., CVPR 2017, without the T-Nets): ``mlp1 … mlp5`` (shared per-point MLP,
  64-64-64-128-1024 channels at ``width=1``), ``pool`` (global max, ``(B, 1024)``), ``head``, ``fc``.
- ``dgcnn`` (Wang et al., TOG 2019): ``edge1 … edge4`` (EdgeConv on a kNN graph rebuilt in each
  layer's input feature space, ``k`` neighbours, 64-64-128-256), ``mlp`` (1024 on their
  concatenation), ``pool`` (max and mean, ``(B, 2048)``), ``head``, ``fc``.
- ``pointnet2`` (Qi et al., NeurIPS 2017, single-scale grouping): ``sa1`` (``N/4`` centroids by
  farthest-point sampling, ``k`` nearest neighbours each, 64-64-128), ``sa2`` (``N/16``,
  128-128-256), ``sa3`` (all points, 256-512-1024, ``(B, 1024)``), ``head``, ``fc``; with
  ``head="parts"`` feature propagation ``fp3 … fp1`` back to the ``N`` points (3-NN inverse-distance
  interpolation). ``sa1``/``sa2`` have fewer points than the input; farthest-point sampling starts at
  point 0 and depends on the coordinates only, so a teacher and a student of this family see the same
  centroids and their ``sa`` taps line up point by point. kNN grouping replaces the paper's ball query
  (a fixed neighbour count needs no radius tuned to the data's scale).

``pool:in`` or ``fc:in`` read one vector per cloud (for RKD); ``classifier_name`` is ``"fc"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ProtegeError

__all__ = [
    "DGCNN",
    "HEADS",
    "MODELS",
    "EdgeConv",
    "PointLinear",
    "PointNet",
    "PointNet2",
    "SetAbstraction",
    "as_points",
    "farthest_point_sample",
    "gather_points",
    "knn",
    "square_distance",
]

HEADS = ("cls", "parts")


# --------------------------------------------------------------------------- geometry


def square_distance(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(B, S, M)`` between ``a`` ``(B, S, C)`` and ``b`` ``(B, M, C)``."""
    d = -2.0 * a @ b.transpose(1, 2)
    d = d + (a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(1)
    return d.clamp_min(0.0)


def knn(query: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices ``(B, S, k)`` of the ``k`` points of ``points`` ``(B, N, C)`` nearest to each row of
    ``query`` ``(B, S, C)``, nearest first (a query that is one of the points finds itself first)."""
    if k > points.shape[1]:
        raise ProtegeError(
            f"kNN with k={k} needs at least {k} points per cloud, got {points.shape[1]}; use more points "
            "or a smaller k"
        )
    return square_distance(query, points).topk(k, dim=-1, largest=False).indices


def gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` ``(B, N, C)`` rows picked by ``idx`` ``(B, ...)``: ``(B, ..., C)``."""
    b = x.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


def farthest_point_sample(xyz: Tensor, m: int) -> Tensor:
    """Indices ``(B, m)`` of ``m`` points of ``xyz`` ``(B, N, 3)`` chosen by farthest-point sampling:
    point 0 first, then repeatedly the point farthest from those chosen (deterministic)."""
    b, n, _ = xyz.shape
    if not 1 <= m <= n:
        raise ProtegeError(f"farthest-point sampling of {m} points from clouds of {n} points")
    idx = torch.zeros(b, m, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), device=xyz.device, dtype=xyz.dtype)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(1, m):
        centre = xyz[rows, last].unsqueeze(1)
        dist = torch.minimum(dist, ((xyz - centre) ** 2).sum(-1))
        last = dist.argmax(-1)
        idx[:, i] = last
    return idx


def as_points(points: Any, in_chans: int, min_points: int, model: str) -> Tensor:
    """``points`` as one ``(B, N, C)`` tensor, checked (module docstring: bad input is refused)."""
    if isinstance(points, (list, tuple)):
        sizes = sorted({int(p.shape[0]) for p in points if isinstance(p, Tensor) and p.dim() == 2})
        if not points or not all(isinstance(p, Tensor) and p.dim() == 2 for p in points):
            raise ProtegeError(f"{model}: a list of point clouds must hold (N, C) tensors")
        if len(sizes) > 1:
            raise ProtegeError(
                f"{model}: the clouds of this batch have different numbers of points ({sizes[0]} … "
                f"{sizes[-1]}) and no padding mask is supported; resample each to a fixed N "
                "(protege.data.pointcloud.resample)"
            )
        points = torch.stack(list(points))
    if not isinstance(points, Tensor) or points.dim() != 3:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ProtegeError(f"{model}: expected points (B, N, C), got {shape}")
    if points.shape[-1] != in_chans:
        hint = " (channels-first (B, C, N)? transpose it to (B, N, C))" if points.shape[1] == in_chans else ""
        raise ProtegeError(
            f"{model}: expected {in_chans} values per point (x, y, z first), got points "
            f"{tuple(points.shape)}{hint}"
        )
    if points.shape[1] < min_points:
        raise ProtegeError(
            f"{model}: clouds of {points.shape[1]} points are fewer than the {min_points} this model "
            "needs (its kNN's k or its sampling); use more points or a smaller k"
        )
    if not points.is_floating_point():
        points = points.float()
    if not torch.isfinite(points).all():
        raise ProtegeError(
            f"{model}: the point cloud holds NaN or infinite values; clean or drop those points"
        )
    return points


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check(width: float, head: str, in_chans: int, num_classes: int, k: int | None = None) -> None:
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if in_chans < 3:
        raise ValueError(f"in_chans must be at least 3 (x, y, z), got {in_chans}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


# --------------------------------------------------------------------------- layers


class PointLinear(nn.Module):
    """A shared per-point layer on channels-last tensors ``(B, N, C)`` or ``(B, N, K, C)``:
    ``Linear`` → BatchNorm over the channels (statistics over every point) → activation."""

    def __init__(self, cin: int, cout: int, act: str | None = "relu") -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)
        self.act: nn.Module = {
            "relu": nn.ReLU(),
            "leaky": nn.LeakyReLU(0.2),
            None: nn.Identity(),
        }[act]

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        y = self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)
        return self.act(y)


class MaxPool(nn.Module):
    """Global pooling over the points of ``(B, N, C)``: max (and mean, concatenated, with ``mean``)."""

    def __init__(self, mean: bool = False) -> None:
        super().__init__()
        self.mean = mean

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.max(dim=1).values
        return torch.cat([pooled, x.mean(dim=1)], dim=-1) if self.mean else pooled


class HeadNorm(nn.BatchNorm1d):
    """BatchNorm of the classification head's ``(B, C)`` vectors; a training batch of one cloud (the
    last, short batch of an epoch) is normalised with the running statistics instead of failing."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def _classifier(cin: int, width: float, dropout: float, act: str) -> nn.Sequential:
    """The two hidden layers of the papers' classification heads (512, 256 at width 1)."""
    h1, h2 = _ch(512, width), _ch(256, width)
    relu: Callable[[], nn.Module] = (lambda: nn.LeakyReLU(0.2)) if act == "leaky" else nn.ReLU
    return nn.Sequential(
        nn.Linear(cin, h1, bias=False),
        HeadNorm(h1),
        relu(),
        nn.Dropout(dropout),
        nn.Linear(h1, h2, bias=False),
        HeadNorm(h2),
        relu(),
        nn.Dropout(dropout),
    )


def _seg_head(cin: int, width: float, dropout: float, act: str) -> nn.Sequential:
    """Per-point layers of the part-segmentation heads (256, 128 at width 1)."""
    return nn.Sequential(
        PointLinear(cin, _ch(256, width), act),
        nn.Dropout(dropout),
        PointLinear(_ch(256, width), _ch(128, width), act),
    )


def _expand(global_feat: Tensor, n: int) -> Tensor:
    return global_feat.unsqueeze(1).expand(-1, n, -1)


# --------------------------------------------------------------------------- PointNet


class PointNet(nn.Module):
    """PointNet (Qi, Su, Mo & Guibas, CVPR 2017) without the input/feature T-Nets.

    Args:
        num_classes: classes (``head="cls"``) or part labels (``head="parts"``).
        in_chans: values per point (x, y, z first).
        width: channel multiplier.
        head: ``"cls"`` or ``"parts"``.
        dropout: dropout of the head's hidden layers.
    """

    def __init__(
        self,
        num_classes: int = 40,
        in_chans: int = 3,
        width: float = 1.0,
        head: str = "cls",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check(width, head, in_chans, num_classes)
        self.in_chans, self.head_kind = in_chans, head
        chans = [_ch(c, width) for c in (64, 64, 64, 128, 1024)]
        cin = in_chans
        for i, c in enumerate(chans, 1):
            setattr(self, f"mlp{i}", PointLinear(cin, c))
            cin = c
        self.feature_modules = [f"mlp{i}" for i in range(1, 6)]
        self.pool = MaxPool()
        if head == "cls":
            self.head = _classifier(chans[-1], width, dropout, "relu")
            self.fc = nn.Linear(_ch(256, width), num_classes)
        else:
            self.head = _seg_head(chans[1] + chans[2] + chans[-1], width, dropout, "relu")
            self.fc = nn.Linear(_ch(128, width), num_classes)
        self.classifier_name = "fc"

    def forward(self, points: Tensor) -> Tensor:
        x = as_points(points, self.in_chans, 1, "pointnet")
        f1 = self.mlp1(x)
        f2 = self.mlp2(f1)
        f3 = self.mlp3(f2)
        f5 = self.mlp5(self.mlp4(f3))
        g = self.pool(f5)
        if self.head_kind == "cls":
            return self.fc(self.head(g))
        return self.fc(self.head(torch.cat([f2, f3, _expand(g, x.shape[1])], dim=-1)))


# --------------------------------------------------------------------------- DGCNN


class EdgeConv(nn.Module):
    """EdgeConv (Wang et al., "Dynamic Graph CNN for Learning on Point Clouds", TOG 2019): for each
    point ``i`` and its ``k`` nearest neighbours ``j`` in the input's feature space,
    ``x'_i = max_j h([x_j - x_i, x_i])`` with ``h`` a shared Linear-BN-LeakyReLU. ``(B, N, C)`` in and
    out; the neighbours come from ``graph`` (default: the input itself)."""

    def __init__(self, cin: int, cout: int, k: int = 20) -> None:
        super().__init__()
        self.k = k
        self.mlp = PointLinear(2 * cin, cout, "leaky")

    def forward(self, x: Tensor, graph: Tensor | None = None) -> Tensor:
        idx = knn(x if graph is None else graph, x if graph is None else graph, self.k)
        neighbours = gather_points(x, idx)  # (B, N, k, C)
        centre = x.unsqueeze(2).expand_as(neighbours)
        return self.mlp(torch.cat([neighbours - centre, centre], dim=-1)).max(dim=2).values


class DGCNN(nn.Module):
    """DGCNN (Wang, Sun, Liu, Sarma, Bronstein & Solomon, TOG 2019): four EdgeConv layers on dynamic
    kNN graphs, a shared layer on their concatenation, max + mean pooling.

    Args:
        num_classes, in_chans, width, head, dropout: as :class:`PointNet`.
        k: neighbours of each point's graph (20 in the paper).
    """

    def __init__(
        self,
        num_classes: int = 40,
        in_chans: int = 3,
        width: float = 1.0,
        head: str = "cls",
        dropout: float = 0.5,
        k: int = 20,
    ) -> None:
        super().__init__()
        _check(width, head, in_chans, num_classes, k)
        self.in_chans, self.head_kind, self.k = in_chans, head, k
        chans = [_ch(c, width) for c in (64, 64, 128, 256)]
        cin = in_chans
        for i, c in enumerate(chans, 1):
            setattr(self, f"edge{i}", EdgeConv(cin, c, k))
            cin = c
        emb = _ch(1024, width)
        self.mlp = PointLinear(sum(chans), emb, "leaky")
        self.feature_modules = ["edge1", "edge2", "edge3", "edge4", "mlp"]
        self.pool = MaxPool(mean=True)
        if head == "cls":
            self.head = _classifier(2 * emb, width, dropout, "leaky")
            self.fc = nn.Linear(_ch(256, width), num_classes)
        else:
            self.head = _seg_head(sum(chans[:3]) + 2 * emb, width, dropout, "leaky")
            self.fc = nn.Linear(_ch(128, width), num_classes)
        self.classifier_name = "fc"

    def forward(self, points: Tensor) -> Tensor:
        x = as_points(points, self.in_chans, self.k, "dgcnn")
        f1 = self.edge1(x)
        f2 = self.edge2(f1)
        f3 = self.edge3(f2)
        f4 = self.edge4(f3)
        g = self.pool(self.mlp(torch.cat([f1, f2, f3, f4], dim=-1)))
        if self.head_kind == "cls":
            return self.fc(self.head(g))
        return self.fc(self.head(torch.cat([f1, f2, f3, _expand(g, x.shape[1])], dim=-1)))


# --------------------------------------------------------------------------- PointNet++


class SetAbstraction(nn.Module):
    """PointNet++ set abstraction: ``npoint`` centroids by farthest-point sampling, each grouped with
    its ``k`` nearest points (coordinates relative to the centroid, plus their features), a shared
    MLP and a max over the group. ``npoint=None`` groups all points around the origin (the global
    layer). Returns ``(features (B, S, C'), centroids (B, S, 3))``: features first, so a tap reads them."""

    def __init__(self, npoint: int | None, k: int, cin: int, chans: Sequence[int]) -> None:
        super().__init__()
        self.npoint, self.k = npoint, k
        layers: list[nn.Module] = []
        for c in chans:
            layers.append(PointLinear(cin, c))
            cin = c
        self.mlp = nn.Sequential(*layers)

    def forward(self, xyz: Tensor, feats: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.npoint is None:
            grouped = xyz if feats is None else torch.cat([xyz, feats], dim=-1)
            return self.mlp(grouped).max(dim=1).values.unsqueeze(1), xyz.new_zeros(xyz.shape[0], 1, 3)
        centres = gather_points(xyz, farthest_point_sample(xyz, self.npoint))
        idx = knn(centres, xyz, self.k)
        rel = gather_points(xyz, idx) - centres.unsqueeze(2)
        grouped = rel if feats is None else torch.cat([rel, gather_points(feats, idx)], dim=-1)
        return self.mlp(grouped).max(dim=2).values, centres


class FeaturePropagation(nn.Module):
    """PointNet++ feature propagation: features of ``(B, S, C)`` centroids interpolated onto ``N``
    points (inverse-distance weights of the 3 nearest), concatenated with the points' skip features,
    a shared MLP."""

    def __init__(self, cin: int, chans: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c in chans:
            layers.append(PointLinear(cin, c))
            cin = c
        self.mlp = nn.Sequential(*layers)

    def forward(self, xyz: Tensor, centres: Tensor, skip: Tensor | None, feats: Tensor) -> Tensor:
        if centres.shape[1] == 1:
            up = feats.expand(-1, xyz.shape[1], -1)
        else:
            d = square_distance(xyz, centres)
            near = d.topk(min(3, centres.shape[1]), dim=-1, largest=False)
            w = 1.0 / (near.values + 1e-8)
            w = w / w.sum(-1, keepdim=True)
            up = (gather_points(feats, near.indices) * w.unsqueeze(-1)).sum(2)
        return self.mlp(up if skip is None else torch.cat([up, skip], dim=-1))


class PointNet2(nn.Module):
    """PointNet++ with single-scale grouping (Qi, Yi, Su & Guibas, NeurIPS 2017), kNN groups.

    Args:
        num_classes, in_chans, width, head, dropout: as :class:`PointNet`.
        k: points per group.
        ratios: the fraction of the input's points each of the two sampling layers keeps (1/4, 1/4).
    """

    def __init__(
        self,
        num_classes: int = 40,
        in_chans: int = 3,
        width: float = 1.0,
        head: str = "cls",
        dropout: float = 0.5,
        k: int = 16,
        ratios: Sequence[float] = (0.25, 0.25),
    ) -> None:
        super().__init__()
        _check(width, head, in_chans, num_classes, k)
        if len(ratios) != 2 or not all(0 < r <= 1 for r in ratios):
            raise ValueError(f"ratios must be two fractions in (0, 1], got {ratios!r}")
        self.in_chans, self.head_kind, self.k, self.ratios = (
            in_chans,
            head,
            k,
            tuple(float(r) for r in ratios),
        )
        c1 = [_ch(c, width) for c in (64, 64, 128)]
        c2 = [_ch(c, width) for c in (128, 128, 256)]
        c3 = [_ch(c, width) for c in (256, 512, 1024)]
        extra = in_chans - 3
        self.sa1 = SetAbstraction(1, k, 3 + extra, c1)  # npoint set per forward from N
        self.sa2 = SetAbstraction(1, k, 3 + c1[-1], c2)
        self.sa3 = SetAbstraction(None, k, 3 + c2[-1], c3)
        self.feature_modules = ["sa1", "sa2"]
        self.pool = nn.Flatten()
        if head == "cls":
            self.head = _classifier(c3[-1], width, dropout, "relu")
            self.fc = nn.Linear(_ch(256, width), num_classes)
        else:
            f3 = [_ch(c, width) for c in (256, 256)]
            f2 = [_ch(c, width) for c in (256, 128)]
            f1 = [_ch(c, width) for c in (128, 128)]
            self.fp3 = FeaturePropagation(c3[-1] + c2[-1], f3)
            self.fp2 = FeaturePropagation(f3[-1] + c1[-1], f2)
            self.fp1 = FeaturePropagation(f2[-1] + in_chans, f1)
            self.feature_modules += ["fp3", "fp2", "fp1"]
            self.head = nn.Sequential(nn.Dropout(dropout))
            self.fc = nn.Linear(f1[-1], num_classes)
        self.classifier_name = "fc"

    def sizes(self, n: int) -> tuple[int, int]:
        """Centroids of ``sa1`` and ``sa2`` for clouds of ``n`` points."""
        s1 = max(1, int(n * self.ratios[0]))
        return s1, max(1, int(s1 * self.ratios[1]))

    def forward(self, points: Tensor) -> Tensor:
        x = as_points(points, self.in_chans, self.k, "pointnet2")
        s1, s2 = self.sizes(x.shape[1])
        # the centroid counts follow the input's N (a cloud of any size >= k works)
        self.sa1.npoint, self.sa2.npoint = s1, s2
        self.sa2.k = min(self.k, s1)
        xyz, feats = x[..., :3], (x[..., 3:] if self.in_chans > 3 else None)
        l1, xyz1 = self.sa1(xyz, feats)
        l2, xyz2 = self.sa2(xyz1, l1)
        l3, xyz3 = self.sa3(xyz2, l2)
        if self.head_kind == "cls":
            return self.fc(self.head(self.pool(l3)))
        u2 = self.fp3(xyz2, xyz3, l2, l3)
        u1 = self.fp2(xyz1, xyz2, l1, u2)
        u0 = self.fp1(xyz, xyz1, x, u1)
        return self.fc(self.head(u0))


MODELS: dict[str, Callable[..., nn.Module]] = {"pointnet": PointNet, "dgcnn": DGCNN, "pointnet2": PointNet2}
