"""Teacher-output cache (offline KD): run the teacher once, distill from its stored outputs.

``protege cache run.yaml`` (:func:`protege.caching.build_cache`) runs the run's teacher(s) over the training data
and stores their outputs; ``protege distill run.yaml`` with ``cache: <path>`` in the config then
trains from the cache (:func:`protege.caching.use_cache`) and never loads a teacher.

**Views (augmentation-aware, as FKD).** A random crop of an image is not the crop the teacher saw,
so instead of pretending, every training sample gets ``V`` augmentation parameter sets drawn
once from a seeded generator (crop box, flip, shift, erased box; :mod:`protege.data.views`), the teacher's
outputs are stored for each of those views, and training replays exactly those views: sample
``i`` at epoch ``e`` is view ``(e + offset[i]) % V``, so every ``V`` epochs each view is seen
once. Transforms without randomness have ``V = 1``.

**What is stored.** Per view, by default (``top_k: "all"``, or ``k`` ≥ the number of classes ``C``):
the teacher's full logits, in float32 whatever ``dtype`` says, so a term reads exactly the values
an online run's teacher computes (rounding them to float16 changes KD or DKD by 1e-5 to 7e-4 of
its value, the more the closer the student is to the teacher).
``dtype`` (fp16 by default) applies to the taps, and to the top-``k`` log-probabilities below.
With ``top_k: k < C``: the teacher's top-``k`` log-probabilities ``log p_j = z_j - LSE(z)``
(``dtype``), their class indices (the smallest integer type that holds ``C - 1``) and the
log-sum-exp ``LSE(z)`` of the full logits (fp32) -- a much smaller cache for runs whose terms never
read the teacher's logits (feature terms on taps); optionally named taps (``dtype``). The
validation and test splits are stored with full fp32 logits whatever ``top_k`` says, so fidelity
metrics (agreement, KL) are computed exactly as online.

**Exact or refused.** A term that reads the teacher's logits gets them from the cache only when the
cache holds them whole in float32 (:func:`exact_logits`); it then computes exactly the online
run's loss. No divergence over the full class distribution -- KD at any temperature (T = 1 too),
DKD, standardized KD, DIST, CTKD, multi-teacher KD ... -- can be computed from a top-``k`` cache
(``k < C``): its cross term ``Σ_j p_t(j) log p_s(j)`` needs the teacher's probability of each
of the ``C - k`` classes outside the top-``k``, which are not stored (their total mass, or the
log-sum-exp at some temperature, fixes the teacher's entropy, not this term; spreading the mass
uniformly over them, as older versions did, is an approximation whose error nothing bounds).
So a top-``k`` cache's training split hands the terms its taps and no ``"logits"``, and
:func:`check_cached_logits` (which :func:`protege.caching.use_cache` runs before a distill run
writes anything) refuses a run any of whose terms reads the teacher's logits from it -- or from a
cache an older version built with float16 full logits -- naming the terms, their temperatures and
the rebuild command (``protege cache <config> --top-k all --overwrite``).

**Reduced taps.** A loss may declare a teacher-side reduction (:class:`~protege.losses.TeacherReduction`:
AT needs only the teacher's attention map, ``H*W`` floats, not its ``C*H*W`` feature map). A tap that
only terms with the same reduction and parameters read is stored reduced, computed in fp32 from the
teacher's map and then cast to ``dtype``, under ``t{j}.tap.<path>@<reduction>`` (e.g.
``layer1@attention_map(p=2.0)``), the name the term looks for among the teacher's outputs; the
index's ``reductions`` and the fingerprint's settings record it. A distill run whose terms need
that tap raw, or reduced otherwise (AT with ``p: 4`` against a cache built for ``p: 2``), is
refused, naming the tap, what the cache holds and how to rebuild. ``cache: {reduce: false}``
stores every tap raw (:func:`teacher_reductions` picks the reductions from a run's terms).

**Layout.** A cache is a directory::

    index.json            format version, fingerprint and its parts, settings, per-split shards
    train-00000.safetensors   samples [0, shard_size) of the training split, every view
    train-00001.safetensors   ...
    val-00000.safetensors     validation split (one view, full fp32 logits)
    test-00000.safetensors

Shard tensors (``j`` = teacher): ``params`` int16 (int32 if a value needs it) ``(n, V, P)``
(the view parameters; absent when ``P = 0``), ``t{j}.logp`` ``(n, V, k)``, ``t{j}.index`` ``(n, V, k)``, ``t{j}.lse`` fp32
``(n, V)`` or ``t{j}.logits`` ``(n, V, C)``, and ``t{j}.tap.<path>`` ``(n, V, ...)`` (reduced:
``t{j}.tap.<path>@<reduction>``). The index records each shard's file, sample range, byte size
and SHA-256. A cache is written into a temp directory beside its destination, every file
fsync'ed, then renamed into place: a crash leaves no half cache.

**Fingerprint.** SHA-256 over four parts: ``teacher`` (model names, kwargs, and the SHA-256 of
each weights *file*, so staleness is checked without building a teacher), ``data`` (source,
options, split sizes and a cheap content hash of the raw samples), ``transform`` (the training
transform's replayable steps and the evaluation transforms) and ``settings`` (views, seed,
top-k, dtype, taps and their reductions). A distill run recomputes the first three and refuses a
cache whose parts differ, naming the part and the command to rebuild; shards are checked for presence and size
always and for their SHA-256 when ``verify: sha256`` (the default: SHA-256 runs at about
1.1 GB/s on the project's 2-core CPU box, i.e. ~70 ms for CIFAR-100 with 4 views of full fp32
logits (80 MB), ~47 s for ImageNet-1k with 10 views of them (51 GB, which the reader holds in
memory; top-10: 0.6 s)). The ``settings`` part is not compared: a distill run
uses the views and top-k the cache holds, whatever its config's ``cache:`` asks for building.

**Scope.** Teachers run in fp32 (no autocast) on CUDA when available, or with the run's
``teacher_precision: bf16`` under bfloat16 autocast for the training views (validation and test
outputs, the fidelity reference, stay fp32 as online). A distill run reads the
cache for one student (``student:``; a config with ``students:`` and ``cache:`` is refused);
multi-stage runs (``stages:``) run their teachers online. Cache paths are local directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.distiller import (
    LOGIT_KEYS,
    TeacherPrecision,
    Term,
    check_teacher_precision,
    teacher_autocast,
)
from ..core.fold import fold_batchnorm
from ..core.taps import Taps
from ..data.splits import DataSplits
from ..data.views import Replay, content_hash, replay_for, sample_rng, split_index, view_offsets
from ..errors import ProtegeError
from ..files import commit_dir, digest, staged_dir, write_durable
from ..losses import BoundReduction, LossInfo
from .loaders import EpochShuffleSampler, make_loader
from .loop import console, set_memory_format
from .topk_codec import decode_shard

if TYPE_CHECKING:
    pass

__all__ = [
    "FORMAT_VERSION",
    "CachedTeacherDataset",
    "TeacherCache",
    "TermReads",
    "check_cached_taps",
    "ViewEpochSampler",
    "cache_loader",
    "data_parts",
    "check_cached_logits",
    "describe_temperature",
    "exact_logits",
    "fingerprint_part",
    "index_dtype",
    "teacher_reductions",
    "write_cache",
]

FORMAT = "protege-teacher-cache"
FORMAT_VERSION = 1
INDEX = "index.json"
CHECKED_PARTS = ("teacher", "data", "transform")
MemoryFormat = Literal["auto", "contiguous", "channels_last"]
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------ pure functions


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds class indices ``0 .. num_classes - 1``."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 32768:
        return torch.int16
    return torch.int32


# ---------------------------------------------------------------------------------- fingerprint


def fingerprint_part(detail: Any) -> dict[str, Any]:
    """One fingerprint part: its detail and the detail's SHA-256."""
    return {"sha256": digest(detail), "detail": detail}


