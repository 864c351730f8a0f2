"""Fidelity of a student to its teacher, and calibration: pure functions on logits.

Following Stanton et al. (NeurIPS 2021, "Does Knowledge Distillation Really Work?"), a student is
judged both by generalization (accuracy against labels) and by *fidelity* (how closely it matches
the teacher's predictive distribution). All functions take logits of shape (N, C) and return
Python floats. This module imports nothing else from protege, so tasks may use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, target: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy: share of samples whose label is among the k largest logits."""
    k = min(k, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    return (topk == target.unsqueeze(-1)).any(dim=-1).float().mean().item()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Top-1 agreement: share of samples where student and teacher predict the same class."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def predictive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean KL(p_teacher ‖ p_student) = mean_i Σ_c p_t(c|x_i) (log p_t(c|x_i) − log p_s(c|x_i)), in nats."""
    log_pt = F.log_softmax(teacher_logits.double(), dim=-1)
    log_ps = F.log_softmax(student_logits.double(), dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean().item()


def nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels, in nats."""
    return F.cross_entropy(logits.double(), target).item()


def reliability(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """The data of a reliability diagram (Guo et al., ICML 2017): per equal-width confidence bin.

    Bin b holds the samples whose top-1 confidence falls in ((b−1)/n_bins, b/n_bins]. Returns
    float64 tensors of length ``n_bins``: ``"count"`` (samples in the bin), ``"acc"`` (their
    accuracy) and ``"conf"`` (their mean confidence), the latter two 0 for an empty bin; and
    ``"edges"`` (length ``n_bins + 1``).
    """
    probs = logits.double().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == target).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize with right=False puts conf in bin i where edges[i-1] < conf <= edges[i]
    index = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    safe = count.clamp_min(1)
    return {"edges": edges, "count": count, "acc": hits / safe, "conf": conf_sum / safe}


def ece(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., ICML 2017), equal-width confidence bins.

    ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|, where bin b holds the samples whose top-1
    confidence falls in ((b−1)/n_bins, b/n_bins] (see :func:`reliability`).
    """
    bins = reliability(logits, target, n_bins)
    weight = bins["count"] / bins["count"].sum()
    return (weight * (bins["acc"] - bins["conf"]).abs()).sum().item()


def classification_report(
    student_logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy, top-5, NLL and ECE of the student; agreement and KL(teacher‖student) when a teacher is given."""
    report = {
        "acc": accuracy(student_logits, target),
        "top5": accuracy(student_logits, target, k=5),
        "nll": nll(student_logits, target),
        "ece": ece(student_logits, target),
    }
    if teacher_logits is not None:
        report["agreement"] = agreement(student_logits, teacher_logits)
        report["kl"] = predictive_kl(teacher_logits, student_logits)
        report["teacher_acc"] = accuracy(teacher_logits, target)
    return report
