"""A run as the user asks for it (``pg.run``, ``protege distill``): the pipeline, then the run report.

:func:`protege.pipeline.run` trains and tests; the report reads the finished run back from disk
(:func:`protege.analysis.report.build_report`), so it is written *after* the run, from this layer,
never from inside the pipeline. :func:`seed_stats` is what a table of several seeds reports.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..build import Mode
from ..config import PRESENTATION_KEYS, RunConfig, config_changes, load_config
from ..engine.checkpoint import read_pointers
from ..engine.loop import console
from ..errors import ProtegeError
from ..pipeline import run as run_pipeline
from .report import build_report

__all__ = [
    "finished_summary",
    "run",
    "run_or_reuse",
    "seed_cell",
    "seed_paired",
    "seed_stats",
    "write_run_report",
]


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


def finished_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``summary.json`` of a run that completed and was tested, else ``None``."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" and "test" in summary else None


def run_or_reuse(cfg: RunConfig, mode: Mode = "distill", report: bool = False) -> dict[str, Any]:
    """``cfg``'s finished run when ``runs/<name>/`` holds one made from the same resolved config
    (a benchmark run again, a table rebuilt), else the run trained now (one begun with this
    config resumes from its last checkpoint). Keys that only change how a run is shown
    (:data:`~protege.config.PRESENTATION_KEYS`: ``progress``, ``log_every``, …) do not count. A finished
    or begun run of *another* config is never replaced: that is a :class:`~protege.errors.ProtegeError`
    naming the keys that differ (choose another output directory, or delete the run)."""
    stored = cfg.run_dir / "config.yaml"
    if stored.is_file():
        changed = [c for c in config_changes(load_config(stored), cfg) if c[0] not in PRESENTATION_KEYS]
        if changed:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:6])
            more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
            raise ProtegeError(
                f"{cfg.run_dir} holds a run of another config ({listed}{more}); use another output "
                "directory or delete that run to train this one"
            )
        done = finished_summary(cfg.run_dir)
        if done is not None:
            return done
        if read_pointers(cfg.run_dir / "checkpoints"):  # begun with this config: go on from there
            return run(cfg, mode, resume=True, report=report)
    return run(cfg, mode, overwrite=True, report=report)


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


def seed_cell(mean: Mapping[str, float], std: Mapping[str, float], key: str, scale: float = 100.0) -> str:
    """A table cell of :func:`seed_stats`'s figures: ``"73.2 ± 0.8"`` (``scale``: 100 for shares in
    percent), the mean alone where the spread is 0 (one seed), ``"—"`` where the metric is missing."""
    if key not in mean:
        return "—"
    spread = std.get(key) or 0.0
    return f"{scale * mean[key]:.1f}" + (f" ± {scale * spread:.1f}" if spread else "")


def seed_paired(
    row: Mapping[int, float], base: Mapping[int, float], lower_is_better: bool = False
) -> dict[str, Any] | None:
    """Seed-paired differences ``row[s] - base[s]`` over the seeds both have (same initialisation,
    data and schedule: only the recipe differs), so seed-to-seed spread shared by both cancels.

    Returns ``{"mean", "std" (sample; 0 for one seed), "per_seed" (in seed order), "better" (seeds
    where ``row`` wins: a larger value, or a smaller one with ``lower_is_better``), "seeds"}``, or
    ``None`` when no seed is shared."""
    common = sorted(set(row) & set(base))
    if not common:
        return None
    d = [float(row[s]) - float(base[s]) for s in common]
    sign = -1.0 if lower_is_better else 1.0
    return {
        "mean": statistics.fmean(d),
        "std": statistics.stdev(d) if len(d) > 1 else 0.0,
        "per_seed": d,
        "better": sum(sign * x > 0 for x in d),
        "seeds": len(d),
    }
