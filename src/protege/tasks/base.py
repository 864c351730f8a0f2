"""The task contract: what a batch is, how a model runs on it, and which metrics count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

Outputs = dict[str, torch.Tensor]


def ensemble_logits(outputs: Sequence[Outputs], weights: Sequence[float]) -> torch.Tensor:
    """Logits of the weighted mixture of several teachers' predictive distributions (one teacher:
    its logits)."""
    if len(outputs) == 1:
        return outputs[0]["logits"]
    total = sum(weights)
    probs = sum(w / total * o["logits"].float().softmax(-1) for w, o in zip(weights, outputs, strict=True))
    return probs.clamp_min(1e-12).log()  # type: ignore[union-attr]


class Task:
    """Base class of tasks. A task never imports another task.

    Subclasses define :meth:`split` (batch → model inputs and target), :meth:`forward`
    (model + inputs → named outputs, at least ``"logits"``) and :meth:`evaluator`.
    """

    name: str = "task"
    #: the metric that decides the "best" epoch; higher is better
    primary_metric: str = "acc"
    #: the keys :meth:`forward` returns itself (terms read them by name; any other key is a tap path)
    output_keys: frozenset[str] = frozenset({"logits"})
    #: what :meth:`export` writes: the format the model's own ecosystem loads with one call
    #: (``protege export --format native``); ``None``: the task has none (the checkpoints are the export)
    native_format: str | None = None
    #: whether every run also writes its student in the native format to ``runs/<name>/model/``
    #: when it ends (an LM: a directory ``AutoModelForCausalLM.from_pretrained`` loads)
    export_after_run: bool = False

    def bind(self, data: Any) -> None:
        """Give the task what it needs from the run's data (the vision–language task: the class
        prompts); :func:`protege.tasks.build_task` calls it when given the data. Nothing by default."""

    def eval_outputs(self) -> tuple[str, ...]:
        """The output keys :func:`protege.engine.evaluate` hands the evaluator (each ``(N, …)``,
        one row per sample, or the same whole number of rows per sample: a part segmenter's per-point
        logits, gathered across processes sample by sample). Default: ``("logits",)``."""
        return ("logits",)

    def model_input(self, inputs: Any) -> Any:
        """What ``model(...)`` itself takes, from a batch's inputs (for FLOPs, latency and export:
        a vision–language model's image path). Default: the inputs."""
        return inputs

    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        raise NotImplementedError

    def meta(self, batch: Any) -> dict[str, Any]:
        """What the batch carries besides inputs and target: ``"index"`` (dataset indices of its
        samples, for losses with per-sample memory) and ``"teacher_outputs"`` (a list with one
        :data:`Outputs` dict per teacher, read from a teacher-output cache instead of running the
        teachers). Empty by default."""
        return {}

    def batch_size(self, inputs: Any) -> int:
        """Samples in a batch's inputs: a tensor's first dimension, a dict's first tensor's (``image``,
        ``points``, ...), else ``len``."""
        if isinstance(inputs, Mapping):
            for v in inputs.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    return int(v.shape[0])
        return len(inputs)

    def rollout(self, model: nn.Module, batch: Any, settings: Any) -> Any:
        """The batch with its targets replaced by ``model``'s own generations (on-policy distillation,
        GKD; ``settings``: a :class:`~protege.core.on_policy.OnPolicy`). Only generative tasks have one."""
        from ..errors import ProtegeError

        raise ProtegeError(f"on_policy needs a generative task (lm); task {self.name!r} does not generate")

    def refine_batch(self, batch: Any, student: nn.Module, teachers: Sequence[nn.Module]) -> Any:
        """A training batch rewritten from what the models predict on it (TinySAM's hard prompts:
        new points where student and teacher disagree). The distiller calls it on every training
        batch when the teachers run live; the batch as it is by default."""
        return batch

    def refines_batches(self) -> str | None:
        """What :meth:`refine_batch` does in this run, when it does something (then a run must give
        it one student and live teachers, or it would be silently skipped); ``None`` by default."""
        return None

    def evaluator(self, with_teacher: bool) -> Evaluator:
        raise NotImplementedError

    # -- several students sharing the conditions (Multi-Student Distillation) ----------------------
    #: whether :meth:`partition` splits the conditions among several students (then a finished
    #: several-student run predicts through one routed model: :func:`protege.pipeline.load_run`)
    partition_students: bool = False

    def partition(self, students: Sequence[str]) -> dict[str, Any] | None:
        """Which conditions each of a cohort's ``students`` covers, ``{name: part}``, when the task
        splits its conditions among students (generation: the classes); ``None`` (default): every
        student trains on every batch."""
        return None

    def route(self, batch: Any, part: Any) -> Any:
        """The samples of ``batch`` whose condition is in ``part`` (one of :meth:`partition`'s
        values), or ``None`` when it has none. Only tasks with a :meth:`partition` route."""
        raise NotImplementedError(f"task {self.name!r} does not route conditions to students")

    def routed(self, models: Mapping[str, nn.Module], parts: Mapping[str, Any]) -> nn.Module:
        """One model that sends each condition to the student covering it (inference)."""
        raise NotImplementedError(f"task {self.name!r} does not route conditions to students")

    def report_figures(
        self, student: nn.Module, teachers: Sequence[nn.Module], data: Any
    ) -> list[tuple[str, bytes]]:
        """Figures of what the trained models do, for the run report: ``(caption, PNG bytes)`` pairs
        (the report loads the run's models only for tasks that define this; default: none)."""
        return []

    def combine_teachers(self, outputs: Sequence[Outputs], weights: Sequence[float]) -> torch.Tensor:
        """The teachers' ``"logits"`` combined into the one reference the evaluator compares the
        student with: by default the logits of the weighted mixture of their predictive
        distributions (one teacher: its logits). Regression tasks average their predictions."""
        return ensemble_logits(outputs, weights)

    # -- what a run builds: tasks whose data or models need more than the generic builders ------
    def load_data(
        self,
        data: Mapping[str, Any],
        teachers: Sequence[Mapping[str, Any]],
        students: Sequence[Mapping[str, Any]],
    ) -> Any:
        """The run's :class:`~protege.data.DataSplits` when the task reads its data itself (text
        through the models' tokenizer), else ``None``: :func:`protege.data.load_data` reads it.
        ``data`` is the run config's data section, ``teachers``/``students`` its model sections."""
        return None

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        """A model the task builds itself (a ``transformers`` LM), else ``None``:
        :func:`protege.models.build_model` builds it."""
        return None

    def export(
        self, model: nn.Module, data: Any, directory: Path, spec: Mapping[str, Any] | None = None
    ) -> bool:
        """Write ``model`` into the (new, empty) ``directory`` in the task's :attr:`native_format`
        (an LM's ``save_pretrained`` with its tokenizer); ``False``: the task has no such format, or
        ``model`` is not one it can write (the checkpoints are the export).

        ``spec``: how the model was built, ``{"model": name, "kwargs": {...}, "num_classes": n,
        "in_chans": c}`` (a run config's model section and its data), for formats that record it."""
        return False


class Evaluator:
    """Accumulates outputs over an evaluation set, then computes the task's metrics."""

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError
