"""ARTE (protege.arte) on a tiny random LLaMA: the whole loop with DPO through TRL (the teacher's
weights change and reload from teacher-dpo/), batched preference scores equal to one-at-a-time
ones, resume after an interruption, and the bad-input cases (exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("trl")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import protege.arte as arte  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from protege.arte import ArteConfig, load_arte_config, run_arte  # noqa: E402
from protege.data.reasoning import TASKS, Example, format_question  # noqa: E402
from protege.errors import ProtegeError  # noqa: E402
from protege.tasks.lm import load_lm_data  # noqa: E402
from test_lm import SPECIALS, TEMPLATE, make_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).parent.parent / "configs" / "arte" / "tiny.yaml"
TASK_NAMES = ["boolean_expressions", "multistep_arithmetic"]


def reasoning_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the tasks' own text, so the tiny models write real task words."""
    lines = [f"{e.question} {e.rationale}" for t in TASKS.values() for e in t.make(40, seed=9)]
    lines += [arte._question_prompt(t, []) + " " + t.instruction for t in TASKS.values()]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=250, special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arte")
    return {
        "chat": make_llama(root / "teacher", reasoning_tokenizer(), vocab=256, layers=2),
        "plain": make_llama(root / "plain", reasoning_tokenizer(chat=False), vocab=256, layers=2),
    }


def tiny(teacher: Path, **changes) -> dict:
    """configs/arte/tiny.yaml with this teacher and ``changes``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.update(teacher=str(teacher), **changes)
    return cfg


def varied_scores(student, cfg, drafts, preference) -> list[float]:
    """Stand-in for the student's preference: distinct scores, so every prompt and question has a pair."""
    return [(i % 4) / 3 for i in range(len(drafts))]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_loop_with_dpo_resumes_after_an_interruption(teachers, tmp_path: Path, monkeypatch) -> None:
    cfg = ArteConfig.model_validate(tiny(teachers["chat"], baseline=True))
    run_dir = tmp_path / "run"
    drafted = []
    real_draft = arte._draft
    monkeypatch.setattr(arte, "_draft", lambda *a: drafted.append(1) or real_draft(*a))

    def interrupted(*_a):
        raise KeyboardInterrupt  # killed while the student scores the drafts

    monkeypatch.setattr(arte, "_icl_scores", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_arte(cfg, run_dir)
    assert drafted == [1] and (run_dir / "drafts.jsonl").is_file()
    assert not (run_dir / "preferences.jsonl").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp file left
    drafts = [json.loads(line) for line in (run_dir / "drafts.jsonl").read_text().splitlines()]
    assert len(drafts) == 2 * 1 * 2 * 2  # tasks x prompts x questions x rationales

    monkeypatch.setattr(arte, "_icl_scores", varied_scores)
    summary = run_arte(cfg, run_dir)
    assert drafted == [1, 1]  # drafts were not written again; the aligned teacher's redraft was
    assert [json.loads(line) for line in (run_dir / "drafts.jsonl").read_text().splitlines()] == drafts

    pairs = [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]
    assert {p["kind"] for p in pairs} == {"question", "rationale"}
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    best = max(drafts[:4], key=lambda d: varied_scores(None, None, drafts, None)[drafts.index(d)])
    assert any(p["chosen"] == best["rationale"] and p["kind"] == "rationale" for p in pairs)

    before, after = weights(teachers["chat"]), weights(run_dir / "teacher-dpo")
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0  # DPO moved the teacher
    assert summary["dpo"]["steps"] == 2 and summary["dpo"]["pairs"] == len(pairs)
    assert summary["dpo_s"] > 0 and summary["generation_s"] > 0
    assert summary["scores"]["before"]["all"]["n"] == 8 and summary["scores"]["after"]["all"]["n"] == 8

    data = load_lm_data(
        {"source": "jsonl", "root": str(run_dir / "generated.jsonl")},
        [{"model": str(run_dir / "teacher-dpo")}],
    )
    assert len(data.train) + len(data.val) + len(data.test) == 6  # 3 per task
    record = json.loads((run_dir / "generated.jsonl").read_text().splitlines()[0])
    assert record["prompt"] == format_question(TASKS[record["task"]], record["question"])
    for name in ("student", "student-unaligned"):
        assert AutoModelForCausalLM.from_pretrained(run_dir / name / "model").config.num_hidden_layers == 1
    for name in ("init", "arte", "unaligned"):
        assert set(summary["eval"][name]["exact_match"]) == {*TASK_NAMES, "date_arithmetic"}
    assert json.loads((run_dir / "summary.json").read_text())["pairs"] == summary["pairs"]

    stamp = (run_dir / "student" / "model").stat().st_mtime_ns
    manifest = (run_dir / "arte.json").read_text()
    run_arte(cfg, run_dir)  # everything done: nothing redone
    assert drafted == [1, 1] and (run_dir / "student" / "model").stat().st_mtime_ns == stamp
    assert (run_dir / "arte.json").read_text() == manifest

    changed = ArteConfig.model_validate(
        tiny(teachers["chat"], baseline=True, dpo={**tiny(teachers["chat"])["dpo"], "beta": 0.5})
    )
    with pytest.raises(
        ProtegeError, match=r"pairs.jsonl was made with other settings \(dpo.beta: 0.1 -> 0.5\)"
    ):
        run_arte(changed, run_dir)
    assert (run_dir / "arte.json").read_text() == manifest


def test_preference_scores_are_one_shot_exact_match(teachers) -> None:
    """The batched scores equal each draft's one-at-a-time greedy exact match on the preference set."""
    cfg = ArteConfig.model_validate(
        tiny(teachers["chat"], preference={"size": 3, "max_new_tokens": 6, "batch_size": 4})
    )
    student = arte._LM(str(teachers["chat"]), torch.device("cpu"))
    boolean = TASKS["boolean_expressions"]
    preference = {"boolean_expressions": boolean.splits(4, 3, 3).preference}
    drafts = [
        {"task": "boolean_expressions", "question": e.question, "rationale": e.rationale}
        for e in boolean.make(3, seed=5)
    ]
    got = arte._icl_scores(student, cfg, drafts, preference)
    tok, model = student.tokenizer, student.model
    for d, score in zip(drafts, got):
        hits = []
        for p in preference["boolean_expressions"]:
            text = format_question(boolean, p.question, [Example(d["question"], d["rationale"], "")])
            ids = tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
                return_tensors="pt",
            )["input_ids"]
            new = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            row = new[0, ids.shape[1] :].tolist()
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            answer = tok.decode(row, skip_special_tokens=True).split("\nQ:")[0]
            hits.append(boolean.score(answer, p.answer))
        assert score == sum(hits) / len(hits)


