"""protege export (native, ONNX, int8) and quantization-aware distillation, on digits with tiny models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.nn.utils import parametrize

import protege as pg
from cli_helpers import run_cli as _cli
from protege.config import load_config
from protege.core.fake_quant import FakeQuant
from protege.core.taps import Taps
from protege.errors import ProtegeError
from protege.pipeline import load_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STUDENT = {"model": "cnn_m", "kwargs": {"widths": [4, 8, 8]}}
TEACHER = {"model": "cnn_m", "kwargs": {"widths": [8, 8, 16]}}


def _cfg(root: Path, name: str, **extra) -> dict:
    cfg = {
        "name": name,
        "output_dir": str(root),
        "data": {"source": "digits", "batch_size": 128},
        "student": STUDENT,
        "teacher": TEACHER,
        "terms": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "T": 4}],
        "epochs": 2,
        "progress": False,
        "measure_cost": False,
        "schedule": {"name": "constant"},
        "optim": {"lr": 0.1},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A distilled student (random teacher: fidelity, not accuracy, is the point) on digits."""
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    pg.run(load_config(None, **_cfg(root, "kd")), report=False)
    return root


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _test_inputs(n: int = 64) -> torch.Tensor:
    data = pg.load_data("digits")
    return torch.stack([data.test[i][0] for i in range(n)])


# -- native ----------------------------------------------------------------------------------------


def test_native_export_of_a_zoo_student_loads_back_with_one_call(runs):
    info = pg.export(runs / "kd", "native")
    out = runs / "kd" / "export-native"
    assert info["path"] == str(out) and info["native"] == {"format": "safetensors", "kind": "protege"}
    files = {"model.safetensors", "protege_model.json", "export.json", "README.md"}
    assert {p.name for p in out.iterdir()} == files
    assert info["parity"]["max_abs_diff"] == 0.0
    x = _test_inputs()
    student = load_run(runs / "kd").student.eval()
    with torch.no_grad():
        expected = student(x)
        assert torch.equal(pg.load_model(out)(x), expected)
        rebuilt = pg.build_model("cnn_m", num_classes=10, in_chans=1, weights=out, widths=[4, 8, 8]).eval()
        assert torch.equal(rebuilt(x), expected)
    card = (out / "README.md").read_text()
    assert "pg.load_model" in card and "protege export" in card and "cnn_m" in card
    assert json.loads((out / "export.json").read_text())["command"].startswith("protege export")


def test_native_export_of_a_timm_model_is_timms_own_format(tmp_path):
    import timm

    model = pg.build_model("timm:test_resnet", num_classes=10, in_chans=1).eval()
    x = torch.randn(3, 1, 32, 32)
    info = pg.export(model, "native", tmp_path / "t", example=x)
    assert info["native"]["kind"] == "timm" and (tmp_path / "t" / "config.json").is_file()
    loaded = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# -- onnx ------------------------------------------------------------------------------------------


def test_onnx_export_matches_pytorch_on_the_test_split_with_a_dynamic_batch(runs):
    info = pg.export(runs / "kd", "onnx")
    out = runs / "kd" / "export-onnx"
    assert {p.name for p in out.iterdir()} == {"model.onnx", "export.json", "README.md"}  # one file
    assert info["onnx"]["exporter"] == "dynamo" and info["onnx"]["opset"] == 18
    parity = info["parity"]
    assert parity["inputs"] == "test split" and parity["samples"] == 360
    assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    ev = info["evaluation"]
    assert ev["onnx_fp32"]["acc"] == ev["fp32"]["acc"] and "agreement_teacher" in ev["fp32"]
    proto = onnx.load(str(out / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    student = load_run(runs / "kd").student.eval()
    sess = _session(out / "model.onnx")
    for n in (1, 5):
        x = _test_inputs(n)
        with torch.no_grad():
            np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], student(x).numpy(), atol=1e-4)
    assert info["model"]["params"] == pg.count_params(student)
    assert info["model"]["input_shape"] == [None, 1, 8, 8]


# -- int8 (PTQ) ------------------------------------------------------------------------------------


