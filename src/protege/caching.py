"""Teacher-output caches of a run config: build one (``protege cache run.yaml``), open one for a run.

The format, the writer and the reader are :mod:`protege.engine.cache` (classification) and
:mod:`protege.engine.lm_cache` (causal LMs); this module reads the run config: which teachers and
weights (the ``teacher`` fingerprint part, from the weights *files*, without building a model),
which data, which taps and teacher-side reductions the run's terms read, and where the cache goes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from .build import build_from, load_run_data, resolve_weights
from .config import CacheConfig, RunConfig
from .core.distiller import LOGIT_KEYS, teacher_reduction, term_name
from .data.splits import DataSplits
from .engine.cache import (
    TeacherCache,
    TermReads,
    check_cached_logits,
    check_cached_taps,
    data_parts,
    describe_temperature,
    fingerprint_part,
    teacher_reductions,
    write_cache,
)
from .engine.embedding_cache import (
    EMBEDDING_KEYS,
    CachedEmbeddingDataset,
    embedding_data_part,
    write_embedding_cache,
)
from .engine.lm_cache import CachedLMDataset, lm_data_part, write_lm_cache
from .errors import ProtegeError
from .files import sha256_file
from .losses import get_loss

__all__ = [
    "build_cache",
    "embedding_fingerprint_parts",
    "fingerprint_parts",
    "lm_fingerprint_parts",
    "teacher_part",
    "use_cache",
    "use_lm_cache",
]


def _weights_file(weights: str) -> Path:
    """The file ``build_model(weights=...)`` reads: a run directory's best checkpoint, a checkpoint
    directory's ``model.safetensors``, or the file itself."""
    path = Path(str(resolve_weights(weights))).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ProtegeError(f"teacher weights not found: {path}")
    return path


def teacher_part(cfg: RunConfig) -> dict[str, Any]:
    """The ``teacher`` fingerprint part: each teacher's model, kwargs and weights-file SHA-256.

    Reads only the weights files, never builds a model. A teacher without weights is randomly
    initialised from the run's seed after the student (what an online run would build), so its
    part names the seed and the student instead.
    """
    detail = []
    for spec in cfg.all_teachers():
        entry: dict[str, Any] = {"model": spec.model, "kwargs": spec.kwargs}
        local = _model_files(spec.model)
        if local:  # a model directory or file (a transformers LM): its files are its weights
            entry["model_files_sha256"] = {str(p): sha256_file(p) for p in local}
        if spec.weights is None and local:
            entry["weights"] = None
        elif spec.weights is None:
            entry["weights"] = None
            entry["random_init"] = {"seed": cfg.seed, "student": _student_spec(cfg)}
        else:
            path = _weights_file(spec.weights)
            entry["weights"] = str(path)
            entry["weights_sha256"] = sha256_file(path)
        detail.append(entry)
    return fingerprint_part(detail)


_MODEL_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _model_files(model: str) -> list[Path]:
    """The weight and config files of a model given as a local path (a file, or a directory such as
    ``save_pretrained`` writes); empty for a model name."""
    path = Path(model).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(
            p for p in path.iterdir() if p.is_file() and (p.suffix in _MODEL_FILES or p.name == "config.json")
        )
    return []


def _student_spec(cfg: RunConfig) -> Any:
    students = getattr(cfg, "all_students", None)
    if callable(students):
        return {k: v.model_dump(mode="json") for k, v in students().items()}
    return cfg.student.model_dump(mode="json") if cfg.student is not None else None


# --------------------------------------------------------------------------------------- writing


def fingerprint_parts(cfg: RunConfig, data: DataSplits) -> dict[str, dict[str, Any]]:
    """The ``teacher``, ``data`` and ``transform`` parts of a cache's fingerprint for this run
    (:func:`teacher_part` and :func:`protege.engine.cache.data_parts`)."""
    return {"teacher": teacher_part(cfg), **data_parts(data)}


def lm_fingerprint_parts(cfg: RunConfig, data: Any) -> dict[str, dict[str, Any]]:
    """The ``teacher`` and ``data`` parts of an LM cache's fingerprint (:mod:`protege.engine.lm_cache`)."""
    return {"teacher": teacher_part(cfg), "data": lm_data_part(data)}


