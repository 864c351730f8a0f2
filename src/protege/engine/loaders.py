"""Data loaders whose order is a pure function of (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``, independent of the global RNG.

    The engine calls :meth:`set_epoch` before each epoch; the same seed gives every method the same
    batch order, which makes side-by-side comparisons (baseline vs distilled) fairer.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.n = len(dataset)  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler_cls: type[EpochShuffleSampler] | None = None,
) -> DataLoader:
    """A ``DataLoader`` with a seeded per-epoch shuffle (train) or fixed order (evaluation).

    ``sampler_cls`` replaces the shuffling sampler by a subclass (the teacher-output cache's
    sampler also tells the dataset the epoch)."""
    sampler = (sampler_cls or EpochShuffleSampler)(dataset, seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
