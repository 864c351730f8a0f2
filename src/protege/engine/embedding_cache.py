"""Teacher-output cache of a sentence encoder (task ``embedding``): the teacher's vector of every text.

A sentence encoder's training texts have no augmentation, so its output for a text never changes: a
distill run that recomputes it every epoch spends most of its time in the teacher (a 6-layer MiniLM
teacher costs more than a 2- or 3-layer student's forward and backward together). ``protege cache
emb.yaml`` runs the teacher once over every split (:func:`write_embedding_cache`); ``protege distill
emb.yaml`` with ``cache: <path>`` then reads the vectors (:func:`protege.caching.use_cache`) and
never runs the teacher on training batches. Same idea as sentence-transformers' MSE distillation,
which encodes the teacher's texts once before training.

**What is stored** per text: the teacher's sentence vector (``"embedding"``, the model's output after
pooling, Dense and normalisation) in float32, exactly what the online run would compute (the loss of
a cached run equals the online one's, tested). Terms that read anything else of the teacher (token
embeddings, hidden states or attention taps for MiniLM relations) are refused with a message: the
cache does not hold them.

Shards are the safetensors files of :mod:`protege.engine.cache` (``embedding`` ``(n, D)`` per shard)
with an ``index.json``; each shard's size and SHA-256 are verified on open. The fingerprint's
``teacher`` part hashes the teacher's files (its sentence-transformers folder, or its weights), the
``data`` part the texts of every split in order, so a changed corpus, split or teacher is refused.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.distiller import TeacherPrecision, check_teacher_precision, teacher_autocast
from ..errors import ProtegeError
from ..files import commit_dir, staged_dir
from .cache import (
    FORMAT,
    FORMAT_VERSION,
    TeacherCache,
    _fingerprint,
    _ShardWriter,
    _totals,
    cache_device,
    fingerprint_part,
    new_cache_path,
)
from .loaders import make_loader

if TYPE_CHECKING:
    from ..tasks.base import Task

__all__ = ["EMBEDDING_KEYS", "CachedEmbeddingDataset", "embedding_data_part", "write_embedding_cache"]

STORAGE = "embedding"
#: the teacher outputs a cached embedding run can serve (both are the sentence vector)
EMBEDDING_KEYS = frozenset({"embedding", "logits"})


def _texts_sha256(split: Any) -> str:
    h = hashlib.sha256()
    for text in split.texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def embedding_data_part(data: Any) -> dict[str, Any]:
    """The ``data`` part of an embedding cache's fingerprint: the source, its options, the split
    sizes, the token limit and a SHA-256 of each split's texts in order."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    detail = {
        "source": data.source,
        "options": data.options,
        "sizes": data.sizes(),
        "max_length": int(getattr(data, "max_length", 0) or 0),
        "texts_sha256": {name: _texts_sha256(s) for name, s in splits.items() if s is not None},
    }
    return fingerprint_part(detail)


@torch.no_grad()
def _embedding_pass(
    teacher: nn.Module,
    task: Task,
    dataset: Dataset,
    writer: _ShardWriter,
    *,
    batch_size: int,
    device: torch.device,
    precision: TeacherPrecision,
) -> int:
    """Run the teacher over ``dataset`` in order; store each text's vector. Returns the width."""
    width = 0
    for batch in make_loader(dataset, batch_size, shuffle=False):
        inputs, _ = task.split(batch)
        with teacher_autocast(teacher, precision):
            vectors = task.forward(teacher, inputs)["embedding"]
        vectors = vectors.detach().float().cpu()
        if not torch.isfinite(vectors).all():
            raise ProtegeError("the teacher returned NaN or inf embeddings; nothing was cached")
        width = int(vectors.shape[-1])
        writer.add({"embedding": vectors})
    writer.flush()
    return width


def write_embedding_cache(
    out: str | Path,
    data: Any,
    teacher: nn.Module,
    *,
    shard_size: int = 10_000,
    batch_size: int = 64,
    parts: dict[str, dict[str, Any]] | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    teacher_precision: TeacherPrecision = "fp32",
) -> dict[str, Any]:
    """Run the sentence encoder ``teacher`` over every split of ``data`` and write a cache at ``out``.

    ``data`` is an :class:`~protege.tasks.embedding.EmbeddingDataSplits`. The validation and test
    vectors are stored too (a cached run's fidelity metrics read them). ``parts``: the fingerprint's
    ``teacher`` and ``data`` parts (:func:`protege.caching.embedding_fingerprint_parts`); without them
    staleness cannot be checked. Returns the index.

    Raises:
        ProtegeError: ``out`` exists and ``overwrite`` is false; an invalid setting; a teacher whose
            vectors are not finite (nothing is written).
    """
    from ..tasks import build_task

    t0 = time.perf_counter()
    out = new_cache_path(out, overwrite)
    if shard_size < 1 or batch_size < 1:
        raise ProtegeError(f"shard_size and batch_size must be ≥ 1 (got {shard_size}, {batch_size})")
    check_teacher_precision(teacher_precision)
    task = build_task("embedding")
    task.bind(data)
    parts = {**(parts or {}), "settings": fingerprint_part({"teacher_precision": teacher_precision})}
    dev = cache_device(device)
    teacher = teacher.to(dev).eval().requires_grad_(False)
    with staged_dir(out) as tmp:
        splits: dict[str, Any] = {}
        width = 0
        for name in ("train", "val", "test"):
            dataset = getattr(data, name)
            if dataset is None or len(dataset) == 0:
                continue
            writer = _ShardWriter(tmp, name, shard_size)
            width = _embedding_pass(
                teacher, task, dataset, writer, batch_size=batch_size, device=dev, precision=teacher_precision
            )
            splits[name] = {"samples": len(dataset), "views": 1, "storage": STORAGE, "shards": writer.shards}
        if "train" not in splits:
            raise ProtegeError("the run's training split is empty: nothing to cache")
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "task": "embedding",
            "fingerprint": _fingerprint(parts),
            "parts": parts,
            "teachers": 1,
            "num_classes": width,
            "dim": width,
            "dtype": "float32",
            "views": 1,
            "taps": {"embedding": {"shape": [width]}},
            "splits": splits,
            **_totals(splits, t0),
        }
        commit_dir(tmp, out, index)
    return index


class CachedEmbeddingDataset(Dataset):
    """A text split whose items carry the cached teacher: ``{..., "meta": {"teacher_outputs":
    [{"embedding": v, "logits": v}], "index": i}}`` (``v`` the teacher's ``(D,)`` vector of the text)."""

    def __init__(self, cache: TeacherCache, split: str, dataset: Any) -> None:
        info = cache.index["splits"].get(split)
        if info is None:
            raise ProtegeError(
                f"cache {cache.path} has no {split!r} split (it has: {', '.join(cache.splits)})"
            )
        if len(dataset) != int(info["samples"]):
            raise ProtegeError(
                f"the {split} split has {len(dataset)} texts, its cache {info['samples']}: the data changed "
                "since the cache was built; rebuild it with `protege cache <config> --overwrite`"
            )
        self.dataset = dataset
        self.vectors = cache.tensors[split]["embedding"].float()
        self.texts = getattr(dataset, "texts", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        v = self.vectors[i]
        item["meta"] = {"teacher_outputs": [{"embedding": v, "logits": v}], "index": i}
        return item