def embedding_fingerprint_parts(cfg: RunConfig, data: Any) -> dict[str, dict[str, Any]]:
    """The ``teacher`` and ``data`` parts of an embedding cache's fingerprint
    (:mod:`protege.engine.embedding_cache`): the teacher part also hashes the files of each teacher's
    sentence-encoder folder (``model: minilm``: the package's; ``sentence_encoder``: ``kwargs.path``)."""
    from .models.embedding import encoder_directory

    part = teacher_part(cfg)
    for entry, spec in zip(part["detail"], cfg.all_teachers(), strict=True):
        folder = encoder_directory(spec.model, spec.kwargs)
        if folder is not None:  # a pretrained encoder: neither the run's seed nor its student change it
            entry.pop("random_init", None)
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            entry["encoder_files_sha256"] = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    return {"teacher": fingerprint_part(part["detail"]), "data": embedding_data_part(data)}


def build_cache(
    cfg: RunConfig,
    out: str | Path | None = None,
    views: int | None = None,
    top_k: int | str | None = None,
    overwrite: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Build the teacher-output cache of a run config (what ``protege cache run.yaml`` does).

    Settings come from the config's ``cache:`` section (:class:`protege.config.CacheConfig`);
    ``out``, ``views`` and ``top_k`` override it. Returns the cache's index (see the module docs)
    with its ``path``.
    """
    settings = cfg.cache
    if settings is None:
        if out is None:
            raise ProtegeError(
                "where should the cache go? add `cache: <path>` (or `cache: {path: ..., views: 4}`) "
                "to the config, or pass --out DIR"
            )
        settings = CacheConfig(path=str(out))
    path = Path(out) if out is not None else Path(settings.path)
    if (path.exists() or path.is_symlink()) and not overwrite:  # before any expensive work
        raise ProtegeError(f"{path} already exists; pass --overwrite to rebuild it, or choose another path")
    specs = cfg.all_teachers()
    if not specs:
        raise ProtegeError("the config has no teacher to cache: add `teacher: {model: ..., weights: ...}`")
    data = load_run_data(cfg)
    _no_vl_cache(data)
    if getattr(data, "task", None) == "lm":
        return _build_lm_cache(cfg, data, path, top_k, overwrite, device)
    if getattr(data, "task", None) == "embedding":
        return _build_embedding_cache(cfg, data, path, overwrite, device)
    parts = fingerprint_parts(cfg, data)
    set_seed(cfg.seed)
    if any(s.weights is None for s in specs):  # built as an online run would: the student first
        for spec in _student_spec_models(cfg):
            build_from(spec, data)
    teachers = [build_from(s, data) for s in specs]
    dev = device or ("cpu" if cfg.cpu else None)
    reductions = teacher_reductions(_run_terms(cfg)) if settings.reduce else {}
    index = write_cache(
        path,
        data,
        teachers,
        views=views if views is not None else settings.views,
        top_k=top_k if top_k is not None else settings.top_k,
        taps=settings.taps,
        reductions={k: r for k, r in reductions.items() if k in settings.taps},
        dtype=settings.dtype,
        shard_size=settings.shard_size,
        seed=settings.seed,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        parts=parts,
        overwrite=overwrite,
        device=dev,
        teacher_precision=cfg.teacher_precision,
        fold_teacher_bn=True,  # as a distill run's frozen teachers (taps kept)
        memory_format=cfg.memory_format,
    )
    return {**index, "path": str(path)}


def _build_lm_cache(
    cfg: RunConfig, data: Any, path: Path, top_k: int | str | None, overwrite: bool, device: str | None
) -> dict[str, Any]:
    settings = cfg.cache
    if len(cfg.all_teachers()) != 1:
        raise ProtegeError("an lm teacher-output cache holds one teacher's outputs: give the run one teacher")
    parts = lm_fingerprint_parts(cfg, data)
    index = write_lm_cache(
        path,
        data,
        build_from(cfg.all_teachers()[0], data),
        top_k=top_k if top_k is not None else _lm_top_k(settings),
        levels=settings.levels if settings is not None else 96,
        shard_size=settings.shard_size if settings is not None else 10_000,
        batch_size=cfg.data.eval_batch_size,
        parts=parts,
        overwrite=overwrite,
        device=device or ("cpu" if cfg.cpu else None),
        teacher_precision=cfg.teacher_precision,
    )
    return {**index, "path": str(path)}


def _build_embedding_cache(
    cfg: RunConfig, data: Any, path: Path, overwrite: bool, device: str | None
) -> dict[str, Any]:
    if len(cfg.all_teachers()) != 1:
        raise ProtegeError(
            "an embedding teacher-output cache holds one teacher's vectors: give the run one teacher"
        )
    _check_embedding_reads(cfg)
    settings = cfg.cache
    index = write_embedding_cache(
        path,
        data,
        build_from(cfg.all_teachers()[0], data),
        shard_size=settings.shard_size if settings is not None else 10_000,
        batch_size=cfg.data.eval_batch_size,
        parts=embedding_fingerprint_parts(cfg, data),
        overwrite=overwrite,
        device=device or ("cpu" if cfg.cpu else None),
        teacher_precision=cfg.teacher_precision,
    )
    return {**index, "path": str(path)}


def _check_embedding_reads(cfg: RunConfig) -> None:
    """Refuse an embedding cache for a run whose terms read more of the teacher than its vectors."""
    for t in cfg.terms:
        info = get_loss(t.loss)
        if not info.uses_teacher:
            continue
        keys = [t.teacher] if isinstance(t.teacher, str) else list(t.teacher)
        other = [k for k in keys if k not in EMBEDDING_KEYS]
        if other:
            raise ProtegeError(
                f"term {term_name(t.loss, t.student, t.name)!r} reads the teacher's {', '.join(other)}; an "
                "embedding cache holds only each text's sentence vector (embedding): remove `cache:` to run "
                "the teacher online, or use terms on the embedding only"
            )


def use_embedding_cache(cfg: RunConfig, data: Any) -> tuple[Any, TeacherCache]:
    """Open and verify ``cfg.cache`` for an embedding distill run; return the splits that carry the
    teacher's vectors.

    Raises:
        ProtegeError: a stale cache (the teacher's files or the texts changed), a damaged shard, a
            cache of another task, more than one teacher, or a term that reads more than the vectors.
    """
    settings = cfg.cache
    assert settings is not None
    cache = TeacherCache.open(settings.path, verify=settings.verify)
    if cache.index.get("task") != "embedding":
        raise ProtegeError(
            f"cache {cache.path} holds a {cache.index.get('task') or 'classification'} teacher's outputs, this "
            "is an embedding run: rebuild it with `protege cache <config> --overwrite`"
        )
    if len(cfg.all_teachers()) != 1:
        raise ProtegeError(
            "an embedding teacher-output cache holds one teacher's vectors; the run must have one teacher"
        )
    _check_embedding_reads(cfg)
    cache.check(embedding_fingerprint_parts(cfg, data))
    return _cached_splits(data, cache, CachedEmbeddingDataset), cache


def _lm_top_k(settings: CacheConfig | None) -> int | str:
    """An lm cache's ``top_k``: the config's when it sets one, else 128 (``CacheConfig``'s default,
    ``all``, is the classification cache's: a vocabulary's full rows are far too large to store)."""
    return settings.top_k if settings is not None and "top_k" in settings.model_fields_set else 128


def _student_spec_models(cfg: RunConfig) -> list[Any]:
    students = getattr(cfg, "all_students", None)
    if callable(students):
        return list(students().values())
    return [cfg.student] if cfg.student is not None else []


# --------------------------------------------------------------------------------------- reading


# ------------------------------------------------------------------------------- distill runs


def _run_terms(cfg: RunConfig) -> list[TermReads]:
    """What each of the run's terms reads from the teachers (without building the terms)."""
    reads = []
    for t in cfg.terms:
        info = get_loss(t.loss)
        keys = [t.teacher] if isinstance(t.teacher, str) else list(t.teacher)
        reads.append(
            TermReads(
                name=term_name(t.loss, t.student, t.name),
                taps=[k for k in keys if k not in LOGIT_KEYS] if info.uses_teacher else [],
                reduction=teacher_reduction(info, t.teacher, t.params, t.adapter is not None),
                logits=info.uses_teacher and any(k in LOGIT_KEYS for k in keys),
                temperature=describe_temperature(info, t.params),
            )
        )
    return reads


def use_cache(cfg: RunConfig, data: DataSplits) -> tuple[DataSplits, TeacherCache]:
    """Open and verify ``cfg.cache`` for a distill run, and return the splits that read it.

    The training split yields the stored views with the teachers' outputs; validation and test
    yield their items with the cached teacher logits (for fidelity metrics). Load the training
    split with :func:`cache_loader`, and build the Distiller with ``cached_teachers=cache.teachers``.

    Nothing is written: the pipeline calls this before it creates the run directory, so a refused
    cache leaves no trace of the run.

    Raises:
        ProtegeError: no cache, a stale one (teacher weights, data or transforms changed), a
            damaged shard, a cache from which a term that reads the teacher's logits would not get
            them exactly (top-k, or float16 logits of an older version; see
            :func:`protege.engine.cache.check_cached_logits`), or a cache that lacks a tap a term reads.
    """
    settings = cfg.cache
    if settings is None:
        raise ProtegeError("the config has no `cache:` section")
    _no_vl_cache(data)
    if getattr(data, "task", None) == "lm":  # top-k next-token rows (protege.engine.lm_cache)
        return use_lm_cache(cfg, data)
    if getattr(data, "task", None) == "embedding":  # one vector per text (protege.engine.embedding_cache)
        return use_embedding_cache(cfg, data)
    cache = TeacherCache.open(settings.path, verify=settings.verify)
    if cache.index.get("task") == "lm":
        raise ProtegeError(f"cache {cache.path} holds a language model's outputs; this run is not an lm run")
    cache.check(fingerprint_parts(cfg, data))
    n = len(cfg.all_teachers())
    if cache.teachers != n:
        raise ProtegeError(f"cache {cache.path} holds {cache.teachers} teacher(s)' outputs, the run has {n}")
    terms = _run_terms(cfg)
    check_cached_logits(terms, cache)
    check_cached_taps(terms, cache)
    splits = dataclasses.replace(
        data,
        train=cache.dataset("train", data.train, seed=cfg.seed),
        val=cache.dataset("val", data.val) if "val" in cache.splits else data.val,
        test=cache.dataset("test", data.test)
        if data.test is not None and "test" in cache.splits
        else data.test,
    )
    return splits, cache


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
    return _cached_splits(data, cache, CachedLMDataset), cache


def _cached_splits(data: Any, cache: TeacherCache, dataset: Any) -> Any:
    """``data`` with each split the cache holds wrapped in ``dataset(cache, split, items)``."""
    return dataclasses.replace(
        data,
        **{
            name: dataset(cache, name, getattr(data, name))
            for name in ("train", "val", "test")
            if getattr(data, name) is not None and name in cache.splits
        },
    )


def _no_vl_cache(data: Any) -> None:
    """A teacher-output cache holds per-sample logits and taps of images or token sequences; a
    vision-language teacher's outputs (image, caption and class embeddings) are not in that format
    yet: refused, not half-supported. (A sentence encoder's vectors have their own format,
    :mod:`protege.engine.embedding_cache`.)"""
    task = getattr(data, "task", None)
    if task == "vision_language":
        raise ProtegeError(
            "a teacher-output cache does not cover the vision_language task yet: remove `cache:` (the "
            "teacher then runs online; a frozen text tower already encodes each distinct caption once)"
        )
    if task == "promptable_segmentation":
        raise ProtegeError(
            "a teacher-output cache cannot serve promptable_segmentation: its training prompts are drawn "
            "anew for every batch (and the hard-prompt sampler asks the live teacher), so stored teacher "
            "masks would answer other prompts; remove `cache:` (the teacher runs online)"
        )
