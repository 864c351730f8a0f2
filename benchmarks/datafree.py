"""Distilling an MNIST-5k teacher without its training data: real data vs a shifted proxy pool
(plain KD, KD³ and its ablations) vs data-free synthesis (DeepInversion, adversarial) vs chance.

Teacher: ``convnet`` (BatchNorm ConvNet, 0.42 M parameters) trained on MNIST-5k with cross-entropy
(the MNIST quickstart recipe before issue 18: 15 epochs, random 2-px shifts), or an existing run given with
``--teacher``. Student: ``lenet5`` (no BatchNorm). Every arm is a plain ``protege.run`` of a
config dict built here (its ``runs/bench-datafree/<arm>-s<seed>/config.yaml`` reproduces it
alone) and is evaluated on the labelled MNIST-5k test split (1,000 images) at the last epoch and at
the best epoch by validation accuracy (the 500-image val split: model selection uses labelled
target data in every arm alike; say so when quoting the best-epoch column).

Same schedule for every trained arm: ``--epochs`` epochs of SGD (lr 0.05, momentum 0.9, weight
decay 5e-4, cosine, gradients clipped to norm 5), batches of 64, random 2-px shifts of the training images, and 3,500 training
samples per epoch (55 steps; the size of the real training split): the pool arms draw 3,500 of
their (kept) samples per epoch, DeepInversion synthesizes 3,500 images, the generator makes 55
batches per epoch. The only loss is Hinton KD (T = 4) unless the arm adds KD³'s terms; no arm
reads a label.

Arms:

- ``real-kd``: KD on the real MNIST-5k training split (3,500 images): the upper bound.
- ``pool-kd``: KD on the ``shifted-pool`` source (``--pool-size`` images, see
  ``protege.data.pools``: upscaled scikit-learn digits, typeset digits, letters, shapes and
  strokes, textures), the whole pool every epoch (``selection: false``).
- ``kd3``: KD³ on the same pool: instance selection + ``kd3_align`` + ``kd3_contrast``.
- ``kd3-no-selection`` / ``kd3-no-align`` / ``kd3-no-contrast``: KD³ with one component removed.
- ``deepinversion``: KD on 3,500 images synthesized by DeepInversion from the teacher.
- ``adversarial``: KD on the batches of a generator trained to maximize the student's
  disagreement with the teacher (DFAD-style, with the BN-statistic loss).
- ``chance``: the student as initialized for that seed, never trained, evaluated on the same test
  split (the sanity line; the balanced test split's chance level is 10 %).

Results go to a JSON-lines file, one line per finished (arm, seed); a line whose config is
unchanged is not run again, so an interrupted benchmark resumes. Time per synthesized batch:
DeepInversion's mean time to optimize one batch of ``synthesis.batch_size`` images (from the set's
``index.json``), the adversarial generator's mean time per batch of 64 (its own training steps
included; from ``metrics.jsonl``).

    python benchmarks/datafree.py [--seeds 0 1 2] [--epochs 20] [--arms real-kd pool-kd ...]
        [--teacher runs/mnist-teacher] [--results benchmarks/results/datafree-mnist5k.jsonl]
    python benchmarks/datafree.py --table-only
    python benchmarks/datafree.py --quick          # smoke run: 1 epoch, tiny pool and synthesis
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import protege as pg
from protege.files import atomic_write_text

ARMS = (
    "real-kd",
    "pool-kd",
    "kd3",
    "kd3-no-selection",
    "kd3-no-align",
    "kd3-no-contrast",
    "deepinversion",
    "adversarial",
    "chance",
)
WHAT = {
    "real-kd": "KD on the real training split (upper bound)",
    "pool-kd": "KD on the shifted pool, no selection",
    "kd3": "KD³: selection + alignment + MixDistribution contrast",
    "kd3-no-selection": "KD³ without instance selection",
    "kd3-no-align": "KD³ without feature/classifier alignment",
    "kd3-no-contrast": "KD³ without MixDistribution contrast",
    "deepinversion": "KD on DeepInversion images",
    "adversarial": "KD on an adversarial generator's images",
    "chance": "untrained student (random init)",
}
TEACHER, STUDENT = "convnet", "lenet5"
BATCH = 64
SAMPLES_PER_EPOCH = 3500  # the real training split's size: the same steps per epoch in every arm
KD = {"loss": "kd", "weight": 1.0, "T": 4.0}
# KD³'s two loss terms as configs/kd3-mnist.yaml has them: LeNet-5's fc2 feature (84-d, what its
# classifier reads) against the teacher's classifier input (256-d)
ALIGN = {
    "loss": "kd3_align",
    "weight": 1.0,
    "student": "fc2",
    "teacher": "fc:in",
    "head": "fc",
    "kd": 1.0,
    "kd_T": 4.0,
}
CONTRAST = {
    "loss": "kd3_contrast",
    "weight": 0.1,
    "student": "fc2",
    "teacher": "fc:in",
    "feat_dim": 128,
    "temperature": 0.5,
}


def settings(
    quick: bool, epochs: int | None, pool_size: int | None, di_iterations: int | None = None
) -> dict[str, Any]:
    """The sizes of the benchmark (``quick``: a smoke run of a few seconds per arm)."""
    if quick:
        return {
            "epochs": epochs or 1,
            "teacher_epochs": 1,
            "pool_size": pool_size or 600,
            "samples_per_epoch": 256,
            "di": {"n_images": 128, "batch_size": 64, "iterations": di_iterations or 20},
        }
    return {
        "epochs": epochs or 20,
        "teacher_epochs": 15,
        "pool_size": pool_size or 6000,
        "samples_per_epoch": SAMPLES_PER_EPOCH,
        # configs/datafree-deepinversion.yaml's optimization, 3,500 images
        "di": {"n_images": SAMPLES_PER_EPOCH, "batch_size": 100, "iterations": di_iterations or 200},
    }


def common(seed: int, epochs: int, out: str) -> dict[str, Any]:
    return {
        "output_dir": out,
        "seed": seed,
        "data": {"source": "mnist5k", "batch_size": BATCH, "transforms": "augment"},
        "epochs": epochs,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        # LeNet-5 has no BatchNorm: KD alone (× T² = 16) at this rate can kill it in the first steps
        "clip_grad_norm": 5.0,
        "progress": False,
        "measure_cost": False,
    }


def teacher_config(s: dict[str, Any], out: str) -> dict[str, Any]:
    """The MNIST teacher recipe (configs/mnist-teacher.yaml), seed 0."""
    cfg = {**common(0, s["teacher_epochs"], out), "name": "teacher", "student": {"model": TEACHER}}
    del cfg["clip_grad_norm"]  # a BatchNorm ConvNet trained on labels needs none
    return cfg


def arm_config(arm: str, seed: int, s: dict[str, Any], teacher: str, out: str) -> dict[str, Any]:
    """The run config (a dict for ``pg.load_config``) of ``arm`` at ``seed``."""
    cfg = {
        **common(seed, s["epochs"], out),
        "name": f"{arm}-s{seed}",
        "teacher": {"model": TEACHER, "weights": teacher},
        "student": {"model": STUDENT},
        "terms": [KD],
    }
    data = dict(cfg["data"])
    pool = {"source": "shifted-pool", "options": {"size": s["pool_size"]}}
    proxy = {"pool": pool, "samples_per_epoch": s["samples_per_epoch"]}
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    if arm == "pool-kd":
        data.update(strategy="proxy", proxy={**proxy, "selection": False})
    elif arm.startswith("kd3"):
        data.update(strategy="proxy", proxy={**proxy, "selection": arm != "kd3-no-selection"})
        cfg["terms"] = [
            KD,
            *([] if arm == "kd3-no-align" else [ALIGN]),
            *([] if arm == "kd3-no-contrast" else [CONTRAST]),
        ]
    elif arm == "deepinversion":
        # the set depends on the teacher, the options and the seed only: keyed by them, it is reused by a
        # re-run with other training settings, and a set made with other options is never in the way
        di = {"method": "deepinversion", **s["di"]}
        key = hashlib.sha256(json.dumps([di, teacher, seed], sort_keys=True).encode()).hexdigest()[:12]
        di["path"] = str(Path(out) / "synthetic" / f"deepinversion-s{seed}-{key}")
        data.update(strategy="synthetic", synthesis=di)
    elif arm == "adversarial":
        steps = math.ceil(s["samples_per_epoch"] / BATCH)
        data.update(strategy="synthetic", synthesis={"method": "adversarial", "steps_per_epoch": steps})
    cfg["data"] = data
    return cfg


def config_key(cfg: dict[str, Any]) -> str:
    """What decides an arm's result: the config without where it is written."""
    kept = {k: v for k, v in cfg.items() if k not in ("output_dir", "name")}
    synthesis = kept["data"].get("synthesis")
    if synthesis and "path" in synthesis:  # where the set lies (keyed by what made it)
        kept["data"] = {**kept["data"], "synthesis": {k: v for k, v in synthesis.items() if k != "path"}}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def train_teacher(s: dict[str, Any], out: str) -> tuple[str, float | None]:
    """The teacher's run directory (trained now unless a finished run is there) and its test acc."""
    cfg = pg.load_config(None, **teacher_config(s, out))
    summary_file = cfg.run_dir / "summary.json"
    if summary_file.is_file() and "test" in json.loads(summary_file.read_text()):
        summary = json.loads(summary_file.read_text())
    else:
        summary = pg.run(cfg, mode="train", overwrite=True, report=False)
    return str(cfg.run_dir), summary["test"]["best"]["acc"]


