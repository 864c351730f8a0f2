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

import dataclasses
import hashlib
import lzma
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.distiller import TeacherPrecision, check_teacher_precision, teacher_autocast
from ..errors import ProtegeError
from ..losses.sequence import EMPTY_LOGP, IGNORE_INDEX, TopKLogProbs
from .cache import (
    FORMAT,
    FORMAT_VERSION,
    TeacherCache,
    _commit,
    _fingerprint,
    _parse_top_k,
    _part,
    _ShardWriter,
    _staged,
    _totals,
    teacher_part,
)
from .loaders import make_loader

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..tasks.base import Task

__all__ = [
    "CachedLMDataset",
    "decode_topk",
    "encode_topk",
    "lm_fingerprint_parts",
    "use_lm_cache",
    "write_lm_cache",
]

STORAGE = "lm-topk"
#: version of the top-k stream (2: with each position's rest mass), the last entry of its layout
CODEC = 2
#: the smallest rest mass stored (its log must fit in fp16); a smaller one is stored as this
MIN_REST = 1e-30


# ------------------------------------------------------------------------------ the codec


def encode_topk(index: torch.Tensor, logp: torch.Tensor, levels: int | None) -> dict[str, torch.Tensor]:
    """Compress ``(N, k)`` top-k token ids and their log-probabilities (module docstring).

    Returns ``{"stream.payload": uint8 (B,), "stream.layout": int64 [D, entries, id_bytes, levels, k, N,
    CODEC]}``, which :func:`decode_topk` turns back into the rows.
    """
    if index.shape != logp.shape or index.dim() != 2:
        raise ValueError(
            f"expected (N, k) ids and log-probabilities, got {tuple(index.shape)}, {tuple(logp.shape)}"
        )
    if levels is not None and not 1 <= levels <= 255:
        raise ProtegeError(f"cache levels must be in 1..255 (one byte per value) or null, got {levels}")
    ids = index.numpy().astype(np.int64)
    lp = logp.float().numpy()
    n, k = ids.shape
    if levels:
        values: np.ndarray = np.rint(np.sqrt(np.exp(lp)) * levels).clip(0, levels).astype(np.uint8)
        keep = values > 0
    else:
        values = lp.astype(np.float16)
        keep = np.ones_like(ids, dtype=bool)
    counts = keep.sum(1).astype(np.uint16)
    # the mass outside the kept entries, from the unquantized values: quantization errors summed over
    # ~100 entries (~1e-3) exceed a small rest (~1e-5), which the rows alone would then give as 0
    rest = 1.0 - np.where(keep, np.exp(lp.astype(np.float64)), 0.0).sum(1)
    log_rest = np.log(np.clip(rest, MIN_REST, 1.0))
    freq = np.bincount(ids[keep], minlength=int(ids.max(initial=0)) + 1)
    vocab = np.lexsort((np.arange(len(freq)), -freq))[: int((freq > 0).sum())]  # by count, then id
    rank = np.zeros(len(freq), dtype=np.int64)
    rank[vocab] = np.arange(len(vocab))
    ranks = np.where(keep, rank[ids], np.iinfo(np.int64).max)
    order = np.argsort(ranks, axis=1, kind="stable")  # kept entries first, by rank
    ranks, values = np.take_along_axis(ranks, order, 1), np.take_along_axis(values, order, 1)
    filled = np.arange(k)[None, :] < counts[:, None].astype(np.int64)
    gaps = (np.diff(np.where(filled, ranks, 0), axis=1, prepend=-1) - 1)[filled].astype(np.uint32)
    id_bytes = 2 if len(vocab) <= 1 << 16 else 4
    planes = [((gaps >> (8 * b)) & 0xFF).astype(np.uint8).tobytes() for b in range(id_bytes)]
    kept = values[filled]
    value_bytes = _fp16_planes(kept) if not levels else [kept.tobytes()]
    raw = b"".join(
        [vocab.astype(np.int32).tobytes(), counts.tobytes(), *planes, *value_bytes, *_fp16_planes(log_rest)]
    )
    payload = lzma.compress(raw, preset=9)
    layout = [len(vocab), int(len(gaps)), id_bytes, int(levels or 0), k, n, CODEC]
    return {
        "stream.payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        "stream.layout": torch.tensor(layout, dtype=torch.int64),
    }


