"""Metrics: pure functions on models and their outputs, used by tasks, the engine and the report.

- :mod:`~protege.metrics.fidelity`: agreement, predictive KL, ECE, NLL, reliability (from logits);
- :mod:`~protege.metrics.cost`: parameters, FLOPs and measured latency of a model;
- :mod:`~protege.metrics.cka`: linear centered kernel alignment between representations.
"""