def teacher_accuracy(teacher: str) -> float | None:
    summary = Path(teacher) / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("test", {}).get("best", {}).get("acc")
    return None


def evaluate_untrained(cfg_dict: dict[str, Any]) -> dict[str, float]:
    """Test metrics of the student exactly as ``pg.run`` of ``cfg_dict`` would initialize it."""
    from protege.build import build_distiller, load_run_data

    cfg = pg.load_config(None, **cfg_dict)
    data = load_run_data(cfg)
    distiller = build_distiller(cfg, data)
    loader = pg.make_loader(data.test, cfg.data.eval_batch_size, shuffle=False)
    return pg.evaluate(distiller.student, loader, distiller.task, list(distiller.teachers.values()))


def metrics_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def synthesis_seconds(arm: str, run_dir: Path, synthesis: dict[str, Any]) -> float | None:
    """Mean seconds per synthesized batch of the run (see the module docstring)."""
    if arm == "deepinversion":
        index = Path(synthesis.get("path") or run_dir / "synthetic") / "index.json"
        return json.loads(index.read_text()).get("seconds_per_batch") if index.is_file() else None
    if arm == "adversarial":
        xs = [
            r["synthesis/seconds_per_batch"]
            for r in metrics_records(run_dir)
            if "synthesis/seconds_per_batch" in r
        ]
        return statistics.fmean(xs) if xs else None
    return None


