"""SAM models to ONNX and int8 (protege.export.sam_onnx): the graphs compute what PyTorch computes,
with any number of prompts and points, behind the same encode/decode interface."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from protege.errors import ProtegeError
from sam_standin import shapes_image, tiny_sam

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from protege.export import sam_onnx  # noqa: E402
from protege.export.quantize import graph_summary  # noqa: E402
from protege.export.sam_onnx import OnnxSam, export_sam_onnx, quantize_sam_int8  # noqa: E402
from protege.segment import match_masks, segment_everything  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    model = tiny_sam()
    out = tmp_path_factory.mktemp("onnx")
    (out / "README").write_text("mine")  # a file of the user's, beside the export
    return model, out, export_sam_onnx(model, out)


@pytest.fixture(scope="module")
def int8(exported, tmp_path_factory):
    _, out, paths = exported
    calibration = torch.stack([_image(seed) for seed in range(6)])
    return quantize_sam_int8(paths, calibration, tmp_path_factory.mktemp("int8"))


def _image(seed: int) -> torch.Tensor:
    """A shapes image with its colours shuffled and noise: different images of the same kind."""
    g = torch.Generator().manual_seed(seed)
    image, _, _ = shapes_image(64)
    image = image[torch.randperm(3, generator=g)]
    return (image + 0.05 * torch.randn(image.shape, generator=g)).clamp(0, 1)


def _prompts(p: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(2, p, n, 2, generator=g) * 64
    labels = torch.randint(0, 2, (2, p, n), generator=g)
    labels[..., 0] = 1
    if n > 1:
        labels[:, 0, -1] = -1  # a padding point
    return points, labels


def test_fp32_graphs_match_pytorch(exported):
    model, out, paths = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "README", "decoder.onnx", "decoder_box.onnx", "decoder_multimask.onnx", "encoder.onnx", "sam_onnx.json"
    ]  # fmt: skip
    assert set(paths) == {"encoder", "decoder", "decoder_multimask", "decoder_box", "info"}
    info = json.loads(paths["info"].read_text())
    assert info["img_size"] == 64 and info["embedding"] == [32, 8, 8]
    assert all(f["max_rel_diff"] <= 1e-4 for f in info["files"].values())
    onnx_model = OnnxSam(out)
    assert onnx_model.img_size == 64
    images = torch.stack([_image(s) for s in (10, 11, 12)])  # batch 3: the encoder was traced at 2
    with torch.no_grad():
        want = model.encode(images)
    got = onnx_model.encode(images)
    assert got.shape == want.shape == (3, 32, 8, 8)
    assert (got - want).abs().max() < 1e-4
    for p, n in ((4, 3), (1, 1), (7, 2)):  # the decoders were traced with 3 prompts of 2 points
        points, labels = _prompts(p, n)
        for multimask in (False, True):
            with torch.no_grad():
                ref = model.decode(want[:2], points, labels, multimask=multimask)
            res = onnx_model.decode(got[:2], points, labels, multimask=multimask)
            m = 3 if multimask else 1
            assert res["masks"].shape == ref["masks"].shape == (2, p, m, 32, 32)
            assert res["iou"].shape == ref["iou"].shape == (2, p, m)
            assert (res["masks"] - ref["masks"]).abs().max() < 1e-4, (p, n, multimask)
            assert (res["iou"] - ref["iou"]).abs().max() < 1e-4
    for p in (1, 6):  # boxes: the box decoder was traced with 3
        g = torch.Generator().manual_seed(p)
        corner = torch.rand(2, p, 2, generator=g) * 40
        boxes = torch.cat([corner, corner + 4 + torch.rand(2, p, 2, generator=g) * 20], -1)
        with torch.no_grad():
            ref_box = model.decode(want[:2], boxes=boxes)
        res = onnx_model.decode(got[:2], boxes=boxes)
        assert res["masks"].shape == ref_box["masks"].shape == (2, p, 1, 32, 32)
        assert (res["masks"] - ref_box["masks"]).abs().max() < 1e-4, p
        assert (res["iou"] - ref_box["iou"]).abs().max() < 1e-4
    assert torch.equal(onnx_model.upscale(ref["masks"]), model.upscale(ref["masks"]))
    both = onnx_model(images[:1], points[:1], labels[:1])
    assert set(both) == {"masks", "iou", "embedding"}


def test_exported_model_segments_everything_like_pytorch(exported):
    model, out, _ = exported
    image = _image(20)
    loose = {"pred_iou_thresh": -10.0, "stability_thresh": 0.0, "points_per_side": 8}
    ours = segment_everything(OnnxSam(out), image, mode="dense", **loose)
    ref = segment_everything(model, image, mode="dense", **loose)
    assert ours.prompts == ref.prompts == 64 and len(ref) > 0
    assert match_masks(ours.masks, ref.masks)["miou"] > 0.99


def test_int8_runs_and_mostly_agrees_with_fp32(exported, int8):
    """The model has random weights: what is checked is that the int8 graphs are really int8, run
    with the same shapes, and that their mask logits keep the fp32 sign on most pixels (a loose
    bound, as int8 error on an untrained model says little about a trained one)."""
    model, out, fp32_paths = exported
    assert set(int8) == {"encoder", "decoder", "decoder_multimask", "decoder_box", "info"}
    for key in ("encoder", "decoder", "decoder_multimask", "decoder_box"):
        summary = graph_summary(int8[key])
        assert summary["quantize_linear"] > 0 and summary["weighted_ops_int8"] > 0, key
        assert _weight_bytes(int8[key]) < 0.5 * _weight_bytes(fp32_paths[key]), key
    info = json.loads(int8["info"].read_text())
    assert info["calibration_images"] == 6 and info["files"]["encoder"]["format"] == "QDQ"
    # the decoders keep Concat in float (one shared scale for learned tokens and prompt tokens broke
    # the point decoder of a trained student: BENCHMARKS.md); the encoder quantizes every type
    assert all(
        info["files"][k]["float_op_types"] == ["Concat"]
        for k in ("decoder", "decoder_multimask", "decoder_box")
    )
    assert "float_op_types" not in info["files"]["encoder"]
    fp32, q = OnnxSam(out), OnnxSam(int8["info"].parent)
    images = torch.stack([_image(s) for s in (30, 31)])
    e32, e8 = fp32.encode(images), q.encode(images)
    assert e8.shape == e32.shape and torch.isfinite(e8).all()
    points, labels = _prompts(6, 1)
    for multimask in (False, True):
        ref = fp32.decode(e32, points, labels, multimask=multimask)["masks"]
        got = q.decode(e8, points, labels, multimask=multimask)["masks"]
        assert got.shape == ref.shape and torch.isfinite(got).all()
        agree = ((got > 0) == (ref > 0)).float().mean().item()
        assert agree >= 0.9, agree
    boxes = torch.tensor([[[4.0, 4, 40, 40], [10, 20, 60, 50]]]).expand(2, 2, 4)
    ref, got = fp32.decode(e32, boxes=boxes)["masks"], q.decode(e8, boxes=boxes)["masks"]
    assert got.shape == ref.shape == (2, 2, 1, 32, 32)
    assert ((got > 0) == (ref > 0)).float().mean().item() >= 0.9


def _weight_bytes(path) -> int:
    """Bytes of a graph's initializers (the file's size of a toy model is mostly graph metadata)."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)


