"""Losses of one-step diffusion distillation (the ``generation`` task): DMD, DMD2 and their parts.

- ``dmd``: distribution matching (Yin et al., DMD, CVPR 2024; DMD2, NeurIPS 2024). The generator's
  sample ``x`` is noised to ``x_t`` at ``t ~ U[min_t·T, max_t·T]``; the frozen teacher (the *real*
  score) and an online-trained copy of it (the *fake* score, modelling the generator's own
  distribution) each estimate the clean image. With ``p_real = x - x̂0_real``, ``p_fake = x - x̂0_fake``
  and the per-sample normaliser ``w = mean_{CHW} |p_real|`` (DMD2's ``weight_factor``, the code's
  exact form of the paper's "mean |s_real|"):

      grad = (p_real - p_fake) / w = (x̂0_fake - x̂0_real) / w
      L_dmd = ½ · MSE(x, sg(x - grad))        (mean over every element)

  whose gradient in ``x`` is ``grad / numel``: the KL gradient between the generator's and the data's
  diffused distributions, with no backpropagation through either score. Non-finite entries of
  ``grad`` are zeroed, as in DMD2's code.
- The fake score's own update (the term's state, :class:`FakeScore`): before the generator's loss,
  ``ratio`` Adam steps of the denoising objective (the teacher's parametrisation: ε, v or x0) on the
  generator's *detached* samples at ``t ~ U[0, T)``: DMD2's two time-scale update rule (its
  ``dfake_gen_update_ratio``; here the ``ratio`` fake updates of a step share one generator batch,
  each with fresh noise and timesteps).
- ``dmd_gan``: DMD2's adversarial term: a small head on the fake score's bottleneck (the UNet's
  mid-block output) classifies noised real vs generated images; the generator minimises the
  non-saturating ``softplus(-D(G(z)))``, the head (with the fake score, in the same private step)
  ``critic_weight · [softplus(D(fake)) + softplus(-D(real))]``. Needs real images in the batch.
- ``dmd_regression``: DMD's regression term on the teacher's ODE pairs ``(z, c) → x`` made once by
  its N-step sampler: ``MSE(G(z, c), x)`` (the paper's LPIPS has no offline weights here: squared
  error in pixel space).
- ``denoising``: the plain diffusion objective ``MSE(model output, target)``, what a teacher is
  trained with (``protege train``).
- ``score_matching``: Teacher Score Matching (MSD's first stage for students smaller than the
  teacher): a score model student regresses the teacher's output at the student's own noised real
  images, ``MSE(s_student(x_t, t, c), sg(s_teacher(x_t, t, c)))`` in the scheduler's parametrisation
  (ε, v or x0, the same for both); its UNet then initialises a smaller one-step generator
  (``model: one_step``, ``kwargs.init``), which a random initialisation would leave far from the
  teacher's distribution.

**Where the fake score lives and how it trains.** The main loop has one optimizer over the
distiller's parameters; the fake score and the GAN head are the terms' *state* modules, whose
parameters never require grad outside their own update (so the main optimizer, built from the
parameters that require grad, never holds them, and the generator's GAN gradient reaches the images
without filling their ``.grad``). Each keeps its Adam moments as buffers (:class:`PrivateAdam`), so
the checkpoint's ``distiller.safetensors`` holds the fake score, the head and their optimizer state
and a resumed run continues exactly. The update runs inside the training forward (the
distiller calls the state's ``observe`` with the student's outputs), before the scores are read.
A non-finite fake-score loss skips that update and makes the ``dmd`` term's value NaN, which
stops the run with its last good checkpoint (the loop's NaN handling).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import BuildContext, autocast_disabled, register_loss

DMD_PAPER = "Yin et al., One-step Diffusion with Distribution Matching Distillation, CVPR 2024"
DMD2_PAPER = "Yin et al., Improved Distribution Matching Distillation for Fast Image Synthesis, NeurIPS 2024"
DDPM_PAPER = "Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020"
MSD_PAPER = "Song et al., Multi-student Diffusion Distillation for Better One-step Generators, ICML 2025"


# -- the pure parts -----------------------------------------------------------------------------


def dmd_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """DMD2's normalised distribution-matching gradient ``(x̂0_fake - x̂0_real) / mean|x - x̂0_real|``
    (the mean per sample over C, H, W), non-finite entries set to 0."""
    if not (x.shape == real_x0.shape == fake_x0.shape):
        raise ValueError(
            f"dmd: images {tuple(x.shape)}, real {tuple(real_x0.shape)} and fake {tuple(fake_x0.shape)} "
            "estimates must have one shape"
        )
    x, real_x0, fake_x0 = x.detach(), real_x0.detach(), fake_x0.detach()
    dims = list(range(1, x.dim()))
    weight = (x - real_x0).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / weight, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """``½·MSE(x, sg(x - grad))`` with :func:`dmd_gradient`: its gradient in ``x`` is ``grad / x.numel()``."""
    grad = dmd_gradient(x, real_x0, fake_x0)
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean softplus(-D(G(z)))``."""
    return F.softplus(-logits_fake).mean()


