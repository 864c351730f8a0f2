"""Static-embedding sentence encoders: one vector per token, mean-pooled (model2vec-style).

A :class:`StaticEmbedder` maps a text to the mean of its tokens' vectors (an ``nn.Embedding``; no
attention, no context), optionally L2-normalised. It is about the cheapest sentence encoder there is: a
lookup and an average per text, no matrix product.

**Initialisation** (:func:`static_from_teacher`) follows model2vec (Tulkens & van Dongen, MinishLab,
2024; "Model2Vec: distill a small fast model from any sentence transformer"):

1. every token of the teacher tokenizer's vocabulary (less what no text tokenised without special
   tokens ever produces: the ``[unusedN]`` placeholders of BERT vocabularies and the special
   ``[CLS]``, ``[SEP]``, ``[MASK]``; or the ``vocabulary`` subset given) is run through the
   teacher's encoder as a text of its own, with the tokenizer's special tokens around it
   (``[CLS] tok [SEP]``), and the last hidden states are mean-pooled (all positions, special ones
   included) — model2vec's default ``pooling="mean"``. The sentence-transformers head of the teacher
   (Dense, Normalize) is not applied, as in model2vec;
2. PCA (centred, eigenvectors of the covariance, each component's sign fixed so that its largest
   score is positive) to ``dim`` dimensions;
3. Zipf/SIF weighting (Arora et al., 2017, "A simple but tough-to-beat baseline for sentence
   embeddings"): the tokens are taken to be ordered by frequency (their id order; BERT WordPiece
   vocabularies roughly are), Zipf's law estimates the probability of the token of rank
   ``r = 1..V`` as ``p_r = (1 / (r + 1)) / sum_{j=1..V} 1 / (j + 1)``, and its row is scaled by
   ``w_r = a / (a + p_r)`` (``a``: ``sif_coefficient``, default 1e-4): frequent tokens weigh less.
   The weight is folded into the row (static models average rows, so a row's norm is its weight).

**Tokenisation at encoding time**, as model2vec's ``StaticModel.encode``: no special tokens
(``[CLS]``/``[SEP]`` are not pooled), the first ``max_length`` tokens are kept, then the unknown token
(``[UNK]``) is dropped; a text left with no token is the zero vector (never NaN). The tokens left
out of the vocabulary (``[unusedN]`` and the like, or all but ``vocabulary``) are removed from the
*tokenizer* too, as model2vec does: the student's tokenizer is the teacher's with a smaller,
renumbered vocabulary (for WordPiece, words then split into the remaining pieces, or become
``[UNK]``). For all-MiniLM-L6-v2 that is 29,525 of its 30,522 tokens, the same as model2vec's.

**On disk** (:func:`save_static`, :func:`load_static`) one directory that both libraries load, the
layout model2vec's own ``save_pretrained`` writes:

- ``model.safetensors``: ``embeddings`` ``(V, d)`` in float32, float16 or int8 and, for int8,
  ``weights`` ``(V,)`` float32: the per-row symmetric scale (``row ≈ int8_row * scale``,
  ``scale = max|row| / 127``, so each entry is off by at most ``scale / 2``). model2vec multiplies
  each token's row by its ``weights`` entry and sentence-transformers folds them in on load, so all
  three readers dequantise identically, to float32. float16 comes with ``weights`` of ones for the
  same reason: without them sentence-transformers would average and normalise in float16 (NaN for
  an empty text); model2vec still returns a float16 array for a float16 model (rounded output);
- ``tokenizer.json`` (no post-processor, no padding, truncation at ``max_length``);
- ``config.json``: model2vec's config (``normalize``, ``max_length``, ``hidden_dim``, ...) and a
  ``protege`` section (special tokens, how it was initialised);
- for sentence-transformers: ``modules.json`` (``StaticEmbedding`` at the root, then ``Normalize``
  in ``1_Normalize`` when the model normalises) and ``config_sentence_transformers.json``.

``model2vec.StaticModel.from_pretrained(dir).encode`` gives our vectors (int8: exactly those of the
int8-loaded model; float16: rounded to float16 by model2vec). One difference on very long texts:
model2vec first cuts a text to ``max_length * median token length`` characters, which can keep fewer
than ``max_length`` tokens of a text of long tokens. ``SentenceTransformer(dir).encode`` gives our
vectors too, with one caveat: sentence-transformers averages over ``[UNK]`` tokens as well. The
``[UNK]`` row is written as zeros, so the direction is the same and a normalised model (the default)
gives the same vectors; without normalisation, a text with unknown tokens comes out shorter (by
known / all tokens) there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtegeError
from ..files import creatable_dir_problem, fsync_dir, replace_dir, staged_dir, storable, write_durable
from .embedding import SentenceEmbedder

__all__ = [
    "FORMATS",
    "STORAGE_DTYPES",
    "StaticEmbedder",
    "load_static",
    "save_static",
    "static_from_teacher",
    "static_like",
]

#: how :func:`save_static` may store the vectors
STORAGE_DTYPES = ("float32", "float16", "int8")
#: the libraries :func:`save_static` writes for
FORMATS = ("sentence-transformers", "model2vec")
#: tokens no text produces (BERT's ``[unused0]`` ...), left out of the vocabulary as model2vec does
UNUSED_TOKEN = re.compile(r"\[unused\d+\]")
DEFAULT_MAX_LENGTH = 512
#: a model2vec config's "no limit" (its ``seq_length``), and our ``max_length`` when it has none
NO_LIMIT = 1_000_000
SPECIAL_TOKENS = ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")
#: one token's teacher pass: ``(input_ids (B, L), attention_mask (B, L)) -> (B, D)``
TokenVectors = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- the model


class StaticEmbedder(SentenceEmbedder):
    """A static sentence encoder: the (optionally L2-normalised) mean of the text's token vectors.

    Args:
        tokenizer: a transformers fast tokenizer whose ids index the rows of the embedding.
        dim: width of the vectors.
        weight: ``(V, dim)`` initial vectors (copied to float32); zeros when ``None``.
        normalize: whether :meth:`encode` L2-normalises its output.
        max_length: tokens kept per text (the rest are cut and the text counted in ``truncated``).
        info: JSON-able notes on how the vectors were made (teacher, PCA, SIF), kept in
            :meth:`config_dict` and in the saved ``config.json``.
    """

    kind = "static"
    add_special_tokens = False
    #: how :meth:`save` stores the vectors (:data:`STORAGE_DTYPES`); training is always float32
    storage = "float32"

    def __init__(
        self,
        tokenizer: Any,
        dim: int,
        *,
        weight: Tensor | None = None,
        normalize: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        backend = _backend(tokenizer, "a StaticEmbedder")
        vocab = backend.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1 if vocab else 0
        if size == 0:
            raise ProtegeError("a StaticEmbedder needs a tokenizer with a non-empty vocabulary")
        _check_int(dim, "dim")
        _check_int(max_length, "max_length")
        self.tokenizer = tokenizer
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.info: dict[str, Any] = dict(info or {})
        self.unk_id = _unk_id(backend)
        self.embedding = nn.Embedding(size, self.dim)
        with torch.no_grad():
            if weight is None:
                self.embedding.weight.zero_()
            else:
                if tuple(weight.shape) != (size, self.dim):
                    raise ProtegeError(
                        f"static vectors of shape {tuple(weight.shape)} do not fit a tokenizer of {size} "
                        f"tokens and dim {self.dim}"
                    )
                self.embedding.weight.copy_(weight.detach().to(torch.float32))

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.num_embeddings)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask`` ``(N, L)`` on :attr:`device`: each text's tokens without
        special tokens, its first ``max_length`` kept (texts longer are counted in ``truncated``),
        then the unknown token dropped (model2vec's tokenisation). ``L >= 1``: a text with no token
        is all padding."""
        texts = _check_texts(texts)
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=False, padding=False)[
            "input_ids"
        ]
        rows: list[list[int]] = []
        for ids in encoded:
            if len(ids) > self.max_length:
                self.truncated += 1
                ids = ids[: self.max_length]
            rows.append([i for i in ids if i != self.unk_id] if self.unk_id is not None else list(ids))
        width = max(1, max(len(r) for r in rows))
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def features(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``embedding`` ``(N, dim)`` (the pooled, maybe normalised vector), ``token_embeddings``
        ``(N, L, dim)`` (the token rows, zero on padding) and ``attention_mask`` ``(N, L)``."""
        batch = self.tokenize(texts)
        mask = batch["attention_mask"]
        tokens = self.embedding(batch["input_ids"]) * mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        counts = mask.sum(1, keepdim=True).clamp(min=1).to(tokens.dtype)
        pooled = tokens.sum(1) / counts  # a text with no token: 0 / 1 = the zero vector
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)  # the zero vector stays zero
        return {"embedding": pooled, "token_embeddings": tokens, "attention_mask": mask}

    def save(self, directory: Path) -> None:
        """The folder model2vec and sentence-transformers both load (:func:`save_static`), its vectors
        stored as :attr:`storage` says."""
        save_static(self, directory, dtype=self.storage)

    def config_dict(self) -> dict[str, Any]:
        """What this model is (JSON-able): kind, sizes, normalisation, token limit, initialisation."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "init": dict(self.info),
        }

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, dim={self.dim}, normalize={self.normalize}, max_length={self.max_length}"


