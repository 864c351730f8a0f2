"""The supernet space of ``protege search``: AutoDistil's search without retraining.

A candidate is a subnet of one of the trained SuperLMs (``protege supernet``), its id
``<sub-space>:L4-H256-A8-I1024``. It is scored by its **inherited** task-agnostic distillation loss:
the MiniLM relation loss of its last layer against the teacher's, on held-out text, with the weights
it inherits from the supernet (no training; score = minus the loss, higher is better). Parameters and
FLOPs (per sequence of ``max_length`` tokens) are exact formulas of the ``BertModel`` the subnet
extracts to; batch-1 latency is measured on the extracted model only under a latency budget. The
search itself is protege's random search or regularized evolution under the same :class:`Budget`.

:func:`protege.search.search` writes, for this space, ``search.json`` (every candidate, ranking, Pareto front), ``search.png``
and ``winners/<id>/``: each Pareto-front subnet extracted as a ``transformers`` model directory
(``save_pretrained`` + the teacher's tokenizer), ready for fine-tuning.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ProtegeError
from ..metrics.cost import measure_latency
from ..models.supernet import SubnetArch, SubSpace, SuperLM, arch_params, load_supernet
from ..tasks.supernet import TextBatches, held_out, inherited_loss, load_teacher, teacher_relations
from .evolution import Budget, Candidate

__all__ = ["SupernetScorer", "SupernetSpace", "find_supernets", "supernet_scorer"]

Gene = tuple[str, int, int, int, int]  # (sub-space, layers, hidden, heads, intermediate)


def find_supernets(paths: Sequence[str | Path]) -> list[Path]:
    """Supernet directories among ``paths``: a supernet folder itself, or a ``protege supernet`` run
    directory (its ``subspaces/*/supernet``)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "supernet.json").is_file():
            found.append(p)
        else:
            inner = sorted(p.glob("subspaces/*/supernet/supernet.json"))
            if not inner:
                raise ProtegeError(f"{p} is neither a supernet folder nor a 'protege supernet' run directory")
            found += [f.parent for f in inner]
    return found


class SupernetSpace:
    """Subnets of one or more trained supernets (one per sub-space); see the module docstring."""

    name = "supernet"

    def __init__(self, supernets: Sequence[tuple[SuperLM, SubSpace]]) -> None:
        if not supernets:
            raise ProtegeError("the supernet space needs at least one trained supernet")
        self.nets = {space.name: (net, space) for net, space in supernets}
        if len(self.nets) != len(supernets):
            raise ProtegeError("two supernets have the same sub-space name; give each sub-space its own name")
        self.size = sum(len(space.archs) for _, space in self.nets.values())

    def arch(self, arch: Gene) -> tuple[SuperLM, SubnetArch]:
        net, _ = self.nets[arch[0]]
        return net, SubnetArch(*arch[1:])

    def sample(self, rng: random.Random) -> Gene:
        name = rng.choice(sorted(self.nets))
        return (name, *self.nets[name][1].sample(rng))

    def mutate(self, arch: Gene, rng: random.Random) -> Gene:
        """A neighbour of ``arch``: one dimension changed within its sub-space, or (the sub-space being
        a gene too) the subnet of another sub-space closest to it in parameters."""
        space = self.nets[arch[0]][1]
        here = SubnetArch(*arch[1:])
        moves: list[Gene] = [
            (arch[0], *a) for a in space.archs if sum(x != y for x, y in zip(a, here, strict=True)) == 1
        ]
        size = _size(here)
        for name, (_, other) in sorted(self.nets.items()):
            if name != arch[0]:
                moves.append((name, *min(other.archs, key=lambda a: (abs(_size(a) - size), a))))
        if not moves:
            moves = [(arch[0], *a) for a in space.archs if a != here]
        if not moves:
            raise ProtegeError("this search space has a single architecture: there is nothing to mutate")
        return rng.choice(moves)

    def build(self, arch: Gene, num_classes: int = 0, in_chans: int = 0) -> nn.Module:
        """The extracted ``transformers.BertModel`` of ``arch`` (``num_classes``/``in_chans`` unused)."""
        net, sub = self.arch(arch)
        return net.extract(sub)

    def encode(self, arch: Gene) -> str:
        return f"{arch[0]}:{SubnetArch(*arch[1:]).id}"

    def decode(self, arch_id: str) -> Gene:
        name, _, rest = arch_id.partition(":")
        if name not in self.nets:
            raise ProtegeError(f"{arch_id!r}: no sub-space {name!r} (have {', '.join(self.nets)})")
        sub = SubnetArch.parse(rest)
        if sub not in self.nets[name][1].archs:
            raise ProtegeError(f"{arch_id!r} is not in sub-space {name!r}")
        return (name, *sub)

    def enumerate(self) -> Iterator[Gene]:
        return iter([(name, *a) for name, (_, space) in sorted(self.nets.items()) for a in space.archs])

    def model_spec(self, arch: Gene) -> dict[str, Any]:
        net, sub = self.arch(arch)
        return {"model": "bert", "kwargs": {"config": {**net.extract(sub).config.to_diff_dict()}}}


def _size(arch: SubnetArch) -> int:
    """Parameters of the layers (embeddings aside): what ranks subnets by size."""
    return arch_params(arch, 0, 0, 0, pooler=False)


class SupernetScorer:
    """``(arch, index) -> Candidate``: cost formulas, budgets, inherited relation loss (module docstring)."""

    def __init__(
        self,
        space: SupernetSpace,
        batches: Sequence[Any],
        teacher_qkv: Sequence[Any],
        budget: Budget,
        heads: int,
        relations: Sequence[str],
        seq_len: int,
    ) -> None:
        self.space, self.batches, self.teacher_qkv, self.budget = (
            space,
            list(batches),
            list(teacher_qkv),
            budget,
        )
        self.heads, self.relations, self.seq_len = heads, tuple(relations), seq_len
        ids, mask, _ = self.batches[0]
        self.example = {"input_ids": ids[:1], "attention_mask": mask[:1]}

    def __call__(self, arch: Gene, index: int = 0) -> Candidate:
        start = time.perf_counter()
        cand = Candidate(index=index, id=self.space.encode(arch), arch=arch, status="scored")
        try:
            net, sub = self.space.arch(arch)
            b = self.budget
            cand.params, cand.flops = net.params(sub), net.flops(sub, self.seq_len)
            if b.max_params is not None and cand.params > b.max_params:
                cand.status, cand.reason = "over_budget", "max_params"
            elif b.max_flops is not None and cand.flops > b.max_flops:
                cand.status, cand.reason = "over_budget", "max_flops"
            else:
                if b.max_latency_ms is not None:
                    cand.latency_ms = self.latency(arch)
                    if cand.latency_ms > b.max_latency_ms:
                        cand.status, cand.reason = "over_budget", "max_latency_ms"
                if cand.status == "scored":
                    loss = inherited_loss(
                        net, sub, self.batches, self.teacher_qkv, self.heads, self.relations
                    )
                    cand.score = -loss
        except Exception as e:  # a crashing candidate must not end the search
            cand.status, cand.error = "failed", f"{type(e).__name__}: {e}"
        cand.seconds = time.perf_counter() - start
        return cand

    def latency(self, arch: Gene) -> float:
        return float(
            measure_latency(self.space.build(arch), self.example, warmup=2, iters=10, max_seconds=0.5)["ms"]
        )


def supernet_scorer(cfg: Any) -> tuple[SupernetSpace, SupernetScorer, Budget, Any]:
    """The space, scorer, budget and tokenizer of a search config whose space kind is ``supernet``."""
    sc = cfg.space
    loaded = [load_supernet(p) for p in find_supernets(sc.paths)]
    infos = [info for _, _, info in loaded]
    teachers = {info.get("teacher") for info in infos}
    heads = {int(info.get("relation_heads", 4)) for info in infos}
    relations = {tuple(info.get("relations", ("qq", "kk", "vv"))) for info in infos}
    reordered = {bool(info.get("reordered_teacher", False)) for info in infos}
    if len(teachers) != 1 or len(heads) != 1 or len(relations) != 1 or len(reordered) != 1:
        raise ProtegeError(
            "these supernets were trained with different teachers or relation losses; search them apart"
        )
    teacher, tokenizer = load_teacher(sc.teacher or str(teachers.pop()), reorder=reordered.pop())
    space = SupernetSpace([(net, s) for net, s, _ in loaded])
    texts = held_out(sc.corpora, sc.eval_texts, cfg.seed)
    batches = TextBatches(texts, tokenizer, sc.max_length, cfg.batch_size).all()
    if not batches:
        raise ProtegeError(f"corpora {sc.corpora} have no held-out text")
    budget = Budget(**cfg.budget.model_dump())
    scorer = SupernetScorer(
        space,
        batches,
        teacher_relations(teacher, batches),
        budget,
        heads.pop(),
        relations.pop(),
        sc.max_length,
    )
    return space, scorer, budget, tokenizer
