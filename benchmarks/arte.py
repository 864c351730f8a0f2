"""ARTE vs the unaligned teacher: which teacher-written training set teaches the student more (issue 24).

One ARTE run per seed (``protege.arte.run_arte`` on ``--config``, default ``configs/arte/arte.yaml``:
SmolLM2-135M-Instruct teacher, its layers 0-11 and 18-29 as the student; ``baseline: true``),
into ``--out/seed<N>/`` (resumable: every finished artefact is reused), then the rows:

``zero_shot``   the student as built, not fine-tuned
``seed_only``   fine-tuned on the tasks' seed examples only (their hand-written rationales)
``unaligned``   fine-tuned on the unaligned teacher's set (same recipe, same count requested)
``arte``        fine-tuned on the aligned teacher's set
``arte_kd``     ``--kd``: the ARTE set with CE + forward KL from the aligned teacher

Columns: exact match (%) on each task's held-out test set (the trained tasks and the held-out ones,
never aligned on nor trained on), the means of both groups, mean ± std over ``--seeds``; then the
generation and DPO seconds, the number of DPO pairs and the per-draft student score distribution
before vs after alignment (the aligned teacher redrafting the same prompts). One JSON line per seed
in ``--jsonl``.

    .venv/bin/python benchmarks/arte.py --seeds 0 1 2            # the full table (hours on a CPU)
    .venv/bin/python benchmarks/arte.py --quick                   # pilot: 1 task, 4 drafts, minutes
    .venv/bin/python benchmarks/arte.py --table-only

Lanes: one process per seed (``--seeds 0``, ``--seeds 1``, … side by side, ``OMP_NUM_THREADS=1``);
each re-reads ``--jsonl`` just before adding its line, or give each its own ``--jsonl`` and
concatenate them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from protege.analysis.runs import seed_cell  # noqa: E402
from protege.arte import ArteConfig, evaluate_student, load_arte_config, run_arte, train_student  # noqa: E402
from protege.data.reasoning import format_question, get_task  # noqa: E402
from protege.files import atomic_write_text, digest  # noqa: E402

ROWS = ("zero_shot", "seed_only", "unaligned", "arte", "arte_kd")
QUICK = [
    "tasks=[multistep_arithmetic]",
    "held_out_tasks=[date_arithmetic]",
    "drafts.prompts=1",
    "drafts.questions=2",
    "drafts.rationales=2",
    "preference.size=5",
    "preference.max_new_tokens=48",
    "train_examples=4",
    "max_rounds=2",
    "test_size=5",
    "eval_max_new_tokens=64",
    "sft.epochs=1",
    "dpo.epochs=1",
    "dpo.batch_size=2",
]


def seed_only_data(cfg: ArteConfig, path: Path) -> Path:
    """The trained tasks' seed examples as prompt/completion records (what ``seed_only`` trains on)."""
    records = []
    for name in cfg.tasks:
        task = get_task(name)
        for e in task.splits(cfg.seed_pool, cfg.preference.size, cfg.test_size, cfg.data_seed).seed_pool:
            records.append(
                {"task": name, "prompt": format_question(task, e.question), "completion": e.rationale}
            )
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def evaluated(cfg: ArteConfig, model: Path, out: Path) -> dict[str, Any]:
    if out.is_file():
        return json.loads(out.read_text())
    result = evaluate_student(model, cfg)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    return result


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    overrides = [*(QUICK if args.quick else []), *args.set, f"seed={seed}", "baseline=true"]
    cfg = load_arte_config(args.config, overrides)
    run_dir = args.out / f"seed{seed}"
    t0 = time.perf_counter()
    summary = run_arte(cfg, run_dir)
    rows = {
        "zero_shot": summary["eval"]["init"],
        "unaligned": summary["eval"]["unaligned"],
        "arte": summary["eval"]["arte"],
    }
    train_student(cfg, run_dir, seed_only_data(cfg, run_dir / "seed-examples.jsonl"), "student-seed-only")
    rows["seed_only"] = evaluated(
        cfg, run_dir / "student-seed-only" / "model", run_dir / "eval-seed-only.json"
    )
    if args.kd:
        aligned = run_dir / "teacher-dpo" if not (summary["dpo"] or {}).get("skipped") else None
        teacher = str(aligned or (run_dir / "teacher" if (run_dir / "teacher").is_dir() else cfg.teacher))
        terms = [*cfg.sft.get("terms", [{"loss": "ce"}]), {"loss": "fkl", "weight": 1.0}]
        kd_cfg = cfg.model_copy(update={"sft": {**cfg.sft, "terms": terms}})
        train_student(kd_cfg, run_dir, run_dir / "generated.jsonl", "student-kd", teacher)
        rows["arte_kd"] = evaluated(cfg, run_dir / "student-kd" / "model", run_dir / "eval-kd.json")
    return {
        "seed": seed,
        "quick": args.quick,
        "settings": digest(cfg.model_dump()),
        "config": cfg.model_dump(),
        "rows": rows,
        "generation_s": summary["generation_s"],
        "dpo_s": summary["dpo_s"],
        "seconds": summary["seconds"],
        "pairs": summary["pairs"],
        "dpo": summary["dpo"],
        "scores": summary["scores"],
        "generated": summary["generated"],
        "unaligned_generated": summary["unaligned"],
        "wall_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def mean_std(values: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    mean = {k: statistics.mean(v) for k, v in values.items()}
    return mean, {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}


def print_table(lines: list[dict[str, Any]]) -> str:
    cfg = lines[0]["config"]
    tasks = [*cfg["tasks"], *cfg["held_out_tasks"]]
    head = ["row", *tasks, "trained mean", "held-out mean"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        results = [line["rows"][row] for line in lines if row in line["rows"]]
        if not results:
            continue
        values: dict[str, list[float]] = {}
        for r in results:
            for t, v in r["exact_match"].items():
                values.setdefault(t, []).append(v)
            for key in ("trained_mean", "held_out_mean"):
                if r.get(key) is not None:
                    values.setdefault(key, []).append(r[key])
        mean, std = mean_std(values)
        cells = [seed_cell(mean, std, k) for k in (*tasks, "trained_mean", "held_out_mean")]
        out.append("| " + " | ".join([row, *cells]) + " |")
    for a, b in (("arte", "unaligned"), ("arte", "seed_only"), ("unaligned", "seed_only")):
        paired = [line for line in lines if a in line["rows"] and b in line["rows"]]
        if not paired:
            continue
        diffs: dict[str, list[float]] = {}
        for line in paired:
            ra, rb = line["rows"][a], line["rows"][b]
            for k in (*tasks, "trained_mean", "held_out_mean"):
                va = ra["exact_match"].get(k, ra.get(k))
                vb = rb["exact_match"].get(k, rb.get(k))
                if va is not None and vb is not None:
                    diffs.setdefault(k, []).append(va - vb)
        mean, std = mean_std(diffs)
        per_seed = " / ".join(f"{100 * d:+.1f}" for d in diffs.get("trained_mean", []))
        cells = [seed_cell(mean, std, k) for k in (*tasks, "trained_mean", "held_out_mean")]
        out.append(
            "| " + " | ".join([f"{a} − {b} (seed-paired; trained mean per seed {per_seed})", *cells]) + " |"
        )
    for line in lines:
        before, after = line["scores"]["before"].get("all", {}), line["scores"]["after"].get("all", {})
        out.append(
            f"\nseed {line['seed']}: generation {line['generation_s']:.0f} s, DPO {line['dpo_s']:.0f} s, "
            f"pairs {line['pairs']}, DPO {'skipped' if (line['dpo'] or {}).get('skipped') else 'ran'}; "
            f"per-draft student score before alignment {before.get('mean', 0):.3f} ± {before.get('std', 0):.3f} "
            f"{before.get('counts')}, after {after.get('mean', 0):.3f} ± {after.get('std', 0):.3f} "
            f"{after.get('counts')}; kept {line['generated']} / unaligned {line['unaligned_generated']}"
        )
        per_task = line["scores"]["before"].get("tasks", {})
        shifts = ", ".join(
            f"{t} {100 * d['mean']:.1f} -> {100 * line['scores']['after']['tasks'][t]['mean']:.1f}"
            for t, d in per_task.items()
            if t in line["scores"]["after"].get("tasks", {})
        )
        drawn = {
            name: sum(c["drawn"] for c in (line[key] or {}).values())
            for name, key in (("aligned", "generated"), ("unaligned", "unaligned_generated"))
        }
        dpo = line["dpo"] or {}
        out.append(
            f"  per-draft score by task (%) {shifts}; DPO steps {dpo.get('steps')}, loss "
            f"{dpo.get('first_loss', float('nan')):.3f} -> {dpo.get('last_loss', float('nan')):.3f}; drawn {drawn}"
        )
    shift = {
        w: [100 * line["scores"][w]["all"]["mean"] for line in lines if line["scores"][w].get("all")]
        for w in ("before", "after")
    }
    mean, std = mean_std(shift)
    if shift["before"] and shift["after"]:
        out.append(
            f"\nper-draft student score over seeds: before {mean['before']:.1f} ± {std['before']:.1f} %, "
            f"after {mean['after']:.1f} ± {std['after']:.1f} %"
        )
    text = "\n".join(out)
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "arte" / "arte.yaml")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="pilot: 1 task, 4 drafts, 4 examples, 1 seed")
    parser.add_argument("--kd", action="store_true", help="also the ARTE + KD (forward KL) row")
    parser.add_argument(
        "--out", type=Path, default=None, help="run directories (default runs/bench-arte[-quick])"
    )
    parser.add_argument(
        "--jsonl", type=Path, default=None, help="results (default benchmarks/results/arte[-quick].jsonl)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    suffix = "-quick" if args.quick else ""
    args.out = args.out or ROOT / "runs" / f"bench-arte{suffix}"
    args.jsonl = args.jsonl or ROOT / "benchmarks" / "results" / f"arte{suffix}.jsonl"
    if args.quick and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    torch.set_num_threads(args.threads)
    lines = read_lines(args.jsonl)
    if not args.table_only:
        for seed in args.seeds:
            line = run_seed(args, seed)  # resumable: a finished seed only re-reads its artefacts
            # read again just before writing: lanes (one process per seed) may share the file
            lines = read_lines(args.jsonl)
            lines = [x for x in lines if x["seed"] != seed or x["quick"] != args.quick] + [line]
            atomic_write_text(args.jsonl, "".join(json.dumps(x) + "\n" for x in lines))
    if not lines:
        raise SystemExit(f"no results in {args.jsonl}: run the benchmark first")
    print_table(lines)


if __name__ == "__main__":
    main()
