"""Several students in one run (shared teacher forward, deep mutual learning) and multi-stage runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import protege as pg
from protege.config import load_config
from protege.core.cohort import Cohort
from protege.errors import ProtegeError
from protege.losses.logits import kd as kd_loss
from protege.models import build_model

MLP8 = {"kwargs": {"input_size": 8}}


def net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))


def tiny_loader(n: int = 48, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_cohort_runs_the_teacher_once_per_batch(tmp_path):
    teacher = net(32, 0)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    cohort = Cohort({"a": net(8, 1), "b": net(16, 2), "c": net(4, 3)}, teacher, [pg.ce(0.5), pg.kd(0.5)])
    loader = tiny_loader()
    cfg = pg.TrainConfig(epochs=2, progress=False, measure_cost=False)
    pg.fit(cohort, loader, None, cfg, tmp_path / "run")
    assert len(loader) * 2 == 6
    assert cohort.teacher_forwards == 6  # 6 batches, 3 students
    assert len(calls) == 6  # no hidden extra forwards either


def test_cohort_losses_match_separate_distillers():
    teacher = net(32, 0)
    a, b = net(8, 1), net(16, 2)
    x, y = next(iter(tiny_loader()))
    cohort = Cohort({"a": a, "b": b}, teacher, [pg.ce(0.3), pg.kd(0.7, T=2)])
    _, losses = cohort((x, y))
    for name, student in (("a", a), ("b", b)):
        _, alone = pg.Distiller(student, teacher, [pg.ce(0.3), pg.kd(0.7, T=2)])((x, y))
        for k, v in alone.items():
            torch.testing.assert_close(losses[f"{name}/{k}"], v)


def test_deep_mutual_learning_terms_and_gradients():
    a, b = net(8, 1), net(16, 2)
    x, y = next(iter(tiny_loader()))
    cohort = Cohort({"a": a, "b": b}, None, [pg.ce()], mutual=2.0, mutual_T=1.0)
    outputs, losses = cohort((x, y))
    assert set(losses) == {"a/ce", "b/ce", "a/dml", "b/dml"}
    za, zb = a(x), b(x)
    torch.testing.assert_close(losses["a/dml"], 2.0 * kd_loss(za, zb.detach(), T=1.0))
    torch.testing.assert_close(losses["b/dml"], 2.0 * kd_loss(zb, za.detach(), T=1.0))
    # the peer is a constant: a's mutual term sends no gradient into b
    losses["a/dml"].backward()
    assert all(p.grad is None for p in b.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())


def test_cohort_errors():
    with pytest.raises(ProtegeError, match="at least two students"):
        Cohort({"a": net(8, 1)}, None, [pg.ce()], mutual=1.0)
    with pytest.raises(ProtegeError, match="no teacher was given"):
        Cohort({"a": net(8, 1), "b": net(8, 2)}, None, [pg.kd()])
    with pytest.raises(ProtegeError, match="names"):
        Cohort({"a.b": net(8, 1)}, None, [pg.ce()])


def test_cohort_resume_matches_straight_run(tmp_path):
    def make() -> Cohort:
        return Cohort({"a": net(8, 1), "b": net(16, 2)}, net(32, 0), [pg.ce(0.5), pg.kd(0.5)], mutual=1.0)

    cfg = pg.TrainConfig(epochs=3, progress=False, measure_cost=False, optim={"lr": 0.1})
    straight = make()
    pg.fit(straight, tiny_loader(), tiny_loader(), cfg, tmp_path / "straight")
    paused = make()
    pg.fit(paused, tiny_loader(), tiny_loader(), cfg, tmp_path / "paused", stop_after_epochs=1)
    resumed = make()
    summary = pg.fit(resumed, tiny_loader(), tiny_loader(), cfg, tmp_path / "paused", resume=True)
    assert summary["status"] == "completed"
    for name in ("a", "b"):
        for p, q in zip(straight.students[name].parameters(), resumed.students[name].parameters()):
            torch.testing.assert_close(p, q)
    assert {"val/a/acc", "val/b/acc", "val/acc"} <= set(summary["final"])
    assert summary["final"]["val/acc"] == pytest.approx(
        (summary["final"]["val/a/acc"] + summary["final"]["val/b/acc"]) / 2
    )


def _base(tmp_path, **extra) -> dict:
    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 64},
        "epochs": 2,
        "progress": False,
        "measure_cost": False,
    }
    cfg.update(extra)
    return cfg


def test_config_students_and_mutual_end_to_end(tmp_path):
    cfg = load_config(
        None,
        **_base(
            tmp_path,
            students=[
                {"model": "mlp_s", "name": "small", **MLP8},
                {"model": "mlp", "name": "big", **MLP8},
            ],
            mutual={"weight": 1.0, "T": 1.0},
            terms=[{"loss": "ce"}],
        ),
    )
    summary = pg.run(cfg, mode="distill")
    assert summary["status"] == "completed"
    assert set(summary["test"]["best"]) == {"small", "big"}
    assert summary["test"]["best"]["small"]["acc"] > 0.5  # two epochs on digits learn something
    for name, spec in (("small", "mlp_s"), ("big", "mlp")):
        model = build_model(spec, num_classes=10, in_chans=1, input_size=8, weights=summary["students"][name])
        state = load_file(f"{summary['students'][name]}/model.safetensors")
        assert set(state) == set(model.state_dict())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"students": [{"model": "mlp_s"}]}, "either 'student' or 'students'"),
        ({"student": None, "students": [{"model": "mlp_s"}, {"model": "mlp_s"}]}, "distinct names"),
        ({"student": None, "students": [{"model": "mlp_s"}], "mutual": {}}, "at least two students"),
        ({"stages": [{"name": "a"}, {"name": "a"}]}, "stage names must be distinct"),
        ({"stages": [{"name": "a", "epoch": 1}]}, "did you mean 'epochs'"),
    ],
)
def test_config_errors(tmp_path, extra, message):
    data = {**_base(tmp_path), "student": {"model": "mlp_s", **MLP8}, **extra}
    with pytest.raises(ProtegeError, match=message):
        load_config(None, **data)


def _stage_config(tmp_path):
    return load_config(
        None,
        **_base(
            tmp_path,
            teacher={"model": "mlp", **MLP8},
            student={"model": "mlp_s", **MLP8},
            stages=[
                {
                    "name": "hint",
                    "epochs": 2,
                    "freeze_student": True,
                    "terms": [
                        {
                            "loss": "fitnet",
                            "name": "hint",
                            "student": "fc:in",
                            "teacher": "fc:in",
                            "adapter": "linear",
                        }
                    ],
                },
                {
                    "name": "main",
                    "epochs": 2,
                    "optim": {"lr": 0.1},
                    "terms": [
                        {"loss": "ce"},
                        {
                            "loss": "fitnet",
                            "name": "hint",
                            "student": "fc:in",
                            "teacher": "fc:in",
                            "adapter": "linear",
                        },
                    ],
                },
            ],
        ),
    )


def test_stages_carry_student_and_term_state(tmp_path):
    cfg = _stage_config(tmp_path)
    summary = pg.run(cfg)
    run_dir = cfg.run_dir
    stage_dir = run_dir / "stages" / "hint"
    assert [s["name"] for s in summary["stages"]] == ["hint", "main"]
    assert all(s["status"] == "completed" for s in summary["stages"])
    # stage 1 trained only the adapter: its student equals the untrained initial student
    hint_ckpt = pg.engine.checkpoint_dir(stage_dir, "last")
    pg.pipeline.set_seed(cfg.seed)  # the run built its student right after seeding
    initial = build_model("mlp_s", num_classes=10, in_chans=1, input_size=8)
    after_stage1 = load_file(hint_ckpt / "model.safetensors")
    for k, v in initial.state_dict().items():
        torch.testing.assert_close(after_stage1[k], v)
    adapter1 = load_file(hint_ckpt / "distiller.safetensors")
    assert any("adapter" in k for k in adapter1)
    # ...and that adapter is where stage 2 started: the hint loss continues from stage 1's value
    m1 = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert m1[-1]["train/hint"] < m1[0]["train/hint"]  # the adapter learned in stage 1
    assert m2[0]["train/hint"] < m1[0]["train/hint"]  # not reset to a fresh adapter
    assert summary["test"]["best"]["acc"] > 0.5
    # resuming a finished multi-stage run retrains nothing
    before = (hint_ckpt / "model.safetensors").stat().st_mtime_ns
    again = pg.run(cfg, resume=True)
    assert (hint_ckpt / "model.safetensors").stat().st_mtime_ns == before
    assert again["stages"][0]["status"] == "completed"
    with pytest.raises(ProtegeError, match="already holds a run"):
        pg.run(cfg)


def test_freeze_student_restores_trainable_set():
    student = net(8, 1)
    student[1].weight.requires_grad_(False)  # the user froze this one
    d = pg.Distiller(student, None, [pg.ce()])
    d.freeze_student()
    d.train()
    assert not student.training and not any(p.requires_grad for p in student.parameters())
    d.freeze_student(False)
    d.train()
    assert student.training
    assert not student[1].weight.requires_grad and student[1].bias.requires_grad
