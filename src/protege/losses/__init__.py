"""Distillation losses: pure functions plus a registry (see :mod:`protege.losses.registry`)."""

from .registry import BuildContext, LossInfo, get_loss, list_losses, register_loss

__all__ = ["BuildContext", "LossInfo", "get_loss", "list_losses", "register_loss"]
