"""ARTE: teacher-generated training data aligned to the student (``protege arte arte.yaml``).

Liu et al., "Aligning Teacher with Student Preferences for Tailored Training Data Generation"
(ARTE, arXiv 2406.19227). The teacher LM writes training examples for a reasoning task, the
student says which of them it learns from, the teacher is aligned to that with DPO, and the
aligned teacher writes the student's training set:

1. **drafts** (``drafts.jsonl``): per task, ``drafts.prompts`` question prompts, each showing
   ``drafts.seed_examples`` questions of the task's seed pool (the paper: BBH's 3 worked examples);
   the teacher samples ``drafts.questions`` new questions per prompt, then, in a second generation
   whose prompt shows the same seed examples worked out, ``drafts.rationales`` rationales per
   question (the "question" and "rationale" prompts of ARTE are separate generations).
2. **preferences** (``preferences.jsonl``): each draft's score is the student's one-shot
   in-context exact match on the task's preference set (``preference.size``, the paper's 40) with
   that draft (question + rationale) as the one demonstration; greedy, ``preference.max_new_tokens``
   new tokens, batched.
3. **alignment** (``pairs.jsonl``, ``teacher-dpo/``): per question prompt, the best- vs the
   worst-scored question (a question's score: the mean over its rationales); per question, the best
   vs the worst rationale. Equal scores make no pair. TRL's ``DPOTrainer`` trains the teacher on
   those pairs (the prompt as the teacher saw it, its own outputs as chosen/rejected) and the result
   is saved with ``save_pretrained`` (+ tokenizer). When no draft beats another (every score equal:
   nothing to learn), DPO is skipped and ``summary.json`` says so (``dpo.skipped``); the
   unaligned teacher then writes the training set, rather than DPO on noise.
4. **generated** (``generated.jsonl``): the aligned teacher writes ``train_examples`` examples per
   task the same two-step way. With ``verify`` (default), a question that the task's solver parses
   is kept only when the rationale's answer is the solver's; a question it cannot parse is kept when
   the rationale states an answer at all (``verified: false``). Questions of the preference and test
   sets, and repeats, are dropped. Up to ``max_rounds`` rounds are drawn to fill the count.
   ``baseline: true`` also writes ``generated-unaligned.jsonl``: the same recipe with the teacher as
   it was (the paper's "unaligned teacher" row), and trains a student on it.
5. **student** (``student/``, a normal protege run directory of the ``lm`` task): the student is
   fine-tuned on the prompt/completion records (loss on the rationale only), with KD terms from the
   aligned teacher when ``sft.terms`` names any besides ``ce``. ``eval.json``: the fine-tuned (and
   the initial) student's exact match on the held-out test sets of the trained tasks and of
   ``held_out_tasks`` (tasks never used for alignment: the paper's generalisation claim).

The student starts as ``student-init/`` (built once: e.g. a layer-selected teacher,
``student: {model: teacher, kwargs: {layers: [...]}}``); a ``.gguf`` teacher (or ``smollm2``) is
de-quantized once into ``teacher/``. ``student_warmup`` (off unless set) first distils that student
from the teacher on general text (``student_warmup.corpora``, default the pydoc topics; forward KL
plus a little CE through the ``lm`` task) into ``student-warm/`` (a protege run directory): a
layer-selected student writes noise until it is healed, and a student that scores 0 whatever the
demonstration gives ARTE no preference. Steps 2 and 5 and ``eval-init`` then use the warmed
student. ``score_aligned`` (default on) lets the aligned teacher draft the same prompts again and
the student score them (``preferences-aligned.jsonl``): the per-draft score distribution before vs
after alignment, in ``summary.json``.

**Resumable**: every artefact is written atomically (files through a rename, directories staged
beside their place); ``arte.json`` records, per step, the settings it was made from and how long it
took. A step whose artefact exists with the same settings is skipped; an artefact made from other
settings stops the run before anything is written (a :class:`ProtegeError` naming the keys that
differ): use another run directory, or delete that artefact and the later ones.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .analysis.runs import run_or_reuse
from .config import (
    RunConfig,
    load_yaml_model,
    validate_config,
)
from .data.reasoning import Example, ReasoningTask, format_question, get_task
from .data.text import BUILTIN_CORPORA, load_corpora
from .engine.loop import console
from .errors import ProtegeError
from .files import atomic_write_text, jsonl_objects, replace_dir, sha256_file, staged_dir
from .tasks.lm import (
    build_lm,
    complete,
    convert_gguf,
    load_tokenizer,
    render_prompt,
    resolve_model,
)

__all__ = [
    "ArteConfig",
    "evaluate_student",
    "load_arte_config",
    "run_arte",
    "student_base",
    "train_student",
    "warm_up_student",
]

MANIFEST = "arte.json"
#: the warm-up's text (``{"text": paragraph}`` records), written into the run directory
WARMUP_TEXT = "student-warm.jsonl"
FORMAT = "protege-arte"


class StudentSpec(BaseModel):
    """The student as a run config's ``student:`` names it (``model: teacher`` builds it from the teacher)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("teacher", description="a model directory / .gguf / hub id, or teacher")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="layers: [...] (layer selection) or config: {...} overrides"
    )


class WarmupSettings(BaseModel):
    """The student's warm-up (``student_warmup:``): KD from the teacher on general text before step 2."""

    model_config = ConfigDict(extra="forbid")
    corpora: list[str] = Field(
        default_factory=lambda: ["pydoc-topics"],
        min_length=1,
        description="built-in corpora (protege.data.text, their train part) or text files / folders",
    )
    max_chars: int = Field(
        100_000, ge=1, description="the first paragraphs up to this many characters (the warm-up's size)"
    )
    run: dict[str, Any] = Field(
        default_factory=dict,
        description="run config keys of the warm-up (terms, epochs, optim, data, ...) over the defaults",
    )


