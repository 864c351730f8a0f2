"""The contrastive family of distillation losses: CRD with its momentum memory bank, and KD³'s
MixDistribution contrast (:func:`kd3_contrast`, at the end of this module).

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020. The student learns
to tell, for each sample, the teacher's representation of *that* sample (the positive) from the
teacher's representations of other samples of the training set (the negatives), and symmetrically
with the roles swapped. The negatives are many (16384 by default), so they are not recomputed:
each side keeps a *memory bank* with one L2-normalised embedding per training sample, refreshed
with momentum for the samples of each training batch.

The pieces:

- :func:`crd_nce`: the NCE contrast loss on one side's scores, a pure function of the
  ``(N, 1 + K)`` anchor-vs-bank dot products (positive in column 0), the normalisation constant
  ``Z``, the training-set size and the temperature.
- :func:`crd_normalizer`: the estimate of ``Z`` from one batch's scores.
- :class:`CRDMemory`: the loss's ``state`` module: the two embedding heads (trained with the
  student), the two banks and ``Z`` (buffers: saved in checkpoints, so a resumed run continues
  exactly), negative sampling and the momentum update.
- :func:`crd`: the registered loss, orchestrating the above.

Everything follows RepDistiller (the authors' code: ``crd/criterion.py`` and ``crd/memory.py``),
except where each docstring says otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import BuildContext, register_loss

__all__ = [
    "CRDMemory",
    "KD3ContrastHeads",
    "crd",
    "crd_nce",
    "crd_normalizer",
    "kd3_contrast",
    "nt_xent",
    "pool_features",
]

#: RepDistiller's ``eps`` in ContrastLoss, added to the denominators ``P + K * Pn``
_NCE_EPS = 1e-7


# --------------------------------------------------------------------------- helpers


def pool_features(features: Tensor, who: str = "features", loss: str = "crd") -> Tensor:
    """One vector per sample: (N, D) as is, (N, C, H, W) global-average-pooled to (N, C).

    CRD embeds the penultimate representation (RepDistiller reads the pooled, flattened features
    a classifier sees); a feature map is reduced by global average pooling, as the networks of the
    paper do before their classifier. Other ranks are refused: their channel axis is ambiguous.
    ``loss`` names the loss in the error message.
    """
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 2:
        return features
    raise ValueError(
        f"{loss}: {who} of shape {tuple(features.shape)}: expected per-sample features (N, D) or a "
        "feature map (N, C, H, W) (global-average-pooled); tap the penultimate layer, e.g. 'fc:in'"
    )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_rows(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Concatenate each tensor's rows over all processes (rank order); row counts may differ."""
    world = _world_size()
    if world == 1:
        return list(tensors)
    rows = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(sizes, rows)
    counts = [int(s.item()) for s in sizes]
    most = max(counts)
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return out


def _mean_over_processes(value: Tensor) -> Tensor:
    world = _world_size()
    if world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world


# --------------------------------------------------------------------------- the NCE math


