"""``protege generate`` on a tiny random LLaMA: deduplicated prompts, resumable runs (finished prompts
skipped, an interrupted run completed), an atomic jsonl the lm task reads as prompt-completion data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from protege.cli import app  # noqa: E402
from protege.errors import ProtegeError  # noqa: E402
from protege.generate import GenerateConfig, generate, load_generate_config  # noqa: E402
from protege.losses.sequence import IGNORE_INDEX  # noqa: E402
from protege.tasks.lm import build_lm, load_lm_data, load_tokenizer  # noqa: E402
from test_lm import make_llama, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "what is a class",
    "the name",
    "what is a class ",
    "the value of the object",
    "a module",
    "the name",
]


@pytest.fixture()
def setup(tmp_path: Path):
    teacher = make_llama(tmp_path / "teacher", make_tokenizer())
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = GenerateConfig(
        model=str(teacher),
        prompts=str(tmp_path / "prompts.jsonl"),
        out=str(tmp_path / "gen.jsonl"),
        batch_size=2,
        max_new_tokens=5,
        save_every=1,
    )
    return tmp_path, cfg, build_lm(str(teacher), None, {}, None), load_tokenizer(str(teacher))


class Counting(torch.nn.Module):
    """Counts the prompts the wrapped model is asked to complete; fails after ``fail_after`` batches."""

    def __init__(self, model, fail_after: int | None = None) -> None:
        super().__init__()
        self.model, self.fail_after, self.prompts, self.batches = model, fail_after, 0, 0

    def generate(self, **kwargs):
        if self.fail_after is not None and self.batches == self.fail_after:
            raise KeyboardInterrupt  # an interrupted run
        self.batches += 1
        self.prompts += len(kwargs["input_ids"])
        return self.model.generate(**kwargs)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dedup_resume_and_the_lm_task_reads_it(setup) -> None:
    root, cfg, model, tok = setup
    distinct = ["what is a class", "the name", "the value of the object", "a module"]
    wrapped = Counting(model, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, wrapped, tok)
    assert wrapped.prompts == 2 and len(records(root / "gen.jsonl")) == 2  # the first batch was saved
    assert not [p for p in root.iterdir() if p.name.startswith(".gen.jsonl")]  # no temp file left

    wrapped = Counting(model)
    result = generate(cfg, wrapped, tok)
    assert (
        wrapped.prompts == 2 and result["generated"] == 2 and result["skipped"] == 2
    )  # only what was missing
    got = records(root / "gen.jsonl")
    assert [r["prompt"] for r in got] == distinct  # each distinct prompt once, in prompt-file order
    assert all(isinstance(r["completion"], str) for r in got)

    again = Counting(model)
    assert generate(cfg, again, tok)["generated"] == 0 and again.prompts == 0
    assert records(root / "gen.jsonl") == got

    # greedy completions equal the model's own, one prompt at a time
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a module"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        new = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, ids.shape[1] :].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert got[3]["completion"] == tok.decode(new, skip_special_tokens=True).strip()

    data = load_lm_data(
        {"source": "jsonl", "root": str(root / "gen.jsonl"), "val_fraction": 0.25, "test_fraction": 0.25},
        [{"model": cfg.model}],
    )
    item = data.train[0]
    assert (item["labels"] != IGNORE_INDEX).any() and (item["labels"][:3] == IGNORE_INDEX).all()


def test_cli_and_config_errors(setup) -> None:
    root, cfg, _, _ = setup
    (root / "gen.yaml").write_text(json.dumps(cfg.model_dump()))
    result = CliRunner().invoke(app, ["generate", str(root / "gen.yaml"), "--set", "max_new_tokens=3"])
    assert result.exit_code == 0, result.output[-2000:]
    assert "4 prompt(s) generated" in result.output and len(records(root / "gen.jsonl")) == 4
    with pytest.raises(ProtegeError, match="max_new_token"):
        load_generate_config(root / "gen.yaml", ["max_new_token=3"])
    (root / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ProtegeError, match="not written by protege generate"):
        generate(cfg.model_copy(update={"out": str(root / "bad.jsonl")}))
