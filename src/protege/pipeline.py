"""Config-driven runs: build data, models and the Distiller from a :class:`RunConfig`, then fit and test.

This is what ``protege train`` / ``distill`` / ``evaluate`` call; everything here is plain Python
API (``pg.run(cfg)``), so nothing is possible from the CLI that is not possible from Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from accelerate.utils import send_to_device, set_seed
from safetensors.torch import load_file
from torch import nn

from .build import Mode, build_distiller, build_from, build_teachers, load_run_data
from .caching import use_cache
from .config import RunConfig, config_changes, dump_config, load_config, unsafe_resume_changes
from .core.cohort import Cohort
from .core.distiller import Distiller, Term
from .core.fake_quant import FakeQuant
from .data import DataSplits, WithIndex
from .engine import checkpoint_dir, evaluate, fit, make_loader
from .engine.cache import CachedTeacherDataset, cache_loader
from .engine.callbacks import Callback
from .engine.checkpoint import (
    check_fits,
    check_run_dir,
    check_writable,
    intact_checkpoint,
    load_checkpoint,
    read_pointers,
)
from .engine.loop import console
from .errors import ProtegeError
from .files import atomic_save_tensors, atomic_write_text, exclusive_lock, replace_dir
from .losses import get_loss
from .metrics.cost import model_costs
from .strategies import training_data
from .tasks import Task, build_task


def _loaders(cfg: RunConfig, data: DataSplits, distiller: Distiller | Cohort) -> tuple[Any, Any]:
    members = distiller.members.values() if isinstance(distiller, Cohort) else [distiller]
    train_set = data.train
    cached = isinstance(train_set, CachedTeacherDataset)  # yields indices itself
    if not cached and any(t.info.uses_index for d in members for t in d.terms):  # per-sample memory (CRD)
        train_set = WithIndex.wrap(train_set)
    train_loader = (cache_loader if cached else make_loader)(
        train_set, cfg.data.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.data.num_workers
    )
    val_loader = make_loader(
        data.val, cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers
    )
    return train_loader, val_loader


def run(
    cfg: RunConfig,
    mode: Mode = "distill",
    resume: bool = False,
    overwrite: bool = False,
    override_config: bool = False,
) -> dict[str, Any]:
    """Train (``mode="train"``: plain CE) or distill as ``cfg`` says; write ``runs/<name>/``.

    After training, the last and the best (by validation) checkpoints are evaluated on the test
    split, and their metrics join ``summary.json`` under ``"test"``. A config with ``stages``
    runs them one after another (see :func:`run_stages`). The run report is written after the
    run, by the layer above (``pg.run``, :func:`protege.analysis.runs.run`).

    Nothing is written before everything that can be checked is: the run directory's state, on
    ``resume`` the config against the run's stored one (:func:`check_resume`; ``override_config``
    accepts a changed one and records the change), the data, the models, and one batch through the
    student, the teachers and every term (:func:`dry_step`). Then the run directory is locked
    for this process alone (:func:`protege.files.exclusive_lock`).
    """
    if cfg.stages:
        return run_stages(cfg, mode, resume, overwrite, override_config)
    run_dir = cfg.run_dir
    check_run_dir(run_dir, resume, overwrite)  # before anything is written over
    changes = check_resume(cfg, override_config) if resume else []
    data = load_run_data(cfg)
    if mode == "distill" and cfg.cache is not None:  # verified; its splits carry the teachers' outputs
        data, _ = use_cache(cfg, data)
    distiller = build_distiller(cfg, data, mode)
    train_loader, val_loader = _loaders(cfg, data, distiller)
    if cfg.data.strategy == "original" or mode == "train":
        dry_step(distiller, train_loader, cfg)
    if resume:  # the checkpoint must fit the models before the config change is written
        own = tuple(getattr(distiller, "student_prefixes", ("student.",)))
        extra = {k: v for k, v in distiller.state_dict().items() if not k.startswith(own)}
        check_fits(run_dir, distiller.student.state_dict(), extra)
    try:
        with exclusive_lock_main(run_dir):
            check_run_dir(run_dir, resume, overwrite)  # again, now that no one else can write it
            callbacks: list[Callback] = []
            if mode == "distill" and cfg.data.strategy != "original":  # a proxy pool or synthesized images
                assert isinstance(distiller, Distiller)
                train_loader, callbacks = training_data(cfg, data, distiller, run_dir)
            _write_config(cfg, resume, changes)
            summary = fit(
                distiller,
                train_loader,
                val_loader,
                cfg.train_config(),
                run_dir,
                resume=resume,
                overwrite=overwrite,
                callbacks=callbacks,
            )
            summary.update({"name": cfg.name, "mode": mode, "data": data.source})
            if data.test is not None and summary["checkpoints"]:
                summary["test"] = test_checkpoints(distiller, data, cfg)
            if isinstance(distiller, Cohort) and summary["checkpoints"]:
                summary["students"] = export_students(distiller, cfg)
            elif summary["checkpoints"] and PartialState().is_main_process:
                exported = export_model(distiller, data, cfg)
                if exported is not None:
                    summary["export"] = exported
            if is_main_process():
                atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    finally:
        distiller.close()
    return summary


@contextlib.contextmanager
def exclusive_lock_main(run_dir: Path) -> Iterator[None]:
    """The run directory's writer lock, taken by the main process (the others of an ``accelerate
    launch`` job write nothing)."""
    if is_main_process():
        with exclusive_lock(run_dir):
            yield
    else:
        yield


def is_main_process() -> bool:
    """Whether this is the job's main process, known before any process group exists (as
    ``torchrun`` and ``accelerate launch`` set ``RANK``). ``PartialState()`` must not be asked
    before ``fit`` builds the Accelerator: made first, on a CPU it would fix the job as one process."""
    return int(os.environ.get("RANK", "0")) == 0


def check_resume(cfg: RunConfig, override_config: bool) -> list[tuple[str, Any, Any]]:
    """Compare ``cfg`` with the config the run was started with (``config.yaml``, the truth).

    Returns the changes to record (none: resume as is). A change outside
    :data:`~protege.config.RESUME_SAFE_KEYS` is refused with the list of changed keys unless
    ``override_config``: then it takes effect from the resumed epoch on. Writes nothing."""
    stored = cfg.run_dir / "config.yaml"
    if not stored.is_file():
        raise ProtegeError(
            f"cannot resume {cfg.run_dir}: it has checkpoints but no config.yaml; start it again with --overwrite"
        )
    old = load_config(stored)
    unsafe = unsafe_resume_changes(old, cfg)
    if unsafe and not override_config:
        listed = "\n".join(f"  {k}: {_short(a)} -> {_short(b)}" for k, a, b in unsafe)
        raise ProtegeError(
            f"cannot resume {cfg.run_dir}: the config differs from the one the run was started with "
            f"({stored}):\n{listed}\nResume with the run's own config (protege distill {stored} --resume), "
            "or pass --override-config to apply the change from the resumed epoch on (recorded in "
            f"{cfg.run_dir / CHANGES})"
        )
    return config_changes(old, cfg)


CHANGES = "config_changes.jsonl"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_config(cfg: RunConfig, resume: bool, changes: list[tuple[str, Any, Any]]) -> None:
    """``config.yaml`` of a new run; on resume, only when the config changed, with the change and the
    epoch it takes effect from appended to ``config_changes.jsonl``."""
    if not is_main_process() or (resume and not changes):
        return
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        try:  # a multi-stage run may have been stopped in an earlier stage: no checkpoint here yet
            last, _ = intact_checkpoint(run_dir, "last")
            epoch: int | None = json.loads((last / "trainer.json").read_text())["epoch"] + 1
        except ProtegeError:
            epoch = None
        entry = {
            "from_epoch": None if epoch is None else epoch + 1,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changes": [{"key": k, "old": a, "new": b} for k, a, b in changes],
        }
        with (run_dir / CHANGES).open("a") as f:
            f.write(json.dumps(entry) + "\n")
        console.print(
            f"config changed from epoch {'?' if epoch is None else epoch + 1} on: "
            + ", ".join(f"{k} {_short(a, 30)} -> {_short(b, 30)}" for k, a, b in changes)
        )
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))


def dry_step(distiller: Distiller | Cohort, train_loader: Any, cfg: RunConfig) -> None:
    """Run the first training batch through the student(s), the teacher(s) and every term, and
    change nothing: what would fail the first step (mismatched shapes without an adapter, a loss
    parameter out of range, incompatible taps) fails here, before the run directory exists.

    Builds the shape-dependent adapters first (``prepare``, seeded as :func:`fit` would); the
    forward runs without gradients, the distiller's weights and buffers (BatchNorm statistics,
    memory banks) are restored afterwards and the random state is untouched."""
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    batch = send_to_device(next(iter(train_loader)), device)
    distiller.to(device)
    if distiller.needs_prepare:
        set_seed(cfg.seed)
        distiller.prepare(batch, num_samples=len(train_loader.dataset))
    saved = {k: v.detach().clone() for k, v in distiller.state_dict().items()}
    was_training = distiller.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            distiller.train()
            distiller(batch)
    finally:
        distiller.train(was_training)
        distiller.load_state_dict(saved)


def synthesize(cfg: RunConfig, overwrite: bool = False) -> Path:
    """Write the synthetic image set of a ``data.strategy: synthetic`` config without distilling
    (``protege synthesize``); returns its directory. A set already there from the same teacher
    weights and options is kept, one from others is refused unless ``overwrite``. See
    :func:`protege.strategies.synthesis.write_synthetic_set`: a later ``run(cfg)`` reuses the set."""
    from .strategies.synthesis import write_synthetic_set

    data = load_run_data(cfg)
    teachers = build_teachers(cfg, data)  # unfolded: the synthesis reads their BatchNorm statistics
    syn = cfg.data.synthesis
    student = None
    if syn is not None and syn.method == "deepinversion" and syn.competition_weight > 0 and cfg.student:
        set_seed(cfg.seed)  # the student a run starts from (build_distiller seeds it the same way)
        student = build_from(cfg.student, data)
    return write_synthetic_set(cfg, data, list(teachers.values()), student, overwrite)


def _stage_dirs(cfg: RunConfig) -> list[Path]:
    """Where each stage writes: ``runs/<run>/stages/<stage>/``, the last stage the run itself."""
    return [cfg.run_dir / "stages" / st.name for st in cfg.stages[:-1]] + [cfg.run_dir]


def run_stages(
    cfg: RunConfig,
    mode: Mode = "distill",
    resume: bool = False,
    overwrite: bool = False,
    override_config: bool = False,
) -> dict[str, Any]:
    """A multi-stage run: one :func:`fit` per stage on the same student (and teachers).

    Stage ``i`` trains with the run config overridden by the stage's keys. The student's weights
    carry over, and so does the trainable state (adapters, state modules) of every term whose
    ``name`` an earlier stage also had. Earlier stages write to ``runs/<run>/stages/<stage>/``, the
    last to ``runs/<run>/`` itself (so evaluation and reports read it like a one-stage run).
    ``resume`` skips completed stages (restoring their last checkpoint) and resumes the one that
    was interrupted.
    """
    dirs = _stage_dirs(cfg)
    check_writable(cfg.run_dir)
    if mode == "distill" and cfg.cache is not None:
        raise ProtegeError(
            "a teacher-output cache is not supported in a multi-stage run yet: remove 'cache' "
            "(the stages then run the teacher online) or run the stages as separate runs"
        )
    if mode == "distill" and not any(
        get_loss(t.loss).uses_teacher for i in range(len(cfg.stages)) for t in cfg.stage_config(i).terms
    ):
        raise ProtegeError("distill: no stage has a term that reads the teacher; use 'protege train'")
    if mode == "distill" and cfg.task == "vision_language":
        _check_alignment_order(cfg)
    started = [d for d in dirs if read_pointers(d / "checkpoints")]
    if resume and not started:
        raise ProtegeError(
            f"cannot resume: no checkpoint in {cfg.run_dir} or its stages. Start without --resume."
        )
    if not resume and not overwrite and started:
        raise ProtegeError(
            f"{cfg.run_dir} already holds a run. Resume it with --resume, start over with --overwrite, "
            "or choose another name."
        )
    changes = check_resume(cfg, override_config) if resume else []
    data = load_run_data(cfg)
    set_seed(cfg.seed)
    assert cfg.student is not None
    student = build_from(cfg.student, data)
    teachers = build_teachers(cfg, data)
    for i in range(len(cfg.stages)):  # what would fail a stage's first step fails before anything is written
        scfg = cfg.stage_config(i)
        distiller = build_distiller(scfg, data, mode, student=student, teachers=teachers, stage=True)
        try:
            dry_step(distiller, _loaders(scfg, data, distiller)[0], scfg)
        finally:
            distiller.close()
    with exclusive_lock_main(cfg.run_dir):
        _write_config(cfg, resume, changes)
        return _run_stages(cfg, mode, resume, data, student, teachers)


def _check_alignment_order(cfg: RunConfig) -> None:
    """DC-CLIP's order: the stage aligning the student's towers (terms that read no teacher) comes
    after the stage distilling them, unless the student starts from weights that were distilled."""
    reads = [
        any(get_loss(t.loss).uses_teacher for t in cfg.stage_config(i).terms) for i in range(len(cfg.stages))
    ]
    first = reads.index(True)
    assert cfg.student is not None
    if first > 0 and cfg.student.weights is None:
        raise ProtegeError(
            f"stage {cfg.stages[0].name!r} aligns the student's towers, but no stage before it distils them "
            f"(the first that reads the teacher is {cfg.stages[first].name!r}): put the distillation stage "
            "first, or give student.weights (a run whose towers were distilled)"
        )


def _run_stages(
    cfg: RunConfig,
    mode: Mode,
    resume: bool,
    data: DataSplits,
    student: nn.Module,
    teachers: dict[str, nn.Module],
) -> dict[str, Any]:
    dirs = _stage_dirs(cfg)
    carried: dict[str, dict[str, torch.Tensor]] = {}
    stages: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    distiller: Distiller | None = None
    for i, (stage, stage_dir) in enumerate(zip(cfg.stages, dirs)):
        scfg = cfg.stage_config(i)
        distiller = build_distiller(scfg, data, mode, student=student, teachers=teachers, stage=True)
        assert isinstance(distiller, Distiller)
        distiller.freeze_student(stage.freeze_student)
        train_loader, val_loader = _loaders(scfg, data, distiller)
        if distiller.needs_prepare:
            device = next(student.parameters()).device
            distiller.to(device).prepare(
                send_to_device(next(iter(train_loader)), device), num_samples=len(train_loader.dataset)
            )
        _load_carried(distiller, carried, stage.name)
        done = _completed(stage_dir, scfg.epochs) if i < len(dirs) - 1 else None
        if resume and done is not None:
            console.print(f"stage {stage.name!r}: completed earlier, restoring its last checkpoint")
            state = load_checkpoint(checkpoint_dir(stage_dir, "last"))
            student.load_state_dict(state["student"])
            if state["extra"]:
                distiller.load_state_dict(state["extra"], strict=False)
            stage_summary = done
        else:
            console.print(f"[bold]stage {i + 1}/{len(cfg.stages)}: {stage.name}")
            again = resume and bool(read_pointers(stage_dir / "checkpoints"))
            stage_summary = fit(
                distiller,
                train_loader,
                val_loader,
                scfg.train_config(),
                stage_dir,
                resume=again,
                overwrite=True,
            )
        stages.append({"name": stage.name, "dir": str(stage_dir), **stage_summary})
        carried = {t.name: t.state_dict() for t in distiller.terms}
        distiller.freeze_student(False)
        if i < len(dirs) - 1:
            distiller.close()
        summary = stage_summary
        if not str(stage_summary.get("status", "")).startswith("completed"):
            console.print(f"[red]stage {stage.name!r} did not complete; later stages not run")
            break
    assert distiller is not None
    summary = dict(summary)
    summary.update({"name": cfg.name, "mode": mode, "data": data.source})
    summary["stages"] = [
        {k: st.get(k) for k in ("name", "dir", "status", "epochs_completed", "final", "best", "wall_time_s")}
        for st in stages
    ]
    if len(stages) == len(cfg.stages) and data.test is not None and summary.get("checkpoints"):
        for entry, st in zip(summary["stages"][:-1], stages[:-1]):  # what each earlier stage left
            entry["test"] = test_checkpoints(distiller, data, cfg, Path(st["dir"]), ("last",))
        summary["test"] = test_checkpoints(distiller, data, cfg)
    atomic_write_text(cfg.run_dir / "summary.json", json.dumps(summary, indent=2))
    distiller.close()
    return summary


def _completed(stage_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The summary of a stage that finished all its epochs, else ``None``."""
    path = stage_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("status") == "completed" and summary.get("epochs_completed") == epochs:
        return summary
    return None


