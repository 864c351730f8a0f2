"""A run as the user asks for it (``pg.run``, ``protege distill``): the pipeline, then the run report.

:func:`protege.pipeline.run` trains and tests; the report reads the finished run back from disk
(:func:`protege.analysis.report.build_report`), so it is written *after* the run, from this layer,
never from inside the pipeline. :func:`seed_stats` is what a table of several seeds reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..build import Mode
from ..config import RunConfig
from ..engine.loop import console
from ..pipeline import run as run_pipeline
from .report import build_report

__all__ = ["run", "seed_stats", "write_run_report"]


def run(
    cfg: RunConfig,
    mode: Mode = "distill",
    resume: bool = False,
    overwrite: bool = False,
    report: bool = True,
    override_config: bool = False,
) -> dict[str, Any]:
    """Train (``mode="train"``: plain CE) or distill as ``cfg`` says; write ``runs/<name>/``.

    See :func:`protege.pipeline.run` for the run itself (fit, test of the last and best
    checkpoints, export, ``summary.json``; on ``resume`` the config must be the run's own unless
    ``override_config``). A finished distillation then gets its ``report.html``
    (:func:`write_run_report`; ``report=False``: not).
    """
    summary = run_pipeline(cfg, mode, resume, overwrite, override_config)
    finished = not cfg.stages or bool(summary.get("test"))  # every stage ran
    if report and mode == "distill" and finished:
        write_run_report(cfg)
    return summary


def write_run_report(cfg: RunConfig) -> Path | None:
    """``report.html`` at the end of a distillation; a failure only warns: the run is saved.

    Every task: classification runs get the full report, other tasks (``vision_language``,
    ``lm``, ...) the task-metrics report (see :func:`protege.analysis.report.build_report`). Not
    for a run distilled from a teacher-output cache (the report would load the teacher the cache
    exists to avoid): it says how to write it. Returns the report's path, or ``None`` when none
    was written."""
    run_dir = cfg.run_dir
    if not PartialState().is_main_process:
        return None
    if cfg.cache is not None:
        console.print(
            f"report: not written automatically for a run distilled from a cache (it loads the teacher); "
            f"write it with: protege report {run_dir}"
        )
        return None
    try:
        path = build_report(run_dir)
    except Exception as e:  # whatever went wrong, the finished run must stand
        console.print(
            f"[yellow]warning: no report ({type(e).__name__}: {e}); the run is complete. "
            f"Retry with: protege report {run_dir}"
        )
        return None
    console.print(f"report: {path}")
    return path


def seed_stats(
    summaries: Sequence[Mapping[str, Any]], which: str = "best"
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation over seeds of the runs' test metrics.

    ``summaries``: the ``summary.json`` contents of the same recipe run with different seeds;
    ``which``: the checkpoint whose test metrics count (``"best"`` or ``"last"``). A metric some runs
    lack is averaged over those that have it; one run gives a standard deviation of 0."""
    keys = sorted({k for s in summaries for k in (s.get("test", {}).get(which) or {})})
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for k in keys:
        vals = [float(s["test"][which][k]) for s in summaries if k in (s["test"].get(which) or {})]
        mean[k] = statistics.mean(vals)
        std[k] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std
