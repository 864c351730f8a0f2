"""The task-metrics run report of tasks other than classification, from real 1-epoch vision_language
runs on a fake Fashion-MNIST (tests/test_vision_language_task.py's set-up): teacher → baseline (CE
through the class prompts) → distilled student, and a two-stage (DC-CLIP-shaped) run; the CLI
writes each report itself, ``protege report`` again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import run_cli
from protege.analysis.html import num, pct
from protege.analysis.report import TASK_SECTIONS
from protege.cli import app
from test_fashion_mnist import write_fake
from test_vision_language_task import SEEN, VLM_OOD_TERMS, _config, _tiny

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"seen": SEEN, "attributes": True, "few_shot": [1]}
STAGED = {"seen": SEEN, "languages": ["en", "zh"], "few_shot": [1]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/``: teacher (all classes), baseline and student (6 seen classes), and ``staged``
    (feature distillation, then image–caption alignment; English and Chinese)."""
    tmp = tmp_path_factory.mktemp("vl-report")
    root = write_fake(tmp / "fm")

    def cli(*args: str) -> None:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, result.output[-3000:]

    teacher = _config(
        tmp,
        "teacher",
        root,
        {"few_shot": [1]},
        student=_tiny(),
        terms=[{"loss": "ce"}, {"loss": "clip_contrastive"}],
    )
    cli("train", str(teacher))
    sections = {"teacher": _tiny(weights=str(tmp / "runs" / "teacher")), "student": _tiny()}
    base = _config(tmp, "student-baseline", root, OPTIONS, terms=[{"loss": "ce"}], **sections)
    cli("train", str(base))
    cli("distill", str(_config(tmp, "student", root, OPTIONS, terms=VLM_OOD_TERMS, **sections)))
    stages = [
        {"name": "distill", "terms": [{"loss": "feat_mse"}]},
        {"name": "align", "terms": [{"loss": "clip_contrastive"}]},
    ]
    staged = _tiny()
    staged["kwargs"]["text_field"] = "text_mix"
    cli(
        "distill", str(_config(tmp, "staged", root, STAGED, stages=stages, **{**sections, "student": staged}))
    )
    return tmp / "runs"


def _rows(page: str, section: str) -> dict[str, list[str]]:
    """The rows of a section's tables by their first cell."""
    start = page.index(f'<section id="{section}">')
    body = page[start : page.index("</section>", start)]
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body):
        cells = re.findall(r"<td>(.*?)</td>", row)
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_distill_writes_the_task_report_with_every_metric_beside_the_baseline(runs: Path) -> None:
    run_dir = runs / "student"
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert [s for s in TASK_SECTIONS if f'<section id="{s}">' in page] == [
        "summary",
        "metrics",
        "curves",
        "probes",
    ]  # one stage: no stages section
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 2  # the curves and the further validation metrics
    summary = json.loads((run_dir / "summary.json").read_text())
    last, best = summary["test"]["last"], summary["test"]["best"]
    base = json.loads((runs / "student-baseline" / "summary.json").read_text())["test"]
    metrics = _rows(page, "metrics")
    # metric: what, distilled last, distilled best, baseline last, baseline best, Δ, teacher
    zs = metrics["zs_unseen"]
    assert "open vocabulary" in zs[0]
    assert zs[1:7] == [
        pct(last["zs_unseen"]),
        pct(best["zs_unseen"]),
        pct(base["last"]["zs_unseen"]),
        pct(base["best"]["zs_unseen"]),
        f"{100 * (last['zs_unseen'] - base['last']['zs_unseen']):+.2f} pp",
        pct(last["teacher_zs_unseen"]),
    ]
    assert metrics["acc"][-1] == pct(last["teacher_acc"])  # the teacher's reference beside the student's
    assert metrics["kl"][1:] == [
        num(last["kl"]),
        num(best["kl"]),
        num(base["last"]["kl"]),
        num(base["best"]["kl"]),
        f"{last['kl'] - base['last']['kl']:+.4f}",
        "—",  # the teacher has no fidelity to itself
    ]
    every = {k for k in last if not k.startswith("teacher_")}
    assert every <= set(metrics)  # every metric the evaluator wrote has a row
    assert {"few-shot probe", "retrieval (recall@k)", "fidelity to the teacher"} <= set(metrics)
    assert metrics["fewshot_unseen@1"][1] == pct(last["fewshot_unseen@1"])
    assert metrics["i2t_r1"][1] == pct(last["i2t_r1"])
    # header: task, terms, models, classes; summary: cost from summary.json
    assert "1·clip_cls image_embeds→class_embeds" in page and "1·vl_align (k=3)" in page
    assert "task</b> vision_language" in page and "text=transformer (heads=2, layers=1, width=32)" in page
    assert "unseen (4): Pullover, Sandal, Shirt, Bag" in page
    assert "found beside the run" in page and str(runs / "student-baseline") in page
    rows = _rows(page, "summary")
    distilled = next(v for k, v in rows.items() if k.startswith("distilled"))
    assert distilled[0] == pct(last["zs_unseen"]) and f"{summary['student']['params']:,}" in distilled
    assert "not computed for task vision_language" in page
    record = json.loads((run_dir / "report.json").read_text())  # the same numbers, for scripts
    assert record["task"] == "vision_language" and record["baseline"] == str(runs / "student-baseline")
    assert record["metrics"]["distilled"]["last"]["zs_unseen"] == last["zs_unseen"]
    assert record["metrics"]["teacher"]["zs_unseen"] == last["teacher_zs_unseen"]


def test_two_stage_report_has_a_row_per_stage(runs: Path) -> None:
    run_dir = runs / "staged"
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = _rows(page, "stages")
    header = re.findall(r"<th>(.*?)</th>", page[page.index('<section id="stages">') :])
    assert header[:4] == ["stage", "terms", "epochs", "wall s"]
    first, final = stages["1. distill"], stages["2. align (stages 1–2: the run)"]
    assert first[0] == "1·feat_mse image_embeds→image_embeds"
    assert final[0] == "1·clip_contrastive image_embeds,text_embeds→image_embeds,text_embeds"
    for key in ("zs_unseen", "acc", "i2t_r1", "zs_unseen:zh"):
        column = header.index(key) - 1
        assert first[column] == pct(summary["stages"][0]["test"]["last"][key]), key  # stage 1 alone
        assert final[column] == pct(summary["test"]["last"][key]), key  # stages 1 + 2
    metrics = _rows(page, "metrics")
    assert "language zh" in metrics and metrics["acc:zh"][1] == pct(summary["test"]["last"]["acc:zh"])
    assert "distill: 1·feat_mse" in page and "align: 1·clip_contrastive" in page
    assert "languages: en, zh" in page
    record = json.loads((run_dir / "report.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["distill", "align"]
    assert record["stages"][0]["test_last"]["acc"] == summary["stages"][0]["test"]["last"]["acc"]


def test_cli_report_on_a_vision_language_run(runs: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "again.html"
    code, err = run_cli(
        monkeypatch,
        capsys,
        "report",
        str(runs / "student"),
        "--baseline",
        str(runs / "teacher"),
        "--out",
        str(out),
    )
    assert code == 0, err
    page = out.read_text(encoding="utf-8")
    assert (tmp_path / "again.json").is_file()
    assert "— given" in page and str(runs / "teacher") in page  # the baseline as given
    last = json.loads((runs / "student" / "summary.json").read_text())["test"]["last"]
    assert _rows(page, "metrics")["zs_unseen"][1] == pct(last["zs_unseen"])
