"""Dataset wrappers that add what some distillation losses need to each sample."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class WithIndex(Dataset):
    """Yield ``(input, target, {"index": i})``: each sample with its position in ``dataset``.

    Losses that keep per-sample memory (CRD's momentum bank of embeddings) read the indices from
    the batch's ``meta`` (the default collate turns the ints into a ``LongTensor``). Wrapping twice
    is harmless: an already wrapped dataset is returned as is by :meth:`wrap`.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    @classmethod
    def wrap(cls, dataset: Dataset) -> WithIndex:
        return dataset if isinstance(dataset, WithIndex) else cls(dataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, dict[str, int]]:
        x, y = self.dataset[i][:2]
        return x, y, {"index": i}
