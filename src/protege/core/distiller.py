"""The Distiller: student(s), frozen teacher(s) and a list of loss terms, as one ``nn.Module``.

``distiller(batch)`` runs the task's forward on the student (with grad) and on every teacher
(``eval()``, ``no_grad``), reads the tensors each term names — ``"logits"`` or a tap path such as
``"layer3"`` — and returns ``(student_outputs, {term_name: weighted_loss})``. The caller sums the
dict; nothing else is hidden. It works inside a user's own loop and inside :func:`protege.fit`.

Teachers are deliberately *not* registered as submodules: their parameters are not returned by
``parameters()`` (so no optimizer can touch them), they are absent from ``state_dict()`` and
checkpoints, and DDP does not try to synchronise them. ``.to()``/``.cuda()``/``.half()`` still
move them, and ``.train()`` leaves them in ``eval()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from ..errors import ProtegeError, closest
from ..losses import BoundReduction, BuildContext, LossInfo, get_loss
from ..losses.registry import autocast_disabled
from ..tasks import ClassificationTask, Outputs, Task
from .adapters import KINDS as ADAPTER_KINDS
from .adapters import build_adapter
from .fake_quant import FakeQuant
from .fold import fold_batchnorm
from .on_policy import OnPolicy
from .taps import Taps

LOGIT_KEYS = frozenset({"logits"})

#: the precision a frozen teacher's forward runs in (``teacher_precision``)
TeacherPrecision = Literal["fp32", "bf16"]
TEACHER_PRECISIONS: tuple[str, ...] = get_args(TeacherPrecision)


def _param_problem(value: Any, default: Any) -> str | None:
    """What a loss parameter must be, judged by its default's type, when ``value`` is not that; a
    parameter whose default is ``None`` takes anything its loss accepts."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    # torch takes a Python int as a 64-bit scalar: a larger one overflows inside the loss
    fits = not isinstance(value, numbers.Integral) or -(2**63) <= value < 2**63
    if isinstance(default, numbers.Integral):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and fits
        return None if ok else "a whole number (of at most 19 digits)"
    if isinstance(default, numbers.Real):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and fits and math.isfinite(value)
        return None if ok else "a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (tuple, list)):
        return None if isinstance(value, (tuple, list)) else "a list"
    return None


