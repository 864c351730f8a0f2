"""Adapters between mismatched student and teacher taps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import protege as pg
from protege.core.adapters import build_adapter, tokens_to_map
from protege.engine.checkpoint import checkpoint_dir
from protege.engine.options import TrainConfig
from protege.errors import ProtegeError


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [
        ((2, 16, 8, 8), (2, 32, 8, 8), "conv_bn"),
        ((2, 16, 8, 8), (2, 32, 4, 4), "auto"),  # pooled down
        ((2, 16, 4, 4), (2, 32, 8, 8), "conv_bn_relu"),  # interpolated up
        ((2, 16, 8, 8), (2, 24, 8, 8), "conv1x1"),
        ((2, 64), (2, 128), "auto"),
        ((2, 16, 4, 4), (2, 10), "auto"),  # global average pool, then linear
        ((2, 17, 32), (2, 64, 4, 4), "auto"),  # ViT tokens (class token + 4×4) onto a CNN map
        ((2, 16, 8, 8), (2, 16, 48), "auto"),  # CNN map onto 4×4 tokens
        ((2, 5, 32), (2, 5, 48), "linear"),
    ],
)
def test_adapter_output_matches_teacher_shape(student, teacher, kind):
    adapter = build_adapter(student, teacher, kind)
    out = adapter(torch.randn(*student))
    assert out.shape == teacher
    assert any(p.requires_grad for p in adapter.parameters())


def test_same_shape_auto_is_identity_and_mismatch_errors_name_both():
    assert isinstance(build_adapter((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)
    with pytest.raises(ProtegeError, match=r"student \[2, 5, 32\] onto teacher \[2, 6, 48\].*term 'x'"):
        build_adapter((2, 5, 32), (2, 6, 48), "auto", " (term 'x')")
    with pytest.raises(ProtegeError, match="convolutional adapter"):
        build_adapter((2, 8, 4, 4), (2, 16, 4, 4), "linear")
    with pytest.raises(ProtegeError, match="unknown adapter"):
        build_adapter((2, 8), (2, 16), "mlp")


def test_tokens_to_map_drops_class_token():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    grid = tokens_to_map(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 1])  # token 0 (class) dropped


def test_fitnet_between_resnets_builds_and_trains_its_regressor():
    torch.manual_seed(0)
    teacher = pg.build_model("resnet32x4", num_classes=10)
    student = pg.build_model("resnet8", num_classes=10)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    d = pg.Distiller(student, teacher, [pg.ce(), pg.fitnet("layer3", "layer3", 100.0)])
    with pytest.raises(ProtegeError, match="prepare"):
        d(batch)
    running_mean = student.bn1.running_mean.clone() if hasattr(student, "bn1") else None
    d.prepare(batch)
    if running_mean is not None:  # prepare leaves the student's BN statistics alone
        assert torch.equal(running_mean, student.bn1.running_mean)
    adapter = d.terms[1].adapter
    conv = next(m for m in adapter.modules() if isinstance(m, nn.Conv2d))
    assert (conv.in_channels, conv.out_channels) == (64, 256)
    assert any(k.startswith("terms.1.adapter") for k in d.state_dict())
    assert {id(p) for p in adapter.parameters()} <= {id(p) for p in d.parameters()}
    _, losses = d(batch)
    losses["fitnet:layer3"].backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_fit_builds_adapter_checkpoints_and_resumes_it(tmp_path):
    data = pg.load_data("digits")

    def make():
        torch.manual_seed(0)
        teacher = pg.build_model("mlp", num_classes=10, in_chans=1, input_size=8)
        student = pg.build_model("mlp_s", num_classes=10, in_chans=1, input_size=8)
        terms = [pg.ce(), pg.term("fitnet", 1.0, student="layer1", teacher="layer1", adapter="auto")]
        return pg.Distiller(student, teacher, terms)

    cfg = TrainConfig(epochs=2, progress=False, measure_cost=False, optim={"lr": 0.1})
    loaders = (pg.make_loader(data.train, 64, True), pg.make_loader(data.val, 256, False))
    first = make()
    pg.fit(first, *loaders, cfg, tmp_path / "run", stop_after_epochs=1)
    saved = load_file(checkpoint_dir(tmp_path / "run", "last") / "distiller.safetensors")
    assert saved["terms.1.adapter.weight"].shape == (256, 128)  # mlp layer1 256 ← mlp_s layer1 128
    second = make()
    pg.fit(second, *loaders, cfg, tmp_path / "run", resume=True)
    straight = make()
    pg.fit(straight, *loaders, cfg, tmp_path / "straight")
    # the resumed adapter continued from the checkpoint: it ends where two straight epochs end
    assert torch.allclose(second.terms[1].adapter.weight, straight.terms[1].adapter.weight, atol=1e-6)
    assert not torch.allclose(second.terms[1].adapter.weight, saved["terms.1.adapter.weight"])


def test_feature_config_runs_end_to_end(tmp_path):
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "mnist-fitnet-at.yaml"
    overrides = [
        "epochs=1",
        "teacher.weights=null",
        f"output_dir={tmp_path}",
        "progress=false",
        "measure_cost=false",
    ]
    summary = pg.run(pg.load_config(path, overrides), mode="distill")
    final = summary["final"]
    for key in ("train/ce", "train/kd", "train/fitnet:layer2", "train/at:layer1"):
        assert torch.isfinite(torch.tensor(final[key])) and final[key] > 0, key
    extra = load_file(checkpoint_dir(tmp_path / "mnist-fitnet-at", "last") / "distiller.safetensors")
    assert extra["terms.2.adapter.0.weight"].shape == (64, 16, 1, 1)
