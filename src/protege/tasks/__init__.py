"""Tasks: what a batch is, how a model runs on it, which metrics count."""

from typing import Any

from ..errors import unknown
from .base import Evaluator, Outputs, Task
from .classification import ClassificationTask
from .embedding import EmbeddingTask
from .landmarks import LandmarkTask
from .lm import LMTask
from .segmentation import SegmentationTask
from .vision_language import VisionLanguageTask

_TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "embedding": EmbeddingTask,
    "landmarks": LandmarkTask,
    "lm": LMTask,
    "promptable_segmentation": SegmentationTask,
    "vision_language": VisionLanguageTask,
}


def build_task(name: str, data: Any = None) -> Task:
    """The task registered under ``name``, bound to ``data`` (the run's splits) when given."""
    try:
        task = _TASKS[name]()
    except KeyError:
        raise unknown("task", name, _TASKS) from None
    if data is not None:
        task.bind(data)
    return task


__all__ = [
    "ClassificationTask",
    "EmbeddingTask",
    "Evaluator",
    "LMTask",
    "LandmarkTask",
    "Outputs",
    "SegmentationTask",
    "Task",
    "VisionLanguageTask",
    "build_task",
]