class Term(nn.Module):
    """One named, weighted loss term: ``weight · loss(student[student_key], teacher[teacher_key])``.

    Args:
        loss: registry name of the loss (see ``protege methods``).
        weight: multiplier of the loss in the total.
        student: which student output the loss reads: ``"logits"`` or a tap path; a list of
            them hands the loss a list of tensors (multi-layer losses: ReviewKD, FSP). Default:
            the loss's default keys (``"logits"`` unless its registration names others, as the
            vision-language losses do; see :mod:`protege.losses.registry`).
        teacher: which teacher output it reads (ignored by losses that use no teacher); a list
            like ``student``; default: the loss's default keys, as ``student``.
        name: key of the term in the losses dict; default ``loss`` or ``loss:student_key``.
        warmup: epochs over which the weight ramps linearly from 0 to ``weight``
            (DKD's warm-up, usable by any term).
        teacher_index: read only this teacher; a list: these teachers in this order (a two-teacher
            loss such as ``kd_loss`` reads ``[tough, tolerant]``); default: every teacher, combined by
            the teacher weights (a weighted sum of per-teacher losses, or the loss's own
            multi-teacher form when it has one).
        adapter: trainable module applied to the student tensor first (a projector when shapes
            differ), or the name of one to build from the two tensors' shapes (``"auto"``,
            ``"linear"``, ``"conv1x1"``, ``"conv_bn"``, ``"conv_bn_relu"``; see
            :mod:`protege.core.adapters`) when :meth:`Distiller.prepare` sees a first batch. It
            trains with the student and is dropped at export. It runs at the training's precision
            (bf16 under autocast), like the student layers it extends; the loss then computes in
            float32 from its output (see :mod:`protege.losses.registry`, "Precision").
        **params: the loss's hyper-parameters (and those of its state module, if any).
    """

    def __init__(
        self,
        loss: str,
        weight: float = 1.0,
        student: str | Sequence[str] | None = None,
        teacher: str | Sequence[str] | None = None,
        name: str | None = None,
        warmup: float = 0.0,
        teacher_index: int | Sequence[int] | None = None,
        adapter: nn.Module | str | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self.info = get_loss(loss)
        self.loss = loss
        self.weight = float(weight)
        student = self.info.default_keys[0] if student is None else student
        teacher = self.info.default_keys[1] if teacher is None else teacher
        self.student_key = student if isinstance(student, str) else list(student)
        self.teacher_key = teacher if isinstance(teacher, str) else list(teacher)
        self.name = term_name(loss, student, name)
        if warmup < 0:
            raise ProtegeError(f"term {self.name!r}: warmup must be ≥ 0 epochs, got {warmup}")
        self.warmup = float(warmup)
        self.teacher_index: int | list[int] | None = (
            teacher_index if teacher_index is None or isinstance(teacher_index, int) else list(teacher_index)
        )
        if isinstance(self.teacher_index, list) and not self.teacher_index:
            raise ProtegeError(f"term {self.name!r}: teacher_index is an empty list; remove it to read every teacher")
        self.adapter_kind = adapter if isinstance(adapter, str) else None
        self.adapter = adapter if isinstance(adapter, nn.Module) else None
        if (self.adapter_kind or self.adapter is not None) and not isinstance(self.student_key, str):
            raise ProtegeError(
                f"term {self.name!r} reads several taps: adapters apply to one tensor; the loss "
                "builds its own per-layer modules where its paper has them"
            )
        if self.adapter_kind is not None and self.adapter_kind not in ADAPTER_KINDS:
            raise ProtegeError(
                f"term {self.name!r}: unknown adapter {adapter!r}; choose one of: {', '.join(ADAPTER_KINDS)}"
            )
        state_params = self.info.state_params
        unknown_keys = set(params) - set(self.info.params) - set(state_params)
        if unknown_keys:
            valid = sorted(set(self.info.params) | set(state_params))
            bad = sorted(unknown_keys)[0]
            near = closest(bad, valid)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ProtegeError(
                f"loss {loss!r} has no parameter {bad!r}; {hint}its parameters are: {', '.join(valid) or 'none'}"
            )
        defaults = {**self.info.params, **state_params}
        for key, value in params.items():
            expected = _param_problem(value, defaults[key])
            if expected:
                raise ProtegeError(
                    f"term {self.name!r}: {key} must be {expected} (default {defaults[key]!r}), got {value!r}"
                )
        self.params = {k: v for k, v in params.items() if k in self.info.params}
        self.state = (
            self.info.state(**{k: v for k, v in params.items() if k in state_params})
            if self.info.state
            else None
        )
        self.reduction = self._teacher_reduction()
        bind = getattr(self.state, "bind_term", None)
        if bind is not None:  # let the state know what its term reads (SimKD predicts through it)
            bind(student_key=self.student_key, teacher_key=self.teacher_key)
        if self.adapter_kind or self.adapter is not None:
            if self.info.state is not None and hasattr(self.info.state, "inference"):
                raise ProtegeError(
                    f"term {self.name!r}: {loss} builds its own projector and predicts through it; "
                    "an adapter would be used in training but not at inference, so remove 'adapter'"
                )

    def _teacher_reduction(self) -> BoundReduction | None:
        return teacher_reduction(
            self.info,
            self.teacher_key,
            self.params,
            self.adapter_kind is not None or self.adapter is not None,
        )

    def read_teacher(self, outputs: Outputs, who: str, student: Any) -> Any:
        """The teacher value this term hands its loss: the tap's reduced tensor when the outputs carry
        it (a cache stored it), else the raw tensor, reduced here where the reduction is exact for
        these shapes (so online and cached runs compute the same loss)."""
        if self.reduction is None:
            return _read(outputs, self.teacher_key, who, self.name)
        tap = str(self.teacher_key)
        reduced_key = self.reduction.tap_key(tap)
        if reduced_key in outputs:
            reduced = outputs[reduced_key]
            if not self.reduction.exact(student.shape, reduced.shape):
                raise ProtegeError(
                    f"term {self.name!r}: the teacher-output cache holds tap {tap!r} reduced to "
                    f"{self.reduction.key} {tuple(reduced.shape[1:])}, from which {self.loss} cannot compute "
                    f"its value for the student's {tuple(student.shape[1:])}; rebuild the cache with the raw "
                    "map (`cache: {reduce: false}`, then `protege cache <config> --overwrite`)"
                )
            return reduced
        raw = _read(outputs, tap, who, self.name)
        return self.reduction(raw) if self.reduction.exact(student.shape, raw.shape) else raw

    @property
    def uses_teacher(self) -> bool:
        return self.info.uses_teacher

    @property
    def picked(self) -> list[int]:
        """The teachers ``teacher_index`` names, in order (empty when it names none: all of them)."""
        index = self.teacher_index
        return [] if index is None else [index] if isinstance(index, int) else list(index)

    @property
    def taps(self) -> tuple[list[str], list[str]]:
        """The student and teacher tap paths this term reads (logits excluded)."""
        s = [self.student_key] if isinstance(self.student_key, str) else self.student_key
        t = [self.teacher_key] if isinstance(self.teacher_key, str) else self.teacher_key
        return [k for k in s if k not in LOGIT_KEYS], (
            [k for k in t if k not in LOGIT_KEYS] if self.reads_teacher_outputs else []
        )

    @property
    def reads_teacher_outputs(self) -> bool:
        """Whether the term reads the teachers' outputs on the batch (a term whose state queries the
        teacher model itself, DMD, reads none: see :mod:`protege.losses.registry`)."""
        return self.info.uses_teacher and not self.info.queries_teacher

    @property
    def pending_adapter(self) -> bool:
        """True until an adapter named by kind has been built from real tensor shapes."""
        return self.adapter_kind is not None and self.adapter is None

    @property
    def pending_state(self) -> bool:
        """True until a state module sized by the tensors (see the registry) has been built."""
        return bool(getattr(self.state, "pending", False))

    @property
    def pending(self) -> bool:
        return self.pending_adapter or self.pending_state

    def build_state(self, student: Any, teacher: Any, context: BuildContext) -> None:
        """Let the state module size itself from one batch's tensors (see the registry)."""
        assert self.state is not None
        try:
            self.state.build(student, teacher, context)
        except ValueError as e:
            raise ProtegeError(
                f"term {self.name!r} (student {self.student_key!r}, teacher {self.teacher_key!r}): {e}"
            ) from e
        if student is not None:  # else a state built from the context alone: on its teacher's device
            self.state.to((student[0] if isinstance(student, list) else student).device)

    def build_adapter(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Build the named adapter for these student/teacher tensors, on the student's device."""
        where = f" (term {self.name!r}: student {self.student_key!r}, teacher {self.teacher_key!r})"
        adapter = build_adapter(student.shape, teacher.shape, self.adapter_kind or "auto", where)
        self.adapter = adapter.to(device=student.device, dtype=student.dtype)

    def factor(self, progress: float) -> float:
        """The weight at ``progress`` epochs, including the warm-up ramp."""
        if self.warmup > 0:
            return self.weight * min(progress / self.warmup, 1.0)
        return self.weight

    def forward(
        self,
        student: Outputs,
        teachers: Sequence[Outputs],
        target: torch.Tensor | None,
        teacher_weights: Sequence[float],
        progress: float = 0.0,
        meta: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        try:
            s = _read(student, self.student_key, "student", self.name)
            if self.pending:
                raise ProtegeError(
                    f"term {self.name!r} builds its {'adapter' if self.pending_adapter else 'state'} "
                    "from the tensor shapes: call distiller.prepare(example_batch) before creating the "
                    "optimizer (protege.fit does this)"
                )
            if self.adapter is not None:
                s = self.adapter(s)
            observe = getattr(self.state, "observe", None)
            if observe is not None and self.training:  # a state trained on the student's outputs (DMD)
                observe(student, target)
            kwargs = dict(self.params)
            if self.state is not None:  # in float32, like the loss (its parameters are float32)
                with autocast_disabled(s):
                    kwargs.update(self.state(progress))
            if self.info.uses_target:
                if target is None:
                    raise ProtegeError(f"term {self.name!r} needs labels, but the batch carries none")
                kwargs["target"] = target
            if self.info.uses_index:
                index = (meta or {}).get("index")
                if index is None:
                    raise ProtegeError(
                        f"term {self.name!r} keeps per-sample memory and needs each sample's dataset "
                        "index: wrap the training set in protege.data.WithIndex (protege.run does this)"
                    )
                kwargs["index"] = index
            if not self.reads_teacher_outputs:
                return self.factor(progress) * self.info.fn(s, **kwargs)
            if not teachers:
                raise ProtegeError(f"term {self.name!r} reads a teacher, but the distiller has none")
            picked = range(len(teachers)) if self.teacher_index is None else self.picked
            ts = [self.read_teacher(teachers[i], f"teacher {i}", s) for i in picked]
            ws = [teacher_weights[i] for i in picked]
            total = sum(ws)
            ws = [w / total for w in ws]
            if self.info.multi_teacher:
                value = self.info.fn(s, ts, weights=ws, **kwargs)
            elif len(ts) == 1:
                value = self.info.fn(s, ts[0], **kwargs)
            else:
                value = sum(w * self.info.fn(s, t, **kwargs) for w, t in zip(ws, ts))
            return self.factor(progress) * value
        except ValueError as e:  # losses validate shapes; a mismatch is a configuration mistake
            raise ProtegeError(
                f"term {self.name!r} (student {self.student_key!r}, teacher {self.teacher_key!r}): {e}"
            ) from e

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name!r}, weight={self.weight}" + (f", {params}" if params else "")


def term_name(loss: str, student: str | Sequence[str], name: str | None = None) -> str:
    """A term's key in the losses dict: ``name``, or ``loss`` / ``loss:student_key``."""
    shown = student if isinstance(student, str) else ",".join(student)
    return name or (loss if shown in LOGIT_KEYS else f"{loss}:{shown}")


def teacher_reduction(
    info: LossInfo, teacher: str | Sequence[str], params: Mapping[str, Any], adapter: bool = False
) -> BoundReduction | None:
    """The loss's teacher-side reduction bound to a term's ``params``, where the term uses it: the
    term reads one teacher tap, has no adapter (built from the raw teacher's shape) and the loss no
    state module (built from it too); else ``None``."""
    reduction = info.teacher_reduction
    if (
        reduction is None
        or not info.uses_teacher
        or info.queries_teacher
        or not isinstance(teacher, str)
        or teacher in LOGIT_KEYS
        or adapter
        or info.state is not None
    ):
        return None
    return reduction.bind({**info.params, **{k: v for k, v in params.items() if k in info.params}})


def check_teacher_precision(precision: str) -> TeacherPrecision:
    """``precision`` when it is one of :data:`TEACHER_PRECISIONS`; else an error saying what to use."""
    if precision not in TEACHER_PRECISIONS:
        raise ProtegeError(
            f"teacher_precision must be 'fp32' or 'bf16', got {precision!r}: 'bf16' runs the frozen "
            "teachers under bfloat16 autocast (faster; outputs within bf16 rounding), 'fp32' as they are"
        )
    return precision  # type: ignore[return-value]


def teacher_autocast(teacher: nn.Module, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context a frozen teacher's forward runs in: ``torch.autocast`` to bfloat16 on the
    teacher's device for ``"bf16"``; nothing for ``"fp32"`` (the teacher then runs at the
    surrounding precision: fp32, or the training's autocast dtype under mixed precision)."""
    if check_teacher_precision(precision) == "fp32":
        return contextlib.nullcontext()
    tensor = next(itertools.chain(teacher.parameters(), teacher.buffers()), None)
    device = tensor.device.type if tensor is not None else "cpu"
    if not torch.amp.is_autocast_available(device):
        raise ProtegeError(f"teacher_precision 'bf16' needs autocast, which {device!r} lacks; use 'fp32'")
    return torch.autocast(device, dtype=torch.bfloat16)


def _as_float32(value: Any) -> Any:
    """``value`` with every half-precision tensor in it (nested in dicts, lists, tuples) cast to fp32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(v) for v in value)
    return value


def run_teachers(
    task: Task,
    teachers: Sequence[nn.Module],
    taps: Sequence[Taps],
    inputs: Any,
    precision: str = "fp32",
) -> list[Outputs]:
    """Each frozen teacher's outputs on ``inputs`` (no grad), with the taps its hooks recorded.

    ``precision="bf16"`` runs each forward under bfloat16 autocast (:func:`teacher_autocast`) and
    hands the losses float32 tensors (the bf16 values, cast back), so the losses' arithmetic
    stays fp32.
    """
    outs = []
    with torch.no_grad():
        for teacher, teacher_taps in zip(teachers, taps):
            with teacher_autocast(teacher, precision):
                out = task.forward(teacher, inputs)
            out.update(teacher_taps.pop())
            outs.append(_as_float32(out) if precision == "bf16" else out)
    return outs


def _read(outputs: Outputs, key: str | list[str], who: str, term: str) -> Any:
    if not isinstance(key, str):
        return [_read(outputs, k, who, term) for k in key]
    try:
        return outputs[key]
    except KeyError:
        raise ProtegeError(
            f"term {term!r} reads {key!r} from the {who}, which produced only: {', '.join(outputs)}"
        ) from None


TeacherSpec = nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module] | None


class Distiller(nn.Module):
    """Student + frozen teachers + loss terms. ``forward(batch) -> (student_outputs, losses)``.

    Args:
        student: the trainable model.
        teacher: one model, a list of models, a ``{name: model}`` mapping, or ``None``
            (plain training of the student with label losses only).
        terms: the loss terms; default ``[ce()]``.
        teacher_weights: one non-negative weight per teacher (default: equal).
        task: how batches are read and models run (default: classification).
        example: a batch to build shape-dependent adapters from right away (see :meth:`prepare`).
        cached_teachers: with no teacher models, the number of teachers whose outputs every
            training batch carries (``meta["teacher_outputs"]``, read from a teacher-output cache
            by :class:`protege.engine.cache.CachedTeacherDataset`); the teachers are never loaded.
        fold_teacher_bn: fold each teacher's BatchNorms into the preceding convolutions, in
            place (same function, a cheaper forward; see :mod:`protege.core.fold`). It changes
            the teacher modules you pass, so it is off by default; ``protege.run`` turns it on
            for the teachers it builds.
        teacher_precision: ``"fp32"`` (default) runs the teachers as they are; ``"bf16"`` runs
            their forward under bfloat16 autocast on their device (CPU or CUDA) and hands the
            losses float32 tensors. Only the frozen teachers change: the student trains at the
            training's precision. On the project's CPU box a bf16 teacher forward took ~40% less
            time, with logits within bf16 rounding and the same top-1 (BENCHMARKS.md).
        on_policy: GKD's on-policy batches (:mod:`protege.core.on_policy`): in training, with
            probability ``on_policy.lam`` a batch's completions are the student's own samples
            (:meth:`Task.rollout <protege.tasks.base.Task.rollout>`), scored by the teachers; the
            terms that read no teacher are skipped on those batches.
        quantize: quantization-aware distillation: the keyword arguments of
            :class:`~protege.core.fake_quant.FakeQuant` (``{}`` for its defaults). The student's
            Conv/Linear weights and inputs are then fake-quantized to int8 in every forward (module
            paths and state-dict keys unchanged); the observers' ranges are this module's state
            (``distiller.quant``), saved and restored with the checkpoints. ``None``: float training.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: TeacherSpec = None,
        terms: Sequence[Term] | None = None,
        teacher_weights: Sequence[float] | None = None,
        task: Task | None = None,
        example: Any = None,
        cached_teachers: int = 0,
        fold_teacher_bn: bool = False,
        teacher_precision: TeacherPrecision = "fp32",
        on_policy: OnPolicy | None = None,
        quantize: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.teacher_precision = check_teacher_precision(teacher_precision)
        if on_policy is not None and cached_teachers:
            raise ProtegeError(
                "on_policy needs a live teacher to score the student's generations; a teacher-output cache "
                "only holds its outputs on the training data: remove 'cache' or 'on_policy'"
            )
        self.on_policy = on_policy
        self._coin = on_policy.coin() if on_policy is not None else None
        self.student = student
        self.task = task or ClassificationTask()
        self.terms = nn.ModuleList(terms if terms is not None else [Term("ce", 1.0)])
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ProtegeError(f"two terms share a name ({', '.join(names)}); give each a distinct name=")
        teachers = _as_teacher_dict(teacher)
        for t in teachers.values():
            t.eval()
            t.requires_grad_(False)
        object.__setattr__(self, "_teachers", teachers)
        if cached_teachers and teachers:
            raise ProtegeError(
                "give either teacher models or cached_teachers (outputs in the batch), not both"
            )
        self.cached_teachers = int(cached_teachers)
        n_teachers = len(teachers) or self.cached_teachers
        if teacher_weights is None:
            teacher_weights = [1.0] * n_teachers
        if len(teacher_weights) != n_teachers or any(w < 0 for w in teacher_weights):
            raise ProtegeError(
                f"teacher_weights needs one non-negative weight per teacher ({n_teachers}), got {list(teacher_weights)}"
            )
        self.teacher_weights = [float(w) for w in teacher_weights]
        if n_teachers and sum(self.teacher_weights) <= 0:
            raise ProtegeError("teacher_weights sum to zero")
        for t in self.terms:
            if n_teachers and any(not 0 <= i < n_teachers for i in t.picked):
                raise ProtegeError(
                    f"term {t.name!r}: teacher_index is {t.teacher_index}, but there are {n_teachers} "
                    f"teacher(s): use 0 to {n_teachers - 1}, or remove it to combine them all"
                )
        if n_teachers > 1:
            for t in self.terms:
                if t.uses_teacher and t.state is not None and t.teacher_index is None:
                    raise ProtegeError(
                        f"term {t.name!r} keeps trainable state ({type(t.state).__name__}) and would run once "
                        f"per teacher ({n_teachers}); give it teacher_index: to pick one teacher, or one "
                        "term per teacher"
                    )
        needs_teacher = any(t.uses_teacher for t in self.terms)
        if needs_teacher and not n_teachers:
            bad = next(t.name for t in self.terms if t.uses_teacher)
            raise ProtegeError(f"term {bad!r} distills from a teacher, but no teacher was given")
        # a term whose state queries the teacher model itself (DMD) needs no teacher forward on the batch
        self._needs_teacher = any(t.reads_teacher_outputs for t in self.terms)
        own = self.task.output_keys  # what the task's forward returns itself: not taps
        student_taps = [k for t in self.terms for k in t.taps[0] if k not in own]
        teacher_taps = [k for t in self.terms for k in t.taps[1] if k not in own]
        if fold_teacher_bn:
            for t in teachers.values():
                fold_batchnorm(t, keep=teacher_taps)
        # before the taps: a tap of a layer's input (``fc:in``) reads what the quantized layer computes with
        self.quant = FakeQuant(student, **quantize) if quantize is not None else None
        object.__setattr__(self, "_student_taps", Taps(student, student_taps))
        object.__setattr__(self, "_teacher_taps", [Taps(t, teacher_taps) for t in teachers.values()])
        self.progress = 0.0
        if example is not None:
            self.prepare(example)

    # -- teachers stay outside the module tree -------------------------------------------------
    @property
    def teachers(self) -> dict[str, nn.Module]:
        """The frozen teachers by name (not part of ``state_dict``)."""
        return self._teachers

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        for t in self._teachers.values():
            t._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for t in self._teachers.values():
            t.eval()
        if self.student_frozen:
            self.student.eval()
        return self

    @property
    def student_frozen(self) -> bool:
        return getattr(self, "_student_frozen", False)

    def freeze_student(self, frozen: bool = True) -> None:
        """Keep the student fixed (no gradient, ``eval()``) while the terms' own modules train:
        the pre-training stages of FT (the paraphraser) use this."""
        if frozen == self.student_frozen:
            return
        if frozen:  # remember what was trainable, so unfreezing restores exactly that
            trainable = [p for p in self.student.parameters() if p.requires_grad]
            object.__setattr__(self, "_unfrozen", trainable)
            for p in trainable:
                p.requires_grad_(False)
        else:
            for p in getattr(self, "_unfrozen", []):
                p.requires_grad_(True)
        object.__setattr__(self, "_student_frozen", frozen)
        self.train(self.training)

    # -- the step --------------------------------------------------------------------------------
    def set_progress(self, epoch: float) -> None:
        """Tell schedule-dependent terms (warm-up, curricula) how far training is, in epochs."""
        self.progress = float(epoch)

    def teacher_outputs(self, inputs: Any, meta: Mapping[str, Any] | None = None) -> list[Outputs]:
        """Run every teacher (eval, no grad) and collect its logits and taps.

        With ``cached_teachers``, the outputs are read from ``meta["teacher_outputs"]`` instead.
        """
        if self.cached_teachers:
            cached = (meta or {}).get("teacher_outputs")
            if cached is None:
                raise ProtegeError(
                    "this distiller reads its teachers' outputs from a cache, but the batch carries "
                    "none: load the training set with protege.engine.cache.CachedTeacherDataset"
                )
            if len(cached) != self.cached_teachers:
                raise ProtegeError(
                    f"the batch carries outputs of {len(cached)} teacher(s), expected {self.cached_teachers}"
                )
            return [dict(o) for o in cached]
        return run_teachers(
            self.task, list(self._teachers.values()), self._teacher_taps, inputs, self.teacher_precision
        )

    @property
    def needs_prepare(self) -> bool:
        """Whether some term still has to build its adapter or state from a first batch."""
        return any(t.pending for t in self.terms)

    @torch.no_grad()
    def prepare(
        self, batch: Any, num_samples: int | None = None, teachers: Sequence[nn.Module] | None = None
    ) -> None:
        """Build the adapters named by kind, and the state modules sized by the tensors, from one
        batch's tensor shapes (no training happens).

        Call it before creating the optimizer, so the new parameters are optimized too.
        ``num_samples`` is the training set's size (CRD's memory bank needs it). ``teachers``: the
        models a state may query or borrow from (a cohort's shared teachers); default this
        distiller's. The student runs in ``eval()`` here, so its BatchNorm statistics are untouched.
        """
        if not self.needs_prepare:
            return
        inputs, _ = self.task.split(batch)
        needs_outputs = any(t.pending and t.reads_teacher_outputs for t in self.terms)
        teacher_outs = self.teacher_outputs(inputs, self.task.meta(batch)) if needs_outputs else []
        was_training = self.student.training
        self.student.eval()
        try:
            student_out = self.task.forward(self.student, inputs)
            student_out.update(self._student_taps.pop())
        finally:
            self.student.train(was_training)
        models = list(self._teachers.values()) if teachers is None else list(teachers)
        context = BuildContext(num_samples=num_samples, teachers=models)
        for term in self.terms:
            if not term.pending:
                continue
            context = dataclasses.replace(
                context,
                student_key=term.student_key,
                teacher_key=term.teacher_key,
                teacher_index=(term.picked or [0])[0],
                states=[t.state for t in self.terms if t.state is not None],
            )
            if term.pending_state and not term.pending_adapter and not getattr(term.state, "reads_tensors", True):
                term.build_state(None, None, context)  # a state built from the context alone
                continue
            s = _read(student_out, term.student_key, "student", term.name)
            t = None
            if term.reads_teacher_outputs:
                index = (term.picked or [0])[0]
                t = _read(teacher_outs[index], term.teacher_key, f"teacher {index}", term.name)
            if term.pending_adapter:
                term.build_adapter(s, t)
                s = term.adapter(s)
            if term.pending_state:
                term.build_state(s, t, context)

    def forward(
        self, batch: Any, teacher_outputs: Sequence[Outputs] | None = None
    ) -> tuple[Outputs, dict[str, torch.Tensor]]:
        """One step's losses. ``teacher_outputs`` (one dict per teacher), when given, are used
        instead of running the teachers (a :class:`~protege.core.cohort.Cohort` runs them once
        for all its students)."""
        rolled = self._rolled_out(teacher_outputs)
        if rolled:
            batch = self.task.rollout(self.student, batch, self.on_policy)
            self._student_taps.pop()  # what generation recorded
        elif self.training and teacher_outputs is None and self._needs_teacher:
            batch = self.task.refine_batch(batch, self.student, list(self._teachers.values()))
            self._student_taps.pop()  # what the extra passes recorded
            for taps in self._teacher_taps:
                taps.pop()
        inputs, target = self.task.split(batch)
        meta = self.task.meta(batch)
        # Teachers first: their activations are freed before the student's, which must live until
        # backward, are allocated. The other order measured ~8% slower per step on CPU.
        if teacher_outputs is not None:
            teacher_outs = list(teacher_outputs)
        else:
            teacher_outs = self.teacher_outputs(inputs, meta) if self._needs_teacher else []
        student_out = self.task.forward(self.student, inputs)
        student_out.update(self._student_taps.pop())
        losses = {
            term.name: term(student_out, teacher_outs, target, self.teacher_weights, self.progress, meta)
            if term.uses_teacher or not rolled
            else student_out["logits"].new_zeros(())  # labels would be the student's own samples
            for term in self.terms
        }
        return student_out, losses

    def _rolled_out(self, teacher_outputs: Sequence[Outputs] | None) -> bool:
        """Whether this training step's batch is generated by the student (the on-policy coin)."""
        if self._coin is None or not self.training or self.on_policy is None:
            return False
        if teacher_outputs is not None:
            raise ProtegeError("on_policy batches need the teachers to score the new tokens themselves")
        return bool(torch.rand((), generator=self._coin) < self.on_policy.lam)

    def inference_model(self) -> nn.Module:
        """The model that makes the student's predictions: the student itself, unless a term's
        state changes that (SimKD classifies the student's projected features with the teacher's
        head). Evaluation and :meth:`export` use it."""
        model = self.student
        for term in self.terms:
            wrap = getattr(term.state, "inference", None)
            if wrap is not None:
                model = wrap(model)
        return model

    def export(self) -> nn.Module:
        """The plain student (or the :meth:`inference_model`), without hooks, adapters used only
        for training, or teachers: what to save and ship. With ``quantize``, the fake quantization
        is taken out first (the fp32 weights it trained; ``protege export --format int8`` makes
        the int8 model)."""
        if self.quant is not None:
            self.quant.remove()
        return self.inference_model()

    def close(self) -> None:
        """Remove the forward hooks placed on student and teachers."""
        self._student_taps.remove()
        for taps in self._teacher_taps:
            taps.remove()


def _as_teacher_dict(teacher: TeacherSpec) -> dict[str, nn.Module]:
    if teacher is None:
        return {}
    if isinstance(teacher, nn.Module):
        return {"teacher": teacher}
    if isinstance(teacher, Mapping):
        return dict(teacher)
    return {f"teacher{i}": t for i, t in enumerate(teacher)}
