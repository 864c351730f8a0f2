"""Gradient variance of distillation: ``protege analyze gradvar``.

Safaryan et al. (ICML 2023, "Knowledge Distillation Performs Partial Variance Reduction") show
that, for linear and deep-linear students, the KD objective ``(1 − λ)·CE(y) + λ·KD(teacher)``
acts as a stochastic variance-reduction method: the teacher's soft targets work like a control
variate and cut part of the noise of the student's stochastic gradient, most at an intermediate
λ that depends on how good the teacher is. :func:`gradvar_sweep` measures this on a real run:
for each λ of a sweep it trains the student with that objective, then estimates the variance of
the student's minibatch gradient with the KD term (the objective it trained with) and without it
(plain CE, at the same weights and on the same batches), at the trained weights and at the shared
initialization, and records the final test accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn

from ..build import build_distiller, load_run_data
from ..config import RunConfig, TermConfig
from ..engine import checkpoint_dir, make_loader
from ..errors import ProtegeError
from ..files import atomic_write_text
from ..pipeline import run
from . import html as H


def gradient_variance(
    objectives: Callable[[Any], Mapping[str, torch.Tensor]],
    params: Sequence[nn.Parameter],
    batches: Iterable[Any],
) -> dict[str, dict[str, float]]:
    """Variance of the minibatch gradient of each objective, over ``batches``.

    ``objectives(batch)`` returns named scalar losses computed from one forward pass. With g_j the
    gradient (w.r.t. ``params``, flattened) of an objective on batch j = 1..M and ḡ their mean,

        variance = 1/(M − 1) · Σ_j ‖g_j − ḡ‖²   (the trace of the gradient's covariance, unbiased),

    accumulated in float64 as (Σ‖g_j‖² − M‖ḡ‖²)/(M − 1). Returns, per objective,
    ``{"variance", "mean_sq_norm": ‖ḡ‖², "batches": M}``.
    """
    params = list(params)
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, float] = {}
    m = 0
    for batch in batches:
        losses = objectives(batch)
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            g = torch.cat(
                [(gr if gr is not None else torch.zeros_like(p)).reshape(-1) for gr, p in zip(grads, params)]
            )
            g = g.double().cpu()
            sums[name] = sums[name] + g if name in sums else g
            squares[name] = squares.get(name, 0.0) + g.square().sum().item()
        m += 1
    if m < 2:
        raise ProtegeError("the gradient variance needs at least 2 batches")
    out = {}
    for name, total in sums.items():
        mean_sq = (total / m).square().sum().item()
        out[name] = {
            "variance": max(squares[name] - m * mean_sq, 0.0) / (m - 1),
            "mean_sq_norm": mean_sq,
            "batches": m,
        }
    return out


def _kd_temperature(cfg: RunConfig) -> float:
    for t in cfg.terms:
        if t.loss == "kd" and "T" in t.params:
            return float(t.params["T"])
    return 4.0


def _check(cfg: RunConfig, lambdas: Sequence[float], n_batches: int) -> None:
    if not lambdas or any(not 0.0 <= lam <= 1.0 for lam in lambdas):
        raise ProtegeError(f"lambdas are KD weights in [0, 1], e.g. 0,0.25,0.5,0.75,1; got {list(lambdas)}")
    if cfg.student is None or cfg.stages or cfg.cache is not None:
        raise ProtegeError(
            "gradvar sweeps one student trained in one stage with the teacher online: "
            "use a config with 'student', without 'stages' and 'cache'"
        )
    if not cfg.all_teachers():
        raise ProtegeError("gradvar needs a teacher: add teacher: {model: …, weights: …} to the config")
    if cfg.task != "classification":
        raise ProtegeError(f"gradvar compares CE and KD on classification; the config's task is {cfg.task!r}")
    if n_batches < 2:
        raise ProtegeError("--batches must be at least 2 (a variance needs two gradients)")


def gradvar_sweep(
    cfg: RunConfig,
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    T: float | None = None,
    epochs: int | None = None,
    n_batches: int = 32,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``cfg``'s student once per λ with ``(1 − λ)·CE + λ·KD(T)`` and measure its gradient variance.

    Each λ is a full run in ``<out_dir>/lambda_<λ>/`` (default ``out_dir``: ``<run_dir>/gradvar``,
    where the run's report finds it), with ``cfg``'s data, schedule and seed (so the same
    initialization and data order) and ``epochs`` (default: the config's). ``T`` defaults to the
    config's KD temperature (else 4). The variance uses the first ``n_batches`` training batches
    (fixed seed: the same for every λ). Writes ``gradvar.json`` and ``gradvar.html``; returns the
    result, whose ``"argmin_lambda"`` is the λ of least variance (with KD, at the trained weights).
    """
    lambdas = [float(lam) for lam in lambdas]
    _check(cfg, lambdas, n_batches)
    T = _kd_temperature(cfg) if T is None else float(T)
    out = Path(out_dir) if out_dir is not None else cfg.run_dir / "gradvar"
    data = load_run_data(cfg)
    rows = []
    for lam in lambdas:
        sub = cfg.model_copy(
            update={
                "name": f"lambda_{lam:g}",
                "output_dir": str(out),
                "epochs": epochs or cfg.epochs,
                "terms": [TermConfig(loss="ce", weight=1.0 - lam), TermConfig(loss="kd", weight=lam, T=T)],
                "baseline": None,
            }
        )
        summary = run(sub, "distill", overwrite=overwrite)
        distiller = build_distiller(sub, data, "distill")  # the shared initialization (seeded)
        row: dict[str, Any] = {"lambda": lam, "run_dir": str(sub.run_dir)}
        for where in ("init", "final"):
            if where == "final":
                state = load_file(checkpoint_dir(sub.run_dir, "last") / "model.safetensors")
                distiller.student.load_state_dict(state)
            set_seed(cfg.seed)  # the same batches (and augmentation draws) for every λ and point
            loader = make_loader(data.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed)
            batches = (b for i, b in zip(range(n_batches), loader))
            distiller.train()

            def objectives(batch: Any, distiller: nn.Module = distiller) -> dict[str, torch.Tensor]:
                out, losses = distiller(batch)
                _, target = distiller.task.split(batch)
                return {"kd": sum(losses.values()), "ce": F.cross_entropy(out["logits"], target)}

            var = gradient_variance(objectives, list(distiller.student.parameters()), batches)
            for name in ("kd", "ce"):
                row[f"var_{name}_{where}"] = var[name]["variance"]
                row[f"mean_sq_{name}_{where}"] = var[name]["mean_sq_norm"]
        distiller.close()
        split = "test" if summary.get("test") else "val"
        final = (
            summary["test"]["last"]
            if split == "test"
            else {k[4:]: v for k, v in summary["final"].items() if k.startswith("val/")}
        )
        row.update({"acc": final.get("acc"), "agreement": final.get("agreement"), "split": split})
        rows.append(row)
    result = {
        "config": cfg.name,
        "T": T,
        "epochs": epochs or cfg.epochs,
        "batches": n_batches,
        "batch_size": cfg.data.batch_size,
        "rows": rows,
        "argmin_lambda": min(rows, key=lambda r: r["var_kd_final"])["lambda"],
        "argmax_acc_lambda": max(rows, key=lambda r: r["acc"] or 0.0)["lambda"],
    }
    atomic_write_text(out / "gradvar.json", json.dumps(result, indent=2))
    page = H.page(
        f"protege gradient variance — {cfg.name}",
        "",
        [("gradvar", "Gradient variance", gradvar_table(result) + gradvar_figure(result))],
    )
    atomic_write_text(out / "gradvar.html", page)
    return result


def relative_variance(row: Mapping[str, Any], name: str) -> float:
    """Variance over the squared norm of the mean gradient (noise-to-signal; free of the objective's scale)."""
    sq = row[f"mean_sq_{name}_final"]
    return row[f"var_{name}_final"] / sq if sq > 0 else float("nan")


def gradvar_table(result: Mapping[str, Any]) -> str:
    """The sweep as an HTML table, with the λ of least variance marked."""
    header = [
        "λ (KD weight)",
        "final acc",
        "agreement",
        "variance with KD",
        "variance CE only",
        "ratio",
        "relative, with KD",
        "relative, CE only",
        "variance with KD at init",
    ]
    rows, marks = [], []
    for r in result["rows"]:
        ratio = r["var_kd_final"] / r["var_ce_final"] if r["var_ce_final"] > 0 else float("nan")
        rows.append(
            [
                f"{r['lambda']:g}",
                H.pct(r["acc"]),
                H.pct(r["agreement"]),
                f"{r['var_kd_final']:.4g}",
                f"{r['var_ce_final']:.4g}",
                H.num(ratio, 3),
                f"{relative_variance(r, 'kd'):.4g}",
                f"{relative_variance(r, 'ce'):.4g}",
                f"{r['var_kd_init']:.4g}",
            ]
        )
        marks.append(r["lambda"] == result["argmin_lambda"])
    text = (
        f"<p>Student trained with (1 − λ)·CE + λ·KD (T = {result['T']:g}; KD carries the usual T² factor) for "
        f"{result['epochs']} epochs per λ. Variance: trace of the covariance of the minibatch gradient over "
        f'{result["batches"]} training batches of {result["batch_size"]}, at the trained weights ("with KD": the '
        'objective trained with; "CE only": plain cross-entropy at the same weights and batches), and at the '
        "shared initialization. Relative: variance / ‖mean gradient‖², which does not grow with the scale of the "
        f"objective. Least variance with KD at λ = {result['argmin_lambda']:g}; best accuracy at "
        f"λ = {result['argmax_acc_lambda']:g}.</p>"
    )
    return text + H.table(header, rows, highlight=marks)


def gradvar_figure(result: Mapping[str, Any]) -> str:
    """Variance, relative variance and final accuracy against λ, as an embedded figure."""
    plt = H.pyplot()
    rows = result["rows"]
    lam = [r["lambda"] for r in rows]
    blue, red = "#2a7ab0", "#d1495b"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.0))
    ax = axes[0]
    ax.plot(lam, [r["var_kd_final"] for r in rows], marker="o", color=blue, label="with KD (trained weights)")
    ax.plot(lam, [r["var_ce_final"] for r in rows], marker="s", color=red, label="CE only (same weights)")
    ax.plot(
        lam,
        [r["var_kd_init"] for r in rows],
        marker="o",
        ls="--",
        color=blue,
        alpha=0.5,
        label="with KD (init)",
    )
    best = min(rows, key=lambda r: r["var_kd_final"])
    ax.scatter(
        [best["lambda"]],
        [best["var_kd_final"]],
        marker="*",
        s=260,
        color="gold",
        edgecolor="k",
        zorder=4,
        label=f"least variance, λ = {best['lambda']:g}",
    )
    H.log_scale(ax)
    ax.set(ylabel="gradient variance (trace)", title="stochastic-gradient variance")
    ax = axes[1]
    ax.plot(lam, [relative_variance(r, "kd") for r in rows], marker="o", color=blue, label="with KD")
    ax.plot(lam, [relative_variance(r, "ce") for r in rows], marker="s", color=red, label="CE only")
    H.log_scale(ax)
    ax.set(ylabel="variance / ‖mean gradient‖²", title="relative variance (trained weights)")
    ax = axes[2]
    ax.plot(lam, [r["acc"] for r in rows], marker="o", color=blue)
    ax.set(ylabel=f"final accuracy ({rows[0]['split']})", title="final accuracy")
    for ax in axes:
        ax.set_xlabel("λ (weight of the KD term)")
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return H.figure(
        fig, "gradient variance and accuracy against lambda", "λ = 0 is training without distillation."
    )
