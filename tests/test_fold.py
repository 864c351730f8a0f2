"""Folding a frozen teacher's BatchNorms into its convolutions keeps its function and its taps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import protege as pg
from protege.core.fold import fold_batchnorm
from protege.models import build_model


def _frozen(model: nn.Module) -> nn.Module:
    model.eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_folded_resnet_computes_the_same_function():
    torch.manual_seed(0)
    model = _frozen(build_model("resnet20", num_classes=10, in_chans=1))
    reference = copy.deepcopy(model)
    x = torch.randn(4, 1, 16, 16)
    folded = fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    assert len(folded) == n_bn  # every BN of a CIFAR ResNet follows its own conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_taps_keep_their_values_and_tapped_convs_are_not_folded():
    torch.manual_seed(0)
    model = _frozen(build_model("resnet8", num_classes=10, in_chans=1))
    reference = copy.deepcopy(model)
    keep = ["layer2.0.conv1", "layer3"]
    folded = fold_batchnorm(model, keep=keep)
    assert "layer2.0.bn1" not in folded and "layer1.0.bn1" in folded
    assert isinstance(model.layer2[0].bn1, nn.BatchNorm2d)
    x = torch.randn(3, 1, 16, 16)
    paths = ["layer2.0.conv1", "layer3", "layer1.0.bn1"]  # a tap on a folded BN reads the same
    with pg.Taps(model, paths) as a, pg.Taps(reference, paths) as b, torch.no_grad():
        model(x), reference(x)
        for p in paths:
            torch.testing.assert_close(a.outputs[p], b.outputs[p], atol=1e-5, rtol=1e-5)


def test_shared_or_multi_use_convs_are_left_alone_and_untraceable_models_unchanged():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv's output has a second user

    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace

    for cls in (Shared, Dynamic):
        model = _frozen(cls())
        assert fold_batchnorm(model) == []
        assert isinstance(model.bn, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="frozen"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))


def test_distiller_folds_only_when_asked():
    torch.manual_seed(0)
    teacher = _frozen(build_model("resnet8", num_classes=10, in_chans=1))
    untouched = copy.deepcopy(teacher)
    student = build_model("mlp_s", num_classes=10, in_chans=1, input_size=8)
    pg.Distiller(student, untouched, [pg.kd()])
    assert any(isinstance(m, nn.BatchNorm2d) for m in untouched.modules())  # the user's model is theirs
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    plain = pg.Distiller(student, copy.deepcopy(teacher), [pg.kd()])
    folded = pg.Distiller(student, teacher, [pg.kd()], fold_teacher_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    torch.testing.assert_close(folded((x, y))[1]["kd"], plain((x, y))[1]["kd"], atol=1e-5, rtol=1e-5)
