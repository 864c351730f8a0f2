"""``protege supernet``: AutoDistil's task-agnostic SuperLM training, and downstream fine-tuning.

Xu et al., "AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large
Language Models" (2022). :func:`train_supernets` trains one weight-sharing
:class:`~protege.models.supernet.SuperLM` per sub-space (K = 3 by default: base/small/tiny scaled to
the teacher, :func:`~protege.models.supernet.default_subspaces`), each initialised by slicing the
teacher. Every step follows the sandwich rule: the largest, the smallest and ``sandwich_random``
random subnets of the sub-space run on the same batch, each adds the gradient of its MiniLM
self-attention relation loss (the registered ``minilm`` term, ``causal=False``, relations ``qq``,
``kk``, ``vv`` of the last layer, KL per relation head, against the frozen teacher's last layer), and
one optimizer step updates the shared weights. The text is unlabelled (pydoc topics, stdlib docstrings).

The run directory (``output_dir/name``) holds ``config.yaml`` (resolved), ``metrics.jsonl`` (held-out
relation loss of the largest and smallest subnets every ``eval_every`` steps, per sub-space),
``subspaces/<space>/checkpoints/`` (protege's atomic safetensors checkpoints: ``--resume`` goes on
from the last intact one), ``subspaces/<space>/supernet/`` (the trained supernet, what ``protege
search`` reads) and ``summary.json``.

:func:`finetune_classifier` fine-tunes an extracted student (or any BERT encoder) with a linear head
on mean-pooled tokens on a labelled built-in corpus (``sdg`` or ``hsk-en``), optionally with KD
(the registered ``kd`` loss) from a fine-tuned teacher classifier.

Why all-MiniLM-L6-v2 as the default teacher: a BertModel (6 x 384, 22.7M parameters) whose forward
plus four subnet forward/backward passes on 16 x 64 tokens take well under a second on this 2-core
CPU; all-mpnet-base-v2 (12 x 768, 110M) is an MPNet, not a BertModel, and ~8x the cost.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from .config import DirName, apply_overrides, format_validation_error, read_yaml_mapping
from .core.distiller import Distiller, Term
from .data.text import builtin_corpus
from .engine.checkpoint import intact_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .engine.loop import console
from .errors import ProtegeError
from .files import atomic_write_text
from .models.supernet import SubSpace, SuperLM, bert_qkv, default_subspaces, save_supernet
from .tasks.classification import ClassificationTask
from .tasks.supernet import (
    TextBatches,
    check_relation_heads,
    corpus_texts,
    held_out,
    inherited_loss,
    load_teacher,
    relation_loss,
    teacher_relations,
)

__all__ = [
    "AutoDistilConfig",
    "SubSpaceConfig",
    "TextClassifier",
    "finetune_classifier",
    "labelled",
    "load_autodistil_config",
    "train_supernets",
]


class SubSpaceConfig(BaseModel):
    """Explicit ranges of one sub-space (every combination with hidden % heads == 0)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    layers: list[int] = Field(min_length=1)
    hidden: list[int] = Field(min_length=1)
    heads: list[int] = Field(min_length=1)
    mlp_ratio: list[float] = Field(min_length=1)

    def build(self) -> SubSpace:
        return SubSpace(
            self.name, tuple(self.layers), tuple(self.hidden), tuple(self.heads), tuple(self.mlp_ratio)
        )


class AutoDistilConfig(BaseModel):
    """A SuperLM training run (module docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: DirName = "autodistil"
    output_dir: str = "runs/autodistil"
    teacher: str = Field(
        "minilm", description="'minilm' (all-MiniLM-L6-v2, offline) or a BertModel directory"
    )
    subspaces: int | list[SubSpaceConfig] = Field(
        3, description="K (1 or 3, scaled to the teacher) or explicit ranges"
    )
    reorder: bool = Field(
        True, description="sort the teacher's heads and FFN neurons by weight magnitude first"
    )
    corpora: list[str] = Field(["pydoc-topics", "stdlib-docstrings"], min_length=1)
    max_length: int = Field(64, gt=1)
    batch_size: int = Field(16, gt=0)
    steps: int = Field(200, gt=0, description="optimizer steps per sub-space")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    relation_heads: int = Field(4, gt=0, description="minilm relation heads; must divide every hidden size")
    relations: list[Literal["qk", "qq", "kk", "vv"]] = ["qq", "kk", "vv"]
    sandwich_random: int = Field(2, ge=0, description="random subnets per step beside largest and smallest")
    eval_every: int = Field(50, gt=0)
    eval_texts: int = Field(64, gt=0, description="held-out texts for the relation loss")
    checkpoint_every: int = Field(50, gt=0)
    seed: int = 0
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_autodistil_config(path: str | Path, overrides: list[str] | None = None) -> AutoDistilConfig:
    """Read a supernet YAML, apply ``--set key=value`` overrides, validate."""
    data = read_yaml_mapping(Path(path), "supernet config", "teacher:, subspaces:, steps: ...")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return AutoDistilConfig.model_validate(data)
    except ValidationError as e:
        raise ProtegeError(format_validation_error(e, str(path))) from None


# --------------------------------------------------------------------------- training


def _subspaces(cfg: AutoDistilConfig, teacher_config: Any) -> list[SubSpace]:
    if isinstance(cfg.subspaces, int):
        return default_subspaces(teacher_config, cfg.subspaces)
    names = [s.name for s in cfg.subspaces]
    if len(set(names)) != len(names):
        raise ProtegeError(f"sub-space names must be unique, got {names}")
    return [s.build() for s in cfg.subspaces]


def _eval(
    net: SuperLM, space: SubSpace, teacher_qkv: list[Any], batches: list[Any], cfg: AutoDistilConfig
) -> dict[str, float]:
    """Held-out relation loss of the sub-space's largest and smallest subnets."""
    out = {
        f"loss/{label}": inherited_loss(net, arch, batches, teacher_qkv, cfg.relation_heads, cfg.relations)
        for label, arch in (("largest", space.largest), ("smallest", space.smallest))
    }
    return out


