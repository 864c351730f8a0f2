"""The run report: ``runs/<name>/report.html``, and ``compare.html`` for several runs side by side.

:func:`build_report` reads a finished distillation run — ``config.yaml``, ``metrics.jsonl``,
``summary.json`` and its best checkpoint — rebuilds its teacher(s), its student and, when one is
found, the *baseline* (the same student trained without distillation), and writes one
self-contained HTML file (figures embedded, no script, nothing fetched) with:

1. **Summary**: teacher, baseline and distilled student — test accuracy at the last and the best
   epoch, agreement, predictive KL(teacher‖student), ECE, NLL, params, FLOPs, measured latency,
   speed-up (students' numbers from their ``summary.json``; the teacher's computed on the split);
2. **Curves**: each loss term, accuracy and fidelity per epoch (``metrics.jsonl``);
3. **Calibration**: reliability diagrams;
4. **Representation similarity**: linear CKA between every teacher tap and every student tap;
5. **What got distilled** (:mod:`protege.analysis.probes`, needs the baseline): localization,
   adversarial transfer, invariance, per-class agreement;
6. **Gradient variance**: the ``protege analyze gradvar`` sweep, when the run has one.

A run of another task (``vision_language``, ``lm``, ...) gets the *task-metrics report* instead,
from its files alone, no model loaded: summary (models with their key settings, terms, data —
for vision_language the seen and unseen classes and the languages —, headline metrics, params,
FLOPs, latency, wall time); every metric the task's evaluator wrote to ``summary.json``, grouped
(accuracy / zero-shot, few-shot, retrieval, likelihood and calibration, fidelity, one group per
further language), for the last and best checkpoints, beside the baseline's and the teacher's;
one row per stage of a multi-stage run (DC-CLIP: stage 1 alone vs stages 1 + 2); the curves; and,
for a task that draws what its models do (``Task.report_figures``: generation's samples per class,
teacher vs one-step student), those figures — the one part that loads the run's models. The
classification probes are not computed for it.

:func:`compare_runs` puts several runs' summaries side by side with a fidelity-vs-accuracy scatter
(Stanton et al., NeurIPS 2021: a student can generalize well and still be far from its teacher).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.ticker import MaxNLocator
from torch import nn

from ..build import build_from
from ..config import RunConfig, load_config
from ..core.taps import Taps
from ..data.transforms import auto_recipe
from ..engine import checkpoint_dir, make_loader
from ..errors import ProtegeError
from ..files import atomic_write_text
from ..metrics.cka import cka_matrix
from ..metrics.cost import model_costs
from ..metrics.fidelity import classification_report, reliability
from ..pipeline import LoadedRun, load_run
from ..tasks import Task, build_task
from ..tasks.base import ensemble_logits
from . import html as H
from .probes import (
    Transform,
    adversarial_transfer,
    gaussian_noise,
    hflip,
    invariance,
    localization,
    per_class_agreement,
    predict,
    random_shift,
    share_closer,
)

#: the report's sections, by HTML id, in order
SECTIONS = ("summary", "curves", "calibration", "similarity", "probes", "gradvar")
#: attack strengths of the adversarial-transfer probe, in pixel units (images in [0, 1])
EPSILONS = (0.03, 0.1, 0.2)
#: images the adversarial probe attacks (its PGD is the report's most expensive part)
ATTACK_IMAGES = 200
_BUNDLED = ("mnist5k", "digits")
_COLORS = {"teacher": "#444444", "baseline": "#d1495b", "distilled": "#2a7ab0"}


# -- reading runs -------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProtegeError(f"cannot read {path}: {e}") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` (one per evaluated epoch); empty when there is none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(run_dir: Path) -> dict[str, Any]:
    """The summary of a finished run, or a clear error."""
    if not (run_dir / "config.yaml").is_file():
        raise ProtegeError(f"{run_dir} is not a protege run directory (no config.yaml)")
    if not (run_dir / "summary.json").is_file():
        raise ProtegeError(f"{run_dir} has no summary.json: the run has not finished (resume it first)")
    return read_json(run_dir / "summary.json")


def split_metrics(summary: dict[str, Any]) -> tuple[str, dict[str, float], dict[str, float]]:
    """``(split, best, last)``: test metrics of the best and last checkpoints from a run's summary,
    or the validation metrics of its best and last epochs when it has no test split."""
    test = summary.get("test") or {}
    if isinstance(test.get("best"), dict) and "acc" in test["best"]:
        return "test", test["best"], test.get("last", {})

    def val(record: dict[str, Any]) -> dict[str, float]:
        return {k[4:]: v for k, v in record.items() if k.startswith("val/")}

    return "val", val(summary.get("best", {})), val(summary.get("final", {}))


def _same_student(a: RunConfig, b: RunConfig) -> bool:
    return (
        a.student is not None
        and b.student is not None
        and (a.student.model, a.student.kwargs) == (b.student.model, b.student.kwargs)
        and (a.data.source, a.data.options, a.data.root) == (b.data.source, b.data.options, b.data.root)
    )


def find_baseline(run_dir: str | Path, explicit: str | Path | None = None) -> tuple[Path | None, str]:
    """The baseline of a run — its student trained without distillation — and how it was found.

    In order: ``explicit``; the run config's ``baseline``; else among the runs beside it, one
    trained with ``protege train`` (``mode: train``) with the same student model and data,
    preferring one named ``baseline`` or ``<name>-baseline``, then the same seed.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    given = explicit if explicit is not None else cfg.baseline
    if given is not None:
        path = Path(given)
        _finished(path)
        how = "given" if explicit is not None else "named by the run config's 'baseline'"
        return path, how
    if not run_dir.parent.is_dir():
        return None, "no baseline: the run has no sibling runs"
    stem = cfg.name.rsplit("-", 1)[0]
    preferred = {"baseline", f"{cfg.name}-baseline", f"{stem}-baseline"}
    found = []
    for d in sorted(run_dir.parent.iterdir()):
        if d.resolve() == run_dir.resolve() or not (d / "summary.json").is_file():
            continue
        try:
            other = load_config(d / "config.yaml")
            summary = read_json(d / "summary.json")
        except ProtegeError:
            continue
        if summary.get("mode") == "train" and summary.get("test") and _same_student(cfg, other):
            found.append((d.name not in preferred, other.seed != cfg.seed, d.name, d))
    if not found:
        return None, (
            f"no baseline: no run beside {run_dir} trains {cfg.student.model if cfg.student else 'the student'} "
            "on the same data without a teacher"
        )
    best = min(found)
    return best[
        3
    ], f"found beside the run (same student and data, mode train{', same seed' if not best[1] else ''})"


def _teacher_run(cfg: RunConfig) -> Path | None:
    """The run directory the (first) teacher's weights come from, when they come from a run."""
    teachers = cfg.all_teachers()
    if not teachers or teachers[0].weights is None:
        return None
    path = Path(teachers[0].weights)
    for candidate in (path, *path.parents[:3]):
        if (candidate / "config.yaml").is_file() and (candidate / "summary.json").is_file():
            return candidate
    return None


# -- computing ----------------------------------------------------------------------------------


