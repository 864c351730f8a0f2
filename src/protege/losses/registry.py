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

A loss may **query the teacher model itself** (``queries_teacher=True``, with ``uses_teacher``): its
state module receives the teachers at ``build`` (:class:`BuildContext`) and calls them at inputs it
makes from the student's outputs (DMD: the teacher's score at the generator's noised samples). The
distiller then runs no teacher forward on the batch for it, and a teacher-output cache cannot serve
it. A state that trains on what the student produced defines ``observe(student_outputs, target)``:
the term calls it in training, before ``state(progress)`` (DMD's fake score takes its own optimizer
steps there, on the detached samples). ``BuildContext.states`` lists the states of the distiller's
terms, so one state may use another's modules (DMD2's GAN head classifies on the fake score's features). A state that needs
no tensors to build sets ``reads_tensors = False``: ``prepare`` then calls ``build(None, None,
context)`` without reading the student's outputs (``score_matching``: a score model in ``prepare``'s
eval mode samples images instead of giving the training outputs the term reads).

A loss may declare the **outputs it reads by default** (``default_keys=(student, teacher)``, each a
key or a list of keys; default ``("logits", "logits")``): a term that names no ``student`` or no
``teacher`` reads these, so ``pg.term("clip_cls")`` and a config's ``- loss: clip_cls`` read the
vision-language task's ``image_embeds`` and ``class_embeds`` without naming them.

A loss may declare a **teacher-side reduction** (``teacher_reduction=``, a
:class:`TeacherReduction`): a pure, deterministic function of the teacher tensor alone and of some
of the loss's parameters, whose output the loss accepts in place of the raw teacher tensor with the
same value (AT: the teacher's normalised attention map instead of its feature map). The term
applies it to the teacher tensor online, and a teacher-output cache stores the reduced tensor
instead of the raw map when only such terms read a tap (:mod:`protege.engine.cache`), so online and
cached training hand the loss the same value. The reduction may be exact only for some shapes
(``exact(student_shape, teacher_shape)``); elsewhere the term hands the loss the raw tensor.

**Precision.** Every registered loss, and every teacher-side reduction, computes in (at least)
float32 whatever its inputs' dtype: :func:`register_loss` wraps the function
(:func:`computes_in_float32`), so direct calls such as ``protege.losses.logits.dkd(s, t, y)`` get it
too. The wrapper disables autocast on the inputs' devices for the duration of the call (so the
modules a state hands the loss, CRD's heads or VID's regressor, run in float32 as well) and casts
every floating tensor narrower than float32 among the arguments, in lists, tuples and dicts too, to
float32 (a differentiable cast: the gradient reaches the bf16 tensor); integer tensors (targets,
indices) and float64 ones are left as they are. A loss written against this registry therefore
needs no casts of its own. State modules keep float32 parameters (like the master weights of mixed
precision); the term calls ``state(progress)`` with autocast disabled as well. A term's adapter is
not part of the loss: it runs at the training's precision, like the student layers it extends.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import unknown

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _narrow(x: torch.Tensor) -> bool:
    """A floating tensor with fewer bits than float32 (bfloat16, float16, float8)."""
    return x.is_floating_point() and x.dtype.itemsize < 4


