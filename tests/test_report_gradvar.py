"""Gradient variance: the estimator against numpy, and the λ sweep end to end (``protege analyze gradvar``)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml

from protege.analysis.gradvar import gradient_variance
from protege.errors import ProtegeError


def test_gradient_variance_against_numpy():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    batches = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(7)]

    def objectives(x):
        half_sq = 0.5 * (w - x).square().sum(1).mean()  # gradient: w − mean(x)
        return {"one": half_sq, "double": 2 * half_sq}

    out = gradient_variance(objectives, [w], batches)
    grads = np.stack([w.detach().numpy() - x.mean(0).numpy() for x in batches])
    expected = np.var(grads, axis=0, ddof=1).sum()
    assert out["one"]["variance"] == pytest.approx(expected, rel=1e-10)
    assert out["double"]["variance"] == pytest.approx(4 * expected, rel=1e-10)
    assert out["one"]["mean_sq_norm"] == pytest.approx(np.square(grads.mean(0)).sum(), rel=1e-10)
    assert out["one"]["batches"] == 7
    with pytest.raises(ProtegeError, match="at least 2"):
        gradient_variance(objectives, [w], batches[:1])


def test_gradvar_sweep_from_the_cli(tmp_path, monkeypatch, capsys):
    from protege import cli

    config = tmp_path / "kd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "kd",
                "output_dir": str(tmp_path / "runs"),
                "data": {"source": "digits", "batch_size": 64},
                "teacher": {"model": "mlp", "kwargs": {"input_size": 8}},  # random weights suffice here
                "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
                "terms": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "T": 2.0}],
                "epochs": 1,
                "progress": False,
                "measure_cost": False,
            }
        )
    )

    def call(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["protege", "analyze", "gradvar", str(config), *args])
        try:
            cli.main()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    assert call("--lambdas", "0,1", "--batches", "4") == 0
    out = tmp_path / "runs" / "kd" / "gradvar"
    result = json.loads((out / "gradvar.json").read_text())
    assert result["T"] == 2.0 and [r["lambda"] for r in result["rows"]] == [0.0, 1.0]
    zero, one = result["rows"]
    # λ = 0 is plain CE: with and without the KD term are the same gradient
    assert zero["var_kd_final"] == pytest.approx(zero["var_ce_final"], rel=1e-9)
    assert zero["var_kd_init"] == pytest.approx(zero["var_ce_init"], rel=1e-9)
    assert one["var_kd_init"] != pytest.approx(one["var_ce_init"], rel=1e-3)
    assert one["var_ce_init"] == pytest.approx(zero["var_ce_init"], rel=1e-9)  # same init, same batches
    assert result["argmin_lambda"] == min(result["rows"], key=lambda r: r["var_kd_final"])["lambda"]
    assert (out / "lambda_0" / "summary.json").is_file() and (out / "lambda_1" / "summary.json").is_file()
    assert 'src="data:image/png;base64,' in (out / "gradvar.html").read_text()
    assert "least variance at λ" in " ".join(capsys.readouterr().out.split())
    assert call("--lambdas", "0,2") == 2
    assert "in [0, 1]" in capsys.readouterr().err