def _eval_tensors(loaded: LoadedRun, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = loaded.data.test if split == "test" else loaded.data.val
    if dataset is None:
        raise ProtegeError(f"the data source {loaded.data.source!r} has no {split} split")
    xs, ys = [], []
    for batch in make_loader(dataset, loaded.cfg.data.eval_batch_size, shuffle=False):
        x, y = loaded.task.split(batch)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _teacher_logits(loaded: LoadedRun, x: torch.Tensor) -> torch.Tensor:
    weights = [t.weight for t in loaded.cfg.all_teachers()]
    return ensemble_logits([{"logits": predict(t, x)} for t in loaded.teachers], weights)


def tap_paths(model: nn.Module) -> list[str]:
    """The layers to compare: the model's ``feature_modules`` (protege zoo), else its top-level children."""
    paths = list(getattr(model, "feature_modules", None) or [n for n, _ in model.named_children()])
    return [p for p in paths if p]


@torch.no_grad()
def tap_features(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Every tap's output (flattened per input) and the logits of ``model`` on ``x``."""
    feats: dict[str, list[torch.Tensor]] = {}
    with Taps(model, tap_paths(model)) as taps:
        for start in range(0, len(x), batch_size):
            logits = predict(model, x[start : start + batch_size])
            for name, value in {**taps.pop(), "logits": logits}.items():
                feats.setdefault(name, []).append(value.detach().float().cpu().reshape(len(logits), -1))
    return {name: torch.cat(parts) for name, parts in feats.items() if sum(map(len, parts)) == len(x)}


def _recipe(transforms: str, source: str) -> str:
    if transforms != "auto":
        return transforms
    return "none" if source in _BUNDLED else auto_recipe(source)


def invariance_transforms(cfg: RunConfig, loaded: LoadedRun) -> dict[str, Transform]:
    """Transformations the teacher was trained to be invariant to (from its run's data recipe),
    plus Gaussian noise as a control it was not trained on. Pixel units map through the data's
    normalisation."""
    teacher_run = _teacher_run(cfg)
    tcfg = load_config(teacher_run / "config.yaml") if teacher_run is not None else cfg
    recipe = _recipe(tcfg.data.transforms, tcfg.data.source)
    data = loaded.data
    mean = torch.tensor(data.mean or (0.0,) * data.in_chans).view(-1, 1, 1)
    std = torch.tensor(data.std or (1.0,) * data.in_chans).view(-1, 1, 1)
    fill = (0.0 - mean) / std  # black, as the training transforms pad
    out: dict[str, Transform] = {}
    if recipe == "augment":
        out["shift ≤ 2 px (trained)"] = random_shift(2, fill)
    if recipe == "cifar":
        out["shift ≤ 4 px (trained)"] = random_shift(4, fill)
    if recipe in ("cifar", "imagenet"):
        out["horizontal flip (trained)"] = hflip
    out["noise σ = 0.1 (not trained)"] = gaussian_noise(0.1 / std)
    return out


def _pixel_bounds(loaded: LoadedRun) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, lo, hi)``: one pixel unit in the inputs' units, and the valid input range."""
    data = loaded.data
    mean = torch.tensor(data.mean or (0.0,) * data.in_chans).view(-1, 1, 1)
    std = torch.tensor(data.std or (1.0,) * data.in_chans).view(-1, 1, 1)
    return 1.0 / std, (0.0 - mean) / std, (1.0 - mean) / std


# -- figures ------------------------------------------------------------------------------------


def _curves(
    metrics: list[dict[str, Any]], baseline: list[dict[str, Any]], stage_starts: Sequence[int] = ()
) -> str:
    """The loss terms, validation accuracy and fidelity per epoch; ``stage_starts``: the epochs
    (0-based, counted on across stages) a later stage of a multi-stage run begins at, marked."""
    plt = H.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.6))
    ax = axes[0][0]
    terms = sorted({k for m in metrics for k in m if k.startswith("train/") and k != "train/loss"})
    for key in [*terms, "train/loss"]:
        ys = [m.get(key, math.nan) for m in metrics]
        wide = key == "train/loss"
        ax.plot(
            [m["epoch"] + 1 for m in metrics], ys, marker="o", ms=3, lw=2.2 if wide else 1.5, label=key[6:]
        )
    if all(m.get(key, 0) > 0 for m in metrics for key in terms):
        H.log_scale(ax)
    ax.set(title="training loss terms (as weighted)", ylabel="loss")
    panels = (
        (axes[0][1], "val/acc", "validation accuracy", "accuracy"),
        (axes[1][0], "val/agreement", "fidelity: top-1 agreement with the teacher", "agreement"),
        (axes[1][1], "val/kl", "fidelity: KL(teacher ‖ student)", "nats"),
    )
    for ax, key, title, ylabel in panels:
        for name, ms in (("distilled", metrics), ("baseline (no KD)", baseline)):
            if ms and key in ms[-1]:
                xs = [m["epoch"] + 1 for m in ms]
                color = _COLORS["distilled" if name == "distilled" else "baseline"]
                ax.plot(xs, [m.get(key, math.nan) for m in ms], marker="o", ms=3, color=color, label=name)
        if key == "val/acc" and metrics and "val/teacher_acc" in metrics[-1]:
            ax.axhline(
                metrics[-1]["val/teacher_acc"], color=_COLORS["teacher"], ls="--", lw=1.2, label="teacher"
            )
        ax.set(title=title, ylabel=ylabel)
    for ax in axes.flat:
        _mark_stages(ax, stage_starts)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return H.figure(
        fig,
        "loss, accuracy and fidelity curves",
        "Per epoch: the training loss terms as the distiller weighs them, validation accuracy, and fidelity "
        "to the teacher on the validation split (the baseline's where a baseline run was found).",
    )


def _mark_stages(ax: Any, stage_starts: Sequence[int]) -> None:
    """A dotted line between the last epoch of a stage and the first of the next one."""
    for start in stage_starts:
        ax.axvline(start + 0.5, color="#888888", ls=":", lw=1)


def _reliability(logits: dict[str, torch.Tensor], target: torch.Tensor) -> str:
    plt = H.pyplot()
    fig, axes = plt.subplots(1, len(logits), figsize=(4.3 * len(logits), 4.1), squeeze=False)
    for ax, (name, z) in zip(axes[0], logits.items()):
        bins = reliability(z, target, n_bins=15)
        edges = bins["edges"].numpy()
        centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        filled = bins["count"].numpy() > 0
        ax.bar(
            centers[filled],
            bins["acc"].numpy()[filled],
            width=width * 0.92,
            color=_COLORS.get(name, "C0"),
            alpha=0.85,
            label="accuracy",
        )
        ax.bar(
            centers[filled],
            (bins["conf"] - bins["acc"]).numpy()[filled],
            bottom=bins["acc"].numpy()[filled],
            width=width * 0.92,
            color="none",
            edgecolor="#d1495b",
            hatch="//",
            lw=0.6,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], color="#888", ls="--", lw=1)
        report = classification_report(z, target)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence",
            ylabel="accuracy",
            title=f"{name}: ECE {report['ece']:.4f}",
        )
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return H.figure(
        fig,
        "reliability diagrams",
        "Accuracy per confidence bin (15 equal bins; empty bins left out); "
        "a calibrated model follows the diagonal. The hatched bar is the gap between mean confidence and accuracy.",
    )


def _heatmaps(mats: dict[str, torch.Tensor], rows: list[str], cols: list[str]) -> str:
    plt = H.pyplot()
    n = len(mats)
    fig, axes = plt.subplots(
        1, n, figsize=(max(4.0, 0.9 * len(cols) + 2.2) * n, 0.6 * len(rows) + 2.0), squeeze=False
    )
    image = None
    for ax, (name, m) in zip(axes[0], mats.items()):
        image = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=9)
        ax.set_yticks(range(len(rows)), rows, fontsize=9)
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = float(m[i, j])
                ax.text(
                    j,
                    i,
                    "—" if math.isnan(v) else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 0.6 else "black",
                )
        ax.set(
            title=f"{name} student", xlabel="student tap", ylabel="teacher tap" if ax is axes[0][0] else ""
        )
    fig.colorbar(image, ax=list(axes[0]), fraction=0.025, pad=0.02, label="linear CKA")
    return H.figure(
        fig,
        "CKA heatmaps",
        "Linear CKA (Kornblith et al., 2019) between each teacher tap (rows) and "
        "each student tap (columns) on the same images; 1 = the same representation up to rotation and scale.",
    )


# -- sections -----------------------------------------------------------------------------------


def _terms_text(cfg: RunConfig) -> str:
    final = cfg.stage_config(len(cfg.stages) - 1) if cfg.stages else cfg
    parts = []
    for t in final.terms:
        params = ", ".join(f"{k}={v}" for k, v in t.params.items())
        keys = [",".join(k) if isinstance(k, list) else k for k in (t.student, t.teacher)]
        where = "" if t.student == "logits" else f" {keys[0]}→{keys[1]}"
        parts.append(f"{t.weight:g}·{t.loss}{where}" + (f" ({params})" if params else ""))
    return " + ".join(parts)


def _cost(summary: dict[str, Any], who: str) -> dict[str, Any]:
    cost = summary.get(who) or {}
    return {
        "params": cost.get("params"),
        "flops": cost.get("flops"),
        "ms": (cost.get("latency") or {}).get("ms"),
        "speedup": cost.get("speedup", 1.0 if who == "teacher" and cost else None),
    }


