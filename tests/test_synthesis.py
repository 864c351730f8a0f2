"""Data-free synthesis (protege.strategies.synthesis): the losses against hand values, DeepInversion on a
small trained teacher, the saved set (reuse, refusal, as a data source), reproducible synthetic
runs, and the adversarial generator's exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import protege as pg
from protege.build import build_distiller, load_run_data
from protege.config import SynthesisConfig, validate_config
from protege.core.fold import fold_batchnorm
from protege.data.synthetic import SetSpec, load_synthetic_set
from protege.errors import ProtegeError
from protege.strategies.synthesis import (
    BatchNormStatistics,
    Generator,
    bn_statistic_loss,
    competition_loss,
    disagreement_loss,
    information_entropy_prior,
    invert_batch,
    l2_prior,
    one_hot_prior,
    open_or_synthesize,
    synthesize_images,
    synthetic_training,
    total_variation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = {"model": "cnn_m", "kwargs": {"widths": [8, 16, 16]}}


# -- losses against hand values -------------------------------------------------------------------


def test_bn_statistic_loss_hand_value() -> None:
    # channel 0 holds 1, 3 (mean 2, biased var 1); channel 1 holds 0, 4 (mean 2, var 4)
    x = torch.tensor([[[1.0], [0.0]], [[3.0], [4.0]]])  # (N=2, C=2, L=1)
    run_mean, run_var = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = math.hypot(0.0, 2.0) + math.hypot(0.0, 3.0)  # ‖(0, 2)‖ + ‖(0, 3)‖
    assert bn_statistic_loss(x, run_mean, run_var).item() == pytest.approx(expected)
    x4 = x.reshape(2, 2, 1, 1)  # (N, C, H, W): the same statistics
    assert bn_statistic_loss(x4, run_mean, run_var).item() == pytest.approx(expected)


def test_total_variation_and_l2_prior_hand_values() -> None:
    img = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    # right: 1, 4; down: 3, 6; diagonals: 4 - 2 = 2 and 1 - 8 = -7
    one = math.sqrt(1 + 16) + math.sqrt(9 + 36) + 2 + 7
    batch = torch.cat([img, torch.zeros_like(img)])
    assert total_variation(img).item() == pytest.approx(one)
    assert total_variation(batch).item() == pytest.approx(one / 2)  # the mean over images
    assert l2_prior(torch.tensor([[3.0, 4.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)).item() == pytest.approx(2.5)


def test_competition_and_disagreement_hand_values() -> None:
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    student = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    m = (0.625, 0.375)
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    )
    assert competition_loss(student, teacher).item() == pytest.approx(1 - js, abs=1e-6)
    assert competition_loss(teacher, teacher).item() == pytest.approx(1.0)
    far = torch.tensor([[30.0, -30.0]])
    assert competition_loss(-far, far).item() == pytest.approx(1 - math.log(2), abs=1e-5)  # JS ≤ ln 2

    assert disagreement_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 5.0]]), "l1").item() == 2.0
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p_T ‖ p_S)
    assert disagreement_loss(student, teacher, "kl").item() == pytest.approx(kl, abs=1e-6)
    with pytest.raises(ProtegeError, match="l1"):
        disagreement_loss(student, teacher, "l2")


def test_dafl_priors_hand_values() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4), argmax 1
    assert one_hot_prior(logits).item() == pytest.approx(-math.log(0.75))
    even = torch.tensor([[5.0, 0.0], [0.0, 5.0]])  # the batch's mean distribution is (1/2, 1/2)
    assert information_entropy_prior(even).item() == pytest.approx(-math.log(2), abs=1e-6)
    assert information_entropy_prior(even[:1]).item() > -0.1  # one class only: entropy near 0


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)
    )
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()


def test_batchnorm_statistics_hooks_sum_layers_with_first_multiplier() -> None:
    model = _bn_model()
    x = torch.randn(4, 1, 5, 5)
    expected = 10 * bn_statistic_loss(model[0](x), model[1].running_mean, model[1].running_var)
    expected = expected + bn_statistic_loss(
        model[3](model[2](model[1](model[0](x)))), model[4].running_mean, model[4].running_var
    )
    with BatchNormStatistics(model, first_multiplier=10) as stats:
        model(x)
        assert stats.pop().item() == pytest.approx(expected.item(), rel=1e-5)
        with pytest.raises(ProtegeError, match="run the model first"):
            stats.pop()
    assert not model[1]._forward_pre_hooks  # removed on exit


def test_folded_teacher_has_no_statistics_and_is_refused() -> None:
    model = _bn_model().requires_grad_(False)
    assert fold_batchnorm(model)
    with pytest.raises(ProtegeError, match="folded"):
        BatchNormStatistics(model)


def test_generator_outputs_valid_images_of_any_size() -> None:
    lo, hi = torch.full((1, 1, 1), -0.4), torch.full((1, 1, 1), 2.8)
    for size in (28, 10):
        gen = Generator(z_dim=8, out_chans=1, size=size, width=8, lo=lo, hi=hi)
        x = gen(torch.randn(5, 8))
        assert x.shape == (5, 1, size, size)
        assert x.min() >= -0.4 and x.max() <= 2.8


# -- DeepInversion with a small trained teacher ----------------------------------------------------


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN (with BatchNorm) trained two epochs on the 8x8 digits, saved as safetensors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread, immune to a busy box's oversubscription
    torch.manual_seed(0)
    data = pg.load_data("digits")
    model = pg.build_model(TEACHER["model"], num_classes=10, in_chans=1, **TEACHER["kwargs"])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = pg.make_loader(data.train, 64, shuffle=True)
    model.train()
    for _ in range(2):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _teacher(path: Path) -> nn.Module:
    return pg.build_model(
        TEACHER["model"], num_classes=10, in_chans=1, weights=path, **TEACHER["kwargs"]
    ).eval()


def _spec(seed: int = 0) -> SetSpec:
    return SetSpec.of(pg.load_data("digits"), seed)


def test_deepinversion_lowers_bn_loss_and_makes_the_target_class(teacher_file: Path) -> None:
    teacher = _teacher(teacher_file)
    opts = SynthesisConfig(iterations=60, lr=0.2, jitter=1)
    targets = torch.arange(10)
    history: dict[str, list[float]] = {}
    images = invert_batch(teacher, targets, opts, _spec(), torch.Generator().manual_seed(0), history=history)
    assert history["bn"][-1] < 0.5 * history["bn"][0]
    with torch.no_grad():
        assert (teacher(images).argmax(-1) == targets).float().mean() >= 0.9
    lo, hi = _spec().range()
    assert images.min() >= lo.min() - 1e-6 and images.max() <= hi.max() + 1e-6
    assert all(p.grad is None for p in teacher.parameters())


def _small_opts(**kw: Any) -> SynthesisConfig:
    return SynthesisConfig(**{"n_images": 12, "batch_size": 5, "iterations": 4, **kw})


def test_synthesis_is_balanced_and_reproducible(teacher_file: Path) -> None:
    teacher = _teacher(teacher_file)
    a = synthesize_images(teacher, _small_opts(), _spec(0))
    b = synthesize_images(teacher, _small_opts(), _spec(0))
    c = synthesize_images(teacher, _small_opts(), _spec(1))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.target.tolist() == [i % 10 for i in range(12)]  # each batch of 5 has 5 classes
    assert len(a.index["batch_seconds"]) == 3 and a.index["seconds_per_batch"] > 0


def test_adaptive_competition_needs_and_spares_the_student(teacher_file: Path) -> None:
    teacher = _teacher(teacher_file)
    opts = _small_opts(n_images=5, competition_weight=1.0)
    with pytest.raises(ProtegeError, match="needs a student"):
        synthesize_images(teacher, opts, _spec())
    student = pg.build_model("mlp", num_classes=10, in_chans=1, hidden_sizes=[16]).train()
    made = synthesize_images(teacher, opts, _spec(), student=student)
    alone = synthesize_images(teacher, opts.model_copy(update={"competition_weight": 0.0}), _spec())
    assert not torch.equal(made.images, alone.images)  # the competition term moved the pixels
    assert student.training and all(p.grad is None for p in student.parameters())


def test_saved_set_reloads_as_data_and_other_teacher_is_refused(teacher_file: Path, tmp_path: Path) -> None:
    teacher = _teacher(teacher_file)
    opts, spec = _small_opts(n_images=20, batch_size=10), _spec()
    made = open_or_synthesize(tmp_path / "set", teacher, opts, spec)
    assert {p.name for p in (tmp_path / "set").iterdir()} == {"images.safetensors", "index.json", "grid.png"}
    stored = load_file(tmp_path / "set" / "images.safetensors")
    assert stored["images"].dtype == torch.uint8 and stored["images"].shape == (20, 1, 8, 8)

    again = load_synthetic_set(tmp_path / "set")
    assert torch.equal(again.images, made.images)  # what is stored is what the teacher labelled
    with torch.no_grad():
        assert torch.equal(teacher(again.images).argmax(-1), again.teacher_pred)

    data = pg.load_data("synthetic", root=str(tmp_path / "set"), val_fraction=0.2)
    assert (len(data.train), len(data.val), data.test) == (16, 4, None)
    assert (data.in_chans, data.input_size, data.num_classes) == (1, 8, 10)
    xs = torch.stack([data.train[i][0] for i in range(len(data.train))] + [data.val[i][0] for i in range(4)])
    ys = torch.stack([data.train[i][1] for i in range(len(data.train))] + [data.val[i][1] for i in range(4)])
    assert sorted(ys.tolist()) == sorted(made.teacher_pred.tolist())
    assert torch.allclose(xs.sum(), made.images.sum(), atol=1e-3)
    target = pg.load_data("synthetic", root=str(tmp_path / "set"), labels="target")
    assert sorted(int(target.train[i][1]) for i in range(len(target.train))) != []

    reused = open_or_synthesize(tmp_path / "set", teacher, opts, spec)
    assert torch.equal(reused.images, made.images)
    other = _teacher(teacher_file)
    with torch.no_grad():
        other.fc.bias.add_(0.1)
    with pytest.raises(ProtegeError, match="teacher's weights"):
        open_or_synthesize(tmp_path / "set", other, opts, spec)
    with pytest.raises(ProtegeError, match="iterations 4 -> 5"):
        open_or_synthesize(
            tmp_path / "set", teacher, _small_opts(n_images=20, batch_size=10, iterations=5), spec
        )
    remade = open_or_synthesize(tmp_path / "set", other, opts, spec, overwrite=True)
    assert load_synthetic_set(tmp_path / "set").index["fingerprint"] == remade.index["fingerprint"]


# -- runs -----------------------------------------------------------------------------------------


def _run_cfg(
    tmp_path: Path, teacher_file: Path, name: str, synthesis: dict[str, Any], **kw: Any
) -> pg.RunConfig:
    return validate_config(
        {
            "name": name,
            "output_dir": str(tmp_path),
            "data": {"source": "digits", "batch_size": 8, "strategy": "synthetic", "synthesis": synthesis},
            "teacher": {**TEACHER, "weights": str(teacher_file)},
            "student": {"model": "mlp", "kwargs": {"hidden_sizes": [16]}},
            "terms": [{"loss": "kd", "T": 2}],
            "epochs": 2,
            "optim": {"name": "adam", "lr": 0.01},
            "progress": False,
            "measure_cost": False,
            **kw,
        }
    )


def test_synthetic_run_keeps_teacher_batchnorm_and_is_reproducible(
    teacher_file: Path, tmp_path: Path
) -> None:
    syn = {"n_images": 16, "batch_size": 8, "iterations": 3}
    cfg = _run_cfg(tmp_path, teacher_file, "a", syn)
    distiller = build_distiller(cfg, load_run_data(cfg))
    assert any(isinstance(m, nn.BatchNorm2d) for m in distiller.teachers["teacher"].modules())
    original = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"strategy": "original", "synthesis": None})}
    )
    folded = build_distiller(original, load_run_data(original))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.teachers["teacher"].modules())

    runs = [pg.run(_run_cfg(tmp_path, teacher_file, n, syn), report=False) for n in ("a", "b")]
    assert all(r["status"] == "completed" and "acc" in r["test"]["best"] for r in runs)
    sets = [load_file(tmp_path / n / "synthetic" / "images.safetensors") for n in ("a", "b")]
    assert torch.equal(sets[0]["images"], sets[1]["images"])
    weights = [
        load_file(tmp_path / n / "checkpoints" / "epoch_0001" / "model.safetensors") for n in ("a", "b")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # the CLI's `protege synthesize` path: the set the run made is found and kept
    path = pg.synthesize(_run_cfg(tmp_path, teacher_file, "a", syn))
    assert path == tmp_path / "a" / "synthetic"
    assert torch.equal(load_file(path / "images.safetensors")["images"], sets[0]["images"])


ADVERSARIAL = {
    "method": "adversarial",
    "steps_per_epoch": 3,
    "generator_every": 2,
    "z_dim": 8,
    "generator_width": 8,
}


def _adversarial(tmp_path: Path, teacher_file: Path) -> tuple[pg.Distiller, Any, list[pg.Callback], Any]:
    cfg = _run_cfg(tmp_path, teacher_file, "adv", ADVERSARIAL)
    data = load_run_data(cfg)
    distiller = build_distiller(cfg, data)
    assert isinstance(distiller, pg.Distiller)
    loader, callbacks = synthetic_training(cfg, data, distiller, cfg.run_dir)
    return distiller, loader, callbacks, cfg


def test_adversarial_generator_resumes_exactly(teacher_file: Path, tmp_path: Path) -> None:
    distiller, loader, callbacks, cfg = _adversarial(tmp_path / "full", teacher_file)
    assert len(loader) == 3
    pg.fit(distiller, loader, None, cfg.train_config(), cfg.run_dir, callbacks=callbacks)
    full_student = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    full_gen = callbacks[0].state_dict()
    assert any(k.startswith("optimizer.") for k in full_gen)

    d1, l1, c1, parts = _adversarial(tmp_path / "parts", teacher_file)
    pg.fit(d1, l1, None, cfg.train_config(), parts.run_dir, callbacks=c1, stop_after_epochs=1)
    d2, l2, c2, _ = _adversarial(tmp_path / "parts", teacher_file)
    summary = pg.fit(d2, l2, None, cfg.train_config(), parts.run_dir, resume=True, callbacks=c2)
    assert summary["status"] == "completed"
    assert all(torch.equal(full_student[k], v) for k, v in d2.student.state_dict().items())
    resumed_gen = c2[0].state_dict()
    assert resumed_gen.keys() == full_gen.keys()
    assert all(torch.equal(full_gen[k].cpu(), resumed_gen[k].cpu()) for k in full_gen)
    record = (parts.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    assert "synthesis/disagreement" in record and "synthesis/seconds_per_batch" in record
    assert (parts.run_dir / "synthetic" / "grid.png").is_file()

    # protege synthesize on an adversarial config: samples of the trained generator, as a set
    sampling = _run_cfg(tmp_path / "full", teacher_file, "adv", {**ADVERSARIAL, "n_images": 12})
    sampled = load_synthetic_set(pg.synthesize(sampling))
    assert sampled.images.shape == (12, 1, 8, 8) and sampled.index["method"] == "adversarial"
    lo, hi = _spec().range()
    assert sampled.images.min() >= lo.min() - 1e-6 and sampled.images.max() <= hi.max() + 1e-6


def test_cli_synthesize_writes_a_set_and_refuses_other_options(teacher_file: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from protege.cli import app

    syn = {"n_images": 10, "batch_size": 10, "iterations": 2}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_cfg(tmp_path, teacher_file, "cli", syn).model_dump(mode="json")))
    runner = CliRunner()
    made = runner.invoke(app, ["synthesize", str(path)])
    assert made.exit_code == 0, made.output
    assert "10 images (deepinversion)" in made.output and "s per batch" in made.output
    assert '"seconds_per_batch"' in (tmp_path / "cli" / "synthetic" / "index.json").read_text()
    refused = runner.invoke(app, ["synthesize", str(path), "--set", "data.synthesis.iterations=3"])
    assert isinstance(refused.exception, ProtegeError)  # main() prints it alone, exit status 2
    assert "iterations 2 -> 3" in str(refused.exception) and "--overwrite" in str(refused.exception)
    again = runner.invoke(
        app, ["synthesize", str(path), "--set", "data.synthesis.iterations=3", "--overwrite"]
    )
    assert again.exit_code == 0, again.output