# --------------------------------------------------------------------------- initialisation


def static_from_teacher(
    teacher: Any,
    dim: int | None = 256,
    *,
    pca: bool = True,
    sif_coefficient: float | None = 1e-4,
    vocabulary: Sequence[str] | None = None,
    batch_size: int = 256,
    normalize: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
    token_vectors: TokenVectors | None = None,
) -> StaticEmbedder:
    """A :class:`StaticEmbedder` initialised from ``teacher`` model2vec-style (module docstring).

    Args:
        teacher: has ``tokenizer`` (a transformers fast tokenizer) and, unless ``token_vectors`` is
            given, ``encoder`` (a transformers encoder, e.g. ``AutoModel``) whose last hidden states
            are mean-pooled.
        dim: width of the vectors after PCA (at most the teacher's hidden width; ``None``: the
            teacher's width, PCA then only centres and rotates). With ``pca=False`` it must be
            ``None`` or the teacher's width.
        pca: reduce with PCA; ``False`` keeps the teacher's pooled vectors as they are.
        sif_coefficient: ``a`` of the SIF weights ``a / (a + p_r)`` (0 < a < 1); ``None``: no weights.
        vocabulary: tokens of the teacher's vocabulary to keep (its unknown and padding tokens are
            always kept); ``None``: all of them but ``[unusedN]`` and the added special tokens
            (``[CLS]``, ``[SEP]``, ``[MASK]``), as model2vec.
        batch_size: tokens per teacher forward pass.
        normalize: whether the student L2-normalises its sentence vectors.
        max_length: tokens kept per text at encoding time.
        token_vectors: instead of ``teacher.encoder``: ``(input_ids, attention_mask) -> (B, D)``, the
            teacher's vector of each ``[CLS] tok [SEP]`` sequence (tensors on the teacher's device).
    """
    plan = _plan(teacher, dim, pca, sif_coefficient, vocabulary, batch_size, max_length, token_vectors)
    vectors = _teacher_vectors(plan, batch_size)  # (V, D) float64
    if pca:
        vectors = _pca(vectors, plan["dim"])
    if sif_coefficient is not None:
        vectors = vectors * _sif_weights(len(vectors), sif_coefficient)[:, None]
    model = StaticEmbedder(
        plan["tokenizer"],
        plan["dim"],
        weight=vectors.to(torch.float32),
        normalize=normalize,
        max_length=max_length,
        info=plan["info"],
    )
    _zero_unk(model)
    return model


