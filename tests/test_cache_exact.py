"""The classification teacher-output cache is exact or refused (issue 16, part 3).

A cache of full float32 logits (``top_k: all``, the default) gives every logit term the loss it
computes with the teacher run online on the same view; a top-k cache (k < C), or an older cache of
float16 logits, is refused before a run writes anything, naming the terms, their temperatures and
the rebuild command.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from protege import Distiller, Term
from protege.build import build_distiller, load_run_data
from protege.caching import _lm_top_k, build_cache, use_cache
from protege.config import CacheConfig, load_config
from protege.data import DataSplits, TensorImageDataset
from protege.data.views import ReplayDataset, replay_for
from protege.engine.cache import TeacherCache, cache_loader, check_cached_logits, exact_logits, write_cache
from protege.errors import ProtegeError
from protege.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10

# -- cached vs online, on the same replayed views ---------------------------------------------------


def _data(n: int = 48, size: int = 8) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, size, size, generator=g)
    labels = torch.arange(n) % CLASSES
    return DataSplits(
        train=TensorImageDataset(images, labels, shift=2, fill=-0.4),
        val=TensorImageDataset(images[:12], labels[:12]),
        test=None,
        num_classes=CLASSES,
        in_chans=1,
        input_size=size,
        class_names=[str(i) for i in range(CLASSES)],
        source="tiny",
    )


def _mlp(seed: int, scale: float, hidden: int = 32, size: int = 8) -> nn.Module:
    """A random MLP whose logits spread over several units (``scale``), as a trained model's do."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(size * size, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))
    with torch.no_grad():
        model[3].weight.mul_(scale)
    return model


LOGIT_TERMS = {
    "kd T=4": Term("kd", 1.0, T=4.0),
    "dkd": Term("dkd", 1.0),  # T = 4, alpha 1, beta 8: the loss's defaults
    "standardized kd T=2": Term("kd", 1.0, T=2.0, standardize=True),
}
MAX_REL: dict[str, float] = {}  # the measured agreement, printed with -s


@pytest.mark.parametrize("which", list(LOGIT_TERMS))
def test_cached_logit_losses_equal_online_ones_on_the_same_views(tmp_path, one_thread, which):
    """Every batch of two epochs: the term from the cache equals the term with the teacher run live
    on the replayed view, within 1e-4 relative (no absolute slack), with C = 10 classes."""
    data = _data()
    teacher = _mlp(1, scale=6.0).eval()
    # the defaults: top_k all, dtype float16 -- which applies to taps, never to the logits
    index = write_cache(tmp_path / "c", data, [teacher], views=3, taps=["2"])
    assert index["top_k"] == "all" and index["dtype"] == "float16"
    cache = TeacherCache.open(tmp_path / "c")
    stored = cache.tensors["train"]
    assert stored["t0.logits"].dtype == torch.float32 and stored["t0.tap.2"].dtype == torch.float16
    assert exact_logits(index["splits"]["train"]) and index["splits"]["train"]["logits_dtype"] == "float32"

    student = _mlp(2, scale=2.0)
    term = LOGIT_TERMS[which]
    online = Distiller(copy.deepcopy(student), teacher, [Term(term.loss, 1.0, **term.params)])
    offline = Distiller(
        copy.deepcopy(student), None, [Term(term.loss, 1.0, **term.params)], cached_teachers=1
    )
    check_cached_logits(offline.terms, cache)  # exact: accepted
    online_loader = cache_loader(ReplayDataset(replay_for(data.train), stored["params"], seed=4), 8, True, 4)
    cached_loader = cache_loader(cache.dataset("train", data.train, seed=4), 8, True, 4)
    a, b = [], []
    with torch.no_grad():
        for epoch in range(2):
            online_loader.sampler.set_epoch(epoch)
            cached_loader.sampler.set_epoch(epoch)
            for live, cached in zip(online_loader, cached_loader, strict=True):
                assert torch.equal(live[0], cached[0])  # the same replayed views
                a.append(online(live)[1][term.name])
                b.append(offline(cached)[1][term.name])
    a, b = torch.stack(a), torch.stack(b)
    assert len(a) == 12 and bool((a.abs() > 1e-3).all())  # not 0 == 0
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)
    MAX_REL[which] = float(((b - a).abs() / a.abs()).max())
    print(f"\n{which}: max |cached - online| / |online| = {MAX_REL[which]:.2e} over {len(a)} batches")