_METRIC_COLUMNS = ("acc (best)", "acc (last)", "agreement", "KL(t‖s)", "ECE", "NLL")


def _metric_cells(best: dict[str, Any], last_acc: Any) -> list[str]:
    """Cells under :data:`_METRIC_COLUMNS`: ``best`` holds ``acc`` (or ``acc_best``), agreement, kl, ece, nll."""
    acc = best.get("acc_best", best.get("acc"))
    return [H.pct(acc), H.pct(last_acc), H.pct(best.get("agreement"))] + [
        H.num(best.get(k)) for k in ("kl", "ece", "nll")
    ]


def _speedup(x: Any) -> str:
    return "—" if H.missing(x) else f"{x:.2f}×"


def _summary_section(
    rows: list[tuple[str, dict[str, Any]]], split: str, notes: list[str], measured: bool
) -> str:
    header = ["model", *_METRIC_COLUMNS, "params", "MFLOPs", "latency ms", "speed-up"]
    cells = [
        [
            label,
            *_metric_cells(r, r.get("acc_last")),
            H.count(r.get("params")),
            H.num(None if r.get("flops") is None else r["flops"] / 1e6, 2),
            H.num(r.get("ms"), 3),
            _speedup(r.get("speedup")),
        ]
        for label, r in rows
    ]
    text = (
        f"<p>On the {H.esc(split)} split. Accuracy of the checkpoint best on validation and of the last epoch; "
        "agreement, KL, ECE and NLL of the best checkpoint; the students' from their runs' <code>summary.json</code>, "
        "the teacher's computed on the split. Latency: median batch-1 forward, "
        + (
            "measured now, all models side by side"
            if measured
            else "as measured side by side at the end of the distillation"
        )
        + "; speed-up = teacher latency / model latency.</p>"
    )
    return (
        text
        + H.table(header, cells, highlight=[label.startswith("distilled") for label, _ in rows])
        + "".join(H.note(n) for n in notes)
    )


def _probe_section(
    loaded: LoadedRun,
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    logits: dict[str, torch.Tensor],
    record: dict[str, Any],
) -> str:
    """The probes' HTML; their numbers go into ``record``."""
    plt = H.pyplot()
    teacher = loaded.teachers[0]
    students = {"distilled": loaded.student, "baseline": base}
    out = [
        "<p>Each probe compares the distilled student with the baseline (the same student trained "
        f"without the teacher), relative to the teacher; on {len(x):,} images of the split "
        "(after Ojha et al., 2023).</p>"
    ]

    loc = localization(teacher, students, x)
    sim_d, sim_b = loc["similarity"]["distilled"], loc["similarity"]["baseline"]
    record["localization"] = {
        "method": loc["method"],
        "layers": loc["layers"],
        "similarity": {"distilled": sim_d.mean().item(), "baseline": sim_b.mean().item()},
        "distilled_closer": share_closer(sim_d, sim_b),
    }
    method = (
        "Grad-CAM at each model's last spatial layer"
        if loc["method"] == "grad-cam"
        else ("gradient saliency |∂y/∂x| (Grad-CAM needs a spatial layer, which a model here lacks)")
    )
    out.append("<h3>Localization</h3>")
    out.append(
        H.table(
            [
                "",
                "mean cosine similarity to the teacher's map",
                "share of images closer than the other student",
            ],
            [
                ["distilled", H.num(sim_d.mean().item(), 3), H.pct(share_closer(sim_d, sim_b), 1)],
                ["baseline", H.num(sim_b.mean().item(), 3), H.pct(share_closer(sim_b, sim_d), 1)],
            ],
        )
    )
    k = min(6, len(x))
    spread = torch.linspace(0, len(x) - 1, k).long()  # the split may be sorted by class
    fig, axes = plt.subplots(4, k, figsize=(1.7 * k, 7.0), squeeze=False)
    shown = {
        "input": x[spread, 0],
        **{n: loc["maps"][n][spread] for n in ("teacher", "distilled", "baseline")},
    }
    for r, (name, maps) in enumerate(shown.items()):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(maps[c].numpy(), cmap="gray" if name == "input" else "magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.tight_layout()
    out.append(
        H.figure(
            fig,
            "localization maps",
            f"Maps of the teacher's predicted class: {H.esc(method)}. "
            "Similarity is the cosine between a student's map and the teacher's, per image.",
            width=min(110 * k + 40, 700),
        )
    )

    out.append("<h3>Adversarial transfer</h3>")
    scale, lo, hi = _pixel_bounds(loaded)
    rows, who = [], ("teacher", "distilled", "baseline")
    for attack in ("fgsm", "pgd"):
        for eps in EPSILONS:
            res = adversarial_transfer(
                teacher,
                students,
                x[:ATTACK_IMAGES],
                y[:ATTACK_IMAGES],
                eps=eps * scale,
                attack=attack,
                lo=lo,
                hi=hi,
            )
            record.setdefault("adversarial", []).append({**res, "eps": eps})
            rows.append(
                [
                    f"{attack.upper()} ε = {eps:g}",
                    f"{res['n']:,}",
                    *(H.pct(res["success"][n], 1) for n in who),
                ]
            )
    out.append(
        "<p>Untargeted L∞ attacks crafted on the teacher (ε in pixel units, images in [0, 1]; PGD: 10 steps). "
        f"Success rate = share of the images (of the first {ATTACK_IMAGES}) every model classifies correctly that the model misclassifies "
        "once attacked; the teacher's own column is the white-box rate. A student that learnt the teacher's "
        "decision boundaries falls for more of its adversarial examples.</p>"
    )
    out.append(H.table(["attack", "images", "teacher (white-box)", "distilled", "baseline"], rows))

    out.append("<h3>Invariance</h3>")
    transforms = invariance_transforms(loaded.cfg, loaded)
    inv = invariance({"teacher": teacher, **students}, x, transforms)
    record["invariance"] = inv
    out.append(
        "<p>Consistency: share of images whose prediction a transformation leaves unchanged; agreement: "
        "with the teacher on the transformed images. Transformations marked <em>trained</em> are those the "
        "teacher's training data augmentation made it invariant to.</p>"
    )
    out.append(
        H.table(
            [
                "transformation",
                "teacher consistency",
                "distilled consistency",
                "baseline consistency",
                "distilled agreement",
                "baseline agreement",
            ],
            [
                [
                    t,
                    H.pct(r["teacher"]["consistency"], 1),
                    H.pct(r["distilled"]["consistency"], 1),
                    H.pct(r["baseline"]["consistency"], 1),
                    H.pct(r["distilled"]["agreement"], 1),
                    H.pct(r["baseline"]["agreement"], 1),
                ]
                for t, r in inv.items()
            ],
        )
    )

    out.append("<h3>Per-class agreement</h3>")
    n_classes = loaded.data.num_classes
    names = list(getattr(loaded.data, "class_names", None) or range(n_classes))
    pcs = {
        n: per_class_agreement(logits[n], logits["teacher"], logits["target"], n_classes)
        for n in ("distilled", "baseline")
    }
    record["per_class_agreement"] = {n: pc["agreement"].tolist() for n, pc in pcs.items()}
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.55 * n_classes + 2), 14), 3.6))
    width = 0.4
    for i, n in enumerate(("distilled", "baseline")):
        ax.bar(
            torch.arange(n_classes).numpy() + (i - 0.5) * width,
            pcs[n]["agreement"].numpy(),
            width=width,
            color=_COLORS[n],
            label=n,
        )
    low = min(float(torch.nan_to_num(pcs[n]["agreement"], nan=1.0).min()) for n in pcs)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    if n_classes <= 30:
        ax.set_xticks(range(n_classes), [str(c) for c in names], fontsize=9)
    ax.set(xlabel="true class", ylabel="agreement with the teacher", title="per-class agreement")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.append(
        H.figure(
            fig,
            "per-class agreement",
            "Share of each true class's images where the student predicts the teacher's class.",
        )
    )
    order = torch.argsort(torch.nan_to_num(pcs["distilled"]["agreement"], nan=2.0))[: min(5, n_classes)]
    out.append(
        "<p>Where the distilled student departs most from the teacher:</p>"
        + H.table(
            ["class", "images", "agreement distilled", "agreement baseline", "acc distilled", "acc teacher"],
            [
                [
                    str(names[c]),
                    H.count(pcs["distilled"]["count"][c].item()),
                    H.pct(pcs["distilled"]["agreement"][c].item(), 1),
                    H.pct(pcs["baseline"]["agreement"][c].item(), 1),
                    H.pct(pcs["distilled"]["student_acc"][c].item(), 1),
                    H.pct(pcs["distilled"]["teacher_acc"][c].item(), 1),
                ]
                for c in order.tolist()
            ],
        )
    )
    return "".join(out)


