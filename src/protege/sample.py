"""Samples of a finished ``generation`` run as a PNG grid (``protege sample RUN --class C --n N``).

:func:`load_generator` rebuilds a run's one-step student (several students: the routed model that
sends each class to its student, Multi-Student Distillation) or its teacher (the N-step sampler);
:func:`sample_images` draws ``n`` images of one class from seeded noise; :func:`save_grid` writes
them as one PNG; :func:`sample_grid` does all three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import ProtegeError
from .files import atomic_write_text
from .models.diffusion import grid_png


def load_generator(
    run_dir: str | Path, model: Literal["student", "teacher"] = "student", checkpoint: str = "best"
) -> tuple[nn.Module, Any]:
    """A finished generation run's student (its ``checkpoint``: best or last) or first teacher, in
    eval mode, and the run's data (class names, number of classes)."""
    from .build import build_from, load_run_data
    from .config import load_config

    run_dir = Path(run_dir)
    if model not in ("student", "teacher"):
        raise ProtegeError(f"the model to sample is student or teacher, not {model!r}")
    if checkpoint not in ("best", "last"):
        raise ProtegeError(f"the checkpoint is best or last, not {checkpoint!r}")
    if not (run_dir / "config.yaml").is_file():
        raise ProtegeError(f"{run_dir} is not a protege run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.task != "generation":
        raise ProtegeError(f"{run_dir} is a {cfg.task!r} run; sampling images needs a generation run")
    data = load_run_data(cfg)
    if model == "teacher":
        teachers = cfg.all_teachers()
        if not teachers:
            raise ProtegeError(f"{run_dir} has no teacher; sample its student")
        return build_from(teachers[0], data).eval(), data
    from .pipeline import load_run

    loaded = load_run(run_dir, checkpoint)  # type: ignore[arg-type]  # several students: one routed model
    return loaded.student.eval(), loaded.data


def class_index(value: str | int, data: Any) -> int:
    """A class given by index or by name (case-insensitive), checked against the data's classes."""
    names = list(getattr(data, "class_names", []) or [])
    n = int(data.num_classes)
    if isinstance(value, int) or str(value).lstrip("-").isdigit():
        c = int(value)
        if not 0 <= c < n:
            raise ProtegeError(f"class {c} is not one of the data's {n} classes (0 to {n - 1})")
        return c
    lowered = [s.lower() for s in names]
    if str(value).lower() in lowered:
        return lowered.index(str(value).lower())
    raise ProtegeError(f"unknown class {value!r}; the classes are: {', '.join(names) or f'0 to {n - 1}'}")


@torch.no_grad()
def sample_images(
    model: nn.Module, label: int, n: int, shape: tuple[int, int, int], seed: int = 0
) -> torch.Tensor:
    """``n`` images of class ``label`` from noise seeded by ``seed`` (in [-1, 1], ``(n, C, H, W)``)."""
    if n < 1:
        raise ProtegeError(f"--n must be at least 1, got {n}")
    device = next(model.parameters()).device
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    labels = torch.full((n,), int(label), dtype=torch.long, device=device)
    return model(noise, labels).clamp(-1, 1).cpu()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write :func:`grid_png` to ``path`` atomically."""
    path = Path(path)
    atomic_write_text(path, grid_png(images, nrow))
    return path


def sample_grid(
    run_dir: str | Path,
    label: str | int,
    n: int = 16,
    out: str | Path | None = None,
    model: Literal["student", "teacher"] = "student",
    checkpoint: str = "best",
    seed: int = 0,
) -> Path:
    """Draw ``n`` images of class ``label`` (index or name) with a generation run's student (one step)
    or teacher (its N-step sampler) and write them as a PNG grid (default
    ``RUN/samples/<model>-class<c>.png``); returns its path."""
    if n < 1:
        raise ProtegeError(f"--n must be at least 1, got {n}")
    generator, data = load_generator(run_dir, model, checkpoint)
    c = class_index(label, data)
    shape = tuple(data.val[0]["images"].shape)
    images = sample_images(generator, c, n, shape, seed)  # type: ignore[arg-type]
    target = Path(out) if out is not None else Path(run_dir) / "samples" / f"{model}-class{c}.png"
    return save_grid(images, target)


__all__ = ["class_index", "grid_png", "load_generator", "sample_grid", "sample_images", "save_grid"]
