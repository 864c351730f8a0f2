"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests (tests/test_fuzz_config.py): `quick` for `make test` (bounded, derandomized, so CI
# sees the same examples every run), `fuzz` for `make fuzz` (HYPOTHESIS_PROFILE=fuzz: 1000 fresh ones).
settings.register_profile(
    "quick",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz", max_examples=1000, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to oversubscription on a busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