def crd_normalizer(scores: Tensor, num_samples: int, nce_t: float = 0.07) -> Tensor:
    r"""CRD's normalisation constant estimated from one batch: ``Z = mean(exp(scores / T)) * n``.

    ``scores`` are the (N, 1 + K) dot products of the anchors with the bank rows they are
    contrasted with, ``n`` the number of training samples (the bank's size). The model of the
    paper is ``P(positive | v, u) = exp(v . u / T) / Z`` with ``Z`` the partition function over
    the whole dataset; like NCE (and RepDistiller) ``Z`` is estimated once, from the first
    training batch, and then held constant. Returns a 0-dim tensor of the scores' dtype (no
    gradient), computed in log space (``exp(logsumexp(scores / T) - log(N (1 + K)) + log n)``).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"crd: scores must be (N, 1 + K) with K >= 1, got {tuple(scores.shape)}")
    with torch.no_grad():
        log_mean = torch.logsumexp(scores.flatten() / nce_t, dim=0) - math.log(scores.numel())
        return (log_mean + math.log(num_samples)).exp()


def crd_nce(scores: Tensor, Z: Tensor | float, num_samples: int, nce_t: float = 0.07) -> Tensor:
    r"""The NCE contrast loss of CRD on one side's scores (Eq. 18 of the paper, RepDistiller's
    ``ContrastLoss``).

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020. ``scores`` is
    (N, 1 + K): row ``i`` holds the dot products of the anchor embedding of sample ``i`` with the
    bank embedding of the same sample (column 0, the positive) and of ``K`` other samples (the
    negatives). With ``P = exp(scores / T) / Z``, the noise distribution ``Pn = 1 / n`` (uniform
    over the ``n`` training samples) and ``eps = 1e-7``:

        L = -1/N * sum_i [ log( P_i0 / (P_i0 + K Pn + eps) )
                           + sum_{j=1..K} log( K Pn / (P_ij + K Pn + eps) ) ]

    i.e. the binary cross-entropy of classifying the pair as drawn from the data (``D = 1``)
    rather than from the noise, with the classifier ``h = P / (P + K Pn)``. This is the formula of
    the authors' code, which sums over the negatives and averages over the batch; the paper's
    Eq. 18 writes the expectation over negatives multiplied by ``K``, the same quantity. The logs
    are computed in log space (``log P = scores / T - log Z``), the same value without overflow.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"crd: scores must be (N, 1 + K) with the positive in column 0 and K >= 1 negatives, "
            f"got {tuple(scores.shape)}"
        )
    if not nce_t > 0:
        raise ValueError(f"crd: the temperature nce_t must be positive, got {nce_t}")
    if num_samples < 1:
        raise ValueError(f"crd: num_samples must be >= 1, got {num_samples}")
    n_batch, k = scores.shape[0], scores.shape[1] - 1
    if isinstance(Z, Tensor):  # (not checked for being positive: that would sync the device)
        log_z: Tensor | float = Z.log().to(device=scores.device, dtype=scores.dtype)
    elif Z > 0:
        log_z = math.log(Z)
    else:
        raise ValueError(f"crd: the normalisation constant Z must be positive, got {Z}")
    log_p = scores / nce_t - log_z
    k_pn = k / float(num_samples)
    log_denom = torch.logaddexp(log_p, torch.full_like(log_p, math.log(k_pn + _NCE_EPS)))
    log_d1 = log_p[:, 0] - log_denom[:, 0]
    log_d0 = math.log(k_pn) - log_denom[:, 1:]
    return -(log_d1.sum() + log_d0.sum()) / n_batch


# --------------------------------------------------------------------------- the memory