def test_errors(exported, tmp_path):
    _, out, paths = exported
    with pytest.raises(ProtegeError, match="not an exported segmenter"):
        OnnxSam(tmp_path)
    single = OnnxSam({"encoder": paths["encoder"], "decoder": paths["decoder"]})
    emb = single.encode(_image(0)[None])
    points, labels = _prompts(2, 1)
    with pytest.raises(ProtegeError, match="decoder_multimask.onnx"):
        single.decode(emb, points[:1], labels[:1], multimask=True)
    with pytest.raises(ProtegeError, match="decoder_box.onnx"):
        single.decode(emb, boxes=torch.tensor([[[0.0, 0, 10, 10]]]))
    with pytest.raises(ProtegeError, match="not both"):
        OnnxSam(out).decode(emb, points[:1], labels[:1], boxes=torch.tensor([[[0.0, 0, 10, 10]]]))
    with pytest.raises(ProtegeError, match="holds the fp32 model"):
        quantize_sam_int8(paths, _image(0)[None], out)
    with pytest.raises(ProtegeError, match="calibration images"):
        quantize_sam_int8(paths, torch.rand(1, 3, 32, 32), tmp_path / "q")


def test_a_failed_export_leaves_nothing(monkeypatch, tmp_path):
    """The graphs are written in a staging directory and moved only when all are checked: a failure
    at the decoder leaves no encoder.onnx behind (and no staging directory)."""
    calls = []

    def fake(model, args, path, *rest, **kw):
        calls.append(path.name)
        if path.name != "encoder.onnx":
            raise ProtegeError("no conversion")
        path.write_bytes(b"")
        return {"exporter": "fake", "opset": 18}

    monkeypatch.setattr(sam_onnx, "export_graph", fake)
    monkeypatch.setattr(sam_onnx, "session", lambda *a, **k: _FakeSession())
    monkeypatch.setattr(sam_onnx, "_check", lambda *a: 0.0)
    with pytest.raises(ProtegeError, match="no conversion"):
        export_sam_onnx(tiny_sam(), tmp_path / "out")
    assert calls == ["encoder.onnx", "decoder.onnx"]
    assert list((tmp_path / "out").iterdir()) == []


