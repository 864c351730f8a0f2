"""Which ARTE student gives a preference signal? One-shot accuracy spread across demonstrations (issue 24).

ARTE's signal is the *spread* of the student's one-shot exact match on a task's preference set across
drafts: a student that scores 0 (or 100 %) whatever the demonstration gives no DPO pair. This probe
measures it, cheaply, for a few candidate students before an ARTE run is sized. Per task it takes
``--seed-demos`` worked seed examples (the task's seed pool, hand-checked rationales) and
``--drafts`` teacher drafts (SmolLM2 writing a question and a rationale exactly as ARTE's step 1
does, with ``--config``'s generation settings), and scores each as the one demonstration on the
task's preference set (``preference.size`` of ``--config``, 40) — the very computation of ARTE's
step 2 (``protege.arte._icl_scores``: greedy, ``preference.max_new_tokens``). Selection is on the
preference sets only; the test sets are never read.

Candidates (``--candidates``):

``6L``        SmolLM2-135M-Instruct's layers 4, 9, 14, 19, 24, 29 as built (the first pilot's student)
``6L-warm``   its layers ``--warm-layers`` (default 0, 1, 2, 27, 28, 29) after ``student_warmup``
              (``protege.arte.warm_up_student``: KD from the teacher on pydoc text through the lm task;
              ``--warm-chars``, ``--warm-set KEY=VALUE`` for its run keys)
``10L``       layers 0, 3, 6, ..., 24, 29 as built
``18L``       layers 0-8 and 21-29 as built (the middle dropped: the least damaged by layer selection)
``24L``       layers 0-11 and 18-29 as built
``teacher``   the teacher itself: a reference, not a student (what the family can do one-shot)

Also per candidate and task (cheap, no generation): ``nll``, the mean next-token NLL (nats) of a
gold rationale after a one-shot gold demonstration (10 preference questions) — how far a student is
from writing the task's text at all.

Table: per candidate x task, the one-shot accuracy (%) over the demonstrations: mean, std, min, max,
the means over seed demos and over teacher drafts, and the seconds. Resumable: ``--out`` keeps the
teacher drafts (``demos.jsonl``), each candidate's model (``<candidate>/``) and every finished cell
(``results.jsonl``).

    .venv/bin/python benchmarks/arte_student_probe.py                      # ~40 CPU-minutes
    .venv/bin/python benchmarks/arte_student_probe.py --table-only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import protege.arte as arte  # noqa: E402
from protege.arte import ArteConfig, StudentSpec, WarmupSettings, load_arte_config  # noqa: E402
from protege.config import apply_overrides  # noqa: E402
from protege.data.reasoning import format_question, get_task  # noqa: E402
from protege.files import atomic_write_text, digest  # noqa: E402
from protege.tasks.lm import convert_gguf, load_tokenizer, render_prompt, resolve_model  # noqa: E402

CANDIDATES: dict[str, dict[str, Any]] = {
    "6L": {"layers": [4, 9, 14, 19, 24, 29], "warm": False},
    "6L-warm": {"layers": None, "warm": True},  # --warm-layers
    "10L": {"layers": [0, 3, 6, 9, 12, 15, 18, 21, 24, 29], "warm": False},
    "18L": {"layers": [*range(9), *range(21, 30)], "warm": False},
    "24L": {"layers": [*range(12), *range(18, 30)], "warm": False},
    "teacher": {"layers": None, "warm": False},
}
NLL_QUESTIONS = 10


def teacher_dir(source: str, out: Path) -> str:
    """The teacher as a model directory: a .gguf (or smollm2) de-quantized once into ``out/teacher``."""
    path = resolve_model(source)
    if not path.lower().endswith(".gguf"):
        return path
    if not (out / "teacher" / "config.json").is_file():
        convert_gguf(path, out / "teacher", overwrite=True)
    return str(out / "teacher")


def demonstrations(cfg: ArteConfig, teacher: str, out: Path, seeds: int, drafts: int) -> list[dict[str, Any]]:
    """Per task: ``seeds`` seed examples and ``drafts`` teacher drafts (ARTE's step 1), cached."""
    path = out / "demos.jsonl"
    key = digest(
        json.dumps(
            [cfg.model_dump(include={"tasks", "seed", "data_seed", "seed_pool", "generation"}), seeds, drafts]
        )
    )
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if records and records[0].get("key") == key:
            return records
    tasks = [get_task(n) for n in cfg.tasks]
    pools = {
        t.name: t.splits(cfg.seed_pool, cfg.preference.size, cfg.test_size, cfg.data_seed).seed_pool
        for t in tasks
    }
    records = []
    for t in tasks:
        for i, e in enumerate(pools[t.name][:seeds]):
            records.append(
                {
                    "task": t.name,
                    "kind": "seed",
                    "id": f"seed{i}",
                    "question": e.question,
                    "rationale": e.rationale,
                }
            )
    if drafts:
        draft_cfg = cfg.model_copy(
            update={
                "drafts": arte.DraftSettings(
                    prompts=1, questions=drafts, rationales=1, seed_examples=cfg.drafts.seed_examples
                )
            }
        )
        lm = arte._LM(teacher, torch.device("cpu"), cfg.teacher_prompt_format)
        for d in arte._draft(lm, draft_cfg, tasks, pools):
            records.append(
                {
                    "task": d["task"],
                    "kind": "draft",
                    "id": d["id"],
                    "question": d["question"],
                    "rationale": d["rationale"],
                }
            )
    records = [{**r, "key": key} for r in records]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def candidate_model(name: str, cfg: ArteConfig, teacher: str, out: Path) -> tuple[str, ArteConfig]:
    """The candidate's model directory (built, and warmed up, once) and the config it was made with."""
    spec = CANDIDATES[name]
    if name == "teacher":
        return teacher, cfg
    c = cfg.model_copy(
        update={
            "teacher": teacher,
            "student": StudentSpec(model="teacher", kwargs={"layers": spec["layers"]}),
            "student_warmup": cfg.student_warmup if spec["warm"] else None,
        }
    )
    run = out / name
    if not (run / "student-init" / "config.json").is_file():
        arte._build_student(c.student, teacher, load_tokenizer(teacher), run / "student-init")
    if spec["warm"]:
        t0 = time.perf_counter()
        summary = arte.warm_up_student(c, run, teacher)
        print(f"{name}: warm-up {time.perf_counter() - t0:.0f} s, test {summary.get('test')}", flush=True)
    return str(arte.student_base(c, run)), c


@torch.no_grad()
def rationale_nll(lm: arte._LM, cfg: ArteConfig, task_name: str) -> float:
    """Mean next-token NLL of gold rationales after one gold demonstration (teacher-forced)."""
    task = get_task(task_name)
    s = task.splits(cfg.seed_pool, cfg.preference.size, cfg.test_size, cfg.data_seed)
    total, count = 0.0, 0
    for i, q in enumerate(s.preference[:NLL_QUESTIONS]):
        prompt = render_prompt(
            lm.tokenizer, format_question(task, q.question, [s.seed_pool[i % len(s.seed_pool)]])
        )
        a = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        b = lm.tokenizer(" " + q.rationale, add_special_tokens=False)["input_ids"]
        logits = lm.model(input_ids=torch.tensor([a + b])).logits[0, len(a) - 1 : -1].float()
        total -= logits.log_softmax(-1).gather(1, torch.tensor(b)[:, None]).sum().item()
        count += len(b)
    return total / count


def probe(args: argparse.Namespace, cfg: ArteConfig, out: Path) -> list[dict[str, Any]]:
    teacher = teacher_dir(cfg.teacher, out)
    demos = demonstrations(cfg, teacher, out, args.seed_demos, args.drafts)
    results_path = out / "results.jsonl"
    results = (
        [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    )
    for name in args.candidates:
        model, c = candidate_model(name, cfg, teacher, out)
        lm = None
        for task in cfg.tasks[:1] if name in args.first_task_only else cfg.tasks:
            key = digest(json.dumps([name, task, c.model_dump(), demos, CANDIDATES[name], args.warm_layers]))
            if any(r["key"] == key for r in results):
                continue
            lm = lm or arte._LM(model, torch.device("cpu"))
            t0 = time.perf_counter()
            mine = [d for d in demos if d["task"] == task]
            preference = {
                task: get_task(task)
                .splits(c.seed_pool, c.preference.size, c.test_size, c.data_seed)
                .preference
            }
            scores = arte._icl_scores(lm, c, mine, preference)
            seconds = time.perf_counter() - t0
            nll = rationale_nll(lm, c, task)
            row = {
                "key": key,
                "candidate": name,
                "task": task,
                "scores": scores,
                "kinds": [d["kind"] for d in mine],
                "nll": nll,
                "seconds": seconds,
                "preference_size": c.preference.size,
                "max_new_tokens": c.preference.max_new_tokens,
            }
            results = [r for r in results if not (r["candidate"] == name and r["task"] == task)] + [row]
            atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in results))
            print(line(row), flush=True)
    return results


