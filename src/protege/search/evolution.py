"""Search under budgets: random search and regularized evolution, scoring candidates with a proxy.

A :class:`CandidateScorer` turns an architecture into a :class:`Candidate`: it builds the model,
checks the cheap budgets first (parameters, then FLOPs), measures batch-1 latency on this machine
only for candidates that pass them, and scores the survivors with the proxy. A candidate that
cannot be built or scored is recorded as ``failed`` with its error; the search goes on.

:func:`random_search` and :func:`regularized_evolution` (Real et al., "Regularized Evolution for
Image Classifier Architecture Search", AAAI 2019) stop after ``max_candidates`` proxy scores,
when a finite space is exhausted, or after ``attempts_per_candidate * max_candidates`` draws.
The winner is the best proxy score of the whole history: no accuracy is ever looked at.
Everything is drawn from ``random.Random(seed)`` and every candidate is initialised from
``torch.manual_seed(seed)``, so a seed fixes the history (unless a latency budget, which depends on
the machine's load, rejects candidates).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from ..engine.loop import console
from ..errors import ProtegeError
from ..metrics.cost import count_flops, count_params, measure_latency
from .spaces import Arch, SearchSpace

__all__ = [
    "Budget",
    "Candidate",
    "CandidateScorer",
    "SearchHistory",
    "random_search",
    "regularized_evolution",
]

Status = Literal["scored", "over_budget", "failed"]
_ABORT_AFTER = 5
Proxy = Callable[[nn.Module | None, nn.Module, tuple[Tensor, Tensor]], float]


@dataclass(frozen=True)
class Budget:
    """Limits a candidate must meet (``None``: no limit) and how many candidates to score."""

    max_params: int | None = None
    max_flops: int | None = None
    max_latency_ms: float | None = None
    max_candidates: int = 100

    def __post_init__(self) -> None:
        if self.max_candidates < 1:
            raise ProtegeError(f"max_candidates must be at least 1, got {self.max_candidates}")
        for key in ("max_params", "max_flops", "max_latency_ms"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ProtegeError(f"budget {key} must be positive (or left out), got {value}")


@dataclass
class Candidate:
    """One architecture the search looked at, in the order it was first drawn (``index``)."""

    index: int
    id: str
    arch: Arch
    status: Status
    score: float | None = None
    params: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    reason: str | None = None  # the budget an over-budget candidate broke
    error: str | None = None  # why a failed candidate failed
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        arch = list(self.arch) if isinstance(self.arch, tuple) else self.arch
        return {
            "index": self.index,
            "id": self.id,
            "arch": arch,
            "status": self.status,
            "score": self.score,
            "params": self.params,
            "flops": self.flops,
            "latency_ms": self.latency_ms,
            "reason": self.reason,
            "error": self.error,
            "seconds": round(self.seconds, 4),
        }


class CandidateScorer:
    """Build, budget-check and score one architecture (see the module docstring).

    Args:
        space: the search space.
        proxy: ``score(teacher, student, (x, y)) -> float``, higher is better.
        teacher: passed to the proxy (may be ``None`` for proxies that read no teacher).
        batches: the proxy batches; the score is their mean.
        budget: the limits.
        num_classes: classifier outputs of every candidate.
        in_chans: input channels of every candidate.
        seed: every candidate is initialised after ``torch.manual_seed(seed)``.
    """

    def __init__(
        self,
        space: SearchSpace,
        proxy: Proxy,
        teacher: nn.Module | None,
        batches: Sequence[tuple[Tensor, Tensor]],
        budget: Budget,
        num_classes: int,
        in_chans: int,
        seed: int = 0,
    ) -> None:
        if not batches:
            raise ProtegeError("the proxy needs at least one batch of data")
        self.space, self.proxy, self.teacher = space, proxy, teacher
        self.batches, self.budget = list(batches), budget
        self.num_classes, self.in_chans, self.seed = num_classes, in_chans, seed
        self.example = self.batches[0][0][:1]

    def __call__(self, arch: Arch, index: int = 0) -> Candidate:
        start = time.perf_counter()
        cand = Candidate(index=index, id=self.space.encode(arch), arch=arch, status="scored")
        try:
            self._score(arch, cand)
        except Exception as e:  # a crashing candidate must not end the search
            cand.status, cand.error = "failed", f"{type(e).__name__}: {e}"
        cand.seconds = time.perf_counter() - start
        return cand

    def _score(self, arch: Arch, cand: Candidate) -> None:
        b = self.budget
        torch.manual_seed(self.seed)
        model = self.space.build(arch, self.num_classes, self.in_chans)
        cand.params = count_params(model)
        if b.max_params is not None and cand.params > b.max_params:
            cand.status, cand.reason = "over_budget", "max_params"
            return
        cand.flops = count_flops(model, self.example)
        if b.max_flops is not None and cand.flops > b.max_flops:
            cand.status, cand.reason = "over_budget", "max_flops"
            return
        if b.max_latency_ms is not None:
            cand.latency_ms = measure_latency(model, self.example, warmup=3, iters=20, max_seconds=1.0)["ms"]
            if cand.latency_ms > b.max_latency_ms:
                cand.status, cand.reason = "over_budget", "max_latency_ms"
                return
        scores = [float(self.proxy(self.teacher, model, batch)) for batch in self.batches]
        score = sum(scores) / len(scores)
        if not math.isfinite(score):
            raise ValueError(f"the proxy returned a non-finite score ({score})")
        cand.score = score


@dataclass
class SearchHistory:
    """Every candidate the search looked at, and the ranking by proxy score.

    ``candidates``: unique architectures in the order first drawn. ``ranked``: the scored ones,
    best proxy score first (ties by order drawn). ``stop``: why the search stopped.
    """

    algorithm: str
    candidates: list[Candidate]
    attempts: int
    stop: str
    seconds: float
    ranked: list[Candidate] = field(init=False)

    def __post_init__(self) -> None:
        scored = [c for c in self.candidates if c.status == "scored"]
        self.ranked = sorted(scored, key=lambda c: (-float(c.score or 0.0), c.index))

    @property
    def best(self) -> Candidate:
        return self.ranked[0]

    def counts(self) -> dict[str, int]:
        counts = Counter(c.status for c in self.candidates)
        return {s: counts.get(s, 0) for s in ("scored", "over_budget", "failed")}


class _Run:
    """The bookkeeping both algorithms share: cache by id, stop conditions, progress bar."""

    def __init__(
        self,
        space: SearchSpace,
        evaluate: Callable[[Arch, int], Candidate],
        budget: Budget,
        progress: bool,
        attempts_per_candidate: int,
    ) -> None:
        self.space, self.evaluate_fn, self.budget = space, evaluate, budget
        self.seen: dict[str, Candidate] = {}
        self.attempts = 0
        self.max_attempts = attempts_per_candidate * budget.max_candidates
        self.scored = 0
        self.start = time.perf_counter()
        self.bar = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
        )
        self.task = self.bar.add_task("search", total=budget.max_candidates, info="")

    def __enter__(self) -> _Run:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def evaluate(self, arch: Arch) -> Candidate:
        self.attempts += 1
        key = self.space.encode(arch)
        if key in self.seen:  # duplicates cost nothing and are not scored twice
            return self.seen[key]
        cand = self.evaluate_fn(arch, len(self.seen))
        self.seen[key] = cand
        if cand.status == "failed" and not self.scored:
            self._abort_if_hopeless()
        if cand.status == "scored":
            self.scored += 1
            best = max(c.score for c in self.seen.values() if c.score is not None)
            self.bar.update(self.task, advance=1, info=f"best {best:.4g}")
        return cand

    def _abort_if_hopeless(self) -> None:
        """Stop at once when the first candidates all fail alike: the cause is the setup (e.g. a
        teacher without the classifier the proxy reads), not the candidates."""
        first = list(self.seen.values())
        errors = {c.error for c in first}
        if len(first) == _ABORT_AFTER and len(errors) == 1 and all(c.status == "failed" for c in first):
            raise ProtegeError(
                f"the first {_ABORT_AFTER} candidates all failed with the same error, so the search stops: "
                f"{errors.pop()}"
            )

    def stop_reason(self) -> str | None:
        if self.scored >= self.budget.max_candidates:
            return "max_candidates"
        if self.space.size is not None and len(self.seen) >= self.space.size:
            return "space exhausted"
        if self.attempts >= self.max_attempts:
            return "attempts"
        return None

    def history(self, algorithm: str) -> SearchHistory:
        history = SearchHistory(
            algorithm=algorithm,
            candidates=list(self.seen.values()),
            attempts=self.attempts,
            stop=self.stop_reason() or "no parent in budget",
            seconds=time.perf_counter() - self.start,
        )
        if not history.ranked:
            raise _nothing_scored(history.candidates, self.budget)
        return history


def _nothing_scored(candidates: list[Candidate], budget: Budget) -> ProtegeError:
    over = [c for c in candidates if c.status == "over_budget"]
    if not over:
        errors = Counter(c.error for c in candidates if c.error)
        first = errors.most_common(1)[0][0] if errors else "none"
        return ProtegeError(
            f"every one of the {len(candidates)} candidates failed; the most common error: {first}"
        )
    tightest, rejected = Counter(c.reason for c in over).most_common(1)[0]
    metric = {"max_params": "params", "max_flops": "flops", "max_latency_ms": "latency_ms"}[str(tightest)]
    seen = [getattr(c, metric) for c in candidates if getattr(c, metric) is not None]
    unit = {"params": "parameters", "flops": "FLOPs", "latency_ms": "ms"}[metric]
    return ProtegeError(
        f"no candidate meets the budget: {tightest}={getattr(budget, str(tightest)):,} rejected {rejected} of "
        f"{len(candidates)} candidates, and the smallest seen has {min(seen):,.6g} {unit}. "
        f"Raise budget.{tightest} to at least that, or search a space of smaller models."
    )


def random_search(
    space: SearchSpace,
    evaluate: Callable[[Arch, int], Candidate],
    budget: Budget,
    seed: int = 0,
    progress: bool = True,
    attempts_per_candidate: int = 50,
) -> SearchHistory:
    """Score architectures drawn uniformly without replacement until the budget is spent.

    A finite space of at most a million architectures is enumerated and shuffled; a larger or
    infinite one is sampled (duplicates are skipped).

    Raises:
        ProtegeError: no candidate met the budget (naming the tightest limit), or all failed.
    """
    rng = random.Random(seed)
    with _Run(space, evaluate, budget, progress, attempts_per_candidate) as run:
        if space.size is not None and space.size <= 1_000_000:
            order = list(space.enumerate())
            rng.shuffle(order)
            for arch in order:
                if run.stop_reason():
                    break
                run.evaluate(arch)
        else:
            while not run.stop_reason():
                run.evaluate(space.sample(rng))
    return run.history("random")


def regularized_evolution(
    space: SearchSpace,
    evaluate: Callable[[Arch, int], Candidate],
    budget: Budget,
    population: int = 10,
    sample: int = 3,
    seed: int = 0,
    progress: bool = True,
    attempts_per_candidate: int = 50,
) -> SearchHistory:
    """Regularized ("aging") evolution of Real et al. (2019).

    Fill a population of ``population`` in-budget random architectures; then repeatedly draw
    ``sample`` members at random (the tournament), mutate one gene of the best of them, add the
    child if it meets the budget and remove the oldest member. Over-budget and failed children
    are recorded but never join the population.

    Raises:
        ProtegeError: bad ``population``/``sample``, or no candidate met the budget.
    """
    if population < 1 or sample < 1:
        raise ProtegeError(f"population and sample must be >= 1, got {population} and {sample}")
    if sample > population:
        raise ProtegeError(f"the tournament sample ({sample}) cannot exceed the population ({population})")
    rng = random.Random(seed)
    pop: deque[Candidate] = deque()
    with _Run(space, evaluate, budget, progress, attempts_per_candidate) as run:
        while len(pop) < population and not run.stop_reason():
            cand = run.evaluate(space.sample(rng))
            if cand.status == "scored":
                pop.append(cand)
        while pop and not run.stop_reason():
            tournament = rng.sample(list(pop), min(sample, len(pop)))
            parent = max(tournament, key=lambda c: float(c.score or 0.0))
            child = run.evaluate(space.mutate(parent.arch, rng))
            if child.status == "scored":
                pop.append(child)
                pop.popleft()
    return run.history("evolution")