def static_like(
    teacher: Any,
    dim: int | None = 256,
    *,
    pca: bool = True,
    sif_coefficient: float | None = 1e-4,
    vocabulary: Sequence[str] | None = None,
    batch_size: int = 256,
    normalize: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
    token_vectors: TokenVectors | None = None,
) -> StaticEmbedder:
    """The model :func:`static_from_teacher` builds with these arguments (same tokenizer, vocabulary
    and width), its vectors zeros instead of the teacher pass: for weights loaded afterwards."""
    plan = _plan(teacher, dim, pca, sif_coefficient, vocabulary, batch_size, max_length, token_vectors)
    return StaticEmbedder(
        plan["tokenizer"], plan["dim"], normalize=normalize, max_length=max_length, info=plan["info"]
    )


def _plan(
    teacher: Any,
    dim: int | None,
    pca: bool,
    sif_coefficient: float | None,
    vocabulary: Sequence[str] | None,
    batch_size: int,
    max_length: int,
    token_vectors: TokenVectors | None,
) -> dict[str, Any]:
    """Validate the arguments; the student's tokenizer, the teacher ids of its tokens, the teacher pass,
    the width."""
    tokenizer = getattr(teacher, "tokenizer", None)
    _backend(tokenizer, "the teacher")
    _check_int(batch_size, "batch_size")
    _check_int(max_length, "max_length")
    if dim is not None:
        _check_int(dim, "dim")
    if sif_coefficient is not None and (
        isinstance(sif_coefficient, bool)
        or not isinstance(sif_coefficient, (int, float))
        or not 0 < sif_coefficient < 1
    ):
        raise ProtegeError(
            f"sif_coefficient must be a number between 0 and 1 (e.g. 1e-4) or null, got {sif_coefficient!r}"
        )
    run = token_vectors if token_vectors is not None else _encoder_mean(teacher)
    prefix, suffix = _special_frame(tokenizer)
    keep = _kept_ids(tokenizer, vocabulary)
    sequences = torch.tensor([[*prefix, i, *suffix] for i in keep], dtype=torch.long)
    with torch.inference_mode():
        probe = run(sequences[:1].to(_device(teacher)), torch.ones_like(sequences[:1]).to(_device(teacher)))
    width = int(probe.shape[-1])
    if dim is None:
        dim = width
    if not pca and dim != width:
        raise ProtegeError(
            f"pca: false keeps the teacher's width ({width}): leave dim out (null) or set it to {width}, or "
            f"use pca: true to reduce to {dim}"
        )
    if dim > width:
        raise ProtegeError(
            f"dim {dim} is wider than the teacher's hidden width {width}: choose dim <= {width}"
        )
    if pca and dim > len(keep):
        raise ProtegeError(
            f"dim {dim} is more than the {len(keep)} tokens kept: PCA cannot give more dimensions"
        )
    info = {
        "method": "model2vec",
        "teacher": str(getattr(tokenizer, "name_or_path", "") or ""),
        "teacher_width": width,
        "pca": bool(pca),
        "sif_coefficient": None if sif_coefficient is None else float(sif_coefficient),
        "vocabulary": "all" if vocabulary is None else len(keep),
        "tokens": len(keep),
        "pooling": "mean",
    }
    return {
        "tokenizer": _restricted_tokenizer(tokenizer, keep),
        "sequences": sequences,
        "run": run,
        "device": _device(teacher),
        "dim": dim,
        "info": info,
    }