def _eval_description(dataset: Any) -> str:
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        return repr(transform)
    return f"{type(dataset).__name__}(shift={getattr(dataset, 'shift', 0)})"


def data_parts(data: DataSplits) -> dict[str, dict[str, Any]]:
    """The ``data`` and ``transform`` parts of a cache's fingerprint (the ``teacher`` part is
    :func:`protege.caching.teacher_part`, from the run config).

    ``data``: the source's own fingerprint (source, options, split sizes, shapes) plus a cheap
    content hash of each split's raw samples (:func:`protege.data.views.content_hash`).
    ``transform``: the training transform's replayable steps and the evaluation transforms.
    """
    splits = {"train": data.train, "val": data.val, "test": data.test}
    data_detail = {
        "source": data.source,
        "options": data.options,
        "sizes": data.sizes(),
        "splits_sha256": data.fingerprint(),
        "content": {k: content_hash(v) for k, v in splits.items() if v is not None},
    }
    transform_detail = {
        "train": replay_for(data.train).description,
        "eval": {k: _eval_description(v) for k, v in splits.items() if v is not None and k != "train"},
    }
    return {"data": fingerprint_part(data_detail), "transform": fingerprint_part(transform_detail)}


def _fingerprint(parts: dict[str, dict[str, Any]]) -> str:
    return digest({k: v["sha256"] for k, v in sorted(parts.items())})


