"""Tasks: what a batch is, how a model runs on it, which metrics count."""

from ..errors import unknown
from .base import Evaluator, Outputs, Task
from .classification import ClassificationTask
from .lm import LMTask

_TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "lm": LMTask}


def build_task(name: str) -> Task:
    """The task registered under ``name``."""
    try:
        return _TASKS[name]()
    except KeyError:
        raise unknown("task", name, _TASKS) from None


__all__ = ["ClassificationTask", "Evaluator", "LMTask", "Outputs", "Task", "build_task"]
