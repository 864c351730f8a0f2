"""Search spaces: what a candidate student is, how one is drawn, mutated, named and built.

Every space follows :class:`SearchSpace`. An architecture (``Arch``) is a small immutable value
(a tuple or a string) that :meth:`SearchSpace.encode` turns into a stable id; the search draws and
mutates with a ``random.Random`` so a seed fixes everything. :meth:`SearchSpace.model_spec` says
how to build the candidate by name (``{"model": ..., "kwargs": ...}``) so a run config can name
it; the model families behind those names (``resnet_depth``, ``nb201``) live in :mod:`protege.models.nas`.

Spaces:

- :class:`ResNetDepthSpace`: the CIFAR ResNet-20 skeleton with 1, 3, 5 or 7 BasicBlocks in each of
  its three stages (4^3 = 64 architectures; DisWOT's first search space).
- :class:`NB201Space`: the NAS-Bench-201 cell (Dong & Yang, ICLR 2020), 5 operations on the 6
  edges of a 4-node DAG (5^6 = 15,625 cells), in a macro skeleton whose width, cells per stage
  and number of stages are configurable so it runs small on CPU.
- :class:`ModelListSpace`: a list of names :func:`protege.models.build_model` accepts (timm, ...).
- :class:`MultiplierSpace`: width and depth multipliers of a base model.
"""

from __future__ import annotations

import inspect
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..errors import ProtegeError
from ..models import build_model, list_models
from ..models.nas import NB201_EDGES, NB201_OPS, DepthResNet, NB201Cell, NB201Net, nb201_string, parse_nb201

Arch = Any  # a hashable, JSON-friendly value: a tuple of genes or a string

__all__ = [
    "NB201_OPS",
    "Arch",
    "DepthResNet",
    "ModelListSpace",
    "MultiplierSpace",
    "NB201Cell",
    "NB201Net",
    "NB201Space",
    "ResNetDepthSpace",
    "SearchSpace",
    "parse_nb201",
]


@runtime_checkable
class SearchSpace(Protocol):
    """What the search algorithms need from a space."""

    name: str
    #: number of architectures, or ``None`` when the space is not finite
    size: int | None

    def sample(self, rng: random.Random) -> Arch:
        """A uniformly drawn architecture."""

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        """``arch`` with exactly one gene changed to another of its values."""

    def build(self, arch: Arch, num_classes: int, in_chans: int) -> nn.Module:
        """The candidate as a model (with ``feature_modules`` and ``classifier_name``)."""

    def encode(self, arch: Arch) -> str:
        """A stable id of ``arch``."""

    def decode(self, arch_id: str) -> Arch:
        """The architecture of an id :meth:`encode` produced."""

    def enumerate(self) -> Iterator[Arch]:
        """Every architecture, in a fixed order (finite spaces only)."""

    def model_spec(self, arch: Arch) -> dict[str, Any]:
        """``{"model": name, "kwargs": {...}}`` that builds ``arch`` with ``build_model``."""


def _mutate_gene(genes: tuple[Any, ...], choices: Sequence[Sequence[Any]], rng: random.Random) -> tuple:
    """Change one gene, among those with another value to take, to a different value."""
    mutable = [i for i, c in enumerate(choices) if len(c) > 1]
    if not mutable:
        raise ProtegeError("this search space has a single architecture: there is nothing to mutate")
    i = rng.choice(mutable)
    new = rng.choice([v for v in choices[i] if v != genes[i]])
    return genes[:i] + (new,) + genes[i + 1 :]


# --------------------------------------------------------------------------- ResNet depth space


class ResNetDepthSpace:
    """CIFAR ResNet-20 with a mutable number of blocks per stage (DisWOT's ResNet space).

    Args:
        choices: block counts each stage may take (default 1, 3, 5, 7: 64 architectures).
        widths: stem and stage channels of every candidate.
        stages: number of stages (the CIFAR ResNet has 3).
    """

    name = "resnet_depth"

    def __init__(
        self, choices: Sequence[int] = (1, 3, 5, 7), widths: Sequence[int] = (16, 16, 32, 64), stages: int = 3
    ) -> None:
        if stages != 3:
            raise ProtegeError(f"the CIFAR ResNet has 3 stages; got stages={stages}")
        if not choices or min(choices) < 1:
            raise ProtegeError(f"depth choices must be block counts >= 1, got {list(choices)}")
        self.choices = tuple(sorted({int(c) for c in choices}))
        self.widths = tuple(int(w) for w in widths)
        self.stages = stages
        self.size = len(self.choices) ** stages

    def sample(self, rng: random.Random) -> Arch:
        return tuple(rng.choice(self.choices) for _ in range(self.stages))

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        return _mutate_gene(tuple(arch), [self.choices] * self.stages, rng)

    def build(self, arch: Arch, num_classes: int, in_chans: int) -> nn.Module:
        return build_model(
            self.name, num_classes=num_classes, in_chans=in_chans, **self.model_spec(arch)["kwargs"]
        )

    def encode(self, arch: Arch) -> str:
        return "-".join(str(d) for d in arch)

    def decode(self, arch_id: str) -> Arch:
        try:
            arch = tuple(int(d) for d in arch_id.split("-"))
        except ValueError:
            raise ProtegeError(f"{arch_id!r} is not a ResNet depth id such as '3-5-1'") from None
        if len(arch) != self.stages or any(d not in self.choices for d in arch):
            raise ProtegeError(f"{arch_id!r} is not in this space (depths {list(self.choices)} per stage)")
        return arch

    def enumerate(self) -> Iterator[Arch]:
        return iter(itertools.product(self.choices, repeat=self.stages))

    def model_spec(self, arch: Arch) -> dict[str, Any]:
        return {"model": self.name, "kwargs": {"depths": list(arch), "widths": list(self.widths)}}


