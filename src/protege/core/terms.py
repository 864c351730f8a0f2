"""Short constructors for the common terms: ``pg.ce(0.1)``, ``pg.kd(0.9, T=4)``, ``pg.dkd(1.0)``.

Each returns a :class:`~protege.core.distiller.Term`; ``pg.term(name, weight, **params)`` builds
any registered loss by name. Defaults are the papers' (see each loss's docstring).
"""

from __future__ import annotations

from typing import Any

from .distiller import Term


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


def _feature(loss: str, student: str, teacher: str, weight: float, **kwargs: Any) -> Term:
    return Term(loss, weight, student=student, teacher=teacher, **kwargs)


def sp(student: str, teacher: str, weight: float = 3000.0, **kwargs: Any) -> Term:
    """Similarity-preserving KD on a pair of taps (RepDistiller's weight 3000)."""
    return _feature("sp", student, teacher, weight, **kwargs)


def rkd(student: str = "fc:in", teacher: str = "fc:in", weight: float = 1.0, **kwargs: Any) -> Term:
    """Relational KD (distance + angle) on embeddings."""
    return _feature("rkd", student, teacher, weight, **kwargs)


def pkt(student: str = "fc:in", teacher: str = "fc:in", weight: float = 30000.0, **kwargs: Any) -> Term:
    """Probabilistic knowledge transfer on embeddings (RepDistiller's weight 30000)."""
    return _feature("pkt", student, teacher, weight, **kwargs)


def vid(student: str, teacher: str, weight: float = 1.0, **kwargs: Any) -> Term:
    """Variational information distillation: Gaussian likelihood of the teacher map given the student's."""
    return _feature("vid", student, teacher, weight, **kwargs)


def ft(
    student: str,
    teacher: str,
    weight: float = 500.0,
    phase: str = "transfer",
    name: str = "ft",
    **kwargs: Any,
) -> Term:
    """Factor transfer; ``phase="paraphrase"`` trains the paraphraser (a first stage, student frozen)."""
    return _feature("ft", student, teacher, weight, phase=phase, name=name, **kwargs)


def fsp(student: list[str], teacher: list[str], weight: float = 1.0, **kwargs: Any) -> Term:
    """FSP matrices between consecutive taps (lists of equal length, equal channels per layer)."""
    return Term("fsp", weight, student=list(student), teacher=list(teacher), **kwargs)


def ab(
    student: str,
    teacher: str,
    weight: float = 3e-3,
    margin: float = 1.0,
    adapter: str = "conv_bn",
    **kwargs: Any,
) -> Term:
    """Activation-boundary transfer on pre-ReLU taps, with a conv-BN connector."""
    return _feature("ab", student, teacher, weight, margin=margin, adapter=adapter, **kwargs)


def crd(student: str = "fc:in", teacher: str = "fc:in", weight: float = 0.8, **kwargs: Any) -> Term:
    """Contrastive representation distillation (memory bank; the training set must carry indices)."""
    return _feature("crd", student, teacher, weight, **kwargs)


def reviewkd(
    student: list[str], teacher: list[str], weight: float = 1.0, warmup: float = 20.0, **kwargs: Any
) -> Term:
    """Knowledge review: attention-fused student stages against teacher stages (shallow → deep)."""
    return Term("reviewkd", weight, student=list(student), teacher=list(teacher), warmup=warmup, **kwargs)


def simkd(student: str, teacher: str, weight: float = 1.0, head: str = "fc", **kwargs: Any) -> Term:
    """SimKD: project the student's feature into the teacher's space and reuse its classifier ``head``."""
    return _feature("simkd", student, teacher, weight, head=head, **kwargs)


# ------------------------------------------------------------------ vision-language (CLIP-style)
# Their default keys are the vision_language task's outputs; see protege.losses.vision_language.

_IMAGE_TEXT = ("image_embeds", "text_embeds")


def clip_cls(
    weight: float = 1.0,
    T: float = 0.07,
    student: str = "image_embeds",
    teacher: str = "class_embeds",
    **kwargs: Any,
) -> Term:
    """VLM-OOD's L-cls: cross-entropy of the student's image embeddings against the teacher's class
    text embeddings (cosine / T); needs labels."""
    return Term("clip_cls", weight, student=student, teacher=teacher, T=T, **kwargs)


