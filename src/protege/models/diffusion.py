"""Class-conditional diffusion models and the one-step generators distilled from them.

Three modules, each ``model(noise, labels) -> images`` (images in [-1, 1], ``(N, C, S, S)``), so the
generation task runs a teacher and a student the same way:

- :class:`ScoreModel`: a ``diffusers`` ``UNet2DModel`` (class-conditional through
  ``num_class_embeds``) and its noise scheduler. Its forward is the teacher's N-step sampler (any
  diffusers scheduler: DDPM, DDIM, DPM-Solver, Euler, …, set by ``sampler``); it also gives what
  DMD needs of a score model: :meth:`ScoreModel.add_noise`, the clean-image estimate
  :meth:`ScoreModel.denoise` at a noisy input, and the denoising objective in the scheduler's
  parametrisation (:meth:`ScoreModel.training_pair`). Loaded with diffusers' own
  ``from_pretrained`` from a local directory (``unet/`` + ``scheduler/``, the layout of a
  ``DDPMPipeline``) or a hub id; :meth:`ScoreModel.save_pretrained` writes that layout.
- :class:`OneStepGenerator`: DMD2's generator: a UNet evaluated once, at the last training
  timestep, on pure noise; its clean-image estimate is the sample. Initialised from the teacher's
  UNet (same size) or built smaller.
- :class:`RoutedGenerator`: Multi-Student Distillation's inference: each class is drawn by the
  student that covers it.

Prediction types (``scheduler.config.prediction_type``) supported: ``epsilon``, ``v_prediction`` and
``sample``: each converts to a clean-image estimate in closed form on the scheduler's
``alphas_cumprod`` (variance-preserving, discrete time). Other parametrisations (flow matching's
velocity, EDM's sigma-space models) are refused with an error that names these three.
"""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError

#: the model outputs the score model understands (diffusers' ``prediction_type`` values)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:  # pragma: no cover - the extra is not installed
        raise ProtegeError("the generation task needs diffusers: pip install 'protege[diffusion]'") from None
    return diffusers


def scheduler_from(spec: Any) -> Any:
    """A diffusers scheduler from ``spec``: a scheduler object (returned as it is), or a mapping
    ``{name: DDPMScheduler, <config keys>…}`` (the class name, default ``DDPMScheduler``)."""
    diffusers = _diffusers()
    if hasattr(spec, "config") and hasattr(spec, "set_timesteps"):
        return spec
    spec = dict(spec or {})
    name = str(spec.pop("name", "DDPMScheduler"))
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        from ..errors import unknown

        raise unknown("diffusers scheduler", name, [n for n in dir(diffusers) if n.endswith("Scheduler")])
    try:
        return cls(**spec)
    except TypeError as e:
        raise ProtegeError(f"scheduler {name}: {e}") from None


def check_prediction_type(scheduler: Any) -> str:
    """The scheduler's prediction type when DMD supports it (:data:`PREDICTION_TYPES`); else an error."""
    kind = str(getattr(scheduler.config, "prediction_type", "epsilon"))
    if kind not in PREDICTION_TYPES:
        raise ProtegeError(
            f"the teacher's scheduler ({type(scheduler).__name__}) predicts {kind!r}; the DMD term supports "
            f"prediction types {', '.join(PREDICTION_TYPES)} (a variance-preserving schedule): use a teacher "
            "trained with one of them"
        )
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ProtegeError(
            f"scheduler {type(scheduler).__name__} has no alphas_cumprod (not a variance-preserving discrete "
            "schedule); the DMD term needs one (DDPM, DDIM, DPM-Solver, Euler, PNDM, UniPC, …)"
        )
    return kind


class _Schedule(nn.Module):
    """``alphas_cumprod`` of a scheduler as a (non-persistent) buffer, and the VP algebra on it."""

    def __init__(self, scheduler: Any) -> None:
        super().__init__()
        self.prediction_type = check_prediction_type(scheduler)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        alphas = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
        self.register_buffer("alphas_cumprod", alphas.clone(), persistent=False)

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)].float()
        a = a.view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise``."""
        a, s = self._coef(t, x0)
        return a * x0 + s * noise

    def x0_from(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean-image estimate from a model output in this schedule's parametrisation."""
        a, s = self._coef(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * prediction) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * prediction
        return prediction

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output at ``x_t = add_noise(x0, noise, t)``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a, s = self._coef(t, x0)
            return a * noise - s * x0
        return x0


