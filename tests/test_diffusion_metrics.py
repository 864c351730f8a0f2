"""Fréchet distance against closed forms for Gaussians, k-NN precision/recall, FID with a stand-in network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from protege.errors import ProtegeError
from protege.metrics.generation import (
    frechet_distance,
    frechet_distance_of,
    frechet_inception_distance,
    load_inception,
    precision_recall,
)


def test_fd_of_diagonal_gaussians_is_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fd_of_general_gaussians_matches_the_symmetric_form() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)  # non-commuting covariances
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    r1 = _psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _psd_sqrt(r1 @ s2 @ r1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)


def test_fd_from_samples_approaches_the_population_value() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + 1  # N(1, 4I)
    expected = 3 * 1.0 + 3 * (1 - 2) ** 2  # |mu|² + Σ(σ1 - σ2)²
    assert frechet_distance_of(x, y) == pytest.approx(expected, rel=0.05)


def test_precision_recall_of_same_and_disjoint_sets() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(200, 4, generator=g) + 100
    assert precision_recall(real, far) == (0.0, 0.0)
    # a generator covering half of the real modes: precise, but half the recall
    modes = torch.cat([torch.randn(100, 4, generator=g) * 0.1, torch.randn(100, 4, generator=g) * 0.1 + 10])
    half = torch.randn(100, 4, generator=g) * 0.1
    p, r = precision_recall(modes, half)
    assert p > 0.9 and 0.4 < r < 0.6


def test_fid_with_a_stand_in_inception(tmp_path) -> None:
    def arch() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1))

    torch.manual_seed(0)
    net = arch()
    path = tmp_path / "standin.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_inception(path, arch=arch)
    real, fake = torch.rand(40, 1, 16, 16) * 2 - 1, torch.rand(40, 1, 16, 16)
    fid = frechet_inception_distance(loaded, real, fake, size=32)
    with torch.no_grad():
        up = lambda x: torch.nn.functional.interpolate(x.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear")  # noqa: E731
        expected = frechet_distance_of(net(up(real)).flatten(1), net(up(fake)).flatten(1))
    assert fid == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ProtegeError, match="not found"):
        load_inception(tmp_path / "missing.pt", arch=arch)
    with pytest.raises(ProtegeError, match="does not fit"):
        load_inception(path, arch=lambda: torch.nn.Linear(2, 2))
