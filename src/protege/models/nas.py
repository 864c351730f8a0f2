"""Model families of the student-search spaces: CIFAR ResNets of any depth per stage, NAS-Bench-201.

Both are in the zoo (:func:`protege.models.build_model`): ``resnet_depth`` (:class:`DepthResNet`)
and ``nb201`` (:class:`NB201Net`), so a run config written by ``protege search`` builds its winner
in any process. What a candidate is and how it mutates is :mod:`protege.search.spaces`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ProtegeError
from .cifar import BasicBlock, CifarResNet, _init_weights

__all__ = ["NB201_EDGES", "NB201_OPS", "DepthResNet", "NB201Cell", "NB201Net", "nb201_string", "parse_nb201"]


class DepthResNet(CifarResNet):
    """A CIFAR ResNet with its own number of BasicBlocks in each stage.

    ``DepthResNet([3, 3, 3], widths)`` is ``CifarResNet(20, widths)`` with the same module names,
    so taps (``layer1..layer3``, ``fc``) and checkpoints carry over.

    Args:
        depths: BasicBlocks of each of the three stages (each >= 1).
        widths: ``[stem, stage1, stage2, stage3]`` channels.
        num_classes: classifier outputs.
        in_chans: input image channels.
    """

    def __init__(
        self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 100, in_chans: int = 3
    ) -> None:
        depths, widths = [int(d) for d in depths], [int(w) for w in widths]
        if len(depths) != 3 or min(depths) < 1:
            raise ProtegeError(f"depths must be 3 block counts >= 1 (one per stage), got {depths}")
        if len(widths) != 4 or min(widths) < 1:
            raise ProtegeError(f"widths must be 4 positive channel counts [stem, s1, s2, s3], got {widths}")
        super().__init__(8, widths, num_classes=num_classes, in_chans=in_chans)  # one block per stage
        cin = widths[0]
        for i, (n, width, stride) in enumerate(zip(depths, widths[1:], (1, 2, 2), strict=True)):
            blocks = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        _init_weights(self)
        self.depths = depths


def _build_resnet_depth(
    num_classes: int = 100,
    in_chans: int = 3,
    depths: Sequence[int] = (3, 3, 3),
    widths: Sequence[int] = (16, 16, 32, 64),
) -> nn.Module:
    """``depths``: BasicBlocks per stage; ``widths``: stem and stage channels (ResNet-20: 16, 16, 32, 64)."""
    return DepthResNet(depths, widths, num_classes=num_classes, in_chans=in_chans)


#: The five NAS-Bench-201 operations, in the benchmark's order.
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
#: The cell's edges ``(from, to)`` in the order of the NB201 string ``|op~0|+|op~0|op~1|+|...|``.
NB201_EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))


def parse_nb201(cell: str) -> tuple[str, ...]:
    """The six operations of a NAS-Bench-201 cell string, in :data:`NB201_EDGES` order.

    ``"|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"``
    lists, for nodes 1, 2 and 3, the operation on the edge from each earlier node ``~i``.
    """
    example = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    nodes = cell.strip().split("+") if isinstance(cell, str) else []
    ops: list[str] = []
    if len(nodes) != 3:
        raise ProtegeError(f"NB201 cell {cell!r} must list 3 nodes separated by '+', e.g. {example}")
    for j, node in enumerate(nodes, start=1):
        edges = [e for e in node.strip().strip("|").split("|") if e]
        if len(edges) != j:
            raise ProtegeError(f"NB201 cell {cell!r}: node {j} needs {j} incoming edges, e.g. {example}")
        for i, edge in enumerate(edges):
            op, _, src = edge.partition("~")
            if op not in NB201_OPS or src != str(i):
                raise ProtegeError(
                    f"NB201 cell {cell!r}: bad edge {edge!r}; write OP~{i} with OP one of {', '.join(NB201_OPS)}"
                )
            ops.append(op)
    return tuple(ops)


def nb201_string(ops: Sequence[str]) -> str:
    return "+".join(
        "|" + "|".join(f"{ops[k]}~{i}" for k, (i, j) in enumerate(NB201_EDGES) if j == node) + "|"
        for node in (1, 2, 3)
    )


class _ReLUConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            nn.ReLU(), nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)
        )


class _Zero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mul(0.0)


def _nb201_op(name: str, channels: int) -> nn.Module:
    if name == "none":
        return _Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return _ReLUConvBN(channels, channels, 1)
    if name == "nor_conv_3x3":
        return _ReLUConvBN(channels, channels, 3)
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class NB201Cell(nn.Module):
    """The NAS-Bench-201 cell: node 0 is the input, node ``j = Σ_{i<j} op_{i→j}(node i)``, output node 3.

    ``edges[f"{i}_{j}"]`` is the operation on the edge from node ``i`` to node ``j``.
    """

    def __init__(self, ops: Sequence[str], channels: int) -> None:
        super().__init__()
        self.ops = tuple(ops)
        self.edges = nn.ModuleDict(
            {f"{i}_{j}": _nb201_op(op, channels) for op, (i, j) in zip(self.ops, NB201_EDGES, strict=True)}
        )

    def forward(self, x: Tensor) -> Tensor:
        nodes = [x]
        for j in (1, 2, 3):
            nodes.append(sum(self.edges[f"{i}_{j}"](nodes[i]) for i in range(j)))
        return nodes[3]


class _ResidualReduction(nn.Module):
    """NAS-Bench-201's reduction block: ReLU-Conv3x3(stride 2)-BN, ReLU-Conv3x3-BN, plus a
    2x2 average-pool + 1x1 conv shortcut. The pooling rounds up (``ceil_mode``) like the stride-2
    convolution does, so odd sizes (7 -> 4) match; even sizes are unchanged."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_a = _ReLUConvBN(cin, cout, 3, stride=2)
        self.conv_b = _ReLUConvBN(cout, cout, 3)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(2, stride=2, ceil_mode=True), nn.Conv2d(cin, cout, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201Net(nn.Module):
    """The NAS-Bench-201 macro skeleton around one cell.

    Stem (Conv3x3-BN), then ``stages`` stages of ``cells_per_stage`` cells, the channels doubling
    in a residual reduction block between stages, then BN-ReLU (``lastact``), global average
    pooling and the classifier. The benchmark uses ``channels=16, cells_per_stage=5, stages=3``.

    Args:
        cell: the cell as an NB201 string (see :func:`parse_nb201`).
        channels: channels of the first stage.
        cells_per_stage: cells in each stage.
        stages: number of stages.
        num_classes: classifier outputs.
        in_chans: input image channels.
    """

    def __init__(
        self,
        cell: str,
        channels: int = 16,
        cells_per_stage: int = 5,
        stages: int = 3,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if channels < 1 or cells_per_stage < 1 or stages < 1:
            raise ProtegeError(
                f"NB201 skeleton needs channels, cells_per_stage and stages >= 1, got "
                f"{channels}, {cells_per_stage}, {stages}"
            )
        self.cell = cell
        ops = parse_nb201(cell)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )
        c = channels
        for s in range(stages):
            if s > 0:
                setattr(self, f"reduce{s}", _ResidualReduction(c, 2 * c))
                c *= 2
            setattr(
                self, f"stage{s + 1}", nn.Sequential(*(NB201Cell(ops, c) for _ in range(cells_per_stage)))
            )
        self.num_stages = stages
        self.lastact = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        self.feature_modules = [f"stage{s + 1}" for s in range(stages - 1)] + ["lastact"]
        self.classifier_name = "classifier"

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for s in range(self.num_stages):
            if s > 0:
                x = getattr(self, f"reduce{s}")(x)
            x = getattr(self, f"stage{s + 1}")(x)
        x = self.lastact(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _build_nb201(
    num_classes: int = 10,
    in_chans: int = 3,
    cell: str = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    channels: int = 16,
    cells_per_stage: int = 5,
    stages: int = 3,
) -> nn.Module:
    """``cell``: an NB201 cell string; ``channels``, ``cells_per_stage``, ``stages``: the skeleton."""
    return NB201Net(cell, channels, cells_per_stage, stages, num_classes=num_classes, in_chans=in_chans)


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet_depth": _build_resnet_depth, "nb201": _build_nb201}
