"""Short constructors for the common terms: ``pg.ce(0.1)``, ``pg.kd(0.9, T=4)``, ``pg.dkd(1.0)``.

Each returns a :class:`~protege.core.distiller.Term`; ``pg.term(name, weight, **params)`` builds
any registered loss by name. Defaults are the papers' (see each loss's docstring).
"""

from __future__ import annotations

from typing import Any

from .core.distiller import Term


def term(loss: str, weight: float = 1.0, **kwargs: Any) -> Term:
    """Any registered loss as a term (``kwargs``: ``student=``, ``teacher=``, ``warmup=`` and loss params)."""
    return Term(loss, weight, **kwargs)


def ce(weight: float = 1.0, label_smoothing: float = 0.0) -> Term:
    """Cross-entropy against the labels."""
    return Term("ce", weight, label_smoothing=label_smoothing)


def kd(weight: float = 1.0, T: float = 4.0, standardize: bool = False, **kwargs: Any) -> Term:
    """Hinton KD on logits; ``standardize=True`` z-scores logits first (logit standardization)."""
    return Term("kd", weight, T=T, standardize=standardize, **kwargs)


def dkd(
    weight: float = 1.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    warmup: float = 20.0,
    standardize: bool = False,
    **kwargs: Any,
) -> Term:
    """Decoupled KD (target/non-target); the weight ramps up over ``warmup`` epochs as in the paper."""
    return Term("dkd", weight, alpha=alpha, beta=beta, T=T, warmup=warmup, standardize=standardize, **kwargs)


def dist(weight: float = 1.0, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0, **kwargs: Any) -> Term:
    """DIST: inter- and intra-class Pearson correlation of probabilities."""
    return Term("dist", weight, beta=beta, gamma=gamma, T=T, **kwargs)


def ctkd(weight: float = 1.0, **kwargs: Any) -> Term:
    """Curriculum temperature KD: a learned temperature trained adversarially (gradient reversal)."""
    return Term("ctkd", weight, **kwargs)


def multi_kd(weight: float = 1.0, T: float = 4.0, standardize: bool = False, **kwargs: Any) -> Term:
    """KD towards the weighted average of several teachers' distributions."""
    return Term("multi_kd", weight, T=T, standardize=standardize, **kwargs)


def fitnet(
    student: str, teacher: str, weight: float = 1.0, adapter: str = "conv_bn_relu", **kwargs: Any
) -> Term:
    """FitNets hint: MSE between a regressed student tap and a teacher tap (regressor built from shapes)."""
    return Term("fitnet", weight, student=student, teacher=teacher, adapter=adapter, **kwargs)


def at(student: str, teacher: str, weight: float = 1000.0, p: float = 2.0, **kwargs: Any) -> Term:
    """Attention transfer between two feature-map taps (weight 1000 as in RepDistiller)."""
    return Term("at", weight, student=student, teacher=teacher, p=p, **kwargs)