def decode_topk(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`encode_topk`'s output → ``(N, k)`` int32 ids and fp16 log-probabilities, each row sorted by
    probability (most likely first), empty slots ``id 0, EMPTY_LOGP``, and the ``(N,)`` float32
    log of each row's rest mass (outside its stored entries, measured before quantization).

    Raises:
        ValueError: the stream does not decode to the sizes its layout gives (a damaged shard), or it
            was written by an earlier codec, which stored no rest mass.
    """
    layout = [int(v) for v in tensors["stream.layout"].tolist()]
    if len(layout) != 7 or layout[6] != CODEC:
        raise ValueError(
            "the top-k stream was written by an earlier protege, which did not store the rest mass that "
            "the divergences need"
        )
    d, entries, id_bytes, levels, k, n, _ = layout
    raw = lzma.decompress(tensors["stream.payload"].numpy().tobytes())
    value_size = 1 if levels else 2
    expected = 4 * d + 2 * n + id_bytes * entries + value_size * entries + 2 * n
    if len(raw) != expected:
        raise ValueError(f"the top-k stream holds {len(raw)} bytes, its layout says {expected}")
    at = 0

    def take(count: int, dtype: Any) -> np.ndarray:
        nonlocal at
        size = count * np.dtype(dtype).itemsize
        out = np.frombuffer(raw, dtype=dtype, count=count, offset=at)
        at += size
        return out

    vocab = take(d, np.int32)
    counts = take(n, np.uint16).astype(np.int64)
    gaps = np.zeros(entries, dtype=np.int64)
    for b in range(id_bytes):
        gaps |= take(entries, np.uint8).astype(np.int64) << (8 * b)
    if levels:
        q = take(entries, np.uint8).astype(np.float32)
        values = (2.0 * np.log(q / levels)).astype(np.float16)
    else:
        values = _take_fp16(take, entries)
    log_rest = _take_fp16(take, n).astype(np.float32)
    filled = np.arange(k)[None, :] < counts[:, None]
    rank_rows = np.zeros((n, k), dtype=np.int64)
    rank_rows[filled] = gaps + 1
    rank_rows = np.cumsum(rank_rows, axis=1) - 1  # gaps → ranks (each row restarts at -1)
    ids = np.where(filled, vocab[rank_rows.clip(0, max(d - 1, 0))] if d else 0, 0).astype(np.int32)
    logp = np.full((n, k), EMPTY_LOGP, dtype=np.float16)
    logp[filled] = values
    order = np.argsort(-logp.astype(np.float32), axis=1, kind="stable")
    return (
        torch.from_numpy(np.take_along_axis(ids, order, 1).copy()),
        torch.from_numpy(np.take_along_axis(logp, order, 1).copy()),
        torch.from_numpy(log_rest.copy()),
    )


def _fp16_planes(values: np.ndarray) -> list[bytes]:
    """fp16 values as two byte planes, high bytes first: the high bytes (sign, exponent) repeat a lot."""
    bits = values.astype(np.float16).view(np.uint16)
    return [(bits >> 8).astype(np.uint8).tobytes(), (bits & 0xFF).astype(np.uint8).tobytes()]


def _take_fp16(take: Any, count: int) -> np.ndarray:
    hi, lo = take(count, np.uint8).astype(np.uint16), take(count, np.uint8).astype(np.uint16)
    return ((hi << 8) | lo).view(np.float16)


def decode_shard(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard's stored tensors → ``tokens`` and the decoded ``tok.index`` / ``tok.logp`` rows."""
    index, logp, log_rest = decode_topk(tensors)
    return {"tokens": tensors["tokens"], "tok.index": index, "tok.logp": logp, "tok.log_rest": log_rest}


# ------------------------------------------------------------------------------ fingerprint


def lm_fingerprint_parts(cfg: RunConfig, data: Any) -> dict[str, dict[str, Any]]:
    """The ``teacher`` and ``data`` parts of an LM cache's fingerprint (module docstring)."""
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
    return {"teacher": teacher_part(cfg), "data": _part(detail)}


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
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ProtegeError(
            f"{out} already exists; pass --overwrite (overwrite=True) to rebuild it, or choose another path"
        )
    k = _parse_top_k(top_k)
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
    parts = {**(parts or {}), "settings": _part(settings)}
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    teacher = teacher.to(dev).eval().requires_grad_(False)
    with _staged(out) as tmp:
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
        _commit(tmp, out, index)
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


def use_lm_cache(cfg: RunConfig, data: Any) -> tuple[Any, TeacherCache]:
    """Open and verify ``cfg.cache`` for an lm distill run; return the splits that carry the teacher.

    Raises:
        ProtegeError: no cache, a stale one (the teacher's files, the tokenizer or the tokens
            changed), a damaged shard, or a cache of another task.
    """
    settings = cfg.cache
    assert settings is not None
    cache = TeacherCache.open(settings.path, verify=settings.verify)
    if cache.index.get("task") != "lm":
        raise ProtegeError(
            f"cache {cache.path} holds a classification teacher's outputs, this is an lm run: rebuild it with "
            "`protege cache <config> --overwrite`"
        )
    cache.check(lm_fingerprint_parts(cfg, data))
    if len(cfg.all_teachers()) != 1:
        raise ProtegeError(
            "an lm teacher-output cache holds one teacher's outputs; the run must have one teacher"
        )
    splits = dataclasses.replace(
        data,
        **{
            name: CachedLMDataset(cache, name, getattr(data, name))
            for name in ("train", "val", "test")
            if getattr(data, name) is not None and name in cache.splits
        },
    )
    return splits, cache