def _load_carried(distiller: Distiller, carried: dict[str, dict[str, torch.Tensor]], stage: str) -> None:
    """Give each term the trained state of the earlier stage's term of the same name."""
    for term in distiller.terms:
        state = carried.get(term.name)
        if not state:
            continue
        try:
            term.load_state_dict(state)
        except RuntimeError as e:
            raise ProtegeError(
                f"stage {stage!r}: term {term.name!r} has the name of an earlier stage's term but "
                f"different modules, so its state cannot carry over ({str(e).splitlines()[0]}); "
                "give it another name to start it fresh"
            ) from None


def export_model(distiller: Distiller, data: DataSplits, cfg: RunConfig) -> str | None:
    """Write the best checkpoint's student to ``runs/<run>/model/`` in its own library's format
    when the task has one (an LM: ``save_pretrained`` + tokenizer, which
    ``AutoModelForCausalLM.from_pretrained`` loads); ``None`` when it has not. The directory
    appears complete or not at all (written beside it, then renamed)."""
    if not distiller.task.export_after_run:
        return None
    device = next(distiller.student.parameters()).device
    best = checkpoint_dir(cfg.run_dir, "best") / "model.safetensors"
    distiller.student.load_state_dict(load_file(best, device=str(device)))
    out = cfg.run_dir / "model"
    tmp = Path(tempfile.mkdtemp(dir=cfg.run_dir, prefix=".model."))
    try:
        if not distiller.task.export(distiller.export(), data, tmp):
            shutil.rmtree(tmp)
            return None
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def export_students(cohort: Cohort, cfg: RunConfig) -> dict[str, str]:
    """Write each student of a cohort's best checkpoint as its own ``model.safetensors``.

    ``runs/<run>/students/<name>/model.safetensors`` loads with ``build_model(..., weights=dir)``.
    """
    best = load_file(checkpoint_dir(cfg.run_dir, "best") / "model.safetensors")
    paths = {}
    for name in cohort.members:
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in best.items() if k.startswith(prefix)}
        out = cfg.run_dir / "students" / name
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(state, out / "model.safetensors")
        paths[name] = str(out)
    return paths