def test_int8_export_is_really_int8_and_its_accuracy_change_is_measured(runs):
    info = pg.export(runs / "kd", "int8", calibration=64)
    out = runs / "kd" / "export-int8"
    q = info["quantization"]
    assert q["calibration"] == {"split": "train", "samples": 64, "seed": 0, "asked": 64}
    graph = q["graph"]
    assert graph["weighted_ops"] == graph["weighted_ops_int8"] == 4  # 3 convs + the classifier
    proto = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 4 and all(
        i.data_type != onnx.TensorProto.FLOAT for i in proto.graph.initializer if i.name.endswith(".weight")
    )
    ev = info["evaluation"]
    change = info["int8_vs_fp32"]["acc_change"]
    assert change == pytest.approx(ev["int8"]["acc"] - ev["fp32"]["acc"])
    assert abs(change) < 0.05 and ev["int8"]["agreement_fp32"] > 0.9
    assert 0 < info["int8_vs_fp32"]["max_abs_diff"] < 1.0  # rounded: not the fp32 logits, but close
    x = _test_inputs(8)
    logits = _session(out / "model.onnx").run(None, {"input": x.numpy()})[0]
    assert logits.shape == (8, 10)
    timed = pg.bench(runs / "kd", exports=[out], batch_sizes=(1, 3), threads=(1,), max_seconds=0.1)
    rows = {(r["model"], r["batch"]): r for r in timed["rows"]}
    assert set(rows) == {(m, b) for m in ("teacher", "student", "student fp32", "kd int8") for b in (1, 3)}
    assert rows[("student", 1)]["vs_eager"] == 1.0 and rows[("teacher", 3)]["vs_teacher"] == 1.0
    assert rows[("kd int8", 1)]["rounds"] >= 10 and timed["models"]["kd int8"]["acc"] == ev["int8"]["acc"]
    assert timed["models"]["student"]["bytes"] == 4 * info["model"]["params"]


def test_the_torchscript_exporter_is_the_fallback(tmp_path, monkeypatch):
    real = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("dynamo cannot")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    model = pg.build_model("cnn_m", num_classes=10, in_chans=1, widths=[4, 8, 8]).eval()
    info = pg.export(model, "onnx", tmp_path / "ts", example=_test_inputs(4))
    assert info["onnx"]["exporter"] == "torchscript" and info["onnx"]["opset"] == 17
    assert "dynamo cannot" in info["onnx"]["dynamo_error"]
    assert info["parity"]["inputs"] == "example" and info["parity"]["max_abs_diff"] < 1e-4


# -- quantization-aware distillation --------------------------------------------------------------


def test_fake_quant_keeps_paths_and_plain_keys_and_rounds_weights_to_int8():
    torch.manual_seed(0)
    model = pg.build_model("cnn_m", num_classes=10, in_chans=1, widths=[4, 8, 8])
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    paths = [p for p, _ in model.named_modules()]
    quant = FakeQuant(model)
    assert quant.paths == ["layer1.0", "layer2.0", "layer3.0", "fc"]
    assert set(paths) <= {p for p, _ in model.named_modules()} and set(model.state_dict()) == set(plain)
    w = model.layer2[0].weight  # what the forward computes with
    scale = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)
    taps = Taps(model, ["layer2", "fc:in"])
    model.train()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert set(taps.pop()) == {"layer2", "fc:in"}
    assert model.layer1[0].parametrizations.weight.original.grad is not None  # straight-through
    assert set(quant.ranges()) == set(quant.paths)
    model.load_state_dict(plain)  # a plain checkpoint loads into the fake-quantized model
    quant.remove()
    assert not parametrize.is_parametrized(model.layer1[0]) and not model.layer1[0]._forward_pre_hooks
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())


def test_qad_trains_fake_quantized_survives_resume_and_exports_with_its_ranges(runs, monkeypatch):
    from protege import pipeline

    cfg = _cfg(
        runs,
        "qad",
        quantize={"mode": "int8", "exclude": ["fc"]},  # the classifier stays float, in QAD and in int8
        student={**STUDENT, "weights": str(runs / "kd")},
        data={"source": "digits", "batch_size": 640},  # 1257 training images: 2 steps per epoch
        optim={"lr": 0.01},
    )
    real_fit = pipeline.fit
    monkeypatch.setattr(pipeline, "fit", lambda *a, **kw: real_fit(*a, **kw, stop_after_epochs=1))
    pg.run(load_config(None, **cfg), report=False)
    monkeypatch.setattr(pipeline, "fit", real_fit)
    run_dir = runs / "qad"
    first = _quant_state(run_dir)
    assert {k for k in first if k.endswith(".updates")} == {
        f"quant.inputs.{p}.updates" for p in ("layer1/0", "layer2/0", "layer3/0")
    }
    assert all(int(v) == 2 for k, v in first.items() if k.endswith(".updates"))  # two steps observed
    summary = pg.run(load_config(None, **cfg), resume=True, report=False)
    assert summary["epochs_completed"] == 2
    resumed = _quant_state(run_dir)  # the ranges were restored, then observed 2 more steps
    assert all(int(v) == 4 for k, v in resumed.items() if k.endswith(".updates"))
    loaded = load_run(run_dir)
    assert loaded.quant is not None and parametrize.is_parametrized(loaded.student.layer3[0], "weight")
    assert loaded.student.layer1[0]._forward_pre_hooks and not loaded.student.fc._forward_pre_hooks
    assert not parametrize.is_parametrized(loaded.student.fc)
    plain = pg.build_model("cnn_m", num_classes=10, in_chans=1, widths=[4, 8, 8], weights=run_dir)
    assert set(plain.state_dict()) == set(pg.build_model("cnn_m", widths=[4, 8, 8]).state_dict())
    info = pg.export(run_dir, "int8", calibration=64)
    q = info["quantization"]
    assert q["qad_ranges"] == {"modules": 3, "tensors": 3, "unmatched": []}
    assert q["excluded"] == {"patterns": ["fc"], "modules": ["fc"]}
    assert q["graph"]["weighted_ops"] == 4 and q["graph"]["weighted_ops_int8"] == 3
    ev = info["evaluation"]
    assert "fake_quant" in ev and ev["int8"]["agreement_fake_quant"] > 0.9
    assert info["source"]["quantize"]["mode"] == "int8"
    assert info["source"]["run_test_acc"] == pytest.approx(summary["test"]["best"]["acc"])