# -- refusals ------------------------------------------------------------------------------------


def _teacher_file(tmp_path: Path) -> Path:
    from protege.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_chans=1, input_size=8)
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _config(tmp_path: Path, terms: list[dict], **cache) -> Path:
    cfg = {
        "name": "kd",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 128, "transforms": "augment"},
        "teacher": {"model": "mlp", "kwargs": {"input_size": 8}, "weights": str(_teacher_file(tmp_path))},
        "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
        "terms": [{"loss": "ce", "weight": 0.5}, *terms],
        "epochs": 1,
        "progress": False,
        "measure_cost": False,
        "cache": {"path": str(tmp_path / "cache"), "views": 2, **cache},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(monkeypatch, *args: str) -> int:
    from protege import cli

    monkeypatch.setattr(sys, "argv", ["protege", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return int(e.value.code or 0)


def test_a_top_k_cache_refuses_kd_before_the_run_writes_anything(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path, [{"loss": "kd", "weight": 0.5, "T": 4}], top_k=3)
    assert _cli(monkeypatch, "cache", str(config)) == 0
    assert "top-3 of 10 classes" in capsys.readouterr().out
    assert _cli(monkeypatch, "distill", str(config)) == 2
    err = capsys.readouterr().err
    flat = " ".join(err.split())  # the console wraps long lines
    assert "Traceback" not in err
    assert "term 'kd' (T = 4) reads the teacher's logits" in flat
    assert "top-3 of 10 classes" in flat and "other 7 classes" in flat
    assert "`protege cache <config> --top-k all --overwrite`" in flat and "cache: {top_k: all}" in flat
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made
    # rebuilt as the message says, the same run is accepted and exact
    assert _cli(monkeypatch, "cache", str(config), "--top-k", "all", "--overwrite") == 0
    cfg = load_config(config)
    use_cache(cfg, load_run_data(cfg))


def test_the_message_names_every_logit_term_and_its_temperature(tmp_path):
    terms = [
        {"loss": "kd", "weight": 0.5, "T": 2.5},
        {"loss": "dkd", "weight": 0.5},
        {"loss": "ctkd", "weight": 0.5},
        {"loss": "dist", "weight": 0.5},
        {"loss": "fitnet", "student": "layer1", "teacher": "layer1", "adapter": "linear"},
    ]
    cfg = load_config(_config(tmp_path, terms, top_k=4, taps=["layer1"]))
    build_cache(cfg)
    with pytest.raises(ProtegeError) as e:
        use_cache(cfg, load_run_data(cfg))
    message = str(e.value)
    assert message.startswith(
        "terms 'kd' (T = 2.5), 'dkd' (T = 4, dkd's default), 'ctkd' (a learned temperature), "
        "'dist' (T = 1, dist's default) read the teacher's logits"
    )
    assert "fitnet" not in message and "'ce'" not in message and "top-4 of 10" in message
    # a run whose terms read only taps trains from the same top-k cache
    taps_only = load_config(
        _config(
            tmp_path,
            [{"loss": "fitnet", "student": "layer1", "teacher": "layer1", "adapter": "linear"}],
            top_k=4,
            taps=["layer1"],
        )
    )
    splits, _ = use_cache(taps_only, load_run_data(taps_only))
    _, _, meta = splits.train[0]
    assert set(meta["teacher_outputs"][0]) == {"layer1"}  # no logits to misread


def test_an_old_cache_of_float16_logits_is_refused_with_a_rebuild_message(tmp_path):
    """Before the logits were always float32, ``top_k: all`` stored them in ``dtype`` (float16 by
    default) and the index recorded only that ``dtype``: such a cache is exact for no logit term."""
    data = _data()
    write_cache(tmp_path / "c", data, [_mlp(1, scale=6.0)], views=2, dtype="float16")
    index_path = tmp_path / "c" / "index.json"
    index = json.loads(index_path.read_text())
    train = index["splits"]["train"]
    del train["logits_dtype"]  # what version 1 wrote: the split's dtype was the logits' too
    for shard in train["shards"]:
        path = tmp_path / "c" / shard["file"]
        tensors = load_file(str(path))
        tensors["t0.logits"] = tensors["t0.logits"].half()
        save_file(tensors, str(path))
        shard["bytes"], shard["sha256"] = path.stat().st_size, sha256_file(path)
    index_path.write_text(json.dumps(index))
    cache = TeacherCache.open(tmp_path / "c")
    assert not exact_logits(cache.index["splits"]["train"]) and exact_logits(cache.index["splits"]["val"])
    with pytest.raises(ProtegeError) as e:
        check_cached_logits([Term("kd", 1.0, T=4.0)], cache)
    message = str(e.value)
    assert message.startswith("term 'kd' (T = 4) reads the teacher's logits") and "float16" in message
    assert "older protege" in message and "--top-k all --overwrite" in message
    check_cached_logits([Term("ce")], cache)  # no logit term: nothing to refuse
    _, _, meta = cache.dataset("train", data.train)[0]
    assert "logits" not in meta["teacher_outputs"][0]


def test_top_k_defaults_to_all_and_an_lm_cache_keeps_its_own_default():
    assert CacheConfig(path="c").top_k == "all"
    cfg = load_config(ROOT / "configs" / "lm-smollm2-cache.yaml", ["cache=somewhere"])
    assert cfg.cache is not None and cfg.cache.top_k == "all" and _lm_top_k(cfg.cache) == 128
    again = load_config(ROOT / "configs" / "lm-smollm2-cache.yaml", ["cache=somewhere", "epochs=2"])
    assert _lm_top_k(again.cache) == 128  # an unset top_k stays unset through --set
    explicit = load_config(ROOT / "configs" / "lm-smollm2-cache.yaml", ["cache.top_k=all"])
    assert _lm_top_k(explicit.cache) == "all"


# -- the shipped config -----------------------------------------------------------------------------


def test_the_shipped_mnist_kd_cached_config_is_accepted_and_exact(tmp_path, one_thread):
    """configs/mnist-kd-cached.yaml, made tiny (12x12 digits, a small random convnet teacher): its
    cache is accepted, stores 176 bytes per image, and its cached KD (T = 4) is the online KD."""
    from protege.models import build_model

    kwargs = {"widths": [4, 8, 8], "hidden": 16}
    torch.manual_seed(0)
    teacher = build_model("convnet", num_classes=10, in_chans=1, **kwargs)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    overrides = [
        f"teacher.weights={tmp_path / 'teacher.safetensors'}",
        f"teacher.kwargs={json.dumps(kwargs)}",
        "data.options={size: 12}",
        f"cache.path={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'runs'}",
        "epochs=1",
    ]
    cfg = load_config(ROOT / "configs" / "mnist-kd-cached.yaml", overrides)
    assert cfg.cache is not None and cfg.cache.top_k == "all" and cfg.cache.views == 4
    index = build_cache(cfg, device="cpu")
    assert index["top_k"] == "all" and index["splits"]["train"]["logits_dtype"] == "float32"
    assert 176 <= index["train_bytes_per_sample"] < 177  # 4 views x (10 x 4 B logits + 2 x 2 B shifts)
    data = load_run_data(cfg)
    splits, cache = use_cache(cfg, data)  # accepted

    offline = build_distiller(cfg, splits)
    online = build_distiller(cfg.model_copy(update={"cache": None}), data)
    assert offline.cached_teachers == 1 and len(online.teachers) == 1
    replayed = ReplayDataset(replay_for(data.train), cache.tensors["train"]["params"], seed=cfg.seed)
    batch_online = next(iter(cache_loader(replayed, 64, shuffle=True, seed=cfg.seed)))
    batch_cached = next(iter(cache_loader(splits.train, 64, shuffle=True, seed=cfg.seed)))
    assert torch.equal(batch_online[0], batch_cached[0])
    with torch.no_grad():
        torch.manual_seed(0)  # the student's dropout draws the same masks
        _, a = online(batch_online)
        torch.manual_seed(0)
        _, b = offline(batch_cached)
    assert set(a) == set(b) == {"ce", "kd"} and a["kd"].item() > 1e-3
    torch.testing.assert_close(b["kd"], a["kd"], rtol=1e-4, atol=0)
    print(
        f"\nmnist-kd-cached kd: |cached - online| / |online| = {abs(b['kd'] - a['kd']).item() / a['kd'].item():.2e}"
    )
    torch.testing.assert_close(b["ce"], a["ce"], rtol=1e-6, atol=0)
    online.close()
