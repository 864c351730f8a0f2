"""Distillation on a proxy / web pool under distribution shift: KD³ (``data.strategy: proxy``).

Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images", ICCV 2023. The original training data is unavailable; the student learns
from the teacher on a pool of other images (web, proxy), part of which is unlike the teacher's
data. KD³ has three components, each switchable on its own:

1. **Dynamic instance selection** (``proxy.selection``, :class:`InstanceSelection`): at the start of
   every epoch every pool sample is scored with the combined prediction
   ``p = α(e)·softmax(teacher) + (1 − α(e))·softmax(student)``; the samples whose confidence
   ``max p`` reaches the class-wise threshold of their predicted class (FlexMatch,
   :func:`flexmatch_thresholds`) are the ones trained on that epoch (when none does, which
   fixed thresholds allow, the most confident ``fallback_fraction``, announced on the console).
   α moves from trusting the teacher alone towards the student as the student learns
   (:func:`alpha_at`). The student's prediction is the one it deploys with
   (:meth:`protege.Distiller.inference_model`): with a ``kd3_align`` term, its feature projected
   into the teacher's feature space and classified by the teacher's classifier; without one, the
   student's own logits. The selected samples are not given hard pseudo-labels: the losses
   distill the teacher's soft outputs on them.
   FlexMatch's warm-up is available (``threshold_warmup``) but off by default: with a trained
   teacher that is unconfident on much of the pool for the whole run, it holds every threshold
   near 0 (on ``shifted-pool`` with the MNIST convnet teacher it kept all 6,000 images).
2. **Feature and classifier alignment**: the loss term ``kd3_align``
   (:func:`protege.losses.reuse.kd3_align`).
3. **MixDistribution + contrast**: the loss term ``kd3_contrast``
   (:func:`protege.losses.contrastive.kd3_contrast`). When it is listed, every training batch of
   ``B`` pool images becomes ``2B`` rows, the originals followed by their MixDistribution views
   (:func:`mix_distribution`, made by :class:`MixDistributionViews` on the device), and *every*
   term sees both halves: KD and ``kd3_align`` also learn from the perturbed views (a style
   augmentation) and the student's BatchNorm statistics see both. ``kd3_contrast`` pairs row
   ``i`` with row ``i + B`` and checks that the halves hold the same samples (their dataset
   indices). We chose views made on the data side over a forward hook at a feature tap: the
   Distiller runs each model once per batch, and both networks must see both views.

The pool's labels are never given to the losses: training batches carry the target ``-1`` (and
each sample's pool index, ``meta["index"]``). A pool that has labels in the target's class space
(a ``-1`` label marks an out-of-distribution sample) is only used to log which share of the kept
samples is in-distribution and how often the combined prediction names their class.

Per epoch, the metrics record gets ``proxy/alpha``, ``proxy/kept`` (samples kept),
``proxy/kept_c<k>`` (kept samples predicted as class ``k``), ``proxy/fallback`` (1 when nothing
passed the thresholds), for a pool with labels ``proxy/in_dist_share``,
``proxy/pool_in_dist_share`` and ``proxy/pseudo_acc``, and for a pool whose dataset tags each
sample with a part (``domains``, indices into ``domain_names``, as ``shifted-pool``)
``proxy/kept_<part>``.

A fixed number of samples per epoch (``proxy.samples_per_epoch``, default the pool's size) is
drawn from the kept ones (:class:`SelectionSampler`), so the number of optimizer steps per epoch,
which the learning-rate schedule counts, does not change with the selection. The order depends
only on ``(seed, epoch)`` and the selection only on the weights at the start of the epoch, so a
resumed run selects and trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import send_to_device
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..data.sources import load_data
from ..data.splits import DataSplits
from ..engine.callbacks import Callback
from ..engine.loaders import EpochShuffleSampler, make_loader
from ..engine.loop import console
from ..errors import ProtegeError
from ..tasks.base import ensemble_logits

if TYPE_CHECKING:
    from ..config import ProxyConfig, RunConfig
    from ..core.distiller import Distiller

__all__ = [
    "InstanceSelection",
    "MixDistributionViews",
    "SelectionSampler",
    "alpha_at",
    "class_thresholds",
    "flexmatch_thresholds",
    "load_pool",
    "mix_distribution",
    "pool_domains",
    "proxy_training",
    "select_instances",
]

#: the loss term whose presence turns MixDistribution views on
CONTRAST_LOSS = "kd3_contrast"


# --------------------------------------------------------------------------- selection math


def alpha_at(
    epoch: int, epochs: int, start: float = 1.0, end: float = 0.0, schedule: str = "linear"
) -> float:
    r"""The teacher's weight α(e) in the combined prediction at ``epoch`` (0-based) of ``epochs``.

    With ``t = e / (E - 1)`` (0 at the first epoch, 1 at the last; 0 throughout when ``E = 1``):

    - ``linear``: ``α = start + (end - start)·t``
    - ``cosine``: ``α = end + (start - end)·(1 + cos(π t)) / 2``
    - ``exponential``: ``α = start·(end / start)^t`` (both positive)

    KD³ decays α over training: early on the student is untrained and only the teacher's prediction
    is trusted; later the student, which has learned the teacher's view of the pool, shares the
    vote. The paper's exact schedule was not available offline; the default (1 → 0, linear) is
    ours, and the shape and ends are configurable (``proxy.alpha_*``).
    """
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"alpha_at: epoch {epoch} is outside 0..{epochs - 1}")
    t = epoch / (epochs - 1) if epochs > 1 else 0.0
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError("alpha_at: the exponential schedule needs start and end above 0")
        return start * (end / start) ** t
    raise ValueError(f"alpha_at: unknown schedule {schedule!r}: use linear, cosine or exponential")


def flexmatch_thresholds(
    counts: Tensor, unconfident: int, tau: float, warmup: bool = True, mapping: str = "convex"
) -> Tensor:
    r"""FlexMatch's class-wise thresholds from the per-class counts of confident predictions.

    Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo Labeling",
    NeurIPS 2021 (Eqs. 6, 7, 11). ``counts[c] = σ_c``, the number of samples predicted as class
    ``c`` with confidence at least ``tau``; ``unconfident`` the number of samples below ``tau``:

        β_c = σ_c / max(max_c σ_c, unconfident)     (warm-up; without it: σ_c / max_c σ_c)
        τ_c = M(β_c) · tau,   M(x) = x / (2 - x)  (convex)  or  M(x) = x  (linear)

    The warm-up keeps every threshold low while most samples are still unconfident; a class the
    model predicts confidently less often than others gets a lower threshold. ``β = 0`` when the
    denominator is 0.
    """
    sigma = counts.double()
    denominator = sigma.max() if len(sigma) else sigma.new_zeros(())
    if warmup:
        denominator = torch.clamp(denominator, min=float(unconfident))
    beta = sigma / denominator if denominator > 0 else torch.zeros_like(sigma)
    if mapping == "convex":
        beta = beta / (2.0 - beta)
    elif mapping != "linear":
        raise ValueError(f"flexmatch_thresholds: unknown mapping {mapping!r}: use convex or linear")
    return (beta * tau).to(torch.float32)


def class_thresholds(
    probs: Tensor, tau: float, adaptive: bool = True, warmup: bool = True, mapping: str = "convex"
) -> Tensor:
    """The (C,) confidence thresholds for pool predictions ``probs`` (N, C): FlexMatch's
    :func:`flexmatch_thresholds` from these predictions (``adaptive``), else ``tau`` for every class."""
    num_classes = probs.shape[1]
    if not adaptive:
        return torch.full((num_classes,), float(tau))
    confidence, predicted = probs.max(dim=1)
    confident = confidence >= tau
    counts = torch.bincount(predicted[confident], minlength=num_classes)
    return flexmatch_thresholds(counts, int((~confident).sum()), tau, warmup, mapping)


def select_instances(probs: Tensor, thresholds: Tensor, fallback_fraction: float) -> tuple[Tensor, bool]:
    """``(mask, fallback)``: the samples whose confidence reaches the threshold of their predicted
    class; if none does, the ``fallback_fraction`` most confident ones (at least one) and
    ``fallback = True``."""
    confidence, predicted = probs.max(dim=1)
    mask = confidence >= thresholds.to(confidence.device)[predicted]
    if bool(mask.any()) or len(probs) == 0:
        return mask, False
    k = max(1, math.ceil(fallback_fraction * len(probs)))
    mask[confidence.topk(k).indices] = True
    return mask, True


# --------------------------------------------------------------------------- MixDistribution


def mix_distribution(x: Tensor, lam: Tensor, perm: Tensor, eps: float = 1e-6) -> Tensor:
    r"""MixDistribution: each instance re-styled with channel statistics mixed with another's.

    KD³'s perturbation (Tang et al., ICCV 2023), MixStyle's operation (Zhou et al., "Domain
    Generalization with MixStyle", ICLR 2021). For ``x`` (N, C, H, W), per instance and channel,
    ``μ`` and ``σ = sqrt(var + eps)`` over the spatial dims (biased variance); with ``λ`` (N,) and
    the partner ``perm[i]`` of instance ``i``:

        μ_mix = λ μ_i + (1 - λ) μ_perm(i),   σ_mix = λ σ_i + (1 - λ) σ_perm(i)
        out_i = σ_mix · (x_i - μ_i) / σ_i + μ_mix

    so each output channel has mean ``μ_mix`` and standard deviation ``σ_mix·sqrt(var)/σ``
    (``σ_mix`` exactly when ``eps = 0``). KD³ and MixStyle draw ``λ ~ Beta(a, a)`` per instance and
    ``perm`` as a random permutation of the batch (:class:`MixDistributionViews`).
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"mix_distribution needs float images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    n = x.shape[0]
    if lam.shape != (n,) or perm.shape != (n,):
        raise ValueError(
            f"mix_distribution: lam and perm need one entry per instance ({n}), got "
            f"{tuple(lam.shape)} and {tuple(perm.shape)}"
        )
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    lam = lam.to(x).view(n, 1, 1, 1)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return (x - mu) / sigma * sigma_mix + mu_mix


# --------------------------------------------------------------------------- data


class _Unlabelled(Dataset):
    """The pool as training data: ``(image, -1, {"index": i})``, its own label withheld."""

    def __init__(self, pool: Dataset) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int, dict[str, int]]:
        return self.pool[i][0], -1, {"index": i}


