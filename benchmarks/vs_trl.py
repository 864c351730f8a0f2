"""protege against TRL's GKDTrainer, side by side in one process: training throughput and final KL.

Both frameworks distill SmolLM2-135M-Instruct into the same student (4 of its layers, the setup of
``benchmarks/lm_losses.py``: same text, 128-token blocks, held-out text) with the same loss, batches,
steps, optimizer and initial weights, in fp32 on the CPU; only the framework differs.

- **Loss**: the generalized JSD at β = 0.5, off-policy (TRL's ``lmbda=0``, no ``seq_kd``), per
  trained token, mean over tokens. TRL's ``generalized_jsd_loss`` uses the mixture
  ``m = β p_t + (1 - β) p_s`` and returns ``β KL(p_t ‖ m) + (1 - β) KL(p_s ‖ m)`` — β weights the
  teacher, β = 0 is the forward KL(p_t ‖ p_s), β = 1 the reverse: protege's convention. protege's
  ``jsd`` divides by ``β (1 - β)`` (continuity at the end points), so the protege term has weight
  ``β (1 - β) = 0.25`` and both objectives (and gradients) are equal. Both claims are checked first on
  one batch (at β = 0.5, and at β = 0, 0.1, 0.9 and 1 against the swapped mapping); the relative differences
  are printed and stored.
- **Data**: the same list of batches (``--batch-size`` blocks, seeded shuffle) for every side.
- **Optimizer**: ``torch.optim.AdamW`` (lr ``--lr``, no weight decay), constant learning rate, no
  gradient clipping (TRL ``max_grad_norm=0``), on every side.
- **TRL side**: a ``GKDTrainer`` (``trl.experimental.gkd``, TRL 1.16) built with the student, the
  teacher, ``GKDConfig(lmbda=0, beta=0.5, use_cpu=True)`` and the optimizer; each step is its
  ``training_step`` (``compute_loss``: student and teacher forward, ``generalized_jsd_loss``;
  ``accelerator.backward``), then ``optimizer.step()``, ``lr_scheduler.step()``, ``zero_grad`` — the
  body of ``Trainer``'s inner loop, without its callbacks, logging and per-step bookkeeping.
- **protege side** (``protege``): a ``protege.Distiller(student, teacher, [jsd, weight 0.25])`` in the
  user's loop of the Python API: ``_, losses = distiller(batch)``, ``backward``, ``step``,
  ``zero_grad`` — the teacher online, like TRL.
- **extra side** (``protege-cache``, not like-for-like): the same Distiller reading the teacher from
  ``benchmarks/lm_losses.py``'s teacher-output cache (top-128 entries + rest bucket; the teacher is
  not run). Its loss is the JSD over those 129 buckets, not the full vocabulary. ``--with-top-k``
  adds ``protege-top128``: the teacher online and that same 129-bucket loss (``top_k=128``), which
  separates what top-k distillation changes from what the stored format changes.

The sides take turns, ``--round-steps`` steps each, the order rotating every round, so the shared
machine's noise hits all. Throughput = trained input tokens / time spent in the side's steps, by
wall clock and by process CPU time (all threads; ``--threads 1`` by default, the robust figure on a
shared box). After the last step, each student's KL(teacher ‖ student), perplexity and agreement are
measured on the held-out text against the live teacher (``protege.evaluate``).

    bash scripts/setup_trl_venv.sh                     # .venv-trl: .venv's torch/transformers, protege, trl
    .venv-trl/bin/python benchmarks/vs_trl.py --quick  # smoke test: 4 steps per side
    .venv-trl/bin/python benchmarks/vs_trl.py --with-top-k   # writes benchmarks/results/vs-trl.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

try:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "TRL is not installed in this interpreter: run `bash scripts/setup_trl_venv.sh` and use .venv-trl/bin/python"
    )

from lm_losses import RESULTS, ROOT, ROWS, Judge, add_setup_args, ensure_cache, run_config, setup_key

import protege as pg
from protege.build import load_run_data
from protege.caching import use_cache
from protege.engine.loaders import make_loader
from protege.files import atomic_write_text
from protege.losses.sequence import generalized_jsd
from protege.tasks.lm import LMTask, next_token_target

BETA = 0.5
Step = Callable[[dict[str, Any]], float]


def batch_list(dataset: Any, batch_size: int, seed: int, steps: int) -> list[dict[str, Any]]:
    """``steps`` batches in the order protege's seeded loader gives them, epoch after epoch."""
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed)
    out: list[dict[str, Any]] = []
    epoch = 0
    while len(out) < steps:
        loader.sampler.set_epoch(epoch)
        out += list(loader)[: steps - len(out)]
        epoch += 1
    return out


