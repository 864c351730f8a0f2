"""The run report and ``compare``, built from real 2-epoch runs on the bundled digits."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import protege as pg
from protege.analysis.html import count, num, pct
from protege.analysis.report import SECTIONS, build_report, compare_runs, find_baseline
from protege.errors import ProtegeError


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """teacher (CNN) → baseline student (CE only) → distilled student, 2 epochs each; the
    distillation writes its report itself."""
    root = tmp_path_factory.mktemp("runs")
    common = {
        "output_dir": str(root),
        "data": {"source": "digits", "batch_size": 64, "transforms": "augment"},
        "epochs": 2,
        "progress": False,
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    }
    pg.run(pg.load_config(None, name="teacher", student={"model": "cnn_m"}, **common), mode="train")
    student = {
        **common,
        "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
        "teacher": {"model": "cnn_m", "weights": str(root / "teacher")},
    }
    pg.run(pg.load_config(None, name="baseline", **student), mode="train")
    terms = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4.0}]
    pg.run(pg.load_config(None, name="distilled", terms=terms, **student), mode="distill")
    return root


def _row(page: str, label: str) -> list[str]:
    """The cells of the summary-table row whose first cell starts with ``label``."""
    table = page[page.index('<section id="summary">') : page.index('<section id="curves">')]
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table):
        cells = re.findall(r"<td>(.*?)</td>", row)
        if cells and cells[0].startswith(label):
            return cells
    raise AssertionError(f"no row {label!r}")


def test_distill_writes_a_self_contained_report_whose_numbers_match_the_summaries(runs):
    page = (runs / "distilled" / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    # curves, reliability diagrams, CKA heatmaps, localization maps, per-class agreement
    assert page.count('src="data:image/png;base64,') >= 5
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "Maps of the teacher's predicted class: gradient saliency" in page  # an MLP has no spatial layer
    for name in ("distilled", "baseline"):
        summary = json.loads((runs / name / "summary.json").read_text())
        best, last = summary["test"]["best"], summary["test"]["last"]
        cells = _row(page, name)
        assert cells[1:8] == [
            pct(best["acc"]),
            pct(last["acc"]),
            pct(best["agreement"]),
            num(best["kl"]),
            num(best["ece"]),
            num(best["nll"]),
            count(summary["student"]["params"]),
        ]
    teacher = json.loads((runs / "teacher" / "summary.json").read_text())["test"]
    cells = _row(page, "teacher")
    assert cells[1:3] == [pct(teacher["best"]["acc"]), pct(teacher["last"]["acc"])]
    assert cells[5:7] == [num(teacher["best"]["ece"]), num(teacher["best"]["nll"])]
    assert "found beside the run" in page and str(runs / "baseline") in page
    numbers = json.loads((runs / "distilled" / "report.json").read_text())  # the same numbers, for scripts
    distilled = json.loads((runs / "distilled" / "summary.json").read_text())["test"]["best"]
    assert numbers["summary"][_row(page, "distilled")[0]]["agreement"] == distilled["agreement"]
    probes = numbers["probes"]
    assert (
        0 <= probes["localization"]["distilled_closer"] <= 1
        and probes["localization"]["method"] == "saliency"
    )
    assert {a["attack"] for a in probes["adversarial"]} == {"fgsm", "pgd"}
    assert set(probes["invariance"]) == {"shift ≤ 2 px (trained)", "noise σ = 0.1 (not trained)"}
    assert numbers["cka"]["teacher_taps"] == ["layer1", "layer2", "layer3", "logits"]


def test_report_options_errors_and_a_failure_that_keeps_the_run(runs, tmp_path, monkeypatch, capsys):
    out = build_report(
        runs / "distilled", baseline=runs / "baseline", out=tmp_path / "r.html", probes=False, latency=True
    )
    page = out.read_text()
    assert "Probes left out" in page and "given" in page and "measured now" in page
    assert all(_row(page, who)[-1].endswith("×") for who in ("teacher", "baseline", "distilled"))
    assert find_baseline(runs / "teacher")[0] is None  # no other run trains a cnn_m without a teacher
    with pytest.raises(ProtegeError, match="not a protege run"):
        build_report(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs / "baseline" / "config.yaml", unfinished)
    with pytest.raises(ProtegeError, match="has not finished"):
        find_baseline(runs / "distilled", explicit=unfinished)

    from protege.analysis import runs as reported_runs

    def broken(run_dir):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(reported_runs, "build_report", broken)
    written = reported_runs.write_run_report(pg.load_config(runs / "distilled" / "config.yaml"))
    assert written is None  # warns, does not raise
    assert "disk on fire" in capsys.readouterr().err
    assert (runs / "distilled" / "report.html").read_text().startswith("<!DOCTYPE html>")  # untouched


def test_cli_report_and_compare(runs, monkeypatch, capsys):
    from protege import cli

    def call(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["protege", *args])
        try:
            cli.main()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    assert call("compare", str(runs / "distilled"), str(runs / "baseline"), str(runs / "teacher")) == 0
    page = (runs / "compare.html").read_text()  # default: the runs' common parent
    assert page.count('src="data:image/png;base64,') == 2 and "fidelity vs accuracy" in page
    for name in ("distilled", "baseline", "teacher"):
        acc = json.loads((runs / name / "summary.json").read_text())["test"]["best"]["acc"]
        assert f"<td>{name}</td>" in page and pct(acc) in page
    assert call("report", str(runs / "nowhere")) == 2
    assert "not a protege run directory" in " ".join(capsys.readouterr().err.split())
    out = compare_runs([runs / "distilled"], out=runs / "one.html")
    assert out == runs / "one.html" and out.is_file()
