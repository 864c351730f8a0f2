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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError, closest
from ..losses import get_loss
from ..tasks import ClassificationTask, Outputs, Task
from .adapters import KINDS as ADAPTER_KINDS
from .adapters import build_adapter
from .taps import Taps

LOGIT_KEYS = frozenset({"logits"})


class Term(nn.Module):
    """One named, weighted loss term: ``weight · loss(student[student_key], teacher[teacher_key])``.

    Args:
        loss: registry name of the loss (see ``protege methods``).
        weight: multiplier of the loss in the total.
        student: which student output the loss reads: ``"logits"`` or a tap path.
        teacher: which teacher output it reads (ignored by losses that use no teacher).
        name: key of the term in the losses dict; default ``loss`` or ``loss:student_key``.
        warmup: epochs over which the weight ramps linearly from 0 to ``weight``
            (DKD's warm-up, usable by any term).
        teacher_index: read only this teacher; default: every teacher, combined by the
            teacher weights (a weighted sum of per-teacher losses, or the loss's own multi-teacher
            form when it has one).
        adapter: trainable module applied to the student tensor first (a projector when shapes
            differ), or the name of one to build from the two tensors' shapes (``"auto"``,
            ``"linear"``, ``"conv1x1"``, ``"conv_bn"``, ``"conv_bn_relu"``; see
            :mod:`protege.core.adapters`) when :meth:`Distiller.prepare` sees a first batch. It
            trains with the student and is dropped at export.
        **params: the loss's hyper-parameters (and those of its state module, if any).
    """

    def __init__(
        self,
        loss: str,
        weight: float = 1.0,
        student: str = "logits",
        teacher: str = "logits",
        name: str | None = None,
        warmup: float = 0.0,
        teacher_index: int | None = None,
        adapter: nn.Module | str | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self.info = get_loss(loss)
        self.loss = loss
        self.weight = float(weight)
        self.student_key = student
        self.teacher_key = teacher
        self.name = name or (loss if student in LOGIT_KEYS else f"{loss}:{student}")
        if warmup < 0:
            raise ProtegeError(f"term {self.name!r}: warmup must be ≥ 0 epochs, got {warmup}")
        self.warmup = float(warmup)
        self.teacher_index = teacher_index
        self.adapter_kind = adapter if isinstance(adapter, str) else None
        self.adapter = adapter if isinstance(adapter, nn.Module) else None
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
        self.params = {k: v for k, v in params.items() if k in self.info.params}
        self.state = (
            self.info.state(**{k: v for k, v in params.items() if k in state_params})
            if self.info.state
            else None
        )

    @property
    def uses_teacher(self) -> bool:
        return self.info.uses_teacher

    @property
    def pending_adapter(self) -> bool:
        """True until an adapter named by kind has been built from real tensor shapes."""
        return self.adapter_kind is not None and self.adapter is None

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
    ) -> torch.Tensor:
        try:
            s = _read(student, self.student_key, "student", self.name)
            if self.pending_adapter:
                raise ProtegeError(
                    f"term {self.name!r} builds its adapter from the tensor shapes: call "
                    "distiller.prepare(example_batch) before creating the optimizer (protege.fit does this)"
                )
            if self.adapter is not None:
                s = self.adapter(s)
            kwargs = dict(self.params)
            if self.state is not None:
                kwargs.update(self.state(progress))
            if self.info.uses_target:
                if target is None:
                    raise ProtegeError(f"term {self.name!r} needs labels, but the batch carries none")
                kwargs["target"] = target
            if not self.info.uses_teacher:
                return self.factor(progress) * self.info.fn(s, **kwargs)
            if not teachers:
                raise ProtegeError(f"term {self.name!r} reads a teacher, but the distiller has none")
            picked = range(len(teachers)) if self.teacher_index is None else [self.teacher_index]
            ts = [_read(teachers[i], self.teacher_key, f"teacher {i}", self.name) for i in picked]
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
            raise ProtegeError(f"term {self.name!r}: {e}") from e

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name!r}, weight={self.weight}" + (f", {params}" if params else "")


