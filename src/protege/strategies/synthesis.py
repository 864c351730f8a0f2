"""Data-free distillation: images synthesized from the teacher (``data.strategy: synthetic``).

Two methods (``data.synthesis.method``):

**DeepInversion** (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020). A batch of images ``x`` (the pixels are the parameters, Adam) is
optimized so that the frozen teacher classifies it as sampled target classes *and* the statistics
of every BatchNorm's input match the running statistics the teacher saw in training:

    L(x) = w_ce·CE(f_T(x̃), y) + w_bn·Σ_l m_l·(‖μ_l(x̃) − μ_l^run‖₂ + ‖σ²_l(x̃) − σ²_l^run‖₂)
           + w_tv·TV(x̃) + w_l2·‖x̃‖₂ + w_adi·(1 − JS(f_T(x̃), f_S(x̃)))

``x̃`` is ``x`` randomly shifted (``jitter``) and optionally flipped at each step, ``m_l`` is
``bn_first_multiplier`` for the first BatchNorm and 1 for the others, and the last term is the
*adaptive competition* of ADI (the student's disagreement with the teacher, needs a student). After
each step the pixels are clamped to the data's valid range. The images are synthesized once, at the
start of the run, stored in ``runs/<name>/synthetic/`` and the student distills on them like on any
data set (batches carry target -1: no label is ever used).

**Adversarial** (DFAD: Fang et al., "Data-Free Adversarial Distillation", 2019; ZSKT: Micaelli &
Storkey, NeurIPS 2019). A small conv generator ``G(z)`` is trained to *maximize* the student's
disagreement with the teacher (``l1``: mean |logit gap| as DFAD, or ``kl``: KL(p_T‖p_S) as ZSKT),
plus the weighted BatchNorm-statistic loss on its images and, optionally, DAFL's one-hot and
information-entropy priors (Chen et al., ICCV 2019); the student distills on its fresh samples.
It runs as a :class:`~protege.engine.callbacks.Callback`: the train loader yields
``steps_per_epoch`` placeholder batches per epoch, and each is replaced by a generated batch (the
generator trained every ``generator_every`` student steps first). Generator weights and optimizer
state are checkpointed with the run, so a resumed run continues exactly. Per epoch the metrics
record the generator's disagreement and BN loss and the time per generated batch, and
``runs/<name>/synthetic/grid.png`` shows samples of a fixed noise batch.

**A synthesized set** (a directory): ``images.safetensors`` (``images`` uint8 pixels or float16
normalized values, ``target`` the class it was optimized for, ``teacher_pred`` and
``teacher_conf`` the teacher's prediction on the stored images), ``index.json`` (shape,
normalization, options, the fingerprint of teacher weights + options, time per batch) and
``grid.png`` (a few images per class). The directory appears complete or not at all. It is reused
when its fingerprint matches, refused otherwise (``synthesis.overwrite`` re-synthesizes), and it
loads as a data set: ``data: {source: synthetic, root: <dir>}`` (labels: the teacher's
predictions, or option ``labels: target``), or ``data.synthesis.path: <dir>`` in another run.

DeepInversion reads the teacher's BatchNorm layers: a teacher whose BatchNorms were folded into
its convolutions (:mod:`protege.core.fold`) has none, so ``protege.run`` does not fold the teacher
of a synthetic run, and a teacher without BatchNorm running statistics is refused unless
``bn_weight: 0``. Image classification with one teacher, in one process.

Deviations from the reference code, on purpose: TV and L2 priors are per-image norms averaged over
the batch (the reference takes norms over the whole batch, so its weights depend on batch size);
the TV prior is the ℓ2 one (the reference's ℓ1 variant is off by default there too); one image
resolution (no multi-resolution schedule).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from ..data.splits import DataSplits, TensorImageDataset
from ..data.synthetic import (
    GRID,
    SetSpec,
    SyntheticSet,
    decode_pixels,
    encode_pixels,
    grid_png,
    load_synthetic_set,
    read_index,
    save_synthetic_set,
    to_unit_range,
)
from ..engine.callbacks import Callback
from ..engine.checkpoint import checkpoint_dir, load_checkpoint, read_pointers
from ..engine.loaders import make_loader
from ..engine.loop import console
from ..errors import ProtegeError
from ..files import atomic_write_text, digest

if TYPE_CHECKING:
    from ..config import RunConfig, SynthesisConfig
    from ..core.distiller import Distiller

__all__ = [
    "AdversarialSynthesis",
    "BatchNormStatistics",
    "Generator",
    "SetSpec",
    "SyntheticSet",
    "adversarial_synthesis",
    "bn_statistic_loss",
    "competition_loss",
    "disagreement_loss",
    "information_entropy_prior",
    "invert_batch",
    "js_divergence",
    "l2_prior",
    "load_synthetic_set",
    "one_hot_prior",
    "open_or_synthesize",
    "save_synthetic_set",
    "synthesize_images",
    "synthetic_training",
    "total_variation",
    "write_synthetic_set",
]


# -- losses (pure functions) --------------------------------------------------------------------


def bn_statistic_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """DeepInversion's feature-statistic loss at one BatchNorm (Yin et al., CVPR 2020, eq. 4):

        ‖μ(x) − μ_run‖₂ + ‖σ²(x) − σ²_run‖₂

    with ``μ(x)``, ``σ²(x)`` the per-channel mean and biased variance of the BatchNorm's input
    ``x`` over every dimension but the channel one (dim 1): ``(N, C)``, ``(N, C, L)`` or
    ``(N, C, H, W)``."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = x.var(dims, correction=0)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def total_variation(x: Tensor) -> Tensor:
    """The ℓ2 total-variation prior of DeepInversion, per image, averaged over the batch:

        TV(x) = (1/N) Σ_n Σ_d ‖Δ_d x_n‖₂

    over the four neighbour differences ``d``: right, down and both diagonals (each norm over the
    image's channels and pixels). ``x``: ``(N, C, H, W)``."""
    diffs = (
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, :] - x[..., :-1, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    return sum(torch.linalg.vector_norm(d.flatten(1), dim=1) for d in diffs).mean()


def l2_prior(x: Tensor) -> Tensor:
    """DeepInversion's ℓ2 image prior: the mean over the batch of each image's norm,
    ``(1/N) Σ_n ‖x_n‖₂``."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).mean()


def js_divergence(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between the softmax distributions, mean over the batch:
    ``JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m)``, ``m = (p + q) / 2``; between 0 and ln 2."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_p + kl_q)).mean()


def competition_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeepInversion's adaptive competition (ADI): ``1 − JS(p_T, p_S)``; minimizing it makes
    images on which student and teacher disagree."""
    return 1.0 - js_divergence(student_logits, teacher_logits)


def disagreement_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str = "l1") -> Tensor:
    """What an adversarial generator maximizes (and the student minimizes):

    - ``l1``: mean absolute logit difference, ``(1/(N·K)) Σ |z_T − z_S|`` (DFAD, Fang et al. 2019);
    - ``kl``: ``KL(p_T‖p_S)``, mean over the batch (ZSKT, Micaelli & Storkey 2019)."""
    if kind == "l1":
        return (teacher_logits.float() - student_logits.float()).abs().mean()
    if kind == "kl":
        log_p = F.log_softmax(teacher_logits.float(), dim=-1)
        log_q = F.log_softmax(student_logits.float(), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    raise ProtegeError(f"disagreement must be 'l1' or 'kl', got {kind!r}")


def one_hot_prior(teacher_logits: Tensor) -> Tensor:
    """DAFL's one-hot loss (Chen et al., ICCV 2019): ``CE(z_T, argmax z_T)``, low when the teacher
    is confident on each generated image."""
    return F.cross_entropy(teacher_logits.float(), teacher_logits.argmax(-1))


def information_entropy_prior(teacher_logits: Tensor) -> Tensor:
    """DAFL's information-entropy loss: ``Σ_k p̄_k log p̄_k`` (the negative entropy of the batch's
    mean teacher distribution ``p̄``), lowest (``−log K``) when the batch covers all classes evenly."""
    mean = F.softmax(teacher_logits.float(), dim=-1).mean(0)
    return (mean * torch.log(mean.clamp_min(1e-12))).sum()


class BatchNormStatistics:
    """Forward pre-hooks on every BatchNorm (with running statistics) of ``model`` that record
    :func:`bn_statistic_loss` of its input on each forward. :meth:`pop` sums them (the first
    layer called times ``first_multiplier``) and forgets them. Use as a context manager (the hooks
    are removed on exit); the model must be in ``eval()`` so its running statistics stay fixed.

    Raises ProtegeError when the model has no such layer (e.g. BatchNorms folded into convolutions).
    """

    def __init__(self, model: nn.Module, first_multiplier: float = 1.0) -> None:
        layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
        if not layers:
            raise ProtegeError(
                f"the teacher ({type(model).__name__}) has no BatchNorm layer with running statistics, "
                "which the BN-statistic loss matches (a teacher whose BatchNorms were folded into its "
                "convolutions has none: synthesize from the unfolded model). Set data.synthesis.bn_weight: 0 "
                "to synthesize without it"
            )
        self.first_multiplier = float(first_multiplier)
        self.losses: list[Tensor] = []
        self._handles = [m.register_forward_pre_hook(self._hook) for m in layers]

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.losses.append(bn_statistic_loss(args[0], module.running_mean, module.running_var))

    def pop(self) -> Tensor:
        """The summed statistic loss of the forward passes since the last call."""
        if not self.losses:
            raise ProtegeError("no BatchNorm layer ran since the last pop(): run the model first")
        losses, self.losses = self.losses, []
        return self.first_multiplier * losses[0] + sum(losses[1:], torch.zeros_like(losses[0]))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.losses = []

    def __enter__(self) -> BatchNormStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- pixel range and storage --------------------------------------------------------------------


# -- fingerprint --------------------------------------------------------------------------------


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values), stable across processes."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_DEEPINVERSION_KEYS = (
    "n_images",
    "batch_size",
    "iterations",
    "lr",
    "bn_weight",
    "bn_first_multiplier",
    "ce_weight",
    "tv_weight",
    "l2_weight",
    "competition_weight",
    "jitter",
    "flip",
    "dtype",
)


