"""The relation family of distillation losses: SP, CC, RKD and PKT.

These losses transfer the *relations between the samples of a batch* (similarities, distances,
angles, conditional probabilities) rather than the samples' representations themselves. Each is a
pure function of a student and a teacher tensor of per-sample embeddings ``(N, D)`` returning a
scalar, registered by name with :func:`~protege.losses.registry.register_loss` and
``reads="embeddings"``. A higher-rank input ``(N, C, H, W)`` (or any ``(N, ...)``) is flattened to
``(N, C*H*W)`` first, as the papers and their reference code do for feature maps.

Every relation is an ``N x N`` (or ``N x N x N``) matrix whatever the embedding width, so the student
and teacher widths ``D_s`` and ``D_t`` may differ and no adapter is needed; only the batch size must
match. The batch matters: these losses see the other samples of the batch, so their value depends on
the batch size and composition.

Normalisations follow the authors' released code (or RepDistiller's / torchdistill's port of it),
so that the term weights of published recipes carry over; each docstring states how that differs
from the paper's formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss

__all__ = ["cc", "correlation_matrix", "pkt", "rkd", "sp"]


# --------------------------------------------------------------------------- helpers


def _flat_pair(student: Tensor, teacher: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Both tensors flattened to (N, D), after checking they are (N, ...) with the same N."""
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{loss}: student embeddings {tuple(student.shape)} and teacher embeddings "
            f"{tuple(teacher.shape)} must be (N, D) (or (N, C, H, W), flattened) with the same batch size N"
        )
    return student.flatten(1), teacher.flatten(1)


# --------------------------------------------------------------------------- SP


@register_loss(
    "sp",
    paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019",
    reads="embeddings",
)
def sp(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    r"""Similarity-Preserving KD: match the row-normalised batch similarity matrices.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. With ``Q`` the (N, D)
    matrix of flattened features, the similarity matrix is ``G~ = Q Q^T`` (N x N) and ``G`` its
    row-wise L2 normalisation, ``G[i, :] = G~[i, :] / ||G~[i, :]||_2``:

        L = 1/N^2 * || G^t - G^s ||_F^2

    exactly as in the paper and in RepDistiller's port (verified by the paper's author). The paper
    multiplies by ``gamma`` (3000 on CIFAR-10); that is the term weight. Invariant to scaling either
    representation by a positive factor.

    Shapes: (N, D_s) and (N, D_t), or (N, C, H, W) maps, flattened to (N, C*H*W). The widths may
    differ (``G`` is N x N), so no adapter is needed; the batch sizes must match.
    """
    fs, ft = _flat_pair(student_embeddings, teacher_embeddings, "sp")
    n = fs.shape[0]
    gs = F.normalize(fs @ fs.t(), p=2.0, dim=1)
    gt = F.normalize(ft @ ft.t(), p=2.0, dim=1)
    return (gt - gs).pow(2).sum() / (n * n)


# --------------------------------------------------------------------------- CC


def correlation_matrix(
    embeddings: Tensor, kernel: str = "gaussian", gamma: float = 0.4, P: int = 2
) -> Tensor:
    """CCKD's N x N correlation matrix of L2-normalised (N, D) embeddings.

    ``"gaussian"``: the RBF kernel ``exp(-gamma ||x - y||^2)`` expanded as a ``P``-order Taylor
    series, ``sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! * (x . y)^p`` (exact for unit vectors as
    ``P -> inf``); ``"bilinear"``: ``x . y`` (the cosine similarity).
    """
    x = F.normalize(embeddings, p=2.0, dim=1)
    sim = x @ x.t()
    if kernel == "bilinear":
        return sim
    corr = torch.zeros_like(sim)
    for p in range(P + 1):
        corr = corr + (math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p)) * sim.pow(p)
    return corr


@register_loss(
    "cc",
    paper="Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, Correlation Congruence for Knowledge Distillation, "
    "ICCV 2019",
    reads="embeddings",
)
def cc(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    P: int = 2,
) -> Tensor:
    r"""Correlation Congruence: match the kernel correlation matrices of the batch's embeddings.

    Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for Knowledge Distillation",
    ICCV 2019. The embeddings are L2-normalised and the N x N correlation matrix is
    ``C_ij = k(x_i, x_j)`` (:func:`correlation_matrix`). Default kernel: the paper's Gaussian RBF
    ``exp(-gamma ||x_i - x_j||^2)``, which for unit vectors equals ``exp(-2 gamma) exp(2 gamma x_i . x_j)``,
    approximated by the ``P``-order Taylor series

        C_ij = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! * (x_i . x_j)^p

    with the paper's ``P = 2``, ``gamma = 0.4`` (also torchdistill's CCKD setting).
    ``kernel="bilinear"`` uses ``C_ij = x_i . x_j`` instead (``gamma`` and ``P`` unused). Then

        L = 1/N^2 * || C^s - C^t ||_F^2

    the paper's normalisation, i.e. the mean squared difference over the N^2 entries
    (torchdistill's port divides the *unsquared* Frobenius norm by N^2 instead; RepDistiller ships a
    different, author-provided variant). The paper's total loss weights this by ``beta`` (the term
    weight) next to CE and KD.

    Shapes: (N, D_s) and (N, D_t), or (N, C, H, W) maps, flattened. The widths may differ, so no
    adapter is needed; the paper embeds both penultimate features with a fully connected layer
    first, which would be the term's adapter on the student side.
    """
    if kernel not in ("gaussian", "bilinear"):
        raise ValueError(f"cc: kernel must be 'gaussian' or 'bilinear', got {kernel!r}")
    if int(P) != P or P < 0:
        raise ValueError(f"cc: the Taylor order P must be a non-negative integer, got {P}")
    fs, ft = _flat_pair(student_embeddings, teacher_embeddings, "cc")
    cs = correlation_matrix(fs, kernel, gamma, int(P))
    ct = correlation_matrix(ft, kernel, gamma, int(P))
    return (cs - ct).pow(2).mean()


