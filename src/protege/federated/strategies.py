r"""Federated strategies: what clients share, how the server fuses it, how clients take it in.

Notation: ``N`` clients; a public unlabeled *transfer set* of ``n`` samples; ``C`` classes.
Client ``j``'s *knowledge* is ``P_j ∈ R^{n×C}``, the softmax of its model on the transfer set
(rows on the simplex). Every local optimisation goes through protege's
:class:`~protege.core.distiller.Distiller`: local training with the ``ce`` term, distillation
towards a target with the ``kd`` term (Hinton et al., 2015) reading the target from the batch
(``cached_teachers=1``), so no KD is re-implemented here.

**KnFu** — Seyedmohammadi, Atapour, Abouei & Mohammadi, "KnFu: Effective Knowledge Fusion",
arXiv:2403.11892 (2024). Each round: local training → knowledge extraction → effective knowledge
fusion on the server → local fine-tuning on the fused knowledge. The server measures how well
client ``j``'s knowledge matches client ``i``'s by the mean divergence over the transfer set and
turns it into effectiveness weights with sharpness ``β`` (paper: 10):

.. math::

    D_{ij} = \frac1n \sum_{x} \mathrm{KL}\big(P_i(x)\,\|\,P_j(x)\big), \qquad
    w_{ij} = \frac{\exp(-\beta D_{ij})}{\sum_{k \in \mathcal N_i} \exp(-\beta D_{ik})}
    \ (j \in \mathcal N_i), \qquad
    \hat P_i = \sum_{j \in \mathcal N_i} w_{ij} P_j .

Client ``i`` then minimises ``T² · KL(softmax(log \hat P_i / T) ‖ softmax(z_i / T))`` on the
transfer set. Choices the paper leaves open are parameters (defaults in brackets): the
divergence (``"kl"`` as above, or ``"js"``, the symmetric Jensen–Shannon) [kl]; the semantic
neighbourhood ``𝒩_i`` — all clients, soft-weighted, or the ``neighbours`` nearest by ``D_ij``
[all]; whether ``i ∈ 𝒩_i`` (``include_self``) [yes]; the client temperature ``T`` [1].
With ``β = 10`` a client whose predictions diverge from client ``i``'s by even 0.5 nats gets
``e^{-5} ≈ 0.7 %`` of the weight of one that agrees: only effective knowledge is fused.

**FedMD** — Li & Wang, "FedMD: Heterogeneous Federated Learning via Model Distillation",
NeurIPS 2019 FL workshop (arXiv:1910.03581): the same loop with the plain consensus
``\bar P = \frac1N \sum_j P_j`` as every client's target (probabilities are averaged, the
paper's "class scores").

**FedAvg** — McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017: ``θ = Σ_k n_k θ_k / Σ_k n_k`` over floating-point tensors
(integer buffers such as BatchNorm's ``num_batches_tracked`` are taken from the largest client).

**FedDF** — Lin, Kong, Stich & Jaggi, "Ensemble Distillation for Robust Model Fusion in
Federated Learning", NeurIPS 2020: FedAvg within each group of same-architecture clients, then
each group's averaged model is distilled on the unlabeled transfer set towards the ensemble of
*all* received client models (mean of their logits), with Adam (paper: lr 1e-3) and
``T² · KL(softmax(z̄/T) ‖ softmax(z/T))``; the fused model of a group goes back to its clients.

**local** — no communication of knowledge or weights: each client trains on its own data only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..core.distiller import Distiller, Term

Divergence = Literal["kl", "js"]

#: smallest probability used inside logarithms (knowledge arrives as float32 probabilities)
EPS = 1e-8


# ----------------------------------------------------------------------------- fusion (server)


def divergence_matrix(knowledge: Tensor, divergence: Divergence = "kl") -> Tensor:
    """``D[i, j]``: mean over the transfer set of ``KL(P_i ‖ P_j)`` (``"kl"``) or of the
    Jensen–Shannon divergence ``½KL(P_i ‖ M) + ½KL(P_j ‖ M)``, ``M = ½(P_i + P_j)`` (``"js"``).

    Args:
        knowledge: ``(N, n, C)`` probabilities, one ``(n, C)`` block per client.
    """
    if knowledge.ndim != 3:
        raise ValueError(f"knowledge must be (clients, samples, classes), got shape {tuple(knowledge.shape)}")
    p = knowledge.double().clamp_min(EPS)
    p = p / p.sum(-1, keepdim=True)
    logp = p.log()
    if divergence == "kl":
        # KL(P_i || P_j) = Σ_c p_i (log p_i − log p_j), averaged over samples
        cross = torch.einsum("isc,jsc->ij", p, logp) / p.shape[1]
        own = (p * logp).sum(-1).mean(-1)
        return (own[:, None] - cross).clamp_min(0).float()
    if divergence == "js":
        m = 0.5 * (p[:, None] + p[None, :])  # (N, N, n, C)
        logm = m.log()
        kl_im = (p[:, None] * (logp[:, None] - logm)).sum(-1).mean(-1)
        kl_jm = (p[None, :] * (logp[None, :] - logm)).sum(-1).mean(-1)
        return (0.5 * (kl_im + kl_jm)).clamp_min(0).float()
    raise ValueError(f"unknown divergence {divergence!r}; choose 'kl' or 'js'")


def knfu_weights(
    knowledge: Tensor,
    beta: float = 10.0,
    divergence: Divergence = "kl",
    neighbours: int | None = None,
    include_self: bool = True,
) -> Tensor:
    """KnFu effectiveness weights ``w[i, j]`` (rows sum to one; see the module docstring).

    Args:
        knowledge: ``(N, n, C)`` client probabilities on the transfer set.
        beta: sharpness ``β`` (paper: 10); larger keeps only the closest clients.
        divergence: ``"kl"`` or ``"js"`` (:func:`divergence_matrix`).
        neighbours: keep only the ``k`` clients nearest to ``i`` (by ``D[i, j]``, ``i`` itself
            counted when ``include_self``); ``None`` keeps all.
        include_self: whether client ``i``'s own knowledge enters its fused target.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    d = divergence_matrix(knowledge, divergence)
    n_clients = d.shape[0]
    logits = -beta * d
    mask = torch.ones_like(d, dtype=torch.bool)
    if not include_self:
        if n_clients == 1:
            raise ValueError("include_self=False needs at least two clients")
        mask &= ~torch.eye(n_clients, dtype=torch.bool)
    if neighbours is not None:
        k = min(neighbours, int(mask.sum(1).min()))
        ranked = logits.masked_fill(~mask, float("-inf")).topk(k, dim=1).indices
        mask = torch.zeros_like(mask).scatter_(1, ranked, True)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def fuse(knowledge: Tensor, weights: Tensor) -> Tensor:
    """Personalised targets ``\\hat P_i = Σ_j w[i, j] P_j``: ``(N, n, C)`` from ``(N, n, C)`` and ``(N, N)``."""
    fused = torch.einsum("ij,jsc->isc", weights.to(knowledge.dtype), knowledge)
    return fused / fused.sum(-1, keepdim=True).clamp_min(EPS)