def gan_critic_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """The discriminator's logistic loss ``mean softplus(D(fake)) + mean softplus(-D(real))``."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


# -- the private optimizer ----------------------------------------------------------------------


class PrivateAdam(nn.Module):
    """Adam (Kingma & Ba, with decoupled weight decay as AdamW) over ``params``, its moments and step
    count kept as this module's buffers: they are in ``state_dict()``, hence in the run's checkpoints,
    and a resumed or restored run continues with exactly this optimizer state. (``torch.optim.Adam``
    keeps its state outside the module tree, where the checkpoints of :func:`protege.fit` do not
    look.) The same update as ``torch.optim.AdamW`` (tested against it)."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        lr: float,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "params", list(params))
        self.lr, self.betas, self.eps, self.weight_decay = (
            float(lr),
            tuple(float(b) for b in betas),
            eps,
            weight_decay,
        )
        self.register_buffer("step_count", torch.zeros((), dtype=torch.float64))
        for i, p in enumerate(self.params):
            self.register_buffer(f"exp_avg_{i}", torch.zeros_like(p, dtype=torch.float32))
            self.register_buffer(f"exp_avg_sq_{i}", torch.zeros_like(p, dtype=torch.float32))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.step_count += 1
        t = float(self.step_count)
        c1, c2 = 1 - b1**t, 1 - b2**t
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            m, v = getattr(self, f"exp_avg_{i}"), getattr(self, f"exp_avg_sq_{i}")
            g = p.grad.float()
            if self.weight_decay:
                p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_((self.lr / c1) * m / ((v / c2).sqrt() + self.eps))


@contextlib.contextmanager
def trainable(*modules: nn.Module) -> Iterator[None]:
    """``modules``' parameters require grad (and autograd is on) inside the block only."""
    params = [p for m in modules for p in m.parameters()]
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(False)


def _uniform_steps(n: int, low: float, high: float, total: int, device: torch.device) -> Tensor:
    lo = min(int(low * total), total - 1)
    hi = max(min(int(high * total), total - 1), lo)
    return torch.randint(lo, hi + 1, (n,), device=device)


# -- the fake score (the dmd term's state) ------------------------------------------------------