def test_checkpoints(
    distiller: Distiller | Cohort,
    data: DataSplits,
    cfg: RunConfig,
    run_dir: Path | None = None,
    which_ones: tuple[str, ...] = ("last", "best"),
) -> dict[str, dict[str, Any]]:
    """Test-split metrics of the run's ``last`` and ``best`` checkpoints (per student for a cohort:
    ``{"best": {name: metrics}}``); ``run_dir``: another directory's (an earlier stage's)."""
    assert data.test is not None
    loader = make_loader(data.test, cfg.data.eval_batch_size, shuffle=False)
    teachers = list(distiller.teachers.values())
    device = next(distiller.student.parameters()).device
    results: dict[str, dict[str, Any]] = {}
    cache: list[torch.Tensor] = []
    for which in which_ones:
        where = checkpoint_dir(run_dir or cfg.run_dir, which)
        distiller.student.load_state_dict(load_file(where / "model.safetensors", device=str(device)))
        if (where / "distiller.safetensors").is_file():  # trained extras (e.g. SimKD's projector)
            extra = load_file(where / "distiller.safetensors", device=str(device))
            distiller.load_state_dict(extra, strict=False)
        predictors = (
            distiller.inference_models()
            if isinstance(distiller, Cohort)
            else {"": distiller.inference_model()}
        )
        metrics = {
            name: evaluate(
                model, loader, distiller.task, teachers, distiller.teacher_weights, teacher_cache=cache
            )
            for name, model in predictors.items()
        }
        results[which] = metrics[""] if "" in metrics else metrics
    return results


