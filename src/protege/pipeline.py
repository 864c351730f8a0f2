"""Config-driven runs: build data, models and the Distiller from a :class:`RunConfig`, then fit and test.

This is what ``protege train`` / ``distill`` / ``evaluate`` call; everything here is plain Python
API (``pg.run(cfg)``), so nothing is possible from the CLI that is not possible from Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn

from .analysis.cost import model_costs
from .config import ModelConfig, RunConfig, dump_config, load_config
from .core.distiller import Distiller, Term
from .data import DataSplits, WithIndex, load_data
from .engine import checkpoint_dir, evaluate, fit, make_loader
from .engine.checkpoint import atomic_write_text, check_run_dir, read_pointers
from .engine.loop import console
from .errors import ProtegeError
from .models import build_model
from .tasks import build_task

Mode = Literal["train", "distill"]


def resolve_weights(weights: str | None) -> str | None:
    """A protege run directory stands for its best checkpoint; anything else is passed through."""
    if weights is None:
        return None
    p = Path(weights)
    if p.is_dir() and read_pointers(p / "checkpoints"):
        return str(checkpoint_dir(p, "best"))
    return weights


def load_run_data(cfg: RunConfig) -> DataSplits:
    d = cfg.data
    return load_data(
        d.source,
        root=d.root,
        transforms=d.transforms,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
        download=d.download,
        **d.options,
    )


def build_from(spec: ModelConfig, data: DataSplits) -> nn.Module:
    return build_model(
        spec.model,
        num_classes=data.num_classes,
        in_chans=data.in_chans,
        weights=resolve_weights(spec.weights),
        **spec.kwargs,
    )


def build_distiller(cfg: RunConfig, data: DataSplits, mode: Mode = "distill") -> Distiller:
    """Student, teachers (frozen) and terms as the config says.

    In ``train`` mode only the label terms are kept (plain training, default CE); a configured
    teacher is still loaded, but only as the reference for fidelity metrics.
    """
    set_seed(cfg.seed)  # the student's initialization depends only on the seed
    student = build_from(cfg.student, data)
    specs = cfg.all_teachers()
    teachers = {
        f"teacher{i}" if len(specs) > 1 else "teacher": build_from(s, data) for i, s in enumerate(specs)
    }
    for spec in specs:
        if spec.weights is None:
            console.print(
                f"[yellow]warning: teacher {spec.model!r} has no weights: it is randomly initialised"
            )
    terms = [Term(**t.model_dump()) for t in cfg.terms]  # extra keys are the loss's params
    if mode == "train":
        terms = [t for t in terms if not t.uses_teacher] or [Term("ce")]
    elif not any(t.uses_teacher for t in terms):
        raise ProtegeError(
            "distill: no term reads the teacher; add e.g. {loss: kd, weight: 0.9} to terms, or use 'protege train'"
        )
    return Distiller(
        student,
        teachers or None,
        terms,
        teacher_weights=[s.weight for s in specs] or None,
        task=build_task(cfg.task),
    )


def run(
    cfg: RunConfig, mode: Mode = "distill", resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train (``mode="train"``: plain CE) or distill as ``cfg`` says; write ``runs/<name>/``.

    After training, the last and the best (by validation) checkpoints are evaluated on the test
    split, and their metrics join ``summary.json`` under ``"test"``.
    """
    run_dir = cfg.run_dir
    check_run_dir(run_dir, resume, overwrite)  # before anything is written over
    data = load_run_data(cfg)
    distiller = build_distiller(cfg, data, mode)
    train_set = data.train
    if any(t.info.uses_index for t in distiller.terms):  # per-sample memory (CRD) reads indices
        train_set = WithIndex.wrap(train_set)
    train_loader = make_loader(
        train_set, cfg.data.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.data.num_workers
    )
    val_loader = make_loader(
        data.val, cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    summary = fit(
        distiller, train_loader, val_loader, cfg.train_config(), run_dir, resume=resume, overwrite=overwrite
    )
    summary.update({"name": cfg.name, "mode": mode, "data": data.source})
    if data.test is not None and summary["checkpoints"]:
        summary["test"] = test_checkpoints(distiller, data, cfg)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    distiller.close()
    return summary


def test_checkpoints(distiller: Distiller, data: DataSplits, cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Test-split metrics of the run's ``last`` and ``best`` checkpoints."""
    assert data.test is not None
    loader = make_loader(data.test, cfg.data.eval_batch_size, shuffle=False)
    teachers = list(distiller.teachers.values())
    device = next(distiller.student.parameters()).device
    results = {}
    cache: list[torch.Tensor] = []
    for which in ("last", "best"):
        where = checkpoint_dir(cfg.run_dir, which)
        distiller.student.load_state_dict(load_file(where / "model.safetensors", device=str(device)))
        if (where / "distiller.safetensors").is_file():  # trained extras (e.g. SimKD's projector)
            distiller.load_state_dict(load_file(where / "distiller.safetensors", device=str(device)), strict=False)
        results[which] = evaluate(
            distiller.inference_model(),
            loader,
            distiller.task,
            teachers,
            distiller.teacher_weights,
            teacher_cache=cache,
        )
    return results


def evaluate_run(
    run_dir: str | Path,
    split: Literal["val", "test"] = "test",
    which: Literal["last", "best"] = "best",
    latency: bool = True,
) -> dict[str, Any]:
    """Metrics of a finished run's student (and its teacher, for reference) on ``split``.

    Returns accuracy, top-5, NLL, ECE, agreement and KL(teacher‖student) for the student, the
    teacher's own accuracy, and params, FLOPs and batch-1 latency of both.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ProtegeError(f"{run_dir} is not a protege run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    data = load_run_data(cfg)
    dataset = data.test if split == "test" else data.val
    if dataset is None:
        raise ProtegeError(f"the data source {data.source!r} has no {split} split")
    student_cfg = cfg.student.model_copy(update={"weights": str(checkpoint_dir(run_dir, which))})
    student = build_from(student_cfg, data)
    teachers = [build_from(s, data) for s in cfg.all_teachers()]
    loader = make_loader(dataset, cfg.data.eval_batch_size, shuffle=False)
    task = build_task(cfg.task)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "split": split,
        "checkpoint": which,
        "metrics": evaluate(student, loader, task, teachers, [s.weight for s in cfg.all_teachers()]),
    }
    models = {"student": student, **({"teacher": teachers[0]} if teachers else {})}
    result.update(model_costs(models, task.split(next(iter(loader)))[0], latency=latency))
    if "speedup" in result["student"]:
        result["speedup"] = result["student"]["speedup"]
    return result
