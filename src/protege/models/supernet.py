"""SuperLM: an elastic BERT encoder whose subnets share weights by slicing (AutoDistil, DynaBERT).

Xu et al., "AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large
Language Models" (2022) train one weight-sharing *SuperLM* per compact sub-space of Transformer
architectures; a subnet is read off the supernet without retraining. Here:

- A subnet is a :class:`SubnetArch` ``(layers, hidden, heads, intermediate)``. It uses the first
  ``layers`` layers, the first ``hidden`` channels of the residual stream (embeddings, every
  LayerNorm, the rows/columns of q/k/v/o and of the FFN), the first ``intermediate`` FFN neurons,
  and splits its ``hidden``-wide q/k/v into ``heads`` heads of ``hidden / heads``. So every subnet is
  exactly a ``transformers.BertModel`` with ``hidden_size=hidden, num_attention_heads=heads,
  intermediate_size=intermediate, num_hidden_layers=layers`` (``hidden % heads == 0``):
  :meth:`SuperLM.extract` copies the slices into one, and its outputs equal the supernet's.
- The supernet keeps its parameters in a full-size ``BertModel`` (``.bert``) so its state dict has
  BERT's names; the forward is functional (sliced ``F.linear``, eager attention, no dropout: the
  supernet is trained deterministically, the extracted model keeps the teacher's dropout for
  fine-tuning).
- :meth:`SuperLM.from_teacher` initialises the supernet by slicing a teacher ``BertModel`` (the
  supernet's maxima must fit in the teacher: a :class:`ProtegeError` otherwise). With
  ``reorder=True`` the teacher's attention heads and FFN neurons are first permuted by importance,
  most important first (DynaBERT, Hou et al., NeurIPS 2020, so that narrow subnets keep the
  important ones). DynaBERT scores importance by the loss gradient; we use **weight magnitude**
  (head: the L2 norm of its q/k/v rows and o-projection columns; neuron: the norm of its input row
  times the norm of its output column), which needs no data. The permutation leaves the teacher's
  function unchanged (attention is equivariant to a permutation of heads, the FFN to one of neurons).
- :meth:`SuperLM.forward` also returns the query/key/value projections of the subnet's last layer,
  ``(B, L, hidden)`` each: what the registered ``minilm`` relation loss reads
  (:func:`bert_qkv` gives the same of a teacher ``BertModel``).

Parameters and FLOPs of an architecture are analytic (:func:`arch_params`, :func:`arch_flops`);
the tests check them against the extracted ``BertModel``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import ProtegeError
from ..files import atomic_save_tensors, atomic_write_text
from .layer_selection import ffn_neuron_scores

__all__ = [
    "SUPERNET_FILE",
    "SubSpace",
    "SubnetArch",
    "SuperLM",
    "SuperLMOutput",
    "arch_flops",
    "arch_params",
    "bert_qkv",
    "check_bert_teacher",
    "default_subspaces",
    "load_supernet",
    "reorder_by_importance",
    "save_supernet",
    "slice_bert_state",
]

#: the safetensors file of a saved supernet (beside ``supernet.json``)
SUPERNET_FILE = "supernet.safetensors"


class SubnetArch(NamedTuple):
    """One subnet: the first ``layers`` layers, ``hidden`` channels, ``heads`` heads, ``intermediate`` FFN neurons."""

    layers: int
    hidden: int
    heads: int
    intermediate: int

    @property
    def id(self) -> str:
        return f"L{self.layers}-H{self.hidden}-A{self.heads}-I{self.intermediate}"

    @classmethod
    def parse(cls, arch_id: str) -> SubnetArch:
        """The arch of an id such as ``L4-H256-A8-I1024``."""
        try:
            parts = arch_id.split("-")
            values = {p[0]: int(p[1:]) for p in parts}
            if len(parts) != 4 or set(values) != set("LHAI"):
                raise ValueError
        except (ValueError, IndexError):
            raise ProtegeError(f"{arch_id!r} is not a subnet id such as 'L4-H256-A8-I1024'") from None
        return cls(values["L"], values["H"], values["A"], values["I"])


def _ints(values: Sequence[Any], what: str) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values}))
    if not out or out[0] < 1:
        raise ProtegeError(
            f"sub-space {what} must be a non-empty list of positive integers, got {list(values)}"
        )
    return out


@dataclass(frozen=True)
class SubSpace:
    """A compact sub-space of architectures: every combination of the choices with ``hidden % heads == 0``.

    ``mlp_ratio`` gives the FFN width as ``round(ratio * hidden)``. ``relation_heads`` (the minilm
    term's heads) must divide every hidden size, so that the relation loss can score every subnet.
    """

    name: str
    layers: tuple[int, ...]
    hidden: tuple[int, ...]
    heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]
    archs: tuple[SubnetArch, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _ints(self.layers, f"{self.name!r} layers"))
        object.__setattr__(self, "hidden", _ints(self.hidden, f"{self.name!r} hidden"))
        object.__setattr__(self, "heads", _ints(self.heads, f"{self.name!r} heads"))
        ratios = tuple(sorted({float(r) for r in self.mlp_ratio}))
        if not ratios or ratios[0] <= 0:
            raise ProtegeError(
                f"sub-space {self.name!r} mlp_ratio must be positive numbers, got {self.mlp_ratio}"
            )
        object.__setattr__(self, "mlp_ratio", ratios)
        archs = [
            SubnetArch(n, h, a, max(1, round(r * h)))
            for n in self.layers
            for h in self.hidden
            for a in self.heads
            for r in ratios
            if h % a == 0
        ]
        if not archs:
            raise ProtegeError(
                f"sub-space {self.name!r} has no architecture: no heads choice {list(self.heads)} divides a "
                f"hidden size {list(self.hidden)}"
            )
        object.__setattr__(self, "archs", tuple(dict.fromkeys(archs)))

    @property
    def largest(self) -> SubnetArch:
        """The subnet with the most parameters (the supernet's maxima where valid)."""
        return max(self.archs, key=lambda a: (arch_params(a, 1, 1, 1), a))

    @property
    def smallest(self) -> SubnetArch:
        return min(self.archs, key=lambda a: (arch_params(a, 1, 1, 1), a))

    @property
    def maxima(self) -> SubnetArch:
        """What the supernet must hold: the largest of each dimension (heads: the most the widest hidden takes)."""
        widest = max(self.hidden)
        heads = max(a.heads for a in self.archs if a.hidden == widest)
        return SubnetArch(max(self.layers), widest, heads, max(a.intermediate for a in self.archs))

    def sandwich(self, rng: random.Random, randoms: int = 2) -> list[SubnetArch]:
        """The sandwich rule (Yu et al., BigNAS/slimmable; AutoDistil): largest, smallest, ``randoms`` others."""
        rest = [a for a in self.archs if a not in (self.largest, self.smallest)]
        picked = rng.sample(rest, min(randoms, len(rest)))
        return list(dict.fromkeys([self.largest, self.smallest, *picked]))

    def sample(self, rng: random.Random) -> SubnetArch:
        return rng.choice(self.archs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "hidden": list(self.hidden),
            "heads": list(self.heads),
            "mlp_ratio": list(self.mlp_ratio),
        }

    def check_within(self, config: Any) -> None:
        """Raise if an architecture would need weights the teacher ``config`` does not have."""
        m = self.maxima
        limits = {
            "layers": (m.layers, config.num_hidden_layers, "num_hidden_layers"),
            "hidden": (m.hidden, config.hidden_size, "hidden_size"),
            "intermediate (mlp_ratio x hidden)": (
                m.intermediate,
                config.intermediate_size,
                "intermediate_size",
            ),
        }
        for what, (need, have, key) in limits.items():
            if need > have:
                raise ProtegeError(
                    f"sub-space {self.name!r} reaches {what} = {need}, beyond the teacher's {key} = {have}: "
                    "its weights cannot be inherited. Keep every range within the teacher's dimensions."
                )
        too_many = [a for a in self.heads if a > m.hidden]
        if too_many:
            raise ProtegeError(
                f"sub-space {self.name!r}: heads {too_many} exceed the largest hidden size {m.hidden}"
            )


#: default sub-spaces as fractions of the teacher: (layers, hidden, mlp ratio) fractions
_DEFAULT_FRACTIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]] = {
    "base": ((2 / 3, 5 / 6, 1.0), (3 / 4, 1.0), (3 / 4, 1.0)),
    "small": ((1 / 2, 2 / 3), (1 / 2, 2 / 3), (1 / 2, 3 / 4)),
    "tiny": ((1 / 3, 1 / 2), (1 / 3, 1 / 2), (1 / 2, 3 / 4)),
}


