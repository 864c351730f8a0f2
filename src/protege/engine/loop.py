"""``fit``: train a Distiller with HF Accelerate, evaluate, checkpoint, resume, summarise.

Accelerate supplies device placement, mixed precision, gradient accumulation and every
distributed backend (``accelerate launch`` with DDP/FSDP/DeepSpeed), so this loop is the same on
a laptop CPU and on many GPUs. What it adds is distillation-specific: the teacher's evaluation
outputs are computed once and reused, fidelity is logged at every evaluation, and the checkpoint
holds only the student and the distiller's trainable extras.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, send_to_device, set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.utils.data import DataLoader

from ..core.cohort import Cohort
from ..core.distiller import Distiller
from ..errors import ProtegeError, TrainingFailed
from ..files import atomic_write_text, exclusive_lock
from ..metrics.cost import model_costs
from ..tasks import Task
from .callbacks import Callback, callbacks_state, check_callbacks, load_callbacks_state
from .checkpoint import (
    POINTERS,
    check_run_dir,
    intact_checkpoint,
    load_checkpoint,
    read_pointers,
    remove_partial_checkpoints,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)
from .options import ScheduleConfig, TrainConfig

console = Console(stderr=True)


# -- optimizer and schedule ---------------------------------------------------------------------


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ProtegeError("nothing to train: the student has no parameter that requires grad")
    if o.name == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, s: ScheduleConfig) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps (a pure function: resumable)."""
    epoch = step / steps_per_epoch
    if s.warmup_epochs > 0 and epoch < s.warmup_epochs:
        return epoch / s.warmup_epochs
    if s.name == "constant":
        return 1.0
    if s.name == "step":
        return s.gamma ** int(epoch // s.step_size)
    if s.name == "multistep":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    span = max(epochs - s.warmup_epochs, 1e-8)
    t = min(max((epoch - s.warmup_epochs) / span, 0.0), 1.0)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if not cfg.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _make_accelerator(cfg: TrainConfig, run_dir: Path, find_unused: bool = False) -> Accelerator:
    # A process may train several models in turn (teacher, baseline, student); Accelerate keeps
    # its precision settings in a singleton, so start each run from a clean one. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    try:
        return Accelerator(
            mixed_precision=_mixed_precision(cfg),
            gradient_accumulation_steps=cfg.grad_accum,
            cpu=cfg.cpu,
            log_with=list(cfg.trackers) or None,
            project_dir=str(run_dir),
            # Some methods leave parameters without a gradient in a step (FT's translator while
            # the paraphraser trains, SimKD's unused student head): DDP must be told.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
            if find_unused
            else None,
        )
    except (ValueError, ImportError) as e:  # e.g. fp16 on CPU, tracker not installed
        raise ProtegeError(f"cannot set up training: {e}") from None


# -- evaluation ---------------------------------------------------------------------------------


#: the most bytes of teacher evaluation logits :func:`evaluate` keeps between evaluations
TEACHER_CACHE_BYTES = 512 * 2**20


@torch.no_grad()
def evaluate(
    student: nn.Module,
    loader: DataLoader,
    task: Task,
    teachers: Sequence[nn.Module] = (),
    teacher_weights: Sequence[float] | None = None,
    accelerator: Accelerator | None = None,
    teacher_cache: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Task metrics of ``student`` on ``loader``, plus fidelity to the (ensembled) teachers.

    ``teacher_cache``, when given, is filled with the teachers' evaluation logits on first use
    and read afterwards: teachers are frozen, so their outputs never change between evaluations.
    It holds at most :data:`TEACHER_CACHE_BYTES`; past that (e.g. a language model's logits over a
    large vocabulary) it is dropped and the teachers run at every evaluation instead.
    """
    was_training = student.training
    student.eval()
    for t in teachers:  # a teacher is only ever run frozen (BN running statistics, no dropout)
        t.eval()
    weights = list(teacher_weights or [1.0] * len(teachers))
    # No teacher models but teacher weights: the teachers' outputs come in the batches (a cache).
    cached = not teachers and bool(teacher_weights)
    evaluator = task.evaluator(with_teacher=bool(teachers) or cached)
    keys = task.eval_outputs()  # what the evaluator reads besides the logits (embeddings, …)
    use_cache = teacher_cache is not None and len(teacher_cache) > 0
    filling, stored = teacher_cache is not None and not use_cache, 0
    gather_rows = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    precision = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    # An accelerator's loader places the batches; a plain loader's batches go where the student is.
    # (a student without parameters, e.g. an onnxruntime model wrapped as a module, runs on the CPU)
    device = None if accelerator is not None else next(student.parameters(), torch.zeros(())).device
    try:
        with precision:
            for i, batch in enumerate(loader):
                if device is not None:
                    batch = send_to_device(batch, device)
                inputs, target = task.split(batch)
                gather = functools.partial(_gather_samples, gather_rows, task.batch_size(inputs))
                s_all = task.forward(student, inputs)
                s_out = {k: gather(s_all[k]) for k in keys if k in s_all}
                t_out = None
                if teachers:
                    if use_cache:
                        t_logits = teacher_cache[i].to(s_out["logits"].device)
                    else:
                        t_logits = gather(
                            task.combine_teachers([task.forward(t, inputs) for t in teachers], weights)
                        )
                        if filling:
                            kept = t_logits.detach().float().cpu()
                            stored += kept.numel() * kept.element_size()
                            if stored > TEACHER_CACHE_BYTES:  # too large to keep: recompute each time
                                teacher_cache.clear()  # type: ignore[union-attr]
                                filling = False
                            else:
                                teacher_cache.append(kept)  # type: ignore[union-attr]
                    t_out = {"logits": t_logits}
                elif cached and task.meta(batch).get("teacher_outputs"):
                    t_out = {
                        "logits": gather(task.combine_teachers(task.meta(batch)["teacher_outputs"], weights))
                    }
                evaluator.update(s_out, gather(target) if target is not None else None, t_out)
    finally:
        student.train(was_training)
    return evaluator.compute()


def _gather_samples(gather: Callable[[Any], Any], samples: int, x: Any) -> Any:
    """``gather(x)`` with the rows of each sample kept together.

    ``accelerate``'s ``gather_for_metrics`` drops the padding the sampler added to the last batch by
    keeping its first rows, counted in *samples*; an output with several rows per sample (a part
    segmenter's ``(B·N, P)`` per-point logits) would lose all but the first points of the batch. So such
    a tensor is gathered as ``(B, rows per sample, ...)`` and flattened back."""
    if (
        not torch.is_tensor(x)
        or x.dim() == 0
        or samples <= 0
        or x.shape[0] == samples
        or x.shape[0] % samples
    ):
        return gather(x)
    return gather(x.reshape(samples, -1, *x.shape[1:])).reshape(-1, *x.shape[1:])


# -- fit ----------------------------------------------------------------------------------------


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _fmt(metrics: dict[str, float], keys: Sequence[str]) -> str:
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def _apply_optim(
    optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, steps_per_epoch: int
) -> None:
    """After a resume, the config's optimizer settings hold from here on: the restored state keeps
    its moments and step count, the hyper-parameters are the config's (the same values, bit for bit,
    when the config did not change; a changed one, accepted with ``--override-config``, takes effect)."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
    factor = lr_factor(scheduler.last_epoch, steps_per_epoch, cfg.epochs, cfg.schedule)
    for group in optimizer.param_groups:
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * factor
        group["weight_decay"] = o.weight_decay
        if "momentum" in group:
            group["momentum"], group["nesterov"] = o.momentum, o.nesterov
        if "betas" in group:
            group["betas"] = tuple(o.betas)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _non_finite(recent: list[tuple[int, dict[str, torch.Tensor]]], epoch: int, steps: int) -> str:
    """Where the loss first went non-finite among the steps since the last check, and which terms."""
    for i, losses in recent:
        bad = {name: v.item() for name, v in losses.items() if not math.isfinite(v.item())}
        if bad:
            terms = ", ".join(f"{name!r} = {value}" for name, value in bad.items())
            return f"non-finite loss in epoch {epoch + 1}, step {i + 1} of {steps}: term {terms}"
    return f"non-finite loss in epoch {epoch + 1}"  # the sum overflowed: no term alone is non-finite


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    """Keep the ``metrics.jsonl`` lines of epochs before ``start_epoch`` (the checkpoint the run
    resumes from); a line a kill cut in half is dropped, with a note."""
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            torn += 1
            continue
        if epoch < start_epoch:
            kept.append(line)
    if torn:
        console.print(f"[yellow]warning: dropped {torn} unreadable line(s) of {path} (a write cut short)")
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def fit(
    distiller: Distiller | Cohort,
    train: DataLoader,
    val: DataLoader | None = None,
    cfg: TrainConfig | None = None,
    run_dir: str | Path = "runs/run",
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epochs: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train ``distiller``'s student on ``train``, evaluating on ``val``; write the run to ``run_dir``.

    Writes ``metrics.jsonl`` (one line per evaluation), ``checkpoints/`` (``epoch_NNNN/`` folders of
    safetensors with a ``manifest.json``, and ``pointers.json`` naming the ``last`` and the ``best``)
    and ``summary.json`` (final and best metrics, params, FLOPs, latency),
    and returns the summary. ``resume=True`` continues from the last checkpoint exactly (same data
    order, RNG, optimizer and schedule state). ``stop_after_epochs`` ends this call early after that
    many epochs (the schedule still spans ``cfg.epochs``): for preemptible jobs, resume later.
    A non-finite loss stops training, restores the last good weights and keeps their checkpoint,
    writes the summary (``status: failed: …``: epoch, step, the terms that went non-finite, what is on
    disk) and raises :class:`~protege.errors.TrainingFailed`. A damaged last checkpoint is skipped on
    resume for the newest intact one (with a warning); ``run_dir`` is locked for one writer
    (:func:`protege.files.exclusive_lock`). With ``cfg.memory_format`` (``auto`` on a CPU)
    the models train in ``channels_last`` and are handed back contiguous, also after an error.
    ``callbacks`` (:class:`~protege.engine.callbacks.Callback`) run code between steps (KD³'s
    instance selection, a data-free generator); their state is checkpointed with the run.
    """
    check_callbacks(callbacks)
    with contextlib.ExitStack() as cleanup:
        return _fit(
            distiller, train, val, cfg, run_dir, resume, overwrite, stop_after_epochs, cleanup, callbacks
        )


def _fit(
    distiller: Distiller | Cohort,
    train: DataLoader,
    val: DataLoader | None,
    cfg: TrainConfig | None,
    run_dir: str | Path,
    resume: bool,
    overwrite: bool,
    stop_after_epochs: int | None,
    cleanup: contextlib.ExitStack,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    cfg = cfg or TrainConfig()
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    check_run_dir(run_dir, resume, overwrite)
    if len(train) == 0:
        raise ProtegeError("the training set yields no batch: check the data and batch_size")

    set_seed(cfg.seed)
    accelerator = _make_accelerator(cfg, run_dir, find_unused=_may_leave_params_unused(distiller))
    main = accelerator.is_main_process
    first = None
    if distiller.needs_prepare:  # shape-dependent adapters must exist before the optimizer does
        first = _first_batch(train, accelerator.device)
        distiller.to(accelerator.device).prepare(first, num_samples=_num_samples(train))
    if _wants_channels_last(cfg, accelerator.device, distiller):
        if first is None:
            with torch.random.fork_rng(devices=[]):  # reading a batch must not shift the data order
                first = _first_batch(train, accelerator.device)
        strict = cfg.memory_format == "channels_last"
        cleanup.enter_context(_channels_last(distiller.to(accelerator.device), first, strict))
    optimizer = build_optimizer(list(distiller.parameters()), cfg)
    model, optimizer, train_loader = accelerator.prepare(distiller, optimizer, train)
    val_loader = accelerator.prepare(val) if val is not None else None
    steps_per_epoch = max(math.ceil(len(train_loader) / cfg.grad_accum), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg.epochs, cfg.schedule)
    )

    best: dict[str, Any] = {}
    history_final: dict[str, Any] = {}
    start_epoch = 0
    if main:  # one writer per run directory, from here on (everything above only read it)
        cleanup.enter_context(exclusive_lock(run_dir))
        check_run_dir(run_dir, resume, overwrite)  # again, now that no one else can write it
        for name in remove_partial_checkpoints(ckpt_root):
            console.print(f"[yellow]removed {ckpt_root / name}: a checkpoint write that never finished")
    if resume:
        last, skipped = intact_checkpoint(run_dir, "last")
        for note in skipped:
            console.print(f"[yellow]warning: skipped damaged checkpoint {note}; resuming from {last.name}")
        state = load_checkpoint(last)
        try:
            distiller.student.load_state_dict(state["student"])
            if state["extra"]:
                distiller.load_state_dict(state["extra"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ProtegeError(
                f"checkpoint {last} does not fit this run's models or optimizer ({str(e).splitlines()[0]}): "
                "resume with the config the run was started with"
            ) from None
        trainer = state["trainer"]
        scheduler.load_state_dict(trainer["scheduler"])
        _apply_optim(optimizer, scheduler, cfg, steps_per_epoch)
        restore_rng(state["rng"])
        load_callbacks_state(callbacks, state["callbacks"])
        start_epoch = trainer["epoch"] + 1
        best, history_final = trainer["best"], trainer["final"]
        if main:
            pointers = read_pointers(ckpt_root)
            best_ok = bool(pointers.get("best")) and verify_checkpoint(ckpt_root / pointers["best"]) is None
            if not best_ok:
                console.print(f"[yellow]warning: the best checkpoint is damaged; best is now {last.name}")
            if skipped or not best_ok:  # point last (and a damaged best) at what the run resumes from
                pointers = {"last": last.name, "best": pointers["best"] if best_ok else last.name}
                atomic_write_text(ckpt_root / POINTERS, json.dumps(pointers))
            _truncate_metrics(metrics_path, start_epoch)
            if start_epoch >= cfg.epochs:
                console.print(
                    f"{run_dir}: finished ({cfg.epochs} of {cfg.epochs} epochs), nothing to resume",
                    soft_wrap=True,
                )
    elif main:  # a fresh start (check_run_dir allowed it): nothing of an earlier run may linger
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
        shutil.rmtree(ckpt_root, ignore_errors=True)

    if cfg.trackers:
        accelerator.init_trackers(
            run_dir.name, config={"epochs": cfg.epochs, "lr": cfg.optim.lr, "seed": cfg.seed}
        )

    task = distiller.task
    teachers = list(distiller.teachers.values())
    teacher_cache: list[torch.Tensor] = []
    primary = task.primary_metric
    status = "completed"
    t_start = time.perf_counter()
    total_steps = cfg.epochs * len(train_loader)
    epoch = start_epoch - 1
    for cb in callbacks:
        cb.on_fit_start(distiller, accelerator.device)

    with _progress(cfg.progress and main) as bar:
        job = bar.add_task("train", total=total_steps, completed=start_epoch * len(train_loader), info="")
        end_epoch = (
            cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start_epoch + stop_after_epochs)
        )
        for epoch in range(start_epoch, end_epoch):
            model.train()
            for cb in callbacks:
                cb.on_epoch_start(distiller, epoch)
            train_loader.set_epoch(epoch)
            sums: dict[str, torch.Tensor] = {}
            n_batches = 0
            bar.update(job, description=f"epoch {epoch + 1}/{cfg.epochs}")
            failure: str | None = None
            recent: list[tuple[int, dict[str, torch.Tensor]]] = []  # steps since the last check
            for i, batch in enumerate(train_loader):
                distiller.set_progress(epoch + i / len(train_loader))
                for cb in callbacks:
                    batch = cb.on_batch(distiller, batch, epoch, i)
                with accelerator.accumulate(model):
                    _, losses = model(batch)
                    total = sum(losses.values())
                    accelerator.backward(total)
                    if accelerator.sync_gradients and cfg.clip_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                detached = {name: value.detach().float() for name, value in losses.items()}
                recent.append((i, detached))
                for name, v in detached.items():
                    sums[name] = sums[name] + v if name in sums else v
                n_batches += 1
                if (i + 1) % cfg.log_every == 0 or i + 1 == len(train_loader):
                    running = sum(sums.values()).item() / n_batches
                    if not math.isfinite(running):
                        failure = _non_finite(recent, epoch, len(train_loader))
                        break
                    recent.clear()
                    bar.update(job, completed=epoch * len(train_loader) + i + 1, info=f"loss {running:.4f}")
            if failure is not None:
                if read_pointers(ckpt_root):  # hand back the last good weights, not the diverged ones
                    last, _ = intact_checkpoint(run_dir, "last")
                    good = load_checkpoint(last)
                    distiller.student.load_state_dict(good["student"])
                    if good["extra"]:
                        distiller.load_state_dict(good["extra"], strict=False)
                    load_callbacks_state(callbacks, good["callbacks"])
                    failure += (
                        f". On disk: checkpoint {last.name} (epoch {good['trainer']['epoch'] + 1}, the last "
                        f"good one; resume from it with a lower lr, e.g. --resume --override-config)"
                    )
                else:
                    failure += ". On disk: no checkpoint (the run failed in its first epoch)"
                status = f"failed: {failure}"
                console.print(f"[red]{escape(status)}")
                epoch -= 1
                break

            record: dict[str, Any] = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch}
            record.update({f"train/{k}": (v / n_batches).item() for k, v in sums.items()})
            record["train/loss"] = sum(record[f"train/{k}"] for k in sums)
            record["lr"] = optimizer.param_groups[0]["lr"]
            last_epoch = epoch + 1 == cfg.epochs
            if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
                predictors = _predictors(distiller)
                scores = []
                for name, predictor in predictors.items():
                    metrics = evaluate(
                        predictor,
                        val_loader,
                        task,
                        teachers,
                        distiller.teacher_weights,
                        accelerator,
                        teacher_cache,
                    )
                    prefix = f"val/{name}/" if name else "val/"
                    record.update({f"{prefix}{k}": v for k, v in metrics.items()})
                    scores.append(metrics[primary])
                if len(predictors) > 1:  # a cohort: its best epoch is the one best on average
                    record[f"val/{primary}"] = sum(scores) / len(scores)
            for cb in callbacks:
                cb.on_epoch_end(distiller, epoch, record)
            record["time_s"] = time.perf_counter() - t_start
            key = f"val/{primary}"
            if val_loader is None:  # nothing to choose by: the latest epoch is the best known
                is_best = True
            else:
                is_best = key in record and record[key] > best.get(key, -math.inf)
            if is_best:
                best = dict(record)
            history_final = record
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                unwrapped = accelerator.unwrap_model(model)
                own = tuple(getattr(unwrapped, "student_prefixes", ("student.",)))
                extra = {k: v for k, v in unwrapped.state_dict().items() if not k.startswith(own)}
                save_checkpoint(
                    ckpt_root,
                    epoch,
                    unwrapped.student.state_dict(),
                    extra,
                    optimizer.state_dict(),
                    {
                        "epoch": epoch,
                        "scheduler": scheduler.state_dict(),
                        "best": best,
                        "final": history_final,
                    },
                    is_best=is_best,
                    keep_best=cfg.keep_checkpoints == "last+best",
                    callbacks=callbacks_state(callbacks),
                )
                if cfg.trackers:
                    accelerator.log(
                        {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch
                    )
                console.print(
                    f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {record['train/loss']:.4f}  "
                    + _fmt(record, [f"val/{primary}", "val/agreement", "val/kl", "val/ece"]),
                    soft_wrap=True,
                )
            accelerator.wait_for_everyone()

    if status == "completed" and epoch + 1 < cfg.epochs:
        status = f"paused after epoch {epoch + 1} of {cfg.epochs}; continue with resume"
    summary: dict[str, Any] = {
        "status": status,
        "epochs_completed": epoch + 1,
        "epochs": cfg.epochs,
        "final": history_final,
        "best": best,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "wall_time_s": time.perf_counter() - t_start,
        "checkpoints": read_pointers(ckpt_root),
    }
    if main and cfg.measure_cost:
        predictors = _predictors(distiller)
        models = {name or "student": m for name, m in predictors.items()}
        models.update({"teacher": teachers[0]} if teachers else {})
        summary.update(model_costs(models, _example_input(train, task)))
        for key in ("speedup", "compression"):
            if key in summary.get("student", {}):
                summary[key] = summary["student"][key]
    if main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    if cfg.trackers:
        accelerator.end_training()
    if status.startswith("failed"):
        raise TrainingFailed(status.removeprefix("failed: ") + f"; summary: {run_dir / 'summary.json'}")
    return summary


def set_memory_format(module: nn.Module, memory_format: torch.memory_format) -> None:
    """Lay out ``module``'s 4-D parameters and buffers (a Distiller's teachers too) in ``memory_format``,
    in place: the ``Parameter`` objects stay the same, so an optimizer holding them is unaffected."""
    module._apply(lambda t: t.contiguous(memory_format=memory_format) if t.dim() == 4 else t)


@contextlib.contextmanager
def _channels_last(distiller: Distiller | Cohort, batch: Any, strict: bool) -> Iterator[None]:
    """Train in ``channels_last`` and hand the models back contiguous (safetensors saves only
    contiguous tensors). On the CPU, oneDNN's convolutions then skip the reorders to and from NCHW
    (per step of a CIFAR ResNet-8: conv backward -23%, BatchNorm forward -55%). Numerically the same
    fp32 training (summation order aside). The students and teachers first run ``batch``: a model
    that fails in this layout only (e.g. ``x.view(n, -1)`` over a feature map) trains contiguous with
    a note, or, ``strict`` (asked for explicitly), stops with an error that says what to set."""
    set_memory_format(distiller, torch.channels_last)
    failure = _failure(distiller, batch)
    if failure is not None:
        set_memory_format(distiller, torch.contiguous_format)
        if _failure(distiller, batch) is None:  # else it fails either way: training shows its error
            if strict:
                raise ProtegeError(
                    f"memory_format channels_last: a model fails in that layout ({failure}); "
                    "set memory_format: auto or contiguous"
                )
            console.print(
                "[yellow]note: training in the contiguous layout; in channels_last a model fails: "
                + escape(failure)
            )
    try:
        yield
    finally:
        set_memory_format(distiller, torch.contiguous_format)


def _wants_channels_last(cfg: TrainConfig, device: torch.device, distiller: Distiller | Cohort) -> bool:
    """``memory_format`` asks for channels_last (``auto``: on a CPU), and some student, teacher or
    trainable extra has a 4-D weight (a 2-D convolution's) for it to change.

    ``auto`` also keeps the contiguous layout when a convolution has fewer than
    :data:`_CL_MIN_CHANNELS` output channels: with torch 2.14's CPU kernels, channels_last training
    of such narrow networks with more than one intra-op thread corrupts the heap (a segfault in
    backward; 8-channel ResNets crash, 16-channel ones do not), and narrow layers gain nothing from
    the layout anyway. ``channels_last`` asked for explicitly is honoured."""
    if cfg.memory_format == "contiguous" or (cfg.memory_format == "auto" and device.type != "cpu"):
        return False
    modules = [distiller, *distiller.teachers.values()]
    if cfg.memory_format == "auto" and any(
        isinstance(c, nn.Conv2d) and c.out_channels < _CL_MIN_CHANNELS for m in modules for c in m.modules()
    ):
        return False
    return any(t.dim() == 4 for m in modules for t in itertools.chain(m.parameters(), m.buffers()))


_CL_MIN_CHANNELS = 16


def _failure(distiller: Distiller | Cohort, batch: Any) -> str | None:
    """The first line of the error a student or teacher raises on ``batch``, else ``None``."""
    inputs, _ = distiller.task.split(batch)
    models = [*_predictors(distiller).values(), *distiller.teachers.values()]
    was_training = distiller.training
    distiller.eval()
    try:
        with torch.no_grad():
            for model in models:
                distiller.task.forward(model, inputs)
    except RuntimeError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    finally:
        distiller.train(was_training)
    return None


def _may_leave_params_unused(distiller: nn.Module) -> bool:
    """Whether a training step may leave some trainable parameter without a gradient."""
    terms = [m for m in distiller.modules() if hasattr(m, "info") and hasattr(m, "state")]
    return any(t.state is not None for t in terms) or bool(getattr(distiller, "student_frozen", False))


def _predictors(distiller: nn.Module) -> dict[str, nn.Module]:
    """What to evaluate: ``{"": predictor}`` for a Distiller, ``{name: predictor}`` for a Cohort."""
    if hasattr(distiller, "inference_models"):
        return distiller.inference_models()
    return {"": distiller.inference_model()}


def _num_samples(loader: DataLoader) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:  # an iterable dataset
        return None


def _first_batch(loader: DataLoader, device: torch.device) -> Any:
    return send_to_device(next(iter(loader)), device)


def _example_input(loader: DataLoader, task: Task) -> torch.Tensor:
    inputs, _ = task.split(next(iter(loader)))
    return task.model_input(inputs)