def _read(outputs: Outputs, key: str, who: str, term: str) -> torch.Tensor:
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
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: TeacherSpec = None,
        terms: Sequence[Term] | None = None,
        teacher_weights: Sequence[float] | None = None,
        task: Task | None = None,
        example: Any = None,
    ) -> None:
        super().__init__()
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
        if teacher_weights is None:
            teacher_weights = [1.0] * len(teachers)
        if len(teacher_weights) != len(teachers) or any(w < 0 for w in teacher_weights):
            raise ProtegeError(
                f"teacher_weights needs one non-negative weight per teacher ({len(teachers)}), got {list(teacher_weights)}"
            )
        self.teacher_weights = [float(w) for w in teacher_weights]
        if teachers and sum(self.teacher_weights) <= 0:
            raise ProtegeError("teacher_weights sum to zero")
        needs_teacher = any(t.uses_teacher for t in self.terms)
        if needs_teacher and not teachers:
            bad = next(t.name for t in self.terms if t.uses_teacher)
            raise ProtegeError(f"term {bad!r} distills from a teacher, but no teacher was given")
        self._needs_teacher = needs_teacher
        student_taps = [t.student_key for t in self.terms if t.student_key not in LOGIT_KEYS]
        teacher_taps = [
            t.teacher_key for t in self.terms if t.uses_teacher and t.teacher_key not in LOGIT_KEYS
        ]
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
        return self

    # -- the step --------------------------------------------------------------------------------
    def set_progress(self, epoch: float) -> None:
        """Tell schedule-dependent terms (warm-up, curricula) how far training is, in epochs."""
        self.progress = float(epoch)

    def teacher_outputs(self, inputs: Any) -> list[Outputs]:
        """Run every teacher (eval, no grad) and collect its logits and taps."""
        outs = []
        with torch.no_grad():
            for teacher, taps in zip(self._teachers.values(), self._teacher_taps):
                out = self.task.forward(teacher, inputs)
                out.update(taps.pop())
                outs.append(out)
        return outs

    @property
    def needs_prepare(self) -> bool:
        """Whether some term still has to build its adapter from a first batch."""
        return any(t.pending_adapter for t in self.terms)

    @torch.no_grad()
    def prepare(self, batch: Any) -> None:
        """Build the adapters named by kind from one batch's tensor shapes (no training happens).

        Call it before creating the optimizer, so the new parameters are optimized too.
        The student runs in ``eval()`` here, so its BatchNorm statistics are untouched.
        """
        if not self.needs_prepare:
            return
        inputs, _ = self.task.split(batch)
        teacher_outs = self.teacher_outputs(inputs)
        was_training = self.student.training
        self.student.eval()
        try:
            student_out = self.task.forward(self.student, inputs)
            student_out.update(self._student_taps.pop())
        finally:
            self.student.train(was_training)
        for term in self.terms:
            if term.pending_adapter:
                s = _read(student_out, term.student_key, "student", term.name)
                index = term.teacher_index or 0
                term.build_adapter(
                    s, _read(teacher_outs[index], term.teacher_key, f"teacher {index}", term.name)
                )

    def forward(self, batch: Any) -> tuple[Outputs, dict[str, torch.Tensor]]:
        inputs, target = self.task.split(batch)
        # Teachers first: their activations are freed before the student's, which must live until
        # backward, are allocated. The other order measured ~8% slower per step on CPU.
        teacher_outs = self.teacher_outputs(inputs) if self._needs_teacher else []
        student_out = self.task.forward(self.student, inputs)
        student_out.update(self._student_taps.pop())
        losses = {
            term.name: term(student_out, teacher_outs, target, self.teacher_weights, self.progress)
            for term in self.terms
        }
        return student_out, losses

    def export(self) -> nn.Module:
        """The plain student, without hooks, adapters or teachers: what to save and ship."""
        return self.student

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