class DraftSettings(BaseModel):
    """How many drafts the teacher writes per task (step 1)."""

    model_config = ConfigDict(extra="forbid")
    prompts: int = Field(2, ge=1, description="question prompts per task (each its own seed examples)")
    questions: int = Field(4, ge=1, description="questions sampled per prompt")
    rationales: int = Field(2, ge=1, description="rationales sampled per question")
    seed_examples: int = Field(3, ge=1, description="seed examples shown per prompt (the paper: 3, BBH's)")


class GenerationSettings(BaseModel):
    """The teacher's sampling (drafts and the training set)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0, description="0: greedy (then all samples of a prompt are equal)")
    top_p: float = Field(0.95, gt=0, le=1)
    question_max_new_tokens: int = Field(64, ge=1)
    rationale_max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)


class PreferenceSettings(BaseModel):
    """The student's preference measurement (step 2)."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(40, ge=1, description="preference questions per task (the paper: 40)")
    file: str | None = Field(
        None, description="a .jsonl preference set {task, question, answer} instead of the built-in one"
    )
    max_new_tokens: int = Field(
        64, ge=1, description="the student's greedy answer length (short: it is many)"
    )
    batch_size: int = Field(16, ge=1)


class DPOSettings(BaseModel):
    """TRL ``DPOConfig`` values for aligning the teacher (step 3)."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="DPO's KL strength (Rafailov et al.; TRL's default)")
    learning_rate: float = Field(5e-6, gt=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="> 0: stop after this many steps (overrides epochs)")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    loss_type: str = Field("sigmoid", description="TRL loss_type (sigmoid: the DPO paper's)")
    max_length: int = Field(512, ge=8, description="prompt + completion tokens at most")


class ArteConfig(BaseModel):
    """What ``protege arte`` reads (module docstring)."""

    model_config = ConfigDict(extra="forbid")
    teacher: str = Field(description="the teacher LM: a directory, a .gguf file, smollm2, or a hub id")
    student: StudentSpec = Field(default_factory=StudentSpec)
    student_warmup: WarmupSettings | None = Field(
        None,
        description="distil the built student from the teacher on general text first (student-warm/); "
        "none: the student as built",
    )
    teacher_prompt_format: str | None = Field(
        None, description="for a teacher without chat template: how a prompt is shown, with {prompt}"
    )
    tasks: list[str] = Field(
        default_factory=lambda: [
            "boolean_expressions",
            "multistep_arithmetic",
            "word_sorting",
            "object_counting",
        ],
        min_length=1,
        description="the reasoning tasks aligned and trained on (protege.data.reasoning)",
    )
    held_out_tasks: list[str] = Field(
        default_factory=lambda: ["date_arithmetic"], description="tasks only evaluated (generalisation)"
    )
    seed: int = Field(0, description="sampling seed")
    data_seed: int = Field(0, description="seed of the tasks' seed pools, preference and test sets")
    seed_pool: int = Field(8, ge=1, description="seed examples per task the prompts draw from")
    test_size: int = Field(50, ge=1, description="held-out test questions per task")
    drafts: DraftSettings = Field(default_factory=DraftSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    train_examples: int = Field(64, ge=1, description="training examples per task the aligned teacher writes")
    verify: bool = Field(True, description="drop examples whose answer the task's solver contradicts")
    max_rounds: int = Field(4, ge=1, description="generation rounds at most to reach train_examples")
    baseline: bool = Field(False, description="also the unaligned teacher's set and a student trained on it")
    score_aligned: bool = Field(True, description="score the aligned teacher's drafts (before/after)")
    eval_max_new_tokens: int = Field(96, ge=1, description="the student's greedy answer length at test")
    sft: dict[str, Any] = Field(
        default_factory=dict,
        description="run config keys of the student's fine-tuning (epochs, optim, terms, data, ...)",
    )
    device: str | None = Field(None, description="cuda / cpu; default: cuda when available")

    @field_validator("teacher_prompt_format")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{prompt}" not in value:
            raise ValueError("teacher_prompt_format must contain {prompt}, where the prompt goes")
        return value


def load_arte_config(path: str | Path, overrides: Sequence[str] = ()) -> ArteConfig:
    """Read an ARTE YAML and apply ``--set KEY=VALUE`` overrides."""
    return load_yaml_model(path, overrides, ArteConfig, "ARTE config", "teacher:, student:, tasks: …")


# --------------------------------------------------------------------------- the manifest


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


class _Manifest:
    """``arte.json``: per step, the settings its artefact was made from and its seconds."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / MANIFEST
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                data = None
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ProtegeError(f"{self.path} is not a protege arte manifest: use another run directory")
            self.steps = data["steps"]

    def check(self, step: str, artefact: Path, settings: dict[str, Any]) -> bool:
        """Whether ``artefact`` is done with these ``settings``; raise when it was made with others."""
        if not artefact.exists():
            return False
        entry = self.steps.get(step)
        if entry is None and self.path.is_file():  # interrupted between the artefact and its record
            return False
        if entry is None:
            raise ProtegeError(
                f"{artefact} exists but {self.path} does not record it: not written by protege arte; "
                "move it away or use another run directory"
            )
        old, new = _flat(entry["settings"]), _flat(json.loads(json.dumps(settings)))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
            raise ProtegeError(
                f"{artefact} was made with other settings ({shown}{' …' if len(changed) > 5 else ''}). "
                f"Use another run directory, or delete {artefact.name} and the artefacts after it "
                "to redo them; nothing was written"
            )
        return True

    def done(self, step: str, settings: dict[str, Any], seconds: float, **extra: Any) -> None:
        self.steps[step] = {"settings": json.loads(json.dumps(settings)), "seconds": seconds, **extra}
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "steps": self.steps}, indent=1) + "\n")


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [r for _, r in jsonl_objects(path)]


