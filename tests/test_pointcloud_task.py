"""Part segmentation's task and evaluator, and point-cloud runs (classification and parts) end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import protege as pg
from cli_helpers import run_cli
from protege.caching import build_cache
from protege.config import load_config
from protege.errors import ProtegeError
from protege.tasks import build_task
from protege.tasks.pointcloud import PartsEvaluator

# train: a multiple of the batch size (RKD needs at least 2 clouds in every batch)
DATA = {"batch_size": 8, "options": {"num_points": 64, "train": 32, "val": 17, "test": 17}}


def _onehot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).float()


def test_evaluator_by_hand():
    # two categories: 0 owns parts {0, 1}, 1 owns parts {2, 3, 4}
    ev = PartsEvaluator([[0, 1], [2, 3, 4]], with_teacher=True)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 3, 3]])
    logits = _onehot(pred, 5)
    logits[0, :, 3] = 9.0  # part 3 is not a part of category 0: ignored by the restricted arg-max
    student = {"logits": logits.reshape(8, 5), "category": torch.tensor([0, 1])}
    teacher = {"logits": _onehot(target, 5).reshape(8, 5)}
    ev.update(student, target.reshape(-1), teacher)
    out = ev.compute()
    shape0 = (1 / 2 + 2 / 3) / 2  # part 0: 1 of 2; part 1: 2 of 3
    shape1 = 1.0  # parts 2 and 3 exact, part 4 absent from both: 1
    assert out["instance_miou"] == pytest.approx((shape0 + shape1) / 2)
    assert out["class_miou"] == pytest.approx((shape0 + shape1) / 2)
    assert out["acc"] == pytest.approx(7 / 8)
    assert out["teacher/class_miou"] == pytest.approx(1.0) and out["agreement"] == pytest.approx(7 / 8)


def test_split_and_forward_flatten_points():
    task = build_task("pointcloud_parts")
    batch = {
        "points": torch.randn(2, 16, 3),
        "parts": torch.randint(0, 4, (2, 16)),
        "category": torch.tensor([0, 1]),
    }
    inputs, target = task.split(batch)
    assert target.shape == (32,)
    model = pg.build_model("pointnet", num_classes=4, head="parts", width=0.25).eval()
    out = task.forward(model, inputs)
    assert out["logits"].shape == (32, 4) and out["category"].tolist() == [0, 1]
    with pytest.raises(ProtegeError, match="one label per point"):
        task.split({**batch, "parts": torch.zeros(2, 15, dtype=torch.long)})
    with pytest.raises(ProtegeError, match="head: parts"):
        task.forward(pg.build_model("pointnet", num_classes=4, width=0.25).eval(), inputs)


def _cfg(tmp_path, name, task, student, **extra):
    return {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "task": task,
        "seed": 0,
        "epochs": 1,
        "cpu": True,
        "progress": False,
        "data": {"source": "shapes3d", **DATA},
        "student": student,
        "optim": {"name": "adamw", "lr": 0.002},
        **extra,
    }


def test_classification_and_parts_runs_with_pointdistiller(tmp_path):
    teacher = {"model": "dgcnn", "kwargs": {"k": 8, "width": 0.25}}
    s = pg.run(
        load_config(None, **_cfg(tmp_path, "t", "classification", teacher)), mode="train", report=False
    )
    assert s["status"] == "completed" and 0 <= s["test"]["last"]["acc"] <= 1
    terms = [
        {"loss": "ce"},
        {"loss": "kd", "weight": 0.5},
        {"loss": "pointdistiller", "student": "mlp3", "teacher": "edge2", "k": 8, "num_points": 16},
        {"loss": "fitnet", "student": "mlp3", "teacher": "edge2", "adapter": "linear"},
        {"loss": "rkd", "student": "pool", "teacher": "pool"},
    ]
    cfg = _cfg(
        tmp_path,
        "s",
        "classification",
        {"model": "pointnet", "kwargs": {"width": 0.125}},
        teacher={**teacher, "weights": str(tmp_path / "runs" / "t")},
        terms=terms,
    )
    s = pg.run(load_config(None, **cfg), mode="distill", report=False)
    assert s["status"] == "completed" and s["test"]["last"]["teacher_acc"] >= 0

    # the same run from the teacher's output cache (fixed clouds, no random transform: one view each)
    # computes bit for bit what the online run computed, every loss of every epoch and every test metric
    cache = {"path": str(tmp_path / "cache"), "views": 1, "taps": ["edge2", "pool"], "dtype": "float32"}
    build_cache(load_config(None, **{**cfg, "cache": cache}))
    c = pg.run(load_config(None, **{**cfg, "name": "c", "cache": cache}), mode="distill", report=False)
    assert c["test"] == s["test"]

    def losses(name: str) -> list[dict]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]

    assert losses("c") == losses("s") and "train/pointdistiller:mlp3" in losses("c")[0]

    parts = {"model": "pointnet2", "kwargs": {"k": 8, "width": 0.125}}
    cfg = _cfg(
        tmp_path,
        "p",
        "pointcloud_parts",
        parts,
        teacher={"model": "pointnet2", "kwargs": {"k": 8, "width": 0.25}},
        terms=[
            {"loss": "ce"},
            {"loss": "kd"},
            {"loss": "pointdistiller", "student": "sa1", "teacher": "sa1", "k": 4},
        ],
    )
    with pytest.raises(ProtegeError, match="not part segmentation"):  # per-point targets: online only
        build_cache(load_config(None, **{**cfg, "cache": {"path": str(tmp_path / "pc"), "views": 1}}))
    assert not (tmp_path / "pc").exists()
    s = pg.run(load_config(None, **cfg), mode="distill", report=True)
    test = s["test"]["last"]
    assert s["status"] == "completed"
    assert 0 < test["class_miou"] <= 1 and 0 < test["instance_miou"] <= 1 and "agreement" in test
    html = (tmp_path / "runs" / "p" / "report.html").read_text()  # the parts of test shapes, drawn
    assert (
        "points coloured by part: ground truth, student, teacher" in html and "could not be drawn" not in html
    )


def test_bad_input_exits_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.yaml"
    student = {"model": "dgcnn", "kwargs": {"k": 80, "width": 0.125}}  # more neighbours than points
    path.write_text(yaml.safe_dump(_cfg(tmp_path, "k", "classification", student)))
    code, err = run_cli(monkeypatch, capsys, "train", str(path))
    assert code == 2 and "fewer than the 80" in err and "Traceback" not in err

    cfg = _cfg(
        tmp_path,
        "tap",
        "classification",
        {"model": "pointnet", "kwargs": {"width": 0.125}},
        teacher={"model": "pointnet", "kwargs": {"width": 0.25}},
        terms=[{"loss": "pointdistiller", "student": "pool", "teacher": "pool"}],
    )
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "distill", str(path))
    assert code == 2 and "per-point features (B, N, C)" in err

    cfg = _cfg(tmp_path, "src", "pointcloud_parts", {"model": "pointnet"})
    cfg["data"]["source"] = "mnist5k"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "train", str(path))
    assert code == 2 and "reads data.source shapes3d or shapenetpart" in err


def test_the_report_of_a_point_cloud_run_builds_and_skips_the_image_probes(tmp_path):
    """A classification report with a baseline runs the image probes (localization maps, invariance,
    adversarial transfer) only on image inputs: point clouds get the rest and a note saying why."""
    from protege.analysis.report import build_report

    teacher = {"model": "pointnet", "kwargs": {"width": 0.25}}
    pg.run(load_config(None, **_cfg(tmp_path, "t", "classification", teacher)), mode="train", report=False)
    student = {"model": "pointnet", "kwargs": {"width": 0.125}}
    pg.run(load_config(None, **_cfg(tmp_path, "base", "classification", student)), mode="train", report=False)
    cfg = _cfg(
        tmp_path, "s", "classification", student,
        teacher={**teacher, "weights": str(tmp_path / "runs" / "t")}, terms=[{"loss": "ce"}, {"loss": "kd"}],
    )  # fmt: skip
    pg.run(load_config(None, **cfg), mode="distill", report=False)
    html = build_report(tmp_path / "runs" / "s").read_text()
    assert "Representation similarity" in html and "The probes read images" in html


def test_validation_through_accelerate_keeps_every_point_of_a_partial_last_batch():
    """accelerate's gather_for_metrics trims the last batch to its samples; per-point logits (B*N rows)
    must be trimmed by cloud, not by row: the loop's validation equals a plain pass over the split."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from protege.engine.loop import evaluate
    from protege.tasks.pointcloud import load_parts_data

    data = load_parts_data({"source": "shapes3d", **DATA})
    task = build_task("pointcloud_parts", data)
    torch.manual_seed(0)
    model = pg.build_model("pointnet", num_classes=data.num_classes, width=0.25, head="parts")
    plain = evaluate(model, DataLoader(data.val, batch_size=17), task)
    acc = Accelerator(cpu=True)
    loader = acc.prepare(DataLoader(data.val, batch_size=5))  # 17 clouds: the last batch holds 2
    gathered = evaluate(model, loader, task, accelerator=acc)
    assert gathered["acc"] == pytest.approx(plain["acc"]) and 0 < plain["acc"] < 1
    assert gathered["class_miou"] == pytest.approx(plain["class_miou"])
    assert task.batch_size({"points": torch.zeros(3, 64, 3), "category": torch.zeros(3)}) == 3