# --------------------------------------------------------------------------- RKD


def _normalized_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise Euclidean distances of the rows of ``x`` divided by their mean over pairs ``i != j``.

    Distances come from ``|x_i|^2 + |x_j|^2 - 2 x_i . x_j`` clamped at ``eps`` before the square root
    (so the gradient stays finite), with the diagonal set to exactly 0.
    """
    n = x.shape[0]
    sq = x.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())).clamp_min(eps).sqrt()
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    d = torch.where(eye, torch.zeros_like(d), d)
    mean = d.sum() / (n * (n - 1))
    return d / mean.clamp_min(eps)


def _angles(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``a[j, i, k] = cos`` of the angle at ``x_j`` between ``x_i - x_j`` and ``x_k - x_j`` (N, N, N).

    Degenerate triplets (``i == j`` or ``k == j``, or duplicate samples ``x_i == x_j``) give a zero
    vector, hence a cosine of 0, and no gradient through it (as the clamped distance of a duplicate
    pair): ``F.normalize`` would hand a zero difference ``1 / eps`` (1e12) times its upstream gradient.
    """
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[j, i] = x_i - x_j
    norm = diff.norm(p=2, dim=2, keepdim=True)
    e = torch.where(norm > eps, diff / norm.clamp_min(eps), torch.zeros_like(diff))  # unit(x_i - x_j)
    return torch.bmm(e, e.transpose(1, 2))


@register_loss(
    "rkd",
    paper="Park, Kim, Lu & Cho, Relational Knowledge Distillation, CVPR 2019",
    reads="embeddings",
)
def rkd(
    student_embeddings: Tensor, teacher_embeddings: Tensor, w_dist: float = 25.0, w_angle: float = 50.0
) -> Tensor:
    r"""Relational KD: match the batch's normalised pairwise distances and triplet angles.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019. With ``l`` the Huber loss
    (smooth L1, ``delta = 1``):

        psi_D(i, j)    = ||x_i - x_j||_2 / mu,   mu = mean over pairs i != j of ||x_i - x_j||_2
        psi_A(i, j, k) = < unit(x_i - x_j), unit(x_k - x_j) >        (cosine of the angle at x_j)
        L = w_dist * mean_{i,j} l(psi_D^s, psi_D^t) + w_angle * mean_{i,j,k} l(psi_A^s, psi_A^t)

    The paper sums over pairs and triplets; like the authors' code (and RepDistiller) this averages
    over all ``N^2`` pairs and ``N^3`` triplets, the degenerate ones (``i == j``; ``i == j`` or
    ``k == j``) included, where both sides are 0. The defaults ``w_dist = 25``, ``w_angle = 50`` are the
    paper's weights for that averaged form. Each normaliser ``mu`` is computed from its own network's
    distances. Invariant to translating, rotating or uniformly scaling either embedding.

    Shapes: (N, D_s) and (N, D_t), or (N, C, H, W) maps, flattened; needs ``N >= 2`` (angles need
    ``N >= 3`` to be non-trivial). The widths may differ, so no adapter is needed. The angle term
    builds an (N, N, D) tensor of differences and an (N, N, N) one of cosines; a weight of 0 skips
    its term.
    """
    fs, ft = _flat_pair(student_embeddings, teacher_embeddings, "rkd")
    if fs.shape[0] < 2:
        raise ValueError(
            f"rkd: needs a batch of at least 2 samples, got student {tuple(student_embeddings.shape)} "
            f"and teacher {tuple(teacher_embeddings.shape)}"
        )
    loss = fs.new_zeros(())
    if w_dist != 0:
        loss = loss + w_dist * F.smooth_l1_loss(_normalized_distances(fs), _normalized_distances(ft))
    if w_angle != 0:
        loss = loss + w_angle * F.smooth_l1_loss(_angles(fs), _angles(ft))
    return loss


# --------------------------------------------------------------------------- PKT


@register_loss(
    "pkt",
    paper="Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018",
    reads="embeddings",
)
def pkt(student_embeddings: Tensor, teacher_embeddings: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic Knowledge Transfer: KL between the teacher's and student's conditional similarity laws.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    ECCV 2018. With the cosine-similarity kernel ``K(a, b) = (1 + cos(a, b)) / 2`` over the batch,
    the conditional probabilities ``p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)`` (teacher ``p``,
    student ``q``, rows normalised to sum to 1):

        L = 1/N^2 * sum_i sum_j p_{j|i} log( (p_{j|i} + eps) / (q_{j|i} + eps) )

    This is the authors' code (and RepDistiller's copy of it): rows are divided by ``norm + eps``
    before the cosine, the sum over ``k`` includes ``k = i``, and the KL terms are *averaged* over
    the ``N^2`` entries (i.e. the batch mean of the row KL divergences, divided by ``N``); the paper
    sums them, over pairs ``i != j`` with ``k != i`` in the normaliser. ``eps = 1e-7`` as in that
    code. RepDistiller's CIFAR recipe weights the term by 30000.

    Shapes: (N, D_s) and (N, D_t), or (N, C, H, W) maps, flattened. The widths may differ, so no
    adapter is needed; the batch sizes must match.
    """
    fs, ft = _flat_pair(student_embeddings, teacher_embeddings, "pkt")

    def conditional(x: Tensor) -> Tensor:
        x = x / (x.norm(p=2, dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    q = conditional(fs)
    p = conditional(ft)
    return (p * torch.log((p + eps) / (q + eps))).mean()
