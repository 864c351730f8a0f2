"""On-policy distillation (GKD) on tiny random LLaMAs: with lambda = 1 the tokens the loss sees are the
student's own generations after each prompt, the prompt positions are masked, and label terms skip
those batches; lambda = 0 leaves the data as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import protege as pg  # noqa: E402
from protege.core.on_policy import OnPolicy  # noqa: E402
from protege.engine import make_loader  # noqa: E402
from protege.errors import ProtegeError  # noqa: E402
from protege.losses.sequence import IGNORE_INDEX  # noqa: E402
from protege.tasks.lm import LMTask, build_lm, load_lm_data  # noqa: E402
from test_lm import make_llama, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("onpolicy")
    tokenizer = make_tokenizer()
    teacher_dir = make_llama(root / "teacher", tokenizer)
    student_dir = make_llama(root / "student", tokenizer, layers=1, seed=3)
    rows = [("what is a class", "a class is an object"), ("the name", "the value of the name")] * 4
    (root / "qa.jsonl").write_text("".join(f'{{"prompt": "{p}", "completion": "{c}"}}\n' for p, c in rows))
    data = load_lm_data({"source": "jsonl", "root": str(root / "qa.jsonl")}, [{"model": str(teacher_dir)}])
    teacher = build_lm(str(teacher_dir), None, {}, data).eval()
    student = build_lm(str(student_dir), None, {}, data)
    return data, teacher, student


class Recorder(LMTask):
    """The lm task, remembering what the student was run on."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def split(self, batch):
        self.seen.append({k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")})
        return super().split(batch)


def test_lambda_one_trains_on_the_students_own_generations(pair) -> None:
    data, teacher, student = pair
    task = Recorder()
    eos = data.tokenizer.eos_token_id  # 3; the random model's config says 2
    settings = OnPolicy(lam=1.0, max_new_tokens=6, temperature=0.0, eos_token_ids=(eos,))
    distiller = pg.Distiller(
        student, teacher, [pg.Term("ce", 0.5), pg.Term("jsd", 1.0, beta=0.5)], task=task, on_policy=settings
    )
    distiller.train()
    batch = next(iter(make_loader(data.train, 4, shuffle=False)))
    _, losses = distiller(batch)
    seen = task.seen[-1]
    assert losses["ce"].item() == 0.0 and losses["jsd"].item() > 0  # labels are the student's: CE skipped
    student.eval()
    for row in range(len(seen["input_ids"])):
        original = batch["labels"][row]
        start = int((original != IGNORE_INDEX).nonzero()[0])  # the prompt: the tokens before the completion
        prompt = batch["input_ids"][row, :start]
        assert torch.equal(seen["input_ids"][row, :start], prompt)
        with torch.no_grad():  # greedy: the student's own continuation, independently
            own = student.generate(
                prompt[None],
                attention_mask=torch.ones_like(prompt)[None],
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=data.tokenizer.eos_token_id,
            )[0, start:]
        eos = (own == data.tokenizer.eos_token_id).nonzero()
        own = own[: int(eos[0]) + 1] if len(eos) else own
        n = int(seen["attention_mask"][row].sum())
        assert torch.equal(seen["input_ids"][row, start:n], own)
        assert (seen["labels"][row, :start] == IGNORE_INDEX).all()  # prompt masked
        assert torch.equal(seen["labels"][row, start:n], own)  # the loss's targets: the generation
        assert (seen["labels"][row, n:] == IGNORE_INDEX).all()
    assert not torch.equal(seen["input_ids"], batch["input_ids"])


def test_lambda_zero_and_evaluation_keep_the_data(pair) -> None:
    data, teacher, student = pair
    task = Recorder()
    distiller = pg.Distiller(student, teacher, [pg.Term("jsd", 1.0)], task=task, on_policy=OnPolicy(lam=0.0))
    distiller.train()
    batch = next(iter(make_loader(data.train, 4, shuffle=False)))
    distiller(batch)
    assert torch.equal(task.seen[-1]["input_ids"], batch["input_ids"])
    rolled = pg.Distiller(student, teacher, [pg.Term("jsd", 1.0)], task=task, on_policy=OnPolicy(lam=1.0))
    rolled.eval()  # evaluation never generates
    rolled(batch)
    assert torch.equal(task.seen[-1]["input_ids"], batch["input_ids"])


def test_packed_text_prompt_and_bad_settings(pair) -> None:
    data, _, student = pair
    ids = torch.arange(10, 22)[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    out = LMTask().rollout(student, batch, OnPolicy(max_new_tokens=3, temperature=1.0, prompt_length=5))
    assert torch.equal(out["input_ids"][0, :5], ids[0, :5]) and (out["labels"][0, :5] == IGNORE_INDEX).all()
    assert 1 <= int((out["labels"] != IGNORE_INDEX).sum()) <= 3
    with pytest.raises(ProtegeError, match="lambda must be in"):
        OnPolicy(lam=1.5)
    with pytest.raises(ProtegeError, match="live teacher"):
        pg.Distiller(
            student, None, [pg.Term("jsd", 1.0)], task=LMTask(), cached_teachers=1, on_policy=OnPolicy()
        )


def test_config_on_policy_reaches_the_distiller(tmp_path: Path) -> None:
    from protege.config import RunConfig

    cfg = RunConfig.model_validate(
        {
            "name": "x",
            "task": "lm",
            "data": {"source": "text", "root": "x"},
            "teacher": {"model": "t"},
            "student": {"model": "teacher"},
            "on_policy": {"lambda": 0.25, "max_new_tokens": 8, "temperature": 0.7},
        }
    )
    assert cfg.on_policy is not None and cfg.on_policy.lam == 0.25 and cfg.on_policy.max_new_tokens == 8
