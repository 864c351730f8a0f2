"""Token-level losses for language models: divergences between next-token distributions, hidden-state
matching and MiniLM's self-attention relations, each averaged over the tokens that count.

Every loss reads ``(B, L, V)`` logits (or any ``(..., V)``; hidden states ``(B, L, D)``) and the
batch's ``target``: the next-token labels aligned with the logits (``target[b, i]`` is the token the
logits at position ``i`` predict, :data:`IGNORE_INDEX` ``= -100`` where nothing is predicted: prompt
tokens, padding, the last position). That is what :class:`protege.tasks.lm.LMTask` hands every term
reading labels. Only positions with ``target != -100`` enter a loss — the rows are selected before
anything is computed, so prompt and padding positions contribute exactly nothing — and the loss is
the mean over those positions (0 when there are none).

Distributions are ``p = softmax(z / T)`` per position (temperature ``T``, 1 by default; no ``T^2``
factor, as in GKD and DistiLLM). All divergences are computed from log-probabilities.

**Top-k** (``top_k=k > 0`` on the divergences): only the teacher's ``k`` most likely tokens of each
position are compared one by one; everything else is merged into one *rest* bucket per distribution
holding its remaining mass ``1 - sum_{j in top-k} p_j``. The divergence is that of the two
``(k + 1)``-bin distributions. We keep the missing mass rather than renormalising over the ``k``
tokens, so a student that puts mass outside the teacher's top-k is still penalised, and the loss is
a proper divergence of proper distributions: by the data-processing inequality it never exceeds the
full-vocabulary divergence and equals it when ``k`` covers the vocabulary.

**Cached teachers.** A teacher-output cache (:mod:`protege.engine.lm_cache`) stores only each
position's top-k entries; its batches hand the divergences a :class:`TopKLogProbs` in place of the
teacher's logits. The divergence is then the same ``(k + 1)``-bin one, over the stored tokens and the
rest bucket (its mass ``1 - sum`` of the stored probabilities is known exactly), at ``T = 1`` (the
stored log-probabilities are the teacher's at ``T = 1``).

The two vocabularies must have the same size: compare the tokenizers up front and truncate padded
vocabularies (:func:`protege.tasks.lm.shared_vocab_size` does both for ``protege distill``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss

__all__ = [
    "EMPTY_LOGP",
    "IGNORE_INDEX",
    "TopKLogProbs",
    "cached_buckets",
    "fkl",
    "generalized_jsd",
    "hidden_cosine",
    "hidden_mse",
    "minilm",
    "rkl",
    "skew_fkl",
    "skew_rkl",
    "token_divergence",
    "tvd",
]

#: the label of positions that predict nothing (prompt, padding), as in ``transformers``
IGNORE_INDEX = -100

#: the log-probability of an empty slot of a :class:`TopKLogProbs` (``exp`` is exactly 0 in float32;
#: finite, so that ``0 * (log p - log q)`` stays 0 where both sides are empty)
EMPTY_LOGP = -1.0e4

Divergence = Callable[[Tensor, Tensor], Tensor]


class TopKLogProbs(NamedTuple):
    """A teacher's next-token distributions known by their stored top-k entries (a teacher-output cache).

    ``index`` ``(..., k)`` int64 token ids and ``logp`` ``(..., k)`` their log-probabilities at ``T = 1``;
    a slot holding no token has ``logp = EMPTY_LOGP`` (probability 0). The mass outside the stored
    entries is ``1 - sum exp(logp)``. A ``NamedTuple``, so ``DataLoader`` batches and moves it.
    """

    index: Tensor
    logp: Tensor

    def dense(self, vocab_size: int) -> Tensor:
        """``(..., V)`` log-probabilities: the stored entries, and the rest of the mass spread evenly over
        the other tokens (the least-informed guess of a tail that was not stored)."""
        logp = self.logp.float()
        stored = (logp > EMPTY_LOGP / 2).sum(-1, keepdim=True)
        tail = _log_rest(logp).unsqueeze(-1) - torch.log((vocab_size - stored).clamp_min(1).float())
        out = tail.expand(*logp.shape[:-1], vocab_size).clone()
        return out.scatter(
            -1, self.index.long(), torch.where(logp > EMPTY_LOGP / 2, logp, out.gather(-1, self.index.long()))
        )


# --------------------------------------------------------------------------- helpers


def _rows(student: Tensor, teacher: Tensor, target: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """The ``(n, D)`` student and teacher rows of the positions whose target is not ignored."""
    if student.shape != teacher.shape:
        hint = (
            "; the vocabularies differ: teacher and student need the same tokenizer (a padded "
            "vocabulary is truncated to the shared size by protege.tasks.lm)"
            if student.shape[:-1] == teacher.shape[:-1]
            else ""
        )
        raise ValueError(
            f"{loss}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the "
            f"same shape{hint}"
        )
    if student.dim() < 2:
        raise ValueError(f"{loss}: expected (..., D) tensors, got {tuple(student.shape)}")
    if target.is_floating_point() or target.shape != student.shape[:-1]:
        raise ValueError(
            f"{loss}: target must hold next-token labels (integers, {IGNORE_INDEX} where ignored) of "
            f"shape {tuple(student.shape[:-1])}, got {target.dtype} {tuple(target.shape)}"
        )
    keep = target.reshape(-1) != IGNORE_INDEX
    d = student.shape[-1]
    return student.reshape(-1, d)[keep], teacher.reshape(-1, d)[keep]


def _mean(per_row: Tensor) -> Tensor:
    """Mean over the kept positions; 0 (still attached to the graph) when none is kept."""
    return per_row.mean() if per_row.numel() else per_row.sum()


def _check_T(T: float, loss: str) -> None:
    if not T > 0:
        raise ValueError(f"{loss}: temperature T must be positive, got {T}")


def _log_rest(log_p: Tensor) -> Tensor:
    """``log(1 - sum_j exp(log_p_j))``: the log of the mass outside the given entries (≥ tiny)."""
    covered = torch.logsumexp(log_p, dim=-1)
    return torch.log((-torch.expm1(covered)).clamp_min(torch.finfo(log_p.dtype).tiny))


def top_k_buckets(log_ps: Tensor, log_pt: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``(n, k + 1)`` log-distributions over the teacher's top-``k`` tokens plus one *rest* bucket.

    Bucket ``j < k`` is the ``j``-th most likely token under the teacher; bucket ``k`` holds each
    distribution's remaining mass. With ``k`` ≥ the vocabulary size the inputs are returned as
    they are.
    """
    if k >= log_pt.shape[-1]:
        return log_ps, log_pt
    index = log_pt.topk(k, dim=-1).indices
    s, t = log_ps.gather(-1, index), log_pt.gather(-1, index)
    return (
        torch.cat([s, _log_rest(s).unsqueeze(-1)], dim=-1),
        torch.cat([t, _log_rest(t).unsqueeze(-1)], dim=-1),
    )


def token_divergence(
    divergence: Divergence,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    T: float,
    top_k: int,
    loss: str,
) -> Tensor:
    """Mean over the kept positions of ``divergence(log p_s, log p_t)`` (row-wise, ``(n, V)`` → ``(n,)``)."""
    _check_T(T, loss)
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(
            f"{loss}: top_k must be a non-negative integer (0: the whole vocabulary), got {top_k}"
        )
    if isinstance(teacher_logits, TopKLogProbs):
        return _mean(
            divergence(*_cached_buckets(student_logits, teacher_logits, target, T, int(top_k), loss))
        )
    s, t = _rows(student_logits, teacher_logits, target, loss)
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    if top_k:
        log_ps, log_pt = top_k_buckets(log_ps, log_pt, int(top_k))
    return _mean(divergence(log_ps, log_pt))


def _cached_buckets(
    student_logits: Tensor, teacher: TopKLogProbs, target: Tensor, T: float, top_k: int, loss: str
) -> tuple[Tensor, Tensor]:
    """The ``(n, k + 1)`` student and teacher log-distributions over a cached teacher's stored tokens
    (``top_k`` > 0: its ``top_k`` most likely of them) plus the rest bucket, on the kept positions."""
    if T != 1.0:
        raise ValueError(
            f"{loss}: a teacher-output cache stores the teacher's log-probabilities at T = 1, so T must be 1 "
            f"(got {T}); distill online (no cache) for another temperature"
        )
    if teacher.index.shape != teacher.logp.shape or teacher.index.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"{loss}: cached teacher entries {tuple(teacher.index.shape)} do not fit the student logits "
            f"{tuple(student_logits.shape)}: expected (..., k) for (..., V)"
        )
    if target.is_floating_point() or target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"{loss}: target must hold next-token labels of shape {tuple(student_logits.shape[:-1])}, got "
            f"{target.dtype} {tuple(target.shape)}"
        )
    keep = (target != IGNORE_INDEX).reshape(-1)
    v, k = student_logits.shape[-1], teacher.index.shape[-1]
    s = student_logits.reshape(-1, v)[keep]
    index = teacher.index.reshape(-1, k)[keep].long()
    log_pt = teacher.logp.reshape(-1, k)[keep]
    if top_k and top_k < k:
        log_pt, at = log_pt.topk(top_k, dim=-1)
        index = index.gather(-1, at)
    return cached_buckets(F.log_softmax(s, dim=-1), TopKLogProbs(index, log_pt))


def cached_buckets(log_ps: Tensor, teacher: TopKLogProbs) -> tuple[Tensor, Tensor]:
    """``(n, V)`` student log-probabilities and a cached teacher's ``(n, k)`` entries → the ``(n, k + 1)``
    student and teacher log-distributions over the stored tokens plus one rest bucket (empty slots
    hold probability 0 on both sides)."""
    empty = teacher.logp <= EMPTY_LOGP / 2
    log_ps = log_ps.gather(-1, teacher.index.long()).masked_fill(empty, EMPTY_LOGP)
    log_pt = teacher.logp.float().masked_fill(empty, EMPTY_LOGP)
    return (
        torch.cat([log_ps, _log_rest(log_ps).unsqueeze(-1)], dim=-1),
        torch.cat([log_pt, _log_rest(log_pt).unsqueeze(-1)], dim=-1),
    )


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise ``KL(p || q) = sum_j p_j (log p_j - log q_j)``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _check_unit(value: float, name: str, loss: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{loss}: {name} must be in [0, 1], got {value}")


# --------------------------------------------------------------------------- divergences


@register_loss(
    "fkl",
    paper="Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, arXiv:1503.02531 "
    "(2015); per token: Kim & Rush, Sequence-Level Knowledge Distillation, EMNLP 2016",
    uses_target=True,
)
def fkl(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, T: float = 1.0, top_k: int = 0
) -> Tensor:
    r"""Forward KL per token: the word-level KD of Kim & Rush, mean-seeking.

    Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016 (word-level KD), after Hinton,
    Vinyals & Dean (2015). Over the kept positions ``i`` (``target_i != -100``):

        L = mean_i KL(p_t,i || p_s,i) = mean_i sum_v p_t,i(v) (log p_t,i(v) - log p_s,i(v))

    ``top_k``: compare the teacher's top-k tokens plus a rest bucket (module docstring).
    """
    return token_divergence(_kl_forward, student_logits, teacher_logits, target, T, top_k, "fkl")


def _kl_forward(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    return _kl(log_pt, log_ps)


def _kl_reverse(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    return _kl(log_ps, log_pt)


@register_loss(
    "rkl",
    paper="Gu, Dong, Wei & Huang, MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024 "
    "(reverse KL); per token as in Agarwal et al., On-Policy Distillation of Language Models, ICLR 2024",
    uses_target=True,
)
def rkl(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, T: float = 1.0, top_k: int = 0
) -> Tensor:
    r"""Reverse KL per token, mode-seeking: the student is penalised for mass where the teacher has little.

    Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024
    argue for the reverse KL; this is its token-level form (as GKD's β = 1 end point, Agarwal et al.,
    ICLR 2024):

        L = mean_i KL(p_s,i || p_t,i) = mean_i sum_v p_s,i(v) (log p_s,i(v) - log p_t,i(v))
    """
    return token_divergence(_kl_reverse, student_logits, teacher_logits, target, T, top_k, "rkl")


def _jsd_rows(beta: float) -> Divergence:
    def divergence(log_ps: Tensor, log_pt: Tensor) -> Tensor:
        if beta == 0.0:
            return _kl(log_pt, log_ps)
        if beta == 1.0:
            return _kl(log_ps, log_pt)
        # log(m / p_t) and log(m / p_s) for m = beta p_t + (1 - beta) p_s, written with log1p/expm1 so
        # that the division by beta (1 - beta) stays accurate for beta near 0 or 1; a log-ratio
        # beyond ±80 only occurs where the weighting probability is below e^-80.
        d = (log_ps - log_pt).clamp(-80.0, 80.0)
        log_m_over_t = torch.log1p((1.0 - beta) * torch.expm1(d))
        log_m_over_s = torch.log1p(beta * torch.expm1(-d))
        kl_t = -(log_pt.exp() * log_m_over_t).sum(-1)  # KL(p_t || m)
        kl_s = -(log_ps.exp() * log_m_over_s).sum(-1)  # KL(p_s || m)
        return (beta * kl_t + (1.0 - beta) * kl_s) / (beta * (1.0 - beta))

    return divergence


@register_loss(
    "jsd",
    paper="Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem, On-Policy Distillation of Language "
    "Models: Learning from Self-Generated Mistakes (GKD), ICLR 2024",
    uses_target=True,
)
def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    beta: float = 0.5,
    T: float = 1.0,
    top_k: int = 0,
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence JSD(β) per token, scaled to be continuous in β on [0, 1].

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD), ICLR 2024. With the mixture ``m = β p_t + (1 - β) p_s``:

        JSD(β) = β KL(p_t || m) + (1 - β) KL(p_s || m)
        L = mean_i JSD(β)_i / (β (1 - β))        for 0 < β < 1
        L = mean_i KL(p_t,i || p_s,i)             for β = 0   (forward KL)
        L = mean_i KL(p_s,i || p_t,i)             for β = 1   (reverse KL)

    Unscaled, JSD(β) = β KL(p_t || p_s) + O(β²) vanishes at both ends, which is why GKD's code
    switches to the KLs *at* β = 0 and 1 — a jump. Dividing by ``β (1 - β)`` makes the limits equal
    those end points, so the loss is continuous in β. At β = 0.5 it is 4 JSD(0.5): a term weight of
    0.25 reproduces the scale of TRL's ``GKDTrainer`` loss.
    """
    _check_unit(beta, "beta", "jsd")
    return token_divergence(_jsd_rows(float(beta)), student_logits, teacher_logits, target, T, top_k, "jsd")


def _skew(alpha: float, reverse: bool) -> Divergence:
    def divergence(log_ps: Tensor, log_pt: Tensor) -> Tensor:
        first, second = (log_ps, log_pt) if reverse else (log_pt, log_ps)
        if alpha == 0.0:
            return _kl(first, second)
        if alpha == 1.0:
            return torch.zeros(first.shape[:-1], dtype=first.dtype, device=first.device)
        log_mix = torch.logaddexp(first + math.log(alpha), second + math.log1p(-alpha))
        return _kl(first, log_mix)

    return divergence


@register_loss(
    "skew_fkl",
    paper="Ko, Kim, Chen & Yun, DistiLLM: Towards Streamlined Distillation for Large Language Models, ICML 2024",
    uses_target=True,
)
def skew_fkl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    T: float = 1.0,
    top_k: int = 0,
) -> Tensor:
    r"""Skew forward KL (DistiLLM): KL from the teacher to a teacher-student mixture.

    Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    ICML 2024 (α = 0.1 in the paper):

        L = mean_i KL(p_t,i || α p_t,i + (1 - α) p_s,i)

    α = 0 is the forward KL; the mixture keeps the log-ratio bounded by ``-log α`` where the student
    puts no mass, which stabilises the gradients.
    """
    _check_unit(alpha, "alpha", "skew_fkl")
    return token_divergence(
        _skew(float(alpha), reverse=False), student_logits, teacher_logits, target, T, top_k, "skew_fkl"
    )


@register_loss(
    "skew_rkl",
    paper="Ko, Kim, Chen & Yun, DistiLLM: Towards Streamlined Distillation for Large Language Models, ICML 2024",
    uses_target=True,
)
def skew_rkl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    T: float = 1.0,
    top_k: int = 0,
) -> Tensor:
    r"""Skew reverse KL (DistiLLM): KL from the student to a student-teacher mixture.

    Ko, Kim, Chen & Yun, "DistiLLM", ICML 2024:

        L = mean_i KL(p_s,i || α p_s,i + (1 - α) p_t,i)

    α = 0 is the reverse KL.
    """
    _check_unit(alpha, "alpha", "skew_rkl")
    return token_divergence(
        _skew(float(alpha), reverse=True), student_logits, teacher_logits, target, T, top_k, "skew_rkl"
    )


def _tvd_rows(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    return 0.5 * (log_ps.exp() - log_pt.exp()).abs().sum(-1)


@register_loss(
    "tvd",
    paper="Wen, Li, Du & Mou, f-Divergence Minimization for Sequence-Level Knowledge Distillation, ACL 2023",
    uses_target=True,
)
def tvd(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, T: float = 1.0, top_k: int = 0
) -> Tensor:
    r"""Total variation distance per token (bounded in [0, 1], symmetric).

    Wen, Li, Du & Mou, "f-Divergence Minimization for Sequence-Level Knowledge Distillation",
    ACL 2023 (token-level TVD):

        L = mean_i 1/2 sum_v |p_t,i(v) - p_s,i(v)|
    """
    return token_divergence(_tvd_rows, student_logits, teacher_logits, target, T, top_k, "tvd")


# --------------------------------------------------------------------------- hidden states


@register_loss(
    "hidden_mse",
    paper="Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, TinyBERT: Distilling BERT for Natural Language "
    "Understanding, Findings of EMNLP 2020",
    reads="features",
    uses_target=True,
)
def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, target: Tensor) -> Tensor:
    r"""Hidden-state MSE per token, through a learned projection (TinyBERT's ``H^S W_h``).

    Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of
    EMNLP 2020. With ``h_s,i`` the student's hidden state at kept position ``i`` after the term's
    adapter (a learned ``nn.Linear(D_s, D_t)``, TinyBERT's ``W_h``; the identity when the widths
    match) and ``h_t,i`` the teacher's:

        L = mean_i (1/D_t) ||h_s,i W_h - h_t,i||^2

    Shapes: ``(B, L, D_t)`` each (after the adapter), and ``target`` ``(B, L)``.
    """
    s, t = _rows(student_hidden, teacher_hidden, target, "hidden_mse")
    return _mean((s - t).pow(2).mean(-1))


@register_loss(
    "hidden_cosine",
    paper="Sanh, Debut, Chaumond & Wolf, DistilBERT, a distilled version of BERT: smaller, faster, cheaper "
    "and lighter, NeurIPS EMC^2 Workshop 2019 (arXiv:1910.01108)",
    reads="features",
    uses_target=True,
)
def hidden_cosine(student_hidden: Tensor, teacher_hidden: Tensor, target: Tensor) -> Tensor:
    r"""Cosine embedding loss between hidden states per token (DistilBERT's ``L_cos``).

    Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT", 2019: align the
    directions of the student's and teacher's hidden vectors. Over the kept positions:

        L = mean_i (1 - cos(h_s,i, h_t,i))

    DistilBERT needs equal widths; with the term's learned ``linear`` adapter any student width works.
    """
    s, t = _rows(student_hidden, teacher_hidden, target, "hidden_cosine")
    return _mean(1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8))


# --------------------------------------------------------------------------- MiniLM

_RELATIONS = ("qk", "qq", "kk", "vv")


def _heads(x: Tensor, width: int, who: str) -> Tensor:
    """``(B, L, D)`` → ``(B, D / width, L, width)``."""
    b, length, d = x.shape
    if d % width:
        raise ValueError(f"minilm: the {who} width {d} does not split into heads of {width}")
    return x.reshape(b, length, d // width, width).transpose(1, 2)


def _relation_logp(a: Tensor, b: Tensor, heads: int, who: str, keys: Tensor | None = None) -> Tensor:
    """``log softmax(A_h B_h^T / sqrt(d_h))`` per relation head: ``(B, heads, L, L)``; causal when
    ``keys`` is ``None``, else over the positions ``keys`` ``(B, L)`` marks (a bidirectional encoder).

    ``A`` splits into ``heads`` heads of width ``d_h``; ``B`` into heads of the same width, repeated to
    ``heads`` (grouped-query attention, where keys and values have fewer heads than queries).
    """
    if a.shape[-1] % heads:
        raise ValueError(f"minilm: the {who} width {a.shape[-1]} does not split into {heads} relation heads")
    width = a.shape[-1] // heads
    ha, hb = _heads(a, width, who), _heads(b, width, who)
    if heads % hb.shape[1]:
        raise ValueError(
            f"minilm: the {who} keys have {hb.shape[1]} heads of width {width}, which do not divide the "
            f"{heads} query heads; set heads to the models' number of attention heads"
        )
    hb = hb.repeat_interleave(heads // hb.shape[1], dim=1)
    scores = ha @ hb.transpose(-1, -2) / math.sqrt(width)
    if keys is not None:
        hidden = ~keys[:, None, None, :]  # (B, 1, 1, L): padding is no key
    else:
        length = scores.shape[-1]
        hidden = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
    return F.log_softmax(scores.masked_fill(hidden, torch.finfo(scores.dtype).min), dim=-1)


@register_loss(
    "minilm",
    paper="Wang, Wei, Dong, Bao, Yang & Zhou, MiniLM: Deep Self-Attention Distillation for Task-Agnostic "
    "Compression of Pre-Trained Transformers, NeurIPS 2020; relation heads: Wang, Bao, Huang, Dong & Wei, "
    "MiniLMv2, Findings of ACL 2021",
    reads="feature-list",
    uses_target=True,
)
def minilm(
    student_qkv: Sequence[Tensor],
    teacher_qkv: Sequence[Tensor],
    target: Tensor,
    heads: int = 1,
    relations: Sequence[str] = ("qk", "vv"),
    causal: bool = True,
) -> Tensor:
    r"""MiniLM self-attention distillation: attention distributions and value relations, per token.

    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS 2020 (attention ``qk`` + value relation ``vv``); the relation
    heads and the ``qq``/``kk`` relations are MiniLMv2's (Wang et al., Findings of ACL 2021). The term
    reads three taps per model, the query, key and value projections of one attention layer
    (``student=[".../q_proj", ".../k_proj", ".../v_proj"]``), ``(B, L, D)`` each. For relation
    ``ab`` each model's ``A`` and ``B`` are split into ``heads`` relation heads of width ``d_h``
    (its own width / heads) and

        R^ab_h = softmax(A_h B_h^T / sqrt(d_h))       causal: row i covers positions j ≤ i
        L = sum_ab mean_{h, i} KL(R^ab_t,h[i] || R^ab_s,h[i])

    over the kept positions ``i`` (``target_i != -100``: the queries; every earlier position stays a
    key). Student and teacher may differ in width and head count: only ``heads`` must divide both
    (MiniLMv2). Keys and values with fewer heads than ``heads`` (grouped-query attention) are
    repeated as the attention does. The projections are read before rotary position embedding, so
    ``qk`` is the content part of a LLaMA-style attention. Batches must be right-padded (padding is
    then never an earlier position of a kept one), as :class:`protege.tasks.lm.LMTask` batches are.

    ``causal=False`` is the original MiniLM's bidirectional encoder (BERT, a sentence encoder): row
    ``i`` covers every kept position ``j``; padding (``target_j == -100``) is neither query nor key, as
    the token mask of :class:`protege.tasks.embedding.EmbeddingTask` batches marks it.
    """
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise ValueError(
            "minilm reads three taps per model, the query, key and value projections of one attention "
            f"layer (e.g. model.layers.5.self_attn.q_proj, ...k_proj, ...v_proj); got {len(student_qkv)} "
            f"student and {len(teacher_qkv)} teacher taps"
        )
    if isinstance(relations, str) or not relations or any(r not in _RELATIONS for r in relations):
        raise ValueError(
            f"minilm: relations must be a list drawn from {', '.join(_RELATIONS)}, got {relations!r}"
        )
    if int(heads) != heads or heads < 1:
        raise ValueError(f"minilm: heads must be a positive integer, got {heads}")
    s_map = dict(zip("qkv", student_qkv))
    t_map = dict(zip("qkv", teacher_qkv))
    for who, tensors in (("student", student_qkv), ("teacher", teacher_qkv)):
        for x in tensors:
            if x.dim() != 3 or x.shape[:2] != target.shape:
                raise ValueError(
                    f"minilm: {who} projections must be (B, L, D) with (B, L) = target's "
                    f"{tuple(target.shape)}, got {tuple(x.shape)}"
                )
    keep = target != IGNORE_INDEX  # (B, L): the query rows that count
    total = student_qkv[0].new_zeros(())
    for rel in relations:
        a, b = rel
        keys = None if causal else keep
        log_s = _relation_logp(s_map[a], s_map[b], int(heads), "student", keys)
        log_t = _relation_logp(t_map[a], t_map[b], int(heads), "teacher", keys)
        rows_s = log_s.transpose(1, 2)[keep]  # (n, heads, L)
        rows_t = log_t.transpose(1, 2)[keep]
        total = total + _mean(_kl(rows_t, rows_s).mean(-1))
    return total