# --------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Accumulates per-batch tensors of one split and writes ``<split>-NNNNN.safetensors`` shards."""

    def __init__(self, root: Path, split: str, shard_size: int) -> None:
        self.root, self.split, self.shard_size = root, split, shard_size
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.count = 0
        self.start = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        n = len(next(iter(tensors.values())))
        at = 0
        while at < n:
            take = min(n - at, self.shard_size - self.count)
            for name, t in tensors.items():
                self.buffer.setdefault(name, []).append(t[at : at + take])
            self.count += take
            at += take
            if self.count == self.shard_size:
                self.flush()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffered samples as the tensors of one shard (a subclass may encode them)."""
        return {k: torch.cat(v) for k, v in self.buffer.items()}

    def flush(self) -> None:
        if not self.count:
            return
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        stop = self.start + self.count
        name = f"{self.split}-{len(self.shards):05d}.safetensors"
        blob = save_tensors(
            tensors, metadata={"split": self.split, "start": str(self.start), "stop": str(stop)}
        )
        write_durable(self.root / name, blob)
        self.shards.append(
            {
                "file": name,
                "start": self.start,
                "stop": stop,
                "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
        )
        self.buffer, self.count, self.start = {}, 0, stop


class _Views(Dataset):
    """Sample ``i`` → its ``V`` drawn views ``(V, ...)`` and their parameters ``(V, P)`` int32."""

    def __init__(self, replay: Replay, views: int, seed: int) -> None:
        self.replay, self.views, self.seed = replay, views, seed

    def __len__(self) -> int:
        return len(self.replay)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw, _ = self.replay.raw(i)
        rng = sample_rng(self.seed, i)
        drawn = [self.replay.draw(raw, rng) for _ in range(self.views)]
        params = torch.tensor([p for p, _ in drawn], dtype=torch.int32).reshape(self.views, -1)
        return torch.stack([x for _, x in drawn]), params


def _inputs_of(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def _teacher_pass(
    teachers: Sequence[nn.Module],
    tap_paths: Sequence[str],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
    writer: _ShardWriter,
    *,
    storage: str,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    tap_shapes: dict[str, list[int]],
    precision: TeacherPrecision = "fp32",
    reductions: Mapping[str, BoundReduction] | None = None,
) -> None:
    """Run every teacher over ``(views (B, V, ...), params (B, V, P) | None)`` batches; store outputs.

    ``precision="bf16"``: each teacher's forward under bfloat16 autocast (see ``teacher_precision``).
    ``reductions``: taps stored reduced (in fp32, then cast), under their reduced names."""
    reductions = reductions or {}
    taps = [Taps(t, tap_paths) for t in teachers]
    try:
        for views, params in batches:
            b, v = views.shape[:2]
            x = views.flatten(0, 1).to(device)
            out: dict[str, torch.Tensor] = {}
            if params is not None and params.shape[-1] > 0:  # int16 where it fits (crop boxes < 32768)
                small = params.numel() == 0 or int(params.abs().max()) < 32768
                out["params"] = params.to(torch.int16 if small else torch.int32)
            for j, (teacher, tap) in enumerate(zip(teachers, taps)):
                with teacher_autocast(teacher, precision):
                    logits = teacher(x)
                if not isinstance(logits, torch.Tensor):
                    logits = logits["logits"] if isinstance(logits, dict) else logits.logits
                logits = logits.float().reshape(b, v, -1).cpu().contiguous()
                if storage == "full":  # float32 whatever ``dtype``: what the online teacher computes
                    out[f"t{j}.logits"] = logits
                else:
                    lse = logits.logsumexp(-1)
                    top, idx = logits.topk(k, dim=-1)
                    out[f"t{j}.logp"] = (top - lse.unsqueeze(-1)).to(dtype)
                    out[f"t{j}.index"] = idx.to(index_dtype(logits.shape[-1]))
                    out[f"t{j}.lse"] = lse
                for path, value in tap.pop().items():
                    if path in reductions:
                        value, path = reductions[path](value.float()), reductions[path].tap_key(path)
                    value = value.reshape(b, v, *value.shape[1:]).to(dtype).cpu().contiguous()
                    tap_shapes[path] = list(value.shape[2:])
                    out[f"t{j}.tap.{path}"] = value
            writer.add(out)
    finally:
        for tap in taps:
            tap.remove()


@contextlib.contextmanager
def _teacher_layout(
    teachers: Sequence[nn.Module], probe: torch.Tensor, memory_format: MemoryFormat, device: torch.device
) -> Iterator[None]:
    """Run the teachers in ``channels_last`` while the cache is written (see :func:`write_cache`),
    then hand them back contiguous. A teacher that fails in that layout on one training image (e.g.
    ``x.view(n, -1)`` over a feature map) runs contiguous with a note, or, when ``channels_last`` was
    asked for explicitly, stops with an error that says what to set."""
    if memory_format not in ("auto", "contiguous", "channels_last"):
        raise ProtegeError(f"memory_format must be auto, contiguous or channels_last, got {memory_format!r}")
    wanted = memory_format == "channels_last" or (memory_format == "auto" and device.type == "cpu")
    if not wanted or not any(p.dim() == 4 for t in teachers for p in t.parameters()):
        yield
        return
    for t in teachers:
        set_memory_format(t, torch.channels_last)
    try:
        x = probe.to(device)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for t in teachers:
                t(x)
    except RuntimeError as e:
        for t in teachers:
            set_memory_format(t, torch.contiguous_format)
        failure = str(e).splitlines()[0] if str(e) else type(e).__name__
        if memory_format == "channels_last":
            raise ProtegeError(
                f"memory_format channels_last: a teacher fails in that layout ({failure}); "
                "set memory_format: auto or contiguous"
            ) from None
        console.print(f"[yellow]note: the cache runs the teachers contiguous; in channels_last: {failure}")
    try:
        yield
    finally:
        for t in teachers:
            set_memory_format(t, torch.contiguous_format)


def _eval_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, None]]:
    for batch in loader:
        yield _inputs_of(batch).unsqueeze(1), None


def new_cache_path(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a path, refused when something is there already and ``overwrite`` is false (checked
    before any teacher runs)."""
    path = Path(out).expanduser()
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ProtegeError(
            f"{path} already exists; pass --overwrite (overwrite=True) to rebuild it, or choose another path"
        )
    return path