class FakeScore(nn.Module):
    """The fake score of DMD: a trainable copy of the teacher, trained online on the generator's
    samples with its own optimizer (module docstring).

    Args:
        ratio: fake-score updates per generator update (DMD2's two time-scale rule; its ImageNet
            setting is 5).
        lr: the fake score's Adam learning rate.
        betas: its Adam betas.
        weight_decay: its (decoupled) weight decay.
        min_t: lowest timestep of the distribution-matching loss, as a fraction of T (DMD2: 0.02).
        max_t: highest, as a fraction of T (DMD2: 0.98).
    """

    pending = True

    def __init__(
        self,
        ratio: int = 5,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        min_t: float = 0.02,
        max_t: float = 0.98,
    ) -> None:
        super().__init__()
        if ratio < 1:
            raise ValueError(f"ratio (fake-score updates per generator update) must be ≥ 1, got {ratio}")
        if not 0 <= min_t <= max_t <= 1:
            raise ValueError(f"need 0 ≤ min_t ≤ max_t ≤ 1, got min_t={min_t}, max_t={max_t}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.ratio, self.lr, self.betas, self.weight_decay = (
            int(ratio),
            float(lr),
            tuple(betas),
            float(weight_decay),
        )
        self.min_t, self.max_t = float(min_t), float(max_t)
        self.fake: nn.Module | None = None
        self.optim: PrivateAdam | None = None
        object.__setattr__(self, "heads", [])  # GAN heads trained in the same step (GANHead.build)
        #: why the last update was skipped (a non-finite loss), else None
        self.failure: str | None = None
        self.key = "images"

    def build(self, student: Any, teacher: Any, context: BuildContext) -> None:
        if not context.teachers:
            raise ValueError(
                "dmd queries the teacher model at the generator's noised samples: it needs a live teacher "
                "(not a teacher-output cache)"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # each process would step its own fake score
                raise ValueError(
                    "dmd's fake score takes its own optimizer steps inside the training step, in one "
                    "process; a multi-process run would train a different fake score on every process. "
                    "Run DMD on one device (one process)"
                )
        real = context.teachers[context.teacher_index]
        for needed in ("denoise", "add_noise", "training_pair", "num_train_timesteps"):
            if not hasattr(real, needed):
                raise ValueError(
                    f"the teacher ({type(real).__name__}) is not a score model: dmd needs a diffusion teacher "
                    "(protege.models.diffusion.ScoreModel: a diffusers UNet and its scheduler)"
                )
        object.__setattr__(self, "real", real)
        #: the student output holding the generated images (the term's student key)
        self.key = context.student_key if isinstance(context.student_key, str) else "images"
        self.fake = copy.deepcopy(real).requires_grad_(False).train()
        self.optim = PrivateAdam(
            list(self.fake.parameters()), self.lr, self.betas, weight_decay=self.weight_decay
        )
        self.pending = False

    def forward(self, progress: float) -> dict[str, Any]:
        return {"critic": self}

    def observe(self, outputs: Mapping[str, Tensor], target: Tensor | None) -> None:
        """``ratio`` fake-score updates on the generator's detached samples (and, with GAN heads,
        their classification of noised real vs generated images).

        In float32 whatever the run's autocast, as the scores of :meth:`scores`: DMD's gradient is
        the difference of two nearly equal clean-image estimates, which bf16's 8-bit mantissa
        would mostly round away (measured: 1.9 % error on the loss of a tiny teacher)."""
        assert self.fake is not None and self.optim is not None
        images = outputs[self.key].detach().float()
        with autocast_disabled(images):
            self._updates(images, outputs.get("real_images"), target)

    def _updates(self, images: Tensor, real_images: Tensor | None, target: Tensor | None) -> None:
        self.failure = None
        for k in range(self.ratio):
            with trainable(self.fake, *self.heads):
                pred, tgt = self.fake.training_pair(images, target)
                loss = F.mse_loss(pred.float(), tgt.float())
                for head in self.heads:
                    loss = loss + head.critic_loss(images, real_images, target)
                if not torch.isfinite(loss):
                    self.failure = f"fake-score loss {loss.item()} at update {k + 1} of {self.ratio}"
                    return
                self.optim.zero_grad()
                for head in self.heads:
                    head.optim.zero_grad()
                loss.backward()
                self.optim.step()
                for head in self.heads:
                    head.optim.step()
            self.optim.zero_grad()
            for head in self.heads:
                head.optim.zero_grad()

    @torch.no_grad()
    def scores(self, images: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """The real and fake clean-image estimates at one noised copy of ``images`` (same noise
        and ``t ~ U[min_t·T, max_t·T]`` for both)."""
        assert self.fake is not None
        x = images.detach().float()
        t = _uniform_steps(x.shape[0], self.min_t, self.max_t, self.real.num_train_timesteps, x.device)
        x_t = self.real.add_noise(x, torch.randn_like(x), t)
        was = self.fake.training
        self.fake.eval()
        try:
            with autocast_disabled(x_t):  # see observe: the difference of two close predictions
                return self.real.denoise(x_t, t, labels).float(), self.fake.denoise(x_t, t, labels).float()
        finally:
            self.fake.train(was)


@register_loss(
    "dmd",
    paper=f"{DMD_PAPER}; {DMD2_PAPER}",
    reads="images",
    uses_target=True,
    state=FakeScore,
    queries_teacher=True,
    default_keys=("images", "images"),
)
def dmd(images: Tensor, *, target: Tensor, critic: FakeScore) -> Tensor:
    """Distribution matching: ½·MSE(x, sg(x - (x̂0_fake - x̂0_real)/mean|x - x̂0_real|)) (DMD2)."""
    real_x0, fake_x0 = critic.scores(images, target)
    loss = dmd_loss(images, real_x0, fake_x0)
    if critic.failure is not None:  # the loop stops the run with its last good checkpoint
        return loss + float("nan")
    return loss


# -- DMD2's GAN head ------------------------------------------------------------------------------


class GANHead(nn.Module):
    """A classifier on the fake score's mid-block features (DMD2's ``cls_pred_branch``, small):
    conv 3×3 → GroupNorm → SiLU → global average → linear to one logit. It trains with the fake
    score, in its private step, on images noised at ``t ~ U[0, noise·T)`` (DMD2's diffusion GAN;
    ``noise=0``: clean images, ``t = 0``).

    Args:
        critic_weight: weight of the head's classification loss in the fake score's step (DMD2's
            ``guidance_cls_loss_weight``, 1e-2).
        noise: the highest timestep the images are noised at, as a fraction of T.
        lr: the head's Adam learning rate (default: the fake score's).
    """

    pending = True

    def __init__(self, critic_weight: float = 1e-2, noise: float = 1.0, lr: float | None = None) -> None:
        super().__init__()
        if critic_weight < 0 or not 0 <= noise <= 1:
            raise ValueError(f"need critic_weight ≥ 0 and 0 ≤ noise ≤ 1, got {critic_weight} and {noise}")
        self.critic_weight, self.noise, self.lr = float(critic_weight), float(noise), lr
        self.net: nn.Module | None = None
        self.optim: PrivateAdam | None = None

    def build(self, student: Any, teacher: Any, context: BuildContext) -> None:
        critics = [s for s in context.states if isinstance(s, FakeScore)]
        if not critics or critics[0].pending:
            raise ValueError(
                "dmd_gan classifies with the fake score of a dmd term: list a dmd term before it"
            )
        critic = critics[0]
        assert critic.fake is not None
        unet = getattr(critic.fake, "unet", None)
        mid = getattr(unet, "mid_block", None)
        if mid is None:
            raise ValueError("dmd_gan reads the fake score's UNet mid block, which this teacher has not")
        channels = int(unet.config.block_out_channels[-1])
        groups = math.gcd(channels, 32)
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 1),
        ).requires_grad_(False)
        self.optim = PrivateAdam(list(self.net.parameters()), self.lr or critic.lr, critic.betas)
        object.__setattr__(self, "critic", critic)
        critic.heads.append(self)
        self.pending = False

    def forward(self, progress: float) -> dict[str, Any]:
        return {"head": self}

    def logits(self, images: Tensor, labels: Tensor | None) -> Tensor:
        """The head's realism logit per image, through the fake score's UNet (differentiable in
        ``images``; the parameters learn only inside the private step)."""
        assert self.net is not None
        fake = self.critic.fake
        total = fake.num_train_timesteps
        t = (
            torch.randint(0, max(int(self.noise * total), 1), (images.shape[0],), device=images.device)
            if self.noise > 0
            else torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        )
        x_t = fake.add_noise(images.float(), torch.randn_like(images.float()), t)
        features: list[Tensor] = []  # the mid block's output, caught by a hook that lives for this call
        handle = fake.unet.mid_block.register_forward_hook(lambda m, i, o: features.append(o))
        try:
            fake.predict(x_t, t, labels)
        finally:
            handle.remove()
        return self.net(features[-1].float()).squeeze(-1)

    def critic_loss(self, images: Tensor, real: Tensor | None, labels: Tensor | None) -> Tensor:
        """``critic_weight`` × the logistic loss of real vs generated (detached) images."""
        if real is None:
            raise ValueError(
                "dmd_gan needs real images in the batch (the generation task's data carries them)"
            )
        fake_logits = self.logits(images.detach(), labels)
        real_logits = self.logits(real.detach().float(), labels)
        return self.critic_weight * gan_critic_loss(fake_logits, real_logits)


