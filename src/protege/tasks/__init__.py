"""Tasks: what a batch is, how a model runs on it, which metrics count."""

from typing import Any

from ..errors import unknown
from .base import Evaluator, Outputs, Task
from .classification import ClassificationTask
from .diffusion import GenerationTask
from .embedding import EmbeddingTask
from .landmarks import LandmarkTask
from .lm import LMTask
from .pointcloud import PointPartsTask
from .segmentation import SegmentationTask
from .vision_language import VisionLanguageTask

_TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "embedding": EmbeddingTask,
    "generation": GenerationTask,
    "landmarks": LandmarkTask,
    "lm": LMTask,
    "pointcloud_parts": PointPartsTask,
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
    "GenerationTask",
    "LMTask",
    "LandmarkTask",
    "Outputs",
    "PointPartsTask",
    "SegmentationTask",
    "Task",
    "VisionLanguageTask",
    "build_task",
]