# --------------------------------------------------------------------------- NAS-Bench-201


class NB201Space:
    """The NAS-Bench-201 cell space: one of :data:`NB201_OPS` on each of the 6 edges (15,625 cells).

    Args:
        channels: channels of the first stage of the skeleton (the benchmark: 16).
        cells_per_stage: cells per stage (the benchmark: 5).
        stages: stages (the benchmark: 3).
        ops: the operations allowed on every edge (default: all five).
    """

    name = "nb201"

    def __init__(
        self, channels: int = 16, cells_per_stage: int = 5, stages: int = 3, ops: Sequence[str] = NB201_OPS
    ) -> None:
        bad = [op for op in ops if op not in NB201_OPS]
        if bad or not ops:
            raise ProtegeError(f"unknown NB201 operation(s) {bad}; choose among {', '.join(NB201_OPS)}")
        self.ops = tuple(op for op in NB201_OPS if op in ops)
        self.skeleton = {"channels": channels, "cells_per_stage": cells_per_stage, "stages": stages}
        self.size = len(self.ops) ** len(NB201_EDGES)

    def sample(self, rng: random.Random) -> Arch:
        return tuple(rng.choice(self.ops) for _ in NB201_EDGES)

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        return _mutate_gene(tuple(arch), [self.ops] * len(NB201_EDGES), rng)

    def build(self, arch: Arch, num_classes: int, in_chans: int) -> nn.Module:
        return build_model(
            self.name, num_classes=num_classes, in_chans=in_chans, **self.model_spec(arch)["kwargs"]
        )

    def encode(self, arch: Arch) -> str:
        return nb201_string(arch)

    def decode(self, arch_id: str) -> Arch:
        arch = parse_nb201(arch_id)
        if any(op not in self.ops for op in arch):
            raise ProtegeError(f"{arch_id!r} uses operations outside this space ({', '.join(self.ops)})")
        return arch

    def enumerate(self) -> Iterator[Arch]:
        return iter(itertools.product(self.ops, repeat=len(NB201_EDGES)))

    def model_spec(self, arch: Arch) -> dict[str, Any]:
        return {"model": self.name, "kwargs": {"cell": self.encode(arch), **self.skeleton}}


# --------------------------------------------------------------------------- lists and multipliers


class ModelListSpace:
    """A fixed list of model names :func:`protege.models.build_model` accepts (zoo, timm, torchvision).

    Args:
        models: the names (at least one).
        kwargs: keyword arguments passed to every builder.
    """

    name = "models"

    def __init__(self, models: Sequence[str], kwargs: dict[str, Any] | None = None) -> None:
        names = list(dict.fromkeys(models))
        if not names:
            raise ProtegeError("the 'models' search space needs at least one model name")
        self.models = tuple(names)
        self.kwargs = dict(kwargs or {})
        self.size = len(self.models)

    def sample(self, rng: random.Random) -> Arch:
        return rng.choice(self.models)

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        return _mutate_gene((arch,), [self.models], rng)[0]

    def build(self, arch: Arch, num_classes: int, in_chans: int) -> nn.Module:
        return build_model(arch, num_classes=num_classes, in_chans=in_chans, **self.kwargs)

    def encode(self, arch: Arch) -> str:
        return str(arch)

    def decode(self, arch_id: str) -> Arch:
        if arch_id not in self.models:
            raise ProtegeError(f"{arch_id!r} is not in this list of models: {', '.join(self.models)}")
        return arch_id

    def enumerate(self) -> Iterator[Arch]:
        return iter(self.models)

    def model_spec(self, arch: Arch) -> dict[str, Any]:
        return {"model": arch, "kwargs": dict(self.kwargs)}


