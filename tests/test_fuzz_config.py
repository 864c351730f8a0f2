"""Fuzzing run configs through the CLI: every config either reaches ``fit`` (valid) or is refused
with exit code 2, one ``error:`` message, no traceback, and no run directory or any other file
written. The configs come from ``tests/fuzz_configs.py`` (a small valid config, randomly mutated);
``fit`` is a stub, so nothing trains.

``make test`` runs the bounded ``quick`` profile (derandomized: CI sees the same examples every
time); ``make fuzz`` runs the ``fuzz`` profile (``HYPOTHESIS_PROFILE=fuzz``, 1000 fresh examples).
The ``@example`` s are the configs the fuzz found that ended in a traceback or a half-written run;
each names the fix.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given

from fuzz_configs import OUTPUT_DIR, base_config, cases, describe, run_case, verdict
from protege.config import load_config
from protege.errors import ProtegeError


def _with(path: str, value: Any, teacher: bool = True) -> dict[str, Any]:
    """The base config with one value replaced (``path``: dotted, list items by index)."""
    cfg = base_config(OUTPUT_DIR, teacher)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = cfg
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = copy.deepcopy(value)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@given(case=cases())  # examples: the profile of conftest.py (quick, or HYPOTHESIS_PROFILE=fuzz)
# seeds out of NumPy's range: ValueError from set_seed (TrainConfig.seed, DataConfig.split_seed: 0 ... 2**32 - 1)
@example(case=("train", _with("seed", 2**64)))
@example(case=("distill", _with("seed", -1)))
# model kwargs out of range: RuntimeError from the constructor or the first forward (models._build_zoo, MLP)
@example(case=("distill", _with("student.kwargs.input_size", -1)))
@example(case=("distill", _with("student.kwargs.input_size", 10**9)))
@example(case=("distill", _with("teacher.kwargs.dropout", 2)))
# a run name too long for the file system: OSError after runs/ was created (config.DirName)
@example(case=("distill", _with("name", "a" * 300)))
# a NUL byte in a path: ValueError (config.DirPath); a file where the run directory goes (checkpoint.check_writable)
@example(case=("distill", _with("output_dir", "a\x00b")))
@example(case=("train", _with("output_dir", "run.yaml")))
# a loss parameter of the wrong type or too large for torch: TypeError/OverflowError in the loss (core.Term)
@example(case=("distill", _with("terms.1.T", [{"losses": 1.0, "Temperature": {}}])))
@example(case=("distill", _with("terms.1.T", 2**64)))
@example(case=("distill", _with("terms.1.T", math.inf)))
# a batch larger than the DataLoader takes: ValueError from islice (DataConfig.batch_size)
@example(case=("train", _with("data.batch_size", 2**64)))
# teacher_index past the teachers: IndexError in the first step (core.Distiller)
@example(case=("distill", _with("terms.1.teacher_index", 5)))
# a stage's term fails: the run directory was already written (pipeline.run_stages dry-steps every stage)
@example(case=("distill", _with("stages", [{"name": "a", "epochs": 1, "terms": [{"loss": "kd", "T": [1]}]}])))
def test_a_config_reaches_fit_or_is_a_clear_error_that_writes_nothing(case):
    command, cfg = case
    with tempfile.TemporaryDirectory(prefix="protege-fuzz-") as tmp:
        root = Path(tmp)
        outcome = run_case(command, cfg, root)
        result = verdict(outcome)
        assert result in ("valid", "clear"), f"{result}: {describe(outcome)}"
        if result == "clear":
            assert not (root / "cwd" / OUTPUT_DIR).exists() and not outcome.new_files


def test_the_base_config_reaches_fit():
    for command in ("distill", "train"):
        outcome = run_case(command, base_config(OUTPUT_DIR))
        assert verdict(outcome) == "valid" and outcome.fit_calls == 1, describe(outcome)


def test_num_workers_is_bounded():
    """Not fuzzed as a run: 10**9 workers would fork until the machine gives out."""
    with pytest.raises(ProtegeError, match="num_workers: Input should be less than or equal to 256"):
        load_config(None, **_with("data.num_workers", 10**9))


def test_a_resume_whose_checkpoint_does_not_fit_changes_nothing(tmp_path):
    """Found by benchmarks/reliability.py: --override-config with another student wrote the new
    config.yaml and config_changes.jsonl, then fit refused the checkpoint (pipeline.run now checks
    the checkpoint's shapes first, engine.checkpoint.check_fits)."""
    import functools
    from unittest import mock

    from fuzz_configs import run_cli, write_config
    from protege import pipeline

    cfg = {**base_config(str(tmp_path / "runs"), teacher=False), "epochs": 2, "terms": [{"loss": "ce"}]}
    path = write_config(cfg, tmp_path / "run.yaml")
    paused = functools.partial(pipeline.fit, stop_after_epochs=1)
    with mock.patch.object(pipeline, "fit", paused):
        assert run_cli(["train", str(path)], tmp_path, stub_fit=False).code == 0
    run_dir = tmp_path / "runs" / "fuzz"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    args = ["train", str(path), "--resume", "--override-config", "--set", "student.kwargs.hidden_sizes=[7]"]
    outcome = run_cli(args, tmp_path, stub_fit=False)
    err = " ".join(outcome.stderr.split())
    assert outcome.code == 2 and "does not fit this run's models" in err and "layer1.0.weight: [7, 64]" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before
