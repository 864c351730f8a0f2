"""What a model costs: parameters, FLOPs (``torch.utils.flop_counter``) and measured latency.

Like ``fidelity``, this module imports nothing else from protege so every layer may use it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not), shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (a multiply-add counts 2), per sample.

    Counted by PyTorch's ``FlopCounterMode`` (matmuls and convolutions; cheap element-wise ops are
    not counted), divided by the batch size of ``example``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example.to(_model_device(model)))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // max(len(example), 1))


def measure_latency(
    model: nn.Module, example: torch.Tensor, warmup: int = 10, iters: int = 50, max_seconds: float = 10.0
) -> dict[str, Any]:
    """Median forward latency in milliseconds on ``example`` after ``warmup`` untimed runs.

    Runs in ``eval()`` under ``inference_mode``; stops early after ``max_seconds`` of timed runs.
    Returns ``{"ms": median, "ms_p90": …, "batch": n, "device": …, "threads": …, "runs": …}``.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    x = example.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - t0)
                if time.perf_counter() - start > max_seconds:
                    break
    finally:
        model.train(was_training)
    times.sort()
    return {
        "ms": 1000 * statistics.median(times),
        "ms_p90": 1000 * times[min(len(times) - 1, int(0.9 * len(times)))],
        "batch": len(x),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "runs": len(times),
    }


def model_cost(model: nn.Module, example: torch.Tensor, latency: bool = True) -> dict[str, Any]:
    """Params, FLOPs per sample and (optionally) batch-1 latency of ``model`` on ``example``'s shape."""
    one = example[:1]
    cost: dict[str, Any] = {"params": count_params(model), "flops": count_flops(model, one)}
    if latency:
        cost["latency"] = measure_latency(model, one)
    return cost
