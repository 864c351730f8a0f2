"""seed_stats: what every several-seed table reports (mean and sample std of the runs' test metrics)."""

from __future__ import annotations

import statistics

import pytest

from protege.analysis.runs import seed_stats


def test_mean_and_sample_std_per_metric_and_checkpoint() -> None:
    runs = [
        {"test": {"best": {"acc": 0.80, "kl": 0.2}, "last": {"acc": 0.70}}},
        {"test": {"best": {"acc": 0.90, "kl": 0.4}, "last": {"acc": 0.75}}},
        {"test": {"best": {"acc": 0.85}, "last": {"acc": 0.80}}},  # this one lacks kl
    ]
    mean, std = seed_stats(runs, "best")
    assert mean["acc"] == pytest.approx(0.85) and std["acc"] == pytest.approx(
        statistics.stdev([0.8, 0.9, 0.85])
    )
    assert mean["kl"] == pytest.approx(0.3) and std["kl"] == pytest.approx(statistics.stdev([0.2, 0.4]))
    mean, std = seed_stats(runs, "last")
    assert set(mean) == {"acc"} and mean["acc"] == pytest.approx(0.75)
    mean, std = seed_stats(runs[:1], "best")
    assert std == {"acc": 0.0, "kl": 0.0}
    assert seed_stats([], "best") == ({}, {})


def test_run_or_reuse_reuses_only_a_finished_run_of_the_same_config(tmp_path) -> None:
    from protege.analysis.runs import finished_summary, run_or_reuse
    from protege.config import load_config
    from protege.errors import ProtegeError

    cfg = {
        "name": "r", "output_dir": str(tmp_path), "seed": 0, "epochs": 1, "cpu": True, "progress": False,
        "data": {"source": "digits", "batch_size": 64},
        "student": {"model": "mlp_s"}, "terms": [{"loss": "ce"}], "optim": {"lr": 0.1},
    }  # fmt: skip
    first = run_or_reuse(load_config(None, **cfg), "train")
    assert finished_summary(tmp_path / "r") == first
    stamp = (tmp_path / "r" / "summary.json").stat().st_mtime_ns
    again = run_or_reuse(load_config(None, **cfg), "train")
    assert again == first and (tmp_path / "r" / "summary.json").stat().st_mtime_ns == stamp  # not retrained
    shown = run_or_reuse(load_config(None, **{**cfg, "progress": True, "log_every": 7}), "train")
    assert shown == first and (tmp_path / "r" / "summary.json").stat().st_mtime_ns == stamp  # display only
    with pytest.raises(ProtegeError, match="another config.*epochs"):
        run_or_reuse(load_config(None, **{**cfg, "epochs": 2}), "train")
    assert (tmp_path / "r" / "summary.json").stat().st_mtime_ns == stamp  # nothing replaced
    assert finished_summary(tmp_path / "nowhere") is None


def test_seed_cell_formats_mean_and_spread() -> None:
    from protege.analysis.runs import seed_cell

    assert seed_cell({"acc": 0.732}, {"acc": 0.008}, "acc") == "73.2 ± 0.8"
    assert seed_cell({"acc": 0.732}, {"acc": 0.0}, "acc") == "73.2"  # one seed: no spread shown
    assert seed_cell({}, {}, "acc") == "—"
    assert seed_cell({"loss": 1.25}, {"loss": 0.5}, "loss", scale=1.0) == "1.2 ± 0.5"


def test_seed_paired_matches_on_shared_seeds_only() -> None:
    from protege.analysis.runs import seed_paired

    row = {0: 0.80, 1: 0.90, 2: 0.70, 5: 0.99}  # seed 5 has no partner: left out
    base = {0: 0.75, 1: 0.92, 2: 0.60, 3: 0.10}
    p = seed_paired(row, base)
    assert p is not None and p["seeds"] == 3
    assert p["per_seed"] == pytest.approx([0.05, -0.02, 0.10])
    assert p["mean"] == pytest.approx(0.13 / 3) and p["std"] == pytest.approx(statistics.stdev([0.05, -0.02, 0.10]))
    assert p["better"] == 2
    assert seed_paired(row, base, lower_is_better=True)["better"] == 1  # NME-like: smaller wins
    assert seed_paired({0: 1.0}, {0: 0.5})["std"] == 0.0
    assert seed_paired({0: 1.0}, {1: 0.5}) is None