def _unet_out(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if (
        getattr(unet.config, "num_class_embeds", None) is None
        and getattr(unet.config, "class_embed_type", None) is None
    ):
        return unet(x, t).sample
    if labels is None:
        raise ProtegeError("this UNet is class-conditional: give class labels")
    return unet(x, t, class_labels=labels).sample


class ScoreModel(nn.Module):
    """A class-conditional diffusion model: a diffusers UNet and its scheduler (module docstring).

    Args:
        unet: a ``diffusers.UNet2DModel``.
        scheduler: its training scheduler (a diffusers scheduler, or a spec for :func:`scheduler_from`).
        sampler: the scheduler class that samples (``"DDIMScheduler"``…; ``None``: ``scheduler``'s),
            built from ``scheduler``'s config.
        steps: sampling steps of :meth:`forward`.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, sampler: str | None = None, steps: int = 50) -> None:
        super().__init__()
        if steps < 1:
            raise ProtegeError(f"sampling steps must be ≥ 1, got {steps}")
        self.unet = unet
        self.scheduler = scheduler_from(scheduler)
        self.schedule = _Schedule(self.scheduler)
        self.sampler = _sampler(self.scheduler, sampler) if sampler else self.scheduler
        self.steps = int(steps)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return int(c.in_channels), int(size), int(size)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The UNet's raw output at ``(x_t, t)`` (in the scheduler's parametrisation)."""
        return _unet_out(self.unet, x_t, t, labels)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The clean-image estimate ``x̂0(x_t, t, class)``: the score, up to the schedule's affine map."""
        return self.schedule.x0_from(self.predict(x_t, t, labels), x_t, t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(x0, noise, t)

    def noised(
        self, x0: torch.Tensor, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, target)``: ``x0`` noised at random timesteps (``t``: given ones) and what the
        UNet should output there (ε, v or x0, by the prediction type)."""
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return self.add_noise(x0, noise, t), t, self.schedule.target(x0, noise, t)

    def training_pair(
        self, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM's objective at random timesteps (``t``: given ones): the UNet's output on
        ``add_noise(x0, ε, t)`` and what it should be (:meth:`noised`)."""
        x_t, t, target = self.noised(x0, t)
        return self.predict(x_t, t, labels), target

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        labels: torch.Tensor | None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``steps`` (default :attr:`steps`) sampler steps from ``noise``; images clamped to [-1, 1]."""
        sched = copy.deepcopy(self.sampler)  # schedulers keep per-run state (timesteps, past outputs)
        sched.set_timesteps(int(steps or self.steps), device=noise.device)
        x = noise * getattr(sched, "init_noise_sigma", 1.0)
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            out = _unet_out(self.unet, inp, t.expand(x.shape[0]).to(noise.device), labels)
            kwargs = {"generator": generator} if "generator" in _step_params(sched) else {}
            x = sched.step(out, t, x, **kwargs).prev_sample
        return x.clamp(-1, 1)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.sample(noise, labels)

    def save_pretrained(self, directory: str | Path) -> None:
        """``unet/`` and ``scheduler/`` in diffusers' layout (``from_pretrained`` reads them back)."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")
        (directory / "protege_sampler.json").write_text(
            json.dumps({"sampler": type(self.sampler).__name__, "steps": self.steps})
        )

    @classmethod
    def from_pretrained(
        cls, path: str, sampler: str | None = None, steps: int | None = None, **kwargs: Any
    ) -> ScoreModel:
        """A score model from a local directory with ``unet/`` and ``scheduler/`` (a diffusers
        ``DDPMPipeline``'s layout, or :meth:`save_pretrained`'s) or a hub id (with a network);
        ``kwargs`` go to ``from_pretrained`` (``revision``, ``local_files_only``…)."""
        diffusers = _diffusers()
        local = Path(path).expanduser()
        if local.exists() and not (local / "unet").is_dir():
            raise ProtegeError(f"{local} has no unet/ folder: a diffusers directory has unet/ and scheduler/")
        where = str(local) if local.exists() else path
        try:
            unet = diffusers.UNet2DModel.from_pretrained(where, subfolder="unet", **kwargs)
            name = _scheduler_class(local / "scheduler") if local.exists() else "DDPMScheduler"
            scheduler = getattr(diffusers, name).from_pretrained(where, subfolder="scheduler", **kwargs)
        except (OSError, ValueError) as e:
            raise ProtegeError(f"cannot load a diffusers UNet and scheduler from {path!r}: {e}") from None
        saved = local / "protege_sampler.json"
        info = json.loads(saved.read_text()) if saved.is_file() else {}
        return cls(unet, scheduler, sampler or info.get("sampler"), int(steps or info.get("steps", 50)))


def _sampler(scheduler: Any, name: str) -> Any:
    """Scheduler class ``name`` built from ``scheduler``'s config (DDIM sampling of a DDPM-trained model)."""
    cls = getattr(_diffusers(), name, None)
    if cls is None or not name.endswith("Scheduler"):
        from ..errors import unknown

        raise unknown("diffusers scheduler", name, [n for n in dir(_diffusers()) if n.endswith("Scheduler")])
    return cls.from_config(scheduler.config)


def _scheduler_class(directory: Path) -> str:
    config = directory / "scheduler_config.json"
    if not config.is_file():
        raise ProtegeError(f"{directory} has no scheduler_config.json")
    return str(json.loads(config.read_text()).get("_class_name", "DDPMScheduler"))


def _step_params(sched: Any) -> Sequence[str]:
    import inspect

    return list(inspect.signature(sched.step).parameters)


class OneStepGenerator(nn.Module):
    """DMD2's one-step generator: ``G(z, c) = x̂0(z, T-1, c)`` of its own UNet (module docstring).

    Args:
        unet: the generator's UNet (a copy of the teacher's, or a smaller one).
        scheduler: the teacher's scheduler (its noise schedule and prediction type).
        timestep: the conditioning timestep (default: the last, ``num_train_timesteps - 1``).
    """

    def __init__(self, unet: nn.Module, scheduler: Any, timestep: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = _Schedule(scheduler_from(scheduler))
        last = self.schedule.num_train_timesteps - 1
        self.timestep = last if timestep is None else int(timestep)
        if not 0 <= self.timestep <= last:
            raise ProtegeError(f"the generator's timestep must be in [0, {last}], got {timestep}")

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.full((noise.shape[0],), self.timestep, device=noise.device, dtype=torch.long)
        return self.schedule.x0_from(_unet_out(self.unet, noise, t, labels), noise, t)


def partition_classes(
    num_classes: int, students: Sequence[str], mapping: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int]]:
    """Which classes each student covers (Multi-Student Distillation).

    Default: a contiguous split, as even as possible (10 classes, 4 students: 3, 3, 2, 2). A
    ``mapping`` ``{student: [classes]}`` is checked instead: every class covered exactly once,
    by a named student, within ``[0, num_classes)``.
    """
    k = len(students)
    if k == 0:
        raise ProtegeError("partition_classes needs at least one student")
    if k > num_classes:
        raise ProtegeError(
            f"{k} students but only {num_classes} classes: each student needs at least one class; use at "
            f"most {num_classes} students"
        )
    if mapping is None:
        q, r = divmod(num_classes, k)
        sizes = [q + (i < r) for i in range(k)]
        starts = [sum(sizes[:i]) for i in range(k)]
        return {name: list(range(starts[i], starts[i] + sizes[i])) for i, name in enumerate(students)}
    extra = sorted(set(mapping) - set(students))
    if extra:
        raise ProtegeError(
            f"the class mapping names students {extra} that the run does not have ({list(students)})"
        )
    owner: dict[int, str] = {}
    for name in students:
        for c in mapping.get(name, []):
            if not isinstance(c, int) or not 0 <= c < num_classes:
                raise ProtegeError(f"student {name!r}: class {c!r} is not in [0, {num_classes})")
            if c in owner:
                raise ProtegeError(f"class {c} is given to two students ({owner[c]!r} and {name!r})")
            owner[c] = name
    missing = [c for c in range(num_classes) if c not in owner]
    if missing:
        raise ProtegeError(f"no student covers class(es) {missing}: give each class to one student")
    empty = [n for n in students if not mapping.get(n)]
    if empty:
        raise ProtegeError(f"student(s) {empty} cover no class: give each student at least one")
    return {name: sorted(mapping[name]) for name in students}


class RoutedGenerator(nn.Module):
    """Several generators, each drawing the classes it covers (MSD inference).

    ``generators``: ``{name: model(noise, labels)}``; ``parts``: ``{name: [classes]}``. A class no
    generator covers is an error naming the covered ones.
    """

    def __init__(self, generators: Mapping[str, nn.Module], parts: Mapping[str, Sequence[int]]) -> None:
        super().__init__()
        self.generators = nn.ModuleDict(dict(generators))
        route = {c: i for i, name in enumerate(self.generators) for c in parts[name]}
        size = max(route) + 1 if route else 0
        table = torch.full((size,), -1, dtype=torch.long)
        for c, i in route.items():
            table[c] = i
        self.register_buffer("route", table, persistent=False)

    def covers(self, labels: torch.Tensor) -> torch.Tensor:
        """Which generator draws each label (``-1``: none)."""
        labels = labels.long().to(self.route.device)
        inside = (labels >= 0) & (labels < self.route.numel())
        return torch.where(inside, self.route[labels.clamp(0, max(self.route.numel() - 1, 0))], -1)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ProtegeError("routing to a student needs class labels")
        who = self.covers(labels).to(labels.device)
        if (who < 0).any():
            bad = sorted({int(c) for c in labels[who < 0].tolist()})
            covered = [int(c) for c in (self.route >= 0).nonzero().flatten().tolist()]
            raise ProtegeError(f"no student covers class(es) {bad}; the students cover {covered}")
        out: torch.Tensor | None = None
        for i, gen in enumerate(self.generators.values()):
            rows = (who == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            images = gen(noise[rows], labels[rows])
            if out is None:
                out = images.new_zeros((noise.shape[0], *images.shape[1:]))
            out[rows] = images
        assert out is not None
        return out


class FeatureClassifier(nn.Module):
    """The evaluation's feature space: a small CNN classifier of ``size``×``size`` images in [-1, 1]
    (two conv blocks, a 128-d penultimate layer). :meth:`classify` gives its logits and features;
    Fréchet distance and precision/recall of the generation task are measured on those features."""

    def __init__(self, in_chans: int, num_classes: int, size: int, width: int = 32, dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (size // 4) ** 2, dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(dim, num_classes)

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images)
        return self.head(features), features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(images)[0]


def tiny_unet(
    size: int,
    num_classes: int,
    in_channels: int = 1,
    channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = True,
    norm_num_groups: int = 8,
) -> nn.Module:
    """A small class-conditional ``UNet2DModel`` (down blocks without attention; an attention mid
    block when ``attention``), sized for CPU training on ``size``×``size`` images."""
    diffusers = _diffusers()
    channels = tuple(int(c) for c in channels)
    if any(c % norm_num_groups for c in channels):
        raise ProtegeError(
            f"unet channels {list(channels)} must be multiples of norm_num_groups={norm_num_groups}"
        )
    if size % 2 ** (len(channels) - 1):
        raise ProtegeError(
            f"image size {size} must be divisible by {2 ** (len(channels) - 1)} for {len(channels)} levels"
        )
    return diffusers.UNet2DModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        add_attention=attention,
        attention_head_dim=channels[-1] // 2 if attention else None,
        num_class_embeds=num_classes,
    )


def unet_like(unet: nn.Module, **changes: Any) -> nn.Module:
    """A new, randomly initialised UNet with ``unet``'s config, ``changes`` applied
    (``block_out_channels=(16, 32)``: a smaller student)."""
    diffusers = _diffusers()
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config.update(changes)
    return diffusers.UNet2DModel(**config)


__all__ = [
    "PREDICTION_TYPES",
    "grid_png",
    "FeatureClassifier",
    "OneStepGenerator",
    "RoutedGenerator",
    "ScoreModel",
    "check_prediction_type",
    "partition_classes",
    "scheduler_from",
    "tiny_unet",
    "unet_like",
]


def grid_png(images: torch.Tensor, nrow: int | None = None, scale: int = 4) -> bytes:
    """Images in [-1, 1] tiled into one PNG (``nrow`` per row; each pixel ``scale``×``scale``)."""
    from PIL import Image
    from torchvision.utils import make_grid

    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid((images + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if images.shape[1] == 1 else array)  # grey stays grey
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
