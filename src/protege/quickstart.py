"""``protege quickstart``: the whole story on bundled MNIST in a few minutes on a laptop CPU.

1. train a teacher (plain cross-entropy; training images get random shifts of up to 2 px);
2. train the small student with cross-entropy only — the baseline;
3. distill the teacher into the same student (CE + Hinton KD), same seed, data order and schedule;
4. compare all three on the held-out test split: accuracy, agreement with the teacher,
   KL(teacher‖student), calibration, parameters, FLOPs, measured latency and speed-up.

Everything goes to ``<output_dir>/quickstart/``: one full run directory per model plus
``summary.json`` and ``results.md`` with the table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from .analysis.runs import run
from .config import load_config
from .files import atomic_write_text
from .metrics.cost import model_costs
from .models import build_model

TEACHER = "convnet"
STUDENT = "mlp_s"


def quickstart_configs(fast: bool, root: Path, seed: int) -> dict[str, Any]:
    """The three run configs (as dicts) of the quickstart: teacher, baseline, distilled."""
    teacher_epochs, student_epochs = (2, 2) if fast else (15, 40)
    common = {
        "output_dir": str(root),
        "seed": seed,
        "data": {"source": "mnist5k", "batch_size": 64, "transforms": "augment"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
    }
    teacher_dir = root / "teacher"
    student = {
        **common,
        "student": {"model": STUDENT},
        "teacher": {"model": TEACHER, "weights": str(teacher_dir)},
        "epochs": student_epochs,
    }
    return {
        "teacher": {**common, "name": "teacher", "student": {"model": TEACHER}, "epochs": teacher_epochs},
        "baseline": {**student, "name": "baseline", "terms": [{"loss": "ce"}]},
        "distilled": {
            **student,
            "name": "distilled",
            "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4.0}],
        },
    }


def run_quickstart(
    fast: bool = False, output_dir: str | Path = "runs", seed: int = 0, overwrite: bool = True
) -> dict[str, Any]:
    """Run the three trainings and the comparison; return (and save) the results."""
    root = Path(output_dir) / "quickstart"
    if overwrite and root.exists():
        shutil.rmtree(root)
    start = time.perf_counter()
    configs = quickstart_configs(fast, root, seed)
    summaries = {}
    for name, mode in (("teacher", "train"), ("baseline", "train"), ("distilled", "distill")):
        cfg = load_config(None, **configs[name])
        summaries[name] = run(cfg, mode=mode)  # type: ignore[arg-type]
    # test metrics of each run's last and best checkpoints are in its summary; the costs are
    # measured again here, all three models side by side, so the speed-ups compare like with like
    example = torch.zeros(1, 1, 28, 28)
    costs = model_costs(
        {
            name: build_model(configs[name]["student"]["model"], num_classes=10, in_chans=1)
            for name in summaries
        },
        example,
    )
    rows = {
        name: {
            "model": configs[name]["student"]["model"],
            "test": s["test"]["best"],
            "test_last": s["test"]["last"],
            "params": costs[name]["params"],
            "flops": costs[name]["flops"],
            "latency_ms": costs[name]["latency"]["ms"],
            "speedup": costs[name].get("speedup", 1.0),  # the teacher's own row: 1
            "compression": costs[name].get("compression", 1.0),
        }
        for name, s in summaries.items()
    }
    result = {
        "run_dir": str(root),
        "fast": fast,
        "seed": seed,
        "rows": rows,
        "wall_time_s": time.perf_counter() - start,
    }
    atomic_write_text(root / "summary.json", json.dumps(result, indent=2))
    atomic_write_text(root / "results.md", markdown_table(result))
    return result


_COLUMNS = (
    "acc (best)",
    "acc (last)",
    "agreement",
    "kl",
    "ece",
    "params",
    "MFLOPs",
    "latency ms",
    "speed-up",
)


def _cells(name: str, row: dict[str, Any]) -> list[str]:
    m = row["test"]
    teacher = name == "teacher"
    return [
        f"{100 * m['acc']:.2f}%",
        f"{100 * row['test_last']['acc']:.2f}%",
        "—" if teacher else f"{100 * m['agreement']:.2f}%",
        "—" if teacher else f"{m['kl']:.4f}",
        f"{m['ece']:.4f}",
        f"{row['params']:,}",
        f"{row['flops'] / 1e6:.2f}",
        f"{row['latency_ms']:.3f}",
        f"{row['speedup']:.2f}×",
    ]


def _label(name: str, row: dict[str, Any]) -> str:
    return {"teacher": "teacher", "baseline": "student, CE only", "distilled": "student, distilled"}[
        name
    ] + f" ({row['model']})"


def format_table(result: dict[str, Any]) -> Table:
    """The comparison as a rich table: test split; metrics of the best-by-validation checkpoint, plus last-epoch accuracy."""
    table = Table(title="protege quickstart — MNIST-5k test split (1,000 images)")
    table.add_column("model")
    for col in _COLUMNS:
        table.add_column(col, justify="right")
    for name, row in result["rows"].items():
        table.add_row(_label(name, row), *_cells(name, row))
    return table


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| model | " + " | ".join(_COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for name, row in result["rows"].items():
        lines.append(f"| {_label(name, row)} | " + " | ".join(_cells(name, row)) + " |")
    return "\n".join(lines) + f"\n\nWall time: {result['wall_time_s']:.1f} s.\n"
