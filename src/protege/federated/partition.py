"""Partitions of a labelled pool among federated clients: IID, Dirichlet label skew, k classes each.

Every scheme is a pure function of the labels and a seed. Each client gets disjoint sample
indices, then splits them into its own train and test sets *per class* (the same share of every
class goes to test), so a client's test set is drawn from the client's own label distribution:
the accuracy measured on it is the *local* accuracy that ALMA averages.

Schemes:

``iid``
    A seeded shuffle cut into equal parts.
``dirichlet``
    Label skew of Yurochkin et al. (ICML 2019) as used by FedDF (Lin et al., NeurIPS 2020) and
    KnFu: for each class ``c`` a vector ``q_c ~ Dir(alpha · 1_N)`` over the ``N`` clients, and
    class ``c``'s samples are cut at the cumulative proportions ``floor(cumsum(q_c) · n_c)``.
    Small ``alpha`` (0.1) gives each client a few dominant classes; large ``alpha`` (10) is close
    to IID. Draws are repeated (up to ``max_tries``) until every client holds at least
    ``min_samples`` samples, as in the reference implementations.
``classes``
    Pathological non-IID (McMahan et al., AISTATS 2017): each client holds exactly
    ``classes_per_client`` distinct classes. Classes are dealt from a seeded permutation, client
    ``i`` taking ``perm[(i·k + j) mod C]`` for ``j < k``, so every class is held by as equal a
    number of clients as possible; each class's samples are split equally among its holders.

``samples_per_client`` then keeps a uniformly drawn subset of each client's samples (the
distribution is unchanged in expectation), which sets the local data size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ProtegeError

Scheme = Literal["iid", "dirichlet", "classes"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "classes")


@dataclass(frozen=True)
class ClientPart:
    """One client's sample indices (into the labelled pool), split into its own train and test."""

    train: np.ndarray
    test: np.ndarray

    @property
    def all(self) -> np.ndarray:
        return np.concatenate([self.train, self.test])


@dataclass(frozen=True)
class Partition:
    """The clients' parts and, for ``dirichlet``, the drawn class-to-client proportions.

    Attributes:
        parts: one :class:`ClientPart` per client.
        proportions: ``(C, N)`` array, ``proportions[c, i]`` the share of class ``c`` dealt to
            client ``i`` (``dirichlet``: the Dirichlet draw; ``iid``/``classes``: the shares used).
    """

    parts: list[ClientPart]
    proportions: np.ndarray


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``(N, C)`` counts of each class in each client's index array."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: Scheme = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    samples_per_client: int | None = None,
    test_fraction: float = 0.2,
    min_samples: int = 10,
    max_tries: int = 1000,
    seed: int = 0,
) -> Partition:
    """Partition a labelled pool among ``num_clients`` clients (see the module docstring).

    Args:
        labels: ``(n,)`` integer class labels ``0 .. C-1`` of the pool.
        num_clients: number of clients ``N``.
        scheme: ``"iid"``, ``"dirichlet"`` or ``"classes"``.
        alpha: Dirichlet concentration (``dirichlet``).
        classes_per_client: classes per client (``classes``).
        samples_per_client: keep at most this many samples per client (train + test).
        test_fraction: share of each class of a client that goes to the client's test set.
        min_samples: every client must hold at least this many samples (``dirichlet`` redraws).
        max_tries: redraws allowed before giving up (``dirichlet``).
        seed: seed of every random choice.

    Raises:
        ProtegeError: an unknown scheme or parameters that cannot be met.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ProtegeError("partition needs a non-empty 1-D array of integer class labels")
    if num_clients < 1:
        raise ProtegeError(f"num_clients must be at least 1, got {num_clients}")
    if not 0 <= test_fraction < 1:
        raise ProtegeError(f"test_fraction must be in [0, 1), got {test_fraction}")
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(labels.size)
        pieces = [np.sort(p) for p in np.array_split(order, num_clients)]
        proportions = np.full((num_classes, num_clients), 1.0 / num_clients)
    elif scheme == "dirichlet":
        pieces, proportions = _dirichlet(labels, num_clients, num_classes, alpha, min_samples, max_tries, rng)
    elif scheme == "classes":
        pieces, proportions = _k_classes(labels, num_clients, num_classes, classes_per_client, rng)
    else:
        raise ProtegeError(f"unknown partition scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if min(len(p) for p in pieces) < max(min_samples, 1):
        raise ProtegeError(
            f"a client got fewer than {max(min_samples, 1)} samples: use fewer clients or a larger dataset"
        )
    if samples_per_client is not None:
        if samples_per_client < 2:
            raise ProtegeError(f"samples_per_client must be at least 2, got {samples_per_client}")
        pieces = [
            np.sort(rng.choice(p, samples_per_client, replace=False)) if len(p) > samples_per_client else p
            for p in pieces
        ]
    parts = [_train_test(p, labels, test_fraction, rng) for p in pieces]
    return Partition(parts=parts, proportions=proportions)


def _dirichlet(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    alpha: float,
    min_samples: int,
    max_tries: int,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], np.ndarray]:
    if alpha <= 0:
        raise ProtegeError(f"dirichlet alpha must be > 0, got {alpha}")
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    for _ in range(max_tries):
        q = rng.dirichlet(np.full(num_clients, alpha), size=num_classes)  # (C, N)
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c, idx in enumerate(by_class):
            cuts = np.floor(np.cumsum(q[c])[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                pieces[i].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in pieces]
        if min(len(p) for p in merged) >= min_samples:
            return merged, q
    raise ProtegeError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {num_clients} clients "
        f"{min_samples} samples: raise alpha, use fewer clients, or lower min_samples"
    )


def _k_classes(
    labels: np.ndarray, num_clients: int, num_classes: int, k: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    if not 1 <= k <= num_classes:
        raise ProtegeError(f"classes_per_client must be in 1..{num_classes}, got {k}")
    if num_clients * k < num_classes:
        raise ProtegeError(
            f"{num_clients} clients x {k} classes cannot cover {num_classes} classes: "
            "raise classes_per_client or the number of clients"
        )
    perm = rng.permutation(num_classes)
    holds = [[int(perm[(i * k + j) % num_classes]) for j in range(k)] for i in range(num_clients)]
    holders: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i, classes in enumerate(holds):
        for c in classes:
            holders[c].append(i)
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    proportions = np.zeros((num_classes, num_clients))
    for c, who in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for i, chunk in zip(who, np.array_split(idx, len(who))):
            pieces[i].append(chunk)
            proportions[c, i] = 1.0 / len(who)
    return [np.sort(np.concatenate(p)) for p in pieces], proportions


def _train_test(
    idx: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> ClientPart:
    """Per class, ``round(test_fraction · n_c)`` samples to test (at least one of a class with two
    or more samples when ``test_fraction > 0``), the rest to train."""
    train, test = [], []
    for c in np.unique(labels[idx]):
        own = rng.permutation(idx[labels[idx] == c])
        n_test = int(round(test_fraction * len(own)))
        if test_fraction > 0 and n_test == 0 and len(own) >= 2:
            n_test = 1
        test.append(own[:n_test])
        train.append(own[n_test:])
    return ClientPart(train=np.sort(np.concatenate(train)), test=np.sort(np.concatenate(test)))