def default_subspaces(config: Any, k: int = 3) -> list[SubSpace]:
    """AutoDistil's K sub-spaces scaled to a teacher ``config`` (a ``BertConfig``).

    ``k=3``: base / small / tiny, as fractions of the teacher's layers, hidden size and MLP ratio
    (see ``_DEFAULT_FRACTIONS``: base keeps 2/3-1 of the layers and 3/4-1 of the width, small 1/2-2/3,
    tiny 1/3-1/2); hidden sizes are rounded to multiples of the teacher's head width ``d`` and the head
    choices are ``hidden/d`` and ``hidden/(2d)`` (heads of the teacher's width, or twice it).
    ``k=1``: one space over the union (the interference baseline of the paper).
    """
    if k not in (1, 3):
        raise ProtegeError(f"default sub-spaces exist for k = 1 or 3, got {k}; give subspaces: explicitly")
    n, h, a = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    d = h // a
    ratio = config.intermediate_size / h

    def space(name: str, fl: Sequence[float], fh: Sequence[float], fr: Sequence[float]) -> SubSpace:
        layers = [min(n, max(1, round(f * n))) for f in fl]
        hidden = [min(h, max(d, round(f * h / d) * d)) for f in fh]
        heads = sorted({x // d for x in hidden} | {x // (2 * d) for x in hidden if x % (2 * d) == 0})
        return SubSpace(name, tuple(layers), tuple(hidden), tuple(heads), tuple(f * ratio for f in fr))

    spaces = [space(name, *fr) for name, fr in _DEFAULT_FRACTIONS.items()]
    if k == 3:
        return spaces
    return [
        SubSpace(
            "all",
            tuple(x for s in spaces for x in s.layers),
            tuple(x for s in spaces for x in s.hidden),
            tuple(x for s in spaces for x in s.heads),
            tuple(x for s in spaces for x in s.mlp_ratio),
        )
    ]


# --------------------------------------------------------------------------- cost


def arch_params(arch: SubnetArch, vocab: int, positions: int, types: int, pooler: bool = True) -> int:
    """Parameters of the ``BertModel`` of ``arch`` (embeddings, layers, optional pooler)."""
    n, h, _, i = arch
    embeddings = (vocab + positions + types) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * (2 * h) + (h * i + i) + (i * h + h)
    return embeddings + n * layer + ((h * h + h) if pooler else 0)


def arch_flops(arch: SubnetArch, seq_len: int, pooler: bool = True) -> int:
    """FLOPs of one sequence of ``seq_len`` tokens (a multiply-add counts 2; matmuls only, as
    :func:`protege.metrics.cost.count_flops` counts)."""
    n, h, _, i = arch
    per_layer = 2 * seq_len * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * seq_len * h
    return n * per_layer + (2 * h * h if pooler else 0)


# --------------------------------------------------------------------------- state slicing

_LAYER = "encoder.layer.{}."
_HIDDEN_VECTORS = ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias")


def slice_bert_state(state: Mapping[str, Tensor], arch: SubnetArch) -> dict[str, Tensor]:
    """The ``BertModel`` state dict of ``arch`` cut out of a larger BERT state dict (copies)."""
    n, h, _, i = arch
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in ("embeddings.position_ids", "embeddings.token_type_ids"):
            pass  # index buffers, no width
        elif key.startswith("encoder.layer."):
            layer = int(key.split(".")[2])
            if layer >= n:
                continue
            if ".intermediate.dense." in key:
                value = value[:i, :h] if key.endswith("weight") else value[:i]
            elif ".output.dense." in key and ".attention." not in key:
                value = value[:h, :i] if key.endswith("weight") else value[:h]
            else:  # q/k/v, attention output, LayerNorms
                value = value[:h, :h] if value.dim() == 2 else value[:h]
        elif key.startswith("embeddings.") and value.dim() == 2:
            value = value[:, :h]
        elif value.dim() == 2:  # pooler
            value = value[:h, :h]
        elif value.dim() == 1:
            value = value[:h]
        out[key] = value.detach().clone().contiguous()
    return out


def _bert_config(base: Any, arch: SubnetArch) -> Any:
    config = base.__class__.from_dict(base.to_dict())
    config.num_hidden_layers, config.hidden_size = arch.layers, arch.hidden
    config.num_attention_heads, config.intermediate_size = arch.heads, arch.intermediate
    return config


def _check_bert(model: nn.Module, who: str) -> Any:
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if config is None or layers is None or not hasattr(getattr(layers[0], "attention", None), "self"):
        raise ProtegeError(
            f"the {who} is not a BERT-style encoder (encoder.layer.N.attention.self.query/key/value): "
            "AutoDistil's relation loss reads those projections; use a BertModel teacher such as "
            "all-MiniLM-L6-v2 (transformers.AutoModel of its directory)"
        )
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ProtegeError(
            f"the {who} uses {config.position_embedding_type!r} positions; only absolute ones slice"
        )
    return config


def reorder_by_importance(teacher: nn.Module) -> dict[str, Tensor]:
    """The teacher's state dict with heads and FFN neurons of every layer sorted by weight magnitude,
    most important first (module docstring); the function is unchanged."""
    config = _check_bert(teacher, "teacher")
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    heads = config.num_attention_heads
    width = config.hidden_size // heads
    for layer in range(config.num_hidden_layers):
        p = _LAYER.format(layer)
        q, k, v = (state[f"{p}attention.self.{m}.weight"] for m in ("query", "key", "value"))
        o = state[f"{p}attention.output.dense.weight"]
        score = torch.stack(
            [
                sum(t[j * width : (j + 1) * width].norm() for t in (q, k, v))
                + o[:, j * width : (j + 1) * width].norm()
                for j in range(heads)
            ]
        )
        order = torch.argsort(score, descending=True, stable=True)
        rows = torch.cat([torch.arange(j * width, (j + 1) * width) for j in order.tolist()])
        for m in ("query", "key", "value"):
            state[f"{p}attention.self.{m}.weight"] = state[f"{p}attention.self.{m}.weight"][rows]
            state[f"{p}attention.self.{m}.bias"] = state[f"{p}attention.self.{m}.bias"][rows]
        state[f"{p}attention.output.dense.weight"] = o[:, rows]
        w_in, w_out = state[f"{p}intermediate.dense.weight"], state[f"{p}output.dense.weight"]
        neurons = torch.argsort(ffn_neuron_scores(w_in, w_out), descending=True, stable=True)
        state[f"{p}intermediate.dense.weight"] = w_in[neurons]
        state[f"{p}intermediate.dense.bias"] = state[f"{p}intermediate.dense.bias"][neurons]
        state[f"{p}output.dense.weight"] = w_out[:, neurons]
    return state


# --------------------------------------------------------------------------- the supernet


@dataclass
class SuperLMOutput:
    """``last_hidden_state`` (B, L, hidden), ``pooler_output`` (B, hidden) or None, and ``qkv``: the
    query, key and value projections of the last active layer, (B, L, hidden) each."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None
    qkv: tuple[Tensor, Tensor, Tensor]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the text tasks
        raise ProtegeError(f"the supernet needs transformers ({e}): pip install transformers") from None
    return transformers


class SuperLM(nn.Module):
    """An elastic BERT encoder (module docstring).

    Args:
        config: a ``transformers.BertConfig`` holding the supernet's maxima.
        pooler: keep BERT's pooler (``tanh(W h_[CLS])``) in the supernet and its subnets.
    """

    def __init__(self, config: Any, pooler: bool = True) -> None:
        super().__init__()
        tf = _transformers()
        config = config.__class__.from_dict(config.to_dict())
        config._attn_implementation = "eager"
        self.config = config
        self.bert = tf.BertModel(config, add_pooling_layer=pooler)
        self.has_pooler = pooler
        self.act = tf.activations.ACT2FN[config.hidden_act]
        self.maxima = SubnetArch(
            config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size
        )
        self.arch = self.maxima

    @classmethod
    def from_teacher(cls, teacher: nn.Module, space: SubSpace, reorder: bool = False) -> SuperLM:
        """A supernet for ``space`` initialised by slicing ``teacher`` (optionally reordered first)."""
        config = _check_bert(teacher, "teacher")
        space.check_within(config)
        maxima = space.maxima
        pooler = getattr(teacher, "pooler", None) is not None
        model = cls(_bert_config(config, maxima), pooler=pooler)
        state = reorder_by_importance(teacher) if reorder else teacher.state_dict()
        model.bert.load_state_dict(slice_bert_state(state, maxima))
        return model

    def check_arch(self, arch: SubnetArch) -> SubnetArch:
        arch = SubnetArch(*(int(x) for x in arch))
        m = self.maxima
        if (
            not 1 <= arch.layers <= m.layers
            or not 1 <= arch.hidden <= m.hidden
            or not 1 <= arch.intermediate <= m.intermediate
            or arch.heads < 1
            or arch.hidden % arch.heads
        ):
            raise ProtegeError(
                f"subnet {arch.id} does not fit this supernet (at most {m.id}; hidden must split into heads)"
            )
        return arch

    def set_arch(self, arch: SubnetArch) -> None:
        """The subnet :meth:`forward` runs from now on."""
        self.arch = self.check_arch(arch)

    def _ln(self, x: Tensor, ln: nn.LayerNorm, h: int) -> Tensor:
        return F.layer_norm(x, (h,), ln.weight[:h], ln.bias[:h], ln.eps)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, arch: SubnetArch | None = None
    ) -> SuperLMOutput:
        n, h, a, i = self.check_arch(arch) if arch is not None else self.arch
        emb = self.bert.embeddings
        length = input_ids.shape[1]
        x = (
            F.embedding(input_ids, emb.word_embeddings.weight[:, :h])
            + emb.position_embeddings.weight[:length, :h]
            + emb.token_type_embeddings.weight[0, :h]
        )
        x = self._ln(x, emb.LayerNorm, h)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        width = h // a
        qkv: tuple[Tensor, Tensor, Tensor] = (x, x, x)
        for layer in self.bert.encoder.layer[:n]:
            att = layer.attention.self
            qkv = tuple(  # type: ignore[assignment]
                F.linear(x, m.weight[:h, :h], m.bias[:h]) for m in (att.query, att.key, att.value)
            )
            q, k, v = (t.view(t.shape[0], length, a, width).transpose(1, 2) for t in qkv)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width) + bias, dim=-1)
            ctx = (probs @ v).transpose(1, 2).reshape(x.shape[0], length, h)
            out = layer.attention.output
            x = self._ln(F.linear(ctx, out.dense.weight[:h, :h], out.dense.bias[:h]) + x, out.LayerNorm, h)
            inner = self.act(
                F.linear(x, layer.intermediate.dense.weight[:i, :h], layer.intermediate.dense.bias[:i])
            )
            ffn = layer.output
            x = self._ln(F.linear(inner, ffn.dense.weight[:h, :i], ffn.dense.bias[:h]) + x, ffn.LayerNorm, h)
        pooled = None
        if self.has_pooler:
            dense = self.bert.pooler.dense
            pooled = torch.tanh(F.linear(x[:, 0], dense.weight[:h, :h], dense.bias[:h]))
        return SuperLMOutput(x, pooled, qkv)

    def extract(self, arch: SubnetArch | None = None) -> nn.Module:
        """A standalone ``transformers.BertModel`` of ``arch`` (default: the current one) with copied weights."""
        arch = self.check_arch(arch) if arch is not None else self.arch
        config = _bert_config(self.config, arch)
        config._attn_implementation = "eager"
        model = _transformers().BertModel(config, add_pooling_layer=self.has_pooler)
        model.load_state_dict(slice_bert_state(self.bert.state_dict(), arch))
        return model.eval()

    def params(self, arch: SubnetArch) -> int:
        c = self.config
        return arch_params(arch, c.vocab_size, c.max_position_embeddings, c.type_vocab_size, self.has_pooler)

    def flops(self, arch: SubnetArch, seq_len: int) -> int:
        return arch_flops(arch, seq_len, self.has_pooler)

    def archs(self, space: SubSpace) -> Iterator[SubnetArch]:
        return (self.check_arch(a) for a in space.archs)


def bert_qkv(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value projections ``(B, L, D)`` of the last layer of a ``BertModel`` (forward hooks)."""
    _check_bert(model, "teacher")
    att = model.encoder.layer[-1].attention.self
    got: dict[str, Tensor] = {}
    hooks = [
        getattr(att, name).register_forward_hook(lambda _m, _i, out, name=name: got.__setitem__(name, out))
        for name in ("query", "key", "value")
    ]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return got["query"], got["key"], got["value"]


def check_bert_teacher(model: nn.Module) -> Any:
    """The config of a BERT-style teacher; a :class:`ProtegeError` for any other model."""
    return _check_bert(model, "teacher")


def save_supernet(
    net: SuperLM, directory: Path, space: SubSpace, meta: Mapping[str, Any] | None = None
) -> None:
    """``supernet.json`` (BERT config of the maxima, sub-space, ``meta``) + ``supernet.safetensors``, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(net.bert.state_dict(), directory / SUPERNET_FILE)
    info = {
        "config": net.config.to_dict(),
        "pooler": net.has_pooler,
        "space": space.to_dict(),
        **(meta or {}),
    }
    atomic_write_text(directory / "supernet.json", json.dumps(info, indent=1))


def load_supernet(directory: str | Path) -> tuple[SuperLM, SubSpace, dict[str, Any]]:
    """A supernet :func:`save_supernet` wrote: ``(net, space, info)``."""
    d = Path(directory)
    if not (d / "supernet.json").is_file() or not (d / SUPERNET_FILE).is_file():
        raise ProtegeError(
            f"{d} holds no supernet (supernet.json + {SUPERNET_FILE}); train one: protege supernet CONFIG"
        )
    info = json.loads((d / "supernet.json").read_text())
    tf = _transformers()
    net = SuperLM(tf.BertConfig.from_dict(info["config"]), pooler=bool(info["pooler"]))
    net.bert.load_state_dict(load_file(d / SUPERNET_FILE))
    s = info["space"]
    return net.eval(), SubSpace(s["name"], s["layers"], s["hidden"], s["heads"], s["mlp_ratio"]), info
