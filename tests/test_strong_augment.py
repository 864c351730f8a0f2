"""``data.transforms: strong`` (Hao et al., NeurIPS 2023, for the in-memory 1-channel sources): the
random transform is torchvision's RandomResizedCrop / RandomHorizontalFlip / RandomErasing on the
same draws, its replay from drawn parameters is exact, digits never flip, a teacher-output cache
stores its views and a distill run trains from them, and sources without it refuse it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cli_helpers import run_cli as _cli
from protege.caching import use_cache
from protege.config import load_config
from protege.data import TensorImageDataset, load_data
from protege.data.strong import CROP_RATIO, CROP_SCALE, ERASE_RATIO, ERASE_SCALE, TorchRng
from protege.data.views import replay_for
from protege.errors import ProtegeError

CROP_NAMES = ("Strong.top", "Strong.left", "Strong.height", "Strong.width")
ERASE_NAMES = ("Strong.on", "Strong.y", "Strong.x", "Strong.h", "Strong.w")


def _dataset(flip: bool, n: int = 6, size: int = 12) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, size, size, generator=g)
    return TensorImageDataset(images, torch.arange(n) % 3, fill=-0.4, strong=True, flip=flip)


def _torchvision(raw: torch.Tensor, flip: bool, fill: float, seed: int) -> torch.Tensor:
    """The strong recipe with torchvision's own transforms, drawing from torch seeded at ``seed``."""
    torch.manual_seed(seed)
    size = list(raw.shape[-2:])
    crop = v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True)
    x = crop.transform(raw, crop.make_params([raw]))
    if flip and torch.rand(1) < 0.5:  # v2.RandomHorizontalFlip(0.5)
        x = F.horizontal_flip(x)
    if torch.rand(1) < 0.25:  # v2.RandomErasing(0.25): the coin, then the box
        erase = v2.RandomErasing(p=1.0, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=fill)
        x = erase.transform(x, erase.make_params([x]))
    return x


@pytest.mark.parametrize("flip", [False, True])
def test_random_strong_view_equals_torchvision_and_its_replay(flip):
    ds = _dataset(flip)
    replay = replay_for(ds)
    assert replay.names == (*CROP_NAMES, *(("Strong.flip",) if flip else ()), *ERASE_NAMES)
    raw, _ = replay.raw(3)
    before = raw.clone()
    erased = flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        random_view, _ = ds[3]
        torch.manual_seed(seed)
        params = ds.augment.draw(raw, TorchRng())  # the draws __getitem__ makes
        assert torch.equal(replay.apply(raw, params), random_view)
        assert torch.equal(_torchvision(raw, flip, -0.4, seed), random_view)
        erased += params[-5]
        flipped += params[4] if flip else 0
    assert torch.equal(raw, before) and torch.equal(ds.images[3], before)  # erasing never writes back
    assert 0 < erased < 40 and (0 < flipped < 40 if flip else flipped == 0)


def test_replay_draws_from_a_seeded_generator_fit_int16_and_stay_in_the_image():
    ds = _dataset(flip=True, size=28)
    replay = replay_for(ds)
    raw, _ = replay.raw(0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        params, view = replay.draw(raw, rng)
        assert torch.equal(replay.apply(raw, params), view) and view.shape == raw.shape
        top, left, h, w, _flip, on, y, x, eh, ew = params
        assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 28
        assert 0.35 * 784 * 0.8 <= h * w <= 784  # area scale [0.35, 1], up to rounding
        if on:
            assert (
                0 <= y
                and y + eh <= 28
                and 0 <= x
                and x + ew <= 28
                and (view[:, y : y + eh, x : x + ew] == -0.4).all()
            )
        else:
            assert [y, x, eh, ew] == [0, 0, 0, 0]
        assert all(-(2**15) <= p < 2**15 for p in params)


def test_strong_and_shift_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), shift=2, strong=True)
    with pytest.raises(ValueError, match="strong=True"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), flip=True)


def test_digits_never_flip_and_fashion_mnist_does():
    digits = load_data("digits", transforms="strong")
    assert digits.options["transforms"] == "strong" and digits.train.strong and not digits.train.flip
    assert "Strong.flip" not in replay_for(digits.train).names
    assert not digits.val.strong and not digits.test.strong  # the train split only
    assert load_data("digits", transforms="augment").options["transforms"] == "augment"
    try:
        from protege.data import fashion_mnist as fm

        fm.read_arrays()
    except ProtegeError as e:
        pytest.skip(f"the Fashion-MNIST files are not here: {e}")
    fashion = load_data("fashion-mnist", transforms="strong", train_size=20, val_size=10, test_size=10)
    assert fashion.train.strong and fashion.train.flip and fashion.options["transforms"] == "strong"
    replay = replay_for(fashion.train)
    at = replay.names.index("Strong.flip")
    rng = np.random.default_rng(0)
    flips = [replay.draw(replay.raw(i % 20)[0], rng)[0][at] for i in range(40)]
    assert 0 < sum(flips) < 40


