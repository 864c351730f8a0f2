"""From a :class:`RunConfig` to objects: its data, its models (teachers, students) and its Distiller.

Everything above the config layer that needs a run's parts builds them here: the pipeline
(:mod:`protege.pipeline`), cache building (:mod:`protege.caching`), the data strategies, the
report and the applications. Nothing here trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from accelerate.utils import set_seed
from torch import nn

from .config import ModelConfig, MutualConfig, RunConfig
from .core.cohort import Cohort
from .core.distiller import Distiller, Term
from .core.on_policy import OnPolicy
from .data import DataSplits, load_data
from .engine import checkpoint_dir
from .engine.checkpoint import read_pointers
from .engine.loop import console
from .errors import ProtegeError
from .models import build_model
from .tasks import Task, build_task

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
    own = build_task(cfg.task).load_data(  # e.g. text read through the models' tokenizer
        d.model_dump(),
        [t.model_dump() for t in cfg.all_teachers()],
        [s.model_dump() for s in cfg.all_students().values()],
    )
    if own is not None:
        return own
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
    """The model ``spec`` names, built by the task that read ``data`` when it builds its own (LMs)."""
    weights = resolve_weights(spec.weights)
    task = build_task(getattr(data, "task", "classification"), data)
    own = task.build_model(spec.model, weights, spec.kwargs, data)
    if own is not None:
        return own
    kwargs = dict(spec.kwargs)
    for key, value in (("num_classes", data.num_classes), ("in_chans", data.in_chans)):
        if key in kwargs:  # the data decides; the same value said twice is fine
            if kwargs[key] != value:
                raise ProtegeError(
                    f"model {spec.model!r}: kwargs.{key} is {kwargs[key]!r}, but the data "
                    f"({data.source}) has {value}; remove kwargs.{key} (it is taken from the data)"
                )
            del kwargs[key]
    return build_model(
        spec.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=weights, **kwargs
    )


def build_teachers(cfg: RunConfig, data: DataSplits) -> dict[str, nn.Module]:
    """The configured teachers, by name (``teacher``, or ``teacher0``, ``teacher1``, …)."""
    specs = cfg.all_teachers()
    for spec in specs:
        if spec.weights is None and not hasattr(data, "task"):  # a task's own models load pretrained
            console.print(
                f"[yellow]warning: teacher {spec.model!r} has no weights: it is randomly initialised"
            )
    return {f"teacher{i}" if len(specs) > 1 else "teacher": build_from(s, data) for i, s in enumerate(specs)}


def build_terms(cfg: RunConfig, mode: Mode = "distill", stage: bool = False) -> list[Term]:
    """The config's loss terms; in ``train`` mode only those that read no teacher (default CE).

    ``stage``: the terms of one stage of a multi-stage run, which may train on labels only (the
    run checks that some stage reads the teacher).
    """
    terms = [Term(**t.term_kwargs()) for t in cfg.terms]  # extra keys are the loss's params
    if mode == "train":
        return [t for t in terms if not t.uses_teacher] or [Term("ce")]
    if stage:
        return terms
    if not any(t.uses_teacher for t in terms) and not (cfg.students and cfg.mutual):
        raise ProtegeError(
            "distill: no term reads the teacher; add e.g. {loss: kd, weight: 0.9} to terms, or use 'protege train'"
        )
    return terms


def _check_refinement(
    task: Task, cfg: RunConfig, mode: Mode, teachers: dict[str, nn.Module], terms: list[Term]
) -> None:
    """A task that rewrites training batches from the live student and teachers (``refine_batch``)
    can only do so in a one-student run whose teachers run live: refuse the others, naming why."""
    what = task.refines_batches()
    if what is None:
        return
    why = None
    if cfg.students:
        why = "this run trains several students (a cohort)"
    elif mode != "distill":
        why = f"this run is in {mode!r} mode, where no teacher runs"
    elif not teachers:
        why = "its teachers do not run live (none configured, or a teacher-output cache)"
    elif not any(t.reads_teacher_outputs for t in terms):
        why = "no term reads the teacher, so the teacher does not run during training"
    if why is not None:
        raise ProtegeError(
            f"{what} rewrites each training batch from the student's and the teacher's live predictions, "
            f"but {why}. Use one 'student', a live 'teacher' and a distillation term, or drop that option"
        )


def build_distiller(
    cfg: RunConfig,
    data: DataSplits,
    mode: Mode = "distill",
    student: nn.Module | None = None,
    teachers: dict[str, nn.Module] | None = None,
    stage: bool = False,
) -> Distiller | Cohort:
    """Student(s), teachers (frozen) and terms as the config says: a :class:`Distiller`, or a
    :class:`Cohort` when the config lists several ``students``.

    In ``train`` mode only the label terms are kept (plain training, default CE); a configured
    teacher is still loaded, but only as the reference for fidelity metrics. ``student`` and
    ``teachers`` reuse models already built (the stages of a multi-stage run share them).
    """
    set_seed(cfg.seed)  # the students' initialization depends only on the seed
    if cfg.students:
        models = {name: build_from(spec, data) for name, spec in cfg.all_students().items()}
    else:
        assert cfg.student is not None
        student = student if student is not None else build_from(cfg.student, data)
    # With a teacher-output cache (protege cache), the batches carry the teachers' outputs.
    cached = mode == "distill" and cfg.cache is not None
    if cached and cfg.students:
        raise ProtegeError("a teacher-output cache trains one student: use 'student', or remove 'cache'")
    if cfg.on_policy is not None and (cfg.students or stage):
        raise ProtegeError("on_policy trains one student in one stage: use 'student' without 'stages'")
    if teachers is None:
        teachers = {} if cached else build_teachers(cfg, data)
    weights = [s.weight for s in cfg.all_teachers()] or None
    terms = build_terms(cfg, mode, stage)
    task = build_task(cfg.task, data)
    _check_refinement(task, cfg, mode, teachers, terms)
    if cfg.students:
        mutual = cfg.mutual or MutualConfig(weight=0.0)
        return Cohort(
            models,
            teachers or None,
            terms,
            weights,
            mutual.weight,
            mutual.T,
            task,
            fold_teacher_bn=not stage,
            teacher_precision=cfg.teacher_precision,
        )
    n_cached = len(cfg.all_teachers()) if cached and not teachers else 0
    on_policy = cfg.on_policy if mode == "distill" else None
    return Distiller(
        student,
        teachers or None,
        terms,
        teacher_weights=weights,
        task=task,
        cached_teachers=n_cached,
        # the teachers are ours (built here): fold their BatchNorms for a cheaper forward; not in
        # multi-stage runs, whose stages share the teachers but may tap different layers, nor in
        # data-free runs, whose synthesis reads the BatchNorms' running statistics
        fold_teacher_bn=not stage and bool(teachers) and cfg.data.strategy != "synthetic",
        teacher_precision=cfg.teacher_precision,
        quantize=None if cfg.quantize is None else cfg.quantize.fake_quant_kwargs(),
        on_policy=None
        if on_policy is None
        else OnPolicy(
            lam=on_policy.lam,
            max_new_tokens=on_policy.max_new_tokens,
            temperature=on_policy.temperature,
            prompt_length=on_policy.prompt_length,
            seed=cfg.seed,
            eos_token_ids=_eos_ids(data),
        ),
    )


def _eos_ids(data: DataSplits) -> tuple[int, ...]:
    """The EOS token of the data's tokenizer (what ends a generated completion), if it has one."""
    eos = getattr(getattr(data, "tokenizer", None), "eos_token_id", None)
    return () if eos is None else (int(eos),)
