"""Shared pieces of the tests' independent references: float64 tensors, seeded arrays, and
adaptive average pooling written from its definition (plain loops, no torch code path)."""

from __future__ import annotations

import numpy as np
import torch


def t64(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    """A float64 tensor of ``a`` (optionally requiring grad)."""
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Seeded standard-normal values of ``shape``, times ``scale``."""
    return np.random.default_rng(seed).normal(size=shape) * scale


def np_adaptive_pool(f: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Adaptive average pooling by its definition: window [floor(i*H/o), ceil((i+1)*H/o))."""
    n, c, h, w = f.shape
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        h0, h1 = (i * h) // out_h, -(-((i + 1) * h) // out_h)
        for j in range(out_w):
            w0, w1 = (j * w) // out_w, -(-((j + 1) * w) // out_w)
            out[:, :, i, j] = f[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out
