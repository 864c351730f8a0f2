"""What a model costs: parameters, FLOPs (``torch.utils.flop_counter``) and measured latency.

Like ``fidelity``, this module imports nothing else from protege so every layer may use it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not), shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


#: a model's input: one tensor, keyword tensors (``model(**example)``, e.g. an LM's input_ids and
#: mask), or a list of texts (a sentence encoder, which tokenizes inside)
Example = torch.Tensor | Mapping[str, torch.Tensor] | list[str]


def _to(example: Example, device: torch.device) -> Example:
    if isinstance(example, list):
        return example
    if isinstance(example, Mapping):
        return {k: v.to(device) for k, v in example.items()}
    return example.to(device)


def _call(model: nn.Module, example: Example) -> Any:
    return model(**example) if isinstance(example, Mapping) else model(example)


def _batch(example: Example) -> int:
    return len(next(iter(example.values()))) if isinstance(example, Mapping) else len(example)


def _first(example: Example) -> Example:
    return {k: v[:1] for k, v in example.items()} if isinstance(example, Mapping) else example[:1]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def count_flops(model: nn.Module, example: Example) -> int:
    """FLOPs of one forward pass on ``example`` (a multiply-add counts 2), per sample.

    Counted by PyTorch's ``FlopCounterMode`` (matmuls and convolutions; cheap element-wise ops are
    not counted), divided by the batch size of ``example``.
    """
    modes = {m: m.training for m in model.modules()}  # restore each module's own mode afterwards
    # Parameters frozen while counting: the counter's module tracker hooks every module output that
    # requires grad, and a view of a parameter taken under no_grad (SAM's prompt encoder reshapes its
    # embedding weights) requires grad without a grad_fn, which the tracker rejects.
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        for p in grads:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _call(model, _to(example, _model_device(model)))
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for p, flag in grads.items():
            p.requires_grad_(flag)
    return int(counter.get_total_flops() // max(_batch(example), 1))


def measure_latencies(
    models: Mapping[str, nn.Module],
    example: Example,
    warmup: int = 10,
    iters: int = 50,
    max_seconds: float = 10.0,
) -> dict[str, dict[str, Any]]:
    """Median forward latency (ms) of several models on ``example``, measured side by side.

    Each round times one forward of every model in turn, so load on a shared machine hits all
    models alike and their ratio (a speed-up) is fair. Runs in ``eval()`` under
    ``inference_mode`` after ``warmup`` untimed rounds; stops early after ``max_seconds`` of timed
    rounds. Returns, per model, ``{"ms": median, "ms_p90": …, "batch": n, "device": …,
    "threads": …, "runs": …}``.
    """
    modes = {sub: sub.training for m in models.values() for sub in m.modules()}
    devices = {name: _model_device(m) for name, m in models.items()}
    inputs = {name: _to(example, d) for name, d in devices.items()}
    times: dict[str, list[float]] = {name: [] for name in models}

    def run(name: str) -> float:
        t0 = time.perf_counter()
        _call(models[name], inputs[name])
        if devices[name].type == "cuda":
            torch.cuda.synchronize(devices[name])
        return time.perf_counter() - t0

    try:
        for m in models.values():
            m.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                for name in models:
                    run(name)
            start = time.perf_counter()
            for _ in range(iters):
                for name in models:
                    times[name].append(run(name))
                if time.perf_counter() - start > max_seconds:
                    break
    finally:
        for sub, mode in modes.items():  # each module's own mode, as it was
            sub.train(mode)
    result = {}
    for name, ts in times.items():
        ts.sort()
        result[name] = {
            "ms": 1000 * statistics.median(ts),
            "ms_p90": 1000 * ts[min(len(ts) - 1, int(0.9 * len(ts)))],
            "batch": _batch(example),
            "device": str(devices[name]),
            "threads": torch.get_num_threads(),
            "runs": len(ts),
        }
    return result


def measure_latency(
    model: nn.Module, example: Example, warmup: int = 10, iters: int = 50, max_seconds: float = 10.0
) -> dict[str, Any]:
    """Median forward latency (ms) of one model; see :func:`measure_latencies`."""
    return measure_latencies({"model": model}, example, warmup, iters, max_seconds)["model"]


def model_costs(
    models: Mapping[str, nn.Module], example: Example, latency: bool = True
) -> dict[str, dict[str, Any]]:
    """Params, FLOPs per sample and (optionally) batch-1 latency, measured side by side, per model.

    With a ``"teacher"`` among ``models``, every other entry also gets ``"speedup"`` (teacher
    latency / its latency) and ``"compression"`` (teacher params / its params).
    """
    one = _first(example)
    costs: dict[str, dict[str, Any]] = {
        name: {"params": count_params(m), "flops": count_flops(m, one)} for name, m in models.items()
    }
    if latency:
        for name, lat in measure_latencies(models, one).items():
            costs[name]["latency"] = lat
    teacher = costs.get("teacher")
    if teacher is not None:
        for name, cost in costs.items():
            if name != "teacher":
                cost["compression"] = teacher["params"] / cost["params"]
                if latency:
                    cost["speedup"] = teacher["latency"]["ms"] / cost["latency"]["ms"]
    return costs


def text_throughput(
    models: Mapping[str, nn.Module],
    texts: list[str],
    batch_sizes: tuple[int, ...] = (1, 64),
    threads: tuple[int | None, ...] = (1, None),
    max_seconds: float = 10.0,
    iters: int = 30,
) -> dict[str, dict[str, float]]:
    """Sentences per second of text models (``model(list_of_texts)``), measured side by side.

    For each thread count (``None``: all of ``torch.get_num_threads()`` at call time) and batch size,
    the models encode the same ``batch`` texts (the first of ``texts``, cycled) in turn, round after
    round (:func:`measure_latencies`), so a busy machine slows all of them alike. Returns
    ``{model: {"t1_b1": sentences/s, "t1_b64": …, "tall_b1": …, …}}`` and, with a ``"teacher"``
    among ``models``, ``"speedup_t1_b1"`` … (the teacher's time / the model's) for the others.
    """
    if not texts:
        raise ValueError("text_throughput needs at least one text")
    all_threads = torch.get_num_threads()
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    try:
        for n in threads:
            torch.set_num_threads(all_threads if n is None else n)
            tag = "tall" if n is None else f"t{n}"
            for b in batch_sizes:
                batch = [texts[i % len(texts)] for i in range(b)]
                lat = measure_latencies(models, batch, warmup=2, iters=iters, max_seconds=max_seconds)
                for name, m in lat.items():
                    out[name][f"{tag}_b{b}"] = b / (m["ms"] / 1000.0)
    finally:
        torch.set_num_threads(all_threads)
    if "teacher" in out:
        for name, row in out.items():
            if name != "teacher":
                for key in list(row):
                    row[f"speedup_{key}"] = row[key] / out["teacher"][key]
    return out
