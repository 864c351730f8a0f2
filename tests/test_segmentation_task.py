"""The promptable-segmentation task: prompts, hard-prompt sampling, the evaluator, a full run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import protege as pg
from cli_helpers import run_cli
from protege.config import load_config
from protege.data.segmentation import SegmentationImages, error_points, instance_masks, interior_point
from protege.errors import ProtegeError
from protege.models.sam import build_sam, sam_student
from protege.tasks import build_task
from protege.tasks.segmentation import (
    BOX,
    ONE_POINT,
    PAD,
    POINTS,
    PromptedImages,
    PromptSettings,
    SegmentationEvaluator,
    mask_iou,
)

SIZE = 64


@pytest.fixture(scope="module")
def images() -> SegmentationImages:
    return SegmentationImages(6, size=SIZE, seed=3, split="train", max_objects=3, kinds=("shapes",))


def test_prompt_settings_validation() -> None:
    assert PromptSettings.parse(None) == PromptSettings()
    with pytest.raises(ProtegeError, match="did you mean 'rounds'"):
        PromptSettings.parse({"round": 2})
    with pytest.raises(ProtegeError, match="sampler must be one of uniform, hard"):
        PromptSettings.parse({"sampler": "mined"})
    with pytest.raises(ProtegeError, match="empty prompt list"):
        PromptSettings.parse({"point_prompts": 0, "box_prompts": 0})
    assert PromptSettings.parse({"sampler": "hard", "rounds": 3}).slots == 4


def test_eval_prompts_are_fixed_and_point_at_each_object(images: SegmentationImages) -> None:
    data = PromptedImages(images, PromptSettings(eval_points=3), train=False, max_objects=3, seed=0)
    a, b = data[1], data[1]
    for key in ("points", "labels", "boxes", "masks", "mode"):
        assert torch.equal(a[key], b[key])  # the same prompts every evaluation
    masks = torch.as_tensor(instance_masks(np.asarray(images[1]["instances"])))
    k = masks.shape[0]
    assert k >= 1
    mode = a["mode"]
    assert (
        (mode[:k] == ONE_POINT).all() and (mode[3 : 3 + k] == POINTS).all() and (mode[6 : 6 + k] == BOX).all()
    )
    assert (mode[k:3] == PAD).all()
    for o in range(k):
        assert torch.equal(a["masks"][o], masks[o]) and torch.equal(a["masks"][6 + o], masks[o])
        x, y = a["points"][o, 0].tolist()
        assert (x, y) == tuple(float(v) for v in interior_point(masks[o].numpy()))
        assert a["labels"][o].tolist() == [1, -1, -1]
        # every point of the several-point prompt lies inside its object
        for px, py in a["points"][3 + o].tolist():
            assert masks[o][int(py), int(px)]
        x0, y0, x1, y1 = a["boxes"][o].tolist()
        rows, cols = torch.nonzero(masks[o], as_tuple=True)
        assert (x0, y0, x1, y1) == (
            cols.min().item(),
            rows.min().item(),
            cols.max().item() + 1,
            rows.max().item() + 1,
        )


def test_train_prompts_point_inside_their_target(images: SegmentationImages) -> None:
    torch.manual_seed(0)
    data = PromptedImages(
        images, PromptSettings(point_prompts=5, box_prompts=2, max_points=3), train=True, max_objects=3
    )
    item = data[0]
    assert (
        item["points"].shape == (5, 3, 2)
        and item["boxes"].shape == (2, 4)
        and item["masks"].shape == (7, SIZE, SIZE)
    )
    for p in range(5):
        used = item["labels"][p] == 1
        assert used[0] and (item["labels"][p][~used] == -1).all()
        for x, y in item["points"][p][used].tolist():
            assert item["masks"][p][int(y), int(x)]
        assert item["mode"][p] == (ONE_POINT if used.sum() == 1 else POINTS)
    assert (item["mode"][5:] == BOX).all()


def test_error_points_lie_where_masks_disagree() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.zeros(3, 8, 8, dtype=torch.bool)
    ref = torch.zeros(3, 8, 8, dtype=torch.bool)
    pred[0, :4] = True  # a false positive region only
    ref[1, 2:5, 2:5] = True  # a missed region only
    for _ in range(50):
        xy, label, found = error_points(pred, ref, g)
        assert found.tolist() == [True, True, False]
        x, y = xy[0].tolist()
        assert pred[0, int(y), int(x)] and label[0] == 0
        x, y = xy[1].tolist()
        assert ref[1, int(y), int(x)] and label[1] == 1


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = build_sam("tiny", img_size=SIZE).eval()
    student = sam_student("cnn", from_model=teacher)
    return teacher, student


def test_hard_sampling_adds_a_teacher_labelled_point_where_the_models_disagree(
    images: SegmentationImages,
) -> None:
    teacher, student = _models()
    settings = PromptSettings(point_prompts=3, box_prompts=1, sampler="hard", rounds=1)
    data = PromptedImages(images, settings, train=True, max_objects=3)
    torch.manual_seed(1)
    batch = torch.utils.data.default_collate([data[i] for i in range(2)])
    task = build_task("promptable_segmentation")
    task.settings = settings
    student.train()
    out = task.refine_batch(batch, student, [teacher])
    assert student.training  # restored
    with torch.no_grad():
        t = (
            teacher.upscale(
                teacher.decode(teacher.encode(batch["image"]), batch["points"], batch["labels"])["masks"][
                    :, :, 0
                ]
            )
            > 0
        )
        student.eval()
        s = (
            student.upscale(
                student.decode(student.encode(batch["image"]), batch["points"], batch["labels"])["masks"][
                    :, :, 0
                ]
            )
            > 0
        )
    added = 0
    for b in range(2):
        for p in range(3):
            before = int((batch["labels"][b, p] != -1).sum())
            after = int((out["labels"][b, p] != -1).sum())
            assert after - before in (0, 1)
            if after > before:
                added += 1
                x, y = out["points"][b, p, before].tolist()
                r, c = int(y), int(x)
                assert s[b, p, r, c] != t[b, p, r, c]  # where student and teacher disagree
                assert out["labels"][b, p, before] == int(t[b, p, r, c])  # labelled by the teacher
                assert out["mode"][b, p] == POINTS
            else:
                assert torch.equal(s[b, p], t[b, p])
    assert added > 0
    assert torch.equal(out["boxes"], batch["boxes"]) and torch.equal(out["masks"], batch["masks"])
    # the uniform sampler leaves the batch as it is
    task.settings = PromptSettings()
    assert task.refine_batch(batch, student, [teacher]) is batch


def test_evaluator_perfect_and_padded_prompts() -> None:
    target = torch.zeros(1, 4, 16, 16, dtype=torch.bool)
    target[0, 0, 2:8, 2:8] = True
    target[0, 1, 2:8, 2:8] = True
    target[0, 2, 8:14, 8:14] = True
    logits = torch.where(target, 10.0, -10.0)[..., ::2, ::2]  # low-res: half the size
    mode = torch.tensor([[ONE_POINT, POINTS, BOX, PAD]])
    ev = SegmentationEvaluator(with_teacher=True)
    wrong = logits.clone()
    wrong[0, 2] = -10.0  # the teacher misses the box object
    ev.update({"logits": logits, "iou": torch.ones(1, 4), "mode": mode}, target, {"logits": wrong})
    m = ev.compute()
    assert (
        m["miou_1pt"] == pytest.approx(1.0)
        and m["miou_3pt"] == pytest.approx(1.0)
        and m["miou_box"] == pytest.approx(1.0)
    )
    assert m["miou"] == pytest.approx(1.0) and m["iou_mae"] == pytest.approx(0.0)
    assert m["tmiou_box"] == pytest.approx(0.0) and m["teacher/miou_box"] == pytest.approx(0.0)
    assert m["tmiou_1pt"] == pytest.approx(1.0)
    assert mask_iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0


def _config(tmp_path, **extra) -> dict:
    cfg = {
        "name": "seg",
        "output_dir": str(tmp_path / "runs"),
        "task": "promptable_segmentation",
        "seed": 0,
        "epochs": 1,
        "cpu": True,
        "progress": False,
        "data": {
            "source": "composites",
            "batch_size": 4,
            "options": {
                "size": SIZE,
                "train": 8,
                "val": 4,
                "test": 4,
                "max_objects": 2,
                "kinds": ["shapes"],
                "prompts": {"point_prompts": 2, "box_prompts": 1, "sampler": "hard", "rounds": 2},
            },
        },
        "teacher": {"model": "sam", "kwargs": {"variant": "tiny", "img_size": SIZE}},
        "student": {"model": "sam_student", "kwargs": {"encoder": "cnn"}},
        "optim": {"name": "adamw", "lr": 0.001},
    }
    cfg.update(extra)
    return cfg


def test_full_stage_run_with_stages_and_hard_prompts(tmp_path) -> None:
    terms_full = [
        {"loss": "fitnet", "name": "embedding", "student": "embedding", "teacher": "embedding"},
        {"loss": "fitnet", "name": "tokens", "student": "tokens", "teacher": "tokens"},
        {"loss": "mask_kd"},
        {"loss": "sam_gt"},
    ]
    cfg = _config(
        tmp_path,
        stages=[
            {"name": "encoder", "terms": terms_full[:1]},
            {"name": "full", "terms": terms_full},
        ],
    )
    summary = pg.run(load_config(None, **cfg), mode="distill", report=True)
    run = tmp_path / "runs" / "seg"
    assert summary["status"] == "completed"
    test = summary["test"]["last"]
    for key in ("miou_1pt", "miou_3pt", "miou_box", "tmiou_box", "teacher/miou_1pt", "miou", "iou_mae"):
        assert 0.0 <= test[key] <= 1.0 or key == "iou_mae"
    html = (run / "report.html").read_text()
    assert "What the models do" in html and "one-point prompts" in html and "could not be drawn" not in html
    stages = json.loads((run / "summary.json").read_text())
    assert stages["status"] == "completed"


def test_stage_one_trains_the_encoder_only(images: SegmentationImages) -> None:
    """MobileSAM's decoupled stage: with only the embedding term the decoder receives no gradient."""
    teacher, student = _models()
    task = build_task("promptable_segmentation")
    distiller = pg.Distiller(
        student, teacher, terms=[pg.term("fitnet", student="embedding", teacher="embedding")], task=task
    )
    data = PromptedImages(images, PromptSettings(), train=True, max_objects=3)
    batch = torch.utils.data.default_collate([data[i] for i in range(2)])
    distiller.train()
    _, losses = distiller(batch)
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in student.mask_decoder.parameters())
    assert all(p.grad is None or not p.grad.any() for p in student.prompt_encoder.parameters())
    grads = [p.grad for p in student.image_encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_bad_input_exits_2(tmp_path, monkeypatch, capsys) -> None:
    cfg = _config(tmp_path, terms=[{"loss": "mask_kd"}])
    cfg["data"]["options"]["prompts"] = {"sampler": "mined"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "distill", str(path))
    assert code == 2 and "sampler must be one of uniform, hard" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "seg").exists()

    cfg = _config(tmp_path, terms=[{"loss": "mask_kd"}], teacher={"model": "resnet18"})
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "distill", str(path))
    assert code == 2 and "sam_student is built against the run's teacher" in err and "model: sam" in err

    cfg = _config(tmp_path, terms=[{"loss": "mask_kd"}], student={"model": "sam_studnet"})
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "distill", str(path))
    assert (
        code == 2
        and "builds models sam, sam_student, not 'sam_studnet'" in err
        and "did you mean 'sam_student'" in err
    )

    cfg = _config(tmp_path, terms=[{"loss": "mask_kd"}], cache={"path": str(tmp_path / "cache")})
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "cache", str(path))
    assert code == 2 and "cannot serve promptable_segmentation" in err

    # hard prompts need one student and a live teacher: a cohort or a run without teacher terms is refused
    cfg = _config(tmp_path, terms=[{"loss": "mask_kd"}])  # sampler: hard
    del cfg["student"]
    cfg["students"] = [{"name": n, "model": "sam_student", "kwargs": {"encoder": "cnn"}} for n in ("a", "b")]
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "distill", str(path))
    assert code == 2 and "hard-prompt sampling" in err and "several students" in err.replace("\n", " ")
    assert not (tmp_path / "runs" / "seg").exists()
    cfg = _config(tmp_path, terms=[{"loss": "sam_gt"}])
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(monkeypatch, capsys, "distill", str(path))
    assert code == 2 and "no term reads the teacher" in err.replace("\n", " ")
    code, err = run_cli(monkeypatch, capsys, "train", str(path))
    assert code == 2 and "'train' mode" in err.replace("\n", " ")


def test_multimask_outputs_are_trained_by_their_own_terms(tmp_path) -> None:
    """prompts.multimask: the task also returns SAM's three masks per prompt; SAM's min-over-masks
    loss and the teacher's multimask logits train the three mask tokens, the single-mask term the
    first, all from one decoder pass; the evaluation still reads the single-mask output."""
    cfg = _config(tmp_path, terms=[
        {"loss": "sam_gt"},
        {"loss": "sam_gt", "name": "multimask", "student": ["multi_logits", "multi_iou"]},
        {"loss": "mask_kd", "name": "multimask_kd", "student": "multi_logits", "teacher": "multi_logits"},
    ])  # fmt: skip
    cfg["data"]["options"]["prompts"] = {"point_prompts": 2, "box_prompts": 1, "multimask": True}
    loaded = load_config(None, **cfg)
    data = pg.build.load_run_data(loaded)
    distiller = pg.build.build_distiller(loaded, data)
    batch = torch.utils.data.default_collate([data.train[i] for i in range(2)])
    distiller.train()
    outputs, losses = distiller(batch)
    assert outputs["multi_logits"].shape[:3] == (2, 3, 3) and outputs["multi_iou"].shape == (2, 3, 3)
    assert set(losses) == {"sam_gt:logits,iou", "multimask", "multimask_kd"}
    heads = distiller.student.mask_decoder.output_hypernetworks_mlps  # one per mask token

    def head_grads() -> list[float]:
        out = [sum(float(p.grad.abs().sum()) for p in h.parameters() if p.grad is not None) for h in heads]
        distiller.student.zero_grad(set_to_none=True)
        return out

    losses["multimask"].backward(retain_graph=True)
    g = head_grads()
    assert g[0] == 0 and sum(g[1:]) > 0  # SAM's three masks only (the best of each prompt)
    losses["sam_gt:logits,iou"].backward()
    g = head_grads()
    assert g[0] > 0 and all(v == 0 for v in g[1:])  # the single-mask output only
    summary = pg.run(loaded, mode="distill", report=False)
    assert summary["status"] == "completed" and 0.0 <= summary["test"]["last"]["miou_1pt"] <= 1.0
    with pytest.raises(ProtegeError, match="multimask is true or false"):
        PromptSettings.parse({"multimask": "yes"})