class CRDMemory(nn.Module):
    r"""CRD's trainable and remembered state: embedding heads, two memory banks and ``Z``.

    Built lazily (``pending`` until :meth:`build` sees one batch's tensors and the training-set
    size, which :meth:`protege.Distiller.prepare` supplies; :func:`protege.fit` passes
    ``len(train.dataset)``):

    - ``embed_s``, ``embed_t``: ``Linear(D_s, feat_dim)`` and ``Linear(D_t, feat_dim)`` followed
      by L2 normalisation (RepDistiller's ``Embed``), trained with the student. ``D`` is the width
      of the (pooled, see :func:`pool_features`) features.
    - ``bank_s``, ``bank_t``: buffers of ``num_samples x feat_dim`` holding the student's and the
      teacher's embedding of every training sample, initialised uniformly in ``[-a, a]`` with
      ``a = 1 / sqrt(feat_dim / 3)`` (rows of about unit norm, not normalised) as in the
      reference, and refreshed for a training batch's samples by :meth:`update`:
      ``row <- normalise(nce_m * row + (1 - nce_m) * embedding)``.
    - ``Z``: buffer ``[Z_s, Z_t]``, the normalisation constants of the two sides (``-1``: not yet
      estimated), set from the first training batch (:func:`crd_normalizer`).

    The banks and ``Z`` are buffers, so they belong to the distiller's ``state_dict`` and to
    checkpoints: a resumed run continues with the same memory. Loading a state dict into a
    memory that is still pending builds it from the saved shapes.

    Constructor arguments (the state's settings, configurable like the loss's params):
    ``feat_dim`` (128), the embedding width; ``nce_m`` (0.5), the momentum of the bank update.

    Several processes (DDP): the update gathers every process's indices and embeddings first, and
    ``Z`` is averaged over the processes, so all of them hold the same banks.
    """

    def __init__(self, feat_dim: int = 128, nce_m: float = 0.5) -> None:
        super().__init__()
        if int(feat_dim) != feat_dim or feat_dim < 1:
            raise ValueError(f"CRDMemory: feat_dim must be a positive integer, got {feat_dim}")
        if not 0.0 <= nce_m < 1.0:
            raise ValueError(f"CRDMemory: the momentum nce_m must lie in [0, 1), got {nce_m}")
        self.feat_dim = int(feat_dim)
        self.nce_m = float(nce_m)
        self.pending = True
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None

    # -- building --------------------------------------------------------------------------------
    def build(self, student: Any, teacher: Any, context: BuildContext) -> None:
        """Size the heads from the features' widths and the banks from ``context.num_samples``."""
        if isinstance(student, list) or isinstance(teacher, list):
            raise ValueError("crd reads one student tap and one teacher tap, not lists of taps")
        if teacher is None:
            raise ValueError("crd needs the teacher's features")
        n = context.num_samples
        if n is None:
            raise ValueError(
                "CRD's memory bank holds one embedding per training sample and needs the training "
                "set's size: call distiller.prepare(batch, num_samples=len(train_dataset)) "
                "(protege.fit does this; a dataset without len() cannot be used with crd)"
            )
        if n < 2:
            raise ValueError(f"crd contrasts each sample with other samples: num_samples={n} must be >= 2")
        d_s = pool_features(student, "student features").shape[1]
        d_t = pool_features(teacher, "teacher features").shape[1]
        self._create(n, d_s, d_t, student.device)
        # The bank's initial rows as in the reference: uniform in [-a, a], a = 1/sqrt(feat_dim/3).
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
        with torch.no_grad():
            self.bank_s.uniform_(-stdv, stdv)
            self.bank_t.uniform_(-stdv, stdv)

    def _create(self, n: int, d_s: int, d_t: int, device: torch.device | str | None = None) -> None:
        self.embed_s = nn.Linear(d_s, self.feat_dim, device=device)
        self.embed_t = nn.Linear(d_t, self.feat_dim, device=device)
        self.register_buffer("bank_s", torch.zeros(n, self.feat_dim, device=device))
        self.register_buffer("bank_t", torch.zeros(n, self.feat_dim, device=device))
        self.register_buffer("Z", torch.full((2,), -1.0, device=device))
        self.pending = False

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        bank, ws, wt = (state_dict.get(prefix + k) for k in ("bank_s", "embed_s.weight", "embed_t.weight"))
        if self.pending and bank is not None and ws is not None and wt is not None:
            if bank.shape[1] != self.feat_dim:
                error_msgs.append(
                    f"crd: the saved memory has feat_dim={bank.shape[1]}, this term has feat_dim={self.feat_dim}"
                )
                return
            self._create(bank.shape[0], ws.shape[1], wt.shape[1], bank.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def num_samples(self) -> int:
        """Rows of each bank: the training set's size."""
        if self.pending:
            raise ValueError(
                "crd: the memory bank is not built yet: call distiller.prepare(batch, num_samples=...)"
            )
        return int(self.bank_s.shape[0])

    # -- the step --------------------------------------------------------------------------------
    def forward(self, progress: float) -> dict[str, Any]:
        """The keyword argument :func:`crd` reads: ``{"memory": self}``."""
        return {"memory": self}

    def embed(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised (N, feat_dim) embeddings of the (pooled) student and teacher features."""
        if self.embed_s is None or self.embed_t is None:
            raise ValueError(
                "crd: the memory bank is not built yet: call distiller.prepare(batch, num_samples=...)"
            )
        fs = pool_features(student, "student features")
        ft = pool_features(teacher, "teacher features")
        if fs.shape[1] != self.embed_s.in_features or ft.shape[1] != self.embed_t.in_features:
            raise ValueError(
                f"crd: features of width {fs.shape[1]} (student) and {ft.shape[1]} (teacher), but the "
                f"embedding heads were built for {self.embed_s.in_features} and {self.embed_t.in_features}"
            )
        return F.normalize(self.embed_s(fs), dim=1), F.normalize(self.embed_t(ft.to(fs.dtype)), dim=1)

    def sample(self, index: Tensor, k: int) -> Tensor:
        """(N, 1 + k) bank rows to contrast with: the sample itself in column 0, then ``k``
        indices drawn uniformly (with replacement) from the *other* samples of the training set.

        RepDistiller draws from all samples uniformly with its AliasMethod (a negative may then
        be the positive itself); here the positive's index is excluded by drawing from ``n - 1``
        values and skipping it.
        """
        n = self.num_samples
        draws = torch.randint(0, n - 1, (index.shape[0], k), device=index.device)
        negatives = draws + (draws >= index.unsqueeze(1)).long()
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    def normalizers(self, scores_s: Tensor, scores_t: Tensor, nce_t: float) -> Tensor:
        """``[Z_s, Z_t]``: the stored constants, estimated from these scores if not set yet.

        The estimate is stored only in training mode (in ``eval()`` an unset ``Z`` is estimated
        from the batch and forgotten).
        """
        if bool((self.Z > 0).all()):
            return self.Z
        n = self.num_samples
        estimate = torch.stack([crd_normalizer(scores_s, n, nce_t), crd_normalizer(scores_t, n, nce_t)])
        estimate = _mean_over_processes(estimate.to(self.Z.dtype))
        Z = torch.where(self.Z > 0, self.Z, estimate)
        if self.training:
            self.Z.copy_(Z)
        return Z

    @torch.no_grad()
    def update(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of the batch's rows of both banks, renormalised to unit length:
        ``bank[i] <- normalise(nce_m * bank[i] + (1 - nce_m) * v_i)`` (all processes' rows).

        RepDistiller divides by the norm; this uses :func:`torch.nn.functional.normalize` (the
        same, except that a zero row stays zero instead of becoming NaN).
        """
        index, v_s, v_t = _all_gather_rows([index, v_s.detach(), v_t.detach()])
        m = self.nce_m
        for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
            rows = bank.index_select(0, index) * m + v.to(bank.dtype) * (1.0 - m)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))