def _read_metrics(path: Path, space: str, up_to: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["space"] != space or r["step"] <= up_to]


def train_supernets(cfg: AutoDistilConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train one SuperLM per sub-space (module docstring); returns the summary (also ``summary.json``).

    Raises:
        ProtegeError: an existing run without ``resume``/``overwrite``, a teacher that is not a BERT
            encoder, a sub-space beyond the teacher, relation heads that do not divide a hidden size.
    """
    start = time.perf_counter()
    teacher, tokenizer = load_teacher(cfg.teacher, reorder=cfg.reorder)
    spaces = _subspaces(cfg, teacher.config)
    for space in spaces:
        space.check_within(teacher.config)
    check_relation_heads(cfg.relation_heads, teacher.config.hidden_size, spaces)
    run = cfg.run_dir  # checked after the config, so a bad one never deletes a run
    if run.exists() and any(run.iterdir()) and not (resume or overwrite):
        raise ProtegeError(f"{run} exists: pass --resume to continue it or --overwrite to start again")
    if overwrite and not resume and run.exists():
        import shutil

        shutil.rmtree(run)
    train = TextBatches(
        corpus_texts(cfg.corpora, "train", cfg.seed), tokenizer, cfg.max_length, cfg.batch_size
    )
    held = held_out(cfg.corpora, cfg.eval_texts, cfg.seed)
    evals = TextBatches(held, tokenizer, cfg.max_length, cfg.batch_size).all()
    if len(train.texts) < cfg.batch_size or not evals:
        raise ProtegeError(f"corpora {cfg.corpora} have too few texts for batch_size {cfg.batch_size}")
    teacher_eval = teacher_relations(teacher, evals)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    metrics_path = run / "metrics.jsonl"
    results: dict[str, Any] = {}
    for k, space in enumerate(spaces):
        results[space.name] = _train_one(
            cfg, k, space, teacher, train, evals, teacher_eval, metrics_path, resume
        )
    summary = {
        "name": cfg.name,
        "teacher": cfg.teacher,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "subspaces": results,
        "train_texts": len(train.texts),
        "eval_texts": len(held),
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=1))
    return summary


def _train_one(
    cfg: AutoDistilConfig,
    k: int,
    space: SubSpace,
    teacher: nn.Module,
    train: TextBatches,
    evals: list[Any],
    teacher_eval: list[Any],
    metrics_path: Path,
    resume: bool,
) -> dict[str, Any]:
    torch.manual_seed(cfg.seed + k)
    net = SuperLM.from_teacher(teacher, space).train()  # the teacher is already reordered
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    space_dir = cfg.run_dir / "subspaces" / space.name
    ckpt_root = space_dir / "checkpoints"
    step = 0
    if resume and (ckpt_root / "pointers.json").exists():
        path, skipped = intact_checkpoint(space_dir, "last")
        for note in skipped:
            console.print(f"[yellow]skipped damaged checkpoint {note}")
        state = load_checkpoint(path)
        net.bert.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        step = int(state["trainer"]["step"])
    rows = _read_metrics(metrics_path, space.name, step)
    begin = time.perf_counter()
    bar = Progress(
        TextColumn(f"[bold]supernet {space.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not cfg.progress,
    )
    with bar:
        task = bar.add_task(space.name, total=cfg.steps, completed=step, info="")
        if step == 0:
            rows.append({"space": space.name, "step": 0, **_eval(net, space, teacher_eval, evals, cfg)})
        while step < cfg.steps:
            ids, mask, target = train.at_step(step, cfg.seed)
            with torch.no_grad():
                t_qkv = bert_qkv(teacher, ids, mask)
            rng = random.Random(f"{cfg.seed}:{space.name}:{step}")
            losses = []
            for arch in space.sandwich(rng, cfg.sandwich_random):
                loss = relation_loss(
                    net(ids, mask, arch).qkv, t_qkv, target, cfg.relation_heads, cfg.relations
                )
                loss.backward()
                losses.append(float(loss.detach()))
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(task, advance=1, info=f"loss {np.mean(losses):.4f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rows.append(
                    {
                        "space": space.name,
                        "step": step,
                        "train_loss": float(np.mean(losses)),
                        **_eval(net, space, teacher_eval, evals, cfg),
                    }
                )
                atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(
                    ckpt_root,
                    step,
                    net.bert.state_dict(),
                    {},
                    opt.state_dict(),
                    {"step": step, "space": space.name},
                    is_best=False,
                    keep_best=False,
                )
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    out_dir = space_dir / "supernet"
    save_supernet(
        net,
        out_dir,
        space,
        {
            "teacher": cfg.teacher,
            "relation_heads": cfg.relation_heads,
            "relations": list(cfg.relations),
            "steps": cfg.steps,
            "reordered_teacher": cfg.reorder,
        },
    )
    mine = [r for r in rows if r["space"] == space.name]
    return {
        "space": space.to_dict(),
        "archs": len(space.archs),
        "largest": space.largest.id,
        "smallest": space.smallest.id,
        "first": mine[0] if mine else None,
        "final": mine[-1] if mine else None,
        "seconds": round(time.perf_counter() - begin, 2),
        "supernet": str(out_dir),
    }


# --------------------------------------------------------------------------- downstream


class TextClassifier(nn.Module):
    """A BERT encoder, mean pooling over tokens, a linear head: ``forward(ids, mask) -> logits``."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: Tensor | dict[str, Tensor], attention_mask: Tensor | None = None) -> Tensor:
        if isinstance(input_ids, dict):  # a batch's inputs as one value (protege's tasks pass one)
            input_ids, attention_mask = input_ids["input_ids"], input_ids["attention_mask"]
        assert attention_mask is not None
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))