class SelectionSampler(EpochShuffleSampler):
    """``num_samples`` indices per epoch drawn from the ``kept`` pool indices, in an order that
    depends only on ``(seed, epoch)``.

    When at least ``num_samples`` are kept, a random subset of them without repetition; otherwise
    the kept indices reshuffled and repeated until ``num_samples`` are drawn (each kept sample is
    used equally often, up to one). ``kept`` starts as the whole pool; :class:`InstanceSelection`
    replaces it every epoch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        super().__init__(dataset, seed)
        self.kept = torch.arange(self.n)
        self.num_samples = self.n

    def __iter__(self) -> Any:
        if len(self.kept) == 0:
            raise ProtegeError("the proxy pool has no kept sample to train on")
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        rounds = math.ceil(self.num_samples / len(self.kept))
        order = torch.cat([self.kept[torch.randperm(len(self.kept), generator=g)] for _ in range(rounds)])
        return iter(order[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


def load_pool(cfg: RunConfig, data: DataSplits) -> tuple[Dataset, DataSplits]:
    """The proxy pool of ``cfg.data.proxy.pool`` (its ``split``: the source's train split, or all
    of its splits), loaded with the run's transforms, and the pool's :class:`DataSplits`.

    Raises :class:`ProtegeError` when its images do not have the target data's channels and size.
    """
    assert cfg.data.proxy is not None
    spec = cfg.data.proxy.pool
    splits = load_data(
        spec.source,
        root=spec.root,
        transforms=cfg.data.transforms,
        download=cfg.data.download,
        **{"seed": cfg.data.split_seed, **spec.options},  # the pool's own seed option wins
    )
    if (splits.in_chans, splits.input_size) != (data.in_chans, data.input_size):
        raise ProtegeError(
            f"the proxy pool {spec.source!r} has {splits.in_chans}-channel {splits.input_size}x"
            f"{splits.input_size} images, the target data {data.source!r} {data.in_chans}-channel "
            f"{data.input_size}x{data.input_size}: the teacher must see the same shape. Set the pool's "
            "options (e.g. data.proxy.pool.options: {size: "
            f"{data.input_size}, in_chans: {data.in_chans}}} where its source has them) or use another pool"
        )
    if (splits.mean, splits.std) != (data.mean, data.std):
        console.print(
            f"[yellow]note: the proxy pool is normalized with mean {splits.mean} / std {splits.std}, the "
            f"target data with {data.mean} / {data.std}"
        )
    parts = [splits.train] if spec.split == "train" else [splits.train, splits.val, splits.test]
    pool = parts[0] if len(parts) == 1 else ConcatDataset([p for p in parts if p is not None])
    if len(pool) == 0:  # type: ignore[arg-type]
        raise ProtegeError(f"the proxy pool {spec.source!r} (split {spec.split!r}) is empty")
    return pool, splits


def pool_domains(pool: Dataset) -> tuple[Tensor, tuple[str, ...]] | None:
    """``(domains, names)``: the part each pool sample came from, when the pool's dataset(s) tag
    them (``domains``: int64 indices into ``domain_names``), else ``None``."""
    parts: list[Any] = list(pool.datasets) if isinstance(pool, ConcatDataset) else [pool]
    parts = [d for d in parts if len(d)]
    names = {tuple(getattr(d, "domain_names", ())) for d in parts}
    if not parts or len(names) != 1 or not all(hasattr(d, "domains") for d in parts):
        return None
    return torch.cat([torch.as_tensor(d.domains) for d in parts]).long(), names.pop()


# --------------------------------------------------------------------------- callbacks


class InstanceSelection(Callback):
    """KD³'s dynamic instance selection, run at the start of every epoch (see the module).

    Args:
        pool: the pool, yielding ``(image, label)`` (the label is only logged).
        sampler: the training loader's :class:`SelectionSampler`; its ``kept`` is replaced.
        settings: the ``proxy`` section of the run config (α schedule, thresholds, fallback).
        epochs: the run's number of epochs (the α schedule spans them).
        num_classes: the target's classes (labels outside ``0..C-1`` count as out-of-distribution).
        seed: seeds the randomness of the pool's transforms while scoring.
        batch_size, num_workers: of the scoring passes.
        labels_in_target_space: whether the pool's labels name the target's classes (logging).
        domains: the part of the pool each sample came from, and the parts' names (logging;
            :func:`pool_domains`).

    Scoring runs teacher(s) and student in ``eval()`` under ``no_grad`` on the run's device, in
    batches, and puts the distiller back in its mode. The transforms' random draws while scoring
    come from a generator seeded by ``(seed, epoch)`` and do not move the training's RNG, so a
    resumed run selects the same samples. The selection needs no state of its own: it is a
    function of the weights at the start of the epoch. Several processes: each scores the pool,
    and process 0's selection is broadcast.
    """

    name = "kd3_selection"

    def __init__(
        self,
        pool: Dataset,
        sampler: SelectionSampler,
        settings: ProxyConfig,
        epochs: int,
        num_classes: int,
        seed: int = 0,
        batch_size: int = 512,
        num_workers: int = 0,
        labels_in_target_space: bool = True,
        domains: tuple[Tensor, Sequence[str]] | None = None,
    ) -> None:
        self.pool = pool
        self.sampler = sampler
        self.settings = settings
        self.epochs = int(epochs)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.labels_in_target_space = labels_in_target_space
        self.domains = domains
        self.device: torch.device | None = None
        self.record: dict[str, float] = {}

    def on_fit_start(self, distiller: nn.Module, device: torch.device) -> None:
        self.device = device

    @torch.no_grad()
    def score(self, distiller: Distiller, alpha: float, epoch: int) -> tuple[Tensor, Tensor]:
        """``(probs, labels)``: the combined prediction (N, C) on every pool sample and the pool's
        own labels (N,) (``-1`` where it has none)."""
        teachers = list(distiller.teachers.values())
        if not teachers:
            raise ProtegeError(
                "KD³ instance selection scores the pool with the teacher: give a teacher model"
            )
        task = distiller.task
        device = self.device or next(distiller.student.parameters()).device
        loader = DataLoader(
            self.pool, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
        was_training = distiller.training
        distiller.eval()
        predictor = distiller.inference_model()
        probs, labels = [], []
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 100_003 + epoch + 7_919)  # not the sampler's stream
                for batch in loader:
                    inputs, target = task.split(send_to_device(batch, device))
                    p = 0.0
                    if alpha > 0:
                        outs = [task.forward(t, inputs) for t in teachers]
                        p = alpha * ensemble_logits(outs, distiller.teacher_weights).float().softmax(-1)
                    if alpha < 1:
                        p = p + (1 - alpha) * task.forward(predictor, inputs)["logits"].float().softmax(-1)
                    probs.append(p.cpu())
                    n = len(probs[-1])
                    labels.append(torch.full((n,), -1) if target is None else torch.as_tensor(target).cpu())
        finally:
            distiller.train(was_training)
        return torch.cat(probs), torch.cat(labels).long()

    def on_epoch_start(self, distiller: nn.Module, epoch: int) -> None:
        s = self.settings
        alpha = alpha_at(epoch, self.epochs, s.alpha_start, s.alpha_end, s.alpha_schedule)
        probs, labels = self.score(distiller, alpha, epoch)  # type: ignore[arg-type]
        if probs.shape[1] != self.num_classes:
            raise ProtegeError(
                f"the teacher predicts {probs.shape[1]} classes, the target data has {self.num_classes}"
            )
        thresholds = class_thresholds(probs, s.threshold, s.adaptive, s.threshold_warmup, s.threshold_mapping)
        mask, fallback = select_instances(probs, thresholds, s.fallback_fraction)
        mask = _same_on_all_processes(mask, self.device)
        self.sampler.kept = mask.nonzero().squeeze(1)
        predicted = probs.argmax(dim=1)
        counts = torch.bincount(predicted[mask], minlength=self.num_classes)
        self.record = {"proxy/alpha": alpha, "proxy/kept": int(mask.sum()), "proxy/fallback": int(fallback)}
        self.record.update({f"proxy/kept_c{c}": int(n) for c, n in enumerate(counts.tolist())})
        self.record.update(self._label_stats(mask, predicted, labels))
        if self.domains is not None:
            tags, names = self.domains
            kept = torch.bincount(tags[mask], minlength=len(names)).tolist()
            self.record.update({f"proxy/kept_{name}": int(n) for name, n in zip(names, kept)})
        if fallback:
            console.print(
                f"[bold red]KD³ selection, epoch {epoch + 1}: no pool sample reached its class's confidence "
                f"threshold; this epoch trains on the {int(mask.sum())} most confident samples "
                f"({s.fallback_fraction:.0%} of the pool) instead"
            )

    def _label_stats(self, mask: Tensor, predicted: Tensor, labels: Tensor) -> dict[str, float]:
        """In-distribution shares and pseudo-label accuracy, for a pool labelled like the target."""
        inside = (labels >= 0) & (labels < self.num_classes)
        if not self.labels_in_target_space or not bool(inside.any()):
            return {}
        kept_inside = mask & inside
        n_kept = int(mask.sum())
        stats = {
            "proxy/pool_in_dist_share": float(inside.float().mean()),
            "proxy/in_dist_share": int(kept_inside.sum()) / n_kept if n_kept else 0.0,
        }
        if bool(kept_inside.any()):
            stats["proxy/pseudo_acc"] = float((predicted[kept_inside] == labels[kept_inside]).float().mean())
        return stats

    def on_epoch_end(self, distiller: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        record.update(self.record)


def _same_on_all_processes(mask: Tensor, device: torch.device | None) -> Tensor:
    """Process 0's mask on every process (scores may differ in the last bits across devices)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mask
    shared = mask.to(device=device, dtype=torch.uint8)
    dist.broadcast(shared, src=0)
    return shared.bool().cpu()