# --------------------------------------------------------------------------- CRD


def _check_index(index: Tensor, n_batch: int, num_samples: int) -> Tensor:
    if not isinstance(index, Tensor) or index.is_floating_point() or index.is_complex():
        raise ValueError(f"crd: index must be an integer tensor of dataset indices, got {index!r:.80}")
    if index.numel() != n_batch or index.dim() > 1:
        raise ValueError(
            f"crd: index of shape {tuple(index.shape)} does not match a batch of {n_batch}: "
            "one dataset index per sample"
        )
    index = index.reshape(n_batch).long()
    lo, hi = int(index.min().item()), int(index.max().item())
    if lo < 0 or hi >= num_samples:
        raise ValueError(
            f"crd: dataset index {hi if hi >= num_samples else lo} is outside the memory bank of "
            f"{num_samples} samples: the bank is sized by num_samples=len(train_dataset), the dataset "
            "that protege.data.WithIndex wraps"
        )
    return index


@register_loss(
    "crd",
    paper="Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020",
    reads="embeddings",
    uses_index=True,
    state=CRDMemory,
)
def crd(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    index: Tensor,
    memory: CRDMemory,
    nce_k: int = 16384,
    nce_t: float = 0.07,
) -> Tensor:
    r"""Contrastive representation distillation: NCE against momentum memory banks, both ways.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, as in the
    authors' RepDistiller (``CRDLoss``). The student and teacher features of a batch (penultimate
    layer, e.g. the tap ``"fc:in"``; a map is global-average-pooled) are embedded by the
    ``memory``'s heads and L2-normalised to ``v_s``, ``v_t`` (``feat_dim`` wide). For each sample
    ``i`` (dataset index ``index[i]``), ``nce_k`` other training samples are drawn uniformly as
    negatives. Then

        L = L_nce(v_s vs the teacher bank) + L_nce(v_t vs the student bank)

    where each side is :func:`crd_nce` on the (N, 1 + K) dot products of the anchor with the bank
    rows of sample ``i`` (the positive) and of its negatives, with temperature ``nce_t`` and the
    normalisation constant ``Z`` of that side (estimated from the first training batch, then
    fixed: :func:`crd_normalizer`). The gradient reaches the student and both heads through the
    anchors; the bank rows are constants. After the loss is computed, in training mode only, the
    batch's rows of both banks move towards ``v_s`` and ``v_t`` with momentum ``nce_m``
    (:meth:`CRDMemory.update`).

    Defaults are the paper's (``nce_k = 16384``, ``nce_t = 0.07``; the state's ``feat_dim = 128``,
    ``nce_m = 0.5``). ``nce_k`` larger than ``num_samples - 1`` is clamped to it (with a warning):
    there are no more distinct negatives.

    Deviations from RepDistiller: negatives are drawn uniformly from all *other* samples (the
    reference's CIFAR loader draws them from the other *classes*, ``mode="exact"``, which needs
    every sample's label up front); like every registered loss, this one (embedding heads and
    scores included) computes in float32 even under mixed precision
    (:func:`~protege.losses.registry.computes_in_float32`), and ``Z`` and the logs in log space (the
    same values, without overflow).

    Several teachers: the bank holds one teacher's embeddings; give the term ``teacher_index=``.
    """
    if not isinstance(memory, CRDMemory):
        raise ValueError(f"crd: memory must be the term's CRDMemory state, got {type(memory).__name__}")
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(
            f"crd: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same batch size N"
        )
    if int(nce_k) != nce_k or nce_k < 1:
        raise ValueError(f"crd: nce_k (negatives per sample) must be a positive integer, got {nce_k}")
    if not nce_t > 0:
        raise ValueError(f"crd: the temperature nce_t must be positive, got {nce_t}")
    n = memory.num_samples
    k = int(nce_k)
    if k > n - 1:
        warnings.warn(
            f"crd: nce_k={k} negatives per sample, but the training set has only {n - 1} other samples; "
            f"using nce_k={n - 1}",
            stacklevel=3,  # the caller of the registry's float32 wrapper
        )
        k = n - 1
    index = _check_index(index, student_features.shape[0], n)
    v_s, v_t = memory.embed(student_features, teacher_features)
    rows = memory.sample(index, k)
    bank_t, bank_s = memory.bank_t[rows], memory.bank_s[rows]  # (N, 1 + K, feat_dim), constants
    scores_s = torch.einsum("nkd,nd->nk", bank_t, v_s)  # student anchor vs the teacher bank
    scores_t = torch.einsum("nkd,nd->nk", bank_s, v_t)  # teacher anchor vs the student bank
    Z = memory.normalizers(scores_s.detach(), scores_t.detach(), nce_t)
    loss = crd_nce(scores_s, Z[0], n, nce_t) + crd_nce(scores_t, Z[1], n, nce_t)
    if memory.training:
        memory.update(index, v_s, v_t)
    return loss


