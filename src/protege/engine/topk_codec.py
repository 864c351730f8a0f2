"""The top-k codec of the LM teacher-output cache: per position, a teacher's most likely tokens and
their probabilities in ~140 bytes (:mod:`protege.engine.lm_cache` says what is stored and why).

:func:`encode_topk` turns ``(N, k)`` token ids and log-probabilities into one LZMA stream;
:func:`decode_topk` and :func:`decode_shard` turn a stored shard back into rows, for
:meth:`protege.engine.cache.TeacherCache.open`.
"""

from __future__ import annotations

import lzma
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ProtegeError
from ..losses.sequence import EMPTY_LOGP

if TYPE_CHECKING:
    pass

__all__ = ["CODEC", "MIN_REST", "decode_shard", "decode_topk", "encode_topk"]

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


# ------------------------------------------------------------------------------ writing


# ------------------------------------------------------------------------------ reading
