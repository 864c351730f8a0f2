"""The engine: exact resume, NaN stop, checkpoints, schedules, gradient accumulation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

import protege as pg
from protege.engine.checkpoint import checkpoint_dir, read_pointers
from protege.engine.loop import lr_factor
from protege.engine.options import ScheduleConfig, TrainConfig
from protege.errors import ProtegeError, TrainingFailed
from protege.tasks import ClassificationTask


@pytest.fixture(scope="module")
def digits():
    return pg.load_data("digits", transforms="augment")


def _distiller(data, seed=0):
    torch.manual_seed(0)  # the teacher stands for fixed, trained weights
    teacher = pg.build_model("mlp", num_classes=10, in_chans=1, input_size=8)
    torch.manual_seed(seed)
    student = pg.build_model("mlp_s", num_classes=10, in_chans=1, input_size=8)
    return pg.Distiller(student, teacher, [pg.ce(0.5), pg.kd(0.5, T=4.0)])


def _cfg(**kw):
    base = dict(
        epochs=2,
        progress=False,
        measure_cost=False,
        optim={"lr": 0.1},
        schedule={"name": "cosine", "warmup_epochs": 0.5},
    )
    base.update(kw)
    return TrainConfig(**base)


def _loaders(data):
    return pg.make_loader(data.train, 64, shuffle=True, seed=3), pg.make_loader(data.val, 256, shuffle=False)


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_matches_straight_run(tmp_path, digits):
    cfg = _cfg()
    straight = _distiller(digits)
    pg.fit(straight, *_loaders(digits), cfg, tmp_path / "a")

    first = _distiller(digits)
    s1 = pg.fit(first, *_loaders(digits), cfg, tmp_path / "b", stop_after_epochs=1)
    assert s1["status"].startswith("paused after epoch 1")
    second = _distiller(digits, seed=123)  # a fresh process would build it anew
    pg.fit(second, *_loaders(digits), cfg, tmp_path / "b", resume=True)

    a, b = _lines(tmp_path / "a"), _lines(tmp_path / "b")
    assert [r["epoch"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "train/kd", "val/acc", "val/kl", "lr"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), key
    for (k, va), vb in zip(straight.student.state_dict().items(), second.student.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_resuming_a_finished_run_says_so_and_keeps_it(tmp_path, digits, capsys):
    cfg = _cfg(epochs=1)
    pg.fit(_distiller(digits), *_loaders(digits), cfg, tmp_path / "run")
    before = (_lines(tmp_path / "run"), read_pointers(tmp_path / "run" / "checkpoints"))
    capsys.readouterr()
    summary = pg.fit(_distiller(digits, seed=7), *_loaders(digits), cfg, tmp_path / "run", resume=True)
    assert "run: finished (1 of 1 epochs), nothing to resume" in capsys.readouterr().err
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    assert (_lines(tmp_path / "run"), read_pointers(tmp_path / "run" / "checkpoints")) == before


class _NaNAfterFirstPass(Dataset):
    def __init__(self, base):
        self.base, self.reads = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        x, y = self.base[i]
        return (x * math.nan if self.reads > len(self.base) else x), y


def test_nan_loss_fails_the_run_and_keeps_last_good_checkpoint(tmp_path, digits):
    d = _distiller(digits)
    train = pg.make_loader(_NaNAfterFirstPass(digits.train), 64, shuffle=True)
    with pytest.raises(TrainingFailed) as failed:
        pg.fit(
            d, train, pg.make_loader(digits.val, 256, False), _cfg(epochs=3, log_every=5), tmp_path / "run"
        )
    # the exact step (the check runs every 5 steps), the terms, and what is on disk
    message = str(failed.value)
    assert (
        f"epoch 2, step 1 of {len(train)}" in message and "'ce' = nan" in message and "'kd' = nan" in message
    )
    assert "checkpoint epoch_0000 (epoch 1, the last good one" in message
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"].startswith("failed: non-finite loss in epoch 2, step 1")
    assert summary["epochs_completed"] == 1
    assert read_pointers(tmp_path / "run" / "checkpoints")["last"] == "epoch_0000"
    assert all(torch.isfinite(p).all() for p in d.student.parameters())
    assert len(_lines(tmp_path / "run")) == 1


def test_nan_loss_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, digits):
    d = _distiller(digits)
    bad = _NaNAfterFirstPass(digits.train)
    bad.reads = len(digits.train)  # NaN from the first read on
    train = pg.make_loader(bad, 64, shuffle=True)
    with pytest.raises(TrainingFailed, match=r"epoch 1, step 1 of .*On disk: no checkpoint"):
        pg.fit(d, train, None, _cfg(epochs=2, log_every=3), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not read_pointers(
        tmp_path / "run" / "checkpoints"
    )


def test_checkpoint_is_safetensors_and_loads_into_build_model(tmp_path, digits):
    d = _distiller(digits)
    pg.fit(d, *_loaders(digits), _cfg(epochs=1), tmp_path / "run")
    ckpt = checkpoint_dir(tmp_path / "run", "best")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == sorted(
        [
            "manifest.json",
            "model.safetensors",
            "optimizer.safetensors",
            "optimizer.json",
            "rng.safetensors",
            "trainer.json",
        ]
    )
    assert not list((tmp_path / "run" / "checkpoints").glob(".*")), "no temporary leftovers"
    reloaded = pg.build_model("mlp_s", num_classes=10, in_chans=1, input_size=8, weights=str(ckpt))
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(reloaded.eval()(x), d.student.eval()(x))
    from_run = pg.build_model("mlp_s", num_classes=10, in_chans=1, input_size=8, weights=tmp_path / "run")
    assert torch.allclose(from_run.eval()(x), reloaded(x))  # a run directory means its best checkpoint
    assert set(load_file(ckpt / "model.safetensors")) == set(d.student.state_dict())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["val/acc"] >= summary["final"]["val/acc"]


def test_refuses_to_overwrite_or_resume_wrongly(tmp_path, digits):
    d = _distiller(digits)
    with pytest.raises(ProtegeError, match="no checkpoint"):
        pg.fit(d, *_loaders(digits), _cfg(epochs=1), tmp_path / "run", resume=True)
    pg.fit(d, *_loaders(digits), _cfg(epochs=1), tmp_path / "run")
    with pytest.raises(ProtegeError, match="--resume"):
        pg.fit(d, *_loaders(digits), _cfg(epochs=1), tmp_path / "run")


def test_lr_schedules():
    cos = ScheduleConfig(name="cosine", warmup_epochs=1)
    assert lr_factor(0, 10, 5, cos) == 0.0
    assert lr_factor(5, 10, 5, cos) == pytest.approx(0.5)
    assert lr_factor(10, 10, 5, cos) == pytest.approx(1.0)
    assert lr_factor(30, 10, 5, cos) == pytest.approx(0.5)  # halfway through the cosine part
    assert lr_factor(50, 10, 5, cos) == pytest.approx(0.0, abs=1e-12)
    multi = ScheduleConfig(name="multistep", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(e * 10, 10, 6, multi) for e in (0, 2, 3, 4)] == pytest.approx([1, 0.1, 0.1, 0.01])
    step = ScheduleConfig(name="step", step_size=3, gamma=0.5)
    assert lr_factor(35, 10, 9, step) == pytest.approx(0.5)


class _Fixed(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    results = []
    for batch, accum in ((32, 1), (16, 2)):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        d = pg.Distiller(model)
        cfg = _cfg(
            epochs=1,
            grad_accum=accum,
            optim={"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
            schedule={"name": "constant"},
        )
        pg.fit(d, pg.make_loader(_Fixed(), batch, shuffle=False), None, cfg, tmp_path / f"b{batch}")
        results.append(model.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_tensorboard_tracker_writes_events(tmp_path, digits):
    d = _distiller(digits)
    pg.fit(d, *_loaders(digits), _cfg(epochs=1, trackers=["tensorboard"]), tmp_path / "run")
    assert list((tmp_path / "run").rglob("events.out.tfevents*")), "TensorBoard event file expected"


def test_bf16_autocast_on_cpu(tmp_path, digits):
    d = _distiller(digits)
    summary = pg.fit(d, *_loaders(digits), _cfg(epochs=1, mixed_precision="bf16", cpu=True), tmp_path / "run")
    assert summary["mixed_precision"] == "bf16"
    assert math.isfinite(summary["final"]["train/loss"]) and summary["final"]["val/acc"] > 0.1
    assert all(p.dtype == torch.float32 for p in d.student.parameters())  # master weights stay fp32


def test_without_validation_best_is_the_last_epoch(tmp_path, digits):
    d = _distiller(digits)
    summary = pg.fit(d, _loaders(digits)[0], None, _cfg(epochs=2), tmp_path / "run")
    assert summary["best"]["epoch"] == summary["final"]["epoch"] == 1
    assert read_pointers(tmp_path / "run" / "checkpoints") == {"last": "epoch_0001", "best": "epoch_0001"}


def test_evaluate_runs_teachers_frozen(digits):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    teacher[2].running_mean.fill_(0.5)  # running statistics that differ from any batch's
    teacher[2].running_var.fill_(4.0)
    teacher.train()  # as build_model returns it
    before = teacher[2].running_mean.clone()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    loader = pg.make_loader(digits.val, 64, shuffle=False)
    metrics = pg.evaluate(student, loader, ClassificationTask(), [teacher])
    with torch.no_grad():
        xs, ys = zip(*[(x, y) for x, y in loader])
        frozen = teacher.eval()(torch.cat(xs))
    assert metrics["teacher_acc"] == pytest.approx((frozen.argmax(-1) == torch.cat(ys)).float().mean().item())
    assert torch.equal(teacher[2].running_mean, before)


def test_evaluate_keeps_teacher_logits_only_within_the_memory_cap(digits, monkeypatch):
    from protege.engine import loop

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    loader = pg.make_loader(digits.val, 64, shuffle=False)
    reference = pg.evaluate(student, loader, ClassificationTask(), [teacher])
    n = len(calls)
    cache: list[torch.Tensor] = []
    assert pg.evaluate(student, loader, ClassificationTask(), [teacher], teacher_cache=cache) == reference
    assert len(cache) == n and len(calls) == 2 * n  # filled on first use
    assert pg.evaluate(student, loader, ClassificationTask(), [teacher], teacher_cache=cache) == reference
    assert len(calls) == 2 * n  # read back: the teacher did not run
    monkeypatch.setattr(loop, "TEACHER_CACHE_BYTES", 64 * 10 * 4 + 1)  # room for one batch only
    small: list[torch.Tensor] = []
    assert pg.evaluate(student, loader, ClassificationTask(), [teacher], teacher_cache=small) == reference
    assert small == []  # dropped once over the cap; the next evaluation runs the teacher again
    assert pg.evaluate(student, loader, ClassificationTask(), [teacher], teacher_cache=small) == reference
    assert len(calls) == 4 * n
