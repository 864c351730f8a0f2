"""The embedding task's cosine loss against a numpy reference, and its registration."""

import numpy as np
import pytest
import torch

from protege.losses import get_loss
from protege.losses.embedding import cosine


def test_cosine_matches_numpy_and_ignores_norms() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = np.mean([1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(s, t)])
    got = cosine(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    scaled = cosine(torch.tensor(s * 3.0), torch.tensor(t * 0.1))
    assert scaled.item() == pytest.approx(expected, rel=1e-9)
    assert cosine(torch.tensor(s), torch.tensor(s)).item() == pytest.approx(0.0, abs=1e-12)
    assert cosine(torch.tensor(s), torch.tensor(-s)).item() == pytest.approx(2.0, abs=1e-12)


def test_cosine_registration_and_shape_errors() -> None:
    info = get_loss("cosine")
    assert info.default_keys == ("embedding", "embedding") and info.uses_teacher and info.paper
    with pytest.raises(ValueError, match="adapter"):
        cosine(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="non-empty"):
        cosine(torch.zeros(0, 4), torch.zeros(0, 4))
