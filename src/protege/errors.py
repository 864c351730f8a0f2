"""User-facing errors.

A :class:`ProtegeError` is a mistake the user can fix (a bad config value, a missing file, an
unknown name). The CLI prints its message alone, without a traceback, and exits with code 2.
A :class:`TrainingFailed` is a run that started and could not finish (its loss went non-finite):
the CLI prints what happened and what is on disk, and exits with code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ProtegeError(Exception):
    """An error caused by user input; its message says what to do."""


class TrainingFailed(Exception):
    """A run stopped before its end; the message says where, why, and what is on disk."""


def closest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` choices most similar to ``name`` (case-insensitive), best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    if not hits:  # fall back to substring matches, e.g. "resnet" -> "resnet20"
        hits = [c for c in lowered if name.lower() in c][:n]
    return [lowered[h] for h in hits]


def unknown(kind: str, name: str, choices: Iterable[str]) -> ProtegeError:
    """Build the error for an unknown ``kind`` called ``name``, naming the closest valid choices."""
    choices = sorted(set(choices))
    near = closest(name, choices)
    if near:
        hint = "did you mean: " + ", ".join(near) + "?"
    elif len(choices) <= 30:
        hint = "valid choices: " + ", ".join(choices)
    else:
        hint = f"{len(choices)} choices exist; none is close"
    return ProtegeError(f"unknown {kind} {name!r}; {hint}")
