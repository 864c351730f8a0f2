"""Representation similarity: linear centered kernel alignment (CKA) between layers.

Kornblith et al. (ICML 2019, "Similarity of Neural Network Representations Revisited"): for
representations X (n × p) and Y (n × q) of the same n inputs, with every column centered,

    CKA(X, Y) = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F)
              = ⟨K_c, L_c⟩_F / (‖K_c‖_F · ‖L_c‖_F),   K_c = H X Xᵀ H, L_c = H Y Yᵀ H, H = I − 11ᵀ/n.

It lies in [0, 1], is 1 for X against itself, and is invariant to orthogonal transforms and
isotropic scaling of either side (not to arbitrary invertible linear maps), so layers of
different widths — a teacher's and a student's — can be compared. With one feature on each side
it is the squared Pearson correlation. Like ``fidelity``, this module imports nothing else from
protege.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class _Centered:
    """A representation flattened to (n, features), centered, with its self-similarity norm."""

    def __init__(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(len(x), -1).double()
        self.x = x - x.mean(0, keepdim=True)
        n, p = self.x.shape
        # ‖XᵀX‖_F = ‖XXᵀ‖_F: use the smaller of the two products
        self.gram = self.x @ self.x.T if n <= p else None
        self.norm = (self.gram if self.gram is not None else self.x.T @ self.x).norm().item()

    def cross(self, other: _Centered) -> float:
        """‖Yᵀ X‖²_F = ⟨XXᵀ, YYᵀ⟩_F."""
        if self.gram is not None and other.gram is not None:
            return (self.gram * other.gram).sum().item()
        return (other.x.T @ self.x).square().sum().item()


def _cka(a: _Centered, b: _Centered) -> float:
    if a.norm == 0 or b.norm == 0:  # a constant representation: similarity is undefined
        return float("nan")
    return a.cross(b) / (a.norm * b.norm)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same inputs (first dimension: the inputs).

    Any trailing shape is flattened (a feature map ``(n, C, H, W)`` is ``n`` vectors of ``C·H·W``).
    Computed in float64. Returns NaN when either side is constant over the inputs.
    """
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same inputs on both sides: got {len(x)} and {len(y)} rows")
    return _cka(_Centered(x), _Centered(y))


def cka_matrix(rows: Mapping[str, torch.Tensor], cols: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every representation in ``rows`` and every one in ``cols``.

    Returns a float64 tensor of shape ``(len(rows), len(cols))``, in the mappings' order (e.g.
    teacher taps × student taps). Each representation is centered once.
    """
    left = {k: _Centered(v) for k, v in rows.items()}
    right = {k: _Centered(v) for k, v in cols.items()}
    for name, rep in (*left.items(), *right.items()):
        if len(rep.x) != len(next(iter(left.values())).x):
            raise ValueError(f"CKA needs the same inputs everywhere: {name!r} has {len(rep.x)} rows")
    return torch.tensor([[_cka(a, b) for b in right.values()] for a in left.values()], dtype=torch.float64)