# --------------------------------------------------------------------------- models and generation


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers/TRL progress and info logs off while a step runs (protege prints its own)."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    level = transformers.logging.get_verbosity()
    hub_bars_off = are_progress_bars_disabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


class _LM:
    """A loaded causal LM and its tokenizer, with how a prompt is shown to it."""

    def __init__(self, path: str, device: torch.device, prompt_format: str | None = None) -> None:
        self.path, self.device, self.prompt_format = path, device, prompt_format
        with _quiet():
            self.tokenizer = load_tokenizer(path)
            self.model = build_lm(path, None, {}, None).to(device).eval()

    def render(self, prompt: str) -> str:
        if self.prompt_format is not None:
            return self.prompt_format.replace("{prompt}", prompt)
        return render_prompt(self.tokenizer, prompt, chat=True)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        batch: int,
    ) -> list[str]:
        """Completions of ``prompts`` (rendered here), in order. They are generated shortest first
        (less padding) in batches of ``batch``; batch ``b`` is seeded ``seed + b``."""
        rows = [self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = [""] * len(rows)
        for b, at in enumerate(range(0, len(order), batch)):
            chunk = order[at : at + batch]
            texts, _ = complete(
                self.model,
                self.tokenizer,
                [rows[i] for i in chunk],
                max_new_tokens,
                temperature,
                top_p,
                seed + b,
                self.device,
            )
            for i, text in zip(chunk, texts):
                out[i] = text
        return out


def _build_student(spec: StudentSpec, teacher_dir: str, teacher_tokenizer: Any, out: Path) -> int:
    """Build the student ``spec`` names (e.g. a layer-selected teacher) and save it with its tokenizer
    at ``out`` (staged, renamed); return its parameter count."""
    reference = SimpleNamespace(reference=teacher_dir, vocab_size=0)
    with _quiet():
        model = build_lm(spec.model, None, spec.kwargs, reference)
        tokenizer = teacher_tokenizer if spec.model == "teacher" else load_tokenizer(spec.model)
    with staged_dir(out) as tmp, _quiet():
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, out)
    return sum(p.numel() for p in model.parameters())


def _has_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _answer_part(text: str) -> str:
    """The model's answer to the last question: what it writes before starting a question of its own."""
    return text.split("\nQ:")[0]


def _question_prompt(task: ReasoningTask, seeds: Sequence[Example]) -> str:
    shown = "".join(f"Q: {e.question}\n" for e in seeds)
    return (
        f"Task: {task.instruction}\n\nExample questions of this task:\n{shown}\n"
        "Write one new question of the same kind, different from the examples. "
        "Reply with the question only, on one line starting with 'Q:'."
    )


def _rationale_prompt(task: ReasoningTask, seeds: Sequence[Example], question: str) -> str:
    return (
        format_question(task, question, seeds)
        + "\n\nAnswer the last question step by step like the examples, ending with 'So the answer is ...'."
    )


def _clean_question(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0]
    for prefix in ("Q:", "Question:", "New question:"):
        if first.lower().startswith(prefix.lower()):
            first = first[len(prefix) :].strip()
    return first


# --------------------------------------------------------------------------- the steps


def _draft(
    lm: _LM, cfg: ArteConfig, tasks: Sequence[ReasoningTask], pools: Mapping[str, list[Example]]
) -> list[dict[str, Any]]:
    """Step 1 (and the aligned teacher's redrafting): questions, then rationales, per task."""
    slots: list[tuple[ReasoningTask, int, int, list[Example]]] = []
    for task in tasks:
        rng = random.Random(f"arte-drafts:{cfg.seed}:{task.name}")
        pool = pools[task.name]
        for g in range(cfg.drafts.prompts):
            seeds = rng.sample(pool, min(cfg.drafts.seed_examples, len(pool)))
            slots += [(task, g, q, seeds) for q in range(cfg.drafts.questions)]
    gen = cfg.generation
    q_prompts = [_question_prompt(task, seeds) for task, _, _, seeds in slots]
    raw = lm.generate(
        q_prompts, gen.question_max_new_tokens, gen.temperature, gen.top_p, cfg.seed, gen.batch_size
    )
    questions = [_clean_question(text) for text in raw]
    r_slots = [(i, r) for i in range(len(slots)) for r in range(cfg.drafts.rationales)]
    r_prompts = [_rationale_prompt(slots[i][0], slots[i][3], questions[i]) for i, _ in r_slots]
    rationales = lm.generate(
        r_prompts,
        gen.rationale_max_new_tokens,
        gen.temperature,
        gen.top_p,
        cfg.seed + 100_000,
        gen.batch_size,
    )
    records = []
    for (i, r), prompt, rationale in zip(r_slots, r_prompts, rationales):
        task, g, q, _ = slots[i]
        records.append(
            {
                "id": f"{task.name}/{g}/{q}/{r}",
                "task": task.name,
                "group": g,
                "question_index": q,
                "question_prompt": q_prompts[i],
                "question_raw": raw[i],
                "question": questions[i],
                "rationale_prompt": prompt,
                "rationale": rationale,
                "answer": task.extract_answer(_answer_part(rationale)),
                "solved": task.solve(questions[i]),
            }
        )
    return records