def fingerprint_parts(
    options: SynthesisConfig, spec: SetSpec, teacher: nn.Module, student: nn.Module | None = None
) -> dict[str, Any]:
    """The parts a set's fingerprint hashes: teacher weights, the competing student's weights
    (ADI only), the content options of the method, the data geometry and the seed."""
    opts = options.model_dump(mode="json")
    return {
        "method": options.method,
        "teacher": state_digest(teacher),
        "student": state_digest(student) if student is not None and options.competition_weight > 0 else None,
        "options": {k: opts[k] for k in _DEEPINVERSION_KEYS},
        "data": spec.data_part(),
        "seed": spec.seed,
    }


def _what_differs(old: dict[str, Any], new: dict[str, Any]) -> str:
    said = []
    for key in ("method", "teacher", "student", "data", "seed"):
        if old.get(key) != new.get(key):
            said.append("the teacher's weights" if key == "teacher" else f"the {key}")
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    changed = [
        f"{k} {old_opts.get(k)!r} -> {new_opts.get(k)!r}" for k in new_opts if old_opts.get(k) != new_opts[k]
    ]
    if changed:
        said.append("options (" + ", ".join(changed) + ")")
    return "; ".join(said) or "its fingerprint"


# -- DeepInversion ------------------------------------------------------------------------------