# --------------------------------------------------------------------------- KD³'s contrast

#: KD³ (Tang et al., ICCV 2023); its MixDistribution views come from :mod:`protege.strategies.proxy`
KD3_PAPER = (
    "Tang, Chen, Niu, Sugiyama & Gong, Distribution Shift Matters for Knowledge Distillation with "
    "Webly Collected Images, ICCV 2023"
)


def nt_xent(a: Tensor, b: Tensor, temperature: float = 0.5) -> Tensor:
    r"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR, between two sets of
    embeddings whose rows pair up: ``(a_i, b_i)`` is a positive pair.

    Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020. With ``z = [a; b]`` (2N rows, each L2-normalised),
    ``sim(u, v) = u . v / temperature`` and ``p(k)`` the partner of row ``k`` (``k ± N``):

        L = 1/(2N) * sum_k -log( exp(sim(z_k, z_p(k))) / sum_{m != k} exp(sim(z_k, z_m)) )

    i.e. each of the 2N rows must pick out its partner among the other 2N - 1 rows; the other
    2(N - 1) rows are its negatives. Shapes (N, D) and (N, D).
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"nt_xent: expected two (N, D) embeddings of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"nt_xent: the temperature must be positive, got {temperature}")
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def _embedding_head(width: int, out: int, device: torch.device | str | None = None) -> nn.Sequential:
    """SimCLR's projection head: ``Linear(D, D) - ReLU - Linear(D, out)``."""
    return nn.Sequential(
        nn.Linear(width, width, device=device), nn.ReLU(), nn.Linear(width, out, device=device)
    )


