"""Training options: the part of a run config the engine reads (validated by pydantic)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: a random seed: torch, NumPy and scikit-learn all take 0 ... 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(_Strict):
    """Optimizer. ``sgd`` uses ``momentum``/``nesterov``; ``adamw``/``adam`` use ``betas``."""

    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(_Strict):
    """Learning-rate schedule, applied per optimizer step.

    ``constant``; ``step`` (× ``gamma`` every ``step_size`` epochs); ``multistep`` (× ``gamma`` at
    each of ``milestones`` epochs); ``cosine`` (to ``min_lr_ratio`` × lr at the end). All may start
    with ``warmup_epochs`` of linear warm-up from 0.
    """

    name: Literal["constant", "step", "multistep", "cosine"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(30, gt=0)
    milestones: list[int] = Field(default_factory=lambda: [150, 180, 210])
    gamma: float = Field(0.1, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainConfig(_Strict):
    """How :func:`protege.fit` trains: epochs, optimizer, schedule, precision, evaluation, logging."""

    epochs: int = Field(10, gt=0)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    clip_grad_norm: float | None = Field(None, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else full precision"
    )
    cpu: bool = Field(False, description="train on the CPU even when a GPU is present")
    memory_format: Literal["auto", "contiguous", "channels_last"] = Field(
        "auto",
        description="layout of 4-D weights and activations while training; auto: channels_last on a CPU "
        "(the zoo's CIFAR-style conv nets trained 7-41% faster per step there, BENCHMARKS.md), "
        "contiguous elsewhere. fit hands the models back contiguous",
    )
    seed: Seed = 0
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and always after the last)")
    log_every: int = Field(20, ge=1, description="refresh the progress bar and NaN check every N steps")
    keep_checkpoints: Literal["last", "last+best"] = "last+best"
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    progress: bool = Field(True, description="show a progress bar")
    measure_cost: bool = Field(True, description="measure params, FLOPs and latency into summary.json")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.schedule.warmup_epochs > self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) exceeds epochs ({self.epochs})"
            )
        return self
