"""Latency, side by side: PyTorch eager models and onnxruntime sessions in interleaved rounds.

A shared, noisy machine slows whatever runs while it is busy. So every round times every model in
turn (the same input), for each batch size and thread count: load hits all models alike, and their
ratios (the speed-ups) hold even where the absolute times wander. Within a round each model runs a
short burst of back-to-back calls (about 2 ms, one call for a slow model) and its time is the
burst's mean per call, and the order is shuffled every round: timed one call each in a fixed
order, a small model ran 22-38% faster right after another int8 model than after a float one
(warm code and caches), which made the second of two identical int8 graphs look faster. Reported
per model: median, 10th and 90th percentile over the rounds (the spread) and the number of rounds.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .onnx_io import run, session

#: each model runs back to back for about this long per round (its calls then find it warm, as a
#: server answering requests does), at most MAX_BURST calls; a slow model runs once per round
BURST_SECONDS = 0.002
MAX_BURST = 50


@dataclass
class Candidate:
    """One model to time: a PyTorch module (run eagerly) or an ONNX file (onnxruntime, CPU)."""

    label: str
    runtime: str  # "pytorch" | "onnxruntime"
    precision: str  # "fp32" | "int8"
    module: nn.Module | None = None
    onnx: Path | None = None


def all_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _timers(candidates: Sequence[Candidate], threads: int) -> dict[str, Callable[[Any], Any]]:
    calls: dict[str, Callable[[Any], Any]] = {}
    for c in candidates:
        if c.module is not None:
            module = c.module.eval()
            calls[c.label] = lambda x, m=module: m(x)
        else:
            assert c.onnx is not None
            sess = session(c.onnx, threads, spin=False)
            calls[c.label] = lambda x, s=sess: run(s, x)
    return calls


def measure(
    candidates: Sequence[Candidate],
    example: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 32),
    threads: Sequence[int] | None = None,
    warmup: int = 5,
    rounds: int = 200,
    min_rounds: int = 10,
    max_seconds: float = 20.0,
) -> list[dict[str, Any]]:
    """Time every candidate on batches of ``batch_sizes`` (real samples from ``example``, repeated
    to the size), with 1 thread and all threads (``threads``), in interleaved rounds: ``warmup``
    untimed, then up to ``rounds`` timed ones, stopping after ``max_seconds`` per setting once
    ``min_rounds`` are done. One row per candidate and setting."""
    threads = list(threads) if threads is not None else sorted({1, all_threads()})
    rows: list[dict[str, Any]] = []
    before = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            calls = _timers(candidates, n_threads)
            for batch in batch_sizes:
                reps = -(-batch // len(example))
                x = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch].contiguous().cpu()
                x_np = x.numpy()
                inputs = {c.label: (x if c.module is not None else x_np) for c in candidates}
                times: dict[str, list[float]] = {c.label: [] for c in candidates}
                rng = random.Random(0)
                with torch.inference_mode():
                    bursts = {}
                    for label, call in calls.items():
                        for _ in range(warmup):
                            t0 = time.perf_counter()
                            call(inputs[label])
                        once = time.perf_counter() - t0
                        bursts[label] = max(1, min(MAX_BURST, int(BURST_SECONDS / max(once, 1e-9))))
                    start = time.perf_counter()
                    labels = list(calls)
                    for i in range(rounds):
                        rng.shuffle(labels)  # a new order every round: no model always follows the same one
                        for label in labels:
                            n = bursts[label]
                            t0 = time.perf_counter()
                            for _ in range(n):
                                calls[label](inputs[label])
                            times[label].append((time.perf_counter() - t0) / n)
                        if i + 1 >= min_rounds and time.perf_counter() - start > max_seconds:
                            break
                for c in candidates:
                    ts = sorted(times[c.label])
                    rows.append(
                        {
                            "model": c.label,
                            "runtime": c.runtime,
                            "precision": c.precision,
                            "batch": batch,
                            "threads": n_threads,
                            "ms": 1000 * statistics.median(ts),
                            "ms_p10": 1000 * float(np.percentile(ts, 10)),
                            "ms_p90": 1000 * float(np.percentile(ts, 90)),
                            "rounds": len(ts),
                            "calls_per_round": bursts[c.label],
                        }
                    )
    finally:
        torch.set_num_threads(before)
    return add_ratios(rows)


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's speed-up over the PyTorch fp32 student (``vs_eager``) and over the teacher
    (``vs_teacher``), both timed in the same rounds."""
    for row in rows:
        same = [r for r in rows if r["batch"] == row["batch"] and r["threads"] == row["threads"]]
        for key, label in (("vs_eager", "student"), ("vs_teacher", "teacher")):
            ref = next((r for r in same if r["model"] == label), None)
            if ref is not None:
                row[key] = ref["ms"] / row["ms"]
    return rows


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | runtime | batch | threads | median ms | p10–p90 ms | × vs fp32 eager | × vs teacher |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        eager = f"{r['vs_eager']:.2f}×" if "vs_eager" in r else "—"
        teacher = f"{r['vs_teacher']:.2f}×" if "vs_teacher" in r else "—"
        lines.append(
            f"| {r['model']} | {r['runtime']} {r['precision']} | {r['batch']} | {r['threads']} | "
            f"{r['ms']:.3f} | {r['ms_p10']:.3f}–{r['ms_p90']:.3f} | {eager} | {teacher} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> str:
    """The CPU, the CPUs this process may use and the runtime versions (for a latency table)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (
        f"{cpu}, {all_threads()} CPUs available; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )
