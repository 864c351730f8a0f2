"""The landmarks task: NME / FR / AUC by hand, the Tough → Tolerant → KD-Loss recipe end to end
through run configs with named teachers, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

import protege as pg
from cli_helpers import run_cli
from protege.config import load_config
from protege.errors import ProtegeError
from protege.tasks.landmarks import LandmarkEvaluator, Normalisation, auc_fr, build_landmark_model


def test_evaluator_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(5, 68, 2, generator=g) - 0.5
    pred = target + 0.01 * torch.randn(5, 68, 2, generator=g)
    pred[0] += 0.2  # one failure
    ev = LandmarkEvaluator(with_teacher=True, normalisation=Normalisation.parse(None, 68))
    ev.update({"logits": pred[:3]}, target[:3], {"logits": target[:3] + 0.001})
    ev.update({"logits": pred[3:]}, target[3:], {"logits": target[3:] + 0.001})
    out = ev.compute()
    per_image_io, per_image_ip = [], []
    for p, t in zip(pred.tolist(), target.tolist()):
        p, t = np.array(p), np.array(t)
        err = np.mean([np.linalg.norm(a - b) for a, b in zip(p, t)])
        per_image_io.append(err / np.linalg.norm(t[36] - t[45]))
        per_image_ip.append(err / np.linalg.norm(t[36:42].mean(0) - t[42:48].mean(0)))
    assert out["nme_io"] == pytest.approx(np.mean(per_image_io), rel=1e-5)
    assert out["nme_ip"] == pytest.approx(np.mean(per_image_ip), rel=1e-5)
    assert out["nme"] == out["nme_io"] and out["fr_io"] == pytest.approx(
        np.mean(np.array(per_image_io) > 0.1)
    )
    # AUC: the cumulative error curve integrated numerically on a fine grid
    xs = np.linspace(0, 0.1, 100001)
    ced = [(np.array(per_image_io) <= x).mean() for x in xs]
    assert out["auc_io"] == pytest.approx(np.trapezoid(ced, xs) / 0.1, abs=1e-4)
    assert out["nme_pt/36"] == pytest.approx(
        np.mean(
            [
                np.linalg.norm(p[36] - t[36]) / np.linalg.norm(t[36] - t[45])
                for p, t in zip(pred.numpy(), target.numpy())
            ]
        ),
        rel=1e-5,
    )
    assert sum(1 for k in out if k.startswith("nme_pt/")) == 68
    assert out["teacher/nme"] < 0.01 and out["tnme"] > 0
    assert auc_fr(torch.tensor([0.0, 0.2])) == pytest.approx((0.5, 0.5))


def test_normalisation_bad_input() -> None:
    with pytest.raises(ProtegeError, match="needs its points.*data.options.nme.ocular"):
        Normalisation.parse(None, 21)
    with pytest.raises(ProtegeError, match="needs its points"):
        Normalisation.parse({"norm": "ocular"}, 29)  # COFW: pupils only by default
    assert Normalisation.parse(None, 29).primary == "ip"
    assert Normalisation.parse({"ocular": [0, 3]}, 21).ocular == (0, 3)
    with pytest.raises(ProtegeError, match="not in 0..20"):
        Normalisation.parse({"ocular": [0, 30]}, 21)
    assert Normalisation.parse(None, 98).ocular == (60, 72)


def _base(tmp_path, **kw):
    cfg = {
        "task": "landmarks",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "epochs": 1,
        "progress": False,
        "data": {
            "source": "faces",
            "batch_size": 8,
            "options": {"size": 32, "train": 16, "val": 8, "test": 8},
        },
        "optim": {"name": "adamw", "lr": 1e-3},
        "student": {"model": "resnet8"},
    }
    cfg.update(kw)
    return cfg


def test_tough_tolerant_and_kd_loss_recipe(tmp_path) -> None:
    tough = pg.run(load_config(None, **_base(tmp_path, name="tough", terms=[{"loss": "l2"}])), mode="train")
    assert set(tough["test"]["last"]) >= {"nme_io", "nme_ip", "fr", "auc", "nme_pt/67"}
    soft = _base(tmp_path, name="tol", terms=[{"loss": "wing", "w": 0.04, "epsilon": 0.01}])
    soft["data"]["options"].update(targets="asm", asm_modes=3)
    cfg = load_config(None, **soft)
    data = pg.build.load_run_data(cfg)
    assert data.train.targets is not None and not np.allclose(data.train.targets, data.train.points)
    assert data.val.targets is None  # evaluation stays on the ground truth
    pg.run(cfg, mode="train")
    teachers = [
        {"name": "tough", "model": "resnet8", "weights": str(tmp_path / "runs" / "tough")},
        {"name": "tolerant", "model": "resnet8", "weights": str(tmp_path / "runs" / "tol")},
    ]
    terms = [
        {"loss": "kd_loss", "teacher_index": ["tough", "tolerant"]},
        {"loss": "aloss", "teacher_index": "tolerant", "alpha_pos": 1.8, "alpha_neg": -0.4},
    ]
    cfg = load_config(None, **_base(tmp_path, name="kd", teachers=teachers, terms=terms))
    assert cfg.terms[0].teacher_index == [0, 1] and cfg.terms[1].teacher_index == 1
    data = pg.build.load_run_data(cfg)
    distiller = pg.build.build_distiller(cfg, data)
    # the teachers are the trained runs: their points are what the tough run's model predicts
    batch = torch.utils.data.default_collate([data.val[i] for i in range(4)])
    ref = build_landmark_model("resnet8", pg.build.resolve_weights(teachers[0]["weights"]), {}, 68).eval()
    t0 = list(distiller.teachers.values())[0]
    with torch.no_grad():
        torch.testing.assert_close(t0(batch["image"]), ref(batch["image"]))
    summary = pg.run(cfg, mode="distill")
    test = summary["test"]["last"]
    assert summary["status"] == "completed" and np.isfinite(test["nme"]) and "teacher/nme" in test
    # the report draws the points of the student and both teachers on test images
    html = (cfg.run_dir / "report.html").read_text()
    assert "What the models do" in html and "could not be drawn" not in html
    assert "ground truth (green), student (red), teachers" in html


def test_bad_input_exits_2(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "bad.yaml"

    def fails(cfg, *needles, mode="train"):
        path.write_text(yaml.safe_dump(cfg))
        code, err = run_cli(monkeypatch, capsys, mode, str(path))
        flat = " ".join(err.split())
        assert code == 2 and "Traceback" not in err, err
        for needle in needles:
            assert needle in flat, flat

    cfg = _base(tmp_path, name="x", terms=[{"loss": "l2"}])
    cfg["data"]["options"]["targets"] = "asm"
    cfg["data"]["options"]["asm_modes"] = 40  # 16 training shapes
    fails(cfg, "40 modes asked", "at most 16")
    cfg = _base(tmp_path, name="x", terms=[{"loss": "l2"}])
    cfg["data"]["options"]["nme"] = {"norm": "pupil", "pupil": [[1], [99]]}
    fails(cfg, "point index 99 is not in 0..67")
    cfg = _base(tmp_path, name="x", terms=[{"loss": "l2"}])
    cfg["data"]["source"] = "300W"
    fails(cfg, "not '300W'", "did you mean '300w'")
    cfg = _base(tmp_path, name="x", terms=[{"loss": "kd_loss", "teacher_index": ["tough", "tolerent"]}])
    cfg["teachers"] = [{"name": "tough", "model": "resnet8"}, {"name": "tolerant", "model": "resnet8"}]
    del cfg["student"]
    cfg["student"] = {"model": "resnet8"}
    fails(cfg, "'tolerent' names no teacher", "'tough', 'tolerant'", mode="distill")
    # a model built for other data: 5 points against 68
    (tmp_path / "pts").mkdir()
    model = build_landmark_model("resnet8", None, {}, 5)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "pts" / "five.safetensors"))
    cfg = _base(tmp_path, name="x", terms=[{"loss": "l2"}])
    cfg["student"] = {"model": "resnet8", "weights": str(tmp_path / "pts" / "five.safetensors")}
    fails(cfg, "landmark model with 68 points")


def test_forward_refuses_point_count_and_nan() -> None:
    task = pg.tasks.build_task("landmarks")
    task.num_points = 68
    model = build_landmark_model("resnet8", None, {}, 5).eval()
    with torch.no_grad():  # the head starts at zero: every point at the image centre
        assert torch.equal(model(torch.rand(2, 3, 32, 32)), torch.zeros(2, 5, 2))
    with pytest.raises(ProtegeError, match=r"predicts \(5, 2\) points, the data has \(68, 2\)"):
        task.forward(model, torch.zeros(1, 3, 32, 32))
    bad = torch.zeros(1, 68, 2)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ProtegeError, match="NaN or infinite"):
        task.split({"image": torch.zeros(1, 3, 32, 32), "points": bad})