class _FakeSession:
    def run(self, _names, feed):
        return [np.zeros((len(feed["images"]), 32, 8, 8), dtype=np.float32)]


def _cli(monkeypatch, *args: str) -> int:
    import sys

    from protege import cli

    monkeypatch.setattr(sys, "argv", ["protege", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return int(e.value.code or 0)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A finished one-epoch promptable-segmentation run (tiny SAM teacher, CNN student)."""
    import protege as pg
    from protege.config import load_config

    size = 64
    root = tmp_path_factory.mktemp("segrun")
    cfg = {
        "name": "seg", "output_dir": str(root / "runs"), "task": "promptable_segmentation", "seed": 0,
        "epochs": 1, "cpu": True, "progress": False,
        "data": {"source": "composites", "batch_size": 4, "options": {
            "size": size, "train": 8, "val": 4, "test": 4, "max_objects": 2, "kinds": ["shapes"],
            "prompts": {"point_prompts": 2, "box_prompts": 1}}},
        "teacher": {"model": "sam", "kwargs": {"variant": "tiny", "img_size": size}},
        "student": {"model": "sam_student", "kwargs": {"encoder": "cnn"}},
        "terms": [{"loss": "sam_gt"}, {"loss": "mask_kd"}],
        "optim": {"name": "adamw", "lr": 0.001},
    }  # fmt: skip
    summary = pg.run(load_config(None, **cfg), mode="distill", report=False)
    return root / "runs" / "seg", summary


def test_protege_export_of_a_segmentation_run_to_int8(seg_run, tmp_path, monkeypatch, capsys):
    """`protege export RUN --format int8` on a promptable-segmentation run: encoder + decoder graphs
    (points, multimask, boxes) quantized, evaluated with the run's own prompts and evaluator beside
    the PyTorch student (whose figures are the run's test figures), timed side by side."""
    import protege as pg

    size = 64
    run, summary = seg_run
    assert _cli(monkeypatch, "export", str(run), "--format", "int8", "--calibration", "6", "--bench") == 0
    shown = capsys.readouterr().out
    assert "1 point" in shown and "IoU with fp32" in shown and "decoder" in shown
    out = run / "export-int8"
    info = json.loads((out / "export.json").read_text())
    assert {"encoder.onnx", "decoder.onnx", "decoder_multimask.onnx", "decoder_box.onnx"} <= set(
        info["files"]
    )
    for name in ("encoder", "decoder", "decoder_multimask", "decoder_box"):
        assert graph_summary(out / f"{name}.onnx")["weighted_ops_int8"] > 0, name
    assert info["quantization"]["calibration"]["samples"] == 6
    ev = info["evaluation"]
    assert ev["split"] == "test" and set(ev) >= {"fp32", "onnx_fp32", "int8"}
    test = summary["test"]["best"]
    for kind in ("1pt", "3pt", "box"):  # the PyTorch row is the run's own test measurement
        assert ev["fp32"][f"miou_{kind}"] == pytest.approx(test[f"miou_{kind}"], abs=1e-6)
        assert ev["fp32"][f"fp32_miou_{kind}"] == pytest.approx(1.0)
        assert ev["onnx_fp32"][f"fp32_miou_{kind}"] > 0.98, kind  # fp32 ONNX: the same masks
        assert 0.0 <= ev["int8"][f"fp32_miou_{kind}"] <= 1.0
        assert 0.0 <= ev["int8"][f"teacher_miou_{kind}"] <= 1.0
    assert set(info["latency"]["rows"]) == {
        "teacher (PyTorch)", "student fp32 (PyTorch)", "student fp32 (onnxruntime)", "student int8 (onnxruntime)"
    }  # fmt: skip
    card = (out / "README.md").read_text()
    assert "Mask mIoU" in card and "OnnxSam" in card and "decoder_box.onnx" in card
    # a segmentation run refuses the classification-only calibration input, before writing anything
    with pytest.raises(ProtegeError, match="calibrates on its run's training images"):
        pg.export(run, format="int8", out=tmp_path / "x", calibration_data=[torch.rand(2, 3, size, size)])
    assert not (tmp_path / "x").exists()


def test_protege_segment_everything_cli(seg_run, tmp_path, monkeypatch, capsys):
    """`protege segment-everything IMAGE --run RUN` writes the label map, the per-mask record and the
    overlay for a real image file of any size; a refused output directory is refused before work."""
    from PIL import Image

    run, _ = seg_run
    picture = (_image(3).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(picture).resize((96, 48)).save(path)  # not square, not the model's size
    args = ["segment-everything", str(path), "--run", str(run), "--points-per-side", "4"]
    assert _cli(monkeypatch, *args) == 0
    shown = capsys.readouterr().out
    out = tmp_path / "photo-masks"
    assert "masks (hierarchical" in shown and str(out) in shown.replace("\n", "")
    record = json.loads((out / "masks.json").read_text())
    assert record["mode"] == "hierarchical" and record["valid_size"] == [32, 64]  # 96x48 letterboxed to 64
    labels = np.asarray(Image.open(out / "masks.png"))
    assert labels.shape == (32, 64) and int(labels.max()) <= len(record["masks"])
    assert np.asarray(Image.open(out / "overlay.png")).shape == (32, 64, 3)
    # the teacher, dense, multimask, into the same directory: refused without --overwrite, then done
    again = [*args, "--model", "teacher", "--mode", "dense", "--multimask"]
    assert _cli(monkeypatch, *again) == 2
    assert "not empty" in capsys.readouterr().err
    assert _cli(monkeypatch, *again, "--overwrite") == 0
    record = json.loads((out / "masks.json").read_text())
    assert record["mode"] == "dense" and record["prompts"] == 16
    assert (
        _cli(
            monkeypatch, "segment-everything", str(path), "--run", str(tmp_path), "--out", str(tmp_path / "o")
        )
        == 2
    )
    assert "no config.yaml" in capsys.readouterr().err.replace("\n", " ")