def _icl_scores(
    student: _LM,
    cfg: ArteConfig,
    drafts: Sequence[Mapping[str, Any]],
    preference: Mapping[str, list[Example]],
) -> list[float]:
    """Step 2: each draft's score, the student's one-shot exact match on its task's preference set
    with that draft as the demonstration (greedy; identical prompts are answered once)."""
    asked: dict[str, str] = {}
    for d in drafts:
        task = get_task(d["task"])
        demo = Example(d["question"], d["rationale"], "")
        for p in preference[task.name]:
            asked.setdefault(format_question(task, p.question, [demo]), "")
    prompts = list(asked)
    settings = cfg.preference
    for prompt, text in zip(
        prompts, student.generate(prompts, settings.max_new_tokens, 0.0, 1.0, 0, settings.batch_size)
    ):
        asked[prompt] = _answer_part(text)
    scores = []
    for d in drafts:
        task = get_task(d["task"])
        demo = Example(d["question"], d["rationale"], "")
        hits = [
            task.score(asked[format_question(task, p.question, [demo])], p.answer)
            for p in preference[task.name]
        ]
        scores.append(sum(hits) / len(hits))
    return scores


def _pairs(scored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Step 3's DPO pairs: best vs worst question per prompt, best vs worst rationale per question."""
    groups: dict[tuple[str, int], dict[int, list[Mapping[str, Any]]]] = {}
    for d in scored:
        groups.setdefault((d["task"], d["group"]), {}).setdefault(d["question_index"], []).append(d)
    pairs: list[dict[str, Any]] = []

    def pair(kind: str, task: str, prompt: str, best: tuple[float, str], worst: tuple[float, str]) -> None:
        if best[0] > worst[0] and best[1] != worst[1]:  # a tie (or the same text) teaches nothing
            pairs.append(
                {
                    "kind": kind,
                    "task": task,
                    "prompt": prompt,
                    "chosen": best[1],
                    "rejected": worst[1],
                    "chosen_score": best[0],
                    "rejected_score": worst[0],
                }
            )

    for (task, _), questions in groups.items():
        q_scores = [
            (statistics.mean(d["score"] for d in ds), ds[0]["question_raw"]) for ds in questions.values()
        ]
        prompt = next(iter(questions.values()))[0]["question_prompt"]
        pair("question", task, prompt, max(q_scores, key=lambda s: s[0]), min(q_scores, key=lambda s: s[0]))
        for ds in questions.values():
            r_scores = [(d["score"], d["rationale"]) for d in ds]
            pair(
                "rationale",
                task,
                ds[0]["rationale_prompt"],
                max(r_scores, key=lambda s: s[0]),
                min(r_scores, key=lambda s: s[0]),
            )
    return pairs


def _dpo(
    cfg: ArteConfig,
    teacher: str,
    pairs: Sequence[Mapping[str, Any]],
    render: Callable[[Any, str], str],
    out: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Step 3: TRL's DPOTrainer on the teacher; the aligned teacher saved at ``out`` (staged, renamed)."""
    try:
        import datasets
        from datasets import Dataset
        from transformers import PrinterCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        raise ProtegeError("protege arte aligns the teacher with TRL: pip install 'protege[llm]'") from e
    with _quiet():
        tokenizer = load_tokenizer(teacher)
        model = build_lm(teacher, None, {}, None)
    rows = [
        {"prompt": render(tokenizer, p["prompt"]), "chosen": p["chosen"], "rejected": p["rejected"]}
        for p in pairs
    ]
    d = cfg.dpo
    with staged_dir(out) as tmp, _quiet():
        datasets_bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        args = DPOConfig(
            output_dir=str(tmp / "trainer"),
            beta=d.beta,
            learning_rate=d.learning_rate,
            num_train_epochs=d.epochs,
            max_steps=d.max_steps,
            per_device_train_batch_size=d.batch_size,
            gradient_accumulation_steps=d.grad_accum,
            loss_type=[d.loss_type],
            max_length=d.max_length,
            seed=cfg.seed,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
        )
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        trainer.remove_callback(PrinterCallback)  # the loss dict per step on stdout
        result = trainer.train()
        if datasets_bars:
            datasets.enable_progress_bars()
        history = trainer.state.log_history
        model = trainer.model
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_text(tmp / "dpo_log.json", json.dumps(history, indent=1) + "\n")
        replace_dir(tmp, out)
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": int(result.global_step),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "pairs": len(rows),
    }


def _training_set(
    lm: _LM,
    cfg: ArteConfig,
    tasks: Sequence[ReasoningTask],
    pools: Mapping[str, list[Example]],
    exclude: set[str],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Step 4: ``train_examples`` verified examples per task (module docstring), and what was dropped."""
    kept: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tasks}
    stats = {t.name: dict.fromkeys(("drawn", "kept", "repeated", "no_answer", "wrong"), 0) for t in tasks}
    seen: set[str] = set(exclude)
    gen = cfg.generation
    for r in range(cfg.max_rounds):
        slots: list[tuple[ReasoningTask, list[Example]]] = []
        for task in tasks:
            for j in range(cfg.train_examples - len(kept[task.name])):
                rng = random.Random(f"arte-train:{cfg.seed}:{task.name}:{r}:{j}")
                slots.append(
                    (task, rng.sample(pools[task.name], min(cfg.drafts.seed_examples, len(pools[task.name]))))
                )
        if not slots:
            break
        seed = cfg.seed + 200_000 + 1000 * r
        raw = lm.generate(
            [_question_prompt(t, s) for t, s in slots],
            gen.question_max_new_tokens,
            gen.temperature,
            gen.top_p,
            seed,
            gen.batch_size,
        )
        questions = [_clean_question(text) for text in raw]
        rationales = lm.generate(
            [_rationale_prompt(t, s, q) for (t, s), q in zip(slots, questions)],
            gen.rationale_max_new_tokens,
            gen.temperature,
            gen.top_p,
            seed + 500,
            gen.batch_size,
        )
        for (task, _), question, rationale in zip(slots, questions, rationales):
            counts = stats[task.name]
            counts["drawn"] += 1
            rationale = _answer_part(rationale).strip()
            if not question or question in seen or not rationale:
                counts["repeated"] += 1
                continue
            answer = task.extract_answer(rationale)
            solved = task.solve(question)
            if cfg.verify and answer is None:
                counts["no_answer"] += 1
                continue
            if cfg.verify and solved is not None and answer != solved:
                counts["wrong"] += 1
                continue
            seen.add(question)
            counts["kept"] += 1
            kept[task.name].append(
                {
                    "task": task.name,
                    "prompt": format_question(task, question),
                    "completion": rationale,
                    "question": question,
                    "answer": answer,
                    "verified": solved is not None,
                }
            )
    return [rec for t in tasks for rec in kept[t.name]], stats


def student_base(config: ArteConfig, run_dir: str | Path) -> Path:
    """The student ARTE scores the drafts with, fine-tunes and evaluates as ``eval-init``: the
    warmed-up one (``run_dir/student-warm/model``) when ``student_warmup`` is set, else the student
    as built (``run_dir/student-init``)."""
    run_dir = Path(run_dir).expanduser()
    return (
        run_dir / "student-warm" / "model" if config.student_warmup is not None else run_dir / "student-init"
    )


def _check_corpora(corpora: Sequence[str]) -> None:
    for entry in corpora:
        if entry not in BUILTIN_CORPORA and not Path(entry).expanduser().exists():
            raise ProtegeError(
                f"student_warmup.corpora: {entry!r} is neither a built-in corpus "
                f"({', '.join(BUILTIN_CORPORA)}) nor an existing text file or folder"
            )


def _warmup_texts(settings: WarmupSettings) -> list[str]:
    """The warm-up's paragraphs: the corpora's training texts in order, up to ``max_chars``."""
    texts: list[str] = []
    total = 0
    for record in load_corpora(settings.corpora, "train"):
        if total >= settings.max_chars:
            break
        texts.append(record.text)
        total += len(record.text)
    if not texts:
        raise ProtegeError(
            f"student_warmup.corpora {settings.corpora} hold no text to warm the student up on"
        )
    return texts


def _warmup_config(cfg: ArteConfig, run_dir: Path, student: Path, teacher: str) -> RunConfig:
    """The warm-up run: the lm task on the warm-up text (packed blocks), KD from the teacher (forward
    KL on every token, plus a little next-token CE), ``student_warmup.run`` on top."""
    assert cfg.student_warmup is not None
    base: dict[str, Any] = {
        "name": "student-warm",
        "output_dir": str(run_dir),
        "task": "lm",
        "data": {
            "source": "jsonl",
            "root": str(run_dir / WARMUP_TEXT),
            "batch_size": 8,
            "eval_batch_size": 8,
            "val_fraction": 0.02,
            "test_fraction": 0.02,
            "options": {"block_size": 128, "tokenizer": str(student)},
        },
        "student": {"model": str(student)},
        "terms": [{"loss": "fkl", "weight": 1.0}, {"loss": "ce", "weight": 0.1}],
        "epochs": 1,
        "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.0},
        "schedule": {"name": "cosine"},
        "seed": cfg.seed,
        "measure_cost": False,
        "progress": False,
    }
    merged = _merge(base, cfg.student_warmup.run)
    if any(t.get("loss") != "ce" for t in merged["terms"]):  # KD terms read the teacher
        merged.setdefault("teacher", {"model": teacher})
    return validate_config(merged, "student_warmup.run (the student's warm-up)")


def warm_up_student(config: ArteConfig, run_dir: str | Path, teacher: str) -> dict[str, Any]:
    """Distil ``run_dir/student-init`` from ``teacher`` (a model directory) on general text: the
    paragraphs of ``student_warmup.corpora`` (up to ``max_chars``, written to ``run_dir/
    student-warm.jsonl``) through protege's ``lm`` task, into the protege run ``run_dir/student-warm``
    (its model: ``run_dir/student-warm/model``). A layer-selected student has lost most of its
    teacher's layers and writes noise at first; this heals it before it is asked to learn from one
    demonstration. A finished run of the same config is reused, an interrupted one resumed.
    Returns the run's ``summary.json``."""
    if config.student_warmup is None:
        raise ProtegeError("student_warmup is not set: nothing to warm up")
    run_dir = Path(run_dir).expanduser()
    init = run_dir / "student-init"
    if not init.is_dir():
        raise ProtegeError(f"{init} not found: run protege arte on {run_dir} first (it builds the student)")
    _check_corpora(config.student_warmup.corpora)
    run_cfg = _warmup_config(config, run_dir, init, teacher)
    _write_jsonl(run_dir / WARMUP_TEXT, [{"text": t} for t in _warmup_texts(config.student_warmup)])
    return run_or_reuse(run_cfg, "distill" if run_cfg.teacher is not None else "train")


def _sft_config(
    cfg: ArteConfig, run_dir: Path, name: str, data: Path, student: Path, teacher: str
) -> RunConfig:
    """The student's fine-tuning run: the lm task on prompt/completion records, cfg.sft on top."""
    base: dict[str, Any] = {
        "name": name,
        "output_dir": str(run_dir),
        "task": "lm",
        "data": {
            "source": "jsonl",
            "root": str(data),
            "batch_size": 8,
            "eval_batch_size": 16,
            "val_fraction": 0.1,
            "test_fraction": 0.05,
            "options": {"max_length": 320, "tokenizer": str(student)},
        },
        "student": {"model": str(student)},
        "terms": [{"loss": "ce"}],
        "epochs": 3,
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0},
        "schedule": {"name": "cosine"},
        "seed": cfg.seed,
        "measure_cost": False,
        "progress": False,
    }
    merged = _merge(base, cfg.sft)
    if any(t.get("loss") != "ce" for t in merged["terms"]):  # KD terms read the (aligned) teacher
        merged.setdefault("teacher", {"model": teacher})
    return validate_config(merged, "sft (the student's fine-tuning)")


def train_student(
    config: ArteConfig, run_dir: str | Path, data: str | Path, name: str, teacher: str | None = None
) -> dict[str, Any]:
    """Fine-tune the student (:func:`student_base`: ``run_dir/student-warm/model`` after a warm-up,
    else ``run_dir/student-init``) on the prompt/completion ``data`` into the protege run
    ``run_dir/name`` (its exported model: ``run_dir/name/model``), as ``config.sft`` says; KD terms
    there read ``teacher``. A finished run of the same config is reused, an interrupted one resumed.
    Returns the run's ``summary.json``."""
    run_dir = Path(run_dir).expanduser()
    init = student_base(config, run_dir)
    if not init.is_dir():
        raise ProtegeError(f"{init} not found: run protege arte on {run_dir} first (it builds the student)")
    run_cfg = _sft_config(config, run_dir, name, Path(data), init, teacher or "")
    if run_cfg.teacher is not None and not teacher:
        raise ProtegeError(f"sft.terms has KD terms ({config.sft.get('terms')}): give the teacher they read")
    return run_or_reuse(run_cfg, "distill" if run_cfg.teacher is not None else "train")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict)
            else value
        )
    return out