def balanced_targets(n: int, num_classes: int, start: int = 0) -> Tensor:
    """Classes ``start, start+1, …`` cycling through ``num_classes``: any run of ``num_classes``
    consecutive images holds every class once, so each batch is balanced (counts differ by ≤ 1)."""
    return (torch.arange(start, start + n) % num_classes).long()


def _seeded(*parts: int) -> torch.Generator:
    """A CPU generator whose seed is a fixed function of ``parts`` (no global RNG involved)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def invert_batch(
    teacher: nn.Module,
    targets: Tensor,
    options: SynthesisConfig,
    spec: SetSpec,
    generator: torch.Generator,
    student: nn.Module | None = None,
    history: dict[str, list[float]] | None = None,
) -> Tensor:
    """Optimize one batch of images for ``targets`` (DeepInversion, module docstring) on the
    teacher's device; returns the normalized images (detached). ``generator`` draws the initial
    noise and the per-step jitter/flip. ``history`` (optional) receives each step's ``bn`` and
    ``ce`` losses. The teacher (and student) must be in ``eval()``; their gradients are untouched."""
    device = next(teacher.parameters()).device
    lo, hi = (t.to(device) for t in spec.range())
    shape = (len(targets), spec.in_chans, spec.size, spec.size)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    targets = targets.to(device)
    optimizer = torch.optim.Adam([x], lr=options.lr, betas=(0.5, 0.9), eps=1e-8)
    steps = options.iterations
    compete = student is not None and options.competition_weight > 0
    stats = BatchNormStatistics(teacher, options.bn_first_multiplier) if options.bn_weight > 0 else None
    try:
        for step in range(steps):
            for group in optimizer.param_groups:  # cosine decay, as the reference code
                group["lr"] = 0.5 * options.lr * (1 + math.cos(math.pi * step / steps))
            moved = x
            if options.jitter:
                dy, dx = torch.randint(
                    -options.jitter, options.jitter + 1, (2,), generator=generator
                ).tolist()
                moved = torch.roll(moved, shifts=(dy, dx), dims=(2, 3))
            if options.flip and bool(torch.rand((), generator=generator) < 0.5):
                moved = moved.flip(3)
            logits = teacher(moved)
            ce = F.cross_entropy(logits, targets)
            loss = options.ce_weight * ce
            bn = stats.pop() if stats is not None else logits.new_zeros(())
            loss = loss + options.bn_weight * bn
            loss = loss + options.tv_weight * total_variation(moved) + options.l2_weight * l2_prior(moved)
            if compete:
                assert student is not None
                loss = loss + options.competition_weight * competition_loss(student(moved), logits)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            if history is not None:
                history.setdefault("bn", []).append(float(bn.detach()))
                history.setdefault("ce", []).append(float(ce.detach()))
    finally:
        if stats is not None:
            stats.remove()
    return x.detach()


@contextmanager
def _evaluating(*models: nn.Module | None) -> Iterator[None]:
    """Models in ``eval()`` for the block, then back in the mode they were in."""
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


@torch.no_grad()
def _teacher_predictions(teacher: nn.Module, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    device = next(teacher.parameters()).device
    preds, confs = [], []
    for chunk in images.split(batch_size):
        prob = F.softmax(teacher(chunk.to(device)).float(), dim=-1)
        conf, pred = prob.max(-1)
        preds.append(pred.cpu())
        confs.append(conf.cpu())
    return torch.cat(preds), torch.cat(confs)


def _finish(
    images: Tensor, target: Tensor, teacher: nn.Module, spec: SetSpec, dtype: str, index: dict[str, Any]
) -> SyntheticSet:
    """Round the images through their storage format and label what the teacher sees in them."""
    lo, hi = spec.range()
    images = decode_pixels(encode_pixels(images.cpu(), lo, hi, dtype), lo, hi)
    with _evaluating(teacher):
        pred, conf = _teacher_predictions(teacher, images)
    index.update(
        {
            "n_images": len(images),
            "teacher_agreement": float((pred == target).float().mean()) if len(images) else 0.0,
            "teacher_mean_confidence": float(conf.mean()) if len(images) else 0.0,
            "teacher_pred_counts": torch.bincount(pred, minlength=spec.num_classes).tolist(),
        }
    )
    return SyntheticSet(images, target, pred, conf, index)


def synthesize_images(
    teacher: nn.Module,
    options: SynthesisConfig,
    spec: SetSpec,
    student: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
) -> SyntheticSet:
    """DeepInversion: ``options.n_images`` images in batches of ``options.batch_size``, classes
    balanced in every batch, on the teacher's device. Reproducible for ``spec.seed`` (batch ``b``
    starts from noise drawn with seed ``(seed, b)``). The time per batch is in the index."""
    if options.method != "deepinversion":
        raise ProtegeError(f"synthesize_images makes DeepInversion sets, not {options.method!r} ones")
    if options.competition_weight > 0 and student is None:
        raise ProtegeError("synthesis.competition_weight > 0 (ADI) needs a student to compete with")
    n, bs = options.n_images, options.batch_size
    batches, targets, seconds = [], [], []
    bn_start, bn_end = [], []
    with _evaluating(teacher, student):
        for b, start in enumerate(range(0, n, bs)):
            target = balanced_targets(min(bs, n - start), spec.num_classes, start)
            history: dict[str, list[float]] = {}
            t0 = time.perf_counter()
            images = invert_batch(teacher, target, options, spec, _seeded(spec.seed, b), student, history)
            seconds.append(time.perf_counter() - t0)
            batches.append(images.cpu())
            targets.append(target)
            if history.get("bn"):
                bn_start.append(history["bn"][0])
                bn_end.append(history["bn"][-1])
            if log is not None:
                log(
                    f"synthesized batch {b + 1}/{math.ceil(n / bs)} ({len(target)} images) in "
                    f"{seconds[-1]:.2f} s"
                    + (f"; BN loss {bn_start[-1]:.3g} -> {bn_end[-1]:.3g}" if bn_end else "")
                )
    index: dict[str, Any] = {
        "seconds_per_batch": sum(seconds) / len(seconds),
        "batch_seconds": [round(s, 4) for s in seconds],
        "total_seconds": sum(seconds),
        "device": str(next(teacher.parameters()).device),
        "bn_loss_start": bn_start,
        "bn_loss_end": bn_end,
    }
    return _finish(torch.cat(batches), torch.cat(targets), teacher, spec, options.dtype, index)


def open_or_synthesize(
    path: str | Path,
    teacher: nn.Module,
    options: SynthesisConfig,
    spec: SetSpec,
    student: nn.Module | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> SyntheticSet:
    """The DeepInversion set at ``path``: reused when it was made from the same teacher weights,
    options, data geometry and seed; refused when made otherwise (unless ``overwrite``: then made
    again); synthesized and saved when there is none."""
    path = Path(path)
    parts = fingerprint_parts(options, spec, teacher, student)
    fingerprint = digest(parts)
    index = read_index(path)
    if index is not None and index.get("fingerprint") == fingerprint:
        if log is not None:
            log(f"reusing the synthetic set {path} ({index['n_images']} images, same teacher and options)")
        return load_synthetic_set(path)
    if index is not None and not overwrite:
        raise ProtegeError(
            f"{path} holds a synthetic set made with other settings ({_what_differs(index.get('parts', {}), parts)}). "
            "Re-synthesize it with --set data.synthesis.overwrite=true (protege synthesize --overwrite), "
            "point data.synthesis.path elsewhere, or remove the directory"
        )
    sset = synthesize_images(teacher, options, spec, student, log)
    sset.index.update({"method": options.method, "fingerprint": fingerprint, "parts": parts})
    save_synthetic_set(sset, path, spec, options.dtype)
    if log is not None:
        log(
            f"synthetic set {path}: {len(sset)} images, {sset.index['seconds_per_batch']:.2f} s per batch of "
            f"{options.batch_size}; the teacher predicts the intended class for "
            f"{100 * sset.index['teacher_agreement']:.1f}%"
        )
    return sset


# -- the adversarial generator ------------------------------------------------------------------


class Generator(nn.Module):
    """The DAFL/DFAD image generator: ``z`` → linear → ``(2w, s/4, s/4)`` → BN → [upsample ×2,
    conv3x3, BN, LeakyReLU(0.2)] → [upsample ×2, conv3x3 to ``w``, BN, LeakyReLU] → conv3x3 →
    tanh, rescaled from [−1, 1] to the data's normalized pixel range ``[lo, hi]`` per channel
    (so every output is a valid image). Sizes not divisible by 4 are cropped to ``size``."""

    def __init__(
        self,
        z_dim: int,
        out_chans: int,
        size: int,
        width: int = 64,
        lo: Tensor | None = None,
        hi: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.z_dim, self.size, self.start = z_dim, size, math.ceil(size / 4)
        self.fc = nn.Linear(z_dim, 2 * width * self.start**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, out_chans, 3, padding=1),
            nn.Tanh(),
        )
        self.register_buffer("lo", lo if lo is not None else -torch.ones(out_chans, 1, 1))
        self.register_buffer("hi", hi if hi is not None else torch.ones(out_chans, 1, 1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(len(z), -1, self.start, self.start)
        x = self.body(h)[..., : self.size, : self.size]
        return self.lo + (x + 1) / 2 * (self.hi - self.lo)


class _Placeholders(Dataset[tuple[Tensor, int]]):
    """``n`` blank images: the batches an adversarial run's loader yields, each replaced by a
    generated batch in :meth:`AdversarialSynthesis.on_batch` (their shape lets the engine probe
    the models with a first batch)."""

    def __init__(self, n: int, shape: tuple[int, int, int]) -> None:
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.zeros(self.shape), -1


class AdversarialSynthesis(Callback):
    """Trains a :class:`Generator` against the student and hands the student its samples
    (module docstring). The noise of step ``s`` is drawn from seed ``(seed, s)``, so runs are
    reproducible and a resumed run (generator + optimizer from the checkpoint) continues exactly."""

    name = "adversarial"

    def __init__(
        self,
        generator: Generator,
        options: SynthesisConfig,
        seed: int,
        steps_per_epoch: int,
        num_classes: int,
        grid_path: Path | None = None,
    ) -> None:
        self.generator = generator
        self.num_classes = int(num_classes)
        self.options = options
        self.seed = int(seed)
        self.steps_per_epoch = int(steps_per_epoch)
        self.grid_path = grid_path
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=options.generator_lr)
        self._device: torch.device | None = None
        self._log: dict[str, list[float]] = {}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        for pid, pstate in self.optimizer.state_dict()["state"].items():
            for key, value in pstate.items():
                state[f"optimizer.{pid}.{key}"] = torch.as_tensor(value)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        gen = {k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")}
        self.generator.load_state_dict(gen)
        per_param: dict[int, dict[str, Tensor]] = {}
        for k, v in state.items():
            if k.startswith("optimizer."):
                pid, key = k[len("optimizer.") :].split(".", 1)
                per_param.setdefault(int(pid), {})[key] = v
        opt_state = self.optimizer.state_dict()
        opt_state["state"] = per_param
        self.optimizer.load_state_dict(opt_state)  # moves the state to the parameters' device

    # -- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, distiller: nn.Module, device: torch.device) -> None:
        self._device = torch.device(device)
        state = self.state_dict()
        self.generator.to(self._device)
        self.load_state_dict(state)  # the optimizer's state follows its parameters

    def _noise(self, n: int, step: int, which: int) -> Tensor:
        g = _seeded(self.seed, step, which)
        return torch.randn(n, self.options.z_dim, generator=g).to(self._device)

    def on_batch(self, distiller: nn.Module, batch: Any, epoch: int, step: int) -> Any:
        t0 = time.perf_counter()
        _, target = distiller.task.split(batch)
        n = len(target)
        global_step = epoch * self.steps_per_epoch + step
        if global_step % self.options.generator_every == 0:
            for j in range(self.options.generator_steps):
                self._train_generator(distiller, self._noise(n, global_step, j + 1))
        self.generator.train()
        with torch.no_grad():
            images = self.generator(self._noise(n, global_step, 0))
        self._log.setdefault("seconds_per_batch", []).append(time.perf_counter() - t0)
        return images, torch.full_like(target, -1)

    def _train_generator(self, distiller: nn.Module, z: Tensor) -> None:
        """One generator update: maximize the student's disagreement with the teacher on ``G(z)``
        (plus the weighted BN-statistic loss and DAFL priors). The student runs as it trains
        (``train()``, as DFAD); only the generator's gradients are computed."""
        opts = self.options
        teacher = next(iter(distiller.teachers.values()))
        self.generator.train()
        images = self.generator(z)
        stats = BatchNormStatistics(teacher, opts.bn_first_multiplier) if opts.bn_weight > 0 else None
        try:
            t_logits = teacher(images)  # the teacher is frozen and in eval(): its statistics stay
            bn = stats.pop() if stats is not None else images.new_zeros(())
        finally:
            if stats is not None:
                stats.remove()
        gap = disagreement_loss(distiller.student(images), t_logits, opts.disagreement)
        loss = -gap + opts.bn_weight * bn
        if opts.oh_weight:
            loss = loss + opts.oh_weight * one_hot_prior(t_logits)
        if opts.ie_weight:
            loss = loss + opts.ie_weight * information_entropy_prior(t_logits)
        params = [p for p in self.generator.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)  # the student's own gradients stay untouched
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._log.setdefault("disagreement", []).append(float(gap.detach()))
        self._log.setdefault("bn_loss", []).append(float(bn.detach()))

    def on_epoch_end(self, distiller: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        for key, values in self._log.items():
            record[f"synthesis/{key}"] = sum(values) / len(values)
        self._log = {}
        if self.grid_path is not None:
            teacher = next(iter(distiller.teachers.values()))
            images = self.sample(64, seed=0, batch_size=64)
            pred, _ = _teacher_predictions(teacher, images)
            lo, hi = self.generator.lo.cpu(), self.generator.hi.cpu()
            atomic_write_text(self.grid_path, grid_png(to_unit_range(images, lo, hi), pred, self.num_classes))

    def sample(self, n: int, seed: int, batch_size: int) -> Tensor:
        """``n`` images (on the CPU) from noise drawn with ``seed``, in batches of ``batch_size``
        with the generator in ``train()`` as the student saw its samples (BatchNorm on batch
        statistics), from a copy: the generator's own running statistics stay as they are."""
        generator = copy.deepcopy(self.generator).train()
        device = next(generator.parameters()).device
        g = _seeded(self.seed, seed, -1)
        out = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                z = torch.randn(min(batch_size, n - start), self.options.z_dim, generator=g).to(device)
                out.append(generator(z).cpu())
        return torch.cat(out)


def adversarial_synthesis(
    options: SynthesisConfig, spec: SetSpec, steps_per_epoch: int, grid_path: Path | None = None
) -> AdversarialSynthesis:
    """The generator callback of an adversarial run, its generator initialized from ``spec.seed``
    (whatever the global RNG holds)."""
    lo, hi = spec.range()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        generator = Generator(options.z_dim, spec.in_chans, spec.size, options.generator_width, lo, hi)
    return AdversarialSynthesis(generator, options, spec.seed, steps_per_epoch, spec.num_classes, grid_path)


# -- runs ---------------------------------------------------------------------------------------


def _one_teacher(teachers: Sequence[nn.Module], task: str) -> nn.Module:
    if task != "classification":
        raise ProtegeError(
            f"data.strategy synthetic synthesizes images for classification, not task {task!r}"
        )
    if len(teachers) != 1:
        raise ProtegeError(
            f"data-free synthesis inverts one teacher, the config has {len(teachers)}: give one 'teacher'"
        )
    return teachers[0]


def _device(cfg: RunConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")


def _set_path(cfg: RunConfig, run_dir: str | Path | None) -> Path:
    syn = cfg.data.synthesis
    assert syn is not None
    if syn.path:
        return Path(syn.path).expanduser()
    return Path(run_dir if run_dir is not None else cfg.run_dir) / "synthetic"


def synthetic_training(
    cfg: RunConfig, data: DataSplits, distiller: Distiller, run_dir: str | Path | None = None
) -> tuple[DataLoader, list[Callback]]:
    """The training loader (and callbacks) of a ``data.strategy: synthetic`` run.

    ``deepinversion``: the set at ``data.synthesis.path`` (default ``<run_dir>/synthetic``), reused
    or synthesized now with the distiller's (unfolded) teacher on the run's device, competing with
    the distiller's student as initialized when ``competition_weight > 0``; batches of
    ``data.batch_size`` carry target -1, shifted by up to 2 pixels with ``transforms: augment``.
    ``adversarial``: ``steps_per_epoch`` placeholder batches per epoch and the generator callback.
    Validation and test stay the data source's own (labelled) splits."""
    syn = cfg.data.synthesis
    assert syn is not None
    teacher = _one_teacher(list(distiller.teachers.values()), cfg.task)
    spec = SetSpec.of(data, cfg.seed if syn.seed is None else syn.seed)
    lo, _ = spec.range()
    bs = cfg.data.batch_size
    if syn.method == "adversarial":
        placeholders = _Placeholders(syn.steps_per_epoch * bs, (spec.in_chans, spec.size, spec.size))
        grid = Path(run_dir if run_dir is not None else cfg.run_dir) / "synthetic" / GRID
        callback = adversarial_synthesis(syn, spec, syn.steps_per_epoch, grid)
        loader = make_loader(placeholders, bs, shuffle=True, seed=cfg.seed, num_workers=0)
        return loader, [callback]
    student = distiller.student if syn.competition_weight > 0 else None
    device = _device(cfg)
    moved = [m for m in (teacher, student) if m is not None]
    homes = [next(m.parameters()).device for m in moved]
    for m in moved:
        m.to(device)
    try:
        sset = open_or_synthesize(
            _set_path(cfg, run_dir), teacher, syn, spec, student, overwrite=syn.overwrite, log=console.print
        )
    finally:
        for m, home in zip(moved, homes):
            m.to(home)
    shift = 2 if cfg.data.transforms == "augment" else 0
    train = TensorImageDataset(
        sset.images, torch.full((len(sset),), -1, dtype=torch.long), shift=shift, fill=float(lo.flatten()[0])
    )
    loader = make_loader(train, bs, shuffle=True, seed=cfg.seed, num_workers=cfg.data.num_workers)
    return loader, []


def write_synthetic_set(
    cfg: RunConfig,
    data: DataSplits,
    teachers: Sequence[nn.Module],
    student: nn.Module | None = None,
    overwrite: bool = False,
) -> Path:
    """What ``protege synthesize`` writes, without distilling; returns the set's directory.

    ``deepinversion``: the set a run of ``cfg`` would train on (same place, same fingerprint, so the
    run reuses it), with an existing matching set kept as it is; ``student`` competes when
    ``competition_weight > 0``. ``adversarial``: ``n_images`` samples of the generator from the last
    checkpoint of the run ``cfg`` names (the generator is trained while distilling), written to
    ``data.synthesis.path`` or ``<run>/synthetic/samples``."""
    syn = cfg.data.synthesis
    if cfg.data.strategy != "synthetic" or syn is None:
        raise ProtegeError("protege synthesize needs data.strategy: synthetic (and a data.synthesis section)")
    teacher = _one_teacher(list(teachers), cfg.task)
    spec = SetSpec.of(data, cfg.seed if syn.seed is None else syn.seed)
    device = _device(cfg)
    teacher.to(device)
    if student is not None:
        student.to(device)
    if syn.method == "deepinversion":
        path = _set_path(cfg, None)
        open_or_synthesize(
            path, teacher, syn, spec, student, overwrite=overwrite or syn.overwrite, log=console.print
        )
        return path
    return _sample_generator(cfg, teacher, syn, spec, overwrite or syn.overwrite)


def _sample_generator(
    cfg: RunConfig, teacher: nn.Module, syn: SynthesisConfig, spec: SetSpec, overwrite: bool
) -> Path:
    """A set of ``n_images`` samples from the generator of the adversarial run ``cfg`` names."""
    if not read_pointers(cfg.run_dir / "checkpoints"):
        raise ProtegeError(
            f"adversarial synthesis trains its generator while distilling: run 'protege distill' on this "
            f"config first; then 'protege synthesize' samples the generator of {cfg.run_dir}'s last checkpoint"
        )
    state = load_checkpoint(checkpoint_dir(cfg.run_dir, "last"))["callbacks"]
    callback = adversarial_synthesis(syn, spec, syn.steps_per_epoch)
    own = {k[len(callback.name) + 1 :]: v for k, v in state.items() if k.startswith(f"{callback.name}.")}
    if not own:
        raise ProtegeError(
            f"the last checkpoint of {cfg.run_dir} holds no generator: was it an adversarial run?"
        )
    try:
        callback.load_state_dict(own)
    except RuntimeError as e:
        raise ProtegeError(
            f"the generator in {cfg.run_dir} does not fit data.synthesis (z_dim, generator_width) and the "
            f"data's image shape: {str(e).splitlines()[0]}"
        ) from None
    callback.generator.to(next(teacher.parameters()).device)
    path = Path(syn.path).expanduser() if syn.path else cfg.run_dir / "synthetic" / "samples"
    if read_index(path) is not None and not overwrite:
        raise ProtegeError(f"{path} already holds a synthetic set: pass --overwrite to replace it")
    t0 = time.perf_counter()
    images = callback.sample(syn.n_images, spec.seed, cfg.data.batch_size)
    seconds = time.perf_counter() - t0
    n_batches = math.ceil(syn.n_images / cfg.data.batch_size)
    index: dict[str, Any] = {
        "method": "adversarial",
        "generator_run": str(cfg.run_dir),
        "parts": {
            "method": "adversarial",
            "teacher": state_digest(teacher),
            "generator": state_digest(callback.generator),
        },
        "seconds_per_batch": seconds / n_batches,
        "total_seconds": seconds,
        "device": str(next(teacher.parameters()).device),
    }
    with _evaluating(teacher):
        pred, _ = _teacher_predictions(teacher, images)
    sset = _finish(images, pred, teacher, spec, syn.dtype, index)  # the target is the teacher's class
    save_synthetic_set(sset, path, spec, syn.dtype)
    console.print(f"synthetic set {path}: {len(sset)} samples of the generator of {cfg.run_dir}")
    return path


