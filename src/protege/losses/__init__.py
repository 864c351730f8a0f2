"""Distillation losses: pure functions reachable by name through one registry."""

from .registry import LossInfo, get_loss, list_losses, register_loss

__all__ = ["LossInfo", "get_loss", "list_losses", "register_loss"]