def evaluate_student(
    model: str | Path, cfg: ArteConfig, tasks: Sequence[str] | None = None, device: str | None = None
) -> dict[str, Any]:
    """Exact match of the LM at ``model`` (a directory) on the held-out test sets of ``tasks``
    (default: the config's trained and held-out tasks), zero-shot (the prompt its training data
    uses), greedy. Returns ``{"exact_match": {task: share}, "trained_mean", "held_out_mean", "seconds"}``."""
    t0 = time.perf_counter()
    names = list(tasks) if tasks is not None else [*cfg.tasks, *cfg.held_out_tasks]
    lm = _LM(str(model), _device(device or cfg.device))
    prompts: list[str] = []
    keys: list[tuple[ReasoningTask, str]] = []
    for name in names:
        task = get_task(name)
        for e in task.splits(cfg.seed_pool, cfg.preference.size, cfg.test_size, cfg.data_seed).test:
            prompts.append(format_question(task, e.question))
            keys.append((task, e.answer))
    outputs = lm.generate(prompts, cfg.eval_max_new_tokens, 0.0, 1.0, 0, cfg.preference.batch_size)
    hits: dict[str, list[bool]] = {}
    for (task, answer), text in zip(keys, outputs):
        hits.setdefault(task.name, []).append(task.score(_answer_part(text), answer))
    em = {name: sum(h) / len(h) for name, h in hits.items()}
    trained = [em[n] for n in names if n in cfg.tasks]
    held = [em[n] for n in names if n not in cfg.tasks]
    return {
        "exact_match": em,
        "trained_mean": statistics.mean(trained) if trained else None,
        "held_out_mean": statistics.mean(held) if held else None,
        "seconds": time.perf_counter() - t0,
    }


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _preference_set(cfg: ArteConfig, built: Mapping[str, list[Example]]) -> dict[str, list[Example]]:
    """The built-in preference sets, or ``preference.file``'s, checked: every record needs a task
    of the run, a question and an answer in the task's form."""
    if cfg.preference.file is None:
        return dict(built)
    path = Path(cfg.preference.file).expanduser()
    if not path.is_file():
        raise ProtegeError(f"preference.file not found: {path}")
    sets: dict[str, list[Example]] = {name: [] for name in cfg.tasks}
    for n, record in jsonl_objects(path):
        task, question, answer = record.get("task"), record.get("question"), record.get("answer")
        if task not in sets:
            raise ProtegeError(
                f"{path}:{n}: task {task!r} is not one of the run's tasks ({', '.join(cfg.tasks)})"
            )
        if not isinstance(question, str) or not question.strip():
            raise ProtegeError(f"{path}:{n} has no question")
        if answer is None or not str(answer).strip():
            raise ProtegeError(
                f"{path}:{n} has no answer: the student's preference is its exact match on the preference "
                "set, so every question needs its answer ({task, question, answer})"
            )
        if get_task(task).normalize(str(answer)) is None:
            raise ProtegeError(
                f"{path}:{n}: {answer!r} is not an answer of {task} (see protege.data.reasoning)"
            )
        sets[task].append(Example(question.strip(), "", str(answer)))
    empty = [t for t, examples in sets.items() if not examples]
    if empty:
        raise ProtegeError(f"{path} has no preference question for {', '.join(empty)}")
    return sets


