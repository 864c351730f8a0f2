"""Sequence-level KD data: a teacher LM's completions of a prompt file (``protege generate gen.yaml``).

Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016: train the student on the teacher's
own outputs (its beam/greedy or sampled sequences) instead of, or besides, the references. The file
written here is a ``.jsonl`` of ``{"prompt": ..., "completion": ...}`` records, which the ``lm`` task
reads as prompt-completion data (``data: {source: jsonl, root: <out>}``; loss on the completion only).

A generation config (``gen.yaml``, :class:`GenerateConfig`)::

    model: .cache/smollm2-135m-instruct   # directory, .gguf file or hub id (the teacher)
    prompts: prompts.jsonl                # .jsonl (prompt_field) or .txt (one prompt per line)
    out: data/teacher-generations.jsonl
    batch_size: 8
    max_new_tokens: 128
    temperature: 0.0                      # greedy; > 0 samples

**Deduplicated**: prompts are compared after stripping surrounding whitespace; each distinct prompt is
generated once. **Resumable**: prompts already in ``out`` are skipped, so an interrupted run (or a run
on a grown prompt file) only generates what is missing. **Atomic**: ``out`` is rewritten through a temp
file and a rename every ``save_every`` batches and at the end, so it is always a complete jsonl file;
an interruption loses at most the batches since the last save. Prompts are generated shortest first
(less padding); the file lists the records in prompt-file order, then records of prompts no longer in
the file (kept, not lost).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .config import load_yaml_model
from .errors import ProtegeError
from .files import atomic_write_text
from .tasks.lm import build_lm, complete, load_tokenizer, render_prompt

__all__ = ["GenerateConfig", "generate", "load_generate_config", "read_prompts"]


class GenerateConfig(BaseModel):
    """What ``protege generate`` reads (module docstring)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the teacher: a model directory, a .gguf file or a hub id")
    prompts: str = Field(description=".jsonl file (one object per line) or .txt file (one prompt per line)")
    out: str = Field(description=".jsonl file of {prompt, completion} records (created or completed)")
    prompt_field: str = Field("prompt", description="field of a .jsonl prompt record, and of the output")
    completion_field: str = Field("completion", description="field of the output holding the generation")
    batch_size: int = Field(8, ge=1, description="prompts generated together")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per prompt at most (fewer at EOS)")
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding; > 0: sampling at this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (with temperature > 0)")
    chat: bool = Field(True, description="render each prompt as a user turn of the tokenizer's chat template")
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts keep their last tokens")
    seed: int = Field(0, description="sampling seed (each batch reseeds with seed + batch number)")
    save_every: int = Field(8, ge=1, description="batches between atomic rewrites of out")
    dtype: str = Field("float32", description="the teacher's weights dtype (bfloat16 on a GPU)")
    device: str | None = Field(None, description="cuda / cpu; default: cuda when available")


def load_generate_config(path: str | Path, overrides: Sequence[str] = ()) -> GenerateConfig:
    """Read a generation YAML and apply ``--set KEY=VALUE`` overrides."""
    return load_yaml_model(path, overrides, GenerateConfig, "generation config", "model:, prompts:, out: …")


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """The distinct prompts of a ``.txt`` (one per non-empty line) or ``.jsonl`` file, in file order."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ProtegeError(f"prompt file not found: {p}")
    prompts: list[str] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProtegeError(f"{p}:{n} is not valid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ProtegeError(
                    f"{p}:{n} needs a string field {field!r} (set prompt_field to name another)"
                )
            line = record[field]
        prompts.append(line.strip())
    if not prompts:
        raise ProtegeError(f"{p} holds no prompt")
    return list(dict.fromkeys(prompts))


def _read_done(out: Path, cfg: GenerateConfig) -> dict[str, dict[str, Any]]:
    if not out.is_file():
        return {}
    done: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(out.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ProtegeError(
                f"{out}:{n} is not valid JSON: this file was not written by protege generate; move it away"
            ) from None
        prompt = record.get(cfg.prompt_field) if isinstance(record, dict) else None
        if not isinstance(prompt, str) or cfg.completion_field not in record:
            raise ProtegeError(
                f"{out}:{n} has no {cfg.prompt_field!r}/{cfg.completion_field!r} pair: not a generation file; "
                "move it away or set out to another path"
            )
        done[prompt.strip()] = record
    return done


def _write(out: Path, prompts: Sequence[str], done: Mapping[str, dict[str, Any]]) -> None:
    order = [p for p in prompts if p in done] + [p for p in done if p not in set(prompts)]
    atomic_write_text(out, "".join(json.dumps(done[p], ensure_ascii=False) + "\n" for p in order))


@torch.no_grad()
def generate(
    cfg: GenerateConfig, model: torch.nn.Module | None = None, tokenizer: Any = None
) -> dict[str, Any]:
    """Complete every prompt of ``cfg.prompts`` not yet in ``cfg.out`` with the teacher; return counts.

    ``model``/``tokenizer``: already built ones (default: loaded from ``cfg.model``). Returns
    ``{"out", "prompts", "skipped", "generated", "seconds", "tokens_per_second"}``.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser()
    if out.suffix.lower() != ".jsonl":
        raise ProtegeError(
            f"out must be a .jsonl file (the lm task reads it as prompt-completion data), got {out}"
        )
    prompts = read_prompts(cfg.prompts, cfg.prompt_field)
    done = _read_done(out, cfg)
    pending = [p for p in prompts if p not in done]
    summary: dict[str, Any] = {
        "out": str(out),
        "prompts": len(prompts),
        "skipped": len(prompts) - len(pending),
    }
    if not pending:
        _write(out, prompts, done)
        return {**summary, "generated": 0, "seconds": time.perf_counter() - t0, "tokens_per_second": 0.0}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if model is None:
        model = build_lm(cfg.model, None, {"dtype": cfg.dtype}, None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    texts = {p: render_prompt(tokenizer, p, cfg.chat) for p in pending}
    encoded = {
        p: tokenizer(texts[p], add_special_tokens=False)["input_ids"][-cfg.max_prompt_tokens :]
        for p in pending
    }
    pending.sort(key=lambda p: len(encoded[p]))  # similar lengths together: less padding
    generated_tokens = 0
    for b, at in enumerate(range(0, len(pending), cfg.batch_size)):
        batch = pending[at : at + cfg.batch_size]
        completions, count = complete(
            model,
            tokenizer,
            [encoded[p] for p in batch],
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            seed=cfg.seed + b,
            device=device,
        )
        generated_tokens += count
        for p, completion in zip(batch, completions):
            done[p] = {cfg.prompt_field: p, cfg.completion_field: completion}
        if (b + 1) % cfg.save_every == 0:
            _write(out, prompts, done)
    _write(out, prompts, done)
    seconds = time.perf_counter() - t0
    return {
        **summary,
        "generated": len(pending),
        "seconds": seconds,
        "tokens_per_second": generated_tokens / max(seconds, 1e-9),
    }