def line(r: dict[str, Any]) -> str:
    s = [100 * x for x in r["scores"]]
    seed = [x for x, k in zip(s, r["kinds"]) if k == "seed"]
    draft = [x for x, k in zip(s, r["kinds"]) if k == "draft"]
    m = lambda v: f"{statistics.mean(v):5.1f}" if v else "    -"  # noqa: E731
    return (
        f"| {r['candidate']:8s} | {r['task']:20s} | {len(s):2d} | {statistics.mean(s):5.1f} | {statistics.pstdev(s):5.1f} "
        f"| {min(s):5.1f} | {max(s):5.1f} | {m(seed)} | {m(draft)} | {r['nll']:5.2f} | {r['seconds']:5.0f} |"
    )


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| student | task | demos | mean % | std | min | max | seed demos | teacher drafts | nll | s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    order = {n: i for i, n in enumerate(CANDIDATES)}
    rows = sorted(results, key=lambda r: (order.get(r["candidate"], 99), r["task"]))
    return "\n".join([head, *(line(r) for r in rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "arte" / "arte.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE on --config")
    p.add_argument(
        "--teacher", default=None, help="override the config's teacher (e.g. a converted directory)"
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "arte-student-probe"))
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--tasks", nargs="+", default=["boolean_expressions", "object_counting"])
    p.add_argument("--seed-demos", type=int, default=4)
    p.add_argument("--drafts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48, help="the student's answer length (preference)")
    p.add_argument("--warm-layers", default="0,1,2,27,28,29")
    p.add_argument("--warm-chars", type=int, default=None, help="student_warmup.max_chars")
    p.add_argument("--warm-set", action="append", default=[], help="KEY=VALUE on student_warmup.run")
    p.add_argument(
        "--first-task-only", nargs="*", default=[], help="candidates probed on the first task only (cheaper)"
    )
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        print(table(results))
        return
    cfg = load_arte_config(args.config, args.overrides)
    warm = cfg.student_warmup or WarmupSettings()
    warm = warm.model_copy(
        update={
            "max_chars": args.warm_chars or warm.max_chars,
            "run": apply_overrides(dict(warm.run), list(args.warm_set)),
        }
    )
    CANDIDATES["6L-warm"]["layers"] = [int(x) for x in args.warm_layers.split(",")]
    cfg = cfg.model_copy(
        update={
            "teacher": args.teacher or cfg.teacher,
            "tasks": list(args.tasks),
            "student_warmup": warm,
            "preference": cfg.preference.model_copy(update={"max_new_tokens": args.max_new_tokens}),
            "device": "cpu",
        }
    )
    results = probe(args, cfg, out)
    print(table(results))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, indent=1) + "\n")
    if not all(math.isfinite(r["nll"]) for r in results):
        print("warning: a non-finite nll")


if __name__ == "__main__":
    main()
