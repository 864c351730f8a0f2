"""The generation task end to end on sklearn's digits (8×8, offline): a tiny diffusion teacher trained
with ``protege train``, two one-step students distilled with DMD on a class partition (MSD), a PNG
grid from ``protege sample``, and the bad inputs that exit with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

TEACHER = {
    "model": "unet",
    "kwargs": {
        "channels": [8, 16],
        "scheduler": {"name": "DDPMScheduler", "num_train_timesteps": 50, "prediction_type": "v_prediction"},
        "sampler": "DDIMScheduler",
        "steps": 2,
    },
}
DATA = {
    "source": "digits",
    "batch_size": 256,
    "eval_batch_size": 400,
    "options": {"size": 8, "classifier_epochs": 1},
}


def _cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """``protege ARGS`` in this process: its exit status and its stderr (whitespace collapsed)."""
    from protege.cli import main

    monkeypatch.setattr(sys, "argv", ["protege", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, " ".join(capsys.readouterr().err.split())


def _run(config: dict, mode: str = "distill") -> dict:
    from protege.config import validate_config
    from protege.pipeline import run

    return run(validate_config(config), mode=mode)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    patch = pytest.MonkeyPatch()
    patch.setenv("PROTEGE_CACHE", str(root / "cache"))
    common = {"task": "generation", "seed": 0, "epochs": 1, "output_dir": str(root / "runs"), "data": DATA}
    teacher_cfg = {
        **common,
        "name": "teacher",
        "student": TEACHER,
        "terms": [{"loss": "denoising", "name": "denoising"}],
    }
    _run(teacher_cfg, "train")
    msd = {
        **common,
        "name": "msd",
        "teacher": {**TEACHER, "weights": str(root / "runs" / "teacher")},
        "students": [{"name": "a", "model": "one_step"}, {"name": "b", "model": "one_step"}],
        "terms": [{"loss": "dmd", "name": "dmd", "ratio": 1}],
        "optim": {"name": "adam", "lr": 1e-4},
    }
    _run(msd)
    yield root
    patch.undo()


def test_teacher_and_students_train_evaluate_and_export(runs: Path) -> None:
    root = runs
    teacher = json.loads((root / "runs" / "teacher" / "summary.json").read_text())
    assert {"fd_digits", "precision", "recall", "class_consistency"} <= set(teacher["test"]["best"])
    assert (root / "runs" / "teacher" / "model" / "unet" / "config.json").is_file()  # diffusers layout
    msd = json.loads((root / "runs" / "msd" / "summary.json").read_text())
    best = msd["test"]["best"]
    assert "fd_digits" in best and "class_agreement" in best  # one routed model, vs the teacher's samples
    assert {"a", "b"} == set(msd["students"])
    from protege.models.diffusion import ScoreModel

    loaded = ScoreModel.from_pretrained(str(root / "runs" / "teacher" / "model"))
    assert loaded.prediction_type == "v_prediction" and type(loaded.sampler).__name__ == "DDIMScheduler"


def test_sample_writes_a_png_grid(runs: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    out = runs / "grid.png"
    code, err = _cli(
        capsys,
        monkeypatch,
        "sample",
        str(runs / "runs" / "msd"),
        "--class",
        "7",
        "--n",
        "6",
        "--out",
        str(out),
    )
    assert code == 0, err
    with Image.open(out) as img:  # 3 columns x 2 rows of 8-px images, 1-px padding, scaled 4x
        assert img.size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class", "12"], "not one of the data's 10 classes"),
        (["--class", "zebra"], "unknown class"),
        (["--class", "1", "--n", "0"], "at least 1"),
    ],
)
def test_sample_bad_inputs_exit_2(runs: Path, capsys, monkeypatch, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    code, err = _cli(capsys, monkeypatch, "sample", str(runs / "runs" / "msd"), *args)
    assert code == 2 and message in err


def test_bad_runs_are_refused(runs: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from protege.errors import ProtegeError

    common = {"task": "generation", "epochs": 1, "output_dir": str(runs / "runs"), "data": DATA}
    teacher = {**TEACHER, "weights": str(runs / "runs" / "teacher")}
    too_many = {
        **common,
        "name": "k11",
        "teacher": teacher,
        "students": [{"name": f"s{i}", "model": "one_step"} for i in range(11)],
        "terms": [{"loss": "dmd"}],
    }
    with pytest.raises(ProtegeError, match="11 students but only 10 classes"):
        _run(too_many)
    uncovered = {**too_many, "name": "gap", "students": too_many["students"][:2]}
    uncovered["data"] = {**DATA, "options": {**DATA["options"], "partition": {"s0": [0, 1, 2], "s1": [3, 4]}}}
    with pytest.raises(ProtegeError, match=r"no student covers class\(es\) \[5, 6, 7, 8, 9\]"):
        _run(uncovered)
    flow = {**TEACHER, "kwargs": {**TEACHER["kwargs"], "scheduler": {"prediction_type": "flow_prediction"}}}
    bad_type = {
        **common,
        "name": "flow",
        "teacher": flow,
        "student": {"model": "one_step"},
        "terms": [{"loss": "dmd"}],
    }
    with pytest.raises(ProtegeError, match="supports prediction types epsilon, v_prediction, sample"):
        _run(bad_type)
    code, err = _cli(capsys, monkeypatch, "sample", str(runs / "nowhere"), "--class", "1")
    assert code == 2 and "is not a protege run directory" in err


def test_nan_in_the_fake_score_update_stops_with_the_last_good_checkpoint(runs: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from protege.errors import TrainingFailed
    from protege.losses.diffusion import FakeScore

    calls = {"n": 0}
    observe = FakeScore.observe

    def failing(self: FakeScore, outputs, target) -> None:  # type: ignore[no-untyped-def]
        calls["n"] += 1
        observe(self, outputs, target)
        if calls["n"] > 6:  # the dry step and the 5 steps of epoch 1 go through
            self.failure = "fake-score loss nan at update 1 of 1"

    monkeypatch.setattr(FakeScore, "observe", failing)
    cfg = {
        "task": "generation",
        "name": "nan",
        "epochs": 2,
        "output_dir": str(runs / "runs"),
        "data": DATA,
        "teacher": {**TEACHER, "weights": str(runs / "runs" / "teacher")},
        "student": {"model": "one_step"},
        "terms": [{"loss": "dmd", "name": "dmd", "ratio": 1}],
    }
    with pytest.raises(TrainingFailed, match="term 'dmd' = nan"):
        _run(cfg)
    summary = json.loads((runs / "runs" / "nan" / "summary.json").read_text())
    assert summary["status"].startswith("failed") and "epoch_0000" in summary["status"]
    assert summary["checkpoints"]["last"] == "epoch_0000"


def test_report_shows_samples_per_class_of_teacher_and_routed_students(runs: Path) -> None:
    """The run report of a multi-student generation run draws, from the same noise, the teacher's
    N-step samples and the routed one-step students' samples, one row per class; load_run gives the
    routed model that `protege sample` uses too."""
    from protege.analysis.report import build_report
    from protege.pipeline import load_run

    loaded = load_run(runs / "runs" / "msd")
    assert type(loaded.student).__name__ == "RoutedGenerator"
    figures = loaded.task.report_figures(loaded.student, loaded.teachers, loaded.data)
    assert [c.split(",")[0] for c, _ in figures] == ["teacher", "student"]
    assert all(png.startswith(b"\x89PNG") for _, png in figures)
    html = build_report(runs / "runs" / "msd").read_text()
    assert "What the models do" in html and html.count("data:image/png;base64") >= 2
    assert "could not be drawn" not in html


def test_teacher_score_matching_run_starts_a_smaller_one_step_student(runs: Path) -> None:
    """MSD's smaller students: a score_matching run trains a smaller score model against the teacher
    (its TSM loss falls, it is written as a diffusers directory with the teacher's schedule), and a
    one_step student with ``init`` starts from exactly that UNet; a bad ``init`` is refused."""
    import torch

    from protege.errors import ProtegeError
    from protege.tasks import build_task

    common = {"task": "generation", "seed": 0, "output_dir": str(runs / "runs"), "data": DATA}
    teacher = {**TEACHER, "weights": str(runs / "runs" / "teacher")}
    tsm = {
        **common,
        "name": "tsm",
        "epochs": 3,
        "teacher": teacher,
        "student": {"model": "unet", "kwargs": {"channels": [8, 8], "sampler": "DDIMScheduler", "steps": 2}},
        "terms": [{"loss": "score_matching", "name": "tsm"}],
        "optim": {"name": "adam", "lr": 3e-3},
    }
    _run(tsm)
    losses = [
        json.loads(line)["train/tsm"]
        for line in (runs / "runs" / "tsm" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0]
    from protege.models.diffusion import ScoreModel

    pretrained = ScoreModel.from_pretrained(str(runs / "runs" / "tsm" / "model"))
    assert pretrained.prediction_type == "v_prediction"  # the teacher's, though the student named none
    assert tuple(pretrained.unet.config.block_out_channels) == (8, 8)

    task = build_task("generation")
    data = task.load_data({**DATA}, [teacher], [])
    small = task.build_model("one_step", None, {"init": str(runs / "runs" / "tsm")}, data)
    expected = pretrained.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in small.unet.state_dict().items())
    with pytest.raises(ProtegeError, match="is not a diffusers directory"):
        task.build_model("one_step", None, {"init": str(runs / "nowhere")}, data)
    with pytest.raises(ProtegeError, match=r"channels \[16, 16\] differ"):
        task.build_model("one_step", None, {"init": str(runs / "runs" / "tsm"), "channels": [16, 16]}, data)
