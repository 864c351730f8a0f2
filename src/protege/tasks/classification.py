"""Image (or any tensor) classification: a batch is ``(inputs, labels)`` or a dict with them.

A third item ``(inputs, labels, meta)`` (or a ``"meta"`` key) is a dict of extras such as sample
indices or cached teacher outputs (see :meth:`protege.tasks.Task.meta`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError
from ..metrics.fidelity import classification_report
from ..models import save_model
from .base import Evaluator, Outputs, Task


class ClassificationTask(Task):
    """Models map inputs to class logits; metrics are accuracy, top-5, NLL, ECE and fidelity.

    **Native format** (:meth:`export`): a timm model is written as timm saves it for the Hub,
    ``config.json`` + ``model.safetensors`` (``timm.create_model("local-dir:<dir>", pretrained=True)``
    loads it); any other model (protege zoo, torchvision) as ``model.safetensors`` + the
    ``protege_model.json`` spec (``pg.load_model(dir)``, or ``pg.build_model(name, ..., weights=dir)``).
    """

    name = "classification"
    primary_metric = "acc"
    native_format = "safetensors"

    def __init__(self, input_key: str = "input", target_key: str = "target") -> None:
        self.input_key = input_key
        self.target_key = target_key

    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if isinstance(batch, dict):
            return batch[self.input_key], batch.get(self.target_key)
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2 or (len(batch) == 3 and isinstance(batch[2], dict)):
                return batch[0], batch[1]
            if len(batch) == 1:
                return batch[0], None
        if isinstance(batch, torch.Tensor):
            return batch, None
        raise ProtegeError(
            f"a classification batch is (inputs, labels), (inputs,) or a dict with {self.input_key!r}"
            f" and {self.target_key!r}; got {type(batch).__name__}"
        )

    def meta(self, batch: Any) -> dict[str, Any]:
        if isinstance(batch, dict):
            return batch.get("meta") or {}
        if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[2], dict):
            return batch[2]
        return {}

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        logits = model(inputs)
        if not isinstance(logits, torch.Tensor):  # e.g. HF ImageClassifierOutput
            logits = logits["logits"] if isinstance(logits, dict) else logits.logits
        return {"logits": logits}

    def evaluator(self, with_teacher: bool) -> Evaluator:
        return _ClassificationEvaluator(with_teacher)

    def export(
        self, model: nn.Module, data: Any, directory: Path, spec: Mapping[str, Any] | None = None
    ) -> bool:
        if is_timm_model(model):
            from timm.models._hub import save_for_hf

            save_for_hf(model, str(directory), safe_serialization=True)
            return True
        if spec is None:
            return False
        save_model(
            model,
            directory,
            str(spec["model"]),
            int(spec["num_classes"]),
            int(spec["in_chans"]),
            spec.get("kwargs") or {},
        )
        return True


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm model (which timm's own format can save and rebuild)."""
    return type(model).__module__.startswith("timm.") and isinstance(
        getattr(model, "pretrained_cfg", None), dict
    )


class _ClassificationEvaluator(Evaluator):
    def __init__(self, with_teacher: bool) -> None:
        self.with_teacher = with_teacher
        self.student: list[torch.Tensor] = []
        self.teacher: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        if target is None:
            raise ProtegeError("evaluation needs labelled data: the evaluation batches carry no labels")
        self.student.append(student["logits"].detach().float().cpu())
        self.target.append(target.detach().cpu())
        if self.with_teacher and teacher is not None:
            self.teacher.append(teacher["logits"].detach().float().cpu())

    def compute(self) -> dict[str, float]:
        teacher = torch.cat(self.teacher) if self.teacher else None
        return classification_report(torch.cat(self.student), torch.cat(self.target), teacher)
