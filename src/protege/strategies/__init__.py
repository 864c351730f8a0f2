"""What the student trains on, when it is not the original training set (``data.strategy``).

- ``proxy``: an unlabelled pool of other images (:mod:`protege.strategies.proxy`, KD³);
- ``synthetic``: images synthesized from the teacher (:mod:`protege.strategies.synthesis`).

Each strategy returns the training loader and the :class:`~protege.engine.callbacks.Callback` s
that :func:`protege.engine.fit` runs with it (per-epoch selection, a generator trained between
steps). The training loop, the Distiller and the losses are the same as with the original data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ProtegeError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ..config import RunConfig
    from ..core.distiller import Distiller
    from ..data.splits import DataSplits
    from ..engine.callbacks import Callback


def training_data(
    cfg: RunConfig, data: DataSplits, distiller: Distiller, run_dir: Any = None
) -> tuple[DataLoader, list[Callback]]:
    """The training loader and fit callbacks for ``cfg.data.strategy`` (not ``original``)."""
    strategy = cfg.data.strategy
    if strategy == "proxy":
        from .proxy import proxy_training

        return proxy_training(cfg, data, distiller)
    if strategy == "synthetic":
        from .synthesis import synthetic_training

        return synthetic_training(cfg, data, distiller, run_dir)
    raise ProtegeError(f"unknown data.strategy {strategy!r}: use original, proxy or synthetic")