def plain(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def trl_trainer(
    student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, train: Any, lr: float, out: str
) -> Any:
    """A GKDTrainer at λ = 0, β = 0.5 over ``train`` (a TokenDataset; SFTTrainer requires a dataset, the
    benchmark feeds the batches itself)."""
    config = GKDConfig(
        output_dir=out,
        lmbda=0.0,
        beta=BETA,
        temperature=1.0,
        seq_kd=False,
        learning_rate=lr,
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_dropout=True,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        processing_class=tokenizer,
        optimizers=(optimizer, schedule),
        train_dataset=Dataset.from_dict(
            {k: getattr(train, k).tolist() for k in ("input_ids", "attention_mask", "labels")}
        ),
    )
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    return trainer


def trl_step(trainer: Any) -> Step:
    def step(batch: dict[str, Any]) -> float:
        loss = trainer.training_step(trainer.model, plain(batch))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad()
        return float(loss)

    return step


def protege_step(distiller: pg.Distiller, lr: float, cached: bool) -> Step:
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=lr, weight_decay=0.0)
    distiller.train()

    def step(batch: dict[str, Any]) -> float:
        _, losses = distiller(batch if cached else plain(batch))
        total = sum(losses.values())
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total.detach())

    return step


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@torch.no_grad()
def check_losses(trainer: Any, distiller: pg.Distiller, batch: dict[str, Any]) -> dict[str, float]:
    """Both objectives on one batch from identical models, and TRL's β convention against protege's."""
    inputs = plain(batch)
    trl_loss = float(trainer.compute_loss(trainer.model, dict(inputs)))
    distiller.eval()
    _, losses = distiller(inputs)
    distiller.train()
    pg_loss = float(sum(losses.values()))
    student = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    teacher = trainer.teacher_model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).logits
    target = next_token_target(inputs["labels"])
    out = {"trl_loss": trl_loss, "protege_loss": pg_loss, "rel_diff_beta_0.5": rel(pg_loss, trl_loss)}
    for beta in (0.0, 0.1, 0.9, 1.0):  # at 0 and 1 both are plain KLs: the swapped mapping is far off
        theirs = float(
            GKDTrainer.generalized_jsd_loss(
                student[:, :-1], teacher[:, :-1], labels=inputs["labels"][:, 1:], beta=beta
            )
        )
        scale = beta * (1 - beta) if 0 < beta < 1 else 1.0  # protege's JSD is divided by β (1 - β)
        same = float(generalized_jsd(student, teacher, target, beta=beta)) * scale
        swapped = float(generalized_jsd(student, teacher, target, beta=1 - beta)) * scale
        out[f"rel_diff_beta_{beta}"] = rel(same, theirs)
        out[f"rel_diff_beta_{beta}_if_swapped"] = rel(swapped, theirs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_setup_args(parser)
    parser.add_argument("--steps", type=int, default=30, help="training steps per side")
    parser.add_argument("--round-steps", type=int, default=5, help="steps per side per round")
    parser.add_argument("--seed", type=int, default=0, help="batch order")
    parser.add_argument("--no-cache", action="store_true", help="leave out the protege-cache side")
    parser.add_argument(
        "--with-top-k", action="store_true", help="add protege-top128: online teacher, top-128 + rest loss"
    )
    parser.add_argument("--quick", action="store_true", help="4 steps per side, 2 per round")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-vs-trl")
    parser.add_argument(
        "--json", type=Path, default=None, help=f"default {RESULTS / 'vs-trl.json'} (not with --quick)"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.round_steps = 4, 2
    elif args.json is None:
        args.json = RESULTS / "vs-trl.json"
    args.epochs, args.max_new_tokens = 1, 0  # run_config's other settings (unused here)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    judge = Judge(args)
    tokenizer = judge.data.tokenizer
    student0 = judge.student(args.layers)
    sides = ["protege", "trl"] + ([] if args.no_cache else ["protege-cache"])
    sides += ["protege-top128"] if args.with_top_k else []
    if "protege-cache" in sides:
        ensure_cache(args)
        cfg = pg.load_config(None, **run_config(args, ROWS["jsd"], args.seed, "vs-trl", 1))
        cached_data, _ = use_cache(cfg, load_run_data(cfg))
        batches = batch_list(cached_data.train, args.batch_size, args.seed, args.steps)
    else:
        batches = batch_list(judge.data.train, args.batch_size, args.seed, args.steps)
    task = LMTask()
    term = [pg.term("jsd", BETA * (1 - BETA), beta=BETA)]
    students = {side: copy.deepcopy(student0) for side in sides}
    distillers = {"protege": pg.Distiller(students["protege"], copy.deepcopy(judge.teacher), term, task=task)}
    if "protege-cache" in sides:
        distillers["protege-cache"] = pg.Distiller(
            students["protege-cache"], None, term, task=task, cached_teachers=1
        )
    if "protege-top128" in sides:  # what the cache's loss sees, from live logits
        top_k = [pg.term("jsd", BETA * (1 - BETA), beta=BETA, top_k=128)]
        distillers["protege-top128"] = pg.Distiller(
            students["protege-top128"], copy.deepcopy(judge.teacher), top_k, task=task
        )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(
            students["trl"], copy.deepcopy(judge.teacher), tokenizer, judge.data.train, args.lr, tmp
        )
        check = check_losses(trainer, distillers["protege"], batches[0])
        print("loss check on one batch:", json.dumps(check, indent=1), flush=True)
        steps: dict[str, Step] = {
            "protege": protege_step(distillers["protege"], args.lr, cached=False),
            "trl": trl_step(trainer),
        }
        if "protege-cache" in sides:
            steps["protege-cache"] = protege_step(distillers["protege-cache"], args.lr, cached=True)
        if "protege-top128" in sides:
            steps["protege-top128"] = protege_step(distillers["protege-top128"], args.lr, cached=False)
        wall = dict.fromkeys(sides, 0.0)
        cpu = dict.fromkeys(sides, 0.0)
        losses: dict[str, list[float]] = {side: [] for side in sides}
        done = 0
        rnd = 0
        while done < args.steps:
            chunk = batches[done : done + args.round_steps]
            order = sides[rnd % len(sides) :] + sides[: rnd % len(sides)]
            for side in order:
                w, c = time.perf_counter(), time.process_time()
                losses[side] += [steps[side](b) for b in chunk]
                wall[side] += time.perf_counter() - w
                cpu[side] += time.process_time() - c
            done += len(chunk)
            rnd += 1
            print(
                f"round {rnd}: {done} steps; "
                + ", ".join(f"{s} {wall[s]:.0f} s wall / {cpu[s]:.0f} s CPU" for s in sides),
                flush=True,
            )
        final = {side: judge(students[side]) for side in sides}
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    result: dict[str, Any] = {
        "setup": setup_key(args) | {"steps": args.steps, "round_steps": args.round_steps, "seed": args.seed},
        "versions": {
            p: importlib.metadata.version(p) for p in ("torch", "transformers", "accelerate", "trl")
        },
        "threads": torch.get_num_threads(),
        "train_tokens": tokens,
        "loss_check": check,
        "sides": {
            side: {
                "wall_s": wall[side],
                "cpu_s": cpu[side],
                "tokens_per_s_wall": tokens / wall[side],
                "tokens_per_s_cpu": tokens / cpu[side],
                "final": {k: final[side][k] for k in ("kl", "ppl", "agreement", "acc")},
                "losses": losses[side],
            }
            for side in sides
        },
        "protege_over_trl": {
            "wall": wall["trl"] / wall["protege"],
            "cpu": cpu["trl"] / cpu["protege"],
        },
        "max_rel_loss_diff_protege_vs_trl": max(
            rel(a, b) for a, b in zip(losses["protege"], losses["trl"], strict=True)
        ),
    }
    if "protege-cache" in sides:
        result["protege_cache_over_trl"] = {
            "wall": wall["trl"] / wall["protege-cache"],
            "cpu": cpu["trl"] / cpu["protege-cache"],
        }
    print(
        f"{args.steps} steps × {args.batch_size} × {args.block} tokens per side, {torch.get_num_threads()} thread(s)"
    )
    print("| side | tokens/s (wall) | tokens/s (CPU) | held-out KL(t‖s) | ppl | agreement |")
    print("|---|---|---|---|---|---|")
    for side in sides:
        s = result["sides"][side]
        print(
            f"| {side} | {s['tokens_per_s_wall']:.1f} | {s['tokens_per_s_cpu']:.1f} | {s['final']['kl']:.4f} | "
            f"{s['final']['ppl']:.2f} | {s['final']['agreement']:.4f} |"
        )
    print(
        f"protege ÷ TRL throughput: {result['protege_over_trl']['wall']:.3f} (wall), "
        f"{result['protege_over_trl']['cpu']:.3f} (CPU); per-step loss max rel. diff "
        f"{result['max_rel_loss_diff_protege_vs_trl']:.2e}; "
        f"mean step loss {statistics.mean(losses['protege']):.4f} vs {statistics.mean(losses['trl']):.4f}"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