def _distribution(scores: Sequence[float]) -> dict[str, Any]:
    if not scores:
        return {"n": 0}
    counts: dict[str, int] = {}
    for s in scores:
        counts[f"{s:.3f}"] = counts.get(f"{s:.3f}", 0) + 1
    return {
        "n": len(scores),
        "mean": statistics.mean(scores),
        "std": statistics.pstdev(scores),
        "min": min(scores),
        "max": max(scores),
        "counts": dict(sorted(counts.items())),
    }


def _step_settings(cfg: ArteConfig, preference_digest: str | None) -> dict[str, dict[str, Any]]:
    """What each artefact depends on: its own keys and everything upstream of it."""
    c = cfg.model_dump()
    teacher = {k: c[k] for k in ("teacher", "teacher_prompt_format")}
    student = {"teacher": c["teacher"], "student": c["student"]}
    learner = {**student, "student_warmup": c["student_warmup"]}  # the student the steps below use
    recipe = {**teacher, **{k: c[k] for k in ("tasks", "seed", "data_seed", "seed_pool", "generation")}}
    drafts = {**recipe, "drafts": c["drafts"]}
    preferences = {
        **drafts,
        **learner,
        "preference": c["preference"],
        "preference_file_sha256": preference_digest,
    }
    alignment = {**preferences, "dpo": c["dpo"]}
    writing = {k: c[k] for k in ("train_examples", "verify", "max_rounds", "test_size")}
    writing["seed_examples"] = c["drafts"]["seed_examples"]
    writing["preference_size"] = c["preference"]["size"]
    generated = {**alignment, **writing}
    unaligned = {**recipe, **writing}
    testing = {
        k: c[k]
        for k in ("tasks", "held_out_tasks", "test_size", "data_seed", "seed_pool", "eval_max_new_tokens")
    }
    testing["preference_size"] = c["preference"]["size"]
    return {
        "teacher": {"teacher": c["teacher"]},
        "student_init": student,
        "student_warmup": learner,
        "drafts": drafts,
        "preferences": preferences,
        "alignment": alignment,
        "generated": generated,
        "aligned_drafts": alignment,
        "unaligned": unaligned,
        "student": {**generated, **learner, "sft": c["sft"]},
        "student_unaligned": {**unaligned, **learner, "sft": c["sft"]},
        "eval_init": {**learner, **testing},
        "eval": {**generated, **learner, "sft": c["sft"], **testing},
        "eval_unaligned": {**unaligned, **learner, "sft": c["sft"], **testing},
    }