class MixDistributionViews(Callback):
    """Turns each training batch of ``B`` images into ``2B`` rows: the originals, then their
    MixDistribution views (:func:`mix_distribution`), with targets and ``meta["index"]`` repeated.

    ``λ ~ Beta(beta, beta)`` per instance and the partner permutation are drawn from a generator
    seeded by ``(seed, epoch, step)``: the views do not depend on the global RNG, and a resumed run
    makes the same ones.
    """

    name = "mixdistribution"

    def __init__(self, beta: float = 0.1, seed: int = 0) -> None:
        if not beta > 0:
            raise ProtegeError(f"MixDistribution's Beta parameter must be positive, got {beta}")
        self.beta = float(beta)
        self.seed = int(seed)

    def on_batch(self, distiller: nn.Module, batch: Any, epoch: int, step: int) -> Any:
        task = distiller.task
        x, target = task.split(batch)
        index = task.meta(batch).get("index")
        if not isinstance(x, Tensor) or index is None or target is None:
            raise ProtegeError(
                "MixDistribution views need batches of (images, targets, {'index': ...}), as the proxy "
                f"loader yields; got {type(batch).__name__}"
            )
        rng = np.random.default_rng([self.seed, epoch, step])
        n = x.shape[0]
        lam = torch.from_numpy(rng.beta(self.beta, self.beta, n)).to(x)
        perm = torch.from_numpy(rng.permutation(n)).to(x.device)
        views = mix_distribution(x, lam, perm)
        return torch.cat([x, views]), torch.cat([target, target]), {"index": torch.cat([index, index])}


