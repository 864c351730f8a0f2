"""One-step diffusion distillation measured: DMD, DMD2's GAN term, and Multi-Student Distillation (MSD).

No pretrained diffusion model ships offline, so the teacher is **trained here**: a class-conditional
diffusers ``UNet2DModel`` (channels 32/64, ~0.65M parameters, v-prediction, DDPM schedule with 1000
steps) on Fashion-MNIST **downscaled to 16×16** (``configs/diffusion/fmnist16-teacher.yaml``), sampled
with DDIM in 20 steps: its quality is the reference row.

Rows (``--seeds`` seeds each; ``configs/diffusion/*.yaml``):

- ``teacher (N steps)``: the teacher's DDIM sampler;
- ``1 student (DMD)``: one one-step generator initialised from the teacher, distribution matching;
- ``1 student (DMD + GAN)``: + DMD2's GAN head on the fake score's mid-block features;
- ``K=2 same-size``, ``K=4 same-size``: MSD, each student on a contiguous share of the classes;
- ``K=4 smaller``: MSD with students of half the channels (16/32: ~4× fewer parameters each), each
  started from a score model of that size pretrained with Teacher Score Matching (MSD's first stage
  for smaller students, ``tsm-small.yaml``: one run per seed, ``fmnist16-tsm-small-s<seed>``).

Columns: ``FD-FMNIST`` (Fréchet distance in the feature space of a CNN classifier trained here on
the teacher's training images, the same classifier for every row; not FID), k-NN precision and recall (k = 3) in that space, class consistency (that
classifier's accuracy on the generated images), parameters (all students together for K > 1, and
per student), time per image at batch 1 and the speed-up over the teacher's sampler, measured side by
side in the same process (``summary.json`` of each run). Mean ± std over seeds, on the test split, at
the best epoch (by validation FD-FMNIST) and at the last epoch: two tables.

    python benchmarks/diffusion.py --json benchmarks/results/diffusion.json
    python benchmarks/diffusion.py --quick     # the pilot sizes: minutes, not hours
    # to share the runs among processes: each with --rows R --only-seeds S (trains, prints nothing);
    # then the full command reuses every run and prints the tables

Finished runs are reused and interrupted ones resumed when the command is run again (``--output-dir``,
default runs/diffusion-bench).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from protege.analysis.runs import run_or_reuse
from protege.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "diffusion"
ROWS = {
    "dmd": ("1 student (DMD)", "dmd.yaml"),
    "gan": ("1 student (DMD + GAN)", "dmd-gan.yaml"),
    "k2": ("K=2 same-size", "msd-k2.yaml"),
    "k4": ("K=4 same-size", "msd-k4.yaml"),
    "k4s": ("K=4 smaller", "msd-k4-small.yaml"),
}
COLUMNS = ("fd_fmnist", "precision", "recall", "class_consistency")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="runs/diffusion-bench")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--only-seeds",
        default=None,
        help="comma list: train only these seeds' runs and print nothing (to share rows among processes)",
    )
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the teacher config's")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default: the configs')")
    ap.add_argument(
        "--train-size", type=int, default=None, help="students' training images (default: the configs')"
    )
    ap.add_argument("--ratio", type=int, default=None, help="fake-score updates per generator update")
    ap.add_argument("--quick", action="store_true", help="pilot sizes: 4000/1280 images, 4/1 epochs, ratio 2")
    ap.add_argument("--json", type=Path, default=None, help="write the table's numbers here")
    ap.add_argument(
        "--tsm-only", action="store_true", help="train only the TSM stage of the K=4 smaller row's seeds"
    )
    return ap.parse_args()


def _overrides(args: argparse.Namespace, student: bool) -> list[str]:
    out = [f"output_dir={args.output_dir}"]
    size = (
        args.train_size if student else None
    )  # --train-size is the students'; the teacher keeps its config's
    size = size or (1280 if args.quick and student else 4000 if args.quick else None)
    if size:
        out.append(f"data.options.train_size={size}")
    if args.quick:
        out += ["data.options.val_size=500", "data.options.test_size=500"]
    epochs = args.epochs if student else args.teacher_epochs
    epochs = epochs or (1 if args.quick and student else 4 if args.quick else None)
    if epochs:
        out.append(f"epochs={epochs}")
    return out


def _tsm_overrides(args: argparse.Namespace, seed: int, teacher_dir: Path, classifier: Path) -> list[str]:
    """The TSM stage's run of ``seed`` (its config's own data size and epochs)."""
    return [
        f"output_dir={args.output_dir}",
        f"seed={seed}",
        f"name=fmnist16-tsm-small-s{seed}",
        f"teacher.weights={teacher_dir}",
        f"data.options.classifier={classifier}",
    ]


def _train(path: Path, overrides: list[str], mode: str) -> dict[str, Any]:
    return run_or_reuse(load_config(path, overrides), mode)  # type: ignore[arg-type]


def _shared_classifier(teacher_config: Path, overrides: list[str], out: Path) -> Path:
    """The teacher run's feature classifier (trained on the teacher's training images), written once to
    ``out``. Every student row is measured with it (``data.options.classifier``): a student trained on
    fewer images would otherwise get a classifier of its own, and its FD would be in another space."""
    if not out.is_file():
        from protege.files import atomic_save_tensors
        from protege.tasks import build_task

        data = load_config(teacher_config, overrides).data.model_dump(mode="json")
        splits = build_task("generation").load_data(data, [], [])
        atomic_save_tensors(splits.classifier.state_dict(), out)
    return out


def _classifier_accuracy(teacher_config: Path, overrides: list[str]) -> float:
    """The feature classifier's accuracy on the real test images: the reference for class consistency."""
    import torch

    from protege.tasks import build_task

    data = load_config(teacher_config, overrides).data.model_dump(mode="json")
    splits = build_task("generation").load_data(data, [], [])
    items = [splits.test[i] for i in range(len(splits.test))]
    images = torch.stack([item["images"] for item in items])
    labels = torch.as_tensor([int(item["labels"]) for item in items])
    with torch.no_grad():
        logits, _ = splits.classifier.eval().classify(images)
    return float((logits.argmax(1) == labels).float().mean())


