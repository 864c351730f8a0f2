"""Teacher-side reductions: AT's teacher attention maps computed by the term online and stored by the cache."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from protege import Distiller, Term
from protege.build import load_run_data
from protege.caching import build_cache, use_cache
from protege.config import load_config
from protege.data import DataSplits, TensorImageDataset
from protege.data.views import ReplayDataset, replay_for
from protege.engine.cache import TeacherCache, cache_loader, teacher_reductions, write_cache
from protege.errors import ProtegeError
from protege.losses.features import at, at_teacher_map
from protege.models.small import SmallCNN

KEY1 = "layer1@attention_map(p=2.0)"


def _np_teacher_map(t: np.ndarray, p: float) -> np.ndarray:
    """mean_c |t|^p, flattened, divided by its L2 norm: by hand, in float64."""
    q = (np.abs(t) ** p).mean(axis=1).reshape(len(t), -1)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).reshape(len(t), *t.shape[2:])


def test_at_teacher_map_is_the_teacher_side_of_at():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(3, 5, 4, 6))
    for p in (2.0, 3.0):
        q = at_teacher_map(torch.from_numpy(t), p)
        assert q.shape == (3, 4, 6)
        np.testing.assert_allclose(q.numpy(), _np_teacher_map(t, p), rtol=1e-12)
        for s_shape in ((3, 2, 4, 6), (3, 7, 8, 12)):  # same size; student larger (pooled down)
            s = torch.from_numpy(rng.normal(size=s_shape))
            assert at(s, q, p=p).item() == pytest.approx(at(s, torch.from_numpy(t), p=p).item(), rel=1e-12)
    with pytest.raises(
        ValueError, match=r"attention map \(4, 6\) is larger than the student's feature map \(2, 3\)"
    ):
        at(torch.randn(3, 2, 2, 3), at_teacher_map(torch.randn(3, 5, 4, 6)))


def test_the_term_reduces_online_only_where_that_is_exact():
    torch.manual_seed(0)
    term = Term("at", 1.0, student="a", teacher="a", p=2)
    assert term.reduction is not None and term.reduction.tap_key("a") == "a@attention_map(p=2.0)"
    t = torch.randn(4, 6, 8, 8)
    for s in (torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4)):  # the second pools the teacher's map
        got = term({"a": s}, [{"a": t}], None, [1.0])
        assert got.item() == pytest.approx(at(s, t).item(), rel=1e-6)
    # a cached reduced map is used as given, and refused where the student's map is smaller
    assert term({"a": t[:, :3]}, [{"a@attention_map(p=2.0)": at_teacher_map(t)}], None, [1.0]).item() == (
        pytest.approx(at(t[:, :3], t).item(), rel=1e-6)
    )
    with pytest.raises(ProtegeError, match=r"holds tap 'a' reduced to attention_map\(p=2.0\).*reduce: false"):
        term({"a": torch.randn(4, 3, 4, 4)}, [{"a@attention_map(p=2.0)": at_teacher_map(t)}], None, [1.0])


def test_a_tap_is_reduced_only_when_every_reader_agrees():
    at2, at4 = Term("at", student="s", teacher="a", p=2.0), Term("at", student="s", teacher="a", p=4.0)
    fitnet = Term("fitnet", student="s", teacher="a")
    assert {
        k: r.key for k, r in teacher_reductions([at2, Term("at", student="t", teacher="a", p=2)]).items()
    } == {"a": "attention_map(p=2.0)"}
    assert teacher_reductions([at2, at4]) == {} and teacher_reductions([at2, fitnet]) == {}
    assert Term("at", student="s", teacher="a", adapter="conv1x1").reduction is None  # built from raw shapes


def _data(n: int = 24, size: int = 8) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 4
    return DataSplits(
        train=TensorImageDataset(images, labels, shift=2, fill=-0.4),
        val=TensorImageDataset(images[:8], labels[:8]),
        test=None,
        num_classes=4,
        in_chans=1,
        input_size=size,
        class_names=list("abcd"),
        source="tiny",
    )


def _terms() -> list[Term]:
    return [Term("ce"), *(Term("at", 1000.0, student=k, teacher=k, p=2.0) for k in ("layer1", "layer2"))]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float16", 1e-3)])
def test_cache_holds_attention_maps_and_cached_at_equals_online(tmp_path, one_thread, dtype, tol):
    data = _data()
    torch.manual_seed(1)
    teacher = SmallCNN(4, 1, widths=(4, 8, 8)).eval()
    kw = {"views": 2, "top_k": "all", "taps": ["layer1", "layer2"], "dtype": dtype}
    index = write_cache(tmp_path / "c", data, [teacher], reductions=teacher_reductions(_terms()), **kw)
    raw = write_cache(tmp_path / "raw", data, [teacher], **kw)
    assert index["taps"] == {KEY1: [4, 4], "layer2@attention_map(p=2.0)": [2, 2]}
    assert index["reductions"]["layer1"] == {"name": "attention_map", "params": {"p": 2.0}, "key": KEY1}
    assert index["parts"]["settings"]["detail"]["reductions"]["layer2"]["params"] == {"p": 2.0}
    cache = TeacherCache.open(tmp_path / "c")
    stored = cache.tensors["train"]
    assert stored[f"t0.tap.{KEY1}"].shape == (24, 2, 4, 4) and stored[f"t0.tap.{KEY1}"].dtype == getattr(
        torch, dtype
    )
    assert "t0.tap.layer1" not in stored
    itemsize = 2 if dtype == "float16" else 4  # taps per view: 4*4*4 + 8*2*2 raw, 4*4 + 2*2 reduced
    raw_taps = [t for k, t in TeacherCache.open(tmp_path / "raw").tensors["train"].items() if ".tap." in k]
    assert sum(t.nbytes for t in raw_taps) == 24 * 2 * itemsize * 96
    assert sum(t.nbytes for k, t in stored.items() if ".tap." in k) == 24 * 2 * itemsize * 20
    saved = raw["train_bytes_per_sample"] - index["train_bytes_per_sample"]
    assert saved == pytest.approx(2 * itemsize * (96 - 20), abs=4)  # safetensors headers differ a little

    torch.manual_seed(2)
    student = SmallCNN(4, 1, widths=(3, 6, 6))
    online = Distiller(copy.deepcopy(student), teacher, _terms())
    offline = Distiller(copy.deepcopy(student), None, _terms(), cached_teachers=1)
    online_set = ReplayDataset(replay_for(data.train), stored["params"], seed=3)
    batch_online = next(iter(cache_loader(online_set, 8, shuffle=True, seed=3)))
    batch_cached = next(
        iter(cache_loader(cache.dataset("train", data.train, seed=3), 8, shuffle=True, seed=3))
    )
    assert torch.equal(batch_online[0], batch_cached[0])
    _, a = online(batch_online)
    _, b = offline(batch_cached)
    assert set(a) == set(b) == {"ce", "at:layer1", "at:layer2"}
    for k in a:
        assert b[k].item() == pytest.approx(a[k].item(), rel=tol, abs=1e-9), k
    assert a["at:layer1"].item() > 1e-3  # the maps differ: the comparison is not 0 == 0


def _config(tmp_path: Path, p: float = 2.0, loss: str = "at", **cache) -> Path:
    term = {"loss": loss, "weight": 1000, "student": "layer1", "teacher": "layer1"}
    cfg = {
        "name": "at",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 128, "transforms": "none"},
        "teacher": {"model": "cnn_m", "kwargs": {"widths": [4, 8, 8]}},
        "student": {"model": "cnn_m", "kwargs": {"widths": [3, 6, 6]}},
        "terms": [{"loss": "ce"}, {**term, "p": p} if loss == "at" else term],
        "epochs": 1,
        "progress": False,
        "measure_cost": False,
        "cache": {"path": str(tmp_path / "cache"), "top_k": "all", "taps": ["layer1"], **cache},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_run_reading_the_tap_otherwise_is_refused(tmp_path):
    cfg = load_config(_config(tmp_path, p=2))
    index = build_cache(cfg)
    assert list(index["taps"]) == [KEY1]
    data = load_run_data(cfg)
    use_cache(cfg, data)  # the terms it was built for: accepted
    p4 = load_config(_config(tmp_path, p=4))
    with pytest.raises(ProtegeError) as e:
        use_cache(p4, load_run_data(p4))
    message = str(e.value)
    assert "'layer1' reduced to attention_map(p=4.0)" in message and f"only as {KEY1}" in message
    assert "protege cache <config> --overwrite" in message
    sp_run = load_config(_config(tmp_path, loss="sp"))
    with pytest.raises(
        ProtegeError, match=r"reads teacher tap 'layer1' raw, but .* only as layer1@attention"
    ):
        use_cache(sp_run, load_run_data(sp_run))
    # reduce: false stores the raw map, which every term reads (AT reduces it online)
    raw = load_config(_config(tmp_path, p=4, reduce=False))
    assert list(build_cache(raw, overwrite=True)["taps"]) == ["layer1"]
    use_cache(raw, load_run_data(raw))
