"""Layer selection: a shallower Transformer student that starts as a subset of its teacher's layers.

A student built by layer selection keeps the teacher's embeddings (and head) and copies the weights of
some of its layers, in order, into a model of the same widths with fewer layers (DistilBERT,
Sanh et al. 2019, initialises its student this way; so do the "shrink and fine-tune" students of
Shleifer & Rush 2020). Both the causal-LM students of :mod:`protege.tasks.lm` and the sentence-encoder
students of :mod:`protege.models.embedding` use the pieces here: which layers to keep, where a model
keeps its list of layers, and how the teacher's state dict maps onto the student's.

A student may also be *narrower* in its feed-forward blocks: :func:`prune_ffn_state` keeps the
``keep`` most important FFN neurons of every layer (CoFi, Xia et al. ACL 2022, and DynaBERT, Hou et
al. NeurIPS 2020, prune FFN neurons of a BERT this way before distilling). Importance is measured on
the weights alone (:func:`ffn_neuron_scores`: the norm of a neuron's input row times the norm of its
output column; no data needed), so a student whose every neuron is kept computes exactly the teacher's
function, and one with fewer neurons drops the smallest contributions first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ProtegeError

__all__ = [
    "check_layers",
    "evenly_spaced_layers",
    "ffn_neuron_scores",
    "layer_list_path",
    "prune_ffn_state",
    "select_layer_state",
]


def evenly_spaced_layers(total: int, count: int) -> list[int]:
    """``count`` of ``total`` layer indices, evenly spaced and ending with the last layer.

    Layer ``i`` of the student (``0 <= i < count``) is the teacher's layer ``(i + 1) * total // count - 1``:
    the teacher's layers cut into ``count`` consecutive blocks of (nearly) equal size, and the last layer
    of each block kept. So 6 -> 3 keeps ``[1, 3, 5]``, 6 -> 2 keeps ``[2, 5]``, 12 -> 4 keeps
    ``[2, 5, 8, 11]``, 6 -> 1 keeps ``[5]``. The indices are strictly increasing (``total >= count``).

    Raises:
        ProtegeError: ``count`` not a whole number in ``1..total``.
    """
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= total:
        raise ProtegeError(
            f"num_layers must be a whole number from 1 to the teacher's {total} layers, got {count!r}"
        )
    return [(i + 1) * total // count - 1 for i in range(count)]


def check_layers(layers: Sequence[int], total: int) -> list[int]:
    """``layers`` as a list, checked: distinct whole-number indices of ``total`` layers, at least one.

    Raises:
        ProtegeError: an empty selection, an index out of range or repeated, or not a whole number.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ProtegeError(f"student layers must be a list of the teacher's layer indices, got {layers!r}")
    chosen = list(layers)
    if (
        not chosen
        or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < total for i in chosen)
        or len(set(chosen)) != len(chosen)
    ):
        raise ProtegeError(
            f"student layers must be distinct indices of the teacher's {total} layers "
            f"(0 to {total - 1}), got {chosen}"
        )
    return chosen


def layer_list_path(model: nn.Module, count: int) -> str:
    """Module path of the first ``nn.ModuleList`` of ``count`` modules in ``model`` (its layers:
    ``model.layers`` for LLaMA, ``encoder.layer`` for BERT)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return path
    raise ProtegeError(f"found no list of {count} layers in {type(model).__name__} to select from")


def select_layer_state(state: Mapping[str, Tensor], prefix: str, layers: Sequence[int]) -> dict[str, Tensor]:
    """The teacher's ``state`` with only the ``layers`` under ``prefix`` (e.g. ``"encoder.layer."``),
    renumbered ``0, 1, ...`` in the order given; every key outside ``prefix`` is kept as it is.

    The result is what a student with ``len(layers)`` layers and the teacher's widths loads strictly.
    """
    position = {src: dst for dst, src in enumerate(layers)}
    selected: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in position:
                selected[f"{prefix}{position[int(index)]}.{rest}"] = value
        else:
            selected[key] = value
    return selected


def ffn_neuron_scores(w_in: Tensor, w_out: Tensor) -> Tensor:
    """Importance of each FFN neuron from the weights alone: ``||W_in[j, :]|| * ||W_out[:, j]||``.

    ``w_in`` is the up-projection ``(intermediate, hidden)`` and ``w_out`` the down-projection
    ``(hidden, intermediate)`` (``nn.Linear`` layouts). The product bounds how much neuron ``j`` can
    move the block's output for a unit input (DynaBERT's magnitude variant)."""
    return w_in.detach().float().norm(dim=1) * w_out.detach().float().norm(dim=0)


#: the FFN of a BERT-family layer (BERT, MiniLM, RoBERTa, MPNet, XLM-R): up- and down-projection
_FFN_IN, _FFN_OUT = "intermediate.dense.", "output.dense."


def prune_ffn_state(state: Mapping[str, Tensor], prefix: str, count: int, keep: int) -> dict[str, Tensor]:
    """``state`` with the FFN of each of the ``count`` layers under ``prefix`` cut to its ``keep`` most
    important neurons (:func:`ffn_neuron_scores`), kept in their original order.

    The layers are BERT-style (``{prefix}{i}.intermediate.dense`` up, ``{prefix}{i}.output.dense`` down);
    what loads the result is the same architecture with ``intermediate_size=keep``.

    Raises:
        ProtegeError: a layer without those two projections, or ``keep`` not in ``1..intermediate``.
    """
    out = dict(state)
    for i in range(count):
        up, down = f"{prefix}{i}.{_FFN_IN}", f"{prefix}{i}.{_FFN_OUT}"
        if f"{up}weight" not in state or f"{down}weight" not in state:
            raise ProtegeError(
                f"layer {i} has no BERT-style feed-forward block ({up}weight / {down}weight): a narrower "
                "intermediate_size copied from the teacher needs a BERT-family encoder; use init: scratch"
            )
        w_in, w_out = state[f"{up}weight"], state[f"{down}weight"]
        total = w_in.shape[0]
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= total:
            raise ProtegeError(
                f"intermediate_size must be a whole number from 1 to the teacher's {total}, got {keep!r}"
            )
        kept = torch.sort(torch.topk(ffn_neuron_scores(w_in, w_out), keep).indices).values
        out[f"{up}weight"] = w_in[kept].clone()
        if f"{up}bias" in state:
            out[f"{up}bias"] = state[f"{up}bias"][kept].clone()
        out[f"{down}weight"] = w_out[:, kept].clone()
    return out
