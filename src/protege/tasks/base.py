"""The task contract: what a batch is, how a model runs on it, and which metrics count."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Outputs = dict[str, torch.Tensor]


class Task:
    """Base class of tasks. A task never imports another task.

    Subclasses define :meth:`split` (batch → model inputs and target), :meth:`forward`
    (model + inputs → named outputs, at least ``"logits"``) and :meth:`evaluator`.
    """

    name: str = "task"
    #: the metric that decides the "best" epoch; higher is better
    primary_metric: str = "acc"

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
        return len(inputs)

    def evaluator(self, with_teacher: bool) -> Evaluator:
        raise NotImplementedError


class Evaluator:
    """Accumulates outputs over an evaluation set, then computes the task's metrics."""

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError
