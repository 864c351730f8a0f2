"""Losses on sentence embeddings (the ``embedding`` task): the student's vector of a text against the
teacher's. The squared error is :func:`protege.losses.vision_language.feat_mse` (``normalize: false,
reduction: element`` for plain MSE) and the batch-relation terms are ``sp``/``rkd``/``pkt`` of
:mod:`protege.losses.relations`; this module adds the cosine distance.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss


@register_loss(
    "cosine",
    paper="Reimers & Gurevych, Making Monolingual Sentence Embeddings Multilingual using Knowledge "
    "Distillation, EMNLP 2020 (embedding mimicry); Sanh et al., DistilBERT, 2019 (cosine embedding loss)",
    reads="embeddings",
    default_keys=("embedding", "embedding"),
)
def cosine(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Cosine distance between the student's and the teacher's embedding of each sample.

    With ``s_i``, ``t_i`` the two ``(D,)`` embeddings of sample ``i`` of ``N``:

        L = 1/N * sum_i (1 - <s_i, t_i> / (||s_i|| ||t_i||))

    Zero when every student vector points where the teacher's does, whatever the norms (a
    sentence-transformers teacher is compared by cosine, so the norm carries nothing); 2 at most.
    Norms below 1e-8 count as 1e-8 (``F.cosine_similarity``), so a zero vector gives distance 1.
    Shapes: ``(N, D)`` both; a narrower student gives the term an adapter (``adapter: linear``).
    """
    if student.dim() != 2 or student.shape[0] == 0 or student.shape != teacher.shape:
        raise ValueError(
            f"cosine: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings must be "
            "non-empty (N, D) matrices of the same shape; when the widths differ give the term an adapter "
            "(adapter: linear)"
        )
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