def _gradvar_section(run_dir: Path) -> str:
    from .gradvar import gradvar_figure, gradvar_table

    path = run_dir / "gradvar" / "gradvar.json"
    if not path.is_file():
        return H.note(
            "No gradient-variance sweep for this run yet. Make one with "
            f"<code>protege analyze gradvar {H.esc(run_dir / 'config.yaml')}</code>; "
            "it lands in <code>gradvar/</code> beside this report, which picks it up when rebuilt."
        )
    result = read_json(path)
    return gradvar_table(result) + gradvar_figure(result)


# -- other tasks: the task-metrics report -------------------------------------------------------

#: the task-metrics report's sections, by HTML id, in order (``stages`` only for a multi-stage run)
TASK_SECTIONS = ("summary", "metrics", "stages", "curves", "probes")
#: metrics shown first, in this order (the others follow in natural order)
_ORDER = ("acc", "top5", "zs_seen", "zs_unseen", "nll", "ppl", "ece", "agreement", "kl")
#: the groups of the test-metrics table: title and which metric names (without language) it holds
_GROUPS: tuple[tuple[str, Any], ...] = (
    ("accuracy", lambda b: b in ("acc", "top5") or b.startswith("zs_")),
    ("few-shot probe", lambda b: b.startswith("fewshot_")),
    ("retrieval (recall@k)", lambda b: re.fullmatch(r"[it]2[ti]_r\d+", b) is not None),
    ("likelihood and calibration", lambda b: b in ("nll", "ppl", "ece")),
    ("fidelity to the teacher", lambda b: b in ("agreement", "kl")),
)
#: headline metrics (the summary table, one column per stage), where the run has them
_HEADLINE = ("zs_unseen", "zs_seen", "acc", "ppl", "agreement", "kl")
_WHAT = {
    "acc": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "nll": "negative log-likelihood",
    "ppl": "perplexity",
    "ece": "expected calibration error",
    "agreement": "top-1 agreement with the teacher",
    "kl": "KL(teacher ‖ student), nats",
}
_WHAT_TASK = {
    "vision_language": {
        "acc": "zero-shot top-1, all classes compete",
        "top5": "zero-shot top-5, all classes compete",
        "zs_seen": "zero-shot, seen classes' images, seen classes compete",
        "zs_unseen": "zero-shot, unseen classes' images, unseen classes compete (open vocabulary)",
        "fewshot_unseen": "logistic-regression probe on unseen classes' image embeddings, k per class",
        "i2t": "image → caption recall (a hit: a caption of the image's class)",
        "t2i": "caption → image recall (a hit: an image of the caption's class)",
    },
    "lm": {"acc": "next-token top-1 accuracy", "nll": "next-token NLL, nats"},
    "embedding": {
        "cos": "mean cosine, student vs teacher embedding of each held-out text",
        "cos_mapped": "mean cosine after a linear map into the teacher's space (2-fold cross-fitted)",
        "knn10": "overlap of each held-out text's top-10 neighbours, student vs teacher",
        "spearman": "Spearman's rho of pairwise cosine similarities, student vs teacher",
        "n_texts": "held-out texts measured",
    },
    "promptable_segmentation": {
        "miou": "mask IoU with the ground truth, mean of the one-point, three-point and box prompts",
        "miou_1pt": "mask IoU with the ground truth, one point per object (its most interior pixel)",
        "miou_3pt": "mask IoU with the ground truth, three points per object",
        "miou_box": "mask IoU with the ground truth, the object's box as the prompt",
        "tmiou": "mask IoU with the teacher's mask for the same prompt, mean of the three kinds",
        "tmiou_1pt": "mask IoU with the teacher's mask, one-point prompts",
        "tmiou_3pt": "mask IoU with the teacher's mask, three-point prompts",
        "tmiou_box": "mask IoU with the teacher's mask, box prompts",
        "iou_mae": "mean absolute error of the predicted IoU (the IoU head) against the true mask IoU",
    },
    "pointcloud_parts": {
        "class_miou": "part mIoU per shape (parts of its category), averaged per category, then over categories",
        "instance_miou": "part mIoU per shape (parts of its category), averaged over shapes",
        "acc": "per-point part accuracy",
        "agreement": "share of points whose predicted part agrees with the teacher's",
    },
    "landmarks": {
        "nme": "mean point error over the primary normalising distance (inter-ocular by default)",
        "nme_io": "mean point error / inter-ocular distance (outer eye corners)",
        "nme_ip": "mean point error / inter-pupil distance (eye centres)",
        "fr": "failure rate: images whose NME exceeds 0.1 (primary normalisation)",
        "fr_io": "failure rate at 0.1, inter-ocular NME",
        "fr_ip": "failure rate at 0.1, inter-pupil NME",
        "auc": "area under the cumulative error curve to 0.1 (primary normalisation)",
        "auc_io": "area under the cumulative error curve to 0.1, inter-ocular NME",
        "auc_ip": "area under the cumulative error curve to 0.1, inter-pupil NME",
        "tnme": "the student's NME against the teachers' (averaged) points",
        "nme_pt": "error of this landmark alone, over the primary normalising distance",
    },
}


def _natural(key: str) -> tuple[Any, ...]:
    """Sort key: :data:`_ORDER` first, then names with their numbers compared as numbers."""
    base, _, lang = key.partition(":")
    rank = _ORDER.index(base) if base in _ORDER else len(_ORDER)
    parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", base))
    return (lang, rank, parts)


def _is_share(key: str) -> bool:
    """Whether a metric is a share in [0, 1] (shown as a percentage)."""
    base = key.partition(":")[0].removeprefix("teacher_").removeprefix("teacher/")
    return (
        base in ("acc", "agreement", "knn10")
        or re.fullmatch(r"t?miou(_\w+)?", base) is not None
        or base.startswith("probe/")
        or base.startswith("nme_pt/")
        or re.fullmatch(r"t?nme(_io|_ip)?|fr(_io|_ip)?|auc(_io|_ip)?", base) is not None
        or re.fullmatch(r"top\d+|zs_\w+|fewshot_\w+@\d+|[it]2[ti]_r\d+", base) is not None
    )


def _fmt(key: str, value: Any) -> str:
    return H.pct(value) if _is_share(key) else H.num(value)


def _delta(key: str, a: Any, b: Any) -> str:
    if H.missing(a) or H.missing(b):
        return "—"
    d = float(a) - float(b)
    return f"{100 * d:+.2f} pp" if _is_share(key) else f"{d:+.4f}"


def _what(task: str, key: str) -> str:
    base, _, lang = key.partition(":")
    own = _WHAT_TASK.get(task, {})
    if m := re.fullmatch(r"(fewshot_\w+)@(\d+)", base):
        text = own.get(m[1], "").replace("k per class", f"{m[2]} per class")
    elif m := re.fullmatch(r"([it]2[ti])_r(\d+)", base):
        text = own.get(m[1], "") and f"{own[m[1]]}, R@{m[2]}"
    elif m := re.fullmatch(r"(teacher/)?probe/(\w+)", base):
        who = "the teacher's" if m[1] else "the student's"
        text = f"logistic-regression probe on {who} frozen embeddings: {m[2]} accuracy (held-out texts)"
    elif m := re.fullmatch(r"nme_pt/(\d+)", base):
        text = own.get("nme_pt", "") and f"{own['nme_pt']} (point {int(m[1])})"
    else:
        text = own.get(base) or _WHAT.get(base, "")
    return f"{text} ({lang})" if text and lang else text


def _task_metrics(summary: dict[str, Any]) -> tuple[str, dict[str, float], dict[str, float]]:
    """``(split, last, best)`` of any task: the test metrics of the last and best checkpoints, or
    the validation metrics of the last and best epochs when the run has no test split."""
    test = summary.get("test") or {}
    if isinstance(test.get("last"), dict) or isinstance(test.get("best"), dict):
        return "test", dict(test.get("last") or {}), dict(test.get("best") or {})

    def val(record: dict[str, Any]) -> dict[str, float]:
        return {k[4:]: v for k, v in record.items() if k.startswith("val/")}

    return "val", val(summary.get("final", {})), val(summary.get("best", {}))