def _quant_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from protege.engine import checkpoint_dir

    extra = load_file(checkpoint_dir(run_dir, "last") / "distiller.safetensors")
    return {k: v for k, v in extra.items() if k.startswith("quant.")}


def test_quantize_config_is_checked():
    with pytest.raises(ProtegeError, match="one student in one stage"):
        load_config(None, student=STUDENT, quantize="int8", stages=[{"name": "a"}, {"name": "b"}])
    with pytest.raises(ProtegeError, match="quantize.mode"):
        load_config(None, student=STUDENT, quantize="int4")
    assert load_config(None, student=STUDENT, quantize={"averaging_constant": 0.1}).quantize.mode == "int8"


# -- bad input -------------------------------------------------------------------------------------


def test_cli_refuses_to_overwrite_and_reports_a_damaged_checkpoint(runs, tmp_path, monkeypatch, capsys):
    keep = runs / "kd" / "export-keep"
    keep.mkdir(exist_ok=True)
    code, err = _cli(monkeypatch, capsys, "export", str(runs / "kd"), "-f", "native", "--out", str(keep))
    assert code == 2 and "already exists: pass --overwrite" in err and "Traceback" not in err
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs / "kd", broken, ignore=shutil.ignore_patterns("export-*"))
    pointed = json.loads((broken / "checkpoints" / "pointers.json").read_text())["best"]
    (broken / "checkpoints" / pointed / "model.safetensors").write_bytes(b"not a tensor file")
    code, err = _cli(monkeypatch, capsys, "export", str(broken), "--format", "onnx")
    assert code == 2 and "is damaged" in err and "Traceback" not in err
    assert not any(p.name.startswith(("export-", ".export-")) for p in broken.iterdir())
    code, err = _cli(monkeypatch, capsys, "export", str(tmp_path / "nowhere"), "--format", "int8")
    assert code == 2 and "not a protege run directory" in err


def test_int8_of_a_run_whose_data_is_gone_says_what_to_do(runs, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(runs / "kd", moved, ignore=shutil.ignore_patterns("export-*"))
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data"].update(source="imagefolder", root=str(tmp_path / "gone"))  # the images were moved away
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    expected = r"its data \(imagefolder\) cannot be read .*calibrates on its training split"
    with pytest.raises(ProtegeError, match=expected):
        pg.export(moved, "int8")
    assert not any(p.name.startswith(("export-", ".export-")) for p in moved.iterdir())


@torch.library.custom_op("protege_test::shuffle", mutates_args=())
def _shuffle(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


@_shuffle.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Odd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shuffle(x)


def test_an_op_no_exporter_converts_is_named_with_its_module_path(tmp_path):
    odd = nn.Sequential(nn.ReLU(), _Odd())
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), odd, nn.Linear(16, 10))
    with pytest.raises(ProtegeError) as err:
        pg.export(model, "onnx", tmp_path / "odd", example=torch.randn(2, 1, 8, 8))
    message = str(err.value)
    assert "protege_test.shuffle" in message and "'2.1' (_Odd)" in message and "--format native" in message
    assert list(tmp_path.iterdir()) == []  # nothing half written


def test_missing_onnx_packages_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ProtegeError, match=r"pip install 'protege\[export\]'"):
        pg.export(nn.Linear(4, 2), "onnx", tmp_path / "x", example=torch.randn(2, 4))
    assert not (tmp_path / "x").exists()