def widen(value: Any) -> Any:
    """``value`` with every floating tensor narrower than float32 cast to float32, looked for in
    lists, tuples (named tuples keep their type) and dicts; anything else, float64 and integer
    tensors included, is returned as it is (containers too, when nothing in them changed)."""
    if isinstance(value, torch.Tensor):
        return value.float() if _narrow(value) else value
    if isinstance(value, (list, tuple)):
        items = [widen(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        out = {k: widen(v) for k, v in value.items()}
        return value if all(out[k] is v for k, v in value.items()) else out
    return value


def _device_types(value: Any, found: set[str]) -> set[str]:
    if isinstance(value, torch.Tensor):
        found.add(value.device.type)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _device_types(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _device_types(v, found)
    return found


@contextlib.contextmanager
def autocast_disabled(*values: Any) -> Iterator[None]:
    """Autocast switched off, for the block, on the device types of the tensors in ``values``
    (looked for in lists, tuples and dicts); nothing changes where it is not on."""
    with contextlib.ExitStack() as stack:
        for device_type in sorted(_device_types(values, set())):
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def computes_in_float32(fn: _Fn) -> _Fn:
    """``fn`` computing in (at least) float32 whatever its inputs: called with autocast disabled on
    its tensors' devices, its narrower floating tensor arguments cast to float32 (:func:`widen`), and
    a narrower result cast too. Keeps ``fn``'s name, docs and signature (``inspect.signature``
    follows ``__wrapped__``). See the module docs, "Precision"."""
    if getattr(fn, "_computes_in_float32", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = widen(args), widen(kwargs)
        with autocast_disabled(args, kwargs):
            return widen(fn(*args, **kwargs))

    wrapper._computes_in_float32 = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _always(student_shape: torch.Size, teacher_shape: torch.Size) -> bool:
    return True


@dataclass(frozen=True)
class TeacherReduction:
    """A loss's teacher-side reduction (see the module docs).

    Args:
        name: what the reduced tensor is (``"attention_map"``); it names the reduced tap in a cache.
        fn: ``fn(teacher, **params) -> reduced``, pure and deterministic.
        params: the names of the loss parameters ``fn`` depends on (their values are part of the key).
        exact: ``exact(student_shape, teacher_shape) -> bool``: whether the loss's value with the
            reduced teacher equals its value with the raw one for tensors of these shapes (the
            teacher shape may be the raw or the reduced one); default: always.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[str, ...] = ()
    exact: Callable[[torch.Size, torch.Size], bool] = _always

    def bind(self, params: Mapping[str, Any]) -> BoundReduction:
        """The reduction with a term's parameter values (the loss's defaults for those not given)."""
        return BoundReduction(self, tuple((k, params[k]) for k in self.params))


def _key_value(value: Any) -> Any:
    """A parameter value as it appears in a reduction key: numbers as floats, so ``p: 2`` from a
    YAML file and the default ``p=2.0`` name the same reduction."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


@dataclass(frozen=True)
class BoundReduction:
    """A :class:`TeacherReduction` with parameter values: ``bound(teacher)`` reduces a teacher tensor."""

    reduction: TeacherReduction
    values: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        """The reduction and its parameters, e.g. ``attention_map(p=2.0)``."""
        args = ", ".join(f"{k}={_key_value(v)!r}" for k, v in self.values)
        return f"{self.reduction.name}({args})"

    def tap_key(self, tap: str) -> str:
        """The name of ``tap``'s reduced tensor among a teacher's outputs, e.g. ``layer1@attention_map(p=2.0)``."""
        return f"{tap}@{self.key}"

    def describe(self) -> dict[str, Any]:
        """The reduction as JSON-able data (a cache's index records it)."""
        return {"name": self.reduction.name, "params": {k: _key_value(v) for k, v in self.values}}

    def exact(self, student_shape: torch.Size, teacher_shape: torch.Size) -> bool:
        return self.reduction.exact(student_shape, teacher_shape)

    def __call__(self, teacher: torch.Tensor) -> torch.Tensor:
        """The reduced teacher tensor, computed in float32 (see the module docs, "Precision")."""
        return computes_in_float32(self.reduction.fn)(teacher, **dict(self.values))


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
    #: the state queries the teacher models itself (see the module docs); no teacher forward on the batch
    queries_teacher: bool = False
    state: type[nn.Module] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: constructor parameters of the state module (e.g. CTKD's ``init_T``), set in a config like params
    state_params: dict[str, Any] = field(default_factory=dict)
    #: what the term may hand the loss instead of the raw teacher tensor (see :class:`TeacherReduction`)
    teacher_reduction: TeacherReduction | None = None
    #: the (student, teacher) outputs a term reads when it names none: a key, or a tuple of keys
    default_keys: tuple[str | tuple[str, ...], str | tuple[str, ...]] = ("logits", "logits")

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
    #: the state modules of the distiller's terms, in term order (built ones first)
    states: list[nn.Module] = field(default_factory=list)


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
    queries_teacher: bool = False,
    state: type[nn.Module] | None = None,
    teacher_reduction: TeacherReduction | None = None,
    default_keys: tuple[str | Sequence[str], str | Sequence[str]] = ("logits", "logits"),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a pure loss function under ``name``.

    The function is registered, and returned, wrapped by :func:`computes_in_float32`: it computes
    in float32 whatever its inputs' dtype, however it is called. The keyword parameters with defaults in the function's signature become the loss's
    documented hyper-parameters (shown by ``protege methods``). ``teacher_reduction``: what the
    loss accepts in place of the raw teacher tensor (see :class:`TeacherReduction`); its
    ``params`` must be parameters of the loss. ``default_keys``: the ``(student, teacher)`` outputs
    a term reads when it names none (each a key, or a list of keys for ``reads="feature-list"``).
    """
    if queries_teacher and (not uses_teacher or state is None):
        raise ValueError(
            f"loss {name!r}: queries_teacher needs uses_teacher and a state module that queries it"
        )
    keys = tuple(k if isinstance(k, str) else tuple(k) for k in default_keys)
    if len(keys) != 2 or not all(k for k in keys):
        raise ValueError(f"loss {name!r}: default_keys must be (student, teacher), got {default_keys!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        sig = inspect.signature(fn)
        params = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.default is not inspect.Parameter.empty and p.name not in ("target", "weights", "index")
        }
        if teacher_reduction is not None and not set(teacher_reduction.params) <= set(params):
            raise ValueError(f"loss {name!r}: its teacher reduction reads parameters it does not have")
        state_params = (
            {
                p.name: p.default
                for p in inspect.signature(state.__init__).parameters.values()
                if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
            }
            if state is not None
            else {}
        )
        wrapped = computes_in_float32(fn)
        _LOSSES[name] = LossInfo(
            name=name,
            fn=wrapped,
            paper=paper,
            reads=reads,
            uses_teacher=uses_teacher,
            uses_target=uses_target,
            uses_index=uses_index,
            multi_teacher=multi_teacher,
            queries_teacher=queries_teacher,
            state=state,
            params=params,
            state_params=state_params,
            teacher_reduction=teacher_reduction,
            default_keys=keys,  # type: ignore[arg-type]
        )
        return wrapped

    return decorator


def get_loss(name: str) -> LossInfo:
    """Look up a registered loss; an unknown name raises an error naming the closest ones."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise unknown("loss", name, _LOSSES) from None


def list_losses() -> list[LossInfo]:
    """Every registered loss, sorted by name."""
    return [_LOSSES[k] for k in sorted(_LOSSES)]