def _split_teacher(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``(own, teacher)``: a summary's metrics without and with the ``teacher_`` prefix (stripped)."""
    own = {k: v for k, v in metrics.items() if not k.startswith("teacher_")}
    teacher = {k[len("teacher_") :]: v for k, v in metrics.items() if k.startswith("teacher_")}
    return own, teacher


def _groups(keys: list[str]) -> list[tuple[str, list[str]]]:
    """The test-metrics table's groups: by kind for the data's first language, then one group per
    further language (keys ``<metric>:<lang>``), then whatever matched no group."""
    plain = sorted((k for k in keys if ":" not in k), key=_natural)
    out = []
    for title, holds in _GROUPS:
        members = [k for k in plain if holds(k)]
        if members:
            out.append((title, members))
    grouped = {k for _, ks in out for k in ks}
    rest = [k for k in plain if k not in grouped]
    langs = sorted({k.partition(":")[2] for k in keys if ":" in k})
    out += [
        (f"language {lang}", sorted((k for k in keys if k.endswith(f":{lang}")), key=_natural))
        for lang in langs
    ]
    if rest:
        out.append(("other", rest))
    return out


def _model_text(spec: Any) -> str:
    """A model section in one line: its name, key keyword arguments (a tower by its model or kind)
    and where its weights come from."""

    def scalar(v: Any) -> bool:
        return isinstance(v, (str, int, float, bool)) or v is None

    parts = []
    for k, v in spec.kwargs.items():
        if isinstance(v, dict):
            name = v.get("model") or v.get("kind")
            inner = ", ".join(
                f"{ik}={iv}" for ik, iv in v.items() if ik not in ("model", "kind") and scalar(iv)
            )
            if name:
                parts.append(f"{k}={name}" + (f" ({inner})" if inner else ""))
            elif inner:
                parts.append(f"{k}: {inner}")
        elif scalar(v):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={v}"[:60])
    text = spec.model + (f" [{'; '.join(parts)}]" if parts else "")
    return text + (f" (weights {spec.weights})" if spec.weights else "")


def _class_names(source: str) -> list[str] | None:
    """The class names of a source protege knows without reading it, else ``None``."""
    if source == "fashion-mnist":
        from ..data.fashion_mnist import CLASS_NAMES

        return list(CLASS_NAMES)
    if source in _BUNDLED:
        return [str(i) for i in range(10)]
    return None


def _data_text(cfg: RunConfig) -> str:
    """The data line of the header: source, recipe and options (for vision_language: the seen and
    unseen classes and the languages)."""
    options = dict(cfg.data.options)
    text = f"{cfg.data.source} ({cfg.data.transforms})"
    if cfg.task != "vision_language":
        return text + "".join(f" · {k} {v}" for k, v in options.items())
    names = _class_names(cfg.data.source)
    seen = options.pop("seen", None)
    if seen is None:
        text += " · seen: every class (no unseen class)"
    else:
        shown = [names[v] if names and isinstance(v, int) and 0 <= v < len(names) else str(v) for v in seen]
        text += f" · seen ({len(shown)}): {', '.join(shown)}"
        if names is not None:
            unseen = [n for n in names if n not in shown]
            text += f" · unseen ({len(unseen)}): {', '.join(unseen) or 'none'}"
        else:
            text += " · unseen: the source's other classes"
    text += f" · languages: {', '.join(map(str, options.pop('languages', ['en'])))}"
    return text + "".join(f" · {k} {v}" for k, v in options.items())


def _stage_dirs(run_dir: Path, cfg: RunConfig) -> list[Path]:
    """Where each stage wrote (as :mod:`protege.pipeline` lays it out), under ``run_dir`` as it is now."""
    return [run_dir / "stages" / st.name for st in cfg.stages[:-1]] + [run_dir]


def _all_metrics(run_dir: Path, cfg: RunConfig) -> tuple[list[dict[str, Any]], list[int]]:
    """``(metrics, stage_starts)``: ``metrics.jsonl`` of the run; of a multi-stage run every stage's,
    one after another (epochs counted on across stages), with the epochs later stages start at."""
    if not cfg.stages:
        return read_metrics(run_dir), []
    out: list[dict[str, Any]] = []
    starts = []
    for stage_dir in _stage_dirs(run_dir, cfg):
        offset = out[-1]["epoch"] + 1 if out else 0
        if out:
            starts.append(offset)
        out += [{**m, "epoch": m["epoch"] + offset} for m in read_metrics(stage_dir)]
    return out, starts


def _more_curves(
    metrics: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
    first_language: str,
    stage_starts: Sequence[int] = (),
) -> str | None:
    """The validation metrics :func:`_curves` does not plot, one panel per metric, a line per
    language (the teacher's last value, where logged, dotted)."""
    keys = sorted(
        {k for m in metrics for k in m if k.startswith("val/") and not k.startswith("val/teacher_")}
    )
    shown = {"val/acc", "val/agreement", "val/kl"}
    bases: dict[str, list[str]] = {}
    for key in keys:
        bases.setdefault(key[4:].partition(":")[0], []).append(key)
    bases = {b: ks for b, ks in bases.items() if not set(ks) <= shown}
    if not bases:
        return None
    plt = H.pyplot()
    ncols = min(3, len(bases))
    nrows = math.ceil(len(bases) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.3 * nrows), squeeze=False)
    epochs = max(m["epoch"] + 1 for m in metrics + baseline)
    for ax, base in zip(axes.flat, sorted(bases, key=_natural)):
        several = len(bases[base]) > 1  # languages: a colour each, distilled solid, baseline dashed
        for i, key in enumerate(sorted(bases[base], key=_natural)):
            lang = key.partition(":")[2] or first_language
            for who, ms, style in (("distilled", metrics, "-"), ("baseline", baseline, "--")):
                if ms and any(key in m for m in ms):
                    label = who + (f" {lang}" if several else "")
                    xs = [m["epoch"] + 1 for m in ms]
                    ax.plot(
                        xs,
                        [m.get(key, math.nan) for m in ms],
                        ls=style,
                        marker="o",
                        ms=3,
                        color=f"C{i}" if several else _COLORS[who],
                        label=label,
                    )
        teacher = f"val/teacher_{base}"
        if metrics and teacher in metrics[-1]:
            ax.axhline(metrics[-1][teacher], color=_COLORS["teacher"], ls=":", lw=1.2, label="teacher")
        _mark_stages(ax, stage_starts)
        ax.set(title=base, xlabel="epoch", xlim=(0.5, epochs + 0.5))
        if epochs <= 12:
            ax.set_xticks(range(1, epochs + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(bases) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return H.figure(
        fig,
        "further validation metrics",
        "The task's other validation metrics per epoch, a line per language where the data has several "
        "(solid: distilled; dashed: baseline; dotted: the teacher's last value).",
    )


def _figures(run_dir: Path) -> str:
    """The task's figures of the run's best student and its teachers (``Task.report_figures``); a
    failure to draw them is a note in the report, never a failed report."""
    try:
        loaded = load_run(run_dir, "best")
        figures = loaded.task.report_figures(loaded.student.eval(), loaded.teachers, loaded.data)
    except Exception as e:  # noqa: BLE001 (the run is saved; the report says what went wrong)
        return H.note(f"the figures could not be drawn: {type(e).__name__}: {e}")
    if not figures:
        return H.note("no figures")
    return "".join(H.png_figure(png, caption, caption) for caption, png in figures)


def _task_report(
    run_dir: Path,
    cfg: RunConfig,
    summary: dict[str, Any],
    baseline: str | Path | None,
    out_path: Path,
    latency: bool,
) -> Path:
    """The report of a run of a task other than classification, from its files alone (no model is
    loaded): summary, every test metric beside the baseline's, each stage's, the curves."""
    base_dir, base_how = find_baseline(run_dir, baseline)
    base_summary = read_json(base_dir / "summary.json") if base_dir else None
    base_cfg = load_config(base_dir / "config.yaml") if base_dir else None
    split, last, best = _task_metrics(summary)
    last, teacher = _split_teacher(last)
    best, teacher_best = _split_teacher(best)
    teacher = {**teacher_best, **teacher}
    base_last, base_best = _task_metrics(base_summary)[1:] if base_summary else ({}, {})
    base_last, base_best = _split_teacher(base_last)[0], _split_teacher(base_best)[0]
    student_text = (
        _model_text(cfg.student)
        if cfg.student is not None
        else ", ".join(s.name or s.model for s in cfg.students)
    )
    teachers = cfg.all_teachers()
    labels = {
        "teacher": f"teacher ({teachers[0].model})" if teachers else "teacher",
        "baseline": "baseline, no KD"
        + (f" ({base_cfg.student.model})" if base_cfg and base_cfg.student else ""),
        "distilled": f"distilled ({cfg.student.model if cfg.student else 'students'})",
    }
    record: dict[str, Any] = {
        "run": str(run_dir),
        "task": cfg.task,
        "split": split,
        "baseline": str(base_dir) if base_dir else None,
    }

    # summary: headline metrics and cost per model
    headline = [k for k in _HEADLINE if k in last or k in best]
    student_cost = _cost(summary, "student")
    costs = {"teacher": _cost(summary, "teacher"), "distilled": student_cost}
    values = {"teacher": teacher, "distilled": last}
    if base_summary is not None:
        own = _cost(base_summary, "student")
        same = H.missing(own["params"]) or own["params"] == student_cost["params"]
        costs["baseline"] = student_cost if same and not H.missing(student_cost["params"]) else own
        values["baseline"] = base_last
    if not teachers:
        costs.pop("teacher")
    rows = {
        who: {**{k: values[who].get(k) for k in headline}, **costs[who]}
        for who in ("teacher", "baseline", "distilled")
        if who in costs
    }
    record["summary"] = {labels[w]: r for w, r in rows.items()}
    cells = [
        [
            labels[w],
            *(_fmt(k, r.get(k)) for k in headline),
            H.count(r.get("params")),
            H.num(None if r.get("flops") is None else r["flops"] / 1e6, 2),
            H.num(r.get("ms"), 3),
            _speedup(r.get("speedup")),
        ]
        for w, r in rows.items()
    ]
    stages = summary.get("stages") or []
    wall = sum(st.get("wall_time_s") or 0 for st in stages) if stages else summary.get("wall_time_s")
    notes = []
    if base_dir is None:
        notes.append(
            H.esc(base_how) + ". Train one with <code>protege train &lt;this run's config&gt; --set "
            f"name={H.esc(cfg.name)}-baseline</code> (its terms without a teacher, e.g. <code>ce</code>), or "
            "name one (a run distilled with fewer terms, say) with <code>--baseline runs/&lt;name&gt;</code> "
            "or the config's <code>baseline:</code>."
        )
    if latency:
        notes.append(
            "Latency is not measured again for this task: the table shows the run's own measurement."
        )
    summary_html = (
        f"<p>Headline metrics of the last checkpoint on the {H.esc(split)} split (the teacher's as the "
        "distillation computed them on the same split; every metric under Test metrics), and cost from the "
        "runs' <code>summary.json</code>: latency is the median batch-1 forward measured side by side at the "
        "end of the distillation; speed-up = teacher latency / model latency."
        f" Wall time of the run{' (all stages)' if stages else ''}: "
        f"{'—' if H.missing(wall) else f'{wall:.1f} s'}.</p>"
        + H.table(
            ["model", *headline, "params", "MFLOPs", "latency ms", "speed-up"],
            cells,
            highlight=[w == "distilled" for w in rows],
        )
        + "".join(H.note(n) for n in notes)
    )

    # every metric, grouped, beside the baseline's and the teacher's
    keys = sorted(set(last) | set(best), key=_natural)
    header = ["metric", "what", "distilled (last)", "distilled (best)"]
    if base_summary is not None:
        header += ["baseline (last)", "baseline (best)", "Δ last vs baseline"]
    header.append("teacher")
    table_rows, marks = [], []
    for title, members in _groups(keys):
        table_rows.append([title, *[""] * (len(header) - 1)])
        marks.append(True)
        for k in members:
            row = [k, _what(cfg.task, k), _fmt(k, last.get(k)), _fmt(k, best.get(k))]
            if base_summary is not None:
                row += [
                    _fmt(k, base_last.get(k)),
                    _fmt(k, base_best.get(k)),
                    _delta(k, last.get(k), base_last.get(k)),
                ]
            table_rows.append([*row, _fmt(k, teacher.get(k))])
            marks.append(False)
    loose = sorted(set(teacher) - set(keys), key=_natural)  # teacher references without a student twin
    if loose:
        table_rows.append(["teacher reference", *[""] * (len(header) - 1)])
        marks.append(True)
        for k in loose:
            table_rows.append(
                [f"teacher_{k}", _what(cfg.task, k), *["—"] * (len(header) - 3), _fmt(k, teacher[k])]
            )
            marks.append(False)
    record["metrics"] = {
        "distilled": {"last": last, "best": best},
        "teacher": teacher,
        **({"baseline": {"last": base_last, "best": base_best}} if base_summary is not None else {}),
    }
    metrics_html = (
        f"<p>Every metric the task's evaluator reports on the {H.esc(split)} split, for the last checkpoint "
        "and the one best on validation; the teacher's as the distillation computed them on the same split."
        + (
            " Zero-shot accuracies classify through the class prompts' text embeddings; the unseen classes "
            "were in no training or validation batch."
            if cfg.task == "vision_language"
            else ""
        )
        + "</p>"
        + H.table(header, table_rows, highlight=marks)
    )
    sections = [("summary", "Summary", summary_html), ("metrics", "Test metrics", metrics_html)]

    # multi-stage: what each stage left (DC-CLIP: stage 1 alone vs stages 1 + 2)
    if stages:
        stage_keys = [
            k
            for k in sorted(
                set(last) | {m for st in stages for m in ((st.get("test") or {}).get("last") or {})},
                key=_natural,
            )
            if k.partition(":")[0] in _HEADLINE
            or re.fullmatch(r"fewshot_\w+@\d+|[it]2[ti]_r1", k.partition(":")[0])
        ]
        stage_rows, record["stages"] = [], []
        for i, st in enumerate(stages):
            final = i == len(stages) - 1
            got = last if final else _split_teacher((st.get("test") or {}).get("last") or {})[0]
            name = f"{i + 1}. {st.get('name')}" + (f" (stages 1–{i + 1}: the run)" if final and i else "")
            terms = _terms_text(cfg.stage_config(i)) if i < len(cfg.stages) else "?"
            stage_rows.append(
                [
                    name,
                    terms,
                    str(st.get("epochs_completed", "?")),
                    H.num(st.get("wall_time_s"), 1),
                    *(_fmt(k, got.get(k)) for k in stage_keys),
                ]
            )
            record["stages"].append({"name": st.get("name"), "terms": terms, "test_last": got})
        missing = [st.get("name") for st in stages[:-1] if not (st.get("test") or {}).get("last")]
        stages_html = (
            "<p>Each stage's last checkpoint on the test split, the later one holding every stage before it "
            "(all of each stage's metrics are in <code>report.json</code>).</p>"
            + H.table(
                ["stage", "terms", "epochs", "wall s", *stage_keys],
                stage_rows,
                highlight=[i == len(stages) - 1 for i in range(len(stages))],
            )
            + (
                H.note(
                    f"No test metrics for stage(s) {H.esc(', '.join(map(str, missing)))}: the run has no test "
                    "split, or not every stage completed."
                )
                if missing
                else ""
            )
        )
        sections.append(("stages", "Stages", stages_html))

    metrics, starts = _all_metrics(run_dir, cfg)
    if metrics:
        base_metrics = _all_metrics(base_dir, base_cfg)[0] if base_dir and base_cfg else []
        languages = (cfg.data.options.get("languages") or ["en"]) if cfg.task == "vision_language" else [""]
        more = _more_curves(metrics, base_metrics, str(languages[0]), starts)
        curves = _curves(metrics, base_metrics, starts) + (more or "")
        if stages:
            curves = (
                "<p>The stages one after another (epochs counted on across stages, a dotted line where the "
                "next stage starts); each stage logs its own loss terms.</p>" + curves
            )
    else:
        curves = H.note("no metrics.jsonl")
    sections.append(("curves", "Curves", curves))
    task = build_task(cfg.task)
    if type(task).report_figures is not Task.report_figures:  # the task draws what its models do
        sections.append(("figures", "What the models do", _figures(run_dir)))
    sections.append(
        (
            "probes",
            "Probes",
            H.note(
                "The classification probes — reliability diagrams, representation similarity (CKA), "
                "localization (CAM / saliency), invariance and adversarial transfer — read a classification "
                f"student's images and class logits; they are not computed for task {H.esc(cfg.task)}."
            ),
        )
    )

    teacher_text = "; ".join(_model_text(t) for t in teachers) or "none"
    if stages:
        terms_text = " · ".join(
            f"{st.name}: {_terms_text(cfg.stage_config(i))}" for i, st in enumerate(cfg.stages)
        )
    else:
        terms_text = _terms_text(cfg)
    header_html = "".join(
        f'<p class="meta">{line}</p>'
        for line in (
            f"<b>task</b> {H.esc(cfg.task)} · <b>status</b> {H.esc(summary.get('status', '?'))} · "
            f"{summary.get('epochs_completed', '?')} of {summary.get('epochs', '?')} epochs"
            + (f" (last stage; {len(stages)} stages)" if stages else "")
            + f" · <b>seed</b> {cfg.seed} · <b>wall time</b> {'—' if H.missing(wall) else f'{wall:.1f} s'}",
            f"<b>data</b> {H.esc(_data_text(cfg))}",
            f"<b>teacher</b> {H.esc(teacher_text)}",
            f"<b>student</b> {H.esc(student_text)}",
            f"<b>terms</b> {H.esc(terms_text)}",
            f"<b>baseline</b> {H.esc(base_dir)} — {H.esc(base_how)}" if base_dir else "<b>baseline</b> none",
            f"generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from {H.esc(run_dir)}",
        )
    )
    atomic_write_text(out_path.with_suffix(".json"), json.dumps(record, indent=2, default=float))
    atomic_write_text(out_path, H.page(f"protege report — {cfg.name}", header_html, sections))
    return out_path


# -- the report ---------------------------------------------------------------------------------


def _models_rows(
    loaded: LoadedRun,
    base_model: nn.Module | None,
    logits: dict[str, torch.Tensor],
    summaries: dict[str, dict[str, Any]],
    labels: dict[str, str],
    latency: bool,
) -> list[tuple[str, dict[str, Any]]]:
    """Summary rows of teacher, baseline and distilled student. Params and FLOPs are counted here;
    latency is measured now, side by side (``latency``), else taken from the distillation's summary
    (measured side by side at the end of training; the baseline shares its student's architecture)."""
    models = {"teacher": loaded.teachers[0], "distilled": loaded.student}
    if base_model is not None:
        models["baseline"] = base_model
    costs = model_costs(models, logits["inputs"][:1], latency=latency)
    teacher = classification_report(logits["teacher"], logits["target"])
    t_run = _teacher_run(loaded.cfg)
    t_last = split_metrics(read_json(t_run / "summary.json"))[2].get("acc") if t_run is not None else None
    rows = {"teacher": {**teacher, "acc_best": teacher["acc"], "acc_last": t_last}}
    for who, summary in summaries.items():
        _, best, last = split_metrics(summary)
        rows[who] = {**best, "acc_best": best.get("acc"), "acc_last": last.get("acc")}
    for who, row in rows.items():
        cost = costs.get(who, {})
        row.update(params=cost.get("params"), flops=cost.get("flops"))
        if latency:
            row.update(ms=cost["latency"]["ms"], speedup=cost.get("speedup", 1.0))
        else:  # as measured side by side at the end of the distillation
            source = summaries["distilled"]
            if who == "baseline" and cost["params"] != costs["distilled"]["params"]:
                source = summaries["baseline"]  # another architecture: its own run's measurement
            ran = _cost(source, "teacher" if who == "teacher" else "student")
            row.update(ms=ran["ms"], speedup=ran["speedup"])
    return [(labels[who], rows[who]) for who in ("teacher", "baseline", "distilled") if who in rows]


def _sample(n: int, k: int) -> torch.Tensor:
    """``k`` indices of ``n`` drawn without replacement with a fixed seed (splits are often sorted by class)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values


def build_report(
    run_dir: str | Path,
    baseline: str | Path | None = None,
    out: str | Path | None = None,
    probes: bool = True,
    max_images: int = 500,
    latency: bool = False,
) -> Path:
    """Write the HTML report of a finished distillation run; return its path.

    ``baseline``: the run directory of the same student trained without distillation (default:
    the config's ``baseline``, else found beside the run, see :func:`find_baseline`).
    ``out``: where to write (default ``<run_dir>/report.html``; its numbers also go to the same
    name with ``.json``). ``probes=False`` leaves out the
    probes (the slowest part on large models). Summary, calibration and per-class agreement use
    the whole test split (validation split without one); CKA and the other probes a fixed random
    sample of ``max_images`` of its images. ``latency=True`` measures teacher, baseline and student
    again, side by side; by default the report shows the latencies the distillation measured side
    by side at the end of training. Written atomically.

    A run of another task (``vision_language``, ``lm``, ...) gets the task-metrics report instead,
    read from its files alone (:data:`TASK_SECTIONS`: summary with cost, every test metric of the
    task's evaluator beside the baseline's and the teacher's, one row per stage of a multi-stage
    run, the curves); the classification probes are not computed for it (``probes``,
    ``max_images`` and ``latency`` do not apply).
    """
    run_dir = Path(run_dir)
    summary = _finished(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    out_path = Path(out) if out is not None else run_dir / "report.html"
    if max_images < 2:
        raise ProtegeError("max_images must be at least 2 (CKA and the probes compare images)")
    if cfg.task != "classification":
        return _task_report(run_dir, cfg, summary, baseline, out_path, latency)
    base_dir, base_how = find_baseline(run_dir, baseline)
    summaries = {
        "distilled": summary,
        **({"baseline": read_json(base_dir / "summary.json")} if base_dir else {}),
    }
    split, best, last = split_metrics(summary)
    student_model = (
        cfg.student.model if cfg.student is not None else ", ".join(s.name or s.model for s in cfg.students)
    )
    labels = {
        "teacher": f"teacher ({cfg.all_teachers()[0].model})" if cfg.all_teachers() else "teacher",
        "baseline": "baseline, no KD",
        "distilled": f"distilled ({student_model})",
    }
    if base_dir is not None:
        base_cfg = load_config(base_dir / "config.yaml")
        labels["baseline"] += f" ({base_cfg.student.model})" if base_cfg.student else ""
    notes = []
    if base_dir is None:
        notes.append(
            H.esc(base_how) + ". Train one with <code>protege train &lt;this run's config&gt; --set "
            f"name={H.esc(cfg.name)}-baseline</code> (it reads no teacher term), or pass "
            "<code>--baseline runs/&lt;name&gt;</code>; the probes need it."
        )

    # the model sections read images and class logits: one-student runs with a teacher
    one_student = cfg.student is not None and bool(cfg.all_teachers())
    loaded = load_run(run_dir, "best") if one_student else None
    classify = loaded is not None
    model_sections: list[tuple[str, str, str]] = []
    record: dict[str, Any] = {
        "run": str(run_dir),
        "split": split,
        "baseline": str(base_dir) if base_dir else None,
    }
    if classify:
        assert loaded is not None
        x, y = _eval_tensors(loaded, split)
        logits = {"inputs": x, "target": y, "teacher": _teacher_logits(loaded, x)}
        logits["distilled"] = predict(loaded.student, x)
        base_model = None
        if base_dir is not None:  # a run without distillation: its student alone is its predictor
            assert base_cfg.student is not None
            weights = str(checkpoint_dir(base_dir, "best"))
            base_model = build_from(base_cfg.student.model_copy(update={"weights": weights}), loaded.data)
            logits["baseline"] = predict(base_model, x)
        rows = _models_rows(loaded, base_model, logits, summaries, labels, latency)
        model_sections = _model_sections(loaded, base_model, logits, max_images, probes, record)
    else:
        rows = [
            (labels[w], {**b, "acc_best": b.get("acc"), "acc_last": lst.get("acc"), **_cost(s, "student")})
            for w, s in summaries.items()
            for _, b, lst in [split_metrics(s)]
        ]
        notes.append(
            "Calibration, representation similarity and probes need a one-student classification run "
            "with a teacher; this run shows its summary and curves only."
        )
    metrics = read_metrics(run_dir)
    curves = (
        _curves(metrics, read_metrics(base_dir) if base_dir else [])
        if metrics
        else H.note("no metrics.jsonl")
    )
    sections = [
        ("summary", "Summary", _summary_section(rows, split, notes, latency and classify)),
        ("curves", "Curves", curves),
        *model_sections,
        ("gradvar", "Gradient variance", _gradvar_section(run_dir)),
    ]
    teacher_text = (
        ", ".join(f"{t.model} ({t.weights or 'random weights'})" for t in cfg.all_teachers()) or "none"
    )
    header = "".join(
        f'<p class="meta">{line}</p>'
        for line in (
            f"<b>status</b> {H.esc(summary.get('status', '?'))} · {summary.get('epochs_completed', '?')} of "
            f"{summary.get('epochs', '?')} epochs · <b>data</b> {H.esc(cfg.data.source)} "
            f"({H.esc(cfg.data.transforms)}) · <b>seed</b> {cfg.seed}",
            f"<b>teacher</b> {H.esc(teacher_text)} · <b>student</b> {H.esc(student_model)}",
            f"<b>terms</b> {H.esc(_terms_text(cfg))}",
            f"<b>baseline</b> {H.esc(base_dir)} — {H.esc(base_how)}" if base_dir else "<b>baseline</b> none",
            f"generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from {H.esc(run_dir)}",
        )
    )
    record["summary"] = dict(rows)
    atomic_write_text(out_path.with_suffix(".json"), json.dumps(record, indent=2, default=float))
    atomic_write_text(out_path, H.page(f"protege report — {cfg.name}", header, sections))
    return out_path


def _model_sections(
    loaded: LoadedRun,
    base_model: nn.Module | None,
    logits: dict[str, torch.Tensor],
    max_images: int,
    probes: bool,
    record: dict[str, Any],
) -> list[tuple[str, str, str]]:
    """Calibration, representation similarity and the probes (their numbers go into ``record``)."""
    calib = {k: logits[k] for k in ("teacher", "baseline", "distilled") if k in logits}
    sections = [("calibration", "Calibration", _reliability(calib, logits["target"]))]
    pick = _sample(len(logits["target"]), max_images)
    xs, ys = logits["inputs"][pick], logits["target"][pick]
    t_feats = tap_features(loaded.teachers[0], xs)
    s_feats = {"distilled": tap_features(loaded.student, xs)}
    if base_model is not None:
        s_feats["baseline"] = tap_features(base_model, xs)
    cols = list(s_feats["distilled"])
    mats = {name: cka_matrix(t_feats, {c: f[c] for c in cols if c in f}) for name, f in s_feats.items()}
    record["cka"] = {
        "teacher_taps": list(t_feats),
        "student_taps": cols,
        **{k: m.tolist() for k, m in mats.items()},
    }
    body = (
        f"<p>On {len(xs):,} images. CKA between the teacher's and the distilled student's logits: "
        f"{mats['distilled'][-1, -1].item():.3f}"
    )
    if "baseline" in mats:
        body += f" (baseline: {mats['baseline'][-1, -1].item():.3f})"
    sections.append(
        ("similarity", "Representation similarity", body + ".</p>" + _heatmaps(mats, list(t_feats), cols))
    )
    if base_model is None:
        text = H.note(
            "The probes compare the distilled student with a baseline; none was found (see Summary)."
        )
    elif not probes:
        text = H.note("Probes left out (probes=False / --no-probes).")
    elif xs.dim() != 4:  # localization maps, invariance and adversarial transfer read images
        text = H.note(
            f"The probes read images (B, C, H, W); this run's inputs are {tuple(xs.shape[1:])} per sample "
            "(e.g. point clouds), so they are not computed. Agreement, calibration and representation "
            "similarity above cover it."
        )
    else:
        text = _probe_section(loaded, base_model, xs, ys, logits, record.setdefault("probes", {}))
    sections.append(("probes", "What got distilled", text))
    return sections


# -- compare ------------------------------------------------------------------------------------


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write one HTML page with several runs side by side; return its path.

    A table of each run's method, student, seed and summary numbers, a fidelity-vs-accuracy
    scatter (agreement and KL against test accuracy) and the runs' validation curves. ``out``:
    default ``compare.html`` in the runs' common parent directory.
    """
    if not run_dirs:
        raise ProtegeError("compare needs at least one run directory")
    runs = []
    for d in map(Path, run_dirs):
        summary = _finished(d)
        cfg = load_config(d / "config.yaml")
        split, best, last = split_metrics(summary)
        runs.append(
            {
                "dir": d,
                "cfg": cfg,
                "summary": summary,
                "split": split,
                "best": best,
                "last": last,
                "metrics": read_metrics(d),
            }
        )
    names = [r["dir"].name for r in runs]
    labels = names if len(set(names)) == len(names) else [str(r["dir"]) for r in runs]
    if out is None:
        dirs = [str(r["dir"].resolve()) for r in runs]
        common = Path(os.path.commonpath(dirs))
        out = (common.parent if str(common) in dirs else common) / "compare.html"
    out = Path(out)

    header = ["run", "mode", "terms", "student", "seed", "split", *_METRIC_COLUMNS, "params", "speed-up"]
    rows = []
    for label, r in zip(labels, runs):
        cfg, b = r["cfg"], r["best"]
        student = (
            cfg.student.model
            if cfg.student is not None
            else ", ".join(s.name or s.model for s in cfg.students)
        )
        speed = r["summary"].get("speedup")
        rows.append(
            [
                label,
                r["summary"].get("mode", "?"),
                _terms_text(cfg),
                student,
                str(cfg.seed),
                r["split"],
                *_metric_cells(b, r["last"].get("acc")),
                H.count((r["summary"].get("student") or {}).get("params")),
                _speedup(speed),
            ]
        )

    plt = H.pyplot()
    methods = sorted({_terms_text(r["cfg"]) for r in runs})
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, key, xlabel in (
        (axes[0], "agreement", "top-1 agreement with the teacher"),
        (axes[1], "kl", "KL(teacher ‖ student), nats"),
    ):
        seen = set()
        for label, r in zip(labels, runs):
            xv, yv = r["best"].get(key), r["best"].get("acc")
            if H.missing(xv) or H.missing(yv):
                continue
            m = _terms_text(r["cfg"])
            ax.scatter(
                [xv],
                [yv],
                s=46,
                color=color[m],
                edgecolor="k",
                lw=0.5,
                label=None if m in seen else m,
                zorder=3,
            )
            seen.add(m)
            ax.annotate(label, (xv, yv), fontsize=7.5, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=xlabel, ylabel="accuracy (best checkpoint)")
        ax.grid(alpha=0.3)
    axes[0].set_title("fidelity vs accuracy (higher agreement →)")
    axes[1].set_title("fidelity vs accuracy (← lower KL)")
    handles, legend_labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            legend_labels,
            fontsize=8,
            loc="lower center",
            ncol=min(3, len(handles)),
            bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(handles) / 3)),
        )
    fig.tight_layout()
    scatter = H.figure(
        fig,
        "fidelity vs accuracy",
        "One point per run, coloured by its loss terms. Runs without a teacher "
        "reference have no fidelity and are left out.",
    )
    fig, ax = plt.subplots(figsize=(8, 4.2))
    styles = ("-", "--", ":", "-.")
    for i, (label, r) in enumerate(zip(labels, runs)):
        ms = r["metrics"]
        xs, ys = [m["epoch"] + 1 for m in ms], [m.get("val/acc", math.nan) for m in ms]
        ax.plot(xs, ys, lw=1.5, ls=styles[(i // 10) % 4], color=f"C{i % 10}", label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7.5, ncol=2)
    fig.tight_layout()
    curves = H.figure(fig, "validation curves", "Validation accuracy of every run per epoch.")
    sections = [
        ("runs", "Runs", H.table(header, rows)),
        ("fidelity", "Fidelity vs accuracy", scatter),
        ("curves", "Curves", curves),
    ]
    meta = f'<p class="meta">{len(runs)} runs · generated {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}</p>'
    atomic_write_text(out, H.page("protege compare", meta, sections))
    return out
