"""Runs that cannot be corrupted: resume against the stored config, damaged checkpoints, one writer
per run, nothing written before validation, honest exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import protege as pg
from cli_helpers import run_cli as _cli
from protege.config import load_config
from protege.engine.checkpoint import read_pointers, verify_checkpoint
from protege.errors import ProtegeError
from protege.files import exclusive_lock

pytestmark = pytest.mark.usefixtures("one_thread")

MLP8 = {"model": "mlp_s", "kwargs": {"input_size": 8}}


def _cfg(tmp_path: Path, **extra) -> dict:
    cfg = {
        "name": "r",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 128},
        "student": MLP8,
        "epochs": 3,
        "progress": False,
        "measure_cost": False,
        "schedule": {"name": "constant"},
        "optim": {"lr": 0.1},
    }
    cfg.update(extra)
    return cfg


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _train(
    tmp_path: Path, overrides: list[str] = (), resume: bool = False, override_config: bool = False, **extra
):
    cfg = load_config(None, list(overrides), **_cfg(tmp_path, **extra))
    return pg.run(cfg, mode="train", resume=resume, override_config=override_config, report=False)


def _stop_after(monkeypatch, epochs: int):
    from protege import pipeline

    real_fit = pipeline.fit
    monkeypatch.setattr(pipeline, "fit", lambda *a, **kw: real_fit(*a, **kw, stop_after_epochs=epochs))
    return lambda: monkeypatch.setattr(pipeline, "fit", real_fit)


@pytest.fixture
def paused(tmp_path, monkeypatch):
    """A 3-epoch run stopped after 2 epochs, as a preempted job leaves it."""
    restore = _stop_after(monkeypatch, 2)
    _train(tmp_path)
    restore()
    return tmp_path / "runs" / "r"


@pytest.fixture
def two_checkpoints(tmp_path, monkeypatch):
    """A 3-epoch run stopped after 2 epochs whose best checkpoint is the first one (kept beside the last)."""
    restore = _stop_after(monkeypatch, 1)
    _train(tmp_path)
    ckpt = tmp_path / "runs" / "r" / "checkpoints"
    shutil.copytree(ckpt / "epoch_0000", tmp_path / "epoch_0000")
    _train(tmp_path, resume=True)  # one more epoch
    restore()
    shutil.copytree(tmp_path / "epoch_0000", ckpt / "epoch_0000")
    (ckpt / "pointers.json").write_text(json.dumps({"last": "epoch_0001", "best": "epoch_0000"}))
    return tmp_path / "runs" / "r"


def test_resume_refuses_a_changed_config_and_changes_nothing(tmp_path, paused):
    before = _snapshot(paused)
    with pytest.raises(ProtegeError) as refused:
        _train(tmp_path, ["optim.lr=0.05"], resume=True)
    message = str(refused.value)
    assert "optim.lr: 0.1 -> 0.05" in message and "--override-config" in message
    with pytest.raises(ProtegeError, match="epochs: 3 -> 5"):  # cosine: more epochs would move the lr
        _train(tmp_path, ["epochs=5", "schedule.name=cosine"], resume=True)
    assert _snapshot(paused) == before  # config.yaml, metrics, checkpoints: untouched


def test_resume_with_the_same_config_is_exact_and_safe_changes_pass(tmp_path, paused):
    straight = tmp_path / "straight"
    reference = _train(straight)
    summary = _train(tmp_path, ["eval_every=1", "log_every=7"], resume=True)  # logging only: allowed
    assert summary["final"]["val/acc"] == reference["final"]["val/acc"]
    assert summary["final"]["train/loss"] == reference["final"]["train/loss"]
    changes = [json.loads(line) for line in (paused / "config_changes.jsonl").read_text().splitlines()]
    assert changes[0]["from_epoch"] == 3 and [c["key"] for c in changes[0]["changes"]] == ["log_every"]
    assert load_config(paused / "config.yaml").log_every == 7


def test_override_config_applies_the_new_lr_and_records_it(tmp_path, paused):
    summary = _train(tmp_path, ["optim.lr=0.01", "epochs=4"], resume=True, override_config=True)
    assert summary["epochs_completed"] == 4
    lines = [json.loads(line) for line in (paused / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 6) for r in lines] == [0.1, 0.1, 0.01, 0.01]  # constant schedule: lr as set
    change = json.loads((paused / "config_changes.jsonl").read_text())
    assert {c["key"]: (c["old"], c["new"]) for c in change["changes"]} == {
        "optim.lr": (0.1, 0.01),
        "epochs": (3, 4),
    }
    assert change["from_epoch"] == 3
    assert load_config(paused / "config.yaml").optim.lr == 0.01


def test_override_with_another_student_is_a_clear_error(tmp_path, paused):
    with pytest.raises(ProtegeError, match="does not fit this run's models"):
        _train(tmp_path, ["student.kwargs.hidden_sizes=[7]"], resume=True, override_config=True)


def _damage(run_dir: Path, part: str) -> str:
    ckpt = run_dir / "checkpoints"
    last = ckpt / read_pointers(ckpt)["last"]
    if part == "model":
        data = (last / "model.safetensors").read_bytes()
        (last / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif part == "optimizer":
        (last / "optimizer.safetensors").unlink()
    elif part == "trainer":
        data = (last / "trainer.json").read_bytes()
        (last / "trainer.json").write_bytes(data[:20])
    elif part == "pointers":
        (ckpt / "pointers.json").write_text('{"last": "epo')
    return last.name


@pytest.mark.parametrize("part", ["model", "optimizer", "trainer"])
def test_a_damaged_last_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, two_checkpoints, part, capsys
):
    run_dir = two_checkpoints
    damaged = _damage(run_dir, part)
    assert damaged == "epoch_0001" and verify_checkpoint(run_dir / "checkpoints" / damaged) is not None
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "train/lo')  # a line a kill cut in half
    capsys.readouterr()
    summary = _train(tmp_path, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert f"skipped damaged checkpoint {damaged}" in err and "resuming from epoch_0000" in err
    assert "dropped 1 unreadable line" in err
    assert summary["epochs_completed"] == 3
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # epoch 1 trained again from epoch 0's checkpoint


def test_a_damaged_checkpoint_with_nothing_to_fall_back_to_is_a_clear_error(tmp_path, paused):
    _damage(paused, "model")
    with pytest.raises(ProtegeError, match="no intact checkpoint .*model.safetensors has .* bytes"):
        _train(tmp_path, resume=True)


def test_damaged_pointers_are_rebuilt_from_the_checkpoints(tmp_path, paused):
    _damage(paused, "pointers")
    assert read_pointers(paused / "checkpoints")["last"] == "epoch_0001"
    summary = _train(tmp_path, resume=True)
    assert summary["epochs_completed"] == 3


def test_no_intact_checkpoint_is_a_clear_error(tmp_path, paused):
    for folder in (paused / "checkpoints").glob("epoch_*"):
        (folder / "rng.safetensors").write_bytes(b"")
    with pytest.raises(ProtegeError, match="no intact checkpoint .*--overwrite"):
        _train(tmp_path, resume=True)


def test_a_checkpoint_write_killed_halfway_leaves_a_temp_folder_that_is_removed(tmp_path, paused, capsys):
    leftover = paused / "checkpoints" / ".epoch_0002.abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    _train(tmp_path, resume=True)
    assert not leftover.exists()
    assert "a checkpoint write that never finished" in capsys.readouterr().err


def test_one_writer_per_run_directory(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    with exclusive_lock(run_dir):
        with exclusive_lock(run_dir):  # the same process may nest it
            pass
        code = (
            "import sys; from protege.files import exclusive_lock\n"
            "from pathlib import Path\n"
            "try:\n"
            f"    with exclusive_lock(Path({str(run_dir)!r})): pass\n"
            "except Exception as e: print(e); sys.exit(3)\n"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert other.returncode == 3
        assert f"pid {os.getpid()} on" in other.stdout and "one writer per run" in other.stdout
    # released with the block (and by the OS when a holder dies): the next writer gets it
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stdout


def test_a_second_distill_of_the_same_run_is_refused_while_the_first_runs(tmp_path):
    cfg = load_config(None, **_cfg(tmp_path))
    with exclusive_lock(cfg.run_dir):  # another process writing this run
        (cfg.run_dir / "marker").write_text("theirs")
        script = tmp_path / "run.yaml"
        script.write_text(yaml.safe_dump(_cfg(tmp_path)))
        proc = subprocess.run(
            [sys.executable, "-m", "protege.cli", "train", str(script), "--overwrite"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is being written by pid" in " ".join(proc.stderr.split())
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == [".lock", "marker"]


TEACHER = {"model": "cnn_m", "kwargs": {"widths": [8, 16, 16]}}
STUDENT = {"model": "cnn_m", "kwargs": {"widths": [4, 8, 8]}}


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        ([{"loss": "fitnet", "student": "layer2", "teacher": "layer2"}], r"same \(N, \.\.\.\) shape"),
        ([{"loss": "kd", "T": 0}], "temperature T must be positive"),
        ([{"loss": "ickd", "student": "layer1", "teacher": "layer2"}], "number of channels"),
    ],
)
def test_what_fails_the_first_step_fails_before_the_run_directory_exists(tmp_path, terms, message):
    cfg = load_config(None, **_cfg(tmp_path, teacher=TEACHER, student=STUDENT, terms=terms))
    with pytest.raises(ProtegeError, match=message):
        pg.run(cfg, mode="distill", report=False)
    assert not cfg.run_dir.exists()


def test_cli_exit_code_of_a_run_that_went_non_finite_is_1(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, optim={"lr": 1.0e30}, epochs=2)))
    proc = subprocess.run(
        [sys.executable, "-m", "protege.cli", "train", str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "run failed:" in err and "non-finite loss in epoch" in err
    assert "Traceback" not in proc.stderr and "the run is complete" not in proc.stdout


def _image_folder(root: Path, bad: bool = False, val_images: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", val_images)):
        for c in "ab":
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray((rng.random((12, 12, 3)) * 255).astype("uint8")).save(
                    root / split / c / f"{i}.png"
                )
    if bad:
        (root / "train" / "b" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: a\nepochs: 2\nepochs: 3\nstudent: {model: mlp_s}\n", "found the key 'epochs' twice"),
        (b"name: \xe9t\xe9\nstudent: {model: mlp_s}\n", "is not UTF-8 text"),
        (b"student: {model: mlp_s}\nterms: [{loss: ce, weight: -1}]\n", "weight -1.0 is negative"),
        (b"student: {model: mlp_s}\nterms: [{loss: ce, weight: .nan}]\n", "weight must be a finite number"),
        (
            b"data: {source: digits}\nstudent: {model: mlp_s, kwargs: {num_classes: 100, input_size: 8}}\n",
            "kwargs.num_classes is 100, but the data (digits) has 10",
        ),
    ],
)
def test_config_mistakes_are_clear_errors_that_leave_nothing(tmp_path, monkeypatch, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(
        content + f"output_dir: {tmp_path / 'runs'}\nepochs: 1\n".encode()
        if b"epochs" not in content
        else content + f"output_dir: {tmp_path / 'runs'}\n".encode()
    )
    code, err = _cli(monkeypatch, capsys, "train", str(path))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_directory_as_the_config_path_is_a_clear_error(tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "train", str(tmp_path))
    assert code == 2 and "is a directory; give the config file itself" in err


def test_a_negative_weight_is_accepted_when_asked_for(tmp_path):
    cfg = load_config(None, **_cfg(tmp_path, terms=[{"loss": "ce", "weight": -0.5, "allow_negative": True}]))
    assert cfg.terms[0].weight == -0.5 and "allow_negative" not in cfg.terms[0].params


def test_imagefolder_errors_name_the_file_and_the_empty_split(tmp_path, monkeypatch, capsys):
    images = _image_folder(tmp_path / "images", bad=True)
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            _cfg(tmp_path, data={"source": "imagefolder", "root": str(images), "batch_size": 64}, epochs=1)
        )
    )
    code, err = _cli(monkeypatch, capsys, "train", str(path))
    assert code == 2 and "cannot read image" in err and "broken.png" in err and "skip_bad_images" in err
    assert not (tmp_path / "runs").exists()  # found by the first batch, before the run directory
    code, err = _cli(monkeypatch, capsys, "train", str(path), "--set", "data.options.skip_bad_images=true")
    assert code == 0 and "left out 1 unreadable image(s)" in err and "broken.png" in err
    for image in (images / "val").rglob("*.png"):
        image.unlink()
    code, err = _cli(monkeypatch, capsys, "train", str(path), "--overwrite")
    assert code == 2 and f"{images / 'val'} holds no images" in err


def test_reading_a_damaged_checkpoint_is_a_clear_error(tmp_path, paused, monkeypatch, capsys):
    _damage(paused, "model")
    with pytest.raises(ProtegeError, match=r"checkpoint .*epoch_0001 is damaged \(model.safetensors has"):
        pg.evaluate_run(paused, split="val", which="last", latency=False)
    code, err = _cli(monkeypatch, capsys, "evaluate", str(paused))
    assert code == 2 and "is damaged" in err and "Traceback" not in err


def test_a_moved_run_resumes_from_its_new_place(tmp_path, paused):
    moved = tmp_path / "elsewhere"
    shutil.copytree(paused.parent, moved)
    cfg = load_config(None, **_cfg(tmp_path, output_dir=str(moved)))
    summary = pg.run(cfg, mode="train", resume=True, report=False)
    assert summary["epochs_completed"] == 3
    assert load_config(moved / "r" / "config.yaml").output_dir == str(moved)