# --------------------------------------------------------------------------- the strategy


def proxy_training(
    cfg: RunConfig, data: DataSplits, distiller: Distiller
) -> tuple[DataLoader, list[Callback]]:
    """The training loader over the proxy pool and KD³'s callbacks for ``cfg``
    (``data.strategy: proxy``; see the module)."""
    settings = cfg.data.proxy
    assert settings is not None
    pool, splits = load_pool(cfg, data)
    loader = make_loader(
        _Unlabelled(pool),
        cfg.data.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        sampler_cls=SelectionSampler,
    )
    sampler = loader.sampler
    assert isinstance(sampler, SelectionSampler)
    if settings.samples_per_epoch is not None:
        sampler.num_samples = settings.samples_per_epoch
    callbacks: list[Callback] = []
    if settings.selection:
        callbacks.append(
            InstanceSelection(
                pool,
                sampler,
                settings,
                cfg.epochs,
                data.num_classes,
                seed=cfg.seed,
                batch_size=cfg.data.eval_batch_size,
                num_workers=cfg.data.num_workers,
                labels_in_target_space=splits.num_classes == data.num_classes,
                domains=pool_domains(pool),
            )
        )
    if any(t.loss == CONTRAST_LOSS for t in distiller.terms):
        callbacks.append(MixDistributionViews(settings.mix_beta, seed=cfg.seed))
    return loader, callbacks
