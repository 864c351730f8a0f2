"""Training engine on HF Accelerate: fit, evaluate, checkpoints, loaders."""

from .callbacks import Callback
from .checkpoint import checkpoint_dir
from .loaders import make_loader
from .loop import evaluate, fit
from .options import OptimConfig, ScheduleConfig, TrainConfig

__all__ = [
    "Callback",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "checkpoint_dir",
    "evaluate",
    "fit",
    "make_loader",
]
