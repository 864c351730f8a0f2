"""The CIFAR knowledge-distillation model zoo.

These are the teacher and student networks of the CIFAR-100 tables in the KD literature
(CRD / RepDistiller, mdistiller, DKD, ...), under the names those tables use, written
from the papers' descriptions. Parameter counts (100 classes) match the published ones.

Every constructor has the signature ``(num_classes: int = 100, in_chans: int = 3, **kwargs)``.
All models end with adaptive average pooling, so any input of at least 28x28 works
(CIFAR 32x32, MNIST 28x28 with ``in_chans=1``, Tiny-ImageNet 64x64, ...). ReLUs are never
in-place, so a forward hook sees exactly what the module returned.

Each model carries two attributes used by the distillation engine (which takes features with
forward hooks; the models themselves return logits only):

* ``feature_modules: list[str]`` -- paths (for ``model.get_submodule``) of the stage outputs
  that feature-based KD methods tap, shallow to deep;
* ``classifier_name: str`` -- path of the final ``nn.Linear``. The penultimate embedding (what
  CRD/RKD/... call the feature) is that layer's input: take it with a forward *pre*-hook.

Submodule names
---------------
``resnet8 ... resnet110, resnet8x4, resnet32x4`` (CIFAR ResNet, BasicBlocks, 3 stages):
    ``conv1, bn1, relu`` (stem), ``layer1, layer2, layer3`` (stages, strides 1/2/2, outputs
    after the final ReLU of each stage), ``avgpool``, ``fc`` (classifier).
    Blocks: ``layerK.i.{conv1,bn1,conv2,bn2,downsample}``. Widths [16, 16, 32, 64]
    (``x4``: [32, 64, 128, 256]); depth = 6n + 2 with n blocks per stage.
``wrn_D_W`` (pre-activation WideResNet, depth D = 6n + 4, widen factor W):
    ``conv1``, ``layer1, layer2, layer3`` (outputs are pre-activation, as in the WRN papers),
    ``bn, relu`` (final BN-ReLU), ``avgpool``, ``fc``.
``vgg8, vgg11, vgg13`` (CIFAR VGG with BatchNorm, no hidden FC layers):
    ``block0 ... block4`` (each a Sequential of conv-BN-ReLU; the output is post-ReLU and
    ``blockK[-2]`` is the last BN, i.e. the pre-activation), ``pool0 ... pool3`` (2x2 max
    pools; ``pool3`` is only applied when the map entering it is at least 8x8, i.e. for
    inputs of 64 px and more, as in RepDistiller), ``pool4`` (adaptive average), ``classifier``.
``mobilenetv2`` (= ``mobilenetv2_half``; width 0.5, expansion 6: the network the KD tables
call "MobileNetV2", RepDistiller's ``mobile_half``, 0.81M parameters; pass ``width_mult=1.0``
for the full-width one):
    ``conv1`` (stride-2 conv-BN-ReLU stem), ``stage1 ... stage7`` (inverted-residual groups),
    ``conv2`` (1x1 conv-BN-ReLU to 1280 channels), ``avgpool``, ``classifier``.
    Taps: ``stage2, stage3, stage5, stage7`` (the resolution changes).
``shufflenetv1`` (groups 3, widths 240/480/960, blocks 4/8/4) and ``shufflenetv2``
(1x, widths 116/232/464, blocks 3/7/3, 1024-channel head):
    ``conv1, bn1, relu`` (1x1 stem), ``layer1, layer2, layer3``, (v2 only: ``conv2, bn2,
    relu2``), ``avgpool``, ``fc``.

The classifier is called ``fc`` everywhere except VGG and MobileNetV2 (``classifier``), as in
the reference implementations; always use ``model.classifier_name``.

Checkpoints of the RepDistiller / mdistiller reference implementations load directly
(``{"model": state_dict}`` files): the few keys they name differently (``block1.layer.0`` in
WRN, ``linear`` in ShuffleNets, ``blocks.0`` / ``classifier.0`` in MobileNetV2) are renamed by a
load-state-dict pre-hook, see :meth:`_ZooModel.translate_legacy_keys`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "VGG",
    "BasicBlock",
    "CifarResNet",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "WideResNet",
]


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit/zero BatchNorm, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class _ZooModel(nn.Module):
    """Base class: tap metadata plus renaming of reference-implementation checkpoint keys."""

    #: ``(regex, replacement)`` pairs applied to state-dict keys (relative to this module).
    legacy_key_renames: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = ()

    feature_modules: list[str]
    classifier_name: str

    def __init__(self) -> None:
        super().__init__()
        if self.legacy_key_renames:
            self.register_load_state_dict_pre_hook(_legacy_pre_hook)

    @classmethod
    def translate_legacy_keys(cls, state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Return ``state_dict`` with reference-implementation key names renamed to ours.

        Only keys under ``prefix`` are considered, and only if one of them matches the first
        rename pattern (the mark of a reference checkpoint); otherwise the keys are unchanged.
        """
        out = dict(state_dict)
        if not cls.legacy_key_renames:
            return out
        marker = re.compile(cls.legacy_key_renames[0][0])
        if not any(k.startswith(prefix) and marker.search(k[len(prefix) :]) for k in out):
            return out
        renamed: dict[str, Any] = {}
        for key, value in out.items():
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                for pattern, repl in cls.legacy_key_renames:
                    rest = re.sub(pattern, repl, rest)
                key = prefix + rest
            renamed[key] = value
        return renamed