def test_equal_scores_skip_dpo_and_say_so(teachers, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(arte, "_icl_scores", lambda s, c, drafts, p: [0.5] * len(drafts))
    (tmp_path / "arte.yaml").write_text(json.dumps(tiny(teachers["chat"], score_aligned=False)))
    code, _ = run_cli(
        monkeypatch, capsys, "arte", str(tmp_path / "arte.yaml"), "--output-dir", str(tmp_path / "run")
    )
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "no preference pairs" in summary["dpo"]["skipped"] and summary["pairs"] == {
        "question": 0,
        "rationale": 0,
    }
    assert not (tmp_path / "run" / "teacher-dpo").exists() and summary["dpo_s"] < 1
    assert (tmp_path / "run" / "generated.jsonl").is_file()  # the unaligned teacher wrote the set


def test_bad_input_exits_2_and_writes_nothing(teachers, tmp_path: Path, monkeypatch, capsys) -> None:
    def cli(cfg: dict, *extra: str) -> tuple[int, str]:
        (tmp_path / "arte.yaml").write_text(json.dumps(cfg))
        return run_cli(
            monkeypatch,
            capsys,
            "arte",
            str(tmp_path / "arte.yaml"),
            "--output-dir",
            str(tmp_path / "run"),
            *extra,
        )

    code, err = cli(tiny(teachers["plain"]))
    assert code == 2 and "no chat template" in err and "teacher_prompt_format" in err
    (tmp_path / "prefs.jsonl").write_text(
        json.dumps({"task": "boolean_expressions", "question": "True and False is", "answer": "False"})
        + "\n"
        + json.dumps({"task": "multistep_arithmetic", "question": "((1 + 2) * (3 - 4)) ="})
        + "\n"
    )
    code, err = cli(tiny(teachers["chat"], preference={"file": str(tmp_path / "prefs.jsonl")}))
    assert code == 2 and "prefs.jsonl:2 has no answer" in err
    code, err = cli(tiny(teachers["chat"]), "--set", "tasks=[boolean_expresions]")
    assert code == 2 and "did you mean 'boolean_expressions'" in err
    code, err = cli(tiny(teachers["chat"], teacher_prompt_format="no slot"))
    assert code == 2 and "{prompt}" in err
    code, err = cli(tiny(teachers["chat"], sft={"epochs": 0}))
    assert code == 2 and "epochs" in err
    assert not (tmp_path / "run").exists()  # nothing half written
    with pytest.raises(ProtegeError, match="dpo"):
        load_arte_config(tmp_path / "arte.yaml", ["dpo.bta=0.2"])


def test_a_template_less_teacher_with_a_prompt_format_drafts(teachers, tmp_path: Path) -> None:
    cfg = ArteConfig.model_validate(
        tiny(teachers["plain"], teacher_prompt_format="Instruction: {prompt}\nResponse:")
    )
    lm = arte._LM(str(teachers["plain"]), torch.device("cpu"), cfg.teacher_prompt_format)
    assert lm.render("hi") == "Instruction: hi\nResponse:"
    records = arte._draft(lm, cfg, [TASKS["word_sorting"]], {"word_sorting": TASKS["word_sorting"].make(4)})
    assert len(records) == 4 and all(r["question_prompt"].startswith("Task: Sort") for r in records)


WARMUP = {"max_chars": 3000, "run": {"data": {"batch_size": 4, "options": {"block_size": 16}}}}


def test_student_warmup_is_the_student_scored_and_fine_tuned(teachers, tmp_path: Path, monkeypatch) -> None:
    """student_warmup distils student-init on general text (pydoc) into student-warm/; step 2 scores the
    drafts with that student, the fine-tuning starts from it; a rerun skips it, changed settings are refused."""
    cfg = ArteConfig.model_validate(tiny(teachers["chat"], student_warmup=WARMUP, score_aligned=False))
    run_dir = tmp_path / "run"
    seen = []

    def scores(student, c, drafts, preference):
        seen.append((student.path, {k: v.clone() for k, v in student.model.state_dict().items()}))
        return varied_scores(student, c, drafts, preference)

    monkeypatch.setattr(arte, "_icl_scores", scores)
    run_arte(cfg, run_dir)
    warm = run_dir / "student-warm" / "model"
    assert arte.student_base(cfg, run_dir) == warm
    assert [path for path, _ in seen] == [str(warm)]
    used, init, warmed = seen[0][1], weights(run_dir / "student-init"), weights(warm)
    assert set(used) == set(warmed) == set(init)
    assert all(torch.equal(used[k], warmed[k]) for k in used)  # the scored student is student-warm's
    assert max((warmed[k] - init[k]).abs().max().item() for k in init) > 0  # and the warm-up moved it
    texts = [json.loads(line)["text"] for line in (run_dir / arte.WARMUP_TEXT).read_text().splitlines()]
    assert sum(map(len, texts[:-1])) < 3000 <= sum(map(len, texts))  # pydoc paragraphs up to max_chars
    stored = yaml.safe_load((run_dir / "student" / "config.yaml").read_text())
    assert stored["student"]["model"] == str(warm)  # the fine-tuning starts from the warmed student
    manifest = json.loads((run_dir / "arte.json").read_text())
    assert manifest["steps"]["student_warmup"]["settings"]["student_warmup"]["max_chars"] == 3000
    assert manifest["steps"]["student_warmup"]["test"]["last"]["kl"] >= 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student_warmup"] == manifest["steps"]["student_warmup"]["test"]

    stamp = warm.stat().st_mtime_ns
    run_arte(cfg, run_dir)  # done: nothing redone
    assert len(seen) == 1 and warm.stat().st_mtime_ns == stamp
    changed = ArteConfig.model_validate(
        tiny(teachers["chat"], student_warmup={**WARMUP, "max_chars": 4000}, score_aligned=False)
    )
    with pytest.raises(
        ProtegeError, match=r"model was made with other settings \(student_warmup.max_chars: 3000 -> 4000\)"
    ):
        run_arte(changed, run_dir)
    assert (run_dir / "arte.json").read_text() == json.dumps(manifest, indent=1) + "\n"


def test_student_warmup_bad_input_writes_nothing(teachers, tmp_path: Path) -> None:
    for warmup, message in [
        ({"corpora": ["pydoc-topic"]}, "neither a built-in corpus"),
        ({"run": {"epochs": 0}}, "student_warmup.run"),
    ]:
        cfg = ArteConfig.model_validate(tiny(teachers["chat"], student_warmup=warmup))
        with pytest.raises(ProtegeError, match=message):
            run_arte(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    assert ArteConfig.model_validate(tiny(teachers["chat"])).student_warmup is None  # off by default
