"""Teacher-output cache of a causal LM (task ``lm``): the teacher's top-k next-token log-probabilities
of every trained token, compressed, in the shards of :mod:`protege.engine.cache`.

``protege cache lm.yaml`` runs the teacher once over the token splits (:func:`write_lm_cache`);
``protege distill lm.yaml`` with ``cache: <path>`` then reads them (:func:`use_lm_cache`) and never
builds the teacher: each batch carries a :class:`~protege.losses.sequence.TopKLogProbs` as the
teacher's ``"logits"``, which every divergence of :mod:`protege.losses.sequence` reads as the stored
tokens plus one bucket holding the rest of the mass.

**What is stored** per trained position (``target != -100``: completion tokens, every packed text
token but a block's last): the teacher's ``top_k`` most likely tokens and their probabilities.

- *Values*, ``levels = Q`` (1..255): ``q = round(Q sqrt(p))`` in one byte. Quantizing ``sqrt(p)``
  uniformly spends the same KL budget on every entry — an error ``dp`` costs ``dp² / p`` in KL, and
  ``dp = 2 sqrt(p) ds`` — whereas a uniform step in ``log p`` wastes bits on the tail. Entries with
  ``q = 0`` (``p < 1 / (4 Q²)``) are not kept: their mass joins the rest bucket. ``levels: null``
  stores every entry's log-probability in fp16 instead.
- *Token ids*, per shard: ranked by how often they occur in the shard's top-k sets (the ranking,
  ``D`` int32, is stored once per shard), each position's ranks sorted and stored as gaps, byte
  plane by byte plane (2 bytes per gap when ``D ≤ 65536``, else 4). Frequent tokens get small
  ranks, so gaps are small and the planes compress well.
- *Rest mass*, per position: ``log(1 - sum p)`` over the kept entries, from the unquantized values, in
  fp16 (two byte planes). Read back, the stored entries are rescaled to exactly that mass: summed over
  ~100 entries, the quantization errors (~1e-3) would swamp a small rest (~1e-5), and the rest bucket
  computed from them alone would be 0 at some positions — harmless to a forward KL (weighted by the
  teacher's rest) but not to a reverse KL, weighted by the student's mass there.
- The counts, gap planes, values and rests of a shard are one LZMA stream (``stream.payload``, uint8,
  with ``stream.layout``). At k = 128 on SmolLM2-135M-Instruct over pydoc_data text this is ~140 bytes
  per token at ``levels: 96`` (DistillKit: ~300; the rest mass adds ~1.5 of them) and changes the top-k
  KL by 0.24% (fp16 values: 268 bytes, no change); see BENCHMARKS.md and ``benchmarks/lm_cache.py``.

Shards hold, per sample, ``tokens`` (int32: its stored positions); :meth:`TeacherCache.open
<protege.engine.cache.TeacherCache.open>` decodes each shard into ``tok.index`` (int32) and
``tok.logp`` (fp16) ``(n_tokens, top_k)`` rows sorted by probability, empty slots at
:data:`~protege.losses.sequence.EMPTY_LOGP`, and ``tok.log_rest`` (float32, ``(n_tokens,)``). The fingerprint's ``teacher`` part hashes the teacher's
model files, its ``data`` part the tokenizer's vocabulary and the token ids of every split;
:meth:`~protege.engine.cache.TeacherCache.check` refuses a cache whose parts changed, and a shard
that is truncated or corrupted is refused on open.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.distiller import TeacherPrecision, check_teacher_precision, teacher_autocast
from ..errors import ProtegeError
from ..files import commit_dir, staged_dir
from ..losses.sequence import EMPTY_LOGP, IGNORE_INDEX, TopKLogProbs
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
    parse_top_k,
)
from .loaders import make_loader
from .topk_codec import encode_topk

if TYPE_CHECKING:
    from ..tasks.base import Task

__all__ = ["CachedLMDataset", "lm_data_part", "write_lm_cache"]

STORAGE = "lm-topk"


# ------------------------------------------------------------------------------ fingerprint


def lm_data_part(data: Any) -> dict[str, Any]:
    """The ``data`` part of an LM cache's fingerprint (module docstring); the ``teacher`` part is
    :func:`protege.caching.teacher_part`, from the run config."""
    vocab = sorted(data.tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if data.tokenizer else []
    splits = {"train": data.train, "val": data.val, "test": data.test}
    detail = {
        "source": data.source,
        "options": data.options,
        "sizes": data.sizes(),
        "vocab_size": data.vocab_size,
        "tokenizer_sha256": hashlib.sha256(repr(vocab).encode()).hexdigest(),
        "tokens_sha256": {name: _tokens_sha256(split) for name, split in splits.items() if split is not None},
    }
    return fingerprint_part(detail)


def _tokens_sha256(split: Any) -> str:
    return hashlib.sha256(
        split.input_ids.numpy().tobytes()
        + split.attention_mask.numpy().tobytes()
        + split.labels.numpy().tobytes()
    ).hexdigest()


# ------------------------------------------------------------------------------ writing


class _TokenShardWriter(_ShardWriter):
    """Shards of samples whose per-token top-k rows are compressed into one stream per shard."""

    def __init__(self, root: Path, split: str, shard_size: int, levels: int | None) -> None:
        super().__init__(root, split, shard_size)
        self.levels = levels

    def add_tokens(self, counts: torch.Tensor, index: torch.Tensor, logp: torch.Tensor) -> None:
        """``counts`` ``(b,)`` stored positions per sample; ``index``/``logp`` ``(counts.sum(), k)``."""
        bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        at = 0
        while at < len(counts):
            take = min(len(counts) - at, self.shard_size - self.count)
            lo, hi = bounds[at], bounds[at + take]
            for name, t in (
                ("tokens", counts[at : at + take]),
                ("tok.index", index[lo:hi]),
                ("tok.logp", logp[lo:hi]),
            ):
                self.buffer.setdefault(name, []).append(t)
            self.count += take
            at += take
            if self.count == self.shard_size:
                self.flush()

    def tensors(self) -> dict[str, torch.Tensor]:
        cat = {k: torch.cat(v) for k, v in self.buffer.items()}
        return {
            "tokens": cat["tokens"].to(torch.int32),
            **encode_topk(cat["tok.index"], cat["tok.logp"], self.levels),
        }


def _trained_positions(target: torch.Tensor) -> torch.Tensor:
    return target != IGNORE_INDEX


@torch.no_grad()
def _lm_pass(
    teacher: nn.Module,
    task: Task,
    dataset: Dataset,
    writer: _TokenShardWriter,
    *,
    k: int,
    batch_size: int,
    device: torch.device,
    precision: TeacherPrecision,
) -> int:
    """Run the teacher over ``dataset``; store the top-k of every trained position. Returns the token count."""
    tokens = 0
    for batch in make_loader(dataset, batch_size, shuffle=False):
        inputs, target = task.split(batch)
        assert target is not None
        keep = _trained_positions(target)
        with teacher_autocast(teacher, precision):
            logits = task.forward(teacher, {key: v.to(device) for key, v in inputs.items()})["logits"]
        rows = logits[keep.to(device)].float().log_softmax(-1)
        top, index = rows.topk(min(k, rows.shape[-1]), dim=-1)
        writer.add_tokens(keep.sum(1).to(torch.int32), index.cpu(), top.cpu())
        tokens += int(keep.sum())
    writer.flush()
    return tokens


def write_lm_cache(
    out: str | Path,
    data: Any,
    teacher: nn.Module,
    *,
    top_k: int | str = 128,
    levels: int | None = 96,
    shard_size: int = 10_000,
    batch_size: int = 8,
    parts: dict[str, dict[str, Any]] | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    teacher_precision: TeacherPrecision = "fp32",
) -> dict[str, Any]:
    """Run the causal-LM ``teacher`` over the token splits of ``data`` and write a cache at ``out``.

    ``data`` is an :class:`~protege.tasks.lm.LMDataSplits`; every split's trained positions are
    stored (the validation and test ones feed the fidelity metrics of a run from the cache). See
    the module docstring for ``top_k`` and ``levels``. ``parts``: the fingerprint's ``teacher`` and
    ``data`` parts (:func:`lm_fingerprint_parts`); without them staleness cannot be checked. Returns
    the index, whose ``train_bytes_per_token`` is the storage cost.

    Raises:
        ProtegeError: ``out`` exists and ``overwrite`` is false; an invalid setting.
    """
    from ..tasks import build_task

    t0 = time.perf_counter()
    out = new_cache_path(out, overwrite)
    k = parse_top_k(top_k)
    vocab = int(data.vocab_size)
    k = vocab if k is None else min(k, vocab)
    if levels is not None and not 1 <= int(levels) <= 255:
        raise ProtegeError(
            f"cache levels must be in 1..255 (one byte per value) or null (fp16), got {levels}"
        )
    if shard_size < 1 or batch_size < 1:
        raise ProtegeError(f"shard_size and batch_size must be ≥ 1 (got {shard_size}, {batch_size})")
    check_teacher_precision(teacher_precision)
    task = build_task("lm")
    settings = {"top_k": k, "levels": levels, "teacher_precision": teacher_precision}
    parts = {**(parts or {}), "settings": fingerprint_part(settings)}
    dev = cache_device(device)
    teacher = teacher.to(dev).eval().requires_grad_(False)
    with staged_dir(out) as tmp:
        splits: dict[str, Any] = {}
        for name in ("train", "val", "test"):
            dataset = getattr(data, name)
            if dataset is None or len(dataset) == 0:
                continue
            writer = _TokenShardWriter(tmp, name, shard_size, levels)
            tokens = _lm_pass(
                teacher,
                task,
                dataset,
                writer,
                k=k,
                batch_size=batch_size,
                device=dev,
                precision=teacher_precision,
            )
            splits[name] = {
                "samples": len(dataset),
                "tokens": tokens,
                "views": 1,
                "storage": STORAGE,
                "shards": writer.shards,
            }
        train = splits["train"]
        train_bytes = sum(s["bytes"] for s in train["shards"])
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "task": "lm",
            "fingerprint": _fingerprint(parts),
            "parts": parts,
            "teachers": 1,
            "num_classes": vocab,
            "top_k": k,
            "levels": levels,
            "dtype": f"sqrt-probability uint8, {levels} levels" if levels else "float16",
            "views": 1,
            "taps": {},
            "splits": splits,
            **_totals(splits, t0),
            "train_bytes_per_token": train_bytes / max(train["tokens"], 1),
        }
        commit_dir(tmp, out, index)
    return index


# ------------------------------------------------------------------------------ reading


class CachedLMDataset(Dataset):
    """A token split whose items carry the cached teacher: ``{..., "meta": {"teacher_outputs":
    [{"logits": TopKLogProbs((L, k) ids, (L, k) log-probs)}]}}``; positions not stored are empty."""

    def __init__(self, cache: TeacherCache, split: str, dataset: Any) -> None:
        info = cache.index["splits"].get(split)
        if info is None:
            raise ProtegeError(
                f"cache {cache.path} has no {split!r} split (it has: {', '.join(cache.splits)})"
            )
        rebuild = (
            "the data changed since the cache was built; rebuild it with `protege cache <config> --overwrite`"
        )
        if len(dataset) != int(info["samples"]):
            raise ProtegeError(
                f"the {split} split has {len(dataset)} samples, its cache {info['samples']}: {rebuild}"
            )
        t = cache.tensors[split]
        self.dataset = dataset
        self.positions = _trained_positions(_next_token_target(dataset.labels))
        counts = t["tokens"].long()
        if not torch.equal(self.positions.sum(1), counts):
            raise ProtegeError(
                f"the {split} split's trained tokens differ from those its cache holds: {rebuild}"
            )
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.index, self.logp, self.log_rest = t["tok.index"], t["tok.logp"], t["tok.log_rest"]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        at = self.positions[i]
        k = self.index.shape[1]
        index = torch.zeros(len(at), k, dtype=torch.long)
        logp = torch.full((len(at), k), EMPTY_LOGP, dtype=torch.float32)
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        index[at] = self.index[lo:hi].long()
        logp[at] = _with_rest(self.logp[lo:hi].float(), self.log_rest[lo:hi])
        item["meta"] = {"teacher_outputs": [{"logits": TopKLogProbs(index, logp)}], "index": i}
        return item


def _with_rest(logp: torch.Tensor, log_rest: torch.Tensor) -> torch.Tensor:
    """Stored rows ``(n, k)`` (float32) rescaled so that their mass is exactly ``1 - rest``: the rest bucket
    the divergences derive from them (``1 - sum p``) is then the teacher's true rest mass, not what the
    quantization errors of ~100 entries leave of it (a reverse KL weighs that bucket by the student's
    mass there and would explode where the quantized entries sum to 1)."""
    stored = logp > EMPTY_LOGP / 2
    covered = torch.logsumexp(logp.masked_fill(~stored, -math.inf), dim=-1)
    shift = torch.log1p(-log_rest.float().exp()) - covered
    return torch.where(stored, logp + shift.nan_to_num(0.0, 0.0, 0.0).unsqueeze(-1), logp)


def _next_token_target(labels: torch.Tensor) -> torch.Tensor:
    from ..tasks.lm import next_token_target

    return next_token_target(labels)