def _cells(summary: dict[str, Any], students: int, which: str) -> dict[str, float]:
    test = summary["test"].get(which) or summary["test"]["best"]
    cost = summary.get("student", {})
    cells = {k: float(test[k]) for k in COLUMNS if k in test}
    if cost:
        cells["params"] = float(cost["params"])
        cells["params_per_student"] = float(cost["params"]) / students
        cells["ms_per_image"] = float(cost["latency"]["ms"])
        cells["speedup"] = float(cost.get("speedup", float("nan")))
    return cells


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    args = parse_args()
    ratio = args.ratio or (2 if args.quick else None)
    teacher_config, teacher_overrides = CONFIGS / "fmnist16-teacher.yaml", _overrides(args, student=False)
    teacher_summary = _train(teacher_config, teacher_overrides, "train")
    teacher_dir = Path(args.output_dir) / "fmnist16-teacher"
    classifier = _shared_classifier(
        teacher_config, teacher_overrides, Path(args.output_dir) / "feature-classifier.safetensors"
    )
    tables: dict[str, dict[str, dict[str, list[float]]]] = {"best": {}, "last": {}}
    t_cost = teacher_summary.get("student", {})
    for which, results in tables.items():
        t_test = teacher_summary["test"].get(which) or teacher_summary["test"]["best"]
        results["teacher (N steps)"] = {k: [float(t_test[k])] for k in COLUMNS if k in t_test}
        if t_cost:
            results["teacher (N steps)"].update(
                params=[float(t_cost["params"])], ms_per_image=[float(t_cost["latency"]["ms"])], speedup=[1.0]
            )
    seeds = [int(s) for s in args.only_seeds.split(",")] if args.only_seeds else list(range(args.seeds))
    tsm_cells: dict[str, dict[str, list[float]]] = {"best": {}, "last": {}}
    for slug in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if slug not in ROWS:
            raise SystemExit(f"unknown row {slug!r}; rows: {', '.join(ROWS)}")
        label, config = ROWS[slug]
        cells: dict[str, dict[str, list[float]]] = {"best": {}, "last": {}}
        for seed in seeds:
            overrides = _overrides(args, student=True) + [
                f"seed={seed}",
                f"name=fmnist16-{slug}-s{seed}",
                f"teacher.weights={teacher_dir}",
                f"data.options.classifier={classifier}",
            ]
            if ratio:
                overrides.append(f"terms.0.ratio={ratio}")
            students = len(load_config(CONFIGS / config, overrides).students) or 1
            if slug == "k4s":  # MSD's first stage for smaller students: Teacher Score Matching
                tsm = _train(
                    CONFIGS / "tsm-small.yaml", _tsm_overrides(args, seed, teacher_dir, classifier), "distill"
                )
                tsm_dir = Path(args.output_dir) / f"fmnist16-tsm-small-s{seed}"
                overrides += [f"students.{i}.kwargs.init={tsm_dir}" for i in range(students)]
                for which in tables:
                    for k, v in _cells(tsm, 1, which).items():
                        tsm_cells[which].setdefault(k, []).append(v)
                if args.tsm_only:
                    continue
            summary = _train(CONFIGS / config, overrides, "distill")
            for which in tables:
                for k, v in _cells(summary, students, which).items():
                    cells[which].setdefault(k, []).append(v)
        for which in tables:
            if slug == "k4s":
                tables[which]["K=4 smaller, stage 1: TSM score model (N steps)"] = tsm_cells[which]
            tables[which][label] = cells[which]
    if args.only_seeds or args.tsm_only:
        return
    keys = [
        "fd_fmnist",
        "precision",
        "recall",
        "class_consistency",
        "params",
        "params_per_student",
        "ms_per_image",
        "speedup",
    ]
    for which, results in tables.items():
        print(f"\n{which} epoch (test split)")
        print(
            "| row | FD-FMNIST ↓ | precision | recall | class consistency | params | params/student | ms/image"
            " | speed-up |"
        )
        print("|---|" + "---|" * len(keys))
        for label, cells in results.items():
            print(
                f"| {label} | " + " | ".join(_mean_std(cells[k]) if k in cells else "—" for k in keys) + " |"
            )
        fd = {label: statistics.mean(c["fd_fmnist"]) for label, c in results.items() if "fd_fmnist" in c}
        one = fd.get("1 student (DMD)")
        for label in ("K=2 same-size", "K=4 same-size", "K=4 smaller"):
            if one is not None and label in fd:
                verdict = "beats" if fd[label] < one else "does not beat"
                print(f"{label} {verdict} 1 student (DMD) on FD-FMNIST ({fd[label]:.3g} vs {one:.3g})")
    accuracy = _classifier_accuracy(teacher_config, teacher_overrides)
    print(f"the feature classifier's accuracy on the real test images: {accuracy:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": tables["best"],
                    "last": tables["last"],
                    "classifier_test_accuracy": accuracy,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
