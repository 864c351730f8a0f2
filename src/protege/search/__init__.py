"""Student architecture search without training: proxies, spaces, evolution and rank checks.

>>> from protege.search import load_search_config, search
>>> result = search(load_search_config("configs/search/resnet20-depth.yaml"))
>>> result.best.id, result.best.score

Importing this package registers the search-space builders ``resnet_depth`` and ``nb201`` with
:func:`protege.models.build_model`, so a run config can name a searched architecture.
"""

from __future__ import annotations

from typing import Any

from .config import SearchConfig, load_search_config, validate_search_config
from .evolution import Budget, Candidate, CandidateScorer, SearchHistory, random_search, regularized_evolution
from .rank import aggregate, correlate, kendall_tau, rank_correlations, spearman_rho
from .runner import SearchResult, pareto_front, search
from .spaces import ModelListSpace, MultiplierSpace, NB201Space, ResNetDepthSpace, SearchSpace

__all__ = [
    "Budget",
    "Candidate",
    "CandidateScorer",
    "ModelListSpace",
    "MultiplierSpace",
    "NB201Space",
    "ResNetDepthSpace",
    "SearchConfig",
    "SearchHistory",
    "SearchResult",
    "SearchSpace",
    "aggregate",
    "correlate",
    "get_proxy",
    "kendall_tau",
    "list_proxies",
    "load_search_config",
    "needs_teacher",
    "pareto_front",
    "random_search",
    "rank_correlations",
    "regularized_evolution",
    "search",
    "spearman_rho",
    "validate_search_config",
]

_PROXY_API = ("get_proxy", "list_proxies", "needs_teacher")


def __getattr__(name: str) -> Any:
    # proxies import the loss registry and the models' taps; load them only when asked for
    if name in _PROXY_API:
        from . import proxies

        return getattr(proxies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