def _legacy_pre_hook(module: _ZooModel, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    renamed = module.translate_legacy_keys(state_dict, prefix)
    if list(renamed) != list(state_dict):
        state_dict.clear()
        state_dict.update(renamed)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------- ResNet (CIFAR)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(_ZooModel):
    """The CIFAR ResNet of He et al. (2016), 3 stages of ``(depth - 2) / 6`` BasicBlocks.

    Args:
        depth: total depth, ``6n + 2``.
        widths: ``[stem, stage1, stage2, stage3]`` channels.
        num_classes: classifier outputs.
        in_chans: input image channels.
    """

    def __init__(self, depth: int, widths: list[int], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        stages = []
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True)):
            blocks = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
            setattr(self, f"layer{i + 1}", stages[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_modules = ["layer1", "layer2", "layer3"]
        self.classifier_name = "fc"
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- WideResNet


class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut: nn.Module | None = None
        if cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        # with a projection the shortcut starts from the activated input, otherwise from x
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(_ZooModel):
    """WideResNet-``depth``-``widen`` of Zagoruyko & Komodakis (2016), no dropout.

    Args:
        depth: ``6n + 4``.
        widen: width multiplier of the stages (16/32/64 channels times ``widen``).
        num_classes: classifier outputs.
        in_chans: input image channels.
    """

    legacy_key_renames = (
        (r"^block(\d)\.layer\.", r"layer\1."),
        (r"\.convShortcut\.", ".shortcut."),
        (r"^bn1\.", "bn."),
    )

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(in_chans, widths[0])
        cin = widths[0]
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True)):
            blocks = [_WideBlock(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_modules = ["layer1", "layer2", "layer3"]
        self.classifier_name = "fc"
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- VGG (CIFAR, BN)


class VGG(_ZooModel):
    """CIFAR VGG with BatchNorm: five conv blocks, global average pooling, one linear layer.

    Args:
        cfg: output channels of the convolutions of each of the five blocks.
        num_classes: classifier outputs.
        in_chans: input image channels.
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        cin = in_chans
        for i, widths in enumerate(cfg):
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(cin, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            setattr(self, f"block{i}", nn.Sequential(*layers))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.feature_modules = [f"block{i}" for i in range(5)]
        self.classifier_name = "classifier"
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if x.shape[-1] >= 8:  # 64 px and larger inputs; CIFAR keeps 4x4 for the last block
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(torch.flatten(self.pool4(x), 1))


_VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


# --------------------------------------------------------------------------- MobileNetV2 (CIFAR)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class _InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shapes allow.

    The expansion convolution is kept even for expansion ratio 1, as in the KD reference model.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(_ZooModel):
    """The CIFAR MobileNetV2 of the KD literature (stride-2 stem, total stride 16).

    Args:
        num_classes: classifier outputs.
        in_chans: input image channels.
        width_mult: channel multiplier; 0.5 is the literature's "MobileNetV2".
        expansion: expansion ratio ``t`` of all but the first group.
    """

    legacy_key_renames = (
        (r"^blocks\.(\d)\.", lambda m: f"stage{int(m.group(1)) + 1}."),
        (r"^classifier\.0\.", "classifier."),
    )

    def __init__(
        self, num_classes: int = 100, in_chans: int = 3, width_mult: float = 0.5, expansion: int = 6
    ) -> None:
        super().__init__()
        settings = [  # expansion, channels, blocks, stride
            (1, 16, 1, 1),
            (expansion, 24, 2, 1),
            (expansion, 32, 3, 2),
            (expansion, 64, 4, 2),
            (expansion, 96, 3, 1),
            (expansion, 160, 3, 2),
            (expansion, 320, 1, 1),
        ]
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, cin, 3, stride=2)
        for i, (t, c, n, s) in enumerate(settings):
            cout = int(c * width_mult)
            blocks = [
                _InvertedResidual(cin if j == 0 else cout, cout, s if j == 0 else 1, t) for j in range(n)
            ]
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
            cin = cout
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        self.feature_modules = ["stage2", "stage3", "stage5", "stage7"]
        self.classifier_name = "classifier"
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for i in range(1, 8):
            x = getattr(self, f"stage{i}")(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- ShuffleNets


def _channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleV1Block(nn.Module):
    """ShuffleNet unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; add or concat shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 4
        # the first unit sees the 24-channel stem, too few channels to group
        self.first_groups = 1 if cin == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = _channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(_ZooModel):
    """CIFAR ShuffleNet (v1) with a 1x1 stem and three stride-2 stages.

    Args:
        num_classes: classifier outputs.
        in_chans: input image channels.
        widths: output channels of the three stages.
        blocks: units per stage.
        groups: groups of the pointwise convolutions.
    """

    legacy_key_renames = ((r"^linear\.", "fc."),)

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin = 24
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            # the first (stride-2) unit concatenates its pooled input, so it adds width - cin channels
            units = [_ShuffleV1Block(cin, width - cin, 2, groups)]
            units += [_ShuffleV1Block(width, width, 1, groups) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.feature_modules = ["layer1", "layer2", "layer3"]
        self.classifier_name = "fc"
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _ShuffleV2Block(nn.Module):
    """ShuffleNetV2 basic unit: split channels, transform one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        keep, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return _channel_shuffle(torch.cat([keep, out], 1), 2)


class _ShuffleV2Down(nn.Module):
    """ShuffleNetV2 stride-2 unit: two branches on the full input, concat, shuffle."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        # left: depthwise 3x3 (stride 2) -> 1x1
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1x1 -> depthwise 3x3 (stride 2) -> 1x1
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(_ZooModel):
    """CIFAR ShuffleNetV2 (1x) with a 1x1 stem, three stride-2 stages and a 1x1 head conv.

    Args:
        num_classes: classifier outputs.
        in_chans: input image channels.
        widths: output channels of the three stages and of the head convolution.
        blocks: basic units per stage (after its stride-2 unit).
    """

    legacy_key_renames = ((r"^linear\.", "fc."),)

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin = 24
        for i, (width, n) in enumerate(zip(widths[:3], blocks, strict=True)):
            units = [_ShuffleV2Down(cin, width)] + [_ShuffleV2Block(width) for _ in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
            cin = width
        self.conv2 = nn.Conv2d(cin, widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_modules = ["layer1", "layer2", "layer3"]
        self.classifier_name = "fc"
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- registry


def _resnet(depth: int, widths: list[int]) -> Callable[..., nn.Module]:
    def build(num_classes: int = 100, in_chans: int = 3, widths: list[int] = widths) -> nn.Module:
        """``widths``: channels of the stem and the three stages (e.g. ``[8, 8, 16, 32]`` for a
        half-width net scaled to small data)."""
        return CifarResNet(depth, list(widths), num_classes=num_classes, in_chans=in_chans)

    return build


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 100, in_chans: int = 3) -> nn.Module:
        return WideResNet(depth, widen, num_classes=num_classes, in_chans=in_chans)

    return build


def _vgg(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 100, in_chans: int = 3) -> nn.Module:
        return VGG(_VGG_CFG[name], num_classes=num_classes, in_chans=in_chans)

    return build


_THIN = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]

#: name -> constructor ``(num_classes=100, in_chans=3, **kwargs) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": _resnet(d, _THIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8, _X4),
    "resnet32x4": _resnet(32, _X4),
    **{f"wrn_{d}_{w}": _wrn(d, w) for d in (16, 40) for w in (1, 2)},
    **{name: _vgg(name) for name in _VGG_CFG},
    "mobilenetv2": MobileNetV2,
    "mobilenetv2_half": MobileNetV2,
    "shufflenetv1": ShuffleNetV1,
    "shufflenetv2": ShuffleNetV2,
}

#: Names the reference implementations use, resolved to ours (not listed by ``list_models``).
ALIASES: dict[str, str] = {
    "mobile_half": "mobilenetv2",
    "shufflev1": "shufflenetv1",
    "shufflev2": "shufflenetv2",
}