def labelled(
    corpus: str, probe: str, part: str, seed: int, limit: int | None = None
) -> tuple[list[str], list[int]]:
    """Texts and class indices of ``probe`` in a built-in corpus part (unlabelled texts dropped)."""
    records = [r for r in builtin_corpus(corpus, part, seed=seed) if probe in r.labels]
    if not records:
        raise ProtegeError(
            f"corpus {corpus!r} has no {probe!r} labels (sdg: 'sdg'; hsk-en: 'hsk_topic', 'hsk_level')"
        )
    if limit is not None and len(records) > limit:
        records = [records[i * len(records) // limit] for i in range(limit)]
    return [r.text for r in records], [r.labels[probe] for r in records]


def finetune_classifier(
    encoder: nn.Module,
    tokenizer: Any,
    corpus: str = "hsk-en",
    probe: str = "hsk_topic",
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 32,
    max_length: int = 64,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.5,
    T: float = 2.0,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``encoder`` with a classification head on ``probe`` labels; returns test accuracy.

    With ``teacher`` (a fine-tuned :class:`TextClassifier`), the loss is
    ``(1 - kd_weight) CE + kd_weight KD_T`` (Hinton et al.'s ``kd``), else plain CE. Returns
    ``{"accuracy", "teacher_agreement", "train_loss", "steps", "seconds", "model"}`` (``model``: the
    fine-tuned classifier; ``teacher_agreement``: share of test texts where it predicts the teacher's class).
    """
    torch.manual_seed(seed)
    x_train, y_train = labelled(corpus, probe, "train", seed, max_train)
    x_test, y_test = labelled(corpus, probe, "test", seed, max_test)
    classes = max(y_train + y_test) + 1
    model = TextClassifier(encoder, classes).train()
    # the one contract: a Distiller with the registered ce (and kd) terms, the classification task
    terms = [Term("ce", 1.0)] if teacher is None else [Term("ce", 1 - kd_weight), Term("kd", kd_weight, T=T)]
    distiller = Distiller(model, teacher, terms, task=ClassificationTask())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = TextBatches(x_train, tokenizer, max_length, batch_size)
    labels = torch.tensor(y_train)
    steps = epochs * max(1, len(x_train) // batch_size)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        per_epoch = max(1, len(x_train) // batch_size)
        epoch, k = divmod(step, per_epoch)
        idx = np.random.default_rng([seed, epoch]).permutation(len(x_train))[
            k * batch_size : (k + 1) * batch_size
        ]
        ids, mask, _ = data.batch([x_train[i] for i in idx])
        _, terms_now = distiller(({"input_ids": ids, "attention_mask": mask}, labels[idx]))
        loss = sum(terms_now.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    correct = agree = 0
    with torch.no_grad():
        test = TextBatches(x_test, tokenizer, max_length, 64)
        for i in range(0, len(x_test), 64):
            ids, mask, _ = test.batch(x_test[i : i + 64])
            pred = model(ids, mask).argmax(-1)
            correct += int((pred == torch.tensor(y_test[i : i + 64])).sum())
            if teacher is not None:
                agree += int((pred == teacher(ids, mask).argmax(-1)).sum())
    return {
        "accuracy": correct / len(x_test),
        "teacher_agreement": agree / len(x_test) if teacher is not None else None,
        "train_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 2),
        "model": model,
    }