@dataclass
class LoadedRun:
    """A finished run's config, data, trained student (ready to predict) and teachers.

    ``quant``: for a quantization-aware run (``quantize:``), the fake quantization the student
    carries, with the input ranges the run observed (``quant.remove()`` leaves the plain fp32 model);
    ``where``: the checkpoint directory read."""

    cfg: RunConfig
    data: DataSplits
    student: nn.Module
    teachers: list[nn.Module]
    task: Task
    quant: FakeQuant | None = None
    where: Path | None = None


def load_run(
    run_dir: str | Path, which: Literal["last", "best"] = "best", data: DataSplits | None = None
) -> LoadedRun:
    """Rebuild a finished one-student run from its directory: its ``which`` checkpoint's student
    (through the method's own trained modules where it predicts with them, e.g. SimKD), its
    teachers with their configured weights, its data (``data``: already loaded) and task."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ProtegeError(f"{run_dir} is not a protege run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    routes = cfg.student is None and build_task(cfg.task).partition_students
    if cfg.student is None and not routes:
        raise ProtegeError(
            f"{run_dir} trained several students: their test metrics are in its summary.json, and "
            f"each student's weights in {run_dir / 'students'}/<name>/ (use them as a run's 'weights')"
        )
    if not read_pointers(run_dir / "checkpoints"):
        raise ProtegeError(f"{run_dir} has no checkpoint yet: train it first (or resume it)")
    data = load_run_data(cfg) if data is None else data
    where = checkpoint_dir(run_dir, which)
    task = build_task(cfg.task, data)
    if cfg.student is not None:
        student = build_from(cfg.student.model_copy(update={"weights": str(where)}), data)
    else:  # students sharing the conditions (Multi-Student Distillation): one routed model
        student = _routed_students(cfg, data, where, task)
    teachers = [build_from(s, data) for s in cfg.all_teachers()]
    quant = None
    if cfg.quantize is not None:  # the student as it trained and was tested: fake-quantized
        quant = FakeQuant(student, **cfg.quantize.fake_quant_kwargs())
        extra = _read_extra(where)
        ranges = {k.removeprefix("quant."): v for k, v in extra.items() if k.startswith("quant.")}
        try:
            quant.load_state_dict(ranges)
        except RuntimeError as e:
            raise ProtegeError(
                f"{where} holds no complete quantization ranges for this quantize: config "
                f"({str(e).splitlines()[0]}); train the run again"
            ) from None
        quant.eval()
    final_cfg = cfg.stage_config(len(cfg.stages) - 1) if cfg.stages else cfg
    terms = [Term(**t.term_kwargs()) for t in final_cfg.terms]
    if (where / "distiller.safetensors").is_file() and any(hasattr(t.state, "inference") for t in terms):
        # the method predicts through trained modules of its own (SimKD: projector + teacher head)
        n_teachers = max(len(cfg.all_teachers()), 1)  # the same terms, so state keys line up
        holder = Distiller(student, None, terms, task=task, cached_teachers=n_teachers)
        holder.load_state_dict(load_file(where / "distiller.safetensors"), strict=False)
        student = holder.inference_model()
    return LoadedRun(cfg, data, student, teachers, task, quant, where)


def _routed_students(cfg: RunConfig, data: DataSplits, where: Path, task: Task) -> nn.Module:
    """The students of a run whose task partitions the conditions among them, from the checkpoint
    ``where`` (the cohort's state: ``<name>.<parameter>``), behind the task's router."""
    state = load_file(where / "model.safetensors")
    students = {}
    for name, spec in cfg.all_students().items():
        net = build_from(spec.model_copy(update={"weights": None}), data)
        prefix = f"{name}."
        net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        students[name] = net
    parts = task.partition(list(students))
    if parts is None:  # the task's partition_students promised one
        raise ProtegeError(f"task {task.name!r} gave no partition of its conditions among the students")
    return task.routed(students, parts)


def _read_extra(where: Path) -> dict[str, torch.Tensor]:
    path = where / "distiller.safetensors"
    if not path.is_file():
        return {}
    return load_file(path)


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
    loaded = load_run(run_dir, which)
    cfg, data, student, teachers, task = loaded.cfg, loaded.data, loaded.student, loaded.teachers, loaded.task
    dataset = data.test if split == "test" else data.val
    if dataset is None:
        raise ProtegeError(f"the data source {data.source!r} has no {split} split")
    loader = make_loader(dataset, cfg.data.eval_batch_size, shuffle=False)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "split": split,
        "checkpoint": which,
        "metrics": evaluate(student, loader, task, teachers, [s.weight for s in cfg.all_teachers()]),
    }
    models = {"student": student, **({"teacher": teachers[0]} if teachers else {})}
    # what model(...) itself takes: a vision-language model's images, not the whole batch dict
    example = task.model_input(task.split(next(iter(loader)))[0])
    result.update(model_costs(models, example, latency=latency))
    if "speedup" in result["student"]:
        result["speedup"] = result["student"]["speedup"]
    return result