_CIFAR_RESNET = re.compile(r"^resnet(\d+)(x4)?$")


class MultiplierSpace:
    """Width and depth multipliers of a base model.

    The base's builder must take the multiplied arguments: ``widths`` (a list of channels, each
    scaled and rounded, at least 1) or ``width_mult`` (a float, multiplied) for width, and
    ``depths`` (blocks per stage, each scaled and rounded, at least 1) for depth. The CIFAR
    ResNets of the zoo (``resnet20``, ``resnet32x4``, ...) are searched as ``resnet_depth`` with
    their stage depths and widths, so both multipliers apply to them.

    Args:
        base: a model name.
        width: width multipliers to choose from.
        depth: depth multipliers to choose from.
        kwargs: the base's own keyword arguments (the values the multipliers scale).
    """

    name = "multiplier"

    def __init__(
        self,
        base: str,
        width: Sequence[float] = (0.5, 1.0),
        depth: Sequence[float] = (1.0,),
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not width or not depth or min(width) <= 0 or min(depth) <= 0:
            raise ProtegeError("width and depth multipliers must be non-empty lists of positive numbers")
        self.width, self.depth = tuple(sorted(set(width))), tuple(sorted(set(depth)))
        self.kwargs = dict(kwargs or {})
        self.base = base
        match = _CIFAR_RESNET.match(base.lower())
        if match and base.lower() in list_models(external=False):
            n = (int(match.group(1)) - 2) // 6
            self.model = "resnet_depth"
            self.kwargs = {
                "depths": [n] * 3,
                "widths": [32, 64, 128, 256] if match.group(2) else [16, 16, 32, 64],
                **self.kwargs,
            }
        else:
            self.model = base
        params = self._params()
        self.width_arg = next((a for a in ("widths", "width_mult") if a in params), None)
        if self.width_arg is None and self.width != (1.0,):
            raise ProtegeError(
                f"model {base!r} takes neither 'widths' nor 'width_mult': it has no width to multiply; "
                "use width: [1.0] or another base (e.g. resnet20, mobilenetv2)"
            )
        if "depths" not in params and self.depth != (1.0,):
            raise ProtegeError(
                f"model {base!r} takes no 'depths' argument: it has no depth to multiply; "
                "use depth: [1.0] or a CIFAR ResNet base (resnet20, resnet32, ...)"
            )
        for arg in ("widths", "depths"):
            if arg in params and arg not in self.kwargs:
                default = params[arg].default
                if default is inspect.Parameter.empty:
                    raise ProtegeError(f"give the base's {arg!r} under kwargs: the multipliers scale it")
                self.kwargs[arg] = list(default)
        if self.width_arg == "width_mult" and "width_mult" not in self.kwargs:
            self.kwargs["width_mult"] = params["width_mult"].default
        self.size = len(self.width) * len(self.depth)

    def _params(self) -> dict[str, inspect.Parameter]:
        from .. import models

        builder = models._ZOO.get(self.model.lower())
        if builder is None:  # timm/torchvision: only check that the name builds
            build_model(self.model, num_classes=10, **self.kwargs)
            return {}
        return dict(inspect.signature(builder).parameters)

    def sample(self, rng: random.Random) -> Arch:
        return (rng.choice(self.width), rng.choice(self.depth))

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        return _mutate_gene(tuple(arch), [self.width, self.depth], rng)

    def build(self, arch: Arch, num_classes: int, in_chans: int) -> nn.Module:
        spec = self.model_spec(arch)
        return build_model(spec["model"], num_classes=num_classes, in_chans=in_chans, **spec["kwargs"])

    def encode(self, arch: Arch) -> str:
        return f"w{arch[0]:g}-d{arch[1]:g}"

    def decode(self, arch_id: str) -> Arch:
        m = re.fullmatch(r"w([0-9.]+)-d([0-9.]+)", arch_id)
        if not m or float(m.group(1)) not in self.width or float(m.group(2)) not in self.depth:
            raise ProtegeError(f"{arch_id!r} is not in this space (ids look like 'w0.5-d1')")
        return (float(m.group(1)), float(m.group(2)))

    def enumerate(self) -> Iterator[Arch]:
        return iter(itertools.product(self.width, self.depth))

    def model_spec(self, arch: Arch) -> dict[str, Any]:
        w, d = arch
        kwargs = dict(self.kwargs)
        if self.width_arg == "widths":
            kwargs["widths"] = [max(1, round(c * w)) for c in self.kwargs["widths"]]
        elif self.width_arg == "width_mult":
            kwargs["width_mult"] = float(self.kwargs["width_mult"]) * w
        if "depths" in kwargs:
            kwargs["depths"] = [max(1, round(n * d)) for n in self.kwargs["depths"]]
        return {"model": self.model, "kwargs": kwargs}
