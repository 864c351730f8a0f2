"""``protege search``: score a space's students with a proxy under budgets, rank them, write the results.

:func:`search` writes, in its output directory:

- ``search.json``: every candidate looked at (id, arch, status, score, params, FLOPs, latency,
  error), the ranking by proxy score, the Pareto front, budgets, seed, timings and throughput;
- ``search.png``: proxy score against cost, with the Pareto front and the winner marked;
- ``distill.yaml``: a run config that distills the winner from the search's teacher
  (``protege distill distill.yaml``, or ``search(..., distill=True)`` to go on at once).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..build import build_from, load_run_data
from ..config import RunConfig, dump_config
from ..engine import make_loader
from ..errors import ProtegeError
from ..files import atomic_write_text
from ..metrics.cost import measure_latency
from .config import SearchConfig
from .evolution import Budget, Candidate, CandidateScorer, SearchHistory, random_search, regularized_evolution

__all__ = ["SearchResult", "pareto_front", "search"]


@dataclass
class SearchResult:
    """What :func:`search` found and wrote."""

    history: SearchHistory
    summary: dict[str, Any]
    run_config: RunConfig | None  # None for the supernet space (its winners are extracted, not distilled)
    out_dir: Path
    distill_summary: dict[str, Any] | None = None

    @property
    def best(self) -> Candidate:
        return self.history.best

    @property
    def json_path(self) -> Path:
        return self.out_dir / "search.json"

    @property
    def png_path(self) -> Path:
        return self.out_dir / "search.png"

    @property
    def distill_path(self) -> Path:
        return self.out_dir / "distill.yaml"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, score)`` no other point beats (cost lower or equal and score
    higher or equal, one strictly), by increasing cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _proxy_batches(cfg: SearchConfig, dataset: Any) -> list[tuple[Tensor, Tensor]]:
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == cfg.proxy_batches:
            return batches
    raise ProtegeError(
        f"the training split has too few samples for {cfg.proxy_batches} proxy batch(es) of {cfg.batch_size}; "
        "lower batch_size or proxy_batches"
    )


def _teacher(cfg: SearchConfig, data: Any, needs: bool) -> nn.Module | None:
    if cfg.teacher is None:
        if needs:
            raise ProtegeError(
                f"proxy {cfg.proxy!r} compares the student with a teacher: add teacher: {{model: NAME}} "
                "(and weights: for a trained one), or choose a proxy that needs none"
            )
        return None
    torch.manual_seed(cfg.seed)  # a teacher without weights is the same random network every time
    return build_from(cfg.teacher, data)


def search(
    cfg: SearchConfig, out_dir: str | Path | None = None, distill: bool = False, progress: bool | None = None
) -> SearchResult:
    """Search ``cfg.space`` for the student the proxy ranks best under ``cfg.budget``.

    Args:
        cfg: the search config.
        out_dir: where the outputs go (default ``cfg.output_dir/cfg.name``).
        distill: then distill the winner (``protege.pipeline.run`` of ``distill.yaml``); the run
            goes to ``out_dir/<name>-winner``.
        progress: show the progress bar (default ``cfg.progress``).

    Raises:
        ProtegeError: an unknown proxy, a bad space or teacher, a budget no candidate meets.
    """
    from .proxies import get_proxy, needs_teacher

    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / cfg.name
    show = cfg.progress if progress is None else progress
    if cfg.space.kind == "supernet":
        if distill:
            raise ProtegeError(
                "--distill does not apply to the supernet space: fine-tune its extracted winners"
            )
        return _search_supernet(cfg, out, show, start)
    proxy = get_proxy(cfg.proxy)
    space = cfg.space.build()
    if distill and cfg.teacher is None:
        raise ProtegeError("--distill needs a teacher: add teacher: {model: NAME, weights: PATH}")
    template = cfg.run_config({"model": "placeholder"}, output_dir=str(out))
    data = load_run_data(template)
    teacher = _teacher(cfg, data, needs_teacher(cfg.proxy))
    batches = _proxy_batches(cfg, data.train)
    budget = Budget(**cfg.budget.model_dump())
    scorer = CandidateScorer(
        space, proxy, teacher, batches, budget, data.num_classes, data.in_chans, seed=cfg.seed
    )
    setup_s = time.perf_counter() - start
    history = _run_algorithm(cfg, space, scorer, budget, show)
    _measure_ranked(history, scorer, cfg.latency_top)
    run_cfg = cfg.run_config(space.model_spec(history.best.arch), output_dir=str(out))
    summary = _summary(cfg, space, history, teacher, setup_s, time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "distill.yaml", _distill_yaml(cfg, history.best, run_cfg))
    summary["distill_config"] = str(out / "distill.yaml")
    atomic_write_text(out / "search.json", json.dumps(summary, indent=2))
    _plot(history, cfg.plot_cost, out / "search.png", title=f"{cfg.name}: {cfg.proxy} on {space.name}")
    result = SearchResult(history, summary, run_cfg, out)
    if distill:
        from ..analysis.runs import run

        result.distill_summary = run(run_cfg, mode="distill", overwrite=True)
    return result


def _run_algorithm(cfg: SearchConfig, space: Any, scorer: Any, budget: Budget, show: bool) -> Any:
    """The configured search (random, or regularized evolution) over ``space``."""
    if cfg.algorithm.name == "random":
        return random_search(space, scorer, budget, seed=cfg.seed, progress=show)
    a = cfg.algorithm
    return regularized_evolution(
        space, scorer, budget, population=a.population, sample=a.sample, seed=cfg.seed, progress=show
    )


def _search_supernet(cfg: SearchConfig, out: Path, show: bool, start: float) -> SearchResult:
    """AutoDistil's search: subnets of trained supernets scored by their inherited relation loss
    (:mod:`protege.search.supernet`); the winner and the Pareto front are extracted to ``winners/``."""
    from .supernet import supernet_scorer

    space, scorer, budget, tokenizer = supernet_scorer(cfg)
    setup_s = time.perf_counter() - start
    history = _run_algorithm(cfg, space, scorer, budget, show)
    for cand in history.ranked[: cfg.latency_top]:
        if cand.latency_ms is None:
            cand.latency_ms = scorer.latency(cand.arch)
    summary = _summary(cfg, space, history, None, setup_s, time.perf_counter() - start)
    summary["proxy"] = "inherited relation loss (score = -loss)"
    costs = [(_cost(c, cfg.plot_cost) or 0.0, float(c.score or 0.0)) for c in history.ranked]
    front = [history.ranked[i] for i in pareto_front(costs)]
    winners = list({c.id: c for c in [history.best, *front]}.values())[: cfg.space.extract_top]
    summary["winners"] = {}
    for cand in winners:
        folder = out / "winners" / cand.id.replace(":", "_")
        space.build(cand.arch).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        summary["winners"][cand.id] = str(folder)
    atomic_write_text(out / "search.json", json.dumps(summary, indent=2))
    _plot(history, cfg.plot_cost, out / "search.png", title=f"{cfg.name}: inherited relation loss")
    return SearchResult(history, summary, None, out)


def _measure_ranked(history: SearchHistory, scorer: CandidateScorer, top: int) -> None:
    """Batch-1 latency of the best ``top`` candidates that the budget did not already time."""
    for cand in history.ranked[:top]:
        if cand.latency_ms is None:
            torch.manual_seed(scorer.seed)
            model = scorer.space.build(cand.arch, scorer.num_classes, scorer.in_chans)
            cand.latency_ms = measure_latency(model, scorer.example, warmup=2, iters=10, max_seconds=0.5)[
                "ms"
            ]


def _summary(
    cfg: SearchConfig,
    space: Any,
    history: SearchHistory,
    teacher: nn.Module | None,
    setup_s: float,
    total_s: float,
) -> dict[str, Any]:
    scored = history.ranked
    cost = [
        (_cost(c, cfg.plot_cost), float(c.score or 0.0))
        for c in scored
        if _cost(c, cfg.plot_cost) is not None
    ]
    front = pareto_front(cost)
    with_cost = [c for c in scored if _cost(c, cfg.plot_cost) is not None]
    return {
        "name": cfg.name,
        "proxy": cfg.proxy,
        "space": {**cfg.space.model_dump(mode="json"), "size": space.size},
        "teacher": None
        if cfg.teacher is None
        else {**cfg.teacher.model_dump(mode="json"), "trained": cfg.teacher.weights is not None},
        "algorithm": cfg.algorithm.model_dump(mode="json"),
        "budget": cfg.budget.model_dump(mode="json"),
        "seed": cfg.seed,
        "proxy_batches": cfg.proxy_batches,
        "batch_size": cfg.batch_size,
        "counts": history.counts(),
        "attempts": history.attempts,
        "stop": history.stop,
        "timings": {
            "setup_s": round(setup_s, 3),
            "search_s": round(history.seconds, 3),
            "total_s": round(total_s, 3),
            "score_s": round(sum(c.seconds for c in history.candidates), 3),
        },
        "candidates_per_minute": round(60.0 * len(scored) / max(history.seconds, 1e-9), 2),
        "best": history.best.to_dict(),
        "ranked": [{"rank": r + 1, **c.to_dict()} for r, c in enumerate(scored)],
        "pareto": {"cost": cfg.plot_cost, "ids": [with_cost[i].id for i in front]},
        "candidates": [c.to_dict() for c in history.candidates],
    }


def _cost(cand: Candidate, key: str) -> float | None:
    value = getattr(cand, key)
    return None if value is None else float(value)


def _distill_yaml(cfg: SearchConfig, best: Candidate, run_cfg: RunConfig) -> str:
    header = (
        f"# The winner of search {cfg.name!r}: {best.id} ({cfg.proxy} score {best.score:.6g}, "
        f"{best.params:,} params, {best.flops:,} FLOPs).\n"
        "# Distill it: protege distill distill.yaml\n"
    )
    if cfg.teacher is None or cfg.teacher.weights is None:
        header += "# The search's teacher has no weights: set teacher.weights to a trained one first.\n"
    return header + dump_config(run_cfg)


def _plot(history: SearchHistory, cost: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [c for c in history.ranked if _cost(c, cost) is not None]
    xs = [float(_cost(c, cost) or 0.0) for c in scored]
    ys = [float(c.score or 0.0) for c in scored]
    front = pareto_front(list(zip(xs, ys, strict=True)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.scatter(xs, ys, s=18, alpha=0.6, label="scored")
    if front:
        ax.step(
            [xs[i] for i in front], [ys[i] for i in front], where="post", color="C3", label="Pareto front"
        )
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=30, color="C3")
    best = history.best
    if _cost(best, cost) is not None:
        ax.scatter(
            [_cost(best, cost)], [best.score], marker="*", s=220, color="gold", edgecolor="k", label="winner"
        )
        ax.annotate(
            best.id, (_cost(best, cost), best.score), fontsize=7, xytext=(5, -10), textcoords="offset points"
        )
    if xs and max(xs) > 20 * max(min(xs), 1e-12):
        ax.set_xscale("log")
    label = {"params": "parameters", "flops": "FLOPs per sample", "latency_ms": "latency (ms, batch 1)"}[cost]
    ax.set(xlabel=label, ylabel="proxy score (higher is better)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
