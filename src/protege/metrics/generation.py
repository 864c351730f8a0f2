"""Quality of generated images, measured in a feature space: Fréchet distance and k-NN precision/recall.

- :func:`frechet_distance`: ``‖μ₁-μ₂‖² + Tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^½)`` between two Gaussians (Heusel et
  al., 2017), the matrix square root by ``scipy.linalg.sqrtm`` (as pytorch-fid computes it).
  On a classifier's features it is *not* FID: name it for the feature space (the generation task
  reports ``fd_fmnist``). FID proper is :func:`frechet_inception_distance` on the pool features of
  an Inception-v3 whose weights the user gives (:func:`load_inception`: nothing is downloaded).
- :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al., NeurIPS 2019): each
  set's manifold is the union of balls reaching every sample's k-th nearest neighbour in the set;
  precision is the share of generated samples inside the real manifold, recall the share of real
  samples inside the generated one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ProtegeError


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``(N, D)`` features, in float64."""
    x = features.detach().double().cpu().numpy()
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N ≥ 2, D) features, got shape {tuple(x.shape)}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (module docstring).

    A singular product gets ``eps`` added to both diagonals first (pytorch-fid's fallback); a
    numerically complex root keeps its real part when the imaginary one is negligible."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two Gaussians must have the same dimension")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 0-th is the point itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features (module docstring)."""
    real, fake = real.detach().float().cpu(), fake.detach().float().cpu()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= r_real.unsqueeze(0)).any(dim=1).float().mean()
    recall = (d.T <= r_fake.unsqueeze(0)).any(dim=1).float().mean()
    return float(precision), float(recall)


# -- true FID (Inception-v3 pool features, user-given weights) -----------------------------------


def load_inception(weights: str | Path, arch: Callable[[], nn.Module] | None = None) -> nn.Module:
    """An Inception network for FID with the user's weights file (``.safetensors``, or a
    ``.pt``/``.pth`` state dict read with ``weights_only=True``); its forward must give the 2048-d
    pool features. ``arch``: the network to fill (default torchvision's ``inception_v3`` with its
    classifier removed; tests pass a small stand-in). Nothing is downloaded."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ProtegeError(f"Inception weights file not found: {path}")
    default = arch is None
    if arch is None:
        from torchvision.models import inception_v3

        def arch() -> nn.Module:
            net = inception_v3(weights=None, aux_logits=False, init_weights=False)
            net.fc = nn.Identity()
            return net

    net = arch()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))} if default else state
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ProtegeError(f"{path} does not fit the Inception network ({str(e).splitlines()[0]})") from None
    return net.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(net: nn.Module, images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """``net``'s features of images in [-1, 1]: grey replicated to RGB, resized to ``size`` (bilinear)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return net(x).flatten(1)


def frechet_inception_distance(
    net: nn.Module, real: torch.Tensor, fake: torch.Tensor, size: int = 299
) -> float:
    """FID between two image sets in [-1, 1], with ``net`` from :func:`load_inception`."""
    return frechet_distance_of(inception_features(net, real, size), inception_features(net, fake, size))


__all__ = [
    "frechet_distance",
    "frechet_distance_of",
    "frechet_inception_distance",
    "gaussian_stats",
    "inception_features",
    "load_inception",
    "precision_recall",
]