@register_loss(
    "dmd_gan",
    paper=DMD2_PAPER,
    reads="images",
    uses_teacher=False,
    uses_target=True,
    state=GANHead,
    default_keys=("images", "images"),
)
def dmd_gan(images: Tensor, *, target: Tensor, head: GANHead) -> Tensor:
    """DMD2's non-saturating GAN loss of the generator, softplus(-D(G(z))), D on the fake score's features."""
    return gan_generator_loss(head.logits(images, target))


# -- regression and denoising -------------------------------------------------------------------


def _pair(student: Sequence[Tensor], name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(student, (list, tuple)) or len(student) != 2:
        raise ValueError(f"{name} reads two outputs (prediction, target), got {type(student).__name__}")
    a, b = student
    if a.shape != b.shape:
        raise ValueError(f"{name}: prediction {tuple(a.shape)} and target {tuple(b.shape)} differ in shape")
    return a, b


@register_loss(
    "dmd_regression",
    paper=DMD_PAPER,
    reads="feature-list",
    uses_teacher=False,
    default_keys=(("pair_images", "pair_targets"), ("pair_images", "pair_targets")),
)
def dmd_regression(student: Sequence[Tensor]) -> Tensor:
    """DMD's regression on the teacher's ODE pairs: MSE(G(z), x_teacher(z)) (pixel MSE for LPIPS)."""
    pred, target = _pair(student, "dmd_regression")
    return F.mse_loss(pred, target.detach())


@register_loss(
    "denoising",
    paper=DDPM_PAPER,
    reads="feature-list",
    uses_teacher=False,
    default_keys=(("denoise_pred", "denoise_target"), ("denoise_pred", "denoise_target")),
)
def denoising(student: Sequence[Tensor]) -> Tensor:
    """The diffusion objective MSE(model(x_t, t, c), ε | v | x0), in the scheduler's parametrisation."""
    pred, target = _pair(student, "denoising")
    return F.mse_loss(pred, target.detach())


class TeacherScore(nn.Module):
    """The teacher a ``score_matching`` term asks for its output at the student's noised inputs."""

    pending = True
    #: built from the context alone: :meth:`protege.Distiller.prepare` runs the student in eval mode,
    #: where a score model samples instead of giving the training outputs this term reads
    reads_tensors = False

    def build(self, student: Any, teacher: Any, context: BuildContext) -> None:
        if not context.teachers:
            raise ValueError(
                "score_matching queries the teacher at the student's noised images: it needs a live teacher "
                "(not a teacher-output cache)"
            )
        real = context.teachers[context.teacher_index]
        if not hasattr(real, "predict") or not hasattr(real, "prediction_type"):
            raise ValueError(
                f"the teacher ({type(real).__name__}) is not a score model: score_matching needs a diffusion "
                "teacher (protege.models.diffusion.ScoreModel)"
            )
        object.__setattr__(self, "real", real)
        self.pending = False

    def forward(self, progress: float) -> dict[str, Any]:
        return {"teacher_score": self}

    @torch.no_grad()
    def predict(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        with autocast_disabled(x_t):
            return self.real.predict(x_t.float(), t.long(), labels).float()


@register_loss(
    "score_matching",
    paper=MSD_PAPER,
    reads="feature-list",
    uses_target=True,
    state=TeacherScore,
    queries_teacher=True,
    default_keys=(("denoise_pred", "denoise_input", "denoise_t"),) * 2,
)
def score_matching(student: Sequence[Tensor], *, target: Tensor, teacher_score: TeacherScore) -> Tensor:
    """Teacher Score Matching (MSD): MSE(s_student(x_t, t, c), sg(s_teacher(x_t, t, c))) at the
    student's own noised real images, in the scheduler's parametrisation."""
    if not isinstance(student, (list, tuple)) or len(student) != 3:
        raise ValueError("score_matching reads three outputs (denoise_pred, denoise_input, denoise_t)")
    pred, x_t, t = student
    return F.mse_loss(pred.float(), teacher_score.predict(x_t, t, target))


__all__ = [
    "FakeScore",
    "GANHead",
    "PrivateAdam",
    "TeacherScore",
    "dmd_gradient",
    "dmd_loss",
    "gan_critic_loss",
    "gan_generator_loss",
]
