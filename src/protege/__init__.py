"""protege: knowledge distillation for PyTorch.

>>> import protege as pg
>>> distiller = pg.Distiller(student, teacher, terms=[pg.ce(0.1), pg.kd(0.9, T=4)])
>>> for x, y in loader:
...     _, losses = distiller((x, y))
...     sum(losses.values()).backward(); opt.step(); opt.zero_grad()

or, with the engine: ``pg.fit(distiller, train_loader, val_loader, pg.TrainConfig(epochs=10))``.
"""

from .analysis.runs import run
from .config import RunConfig, load_config
from .core.cohort import Cohort
from .core.distiller import Distiller, Term
from .core.on_policy import OnPolicy
from .core.taps import Taps
from .core.terms import (
    ab,
    affinity_mimic,
    at,
    ce,
    clip_cls,
    clip_contrastive,
    crd,
    ctkd,
    denoising,
    dist,
    dkd,
    dmd,
    dmd_gan,
    dmd_regression,
    feat_mse,
    fitnet,
    fsp,
    ft,
    img_contrast,
    kd,
    multi_kd,
    pkt,
    reviewkd,
    rkd,
    score_matching,
    simkd,
    sp,
    term,
    vid,
    vl_align,
)
from .data import DataSplits, load_data
from .engine import Callback, TrainConfig, evaluate, fit, make_loader
from .errors import ProtegeError
from .export import bench, export
from .losses import get_loss, list_losses, register_loss
from .metrics.cost import count_flops, count_params, measure_latency
from .models import build_model, list_models, load_model
from .pipeline import evaluate_run, synthesize

__version__ = "0.1.0"

__all__ = [
    "Cohort",
    "ab",
    "at",
    "crd",
    "fsp",
    "ft",
    "pkt",
    "reviewkd",
    "rkd",
    "score_matching",
    "simkd",
    "sp",
    "vid",
    "fitnet",
    "affinity_mimic",
    "clip_cls",
    "clip_contrastive",
    "feat_mse",
    "img_contrast",
    "vl_align",
    "Callback",
    "DataSplits",
    "Distiller",
    "OnPolicy",
    "ProtegeError",
    "RunConfig",
    "Taps",
    "Term",
    "TrainConfig",
    "bench",
    "build_model",
    "ce",
    "count_flops",
    "count_params",
    "ctkd",
    "dist",
    "denoising",
    "dkd",
    "dmd",
    "dmd_gan",
    "dmd_regression",
    "evaluate",
    "evaluate_run",
    "export",
    "fit",
    "get_loss",
    "kd",
    "list_losses",
    "list_models",
    "load_config",
    "load_data",
    "load_model",
    "make_loader",
    "measure_latency",
    "multi_kd",
    "register_loss",
    "run",
    "synthesize",
    "term",
]
