"""Hooks of :func:`protege.engine.fit`: code that must run with the models between steps.

The data strategies of distillation use them without a training loop of their own: KD³'s
instance selection re-scores the proxy pool with teacher and student at the start of every epoch;
adversarial data-free synthesis trains its generator between student steps and replaces each
(placeholder) batch with generated images. A user's own callback works the same way::

    class Log(pg.Callback):
        name = "log"
        def on_epoch_end(self, distiller, epoch, record):
            record["custom/thing"] = 1.0

    pg.fit(distiller, train, val, cfg, run_dir, callbacks=[Log()])

Every hook receives the plain :class:`~protege.core.distiller.Distiller` (never an accelerate
wrapper). A hook that switches models to ``eval()`` must switch the student back to ``train()``.
Tensors from :meth:`Callback.state_dict` are saved in every checkpoint
(``callbacks.safetensors``, keys ``<name>.<key>``) and handed to :meth:`Callback.load_state_dict`
on resume, so a callback with learned state (a generator and its optimizer) resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError


class Callback:
    """Base class: every hook is a no-op; override the ones you need. ``name`` must be unique
    among the callbacks of one ``fit`` (it prefixes the callback's state in checkpoints)."""

    name: str = "callback"

    def on_fit_start(self, distiller: nn.Module, device: torch.device) -> None:
        """Once, after the models are on ``device`` and before the first epoch (also on resume,
        after :meth:`load_state_dict`)."""

    def on_epoch_start(self, distiller: nn.Module, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based) is drawn from the loader."""

    def on_batch(self, distiller: nn.Module, batch: Any, epoch: int, step: int) -> Any:
        """Called with each training batch (on the device) before the step; returns the batch to
        train on (the same one, or a replacement)."""
        return batch

    def on_epoch_end(self, distiller: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """After the epoch's evaluation; numbers added to ``record`` go to ``metrics.jsonl``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (default none)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (called on resume, before ``on_fit_start``)."""


def check_callbacks(callbacks: Sequence[Callback]) -> None:
    """Names must be unique and plain (no '.'): they prefix checkpoint keys."""
    names = [cb.name for cb in callbacks]
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise ProtegeError(f"callbacks must subclass protege.Callback, got {type(cb).__name__}")
    bad = [n for n in names if not n or "." in n]
    if bad:
        raise ProtegeError(f"callback names must be non-empty and contain no '.', got {bad}")
    if len(set(names)) != len(names):
        raise ProtegeError(f"callback names must be unique, got {names}; set a distinct .name on each")


def callbacks_state(callbacks: Sequence[Callback]) -> dict[str, torch.Tensor]:
    """All callbacks' state as one flat dict (``<name>.<key>``)."""
    return {f"{cb.name}.{k}": v for cb in callbacks for k, v in cb.state_dict().items()}


def load_callbacks_state(callbacks: Sequence[Callback], state: dict[str, torch.Tensor]) -> None:
    """Hand each callback its part of a checkpoint's callback state."""
    for cb in callbacks:
        prefix = f"{cb.name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if own:
            cb.load_state_dict(own)
