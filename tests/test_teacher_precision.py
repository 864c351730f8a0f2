"""``teacher_precision: bf16``: the frozen teachers' forward under bfloat16 autocast, float32 to the losses."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import protege as pg
from protege.build import build_distiller, load_run_data
from protege.config import dump_config, load_config, validate_config
from protege.core.cohort import Cohort
from protege.data import DataSplits, TensorImageDataset
from protege.engine.cache import TeacherCache, write_cache
from protege.errors import ProtegeError

# bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of it. A handful of
# layers' roundings stay well inside 5 of those units of the largest reference value.
BF16_TOL = 5 * 2**-8


def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return pg.build_model("resnet8", num_classes=10, in_chans=1)


def _terms() -> list[pg.Term]:
    return [pg.ce(0.1), pg.kd(0.9, T=4.0), pg.at("layer3", "layer3", 100.0)]


def _assert_bf16_close(low: torch.Tensor, ref: torch.Tensor) -> None:
    assert low.dtype == torch.float32
    assert torch.equal(low, low.bfloat16().float()), "values must come from a bf16 computation"
    assert not torch.equal(low, ref), "bf16 outputs identical to fp32: autocast did not run"
    tol = BF16_TOL * float(ref.abs().max())
    torch.testing.assert_close(low, ref, rtol=0.0, atol=tol)


def test_bf16_teacher_is_close_to_fp32_and_the_losses_get_float32(one_thread, monkeypatch):
    teacher = _resnet(0).eval()
    x, y = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    full = pg.Distiller(_resnet(1), copy.deepcopy(teacher), _terms())
    low = pg.Distiller(_resnet(1), copy.deepcopy(teacher), _terms(), teacher_precision="bf16")
    ref, out = full.teacher_outputs(x)[0], low.teacher_outputs(x)[0]
    assert set(out) == {"logits", "layer3"}
    for key in out:
        _assert_bf16_close(out[key], ref[key])

    seen: list[torch.dtype] = []
    for term in low.terms:  # record what each loss receives from the teacher
        if term.uses_teacher:
            fn = term.info.fn

            def spy(s, t, *args, _fn=fn, **kwargs):
                seen.append(t.dtype)
                return _fn(s, t, *args, **kwargs)

            monkeypatch.setattr(term, "info", dataclasses.replace(term.info, fn=spy))
    _, losses = low((x, y))
    _, losses_full = full((x, y))
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(losses["ce"], losses_full["ce"])  # reads no teacher: the student side is untouched
    for name, value in losses.items():
        assert value.dtype == torch.float32
        # The teacher outputs carry bf16 rounding (at most 2^-8 = 0.4% of a value per rounding); the
        # losses are smooth averages of them computed in float32, so they move by a few such units at
        # most: measured <= 0.35% (AT) and 0.2% (KD) over 40 random batches. 1e-2 = 2.5 units.
        torch.testing.assert_close(value, losses_full[name], rtol=1e-2, atol=0.0)
    sum(losses.values()).backward()  # the student's graph is intact (fp32)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in low.student.parameters())


def test_the_cohort_shares_a_bf16_teacher_forward(one_thread):
    teacher = _resnet(0).eval()
    x = torch.randn(4, 1, 16, 16)
    cohort = Cohort([_resnet(1), _resnet(2)], teacher, [pg.kd()], teacher_precision="bf16")
    (out,) = cohort._run_teachers(x)
    with torch.no_grad():
        ref = teacher(x)
    _assert_bf16_close(out["logits"], ref)


def test_a_bad_precision_says_what_to_use():
    with pytest.raises(ProtegeError, match=r"teacher_precision must be 'fp32' or 'bf16', got 'fp16'"):
        pg.Distiller(_resnet(1), _resnet(0), [pg.kd()], teacher_precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ProtegeError, match="teacher_precision must be"):
        Cohort([_resnet(1)], _resnet(0), [pg.kd()], teacher_precision="half")  # type: ignore[arg-type]
    base = {"student": {"model": "mlp_s"}, "teacher": {"model": "mlp_s"}}
    with pytest.raises(ProtegeError) as e:
        validate_config({**base, "teacher_precision": "fp16"}, "run.yaml")
    assert "teacher_precision" in str(e.value) and "'fp32' or 'bf16'" in str(e.value)


def test_config_round_trip_reaches_the_distiller(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {source: digits}\n"
        "teacher: {model: mlp_s, kwargs: {input_size: 8}}\n"
        "student: {model: mlp_s, kwargs: {input_size: 8}}\n"
        "terms: [{loss: kd}]\n"
        "teacher_precision: bf16\n"
    )
    cfg = load_config(path)
    assert cfg.teacher_precision == "bf16"
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert load_config(path, ["teacher_precision=fp32"]).teacher_precision == "fp32"
    assert load_config(tmp_path / "resolved.yaml").model_copy(update={"teacher_precision": "fp32"}) != cfg
    assert "teacher_precision" in pg.RunConfig.model_json_schema()["properties"]
    distiller = build_distiller(cfg, load_run_data(cfg))
    assert distiller.teacher_precision == "bf16"
    distiller.close()


def test_the_cache_writer_runs_the_teacher_in_bf16_for_training_views(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 1, 12, 12, generator=g), torch.arange(24) % 10
    data = DataSplits(
        train=TensorImageDataset(images, labels),
        val=TensorImageDataset(images[:8], labels[:8]),
        test=None,
        num_classes=10,
        in_chans=1,
        input_size=12,
        class_names=[str(i) for i in range(10)],
        source="tiny",
    )
    teacher = _resnet(0).eval()
    index = write_cache(
        tmp_path / "c", data, [teacher], views=1, top_k="all", dtype="float32", teacher_precision="bf16"
    )
    assert index["parts"]["settings"]["detail"]["teacher_precision"] == "bf16"
    cache = TeacherCache.open(tmp_path / "c")
    with torch.no_grad():
        ref_train, ref_val = teacher(images), teacher(images[:8])
    stored = cache.tensors["train"]["t0.logits"][:, 0]
    _assert_bf16_close(stored, ref_train)
    # validation outputs are the fidelity reference: fp32, as online evaluation computes them
    torch.testing.assert_close(cache.tensors["val"]["t0.logits"][:, 0], ref_val, rtol=1e-5, atol=1e-6)
    with pytest.raises(ProtegeError, match="teacher_precision must be"):
        write_cache(tmp_path / "d", data, [teacher], teacher_precision="fp8")  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()