def _encoder_mean(teacher: Any) -> TokenVectors:
    """Mean of ``teacher.encoder``'s last hidden states over the attended positions."""
    encoder = getattr(teacher, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ProtegeError(
            "the static initialisation runs each token through the teacher's transformers encoder: the "
            "teacher needs an `encoder` module (or pass token_vectors=...)"
        )

    def run(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        was_training = encoder.training
        encoder.eval()  # no dropout in the token pass
        try:
            out = encoder(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            encoder.train(was_training)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    return run


def _device(teacher: Any) -> torch.device:
    for module in (getattr(teacher, "encoder", None), teacher):
        if isinstance(module, nn.Module):
            p = next(module.parameters(), None)
            if p is not None:
                return p.device
    return torch.device("cpu")


def _teacher_vectors(plan: dict[str, Any], batch_size: int) -> Tensor:
    """``(V, D)`` float64: the teacher's pooled vector of each kept token's ``[CLS] tok [SEP]``."""
    sequences: Tensor = plan["sequences"]
    run: TokenVectors = plan["run"]
    out: list[Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            ids = sequences[start : start + batch_size].to(plan["device"])
            out.append(run(ids, torch.ones_like(ids)).to("cpu", torch.float64))
    return torch.nan_to_num(torch.cat(out))


def _pca(x: Tensor, k: int) -> Tensor:
    """Scores of ``x`` ``(N, D)`` on its ``k`` principal components (centred; eigenvectors of the
    covariance, largest first; each component's sign makes its largest-magnitude score positive)."""
    xc = x - x.mean(0, keepdim=True)
    cov = xc.T @ xc / max(len(x) - 1, 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    components = vecs.flip(-1)[:, :k]
    scores = xc @ components
    top = scores.abs().argmax(0)
    signs = torch.sign(scores[top, torch.arange(k)])
    signs[signs == 0] = 1
    return scores * signs


def _sif_weights(n: int, a: float) -> Tensor:
    """``a / (a + p_r)`` for ranks ``r = 1..n``, ``p_r`` Zipf's ``(1 / (r + 1)) / sum_j 1 / (j + 1)``."""
    inv = 1.0 / torch.arange(2, n + 2, dtype=torch.float64)
    return a / (a + inv / inv.sum())


def _zero_unk(model: StaticEmbedder) -> None:
    """The unknown token is never pooled: its row is zero (what sentence-transformers then averages in)."""
    if model.unk_id is not None and model.unk_id < model.vocab_size:
        with torch.no_grad():
            model.embedding.weight[model.unk_id].zero_()


# --------------------------------------------------------------------------- tokenizers


def _backend(tokenizer: Any, who: str) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ProtegeError(
            f"{who} needs a transformers *fast* tokenizer (with a tokenizer.json), got {type(tokenizer).__name__}"
        )
    return backend


def _unk_id(backend: Any) -> int | None:
    """The unknown token's id (WordPiece, BPE, WordLevel: ``unk_token``; Unigram: ``unk_id``)."""
    model = json.loads(backend.to_str())["model"]
    if model.get("unk_token") is not None:
        return backend.token_to_id(model["unk_token"])
    unk = model.get("unk_id")
    return int(unk) if unk is not None else None


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text (``[CLS]`` / ``[SEP]`` for BERT)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def _kept_ids(tokenizer: Any, vocabulary: Sequence[str] | None) -> list[int]:
    """Teacher ids of the student's tokens, ascending: ``vocabulary`` or, by default, all but the
    ``[unusedN]`` placeholders and the added (special) tokens; the unknown and padding tokens always.
    As model2vec (which prunes the added tokens but those two): ``[CLS]``, ``[SEP]``, ``[MASK]`` never
    come out of a text tokenised without special tokens."""
    backend = _backend(tokenizer, "the teacher")
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    if vocabulary is None:
        chosen = {i for t, i in vocab.items() if t not in added and not UNUSED_TOKEN.fullmatch(t)}
    else:
        if isinstance(vocabulary, str) or not all(isinstance(t, str) for t in vocabulary):
            raise ProtegeError("vocabulary must be a list of tokens (strings) of the teacher's tokenizer")
        missing = [t for t in vocabulary if t not in vocab]
        if missing:
            raise ProtegeError(
                f"vocabulary: {len(missing)} entries are not tokens of the teacher's tokenizer (e.g. "
                f"{missing[:5]}): give tokens as its vocabulary spells them (e.g. '##ing' for WordPiece)"
            )
        chosen = {vocab[t] for t in vocabulary}
    unk = _unk_id(backend)
    if unk is not None:
        chosen.add(unk)
    pad = getattr(tokenizer, "pad_token", None)
    if isinstance(pad, str) and pad in vocab:
        chosen.add(vocab[pad])
    return sorted(chosen)


def _restricted_tokenizer(tokenizer: Any, keep: list[int]) -> Any:
    """A fast tokenizer like ``tokenizer`` whose vocabulary is the tokens of ``keep`` (teacher ids,
    ascending), renumbered ``0..len(keep)-1`` in that order; no post-processor (no special tokens
    added), no padding, no truncation."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(_backend(tokenizer, "the teacher").to_str())
    spec["post_processor"] = None
    spec["padding"] = None
    spec["truncation"] = None
    model = spec["model"]
    kind = model.get("type")
    new_id = {old: new for new, old in enumerate(keep)}
    if kind in ("WordPiece", "WordLevel", "BPE"):
        vocab = model["vocab"]
        if len(keep) < len(vocab):
            model["vocab"] = {
                t: new_id[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in new_id
            }
            if kind == "BPE":
                kept = set(model["vocab"])
                pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
                model["merges"] = [[a, b] for a, b in pairs if a in kept and b in kept and a + b in kept]
    elif kind == "Unigram":
        pieces = model["vocab"]
        if len(keep) < len(pieces):
            model["vocab"] = [p for i, p in enumerate(pieces) if i in new_id]
            if model.get("unk_id") is not None:
                model["unk_id"] = new_id[model["unk_id"]]
    else:
        raise ProtegeError(
            f"a static student cannot be built on a {kind} tokenizer (WordPiece, BPE, Unigram, WordLevel)"
        )
    spec["added_tokens"] = [
        dict(t, id=new_id[t["id"]]) for t in spec.get("added_tokens", []) if t["id"] in new_id
    ]
    backend = Tokenizer.from_str(json.dumps(spec))
    present = backend.get_vocab(with_added_tokens=True)
    special = {}
    for name in SPECIAL_TOKENS:
        token = getattr(tokenizer, name, None)
        if isinstance(token, str) and token in present:
            special[name] = token
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    wrapped.name_or_path = str(getattr(tokenizer, "name_or_path", "") or "")
    return wrapped


def _wrap_backend(backend: Any, special: Mapping[str, str]) -> Any:
    from transformers import PreTrainedTokenizerFast

    backend.no_padding()
    backend.no_truncation()
    present = backend.get_vocab(with_added_tokens=True)
    kwargs = {k: v for k, v in special.items() if k in SPECIAL_TOKENS and isinstance(v, str) and v in present}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _special_tokens(model: StaticEmbedder) -> dict[str, str]:
    out = {}
    for name in SPECIAL_TOKENS:
        token = getattr(model.tokenizer, name, None)
        if isinstance(token, str):
            out[name] = token
    return out


# --------------------------------------------------------------------------- saving and loading


def _quantize(weight: Tensor, dtype: str) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors`` for ``weight`` stored as ``dtype``. Reduced precisions come
    with per-token ``weights`` (int8: the row scales; float16: ones), which model2vec multiplies in and
    sentence-transformers folds in on load, both in float32: every reader then averages in float32."""
    weight = weight.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return {"embeddings": weight}
    if dtype == "float16":
        return {"embeddings": weight.to(torch.float16), "weights": torch.ones(len(weight))}
    scale = weight.abs().amax(1) / 127.0  # per-row symmetric: row ≈ q * scale, |error| <= scale / 2
    q = torch.round(weight / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
    return {"embeddings": q.to(torch.int8), "weights": scale}


def save_static(
    model: StaticEmbedder,
    directory: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    dtype: str = "float32",
) -> Path:
    """Write ``model`` to a new ``directory`` that model2vec and sentence-transformers load (module
    docstring). ``formats``: ``model2vec`` (``config.json``, ``model.safetensors``,
    ``tokenizer.json``: always written, :func:`load_static` reads them) and/or
    ``sentence-transformers`` (adds ``modules.json`` and its config). ``dtype``: float32, float16 or
    int8 (per-row scales). Assembled beside ``directory`` and renamed into place; a non-empty
    ``directory`` is refused. Returns ``directory``."""
    if not isinstance(model, StaticEmbedder):
        raise ProtegeError(f"save_static saves a StaticEmbedder, got {type(model).__name__}")
    if dtype not in STORAGE_DTYPES:
        raise ProtegeError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if isinstance(formats, str):
        formats = (formats,)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ProtegeError(f"formats must be a non-empty subset of {', '.join(FORMATS)}, got {list(formats)}")
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProtegeError(
            f"{out} exists and is not an empty directory: save to a new directory or remove it"
        )
    problem = creatable_dir_problem(out)
    if problem:
        raise ProtegeError(f"cannot save the static model to {out}: {problem}")

    weight = model.embedding.weight.detach().clone()
    if model.unk_id is not None:
        weight[model.unk_id] = 0.0  # never pooled by us or model2vec; sentence-transformers averages it in
    tensors = _quantize(weight, dtype)
    from safetensors.torch import save as safetensors_bytes
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_backend(model.tokenizer, "the model").to_str())
    backend.no_padding()
    backend.enable_truncation(model.max_length)
    config = {
        "model_type": "model2vec",
        "architectures": ["StaticModel"],
        "tokenizer_name": str(model.info.get("teacher", "")),
        "apply_pca": model.dim if model.info.get("pca") else None,
        "sif_coefficient": model.info.get("sif_coefficient"),
        "hidden_dim": model.dim,
        "seq_length": NO_LIMIT,
        "normalize": model.normalize,
        "pooling": "mean",
        "max_length": model.max_length,
        "embedding_dtype": dtype,
        "protege": {
            "format": 1,
            "dtype": dtype,
            "special_tokens": _special_tokens(model),
            **model.config_dict(),
        },
    }
    with staged_dir(out) as tmp:
        write_durable(
            tmp / "model.safetensors", safetensors_bytes(storable(tensors), metadata={"format": "pt"})
        )
        write_durable(tmp / "tokenizer.json", backend.to_str().encode())
        write_durable(tmp / "config.json", json.dumps(config, indent=2).encode())
        if "sentence-transformers" in formats:
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.StaticEmbedding"}
            ]
            if model.normalize:
                modules.append(
                    {
                        "idx": 1,
                        "name": "1",
                        "path": "1_Normalize",
                        "type": "sentence_transformers.models.Normalize",
                    }
                )
                (tmp / "1_Normalize").mkdir()
                write_durable(tmp / "1_Normalize" / "config.json", b"{}")
                fsync_dir(tmp / "1_Normalize")
            st_config = {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}
            write_durable(tmp / "modules.json", json.dumps(modules, indent=2).encode())
            write_durable(tmp / "config_sentence_transformers.json", json.dumps(st_config, indent=2).encode())
        fsync_dir(tmp)
        replace_dir(tmp, out)
    return out


def load_static(directory: str | Path) -> StaticEmbedder:
    """A :class:`StaticEmbedder` from a directory :func:`save_static` or model2vec's
    ``save_pretrained`` wrote (``config.json``, ``model.safetensors``, ``tokenizer.json``), or a
    sentence-transformers folder with a ``StaticEmbedding`` at its root or in ``0_StaticEmbedding``
    (``modules.json``; normalised when it lists ``Normalize``). Safetensors only. Vectors are
    dequantised to float32 (rows times their per-token ``weights``; a model2vec token ``mapping``
    unfolded). Encoding follows model2vec (``[UNK]`` dropped), also for a sentence-transformers
    folder, whose own encode averages ``[UNK]`` rows in."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    root = Path(directory)
    if not root.is_dir():
        raise ProtegeError(f"{root} is not a directory: give a saved static model's directory")
    folder = root if (root / "model.safetensors").is_file() else root / "0_StaticEmbedding"
    config_file, modules_file = root / "config.json", root / "modules.json"
    has_files = (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    if not has_files or not (config_file.is_file() or modules_file.is_file()):
        raise ProtegeError(
            f"{root} is not a saved static model: it must hold model.safetensors, tokenizer.json and "
            "config.json (what protege's save_static or model2vec's save_pretrained writes) or a "
            "sentence-transformers modules.json with a StaticEmbedding"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        modules = json.loads(modules_file.read_text(encoding="utf-8")) if modules_file.is_file() else []
        tensors = load_file(str(folder / "model.safetensors"))
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # OSError, JSON, safetensors; tokenizers raises a plain Exception
        raise ProtegeError(f"{root}: cannot read the static model ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or not isinstance(modules, list):
        raise ProtegeError(f"{root}: config.json must hold a JSON object and modules.json a list")
    if "embedding.weight" in tensors:
        weight = tensors["embedding.weight"].to(torch.float32)
    elif "embeddings" in tensors:
        weight = tensors["embeddings"]
        if "mapping" in tensors:
            weight = weight[tensors["mapping"].to(torch.long)]
        weight = weight.to(torch.float32)
        if "weights" in tensors:
            weight = weight * tensors["weights"].to(torch.float32)[:, None]
    else:
        raise ProtegeError(
            f"{folder / 'model.safetensors'} holds no 'embeddings' (model2vec) or 'embedding.weight'"
        )
    if weight.ndim != 2:
        raise ProtegeError(
            f"{folder / 'model.safetensors'}: the vectors must be a matrix, got shape {tuple(weight.shape)}"
        )
    ours = config.get("protege") if isinstance(config.get("protege"), dict) else {}
    special = dict(ours.get("special_tokens") or {})
    if "unk_token" not in special:
        model_spec = json.loads(backend.to_str())["model"]
        if model_spec.get("unk_token"):
            special["unk_token"] = model_spec["unk_token"]
    if "pad_token" not in special and backend.padding:
        special["pad_token"] = backend.padding["pad_token"]
    if "normalize" in config:
        normalize = bool(config["normalize"])
    else:
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules if isinstance(m, dict))
    if "max_length" in config:
        max_length = config["max_length"] if config["max_length"] is not None else NO_LIMIT
    else:
        max_length = backend.truncation["max_length"] if backend.truncation else DEFAULT_MAX_LENGTH
    tokenizer = _wrap_backend(backend, special)
    size = backend.get_vocab_size(with_added_tokens=True)
    if len(weight) != size:
        raise ProtegeError(f"{root}: {len(weight)} vectors for a tokenizer of {size} tokens")
    source = "model2vec" if config.get("model_type") == "model2vec" else "sentence-transformers"
    return StaticEmbedder(
        tokenizer,
        int(weight.shape[1]),
        weight=weight,
        normalize=normalize,
        max_length=int(max_length),
        info=ours.get("init") or {"source": source, "path": str(root)},
    )


# --------------------------------------------------------------------------- validation


def _check_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtegeError(f"{name} must be a whole number >= 1, got {value!r}")


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ProtegeError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ProtegeError("texts is empty: give at least one text")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ProtegeError(f"texts must all be strings, got a {type(bad[0]).__name__}")
    return texts