class KD3ContrastHeads(nn.Module):
    """The embedding heads of :func:`kd3_contrast`: one on the student's features, one on the
    teacher's (both trained with the student; the teacher itself stays frozen).

    Each is SimCLR's projection head, ``Linear(D, D) - ReLU - Linear(D, feat_dim)``, sized from the
    (pooled, see :func:`pool_features`) features of one batch by :meth:`build` (run by
    :meth:`protege.Distiller.prepare`). Loading a state dict into unbuilt heads builds them from
    the saved shapes.
    """

    def __init__(self, feat_dim: int = 128) -> None:
        super().__init__()
        if int(feat_dim) != feat_dim or feat_dim < 1:
            raise ValueError(f"KD3ContrastHeads: feat_dim must be a positive integer, got {feat_dim}")
        self.feat_dim = int(feat_dim)
        self.pending = True
        self.embed_s: nn.Sequential | None = None
        self.embed_t: nn.Sequential | None = None

    def build(self, student: Any, teacher: Any, context: BuildContext) -> None:
        """Size both heads from the widths of the student's and the teacher's features."""
        if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
            raise ValueError("kd3_contrast reads one student tap and one teacher tap, not lists of taps")
        d_s = pool_features(student, "student features", "kd3_contrast").shape[1]
        d_t = pool_features(teacher, "teacher features", "kd3_contrast").shape[1]
        self._create(d_s, d_t, student.device)

    def _create(self, d_s: int, d_t: int, device: torch.device | str | None = None) -> None:
        self.embed_s = _embedding_head(d_s, self.feat_dim, device)
        self.embed_t = _embedding_head(d_t, self.feat_dim, device)
        self.pending = False

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        ws, wt = state_dict.get(prefix + "embed_s.0.weight"), state_dict.get(prefix + "embed_t.0.weight")
        if self.pending and ws is not None and wt is not None:
            self._create(ws.shape[1], wt.shape[1], ws.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, progress: float) -> dict[str, Any]:
        """The keyword argument :func:`kd3_contrast` reads: ``{"heads": self}``."""
        return {"heads": self}

    def embed(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """The (not yet normalised) embeddings of the pooled student and teacher features."""
        if self.embed_s is None or self.embed_t is None:
            raise ValueError(
                "kd3_contrast: the embedding heads are not built yet; call distiller.prepare(batch)"
            )
        fs = pool_features(student, "student features", "kd3_contrast")
        ft = pool_features(teacher, "teacher features", "kd3_contrast")
        return self.embed_s(fs), self.embed_t(ft.to(fs.dtype))


@register_loss("kd3_contrast", paper=KD3_PAPER, reads="embeddings", uses_index=True, state=KD3ContrastHeads)
def kd3_contrast(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    index: Tensor,
    heads: KD3ContrastHeads,
    temperature: float = 0.5,
) -> Tensor:
    r"""KD³'s MixDistribution contrast: NT-Xent between the original and the perturbed view of each
    sample, across student and teacher embedding heads.

    Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with
    Webly Collected Images", ICCV 2023. The batch holds ``2B`` rows: the ``B`` original samples,
    then their MixDistribution views ``x'`` (per-instance channel statistics mixed with another
    instance's, :func:`protege.strategies.proxy.mix_distribution`; ``data.strategy: proxy`` makes them
    when this term is listed). Both halves go through student and teacher. With ``s = g_s(f_s)``
    and ``t = g_t(f_t)`` the two embedding heads (:class:`KD3ContrastHeads`) on the (pooled)
    features of the term's taps:

        L = 1/2 * [ NT-Xent(s(x), t(x')) + NT-Xent(s(x'), t(x)) ]

    (:func:`nt_xent`, ``temperature``): the student's embedding of each view must identify the
    teacher's embedding of the *other* view of the same sample among the batch's others, so the
    student learns a representation that does not move with the distribution (the statistics)
    of its input and agrees with the teacher's. The paper's method section was not available
    offline: this pairing (cross-network, cross-view) is our reading of "instance alignment"
    between original and perturbed data with student and teacher embedding heads.

    The halves are checked, not assumed: ``index`` (the samples' dataset indices) must repeat,
    ``index[:B] == index[B:]``; a batch without the views is an error.
    """
    n = student_features.shape[0]
    if teacher_features.shape[0] != n:
        raise ValueError(
            f"kd3_contrast: student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} must have the same number of rows"
        )
    half = n // 2
    index = index.reshape(-1)
    if n % 2 or index.numel() != n or not torch.equal(index[:half], index[half:]):
        raise ValueError(
            "kd3_contrast needs batches of [originals; their MixDistribution views] (the same dataset "
            "indices twice); data.strategy: proxy builds them when this term is listed"
        )
    s, t = heads.embed(student_features, teacher_features)
    return 0.5 * (nt_xent(s[:half], t[half:], temperature) + nt_xent(s[half:], t[:half], temperature))
