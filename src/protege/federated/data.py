"""The data of a federation: a labelled pool cut into a public transfer set, a global test set,
and the clients' private parts.

The cut is a pure function of the config (dataset, sizes, partition, seed), so every client
computes its own part where it runs, and the server reads only the public parts (transfer set,
global test set): no client sample is ever sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..data import load_data
from ..errors import ProtegeError
from .config import FederationConfig
from .partition import Partition, partition


@dataclass(frozen=True)
class Pool:
    """All images and labels of a bundled dataset, normalised as protege loads them."""

    images: Tensor
    labels: Tensor
    num_classes: int


@lru_cache(maxsize=4)
def load_pool(dataset: str) -> Pool:
    """The whole of ``dataset`` (train + val + test of :func:`protege.data.load_data`) as one pool."""
    splits = load_data(dataset, transforms="none")
    parts = [splits.train, splits.val, splits.test]
    images = torch.cat([p.images for p in parts if p is not None])  # type: ignore[union-attr]
    labels = torch.cat([p.labels for p in parts if p is not None])  # type: ignore[union-attr]
    return Pool(images=images, labels=labels, num_classes=splits.num_classes)


@dataclass(frozen=True)
class Layout:
    """Index sets into the pool: ``transfer`` and ``global_test`` (public), ``partition`` (private)."""

    transfer: np.ndarray
    global_test: np.ndarray
    client_pool: np.ndarray
    partition: Partition


def layout(cfg: FederationConfig, labels: np.ndarray) -> Layout:
    """Cut the pool: a stratified transfer set, a stratified global test set, the rest partitioned."""
    transfer, global_test, rest = _public_split(cfg, len(labels))
    p = cfg.partition
    part = partition(
        labels[rest],
        cfg.clients,
        p.scheme,
        alpha=p.alpha,
        classes_per_client=p.classes_per_client,
        samples_per_client=p.samples_per_client,
        test_fraction=p.test_fraction,
        min_samples=p.min_samples,
        seed=cfg.seed,
    )
    return Layout(transfer, global_test, rest, part)


def _public_split(cfg: FederationConfig, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded ``(transfer, global_test, rest)`` indices of a pool of ``n`` samples."""
    held = cfg.transfer_size + cfg.global_test_size
    if held >= n:
        raise ProtegeError(
            f"transfer_size + global_test_size = {held} leaves no data for the clients of "
            f"{cfg.dataset} ({n} samples): lower them"
        )
    order = np.random.default_rng(cfg.seed).permutation(n)
    transfer, global_test, rest = np.split(order, [cfg.transfer_size, held])
    return np.sort(transfer), np.sort(global_test), rest


@dataclass(frozen=True)
class ClientData:
    """What one client holds: its private train/test tensors and the public transfer inputs."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_transfer: Tensor
    x_global: Tensor
    y_global: Tensor
    num_classes: int


def client_data(cfg: FederationConfig, client: int) -> ClientData:
    """Client ``client``'s data (computed locally from the config; nothing is received)."""
    if not 0 <= client < cfg.clients:
        raise ProtegeError(f"partition-id {client} is outside 0..{cfg.clients - 1} (clients: {cfg.clients})")
    pool = load_pool(cfg.dataset)
    lay = layout(cfg, pool.labels.numpy())
    part = lay.partition.parts[client]
    train = torch.from_numpy(lay.client_pool[part.train])
    test = torch.from_numpy(lay.client_pool[part.test])
    transfer = torch.from_numpy(lay.transfer)
    glob = torch.from_numpy(lay.global_test)
    return ClientData(
        x_train=pool.images[train],
        y_train=pool.labels[train],
        x_test=pool.images[test],
        y_test=pool.labels[test],
        x_transfer=pool.images[transfer],
        x_global=pool.images[glob],
        y_global=pool.labels[glob],
        num_classes=pool.num_classes,
    )


@dataclass(frozen=True)
class PublicData:
    """What the server holds: the unlabeled transfer inputs and the global test set."""

    x_transfer: Tensor
    x_global: Tensor
    y_global: Tensor
    num_classes: int
    in_chans: int


def public_data(cfg: FederationConfig) -> PublicData:
    """The server's public data (the transfer set carries no labels)."""
    pool = load_pool(cfg.dataset)
    transfer_idx, global_idx, _ = _public_split(cfg, len(pool.labels))
    transfer, glob = torch.from_numpy(transfer_idx), torch.from_numpy(global_idx)
    return PublicData(
        x_transfer=pool.images[transfer],
        x_global=pool.images[glob],
        y_global=pool.labels[glob],
        num_classes=pool.num_classes,
        in_chans=int(pool.images.shape[1]),
    )