def cache_device(device: str | torch.device | None) -> torch.device:
    """Where a cache writer runs the teachers: ``device``, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_cache(
    out: str | Path,
    data: DataSplits,
    teachers: Sequence[nn.Module],
    *,
    views: int = 4,
    top_k: int | str = "all",
    taps: Sequence[str] = (),
    dtype: str = "float16",
    shard_size: int = 10_000,
    seed: int = 0,
    batch_size: int = 512,
    num_workers: int = 0,
    parts: dict[str, dict[str, Any]] | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    teacher_precision: TeacherPrecision = "fp32",
    reductions: Mapping[str, BoundReduction] | None = None,
    fold_teacher_bn: bool = False,
    memory_format: MemoryFormat = "auto",
) -> dict[str, Any]:
    """Run ``teachers`` over ``data`` and write a cache directory at ``out``; return its index.

    The Python API under :func:`build_cache` (which takes a run config): use it with your own
    :class:`~protege.data.DataSplits` and teacher modules. ``views`` is forced to 1 when the
    training transform draws nothing. ``top_k="all"`` (the default) stores the full logits in
    float32, which every term reads exactly; an integer ``k`` below the number of classes stores
    the top-``k`` log-probabilities in ``dtype``, which no term reading the teacher's logits may
    use (see the module docs: for runs whose terms read only taps). ``dtype`` is the storage of
    the taps (and of top-``k`` log-probabilities), never of full logits. ``parts`` are the
    fingerprint parts (``teacher``, ``data``, ``transform``; see :func:`fingerprint_parts`);
    without them only the settings are fingerprinted and :func:`use_cache` cannot check
    staleness. ``teacher_precision="bf16"`` runs the teachers under bfloat16 autocast over the
    training views (as a distill run's ``teacher_precision``); validation and test outputs stay
    fp32. ``reductions``: taps (among ``taps``) to store reduced, ``{path: reduction}``, e.g.
    :func:`teacher_reductions` of the terms that will read the cache (see the module docs).

    How the teachers run (outputs equal up to float summation order, as in a distill run):
    ``fold_teacher_bn`` folds their BatchNorms into the preceding convolutions in place (the taps
    kept, see :func:`protege.core.fold.fold_batchnorm`; :func:`build_cache` does, as a distill run
    does); ``memory_format`` ``"auto"`` runs them in ``channels_last`` on a CPU (``"channels_last"``
    everywhere, ``"contiguous"`` never) and hands them back contiguous; a teacher that fails in that
    layout runs contiguous, with a note (an error when ``"channels_last"`` was asked for).

    Raises:
        ProtegeError: ``out`` exists and ``overwrite`` is false; a setting is invalid; the training
            transform has no replayable form.
    """
    t0 = time.perf_counter()
    out = new_cache_path(out, overwrite)
    if dtype not in _DTYPES:
        raise ProtegeError(f"cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if views < 1 or shard_size < 1 or batch_size < 1:
        raise ProtegeError(
            f"views, shard_size and batch_size must be ≥ 1 (got {views}, {shard_size}, {batch_size})"
        )
    if not teachers:
        raise ProtegeError("a teacher-output cache needs at least one teacher (teacher: in the config)")
    check_teacher_precision(teacher_precision)
    reductions = dict(reductions or {})
    if set(reductions) - set(taps):
        raise ProtegeError(
            f"reductions name taps that are not stored: {', '.join(sorted(set(reductions) - set(taps)))} "
            f"(taps: {', '.join(taps) or 'none'})"
        )
    replay = replay_for(data.train)
    views = views if replay.random else 1
    num_classes = int(data.num_classes)
    k = parse_top_k(top_k)
    storage = "full" if k is None or k >= num_classes else "topk"
    k = num_classes if storage == "full" else k
    settings = {
        "views": views,
        "seed": int(seed),
        "top_k": "all" if storage == "full" else k,
        "dtype": dtype,
        "taps": list(taps),
        "reductions": {path: r.describe() for path, r in sorted(reductions.items())},
        "teacher_precision": teacher_precision,
    }
    parts = dict(parts or {})
    parts["settings"] = fingerprint_part(settings)
    dev = cache_device(device)
    moved = [t.to(dev).eval() for t in teachers]
    for t in moved:
        t.requires_grad_(False)
    for path in taps:  # unknown paths fail here, before anything is written
        Taps(moved[0], [path]).remove()
    if fold_teacher_bn:
        for t in moved:
            fold_batchnorm(t, keep=taps)
    per_step = max(1, batch_size // views)
    loader = DataLoader(_Views(replay, views, seed), batch_size=per_step, num_workers=num_workers)

    probe = _Views(replay, 1, seed)[0][0]  # one training image, (1, ...): tries the layout
    with _teacher_layout(moved, probe, memory_format, dev), staged_dir(out) as tmp:
        tap_shapes: dict[str, list[int]] = {}
        writer = _ShardWriter(tmp, "train", shard_size)
        common = {"k": k, "device": dev, "tap_shapes": tap_shapes}
        _teacher_pass(
            moved,
            list(taps),
            iter(loader),
            writer,
            storage=storage,
            dtype=_DTYPES[dtype],
            precision=teacher_precision,
            reductions=reductions,
            **common,
        )
        writer.flush()
        splits: dict[str, Any] = {
            "train": {
                "samples": len(replay),
                "views": views,
                "storage": storage,
                "dtype": dtype,  # of the taps and the top-k log-probabilities
                **({"logits_dtype": "float32"} if storage == "full" else {}),
                "shards": writer.shards,
            }
        }
        for name in ("val", "test"):
            dataset = getattr(data, name)
            if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
                continue
            eval_loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
            w = _ShardWriter(tmp, name, shard_size)
            _teacher_pass(
                moved, [], _eval_batches(eval_loader), w, storage="full", dtype=torch.float32, **common
            )
            w.flush()
            splits[name] = {
                "samples": len(dataset),  # type: ignore[arg-type]
                "views": 1,
                "storage": "full",
                "dtype": "float32",
                "logits_dtype": "float32",
                "shards": w.shards,
            }
        train_bytes = sum(s["bytes"] for s in splits["train"]["shards"])
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": _fingerprint(parts),
            "parts": parts,
            "teachers": len(moved),
            "num_classes": num_classes,
            "top_k": settings["top_k"],
            "dtype": dtype,
            "index_dtype": str(index_dtype(num_classes)).removeprefix("torch."),
            "views": views,
            "view_seed": int(seed),
            "view_params": list(replay.names),
            "view_rule": "sample i, epoch e: view (e + offset[i]) % views; offsets = "
            "protege.data.views.view_offsets(n, views, run seed); parameters drawn with "
            "protege.data.views.sample_rng(view_seed, i), stored in the shards as 'params'",
            "taps": tap_shapes,
            "reductions": {
                path: {**r.describe(), "key": r.tap_key(path)} for path, r in sorted(reductions.items())
            },
            "splits": splits,
            **_totals(splits, t0),
            "train_bytes_per_sample": train_bytes / max(len(replay), 1),
        }
        commit_dir(tmp, out, index)
    return index


def _totals(splits: dict[str, Any], t0: float) -> dict[str, Any]:
    """The index's size and build-time fields."""
    return {
        "bytes": sum(s["bytes"] for sp in splits.values() for s in sp["shards"]),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_top_k(top_k: int | str | None) -> int | None:
    """``None`` for all classes, else a positive int."""
    if top_k is None or (isinstance(top_k, str) and top_k.strip().lower() == "all"):
        return None
    try:
        k = int(top_k)
        if k != float(top_k):
            raise ValueError
    except (TypeError, ValueError):
        raise ProtegeError(f"top_k must be a positive integer or 'all', got {top_k!r}") from None
    if k < 1:
        raise ProtegeError(f"top_k must be a positive integer or 'all', got {k}")
    return k


# --------------------------------------------------------------------------------------- reading


class TeacherCache:
    """An opened, verified cache: its index and its tensors per split.

    Use :meth:`open`; :meth:`check` compares its fingerprint with a run's; :meth:`dataset` makes
    the dataset a distill run trains or evaluates on.
    """

    def __init__(
        self, path: Path, index: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]
    ) -> None:
        self.path = path
        self.index = index
        self.tensors = tensors

    @property
    def views(self) -> int:
        return int(self.index["views"])

    @property
    def num_classes(self) -> int:
        return int(self.index["num_classes"])

    @property
    def teachers(self) -> int:
        return int(self.index["teachers"])

    @property
    def taps(self) -> list[str]:
        return list(self.index.get("taps", {}))

    @property
    def splits(self) -> list[str]:
        return list(self.index["splits"])

    @classmethod
    def open(cls, path: str | Path, verify: str = "sha256") -> TeacherCache:
        """Read and verify a cache directory.

        Args:
            path: the cache directory.
            verify: ``"sha256"`` checks every shard's size and SHA-256; ``"size"`` only sizes.

        Raises:
            ProtegeError: no cache there, an unknown format version, or a shard that is missing,
                truncated or corrupted (the message names the shard).
        """
        if verify not in ("sha256", "size"):
            raise ProtegeError(f"cache verify must be 'sha256' or 'size', got {verify!r}")
        path = Path(path).expanduser()
        rebuild = "rebuild it with `protege cache <config> --overwrite`"
        index_path = path / INDEX
        if not index_path.is_file():
            what = "does not exist" if not path.exists() else f"has no {INDEX}"
            raise ProtegeError(
                f"teacher-output cache {path} {what}: build it with `protege cache <config>` "
                "(or fix the config's cache.path)"
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise ProtegeError(f"{index_path} is corrupted ({e}); {rebuild}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ProtegeError(f"{path} is not a protege teacher-output cache ({INDEX} has no format tag)")
        if index.get("version") != FORMAT_VERSION:
            raise ProtegeError(
                f"cache {path} has format version {index.get('version')}, this protege reads version "
                f"{FORMAT_VERSION}; {rebuild}"
            )
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for split, info in index["splits"].items():
            parts: dict[str, list[torch.Tensor]] = {}
            expected_start = 0
            for shard in info["shards"]:
                file = path / shard["file"]
                where = f"cache shard {file}"
                if not file.is_file():
                    raise ProtegeError(f"{where} is missing; {rebuild}")
                size = file.stat().st_size
                if size != shard["bytes"]:
                    state = "truncated" if size < shard["bytes"] else "corrupted"
                    raise ProtegeError(
                        f"{where} is {state}: {size} bytes, expected {shard['bytes']}; {rebuild}"
                    )
                blob = file.read_bytes()
                if verify == "sha256" and hashlib.sha256(blob).hexdigest() != shard["sha256"]:
                    raise ProtegeError(f"{where} is corrupted (SHA-256 mismatch); {rebuild}")
                try:
                    loaded = load_tensors(blob)
                    if info.get("storage") == "lm-topk":  # one compressed top-k stream per shard
                        loaded = decode_shard(loaded)
                except Exception as e:  # a damaged header or stream that the size check could not see
                    raise ProtegeError(f"{where} is corrupted ({type(e).__name__}: {e}); {rebuild}") from None
                n = shard["stop"] - shard["start"]
                # per-token rows ("tok.*") follow the samples' token counts, everything else the samples
                tokens = int(loaded["tokens"].sum()) if "tokens" in loaded else 0
                if shard["start"] != expected_start or any(
                    len(t) != (tokens if name.startswith("tok.") else n) for name, t in loaded.items()
                ):
                    raise ProtegeError(
                        f"{where} does not hold samples {shard['start']}..{shard['stop']}; {rebuild}"
                    )
                expected_start = shard["stop"]
                for name, t in loaded.items():
                    parts.setdefault(name, []).append(t)
            if expected_start != info["samples"]:
                raise ProtegeError(
                    f"cache {path}: the {split} shards hold {expected_start} samples, the index says "
                    f"{info['samples']}; {rebuild}"
                )
            tensors[split] = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}
        return cls(path, index, tensors)

    def check(self, expected: dict[str, dict[str, Any]]) -> None:
        """Refuse the cache if a fingerprint part differs from ``expected`` (see :func:`fingerprint_parts`).

        Raises:
            ProtegeError: naming each changed part and how to rebuild.
        """
        stored = self.index.get("parts", {})
        changed = []
        for name in CHECKED_PARTS:
            if name not in expected:
                continue
            if name not in stored:
                changed.append(f"{name}: the cache was built without a {name} fingerprint")
            elif stored[name]["sha256"] != expected[name]["sha256"]:
                changed.append(
                    f"{name}: {_what_changed(name, stored[name]['detail'], expected[name]['detail'])}"
                )
        if changed:
            lines = "\n  ".join(changed)
            raise ProtegeError(
                f"teacher-output cache {self.path} is stale; it no longer matches this run:\n  {lines}\n"
                "Rebuild it with `protege cache <config> --overwrite` (or point cache.path elsewhere)."
            )

    def dataset(self, split: str, dataset: Any, seed: int = 0) -> CachedTeacherDataset:
        """The dataset a distill run reads: ``dataset``'s samples with the cached teacher outputs."""
        return CachedTeacherDataset(self, split, dataset, seed=seed)


def _what_changed(part: str, old: Any, new: Any) -> str:
    """One line naming what differs between two fingerprint details."""
    if part == "teacher" and isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"the run has {len(new)} teacher(s), the cache {len(old)}"
        for i, (a, b) in enumerate(zip(old, new)):
            if a.get("model") != b.get("model") or a.get("kwargs") != b.get("kwargs"):
                return f"teacher {i} is now {b.get('model')!r} {b.get('kwargs') or ''}, the cache has {a.get('model')!r}"
            if a.get("model_files_sha256") != b.get("model_files_sha256"):
                changed = sorted(
                    set(a.get("model_files_sha256") or {}) ^ set(b.get("model_files_sha256") or {})
                    | {
                        f
                        for f, h in (b.get("model_files_sha256") or {}).items()
                        if (a.get("model_files_sha256") or {}).get(f) != h
                    }
                )
                return f"teacher {i}'s model files changed ({', '.join(Path(f).name for f in changed[:3])})"
            if a.get("weights_sha256") != b.get("weights_sha256") or a.get("weights") != b.get("weights"):
                return (
                    f"teacher {i}'s weights changed ({b.get('weights') or 'random init'}: sha256 "
                    f"{str(b.get('weights_sha256'))[:12]}…, the cache was built from "
                    f"{a.get('weights') or 'random init'}: {str(a.get('weights_sha256'))[:12]}…)"
                )
        return "the teacher's random initialisation (seed or student) changed"
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if keys:
            return f"{', '.join(keys)} changed (now {_short(new.get(keys[0]))}, cached {_short(old.get(keys[0]))})"
    return "changed"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CachedTeacherDataset(Dataset):
    """A split's samples with their cached teacher outputs: ``(x, y, {"teacher_outputs": [...], "index": i})``.

    ``teacher_outputs`` holds one dict per teacher with ``"logits"`` (float32 ``(C,)``, the
    teacher's own) when the split holds them exactly (:func:`exact_logits`: whole, in float32;
    a top-``k`` split has none, see :func:`check_cached_logits`) and the cached taps (float32; a
    reduced tap under its reduced name, ``<path>@<reduction>``, which the terms look for). On the
    training split, sample ``i`` at epoch ``e`` is the stored view ``(e + offset[i]) % V``,
    replayed exactly; the epoch comes in the index (``e * n + i``, as :class:`ViewEpochSampler`
    yields them) or from :meth:`set_epoch` for plain indices. Evaluation splits are the dataset's own items (one view).
    """

    def __init__(self, cache: TeacherCache, split: str, dataset: Any, seed: int = 0) -> None:
        if split not in cache.index["splits"]:
            raise ProtegeError(
                f"cache {cache.path} has no {split!r} split (it has: {', '.join(cache.splits)})"
            )
        info = cache.index["splits"][split]
        self.cache, self.split, self.dataset = cache, split, dataset
        self.n = int(info["samples"])
        if len(dataset) != self.n:
            raise ProtegeError(
                f"the {split} split has {len(dataset)} samples, its cache {self.n}: the data changed; "
                "rebuild the cache with `protege cache <config> --overwrite`"
            )
        self.views = int(info["views"])
        self.num_classes = cache.num_classes
        t = cache.tensors[split]
        exact = exact_logits(info)
        self.teachers = [
            {
                "logits": t.get(f"t{j}.logits") if exact else None,
                "taps": {k.split(".tap.", 1)[1]: v for k, v in t.items() if k.startswith(f"t{j}.tap.")},
            }
            for j in range(cache.teachers)
        ]
        self.replay: Replay | None = None
        self.params: torch.Tensor | None = None
        if split == "train":
            self.replay = replay_for(dataset)
            names = list(cache.index["view_params"])
            if list(self.replay.names) != names:
                raise ProtegeError(
                    f"the training transform draws {list(self.replay.names)}, the cache stored views with "
                    f"{names}: rebuild the cache with `protege cache <config> --overwrite`"
                )
            self.params = t.get("params", torch.zeros(self.n, self.views, 0)).to(torch.int32)
        self.offsets = view_offsets(self.n, self.views, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch plain indices ``i < n`` are read at."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def view_of(self, epoch: int, i: int) -> int:
        return int((epoch + self.offsets[i]) % self.views)

    def teacher_outputs(self, i: int, v: int) -> list[dict[str, torch.Tensor]]:
        """The cached outputs of every teacher for sample ``i``, view ``v``."""
        outs = []
        for t in self.teachers:
            out = {} if t["logits"] is None else {"logits": t["logits"][i, v].float()}
            outs.append({**out, **{k: x[i, v].float() for k, x in t["taps"].items()}})
        return outs

    def _sample(self, index: int) -> tuple[Any, Any, int, int]:
        epoch, i = split_index(index, self.n, self.epoch)
        if self.replay is None:
            x, y = self.dataset[i][:2]
            return x, y, i, 0
        v = self.view_of(epoch, i)
        raw, y = self.replay.raw(i)
        assert self.params is not None
        return self.replay.apply(raw, self.params[i, v].tolist()), y, i, v

    def __getitem__(self, index: int) -> tuple[Any, Any, dict[str, Any]]:
        x, y, i, v = self._sample(index)
        return x, y, {"teacher_outputs": self.teacher_outputs(i, v), "index": i}

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any, dict[str, Any]]]:
        """A batch of items (what ``DataLoader`` fetches): the teachers' outputs are gathered for
        the whole batch at once."""
        if self.replay is None:
            samples = [self._sample(index) for index in indices]
            i = torch.tensor([s[2] for s in samples])
            v = torch.tensor([s[3] for s in samples])
            xs: Sequence[Any] = [s[0] for s in samples]
            ys = [s[1] for s in samples]
        else:
            pairs = [split_index(index, self.n, self.epoch) for index in indices]
            i = torch.tensor([p[1] for p in pairs])
            v = torch.tensor([self.view_of(e, k) for e, k in pairs])
            assert self.params is not None
            xs, ys = zip(*self.replay.views(i.tolist(), self.params[i, v]))
        per_teacher = []
        for t in self.teachers:
            outs = {} if t["logits"] is None else {"logits": t["logits"][i, v].float()}
            outs.update({k: x[i, v].float() for k, x in t["taps"].items()})
            per_teacher.append(outs)
        return [
            (
                x,
                y,
                {
                    "teacher_outputs": [{k: out[r] for k, out in outs.items()} for outs in per_teacher],
                    "index": idx,
                },
            )
            for r, (x, y, idx) in enumerate(zip(xs, ys, i.tolist()))
        ]


class ViewEpochSampler(EpochShuffleSampler):
    """:class:`~protege.engine.loaders.EpochShuffleSampler`'s permutation, with each index ``i``
    yielded as ``epoch * n + i`` so that a :class:`CachedTeacherDataset` knows the epoch even in
    worker processes and under distributed sharding (the same batch order as ``make_loader``)."""

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.n
        return (offset + i for i in super().__iter__())


def cache_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """:func:`~protege.engine.loaders.make_loader` for a :class:`CachedTeacherDataset`: the training
    loader passes the epoch to the dataset through :class:`ViewEpochSampler`."""
    return make_loader(
        dataset, batch_size, shuffle, seed, num_workers, drop_last, sampler_cls=ViewEpochSampler
    )


# ------------------------------------------------------------------------------- distill runs


@dataclasses.dataclass(frozen=True)
class TermReads:
    """What a term reads from the teachers: its taps (logits excluded), the reduction it reads them
    through, whether it reads the teacher's logits, and its temperature (:func:`describe_temperature`)."""

    name: str
    taps: list[str]
    reduction: BoundReduction | None
    logits: bool = False
    temperature: str = "no temperature"


def describe_temperature(info: LossInfo, params: Mapping[str, Any]) -> str:
    """A term's temperature in words: ``"T = 4"`` (its ``T``), ``"T = 4, kd's default"``, ``"a
    learned temperature"`` (CTKD) or ``"no temperature"``."""
    if "T" in params:
        return f"T = {params['T']:g}" if isinstance(params["T"], (int, float)) else f"T = {params['T']}"
    if "T" in info.params:
        return f"T = {info.params['T']:g}, {info.name}'s default"
    if "init_T" in info.state_params:
        return "a learned temperature"
    return "no temperature"


def _reads(term: Term | TermReads) -> TermReads:
    if isinstance(term, TermReads):
        return term
    keys = [term.teacher_key] if isinstance(term.teacher_key, str) else list(term.teacher_key)
    return TermReads(
        term.name,
        term.taps[1],
        term.reduction,
        logits=term.uses_teacher and any(k in LOGIT_KEYS for k in keys),
        temperature=describe_temperature(term.info, term.params),
    )


def exact_logits(split: Mapping[str, Any]) -> bool:
    """Whether a cache split (its entry in the index's ``splits``) holds the teachers' logits exactly:
    whole (not top-k) and in float32. Caches built before the logits were always float32 recorded
    their storage dtype as the split's ``dtype``."""
    return split.get("storage") == "full" and split.get("logits_dtype", split.get("dtype")) == "float32"


def check_cached_logits(terms: Sequence[Term | TermReads], cache: TeacherCache) -> None:
    """Refuse a cache from which a term that reads the teachers' logits would not get them exactly:
    one that holds only their top-``k`` classes (``k < C``; no divergence over the classes can be
    computed from them, see the module docs), or full logits stored in less than float32 (by an
    older protege). The message names the terms, their temperatures and the rebuild command.

    Raises:
        ProtegeError: as above.
    """
    readers = [t for t in map(_reads, terms) if t.logits]
    train = cache.index["splits"]["train"]
    if not readers or exact_logits(train):
        return
    named = ", ".join(f"{t.name!r} ({t.temperature})" for t in readers)
    who = f"term {named} reads" if len(readers) == 1 else f"terms {named} read"
    c = cache.num_classes
    fix = (
        "Rebuild the cache with the full logits, stored in float32, from which every term reading "
        "them computes exactly its online loss: `protege cache <config> --top-k all --overwrite` (or "
        "set `cache: {top_k: all}` in the config)."
    )
    if train.get("storage") != "full":
        k = cache.index.get("top_k")
        raise ProtegeError(
            f"{who} the teacher's logits, but cache {cache.path} holds only the teacher's top-{k} of "
            f"{c} classes per view, from which no loss over the teacher's class distribution is exact, "
            f"at any temperature: it needs the teacher's logit of each of the other {c - k} classes, "
            "which a top-k cache does not keep (their total probability does not tell how it splits "
            f"among them), and filling them in (e.g. uniformly) changes the loss by an amount nothing "
            f"bounds. {fix}"
        )
    dtype = train.get("logits_dtype", train.get("dtype"))
    raise ProtegeError(
        f"{who} the teacher's logits, but cache {cache.path} (built by an older protege) holds them in "
        f"{dtype}, whose rounding changes the loss by up to ~1e-3 of its value (the closer the student is "
        f"to the teacher, the more). {fix}"
    )


def teacher_reductions(terms: Sequence[Term | TermReads]) -> dict[str, BoundReduction]:
    """The teacher taps a cache may store reduced, ``{path: reduction}``: those that every term
    reading them reads through the same reduction (the same loss reduction and parameters; see
    :class:`~protege.losses.TeacherReduction`). A tap some term reads raw is not among them."""
    forms: dict[str, set[str | None]] = {}
    bound: dict[str, BoundReduction] = {}
    for term in map(_reads, terms):
        for path in term.taps:
            forms.setdefault(path, set()).add(term.reduction.key if term.reduction is not None else None)
            if term.reduction is not None:
                bound[path] = term.reduction
    return {path: bound[path] for path, keys in forms.items() if len(keys) == 1 and None not in keys}


def check_cached_taps(terms: Sequence[TermReads], cache: TeacherCache) -> None:
    """Refuse a cache that lacks a teacher tap the terms read, or holds it in another form (reduced
    where a term needs it raw, or reduced with another reduction or parameters)."""
    held = set(cache.taps)
    reduced = {path: info["key"] for path, info in cache.index.get("reductions", {}).items()}
    rebuild = "rebuild the cache with `protege cache <config> --overwrite`"
    missing: list[str] = []
    for term in terms:
        for path in term.taps:
            if path in held or (term.reduction is not None and term.reduction.tap_key(path) in held):
                continue
            if path not in reduced:
                if path not in missing:
                    missing.append(path)
                continue
            wanted = f"reduced to {term.reduction.key}" if term.reduction is not None else "raw"
            raise ProtegeError(
                f"term {term.name!r} reads teacher tap {path!r} {wanted}, but cache {cache.path} holds it "
                f"only as {reduced[path]} (built for other terms); {rebuild}: it stores each tap as this "
                "config's terms read it (`cache: {reduce: false}` stores raw maps, which every term can read)"
            )
    if missing:
        raise ProtegeError(
            f"terms read the teacher taps {', '.join(missing)}, which cache {cache.path} does not hold "
            f"(it has: {', '.join(cache.taps) or 'logits only'}); add them to cache.taps and rebuild with "
            "`protege cache <config> --overwrite`"
        )
