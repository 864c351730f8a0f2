"""On-policy distillation (GKD): with probability λ a training batch's completions are replaced by the
student's own samples, which the teacher then scores.

Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes" (GKD), ICLR 2024. Training only on fixed (teacher or
human) sequences leaves a train–inference mismatch: at inference the student conditions on its own
prefixes. GKD mixes in sequences the student generates (fraction λ, the paper's "student data
fraction"); the token-level divergence (e.g. ``jsd``) is computed on the generated tokens, whose
prompt positions are masked.

The :class:`~protege.core.distiller.Distiller` draws the coin (a seeded generator of its own, the
same sequence on every process) and asks the task for the rolled-out batch
(:meth:`protege.tasks.base.Task.rollout`); the terms then run as on any batch. On such a batch the
terms that read no teacher (``ce``) are skipped: their labels would be the student's own samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ProtegeError

__all__ = ["OnPolicy"]


@dataclass(frozen=True)
class OnPolicy:
    """Settings of on-policy batches.

    Args:
        lam: probability that a training batch is rolled out by the student (GKD's λ), in [0, 1].
        max_new_tokens: tokens the student generates after each prompt (it stops earlier at EOS).
        temperature: sampling temperature of the student; 0 decodes greedily.
        prompt_length: for examples without a prompt (packed text, every token trained), the number
            of leading tokens kept as the prompt; default: half the example.
        seed: seed of the coin that picks on-policy batches.
        eos_token_ids: the tokens that end a generation (the data's EOS: ``protege distill`` passes
            the tokenizer's); default: the model's generation config.
    """

    lam: float = 0.5
    max_new_tokens: int = 64
    temperature: float = 1.0
    prompt_length: int | None = None
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ProtegeError(
                f"on_policy lambda must be in [0, 1] (the fraction of student-generated batches), got {self.lam}"
            )
        if self.max_new_tokens < 1:
            raise ProtegeError(f"on_policy max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ProtegeError(f"on_policy temperature must be ≥ 0 (0: greedy), got {self.temperature}")
        if self.prompt_length is not None and self.prompt_length < 1:
            raise ProtegeError(f"on_policy prompt_length must be ≥ 1, got {self.prompt_length}")

    def coin(self) -> torch.Generator:
        """The generator whose draws decide which batches are rolled out."""
        return torch.Generator().manual_seed(self.seed)
