"""Taps: read any layer of any ``nn.Module`` by its module path, without editing the model.

A tap is a forward hook on a submodule named by its dotted path (``"layer3"``,
``"blocks.5.mlp"``, ``"features.3"``), as ``model.named_modules()`` spells it. By default it
records the module's output; a ``":in"`` suffix records its first input instead (e.g.
``"fc:in"``: the pooled features a classifier sees).

>>> taps = Taps(model, ["layer3", "fc:in"])
>>> logits = model(x)
>>> taps.outputs["layer3"].shape
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError, closest

INPUT_SUFFIX = ":in"


def module_paths(model: nn.Module) -> list[str]:
    """Every tappable module path of ``model`` (the root, named ``""``, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``; an unknown path raises an error naming the closest valid paths."""
    name = path.removesuffix(INPUT_SUFFIX)
    try:
        return model.get_submodule(name)
    except AttributeError:
        paths = module_paths(model)
        near = closest(name, paths, n=6)
        hint = f"closest: {', '.join(near)}" if near else f"top-level modules: {', '.join(_top_level(model))}"
        raise ProtegeError(
            f"no module {name!r} in {type(model).__name__} to tap; {hint}. "
            "Paths are dotted names from model.named_modules(); add ':in' to read a module's input."
        ) from None


def _top_level(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


def _first_tensor(value: Any) -> torch.Tensor:
    """The tensor a hook saw: modules may return tuples or HF ``ModelOutput``s."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    raise ProtegeError(f"tapped module returned {type(value).__name__}, which holds no tensor to read")


class Taps:
    """Forward hooks that record named submodule outputs (or inputs) on every forward pass.

    ``outputs`` maps each path to the tensor of the latest forward. Tensors keep their graph, so
    losses on student taps back-propagate. Call :meth:`remove` (or use as a context manager) to
    detach the hooks.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for path in dict.fromkeys(paths):  # de-duplicate, keep order
            module = resolve(model, path)
            if path.endswith(INPUT_SUFFIX):
                handle = module.register_forward_pre_hook(self._recorder(path, from_input=True))
            else:
                handle = module.register_forward_hook(self._recorder(path, from_input=False))
            self._handles.append(handle)
        self.paths = list(dict.fromkeys(paths))

    def _recorder(self, path: str, from_input: bool):
        if from_input:

            def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
                self.outputs[path] = _first_tensor(args)

            return pre_hook

        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            self.outputs[path] = _first_tensor(output)

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the recorded tensors and forget them, so no graph outlives its step."""
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs = {}

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
