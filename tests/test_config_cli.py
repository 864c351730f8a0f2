"""Run config (schema, overrides, error messages) and the CLI end to end on digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from protege.config import load_config
from protege.core.distiller import Term
from protege.errors import ProtegeError

MLP8 = {"kwargs": {"input_size": 8}}


def _write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _base(tmp_path: Path, **extra) -> dict:
    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "batch_size": 64},
        "student": {"model": "mlp_s", **MLP8},
        "epochs": 2,
        "progress": False,
    }
    cfg.update(extra)
    return cfg


def test_overrides_and_defaults(tmp_path):
    path = _write(tmp_path, _base(tmp_path, terms=[{"loss": "ce"}, {"loss": "kd", "T": 4}]))
    cfg = load_config(path, ["optim.lr=0.3", "terms.1.T=2", "schedule.name=step", "data.options.size=16"])
    assert cfg.optim.lr == 0.3
    assert cfg.terms[1].params == {"T": 2}
    assert cfg.schedule.name == "step"
    assert cfg.data.options == {"size": 16}
    assert cfg.train_config().optim.lr == 0.3


@pytest.mark.parametrize(
    ("change", "overrides", "message"),
    [
        ({"optim": {"lrr": 0.1}}, [], "optim.lrr: unknown key. did you mean 'lr'?"),
        ({"epoch": 3}, [], "did you mean 'epochs'?"),
        ({}, ["optim.lr=fast"], "optim.lr: Input should be a valid number"),
        ({}, ["optim.name=adagrad"], "'sgd', 'adamw' or 'adam'"),
        ({}, ["terms.3.T=1"], "the list has 1 items"),
        ({}, ["epochs"], "--set expects KEY=VALUE"),
    ],
)
def test_config_errors_are_one_clear_message(tmp_path, change, overrides, message):
    path = _write(tmp_path, {**_base(tmp_path), **change})
    with pytest.raises(ProtegeError) as e:
        load_config(path, overrides)
    assert message in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ProtegeError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protege.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_errors_have_no_traceback(tmp_path):
    cases = [
        (_base(tmp_path, optim={"lrr": 1}), "did you mean 'lr'"),
        (_base(tmp_path, student={"model": "resnt20"}), "resnet20"),
        (_base(tmp_path, data={"source": "imagefolder", "root": str(tmp_path / "missing")}), "not found"),
        (_base(tmp_path, data={"source": "digitz"}), "digits"),
        (_base(tmp_path, terms=[{"loss": "kd"}]), "no teacher"),
    ]
    for i, (cfg, expected) in enumerate(cases):
        path = _write(tmp_path, cfg, f"bad{i}.yaml")
        proc = _cli("distill", str(path), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert expected in proc.stderr.replace("\n", " "), proc.stderr
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists(), "a failed start must leave no run behind"


def test_cli_train_distill_evaluate_on_digits(tmp_path):
    teacher = _write(
        tmp_path, _base(tmp_path, name="teacher", student={"model": "mlp", **MLP8}), "teacher.yaml"
    )
    student = _base(
        tmp_path,
        name="kd",
        teacher={"model": "mlp", **MLP8, "weights": str(tmp_path / "runs" / "teacher")},
        terms=[{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}],
    )
    kd = _write(tmp_path, student, "kd.yaml")
    for args in (("train", str(teacher)), ("distill", str(kd), "--set", "optim.lr=0.1")):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "kd"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/pointers.json"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml").optim.lr == 0.1  # the resolved config, overrides applied
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert {"train/ce", "train/kd", "val/acc", "val/agreement", "val/kl", "val/ece", "val/nll"} <= set(
        lines[-1]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["params"] > summary["student"]["params"]
    assert {"last", "best"} == set(summary["test"])

    proc = _cli("evaluate", str(run), "--json", str(tmp_path / "ev.json"), "--no-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["metrics"]["acc"] == pytest.approx(summary["test"]["best"]["acc"])
    # the teacher is evaluated frozen here too: fidelity matches the run's own test evaluation
    for key in ("teacher_acc", "agreement", "kl"):
        assert ev["metrics"][key] == pytest.approx(summary["test"]["best"][key], abs=1e-6), key
    assert 0.0 <= ev["metrics"]["agreement"] <= 1.0 and ev["metrics"]["kl"] >= 0.0

    # the same run again without --resume/--overwrite is refused and nothing is lost
    proc = _cli("distill", str(kd), cwd=tmp_path)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_schema_and_methods(tmp_path):
    proc = _cli("config", "schema", cwd=tmp_path)
    schema = json.loads(proc.stdout)
    assert {"student", "teacher", "terms", "optim", "schedule", "epochs", "data"} <= set(schema["properties"])
    proc = _cli("methods", cwd=tmp_path)
    for name in ("kd", "dkd", "dist", "ctkd", "multi_kd", "ce"):
        assert name in proc.stdout


def test_example_configs_validate():
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    federations = [p for p in configs if p.name.startswith("fed-")]  # federate's own schema
    for path in federations:
        from protege.federated.config import load_federation_config

        load_federation_config(path)
    for path in sorted(set(configs) - set(federations)):
        cfg = load_config(path)
        assert all(s.model for s in cfg.all_students().values()) and cfg.terms, path.name
        # every term (of every stage) names a registered loss with valid parameters
        stages = [cfg.stage_config(i) for i in range(len(cfg.stages))] or [cfg]
        for stage in stages:
            for t in stage.terms:
                Term(**t.term_kwargs())
