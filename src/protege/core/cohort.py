"""Several students trained in one run: from the same teachers, and from each other.

A :class:`Cohort` holds one :class:`~protege.core.distiller.Distiller` per student and the
shared frozen teachers. Each step runs every teacher **once** and hands the same outputs to every
student's terms, so training ``k`` students costs one teacher forward per batch, not ``k``.

With ``mutual`` set, the students also teach each other — deep mutual learning (Zhang, Xiang,
Hospedales & Lu, "Deep Mutual Learning", CVPR 2018): each student ``i`` adds

    L_dml(i) = weight · 1/(k-1) · Σ_{j≠i} T² · KL( p_j^T ‖ p_i^T ),   p^T = softmax(z / T)

where the peer's distribution ``p_j`` is a constant for student ``i``'s update (detached). The
paper updates the students one after another within a step; here all students take their step
on the same batch at once, which is the simultaneous variant most implementations use (with
detached peers, the gradients of the joint sum are exactly each student's own).
Without teachers, a cohort with ``mutual`` is plain DML; with teachers, each student also
distills from them through its own terms.

When the task partitions the conditions among the students (:meth:`Task.partition
<protege.tasks.base.Task.partition>`: the generation task's classes, Multi-Student Distillation),
each student trains only on the batch's samples of its own conditions (:meth:`Task.route
<protege.tasks.base.Task.route>`), and the cohort predicts through one routed model.

``cohort(batch)`` returns ``({name: outputs}, {"<name>/<term>": loss})``; :func:`protege.fit`
trains it like a Distiller (one optimizer over all students and their trainable extras) and
evaluates every student, logging ``val/<name>/<metric>``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError
from ..losses.logits import kd as kd_loss
from ..tasks import ClassificationTask, Outputs, Task
from .distiller import (
    Distiller,
    TeacherPrecision,
    TeacherSpec,
    Term,
    _as_teacher_dict,
    check_teacher_precision,
    run_teachers,
)
from .fold import fold_batchnorm
from .taps import Taps


class Cohort(nn.Module):
    """Students trained together on shared batches from shared teachers (and from each other).

    Args:
        students: ``{name: model}`` (a list is named ``student0``, ``student1``, …).
        teacher: as for :class:`Distiller` (``None`` for pure mutual learning).
        terms: the loss terms every student gets (copied per student; default ``[ce()]``), or a
            ``{name: [terms]}`` mapping giving each student its own.
        teacher_weights: one weight per teacher, as for :class:`Distiller`.
        mutual: weight of the deep-mutual-learning term (0 = students do not teach each other).
        mutual_T: its temperature.
        task: how batches are read and models run (default: classification).
        fold_teacher_bn: fold the teachers' BatchNorms into their convolutions (see Distiller).
        teacher_precision: ``"fp32"`` or ``"bf16"``: the precision of the shared teacher forward
            (see Distiller).
    """

    def __init__(
        self,
        students: Mapping[str, nn.Module] | Sequence[nn.Module],
        teacher: TeacherSpec = None,
        terms: Sequence[Term] | Mapping[str, Sequence[Term]] | None = None,
        teacher_weights: Sequence[float] | None = None,
        mutual: float = 0.0,
        mutual_T: float = 1.0,
        task: Task | None = None,
        fold_teacher_bn: bool = False,
        teacher_precision: TeacherPrecision = "fp32",
    ) -> None:
        super().__init__()
        self.teacher_precision = check_teacher_precision(teacher_precision)
        named = (
            dict(students)
            if isinstance(students, Mapping)
            else {f"student{i}": s for i, s in enumerate(students)}
        )
        if not named:
            raise ProtegeError("a cohort needs at least one student")
        bad = [n for n in named if not n or "/" in n or "." in n]
        if bad:
            raise ProtegeError(f"student names must be non-empty and contain no '/' or '.': {bad}")
        if mutual < 0 or mutual_T <= 0:
            raise ProtegeError(f"mutual must be ≥ 0 and mutual_T > 0, got {mutual} and {mutual_T}")
        if mutual > 0 and len(named) < 2:
            raise ProtegeError("mutual learning needs at least two students")
        self.task = task or ClassificationTask()
        teachers = _as_teacher_dict(teacher)
        for t in teachers.values():
            t.eval()
            t.requires_grad_(False)
        object.__setattr__(self, "_teachers", teachers)
        per_student = _terms_per_student(named, terms)
        self.members = nn.ModuleDict(
            {
                name: Distiller(
                    model,
                    None,
                    per_student[name],
                    teacher_weights=teacher_weights,
                    task=self.task,
                    cached_teachers=len(teachers),
                )
                if teachers
                else Distiller(model, None, per_student[name], task=self.task)
                for name, model in named.items()
            }
        )
        self.teacher_weights = next(iter(self.members.values())).teacher_weights if teachers else []
        self.mutual = float(mutual)
        self.mutual_T = float(mutual_T)
        own = self.task.output_keys
        teacher_taps = [
            k for d in self.members.values() for term in d.terms for k in term.taps[1] if k not in own
        ]
        if fold_teacher_bn:  # see Distiller
            for t in teachers.values():
                fold_batchnorm(t, keep=teacher_taps)
        object.__setattr__(self, "_teacher_taps", [Taps(t, teacher_taps) for t in teachers.values()])
        self._needs_teacher = any(t.reads_teacher_outputs for d in self.members.values() for t in d.terms)
        #: the conditions each student covers (the task's :meth:`~protege.tasks.base.Task.partition`),
        #: or None: every student trains on every batch
        self.parts = self.task.partition(list(named))
        #: teacher forward passes run so far (one per training batch, however many students)
        self.teacher_forwards = 0

    # -- what fit() and the pipeline read -------------------------------------------------------
    @property
    def teachers(self) -> dict[str, nn.Module]:
        return self._teachers

    @property
    def student(self) -> nn.ModuleDict:
        """All students as one ``ModuleDict`` (what checkpoints hold, keys ``<name>.<param>``)."""
        return nn.ModuleDict({name: d.student for name, d in self.members.items()})

    @property
    def student_prefixes(self) -> tuple[str, ...]:
        """``state_dict`` key prefixes of the students' own weights (checkpointed as the student)."""
        return tuple(f"members.{name}.student." for name in self.members)

    @property
    def students(self) -> dict[str, nn.Module]:
        return {name: d.student for name, d in self.members.items()}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Cohort:
        super()._apply(fn, recurse)
        for t in self._teachers.values():
            t._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Cohort:
        super().train(mode)
        for t in self._teachers.values():
            t.eval()
        return self

    def set_progress(self, epoch: float) -> None:
        for d in self.members.values():
            d.set_progress(epoch)

    @property
    def needs_prepare(self) -> bool:
        return any(d.needs_prepare for d in self.members.values())

    @torch.no_grad()
    def prepare(self, batch: Any, num_samples: int | None = None) -> None:
        """Build every student's shape-dependent adapters and states (see :meth:`Distiller.prepare`)."""
        if not self.needs_prepare:
            return
        if self.parts is not None:  # each student sees its own conditions' samples (and builds from them)
            for name, d in self.members.items():
                part = self.task.route(batch, self.parts[name])
                d.prepare(
                    batch if part is None else part,
                    num_samples=num_samples,
                    teachers=list(self._teachers.values()),
                )
            return
        inputs, target = self.task.split(batch)
        meta = dict(self.task.meta(batch))
        meta["teacher_outputs"] = self._run_teachers(inputs, count=False)
        for d in self.members.values():
            d.prepare((inputs, target, meta), num_samples=num_samples, teachers=list(self._teachers.values()))

    # -- the step --------------------------------------------------------------------------------
    def _run_teachers(self, inputs: Any, count: bool = True) -> list[Outputs]:
        outs = run_teachers(
            self.task, list(self._teachers.values()), self._teacher_taps, inputs, self.teacher_precision
        )
        if count and outs:
            self.teacher_forwards += 1
        return outs

    def forward(self, batch: Any) -> tuple[dict[str, Outputs], dict[str, torch.Tensor]]:
        if self.parts is not None:
            return self._routed(batch)
        inputs, _ = self.task.split(batch)
        teacher_outs = self._run_teachers(inputs) if self._needs_teacher else None
        outputs: dict[str, Outputs] = {}
        losses: dict[str, torch.Tensor] = {}
        for name, d in self.members.items():
            out, student_losses = d(batch, teacher_outputs=teacher_outs)
            outputs[name] = out
            losses.update({f"{name}/{k}": v for k, v in student_losses.items()})
        if self.mutual > 0:
            names = list(outputs)
            for name in names:
                peers = [outputs[p]["logits"].detach() for p in names if p != name]
                own = outputs[name]["logits"]
                value = sum(kd_loss(own, peer, T=self.mutual_T) for peer in peers) / len(peers)
                losses[f"{name}/dml"] = self.mutual * value
        return outputs, losses

    def _routed(self, batch: Any) -> tuple[dict[str, Outputs], dict[str, torch.Tensor]]:
        """Multi-student distillation: each student trains on the batch's samples of its own
        conditions (its teachers run on those); a student none of whose conditions is in the batch
        adds zero losses this step."""
        assert self.parts is not None
        outputs: dict[str, Outputs] = {}
        losses: dict[str, torch.Tensor] = {}
        for name, d in self.members.items():
            part = self.task.route(batch, self.parts[name])
            if part is None:
                zero = next(d.student.parameters()).new_zeros(())
                losses.update({f"{name}/{t.name}": zero for t in d.terms})
                continue
            teacher_outs = None
            if self._needs_teacher:
                teacher_outs = self._run_teachers(self.task.split(part)[0])
            out, student_losses = d(part, teacher_outputs=teacher_outs)
            outputs[name] = out
            losses.update({f"{name}/{k}": v for k, v in student_losses.items()})
        return outputs, losses

    def inference_models(self) -> dict[str, nn.Module]:
        """Each student's predictor, by name (see :meth:`Distiller.inference_model`); with a
        partition of the conditions, one predictor ``{"": routed}`` that sends each condition to
        its student (the task's :meth:`~protege.tasks.base.Task.routed`)."""
        models = {name: d.inference_model() for name, d in self.members.items()}
        if self.parts is None:
            return models
        return {"": self.task.routed(models, self.parts)}

    def export(self) -> dict[str, nn.Module]:
        """Each student's plain model (see :meth:`Distiller.export`)."""
        return {name: d.export() for name, d in self.members.items()}

    def close(self) -> None:
        for d in self.members.values():
            d.close()
        for taps in self._teacher_taps:
            taps.remove()


def _terms_per_student(
    named: Mapping[str, nn.Module], terms: Sequence[Term] | Mapping[str, Sequence[Term]] | None
) -> dict[str, list[Term]]:
    if isinstance(terms, Mapping):
        missing = sorted(set(named) - set(terms))
        if missing:
            raise ProtegeError(f"no terms given for student(s) {missing}")
        return {name: list(terms[name]) for name in named}
    base = list(terms) if terms is not None else [Term("ce")]
    # each student gets its own copy: adapters and term states must not be shared between students
    return {name: [copy.deepcopy(t) for t in base] for name in named}


__all__ = ["Cohort"]