def proxy_stats(run_dir: Path) -> dict[str, float]:
    """The last epoch's KD³ selection statistics (kept samples, their in-distribution share)."""
    last: dict[str, float] = {}
    for record in metrics_records(run_dir):
        found = {
            k: v for k, v in record.items() if k.startswith("proxy/") and not k.startswith("proxy/kept_c")
        }
        last = found or last
    return last


def run_arm(arm: str, seed: int, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if arm == "chance":
        test = evaluate_untrained(cfg_dict)
        last = best = test
    else:
        summary = pg.run(pg.load_config(None, **cfg_dict), mode="distill", overwrite=True, report=False)
        last, best = summary["test"]["last"], summary["test"]["best"]
    run_dir = Path(cfg_dict["output_dir"]) / cfg_dict["name"]
    return {
        "arm": arm,
        "seed": seed,
        "epochs": cfg_dict["epochs"],
        "key": config_key(cfg_dict),
        "last_acc": last["acc"],
        "best_acc": best["acc"],
        "last_agreement": last.get("agreement"),
        "seconds_per_synth_batch": synthesis_seconds(arm, run_dir, cfg_dict["data"].get("synthesis") or {}),
        "proxy": proxy_stats(run_dir),
        "wall_s": time.perf_counter() - t0,
    }


def load_results(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def _ms(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not xs:
        return "—"
    std = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs) * scale:.{digits}f} ± {std:.{digits}f}"


def table(results: list[dict[str, Any]], teacher_acc: float | None = None) -> str:
    """Markdown: per arm, test accuracy (%) at the last and best epoch (mean ± std over seeds),
    agreement with the teacher, time per synthesized batch, and KD³'s last selection. Of an arm
    run with several configs, only the latest row of each (arm, seed) counts (the key holds the seed,
    so it cannot tell settings apart across seeds: re-run every seed after changing settings)."""
    latest = {(r["arm"], r["seed"]): r["key"] for r in results}
    results = [r for r in results if r["key"] == latest[r["arm"], r["seed"]]]
    lines = []
    if teacher_acc is not None:
        lines.append(f"Teacher ({TEACHER}) test accuracy: {100 * teacher_acc:.2f} %. Student: {STUDENT}.\n")
    lines += [
        "| arm | what | test acc % (last) | test acc % (best) | agreement % (last) | s / synth. batch "
        "| kept / in-dist. share (last epoch) | seeds | epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        agree = [r["last_agreement"] for r in rows if r.get("last_agreement") is not None]
        secs = [r["seconds_per_synth_batch"] for r in rows if r.get("seconds_per_synth_batch") is not None]
        kept = [r["proxy"]["proxy/kept"] for r in rows if "proxy/kept" in r.get("proxy", {})]
        share = [
            r["proxy"]["proxy/in_dist_share"] for r in rows if "proxy/in_dist_share" in r.get("proxy", {})
        ]
        selection = "—"
        if kept:
            selection = f"{statistics.fmean(kept):.0f}" + (
                f" / {statistics.fmean(share):.2f}" if share else ""
            )
        epochs = sorted({r["epochs"] for r in rows})
        lines.append(
            f"| {arm} | {WHAT[arm]} | {_ms([r['last_acc'] for r in rows])} | {_ms([r['best_acc'] for r in rows])} "
            f"| {_ms(agree)} | {_ms(secs, 1.0, 3) if secs else '—'} | {selection} "
            f"| {', '.join(str(r['seed']) for r in rows)} | {', '.join(map(str, epochs))} |"
        )
    selected = [r for r in results if any(k.startswith("proxy/kept_") for k in r.get("proxy", {}))]
    if selected:
        from protege.data.pools import PARTS

        lines += [
            "",
            "KD³ selection at the last epoch: pool samples kept per part (mean over seeds), and the share of "
            "the kept in-distribution samples whose combined prediction names their true digit:",
            "",
            "| arm | " + " | ".join(PARTS) + " | pseudo-label acc. |",
            "|---|" + "---|" * (len(PARTS) + 1),
        ]
        for arm in ARMS:
            rows = [r["proxy"] for r in selected if r["arm"] == arm]
            if rows:
                kept = [f"{statistics.fmean(r.get(f'proxy/kept_{p}', 0) for r in rows):.0f}" for p in PARTS]
                acc = [r["proxy/pseudo_acc"] for r in rows if "proxy/pseudo_acc" in r]
                lines.append(f"| {arm} | " + " | ".join(kept) + f" | {_ms(acc, 100.0, 1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (--quick: 1)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--pool-size", type=int, default=None, help="default 6000 (--quick: 600)")
    parser.add_argument(
        "--di-iterations",
        type=int,
        default=None,
        help="DeepInversion steps per batch (default 200; --quick: 20)",
    )
    parser.add_argument(
        "--teacher", default=None, help="a trained convnet run directory (default: train one)"
    )
    parser.add_argument(
        "--output", default=None, help="run directories (default runs/bench-datafree[-quick])"
    )
    parser.add_argument("--results", default=None, help="default benchmarks/results/datafree-mnist5k.jsonl")
    parser.add_argument("--table-only", action="store_true", help="print the table of the results file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, tiny pool and synthesis")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a box shared with other jobs)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    s = settings(args.quick, args.epochs, args.pool_size, args.di_iterations)
    suffix = "-quick" if args.quick else ""
    out = args.output or f"runs/bench-datafree{suffix}"
    path = Path(
        args.results
        or (f"{out}/results.jsonl" if args.quick else "benchmarks/results/datafree-mnist5k.jsonl")
    )
    teacher_acc = None
    if not args.table_only:
        if args.teacher:
            teacher, teacher_acc = args.teacher, teacher_accuracy(args.teacher)
        else:
            teacher, teacher_acc = train_teacher(s, out)
        done = {(r["arm"], r["seed"], r["key"]) for r in load_results(path)}
        for seed in args.seeds or ([0] if args.quick else [0, 1, 2]):
            for arm in args.arms:
                cfg = arm_config(arm, seed, s, teacher, out)
                if (arm, seed, config_key(cfg)) in done:
                    continue
                row = run_arm(arm, seed, cfg)
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:  # one line per finished arm: an interrupted benchmark resumes
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{arm}-s{seed}: test acc {100 * row['last_acc']:.2f} % (best epoch {100 * row['best_acc']:.2f} %),"
                    f" {row['wall_s']:.0f} s",
                    flush=True,
                )
        if teacher_acc is not None:
            atomic_write_text(
                path.with_suffix(".teacher.json"), json.dumps({"teacher": teacher, "acc": teacher_acc})
            )
    teacher_file = path.with_suffix(".teacher.json")
    if teacher_acc is None and teacher_file.is_file():
        teacher_acc = json.loads(teacher_file.read_text())["acc"]
    print(table(load_results(path), teacher_acc))


if __name__ == "__main__":
    main()
