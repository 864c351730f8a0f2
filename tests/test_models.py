"""Model zoo, name resolution and weight loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from protege.errors import ProtegeError
from protege.metrics.cost import count_params as count_parameters
from protege.models import build_model, cifar, list_models, load_weights, small

# CIFAR-100 parameter counts from the KD literature (CRD / RepDistiller, mdistiller tables).
LITERATURE_PARAMS = {
    "resnet8": 0.08e6,
    "resnet14": 0.18e6,
    "resnet20": 0.28e6,  # 0.27M is the CIFAR-10 (10-class) figure of He et al.
    "resnet32": 0.47e6,
    "resnet44": 0.67e6,
    "resnet56": 0.86e6,
    "resnet110": 1.73e6,
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "wrn_16_1": 0.18e6,
    "wrn_16_2": 0.70e6,
    "wrn_40_1": 0.57e6,
    "wrn_40_2": 2.26e6,
    "vgg8": 3.96e6,
    "vgg11": 9.28e6,
    "vgg13": 9.46e6,
    "mobilenetv2": 0.81e6,
    "shufflenetv1": 0.95e6,
    "shufflenetv2": 1.36e6,
}

pytestmark = pytest.mark.usefixtures("one_thread")


BIG = {"resnet110", "resnet32x4", "vgg11", "vgg13", "wrn_40_2"}
ZOO = sorted({**cifar.MODELS, **small.MODELS})


@pytest.mark.parametrize("name", sorted(LITERATURE_PARAMS))
def test_param_counts_match_literature(name: str) -> None:
    n = count_parameters(build_model(name, num_classes=100))
    # 2%, or half of the last printed digit for the smallest models (0.08M, 0.18M)
    assert abs(n - LITERATURE_PARAMS[name]) <= max(0.02 * LITERATURE_PARAMS[name], 0.005e6), n


def test_small_param_counts() -> None:
    assert count_parameters(build_model("lenet5", num_classes=10, in_chans=1)) == 61_706  # LeCun 1998
    assert count_parameters(build_model("mlp_s", num_classes=10, in_chans=1)) == 784 * 128 + 128 + 1290
    frozen = build_model("cnn_m", num_classes=10, in_chans=1)
    total = count_parameters(frozen)
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert count_parameters(frozen) == total > 0


def _run_with_taps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    seen: dict[str, torch.Tensor] = {}

    def tap(path: str):
        return lambda _m, _i, out: seen.__setitem__(path, out)

    handles = [model.get_submodule(p).register_forward_hook(tap(p)) for p in model.feature_modules]
    try:
        return model(x), seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ZOO)
def test_zoo_forward_and_taps(name: str) -> None:
    torch.manual_seed(0)
    for shape in [(2, 3, 32, 32), (2, 1, 28, 28)]:
        model = build_model(name, num_classes=10, in_chans=shape[1])
        # CIFAR shape: inference; MNIST shape: a training step (big models: inference only)
        train = shape[1] == 1 and name not in BIG
        model.train(train)
        with torch.set_grad_enabled(train):
            out, seen = _run_with_taps(model, torch.randn(*shape))
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()
        assert len(model.feature_modules) >= (1 if name in small.MODELS else 3)
        assert list(seen) == model.feature_modules  # every tap fires once, in forward order
        head = model.get_submodule(model.classifier_name)
        assert isinstance(head, nn.Linear) and head.out_features == 10
        if train:
            out.sum().backward()
            first = next(p for p in model.parameters() if p.dim() > 1)  # the stem reached
            assert first.grad is not None and first.grad.abs().sum() > 0


def test_cifar_stage_resolutions() -> None:
    model = build_model("resnet20", num_classes=100).eval()
    shapes = []
    hooks = [
        model.get_submodule(p).register_forward_hook(lambda _m, _i, o: shapes.append(tuple(o.shape)))
        for p in model.feature_modules
    ]
    model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]


def test_mnist_example_from_docs() -> None:
    out = build_model("resnet20", num_classes=10, in_chans=1)(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_aliases_and_kwargs() -> None:
    assert count_parameters(build_model("mobile_half", num_classes=100)) == count_parameters(
        build_model("MobileNetV2_half", num_classes=100)
    )
    mlp = build_model("mlp", num_classes=10, in_chans=1, hidden_sizes=(64, 32, 16))
    assert mlp.feature_modules == ["layer1", "layer2", "layer3"]
    wide = build_model("mobilenetv2", num_classes=100, width_mult=1.0)
    assert count_parameters(wide) > 2 * count_parameters(build_model("mobilenetv2", num_classes=100))
    with pytest.raises(ProtegeError, match="does not accept"):
        build_model("resnet20", num_classes=10, width=3)


def test_timm_and_torchvision() -> None:
    timm_model = build_model("mobilenetv3_small_050", num_classes=7, in_chans=1).eval()
    assert timm_model(torch.randn(1, 1, 64, 64)).shape == (1, 7)
    head = timm_model.get_submodule(timm_model.classifier_name)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    for path in timm_model.feature_modules:
        timm_model.get_submodule(path)

    tv = build_model("torchvision:resnet18", num_classes=5, in_chans=1).eval()
    assert tv.conv1.in_channels == 1 and tv.conv1.out_channels == 64 and tv.conv1.kernel_size == (7, 7)
    assert tv(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    assert tv.classifier_name == "fc" and tv.feature_modules == ["layer1", "layer2", "layer3", "layer4"]

    # the zoo shadows the ImageNet VGG; prefixes reach the others
    assert count_parameters(build_model("vgg8", num_classes=100)) < 4e6
    assert "timm:vgg13" in list_models("vgg13")
    assert "vgg13" in list_models("vgg13", external=False)


def test_list_models() -> None:
    zoo = list_models(external=False)
    # the search spaces' builders and the point-cloud backbones
    assert set(zoo) == set(ZOO) | {"nb201", "resnet_depth", "pointnet", "dgcnn", "pointnet2"}
    assert list_models("wrn_*_2", external=False) == ["wrn_16_2", "wrn_40_2"]
    everything = list_models("resnet")
    assert everything[: len(list_models("resnet", external=False))] == list_models("resnet", external=False)
    assert "resnet50" in everything


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ProtegeError, match="resnet20"):
        build_model("resnt20", num_classes=10)
    with pytest.raises(ProtegeError, match="unknown timm model"):
        build_model("timm:resnet20", num_classes=10)
    with pytest.raises(ProtegeError, match="pretrained"):
        build_model("resnet18", pretrained=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "dir", "wrapped"])
def test_weights_roundtrip(tmp_path, fmt: str) -> None:
    torch.manual_seed(0)
    src = build_model("resnet8", num_classes=10)
    src(torch.randn(8, 3, 32, 32))  # move BN running stats off their defaults
    src.eval()
    state = src.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    elif fmt == "dir":
        path = tmp_path / "ckpt"
        path.mkdir()
        save_file(state, str(path / "model.safetensors"))
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel prefix
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": {f"student.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    rebuilt = build_model("resnet8", num_classes=10, weights=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), rebuilt(x))


def test_reference_checkpoint_key_names_load(tmp_path) -> None:
    """WRN / ShuffleNet / MobileNetV2 checkpoints of the reference implementations use other names."""
    model = build_model("wrn_16_1", num_classes=10)
    legacy = {}
    for key, value in model.state_dict().items():
        if key.startswith("layer"):
            key = f"block{key[5]}.layer" + key[6:]
        key = key.replace(".shortcut.", ".convShortcut.")
        if key.startswith("bn."):
            key = "bn1." + key[3:]
        legacy[key] = value.clone() + 1 if value.is_floating_point() else value
    assert "block2.layer.0.convShortcut.weight" in legacy and "bn1.weight" in legacy
    path = tmp_path / "wrn.pth"
    torch.save({"model": legacy}, path)
    loaded = build_model("wrn_16_1", num_classes=10, weights=path)
    assert torch.equal(loaded.layer2[0].shortcut.weight, legacy["block2.layer.0.convShortcut.weight"])
    model.load_state_dict(legacy)  # plain load_state_dict works too (pre-hook)

    mnv2 = build_model("mobilenetv2", num_classes=10)
    legacy = {
        k.replace("classifier.", "classifier.0.").replace("stage1.", "blocks.0."): v
        for k, v in mnv2.state_dict().items()
    }
    mnv2.load_state_dict(legacy)


def test_wrong_weights_are_explained(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(build_model("resnet8", num_classes=100).state_dict(), str(path))
    with pytest.raises(ProtegeError, match="shape") as err:
        build_model("resnet8", num_classes=10, weights=path)
    assert "num_classes=100" in str(err.value) and "fc.weight" in str(err.value)

    with pytest.raises(ProtegeError, match="missing") as err:
        build_model("resnet14", num_classes=100, weights=path)
    assert "resnet14" in str(err.value)

    with pytest.raises(ProtegeError, match="weights file not found"):
        build_model("resnet8", weights=tmp_path / "nope.safetensors")

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ProtegeError, match="could not read"):
        load_weights(build_model("resnet8"), bad)


def test_wrong_model_name_points_to_the_fitting_one(tmp_path) -> None:
    path = tmp_path / "teacher.pt"
    torch.save({"model": build_model("wrn_16_2", num_classes=100).state_dict()}, path)
    with pytest.raises(ProtegeError, match=r"wrn_16_2 \(num_classes=100\)"):
        build_model("wrn_16_1", num_classes=100, weights=path)