def vl_align(weight: float = 1.0, k: int | None = None, T: float = 1.0, **kwargs: Any) -> Term:
    """VLM-OOD's L-vlalign: KL between teacher and student image→class distributions over the
    teacher's top-``k`` classes (``None``: all), read from both sides' ``logits``."""
    return Term("vl_align", weight, k=k, T=T, **kwargs)


def feat_mse(
    weight: float = 1.0,
    student: str = "image_embeds",
    teacher: str = "image_embeds",
    normalize: bool = True,
    kind: str = "mse",
    **kwargs: Any,
) -> Term:
    """Embedding mimicry: VLM-OOD's L-mse (normalised, squared error) or DC-CLIP's smooth L1
    (``kind="smooth_l1"``, usually with ``normalize=False``)."""
    return Term(
        "feat_mse", weight, student=student, teacher=teacher, normalize=normalize, kind=kind, **kwargs
    )


def img_contrast(
    weight: float = 1.0,
    T: float = 0.07,
    symmetric: bool = True,
    student: str = "image_embeds",
    teacher: str = "image_embeds",
    **kwargs: Any,
) -> Term:
    """VLM-OOD's L-im-cst: InfoNCE between the student's and the teacher's image embeddings."""
    return Term("img_contrast", weight, student=student, teacher=teacher, T=T, symmetric=symmetric, **kwargs)


def clip_contrastive(
    weight: float = 1.0,
    T: float = 0.07,
    same_class_positive: bool = True,
    student: list[str] | tuple[str, ...] = _IMAGE_TEXT,
    **kwargs: Any,
) -> Term:
    """CLIP's symmetric image-text InfoNCE on the student's own [image, text] embeddings (no
    teacher); same-class pairs count as positives unless ``same_class_positive=False``."""
    return Term(
        "clip_contrastive",
        weight,
        student=list(student),
        teacher=list(student),
        T=T,
        same_class_positive=same_class_positive,
        **kwargs,
    )


def affinity_mimic(
    weight: float = 1.0,
    T_s: float = 0.01,
    T_t: float = 0.01,
    student: list[str] | tuple[str, ...] = _IMAGE_TEXT,
    teacher: list[str] | tuple[str, ...] = _IMAGE_TEXT,
    **kwargs: Any,
) -> Term:
    """TinyCLIP's affinity mimicking: the student's in-batch image↔text affinities follow the teacher's."""
    return Term(
        "affinity_mimic", weight, student=list(student), teacher=list(teacher), T_s=T_s, T_t=T_t, **kwargs
    )


# ------------------------------------------------------------------ one-step diffusion (generation task)
# See protege.losses.diffusion; the defaults are DMD2's (ImageNet-64) where it has them.


def dmd(
    weight: float = 1.0,
    ratio: int = 5,
    lr: float = 1e-4,
    min_t: float = 0.02,
    max_t: float = 0.98,
    name: str = "dmd",
    **kwargs: Any,
) -> Term:
    """DMD's distribution matching: a fake score (a copy of the teacher) trained online, ``ratio``
    of its updates per generator update, at learning rate ``lr``."""
    return Term("dmd", weight, name=name, ratio=ratio, lr=lr, min_t=min_t, max_t=max_t, **kwargs)


def dmd_gan(
    weight: float = 3e-3, critic_weight: float = 1e-2, noise: float = 1.0, name: str = "gan", **kwargs: Any
) -> Term:
    """DMD2's GAN term: a head on the fake score's mid-block features (list after a ``dmd`` term)."""
    return Term("dmd_gan", weight, name=name, critic_weight=critic_weight, noise=noise, **kwargs)


def dmd_regression(weight: float = 0.25, name: str = "regression", **kwargs: Any) -> Term:
    """DMD's regression on the teacher's ODE pairs (``data.options.pairs``); pixel MSE."""
    return Term("dmd_regression", weight, name=name, **kwargs)


def denoising(weight: float = 1.0, name: str = "denoising", **kwargs: Any) -> Term:
    """The diffusion objective: what a teacher (``model: unet``) is trained with."""
    return Term("denoising", weight, name=name, **kwargs)


def score_matching(weight: float = 1.0, name: str = "tsm", **kwargs: Any) -> Term:
    """Teacher Score Matching (MSD): a smaller score model regresses the teacher's output at its own
    noised real images; its UNet then starts a smaller one-step student (``one_step`` ``init``)."""
    return Term("score_matching", weight, name=name, **kwargs)
