"""Teacher-output cache (offline KD): replayable views, equivalence with online distillation,
staleness and corruption checks, and the ``protege cache`` command (exactness of logit terms and the
refusal of top-k caches: tests/test_cache_exact.py)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms.v2 import functional as F

from protege import Distiller, Term
from protege.caching import build_cache, use_cache
from protege.config import load_config
from protege.data import DataSplits, TensorImageDataset, TransformSubset, build_transforms
from protege.data.views import ReplayDataset, replay_for, view_offsets
from protege.engine import evaluate, make_loader
from protege.engine.cache import TeacherCache, cache_loader, index_dtype, write_cache
from protege.errors import ProtegeError
from protege.tasks import ClassificationTask

# -- storage ---------------------------------------------------------------------------------------


def test_index_dtype_is_the_smallest_that_fits():
    assert index_dtype(10) == torch.uint8 and index_dtype(256) == torch.uint8
    assert index_dtype(1000) == torch.int16 and index_dtype(50_000) == torch.int32


# -- replayable views -----------------------------------------------------------------------------


def _tensor_data(n: int = 40, size: int = 8, shift: int = 2, classes: int = 4, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=g)
    labels = torch.arange(n) % classes
    val = TensorImageDataset(images[:12] * 0.5, labels[:12])
    return DataSplits(
        train=TensorImageDataset(images, labels, shift=shift, fill=-0.4),
        val=val,
        test=None,
        num_classes=classes,
        in_chans=1,
        input_size=size,
        class_names=[str(i) for i in range(classes)],
        source="tiny",
    )


def test_shift_replay_equals_torchvision_and_the_random_dataset():
    ds = _tensor_data().train
    replay = replay_for(ds)
    assert replay.names == ("Shift.dy", "Shift.dx")
    raw, _ = replay.raw(3)
    for seed in range(6):
        torch.manual_seed(seed)
        random_view, _ = ds[3]
        torch.manual_seed(seed)
        dy, dx = torch.randint(0, 5, (2,)).tolist()  # the draws TensorImageDataset makes
        replayed = replay.apply(raw, [dy, dx])
        assert torch.equal(replayed, random_view)
        functional = F.crop(F.pad(raw, [2, 2, 2, 2], fill=-0.4), dy, dx, 8, 8)
        assert torch.equal(replayed, functional)


def _pil_images(n: int, size: int = 12, seed: int = 0) -> list[tuple[Image.Image, int]]:
    rng = np.random.default_rng(seed)
    return [
        (Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)), i % 3) for i in range(n)
    ]


def _shadow(transform, raw, seed: int) -> list[int]:
    """The parameters the random transform draws with torch seeded at ``seed``, in its own order."""
    torch.manual_seed(seed)
    params: list[int] = []
    x = raw
    for t in transform.transforms:
        name = type(t).__name__
        if name == "RandomCrop":
            p = t.make_params([x])
            params += [p["top"], p["left"]]
            x = t.transform(x, p)
        elif name == "RandomResizedCrop":
            p = t.make_params([x])
            params += [p["top"], p["left"], p["height"], p["width"]]
            x = t.transform(x, p)
        elif name == "RandomHorizontalFlip":
            flip = bool(torch.rand(1) < t.p)
            params.append(int(flip))
            x = F.horizontal_flip(x) if flip else x
        else:
            x = t(x)
    return params


@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
def test_recipe_replay_equals_the_random_transform(recipe):
    transform = build_transforms(recipe, True, 8, in_chans=3)
    base = _pil_images(4)
    replay = replay_for(TransformSubset(base, range(4), transform))
    expect = {
        "cifar": ("RandomCrop.top", "RandomCrop.left", "HorizontalFlip.flip"),
        "imagenet": (
            *(f"RandomResizedCrop.{p}" for p in ("top", "left", "height", "width")),
            "HorizontalFlip.flip",
        ),
    }
    assert replay.names == expect[recipe]
    raw, _ = replay.raw(1)
    seen_flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        random_view = transform(raw)
        params = _shadow(transform, raw, seed)
        seen_flips.add(params[-1])
        assert torch.equal(replay.apply(raw, params), random_view)
        # the same with torchvision's functional ops written out
        x = F.pil_to_tensor(raw)
        if recipe == "cifar":
            x = F.crop(F.pad(x, [4, 4, 4, 4]), params[0], params[1], 8, 8)
        else:
            x = F.resized_crop(x, *params[:4], size=[8, 8], antialias=True)
        x = F.horizontal_flip(x) if params[-1] else x
        mean, std = (
            ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
            if recipe == "cifar"
            else (
                (0.485, 0.456, 0.406),
                (0.229, 0.224, 0.225),
            )
        )
        x = F.normalize(F.to_dtype(x, torch.float32, scale=True), list(mean), list(std))
        assert torch.equal(replay.apply(raw, params), x)
    assert seen_flips == {0, 1}


def test_drawn_views_follow_the_transform_geometry():
    transform = build_transforms("imagenet", True, 8, in_chans=3)
    replay = replay_for(TransformSubset(_pil_images(2, size=20), range(2), transform))
    raw, _ = replay.raw(0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        params, view = replay.draw(raw, rng)
        top, left, h, w, flip = params
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 23 and flip in (0, 1)
        assert torch.equal(view, replay.apply(raw, params))


def test_deterministic_recipes_have_one_view_and_custom_ones_are_refused():
    assert not replay_for(_tensor_data(shift=0).train).random
    assert not replay_for(
        TransformSubset(_pil_images(2), range(2), build_transforms("mnist", True, 12))
    ).random
    from torchvision.transforms import v2

    jitter = v2.Compose([v2.ToImage(), v2.ColorJitter(0.4), v2.ToDtype(torch.float32, scale=True)])
    with pytest.raises(ProtegeError, match="no replayable form.*cifar, imagenet"):
        replay_for(TransformSubset(_pil_images(2), range(2), jitter))
    with pytest.raises(ProtegeError, match="no replayable form"):
        replay_for(TransformSubset(_pil_images(2), range(2), lambda img: F.pil_to_tensor(img)))


def test_views_cover_every_view_once_per_cycle():
    params = torch.arange(40 * 3 * 2, dtype=torch.int32).reshape(40, 3, 2) % 5
    ds = ReplayDataset(replay_for(_tensor_data().train), params, seed=3)
    offsets = view_offsets(40, 3, 3)
    assert len(set(offsets.tolist())) == 3  # samples start at different views
    for i in range(40):
        assert sorted(ds.view_of(e, i) for e in range(5, 8)) == [0, 1, 2]


# -- building and reading ---------------------------------------------------------------------------


def _mlp(seed: int, hidden: int = 16, classes: int = 4, size: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def test_cached_outputs_are_the_teacher_on_the_replayed_view(tmp_path):
    data = _tensor_data()
    teacher = _mlp(1)
    index = write_cache(
        tmp_path / "c", data, [teacher], views=3, top_k="all", dtype="float32", taps=["2"], shard_size=16
    )
    assert [s["file"] for s in index["splits"]["train"]["shards"]] == [
        "train-00000.safetensors",
        "train-00001.safetensors",
        "train-00002.safetensors",
    ]
    assert index["taps"] == {"2": [16]} and index["views"] == 3
    cache = TeacherCache.open(tmp_path / "c")
    train = cache.dataset("train", data.train, seed=0)
    for epoch, i in [(0, 0), (1, 17), (4, 39)]:
        x, y, meta = train[epoch * 40 + i]
        v = train.view_of(epoch, i)
        raw, label = train.replay.raw(i)
        assert torch.equal(x, train.replay.apply(raw, cache.tensors["train"]["params"][i, v].tolist()))
        assert y == label and meta["index"] == i
        with torch.no_grad():
            hidden = teacher[2](teacher[1](teacher[0](x[None])))
            torch.testing.assert_close(meta["teacher_outputs"][0]["logits"], teacher(x[None])[0])
        torch.testing.assert_close(meta["teacher_outputs"][0]["2"], hidden[0])
    _, _, meta = cache.dataset("val", data.val)[5]
    torch.testing.assert_close(
        meta["teacher_outputs"][0]["logits"], teacher(data.val[5][0][None])[0].detach()
    )


def _same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("top_k", [2, "all"])
def test_batched_reads_equal_single_reads(tmp_path, top_k):
    data = _tensor_data()
    write_cache(tmp_path / "c", data, [_mlp(1), _mlp(4)], views=3, top_k=top_k, taps=["1"])
    cache = TeacherCache.open(tmp_path / "c")
    assert cache.tensors["train"]["params"].dtype == torch.int16
    for split, ds in (("train", data.train), ("val", data.val)):
        cached = cache.dataset(split, ds, seed=1)
        indices = [3, 40 + 7, 2 * 40 + 3, 11] if split == "train" else [0, 5, 11]
        _same(cached.__getitems__(indices), [cached[i] for i in indices])
        # logits only where they are exact: a top-k training split hands out its taps alone
        keys = set(cached[indices[0]][2]["teacher_outputs"][1])
        assert keys == (
            {"1"} if split == "train" and top_k == 2 else {"logits", "1"} if split == "train" else {"logits"}
        )


def test_pil_recipe_cache_replays_its_views(tmp_path):
    base = _pil_images(10)
    data = DataSplits(
        train=TransformSubset(base, range(10), build_transforms("cifar", True, 8, in_chans=3, resize=True)),
        val=TransformSubset(base, range(4), build_transforms("cifar", False, 8, in_chans=3, resize=True)),
        test=None,
        num_classes=3,
        in_chans=3,
        input_size=8,
        class_names=["a", "b", "c"],
        source="tiny-pil",
    )
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 3))
    write_cache(tmp_path / "c", data, [teacher], views=2)  # full fp32 logits by default
    train = TeacherCache.open(tmp_path / "c").dataset("train", data.train)
    _same(train.__getitems__([13, 2]), [train[13], train[2]])
    x, _, meta = train[13]  # epoch 1, sample 3
    with torch.no_grad():
        torch.testing.assert_close(
            meta["teacher_outputs"][0]["logits"], teacher(x[None])[0], rtol=1e-6, atol=1e-6
        )


def _step_losses(distiller: Distiller, loader, epochs: int) -> list[dict[str, float]]:
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        distiller.set_progress(epoch)
        for batch in loader:
            _, losses = distiller(batch)
            sum(losses.values()).backward()
            opt.step()
            opt.zero_grad()
            out.append({k: v.item() for k, v in losses.items()})
    return out


def test_distilling_from_the_cache_equals_online_distillation(tmp_path):
    """Same views, same batch order, k = all (fp32): the cached run's losses are the online run's."""
    data = _tensor_data()
    teacher = _mlp(1, hidden=32)
    index = write_cache(tmp_path / "c", data, [teacher], views=3, top_k="all", dtype="float32")
    cache = TeacherCache.open(tmp_path / "c")
    cached_set = cache.dataset("train", data.train, seed=5)
    online_set = ReplayDataset(replay_for(data.train), cache.tensors["train"]["params"], seed=5)
    student = _mlp(2)
    terms = lambda: [Term("ce", 0.5), Term("kd", 0.5, T=4.0)]  # noqa: E731
    online = Distiller(copy.deepcopy(student), teacher, terms())
    offline = Distiller(copy.deepcopy(student), None, terms(), cached_teachers=1)
    a = _step_losses(online, cache_loader(online_set, 8, shuffle=True, seed=5), epochs=3)
    b = _step_losses(offline, cache_loader(cached_set, 8, shuffle=True, seed=5), epochs=3)
    assert len(a) == len(b) == 15
    for la, lb in zip(a, b):
        assert la.keys() == lb.keys()
        for k in la:
            assert abs(la[k] - lb[k]) < 1e-5 * max(1.0, abs(la[k]))
    for pa, pb in zip(online.student.parameters(), offline.student.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    assert index["train_bytes_per_sample"] > 0
    # fidelity on the cached validation split is the online one
    task = ClassificationTask()
    val_online = evaluate(online.student, make_loader(data.val, 5, shuffle=False), task, [teacher], [1.0])
    val_cached = evaluate(
        online.student, make_loader(cache.dataset("val", data.val), 5, shuffle=False), task, [], [1.0]
    )
    assert val_cached.keys() == val_online.keys() and "agreement" in val_cached
    for k in val_online:
        assert abs(val_online[k] - val_cached[k]) < 1e-6


def test_fp16_top_k_cache_trains_feature_terms_and_gradients_flow(tmp_path):
    """A top-k cache (k < C) is for terms that read no teacher logits: a feature term trains from it."""
    data = _tensor_data()
    index = write_cache(tmp_path / "c", data, [_mlp(1)], views=2, top_k=2, taps=["2"])
    assert index["top_k"] == 2 and index["splits"]["train"]["storage"] == "topk"
    cache = TeacherCache.open(tmp_path / "c")
    assert cache.tensors["train"]["t0.logp"].dtype == torch.float16
    assert cache.tensors["train"]["t0.index"].dtype == torch.uint8
    assert cache.tensors["train"]["t0.tap.2"].dtype == torch.float16
    distiller = Distiller(_mlp(2), None, [Term("fitnet", 1.0, student="2", teacher="2")], cached_teachers=1)
    batch = next(iter(cache_loader(cache.dataset("train", data.train), 8, shuffle=True)))
    _, losses = distiller(batch)
    losses["fitnet:2"].backward()
    trained = list(distiller.student.parameters())[:2]  # the layers before the tap
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


# -- corruption ---------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path) -> tuple[Path, DataSplits]:
    data = _tensor_data()
    write_cache(tmp_path / "c", data, [_mlp(1)], views=2, top_k=3, shard_size=16)
    return tmp_path / "c", data


def test_truncated_shard_is_detected(built):
    path, _ = built
    shard = path / "train-00001.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) - 7])
    with pytest.raises(ProtegeError, match=r"train-00001\.safetensors is truncated.*--overwrite"):
        TeacherCache.open(path)
    with pytest.raises(ProtegeError, match="truncated"):
        TeacherCache.open(path, verify="size")  # sizes are always checked


def test_corrupted_and_missing_shards_and_index_are_detected(built):
    path, _ = built
    shard = path / "val-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ProtegeError, match=r"val-00000\.safetensors is corrupted \(SHA-256"):
        TeacherCache.open(path)
    (path / "train-00002.safetensors").unlink()
    with pytest.raises(ProtegeError, match=r"train-00002\.safetensors is missing"):
        TeacherCache.open(path)
    (path / "index.json").unlink()
    with pytest.raises(ProtegeError, match="has no index.json.*protege cache"):
        TeacherCache.open(path)
    with pytest.raises(ProtegeError, match="does not exist"):
        TeacherCache.open(path.parent / "nowhere")


def test_a_crash_while_building_leaves_no_cache(tmp_path):
    class Broken(nn.Module):
        calls = 0

        def forward(self, x):
            Broken.calls += 1
            if Broken.calls > 2:
                raise RuntimeError("power cut")
            return torch.zeros(len(x), 4)

    with pytest.raises(RuntimeError, match="power cut"):
        write_cache(tmp_path / "c", _tensor_data(), [Broken()], views=2, batch_size=8, shard_size=4)
    assert list(tmp_path.iterdir()) == []


def test_existing_cache_is_not_overwritten_unasked(built):
    path, data = built
    before = (path / "index.json").read_bytes()
    with pytest.raises(ProtegeError, match="already exists.*--overwrite"):
        write_cache(path, data, [_mlp(3)], views=2)
    assert (path / "index.json").read_bytes() == before
    write_cache(path, data, [_mlp(3)], views=1, overwrite=True)
    assert json.loads((path / "index.json").read_text())["views"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["c"]


# -- config, staleness and the command line ------------------------------------------------------


def _run_config(tmp_path: Path, teacher_weights: Path, **cache) -> Path:
    cfg = {
        "name": "kd",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 128, "transforms": "augment"},
        "teacher": {"model": "mlp", "kwargs": {"input_size": 8}, "weights": str(teacher_weights)},
        "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
        "terms": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "T": 4}],
        "epochs": 1,
        "progress": False,
        "measure_cost": False,
        "cache": {"path": str(tmp_path / "cache"), "views": 2, **cache},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _teacher_file(tmp_path: Path, seed: int = 0) -> Path:
    from protege.models import build_model

    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=10, in_chans=1, input_size=8)
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_stale_cache_is_refused_when_teacher_weights_change(tmp_path):
    weights = _teacher_file(tmp_path, seed=0)
    cfg = load_config(_run_config(tmp_path, weights))
    from protege.build import load_run_data

    build_cache(cfg)
    data = load_run_data(cfg)
    splits, cache = use_cache(cfg, data)  # fresh: accepted
    assert cache.views == 2 and len(splits.train) == len(data.train)
    _teacher_file(tmp_path, seed=1)  # the teacher was retrained in place
    with pytest.raises(ProtegeError) as e:
        use_cache(cfg, data)
    message = str(e.value)
    assert (
        "stale" in message and "teacher 0's weights changed" in message and "teacher.safetensors" in message
    )
    assert "protege cache <config> --overwrite" in message and "data:" not in message
    # a data change is named as such
    changed = load_config(_run_config(tmp_path, weights), ["data.transforms=none"])
    with pytest.raises(ProtegeError, match="(?s)stale.*data: .*transform: "):
        use_cache(changed, load_run_data(changed))
    # a term reading a tap the cache lacks
    tapped = load_config(
        _run_config(tmp_path, weights),
        ["terms.1.loss=fitnet", "terms.1.student=layer1", "terms.1.teacher=layer2"],
    )
    build_cache(tapped, overwrite=True)
    with pytest.raises(ProtegeError, match="teacher taps layer2.*cache.taps"):
        use_cache(tapped, load_run_data(tapped))


def _cli(monkeypatch, *args: str) -> int:
    from protege import cli

    monkeypatch.setattr(sys, "argv", ["protege", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return int(e.value.code or 0)


def test_cli_cache_then_distill_without_the_teacher(tmp_path, monkeypatch, capsys):
    weights = _teacher_file(tmp_path)
    config = _run_config(tmp_path, weights)
    assert _cli(monkeypatch, "cache", str(config), "--views", "3", "--top-k", "all") == 0
    printed = capsys.readouterr().out
    assert "bytes per training sample" in printed
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert (
        index["views"] == 3 and index["top_k"] == "all" and set(index["splits"]) == {"train", "val", "test"}
    )

    # errors: exit 2, one message, nothing written
    before = (tmp_path / "cache" / "index.json").read_bytes()
    assert _cli(monkeypatch, "cache", str(config)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "cache" / "index.json").read_bytes() == before
    assert _cli(monkeypatch, "cache", str(config), "--out", str(tmp_path / "c2"), "--top-k", "many") == 2
    assert "top_k must be a positive integer or 'all'" in capsys.readouterr().err
    assert (
        _cli(monkeypatch, "cache", str(config), "--set", "cache.viewz=2", "--out", str(tmp_path / "c3")) == 2
    )
    assert "did you mean 'views'" in capsys.readouterr().err
    assert _cli(monkeypatch, "cache", str(config), "--set", "cache=null") == 2
    assert "where should the cache go?" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run.yaml", "teacher.safetensors"]

    # distill reads the cache and never builds the teacher
    import protege.build as build

    built: list[str] = []
    real = build.build_from
    monkeypatch.setattr(build, "build_from", lambda spec, data: built.append(spec.model) or real(spec, data))
    assert _cli(monkeypatch, "distill", str(config)) == 0
    assert built == ["mlp_s"]
    summary = json.loads((tmp_path / "runs" / "kd" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert 0.0 <= summary["final"]["val/agreement"] <= 1.0 and "val/kl" in summary["final"]
    assert "agreement" in summary["test"]["best"]
    assert set(summary["final"]) >= {"train/ce", "train/kd"}

    # a stale cache stops distill with exit 2
    _teacher_file(tmp_path, seed=7)
    assert _cli(monkeypatch, "distill", str(config), "--overwrite") == 2
    assert "teacher 0's weights changed" in capsys.readouterr().err


def test_the_epoch_reaches_the_dataset_through_workers_and_accelerate(tmp_path):
    from accelerate import Accelerator

    data = _tensor_data()
    write_cache(tmp_path / "c", data, [_mlp(1)], views=3, top_k=2)
    cache = TeacherCache.open(tmp_path / "c")
    ds = cache.dataset("train", data.train, seed=0)
    params = cache.tensors["train"]["params"]

    def check(loader, epoch: int) -> None:
        seen = 0
        for x, _, meta in loader:
            for row, i in enumerate(meta["index"].tolist()):
                raw, _ = ds.replay.raw(i)
                assert torch.equal(x[row], ds.replay.apply(raw, params[i, ds.view_of(epoch, i)].tolist()))
                seen += 1
        assert seen == 40

    workers = cache_loader(ds, 8, shuffle=True, seed=0, num_workers=2)
    for epoch in (0, 2):
        workers.sampler.set_epoch(epoch)
        check(workers, epoch)
    prepared = Accelerator(cpu=True).prepare(cache_loader(ds, 8, shuffle=True, seed=0))
    for epoch in (1, 0, 4):
        prepared.set_epoch(epoch)
        check(prepared, epoch)


class _ConvTeacher(nn.Module):
    """Conv-BN-ReLU, a tapped conv-BN block, pooling, a classifier; ``flat_view`` flattens with
    ``view`` (fails in channels_last)."""

    def __init__(self, flat_view: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 8 * 8 if flat_view else 8, 4)
        self.flat_view = flat_view
        for bn in (self.stem[1], self.block[1]):  # non-trivial statistics, so folding changes weights
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.block(self.stem(x))
        return self.fc(f.view(f.shape[0], -1) if self.flat_view else f.mean((2, 3)))


def test_cache_teacher_runs_folded_and_channels_last_with_the_same_outputs(tmp_path, capsys):
    data = _tensor_data()
    plain = _ConvTeacher()
    fast = copy.deepcopy(plain)
    settings = {"views": 2, "top_k": "all", "dtype": "float32", "taps": ["block"], "shard_size": 64}
    write_cache(tmp_path / "plain", data, [plain], memory_format="contiguous", **settings)
    write_cache(
        tmp_path / "fast", data, [fast], fold_teacher_bn=True, memory_format="channels_last", **settings
    )
    assert isinstance(fast.stem[1], nn.Identity) and isinstance(plain.stem[1], nn.BatchNorm2d)
    assert all(p.is_contiguous() for p in fast.parameters())  # handed back contiguous
    a, b = TeacherCache.open(tmp_path / "plain").tensors, TeacherCache.open(tmp_path / "fast").tensors
    for split in ("train", "val"):
        for key in a[split]:
            torch.testing.assert_close(b[split][key], a[split][key], rtol=1e-4, atol=1e-5)
    # a teacher that fails in channels_last: contiguous with a note under auto, an error when asked
    write_cache(tmp_path / "auto", data, [_ConvTeacher(flat_view=True)], memory_format="auto", device="cpu")
    assert "runs the teachers contiguous" in capsys.readouterr().err
    with pytest.raises(ProtegeError, match="memory_format channels_last: a teacher fails"):
        write_cache(tmp_path / "cl", data, [_ConvTeacher(flat_view=True)], memory_format="channels_last")
    assert not (tmp_path / "cl").exists()