def run_arte(config: ArteConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run ARTE's five steps into ``run_dir`` (module docstring); return (and write) ``summary.json``.

    Everything that can be checked is checked before anything is written: the tasks, the
    preference set (every question needs its answer), that the teacher can be prompted (a chat
    template, or ``teacher_prompt_format``), the fine-tuning config, and every existing artefact
    against the settings it was made from. A finished step is skipped (resumable).

    Raises:
        ProtegeError: bad input, or an artefact made from other settings.
    """
    cfg = config
    run_dir = Path(run_dir).expanduser()
    tasks = [get_task(n) for n in cfg.tasks]
    held = [get_task(n) for n in cfg.held_out_tasks]
    both = sorted(set(cfg.tasks) & set(cfg.held_out_tasks))
    if both or len(set(cfg.tasks)) != len(cfg.tasks):
        raise ProtegeError(
            f"tasks must be distinct and held_out_tasks must not repeat them (both: {', '.join(both) or 'none'})"
        )
    splits = {
        t.name: t.splits(cfg.seed_pool, cfg.preference.size, cfg.test_size, cfg.data_seed)
        for t in [*tasks, *held]
    }
    pools = {name: s.seed_pool for name, s in splits.items()}
    preference = _preference_set(cfg, {t.name: splits[t.name].preference for t in tasks})
    exclude = {e.question for s in splits.values() for e in (*s.preference, *s.test)}
    exclude |= {e.question for examples in preference.values() for e in examples}
    teacher_source = resolve_model(cfg.teacher)
    gguf = teacher_source.lower().endswith(".gguf")
    teacher_dir = str(run_dir / "teacher") if gguf else teacher_source
    with _quiet():
        teacher_tokenizer = load_tokenizer(teacher_source)
    if cfg.teacher_prompt_format is None and not _has_template(teacher_tokenizer):
        raise ProtegeError(
            f"the teacher {cfg.teacher!r} has no chat template, so protege cannot prompt it: give "
            "teacher_prompt_format (e.g. '### Instruction:\\n{prompt}\\n\\n### Response:\\n'), or use an "
            "instruction-tuned teacher whose tokenizer has a chat template"
        )
    student_init = run_dir / "student-init"
    base = student_base(cfg, run_dir)  # the student scoring drafts and fine-tuned: warmed up or as built
    _sft_config(cfg, run_dir, "student", run_dir / "generated.jsonl", base, teacher_dir)  # valid?
    if cfg.student_warmup is not None:
        _check_corpora(cfg.student_warmup.corpora)
        _warmup_config(cfg, run_dir, student_init, teacher_dir)  # valid?
    digest = None
    if cfg.preference.file is not None:
        digest = sha256_file(Path(cfg.preference.file).expanduser())
    settings = _step_settings(cfg, digest)
    artefacts = {
        "teacher": run_dir / "teacher",
        "student_init": student_init,
        "student_warmup": base,
        "drafts": run_dir / "drafts.jsonl",
        "preferences": run_dir / "preferences.jsonl",
        "alignment": run_dir / "pairs.jsonl",
        "generated": run_dir / "generated.jsonl",
        "aligned_drafts": run_dir / "preferences-aligned.jsonl",
        "unaligned": run_dir / "generated-unaligned.jsonl",
        "student": run_dir / "student" / "model",
        "student_unaligned": run_dir / "student-unaligned" / "model",
        "eval_init": run_dir / "eval-init.json",
        "eval": run_dir / "eval.json",
        "eval_unaligned": run_dir / "eval-unaligned.json",
    }
    wanted = [
        s
        for s in artefacts
        if (s != "teacher" or gguf)
        and (s != "aligned_drafts" or cfg.score_aligned)
        and (s != "student_warmup" or cfg.student_warmup is not None)
    ]
    if not cfg.baseline:
        wanted = [s for s in wanted if s not in ("unaligned", "student_unaligned", "eval_unaligned")]
    manifest = _Manifest(run_dir)
    done = {s: manifest.check(s, artefacts[s], settings[s]) for s in wanted}  # refuses conflicts up front
    device = _device(cfg.device)
    loaded: dict[str, _LM] = {}

    def lm(path: str, prompt_format: str | None = None) -> _LM:
        if path not in loaded:
            loaded[path] = _LM(path, device, prompt_format)
        return loaded[path]

    def step(name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        if name not in wanted:
            return
        if done[name]:
            console.print(f"arte: {name}: done already ({artefacts[name]})")
            return
        console.print(f"arte: {name} …")
        t0 = time.perf_counter()
        extra = fn() or {}
        manifest.done(name, settings[name], time.perf_counter() - t0, **extra)

    def convert() -> None:
        with _quiet():
            convert_gguf(teacher_source, run_dir / "teacher", overwrite=True)

    def build_student() -> dict[str, Any]:
        return {"params": _build_student(cfg.student, teacher_dir, teacher_tokenizer, student_init)}

    def warm() -> dict[str, Any]:
        return {"test": warm_up_student(cfg, run_dir, teacher_dir).get("test")}

    def drafts() -> None:
        records = _draft(lm(teacher_dir, cfg.teacher_prompt_format), cfg, tasks, pools)
        _write_jsonl(artefacts["drafts"], records)

    def score(source: Path, out: Path) -> Callable[[], None]:
        def fn() -> None:
            records = _read_jsonl(source)
            scores = _icl_scores(lm(str(base)), cfg, records, preference)
            _write_jsonl(out, [{**r, "score": s} for r, s in zip(records, scores)])

        return fn

    def align() -> dict[str, Any]:
        pairs = _pairs(_read_jsonl(artefacts["preferences"]))
        if not pairs:
            reason = (
                "no preference pairs: every draft of every prompt scored the same with the student, so there is "
                "nothing to align the teacher to; DPO skipped, the unaligned teacher writes the training set"
            )
            console.print(f"[yellow]arte: {reason}")
            _write_jsonl(artefacts["alignment"], [])
            return {"dpo": {"skipped": reason, "pairs": 0}}

        def render(tokenizer: Any, prompt: str) -> str:
            if cfg.teacher_prompt_format is not None:
                return cfg.teacher_prompt_format.replace("{prompt}", prompt)
            return render_prompt(tokenizer, prompt, chat=True)

        info = _dpo(cfg, teacher_dir, pairs, render, run_dir / "teacher-dpo", device)
        _write_jsonl(artefacts["alignment"], pairs)
        return {"dpo": info}

    def aligned() -> str:
        dpo = manifest.steps.get("alignment", {}).get("dpo", {})
        return teacher_dir if dpo.get("skipped") else str(run_dir / "teacher-dpo")

    def write_set(teacher: Callable[[], str], out: Path) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            records, stats = _training_set(
                lm(teacher(), cfg.teacher_prompt_format), cfg, tasks, pools, exclude
            )
            if not records:
                raise ProtegeError(
                    f"the teacher wrote no usable training example in {cfg.max_rounds} round(s) "
                    f"({json.dumps(stats)}): raise max_rounds or the generation lengths, or set verify: false"
                )
            _write_jsonl(out, records)
            return {"stats": stats}

        return fn

    def redraft() -> None:
        path = run_dir / "drafts-aligned.jsonl"
        _write_jsonl(path, _draft(lm(aligned(), cfg.teacher_prompt_format), cfg, tasks, pools))
        score(path, artefacts["aligned_drafts"])()

    def train(name: str, data: Path, teacher: Callable[[], str]) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            return {"test": train_student(cfg, run_dir, data, name, teacher()).get("test")}

        return fn

    def evaluate(model: Path, out: Path) -> Callable[[], None]:
        def fn() -> None:
            result = evaluate_student(model, cfg, device=str(device))
            atomic_write_text(out, json.dumps(result, indent=1) + "\n")

        return fn

    step("teacher", convert)
    step("student_init", build_student)
    step("student_warmup", warm)
    step("drafts", drafts)
    step("preferences", score(artefacts["drafts"], artefacts["preferences"]))
    step("alignment", align)
    step("generated", write_set(aligned, artefacts["generated"]))
    step("aligned_drafts", redraft)
    step("unaligned", write_set(lambda: teacher_dir, artefacts["unaligned"]))
    step("student", train("student", artefacts["generated"], aligned))
    step("eval_init", evaluate(base, artefacts["eval_init"]))
    step("eval", evaluate(artefacts["student"], artefacts["eval"]))
    step("student_unaligned", train("student-unaligned", artefacts["unaligned"], lambda: teacher_dir))
    step("eval_unaligned", evaluate(artefacts["student_unaligned"], artefacts["eval_unaligned"]))
    return _summary(cfg, run_dir, manifest, artefacts, wanted)


def _summary(
    cfg: ArteConfig, run_dir: Path, manifest: _Manifest, artefacts: Mapping[str, Path], wanted: Sequence[str]
) -> dict[str, Any]:
    steps = manifest.steps
    seconds = {s: steps[s]["seconds"] for s in wanted if s in steps}

    def scores(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        records = _read_jsonl(path)
        per_task = {t: _distribution([r["score"] for r in records if r["task"] == t]) for t in cfg.tasks}
        return {"all": _distribution([r["score"] for r in records]), "tasks": per_task}

    def read(path: Path) -> Any:
        return json.loads(path.read_text()) if path.is_file() else None

    pairs = _read_jsonl(artefacts["alignment"]) if artefacts["alignment"].is_file() else []
    summary = {
        "run_dir": str(run_dir),
        "teacher": cfg.teacher,
        "student": cfg.student.model_dump(),
        "tasks": cfg.tasks,
        "held_out_tasks": cfg.held_out_tasks,
        "seconds": seconds,
        "generation_s": sum(seconds.get(s, 0.0) for s in ("drafts", "generated")),
        "dpo_s": seconds.get("alignment", 0.0),
        "pairs": {k: sum(p["kind"] == k for p in pairs) for k in ("question", "rationale")},
        "student_warmup": steps.get("student_warmup", {}).get("test"),
        "dpo": steps.get("alignment", {}).get("dpo"),
        "scores": {"before": scores(artefacts["preferences"]), "after": scores(artefacts["aligned_drafts"])},
        "generated": steps.get("generated", {}).get("stats"),
        "unaligned": steps.get("unaligned", {}).get("stats"),
        "eval": {
            "init": read(artefacts["eval_init"]),
            "arte": read(artefacts["eval"]),
            "unaligned": read(artefacts["eval_unaligned"]),
        },
        "config": cfg.model_dump(),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
