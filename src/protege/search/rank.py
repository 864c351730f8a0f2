"""How well a proxy ranks architectures: Kendall τ and Spearman ρ against ground truth (scipy).

Kendall's τ-b counts concordant minus discordant pairs (ties corrected); Spearman's ρ is the
Pearson correlation of the ranks. Both are 1 for the same order and -1 for the reversed one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from scipy import stats

from ..errors import ProtegeError

__all__ = ["aggregate", "correlate", "kendall_tau", "rank_correlations", "spearman_rho"]


def _check(scores: Sequence[float], truth: Sequence[float]) -> tuple[list[float], list[float]]:
    a, b = [float(s) for s in scores], [float(t) for t in truth]
    if len(a) != len(b):
        raise ProtegeError(f"scores and ground truth differ in length ({len(a)} vs {len(b)})")
    if len(a) < 2:
        raise ProtegeError(f"a rank correlation needs at least 2 architectures, got {len(a)}")
    if any(math.isnan(x) for x in a + b):
        raise ProtegeError("scores or ground truth hold NaN; drop the failed candidates first")
    return a, b


def kendall_tau(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Kendall's τ-b between ``scores`` and ``truth`` (``scipy.stats.kendalltau``); NaN if either is constant."""
    a, b = _check(scores, truth)
    return float(stats.kendalltau(a, b).statistic)


def spearman_rho(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's ρ between ``scores`` and ``truth`` (``scipy.stats.spearmanr``); NaN if either is constant."""
    a, b = _check(scores, truth)
    return float(stats.spearmanr(a, b).statistic)


def rank_correlations(scores: Sequence[float], truth: Sequence[float]) -> dict[str, float]:
    """``{"kendall": τ, "spearman": ρ}``."""
    return {"kendall": kendall_tau(scores, truth), "spearman": spearman_rho(scores, truth)}


def correlate(scores: Mapping[str, float], truth: Mapping[str, float]) -> dict[str, float]:
    """:func:`rank_correlations` over the architecture ids both mappings hold (``"n"``: how many)."""
    ids = sorted(set(scores) & set(truth))
    result = rank_correlations([scores[i] for i in ids], [truth[i] for i in ids])
    return {**result, "n": len(ids)}


def aggregate(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each statistic over runs (batches or seeds).

    ``[{"kendall": 0.5, ...}, {"kendall": 0.7, ...}]`` → ``{"kendall": {"mean": 0.6, "std": 0.141, "n": 2}, ...}``;
    the std of a single run is 0.
    """
    if not runs:
        raise ProtegeError("nothing to aggregate: give at least one run's correlations")
    out: dict[str, dict[str, float]] = {}
    for key in runs[0]:
        values = [float(r[key]) for r in runs]
        out[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }
    return out