def consensus(knowledge: Tensor) -> Tensor:
    """FedMD's consensus ``\\bar P = mean_j P_j``: ``(n, C)`` from ``(N, n, C)``."""
    return knowledge.mean(0)


def fedavg(states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int]) -> dict[str, Tensor]:
    """FedAvg: the ``num_examples``-weighted mean of floating-point tensors; other tensors (integer
    buffers) are copied from the client with most examples."""
    if not states or len(states) != len(num_examples):
        raise ValueError("fedavg needs one state per client and one example count per state")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("fedavg: the clients hold no examples")
    largest = states[int(np.argmax(num_examples))]
    out: dict[str, Tensor] = {}
    for key, ref in largest.items():
        if ref.is_floating_point():
            out[key] = sum(s[key].double() * (n / total) for s, n in zip(states, num_examples)).to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


# ----------------------------------------------------------------------------- local optimisation


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def _optimise(
    distiller: Distiller,
    batches: Sequence[tuple[Tensor, Tensor | None, dict[str, object]]],
    optimizer: torch.optim.Optimizer,
) -> float:
    """One pass of ``sum(losses).backward(); step`` over ``batches``; the mean total loss."""
    distiller.train()
    total = 0.0
    for batch in batches:
        _, losses = distiller(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        total += float(loss.detach())  # type: ignore[union-attr]
    return total / max(len(batches), 1)


def train_local(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
) -> float:
    """Train ``model`` on the client's private ``(x, y)`` with the ``ce`` term; the last epoch's mean loss."""
    distiller = Distiller(model, terms=[Term("ce", 1.0)])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    loss = float("nan")
    try:
        for _ in range(epochs):
            loss = _optimise(distiller, [(x[b], y[b], {}) for b in _batches(len(y), batch_size, gen)], opt)
    finally:
        distiller.close()
    return loss


def distill_towards(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.01,
    T: float = 1.0,
    optimizer: Literal["sgd", "adam"] = "sgd",
    momentum: float = 0.9,
    target_is_logits: bool = False,
    seed: int = 0,
) -> float:
    """Distill ``model`` on the unlabeled ``x`` towards ``target`` with protege's ``kd`` term.

    ``target`` is ``(n, C)`` probabilities (a fused knowledge; passed to ``kd`` as log-probabilities,
    which are logits of the same distribution) or, with ``target_is_logits``, logits (FedDF's
    ensemble). Returns the last epoch's mean loss.
    """
    teacher = target.float() if target_is_logits else target.float().clamp_min(EPS).log()
    distiller = Distiller(model, terms=[Term("kd", 1.0, T=T)], cached_teachers=1)
    params = list(model.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=lr, momentum=momentum)
    )
    gen = torch.Generator().manual_seed(seed)
    loss = float("nan")
    try:
        for _ in range(epochs):
            batches = [
                (x[b], None, {"teacher_outputs": [{"logits": teacher[b]}]})
                for b in _batches(len(x), batch_size, gen)
            ]
            loss = _optimise(distiller, batches, opt)
    finally:
        distiller.close()
    return loss


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """``model``'s logits on ``x`` in ``eval()`` mode (the mode it was in is restored)."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(chunk) for chunk in x.split(batch_size)]).float()
    finally:
        model.train(was)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (``nan`` for an empty set)."""
    if len(y) == 0:
        return float("nan")
    return float((predict_logits(model, x).argmax(1) == y).float().mean())
