"""Registry of distillation losses: every loss is reachable by name from a config.

A loss is a pure function. Its positional arguments follow one convention, read by
:class:`protege.core.distiller.Term`:

``fn(student, [teacher], [target=...], **params) -> scalar tensor``

- ``student``: the student tensor the term reads (``"logits"`` or a tap).
- ``teacher``: present when ``uses_teacher``; a tensor, or for ``multi_teacher`` losses a list of
  tensors followed by a ``weights`` keyword (one float per teacher, summing to 1).
- ``target``: keyword, present when ``uses_target`` (class labels for classification).
- ``index``: keyword, present when ``uses_index``: the dataset indices of the batch's samples
  (a ``LongTensor`` of shape (N,)), for losses that keep per-sample memory (CRD's bank). The
  batch carries them as ``meta["index"]`` (see :class:`protege.data.WithIndex`).
- ``params``: keyword hyper-parameters with defaults (``T``, ``alpha`` ...).

Losses that carry trainable state (a learnable temperature, a memory bank) name a ``state``
module class: the term builds one instance, trains it with the student, and calls
``state(progress)`` before each loss to get extra keyword arguments for ``fn`` (make those
keyword-only arguments without defaults in ``fn``, so they stay out of the documented ``params``). ``progress`` is the
training position in epochs (a float).

A state module whose shape depends on the tensors it will see (a memory bank sized by the
dataset, an embedding head sized by the features) sets ``pending = True`` until
``build(student, teacher, context)`` has run; :meth:`protege.Distiller.prepare` calls it with one
batch's tensors (lists of tensors when the term reads several taps) and a
:class:`~protege.losses.registry.BuildContext` (number of training samples, the teacher models).
A state module that changes what the trained student *is* (SimKD classifies with the teacher's
head) defines ``inference(student) -> nn.Module``, used for evaluation and export; a state that
must know what its term reads defines ``bind_term(student_key, teacher_key)``, called when the term
is built.

A term may read several taps (``student=["layer1", "layer2"]``): the loss then receives a list of
tensors in that order (``reads="feature-list"`` losses such as ReviewKD and FSP).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import unknown


@dataclass(frozen=True)
class LossInfo:
    """What the registry knows about one loss."""

    name: str
    fn: Callable[..., Any]
    paper: str
    reads: str = "logits"
    uses_teacher: bool = True
    uses_target: bool = False
    uses_index: bool = False
    multi_teacher: bool = False
    state: type[nn.Module] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: constructor parameters of the state module (e.g. CTKD's ``init_T``), set in a config like params
    state_params: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


@dataclass
class BuildContext:
    """What a lazily built state module may need besides the tensors' shapes."""

    #: number of samples in the training set (sizes per-sample memory such as CRD's bank)
    num_samples: int | None = None
    #: the frozen teacher models, in order (SimKD borrows a teacher's classifier head)
    teachers: list[nn.Module] = field(default_factory=list)
    #: what the term reads: its student and teacher keys (a tap path, "logits", or a list)
    student_key: str | list[str] | None = None
    teacher_key: str | list[str] | None = None
    #: the teacher the term's state is built against
    teacher_index: int = 0


_LOSSES: dict[str, LossInfo] = {}


def register_loss(
    name: str,
    *,
    paper: str,
    reads: str = "logits",
    uses_teacher: bool = True,
    uses_target: bool = False,
    uses_index: bool = False,
    multi_teacher: bool = False,
    state: type[nn.Module] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a pure loss function under ``name``.

    The keyword parameters with defaults in the function's signature become the loss's
    documented hyper-parameters (shown by ``protege methods``).
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        sig = inspect.signature(fn)
        params = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.default is not inspect.Parameter.empty and p.name not in ("target", "weights", "index")
        }
        state_params = (
            {
                p.name: p.default
                for p in inspect.signature(state.__init__).parameters.values()
                if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
            }
            if state is not None
            else {}
        )
        _LOSSES[name] = LossInfo(
            name=name,
            fn=fn,
            paper=paper,
            reads=reads,
            uses_teacher=uses_teacher,
            uses_target=uses_target,
            uses_index=uses_index,
            multi_teacher=multi_teacher,
            state=state,
            params=params,
            state_params=state_params,
        )
        return fn

    return decorator


def get_loss(name: str) -> LossInfo:
    """Look up a registered loss; an unknown name raises an error naming the closest ones."""
    _load_builtin()
    try:
        return _LOSSES[name]
    except KeyError:
        raise unknown("loss", name, _LOSSES) from None


def list_losses() -> list[LossInfo]:
    """Every registered loss, sorted by name."""
    _load_builtin()
    return [_LOSSES[k] for k in sorted(_LOSSES)]


def _load_builtin() -> None:
    from . import contrastive, diswot, features, logits, relations, reuse, review, sequence  # noqa: F401  (register on import)
