"""Distillation losses: pure functions plus a registry (see :mod:`protege.losses.registry`)."""

from .registry import (
    BoundReduction,
    BuildContext,
    LossInfo,
    TeacherReduction,
    get_loss,
    list_losses,
    register_loss,
)

__all__ = [
    "BoundReduction",
    "BuildContext",
    "LossInfo",
    "TeacherReduction",
    "get_loss",
    "list_losses",
    "register_loss",
]