def test_sources_without_strong_refuse_it_naming_their_transforms(tmp_path):
    with pytest.raises(
        ProtegeError, match=r"'shifted-pool' does not support transforms 'strong'.*augment, auto, none"
    ):
        load_data("shifted-pool", transforms="strong")
    with pytest.raises(
        ProtegeError, match=r"(?s)only the in-memory sources digits, fashion-mnist, mnist5k.*cifar"
    ):
        load_data("imagefolder", root=str(tmp_path), transforms="strong")
    with pytest.raises(ProtegeError, match="did you mean: strong"):
        load_data("digits", transforms="strnog")


# -- a teacher-output cache of strong views, and a distill run from it ----------------------------


def _run_config(tmp_path: Path, teacher: Path, transforms: str) -> Path:
    cfg = {
        "name": "kd",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 128, "transforms": transforms},
        "teacher": {"model": "mlp", "kwargs": {"input_size": 8}, "weights": str(teacher)},
        "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
        "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}],
        "epochs": 1,
        "progress": False,
        "measure_cost": False,
        "cache": {"path": str(tmp_path / "cache"), "views": 2},
    }
    path = tmp_path / f"run-{transforms}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cache_of_strong_views_then_distill_and_augment_is_refused(tmp_path, monkeypatch, capsys, one_thread):
    from protege.build import load_run_data
    from protege.models import build_model

    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    save_file(build_model("mlp", num_classes=10, in_chans=1, input_size=8).state_dict(), str(weights))
    config = _run_config(tmp_path, weights, "strong")
    assert _cli(monkeypatch, capsys, "cache", str(config))[0] == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["views"] == 2 and index["view_params"] == [*CROP_NAMES, *ERASE_NAMES]

    cfg = load_config(config)
    data = load_run_data(cfg)
    splits, cache = use_cache(cfg, data)  # accepted
    params = cache.tensors["train"]["params"]
    assert params.dtype == torch.int16 and tuple(params.shape) == (len(data.train), 2, 9)
    replay = replay_for(data.train)
    x, _, extra = splits.train[5]  # sample 5 at epoch 0: one of its two stored views, replayed
    v = splits.train.view_of(0, 5)
    assert extra["index"] == 5 and torch.equal(x, replay.apply(replay.raw(5)[0], params[5, v].tolist()))

    assert _cli(monkeypatch, capsys, "distill", str(config))[0] == 0
    summary = json.loads((tmp_path / "runs" / "kd" / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["final"]) >= {"train/ce", "train/kd"}

    augment = load_config(_run_config(tmp_path, weights, "augment"))
    with pytest.raises(ProtegeError, match="(?s)stale.*data: .*transform: "):
        use_cache(augment, load_run_data(augment))
    code, err = _cli(
        monkeypatch, capsys, "distill", str(_run_config(tmp_path, weights, "augment")), "--overwrite"
    )
    assert code == 2
    assert "stale" in err


def test_the_shipped_fashion_mnist_kd_strong_config_builds_its_cache(tmp_path, one_thread):
    """configs/fashion-mnist-kd-strong.yaml on a slice of Fashion-MNIST with a small random teacher:
    8 strong views with the flip, 480 bytes per image, accepted by its distill run."""
    from protege.build import load_run_data
    from protege.caching import build_cache
    from protege.data import fashion_mnist as fm
    from protege.models import build_model

    try:
        fm.read_arrays()
    except ProtegeError as e:
        pytest.skip(f"the Fashion-MNIST files are not here: {e}")
    kwargs = {"widths": [4, 8, 8], "hidden": 16}
    torch.manual_seed(0)
    teacher = build_model("convnet", num_classes=10, in_chans=1, **kwargs)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    overrides = [
        f"teacher.weights={tmp_path / 'teacher.safetensors'}",
        f"teacher.kwargs={json.dumps(kwargs)}",
        "data.options={train_size: 40, val_size: 20, test_size: 20}",
        f"cache.path={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'runs'}",
    ]
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist-kd-strong.yaml", overrides
    )
    assert cfg.data.transforms == "strong" and cfg.cache is not None and cfg.cache.views == 8
    index = build_cache(cfg, device="cpu")
    assert index["views"] == 8 and "Strong.flip" in index["view_params"] and len(index["view_params"]) == 10
    # 8 views x (10 x 4 B logits + 10 x 2 B parameters), plus the shard header over 40 images
    assert 480 <= index["train_bytes_per_sample"] < 490
    splits, cache = use_cache(cfg, load_run_data(cfg))
    assert cache.views == 8 and len(splits.train) == 40
