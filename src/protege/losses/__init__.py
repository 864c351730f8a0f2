"""Distillation losses: pure functions plus a registry (see :mod:`protege.losses.registry`).

The loss modules register their functions when imported; importing this package imports them all,
so any ``protege.losses.*`` import sees the full registry (the registry itself imports none of them).
"""

from . import (  # noqa: F401  (register)
    contrastive,
    diffusion,
    diswot,
    embedding,
    features,
    landmarks,
    logits,
    pointcloud,
    relations,
    reuse,
    review,
    segmentation,
    sequence,
    vision_language,
)
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
