"""protege against torchdistill, side by side in one process: training throughput and accuracy.

Both frameworks distill the same frozen teacher into the same student on the same data, with the
same loss terms and weights, optimizer, schedule, batch order and initial weights; only the
framework differs.

- **Data**: protege's bundled MNIST-5k (3,500 train / 1,000 test, 1×28×28, no augmentation, so
  both sides see identical tensors), batch 64, ``num_workers=0``, shuffled by the same
  seeded per-epoch sampler (``protege.engine.loaders.EpochShuffleSampler``) on both sides.
- **Models**: teacher CIFAR ``resnet20`` (272k params), student ``resnet8`` (78k params), from
  ``protege.build_model(..., in_chans=1)``. The teacher is trained once with ``protege.run``
  (plain CE, 8 epochs, random 2-px shifts) and cached under ``runs/bench-vs-torchdistill/``;
  both sides load the same weights and run it frozen in ``eval()`` under ``no_grad``.
- **Methods** (RepDistiller's CIFAR recipes): ``kd`` = 0.1·CE + 0.9·KD (T=4);
  ``at`` = CE + 1000·AT on ``layer1``, ``layer2``, ``layer3`` (p=2); ``rkd`` = CE + RKD on the
  pooled embedding (``avgpool`` output; distance 25, angle 50); optional ``sp`` = CE +
  3000·SP on ``layer3``.
- **Training**: SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine decay per step to 0,
  5 epochs by default, fp32, the same ``torch.set_num_threads`` for both (``--threads``, 2 by
  default).
- **protege side**: ``pg.fit(pg.Distiller(student, teacher, terms), train_loader, None, cfg)``,
  the whole call timed (Accelerate set-up, per-epoch safetensors checkpoint, loss logging and
  NaN check included; progress bar off). With protege's defaults: the frozen teacher's BatchNorms
  folded into its convolutions (as ``protege.run`` does) and, on the CPU, ``fit`` training in the
  channels_last memory format (``memory_format: auto``); both keep fp32 arithmetic.
- **torchdistill side**: its real machinery: ``get_distillation_box`` built from a config dict
  (``WeightedSumLoss`` of its registered ``KDLoss`` / ``ATLoss`` / ``RKDLoss`` / ``SPKDLoss`` and
  ``CrossEntropyLoss`` via ``SimpleLossWrapper``, its forward hooks and io_dicts, its SGD and
  ``CosineAnnealingLR`` stepped per iteration, its data-loader builder), trained with the loop of
  its official ``examples/torchvision/image_classification.py`` (``pre_epoch_process``,
  ``MetricLogger.log_every``, ``forward_process``, ``post_forward_process``, ``loss.item()`` and
  NaN check per step, ``post_epoch_process``). Box construction and the whole loop are timed.

Throughput is training samples per second over the timed part (no evaluation inside it), by
wall clock and by process CPU time (all threads); the CPU-time figure is the robust one on a
shared machine when run with ``--threads 1`` (with 2 OpenMP threads and other jobs on the cores,
both wall and CPU time are inflated many-fold by threads waiting for each other). Accuracy is
the last epoch's student on the 1,000-image test split, evaluated identically for both. Runs
interleave the two frameworks, alternating which goes first, so the machine's noise
hits both. Before timing, each method's total loss is computed by both frameworks on one batch
from identical models, to show the objectives are the same.

Commands (from the repository root):

    bash scripts/setup_torchdistill_venv.sh          # .venv-torchdistill: torch as .venv, protege, torchdistill
    .venv-torchdistill/bin/python benchmarks/vs_torchdistill.py --quick       # smoke test, ~1-2 min
    .venv-torchdistill/bin/python benchmarks/vs_torchdistill.py --json runs/bench-vs-torchdistill/result.json
    # on a busy shared machine: one thread each, and read the samples per CPU-second
    .venv-torchdistill/bin/python benchmarks/vs_torchdistill.py --threads 1 --json runs/bench-vs-torchdistill/result.json

Options: ``--epochs 5 --seeds 0 1 2 --methods kd at rkd [sp] --teacher-epochs 8
--output runs/bench-vs-torchdistill --threads 2 --json FILE``; extra sides: ``--teacher-precision
bf16``, ``--with-contiguous``, ``--with-td-channels-last``, ``--with-unfolded``, ``--with-cache``.

``--teacher-precision bf16`` adds a side ``protege-bf16``: protege with ``teacher_precision: bf16``
(the frozen teacher's forward under bf16 autocast, the losses fed float32), an opt-in that is not
like-for-like; the fp32 side still runs beside it. ``--with-contiguous`` adds protege with
``memory_format: contiguous`` (its CPU default off) and ``--with-td-channels-last`` torchdistill
with both models converted to channels_last by hand, so the layout's share of the ratio shows:

    .venv-torchdistill/bin/python benchmarks/vs_torchdistill.py --threads 1 --teacher-precision bf16 \
        --with-contiguous --with-td-channels-last --json runs/bench-vs-torchdistill/result-bf16-cl.json

``--with-cache`` adds a third side, clearly apart from the like-for-like comparison: protege's
offline KD (``protege.engine.cache``: the teacher run once over the data, its logits and the taps
the method reads stored in fp32, training reads them; building the cache is inside the timing).
torchdistill 1.1.5 has no equivalent. A tap that only AT reads is stored as the teacher's attention
map (AT's teacher-side reduction); ``--with-raw-cache`` adds the side ``protege+cache-raw`` that
stores the raw feature maps instead (``cache: {reduce: false}``). The caches' bytes per training
sample, reduced and raw, are printed and saved with the result.

    .venv-torchdistill/bin/python benchmarks/vs_torchdistill.py --threads 1 --with-cache --json runs/bench-vs-torchdistill/result-with-cache.json
    .venv-torchdistill/bin/python benchmarks/vs_torchdistill.py --threads 1 --with-cache --methods at \
        --json runs/bench-vs-torchdistill/result-with-cache-atmap.json

Where the time goes (per-step time of each framework against the bare compute, teacher forward
and student step timed by hand, in interleaved one-epoch rounds; then a cProfile of one epoch
of each framework, saved under ``OUTPUT/profile/``):

    .venv-torchdistill/bin/python benchmarks/vs_torchdistill.py --profile [--profile-rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import protege as pg
from protege.engine.checkpoint import checkpoint_dir
from protege.engine.loaders import EpochShuffleSampler

try:
    import torchdistill
    from torchdistill.common.main_util import is_main_process
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.misc.log import MetricLogger, SmoothedValue
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "torchdistill is not installed in this interpreter: run `bash scripts/setup_torchdistill_venv.sh` "
        "and use .venv-torchdistill/bin/python"
    )

TEACHER, STUDENT = "resnet20", "resnet8"
BATCH = 64
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
T = 4.0
AT_LAYERS = ("layer1", "layer2", "layer3")
DEVICE = torch.device("cpu")


# --------------------------------------------------------------------------- the methods, twice


def protege_terms(method: str) -> list[pg.Term]:
    if method == "kd":
        return [pg.ce(0.1), pg.kd(0.9, T=T)]
    if method == "at":
        return [pg.ce(1.0), *(pg.at(layer, layer, 1000.0, p=2.0) for layer in AT_LAYERS)]
    if method == "rkd":
        return [
            pg.ce(1.0),
            pg.term("rkd", 1.0, student="avgpool", teacher="avgpool", w_dist=25.0, w_angle=50.0),
        ]
    if method == "sp":
        return [pg.ce(1.0), pg.term("sp", 3000.0, student="layer3", teacher="layer3")]
    raise ValueError(method)


def _td_ce(weight: float) -> dict[str, Any]:
    return {
        "criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
        "criterion_wrapper": {
            "key": "SimpleLossWrapper",
            "kwargs": {
                "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                "target": {"uses_label": True},
            },
        },
        "weight": weight,
    }


def td_method(method: str) -> tuple[list[str], dict[str, Any]]:
    """torchdistill's forward-hook paths and ``WeightedSumLoss`` sub-terms for ``method``."""
    if method == "kd":  # torchdistill's KDLoss carries the CE term itself: alpha·CE + (1-alpha)·T²·KL
        kd = {
            "key": "KDLoss",
            "kwargs": {
                "student_module_path": ".",
                "student_module_io": "output",
                "teacher_module_path": ".",
                "teacher_module_io": "output",
                "temperature": T,
                "alpha": 0.1,
                "reduction": "batchmean",
            },
        }
        return [], {"kd": {"criterion": kd, "weight": 1.0}}
    if method == "at":
        pairs = {
            f"pair{i}": {
                "teacher": {"io": "output", "path": layer},
                "student": {"io": "output", "path": layer},
                "weight": 1,
            }
            for i, layer in enumerate(AT_LAYERS, 1)
        }
        at = {"key": "ATLoss", "kwargs": {"at_pairs": pairs, "mode": "code"}}
        return list(AT_LAYERS), {"ce": _td_ce(1.0), "at": {"criterion": at, "weight": 1000.0}}
    if method == "rkd":
        rkd = {
            "key": "RKDLoss",
            "kwargs": {
                "student_output_path": "avgpool",
                "teacher_output_path": "avgpool",
                "dist_factor": 25.0,
                "angle_factor": 50.0,
                "reduction": "mean",
            },
        }
        return ["avgpool"], {"ce": _td_ce(1.0), "rkd": {"criterion": rkd, "weight": 1.0}}
    if method == "sp":
        sp = {
            "key": "SPKDLoss",
            "kwargs": {
                "student_output_path": "layer3",
                "teacher_output_path": "layer3",
                "reduction": "batchmean",
            },
        }
        return ["layer3"], {"ce": _td_ce(1.0), "sp": {"criterion": sp, "weight": 3000.0}}
    raise ValueError(method)


def td_train_config(method: str, epochs: int, seed: int, steps_per_epoch: int) -> dict[str, Any]:
    hooks, sub_terms = td_method(method)
    model_config = {
        "forward_proc": "forward_batch_only",
        "forward_hook": {"input": [], "output": hooks},
        "wrapper": None,
    }
    return {
        "num_epochs": epochs,
        "log_freq": 1000,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": EpochShuffleSampler, "kwargs": {"seed": seed}},
            "kwargs": {"batch_size": BATCH, "num_workers": 0, "drop_last": False},
        },
        "teacher": {**model_config, "requires_grad": False},
        "student": {**model_config, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "scheduler": {
            "key": "CosineAnnealingLR",
            "kwargs": {"T_max": epochs * steps_per_epoch, "eta_min": 0.0},
            "scheduling_step": 1,
        },
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}},
    }


# --------------------------------------------------------------------------- the two trainers


class Clock:
    """Wall-clock and process CPU seconds since creation. CPU time (all threads) is less sensitive
    to other jobs on a shared machine than wall time, though OpenMP's spin-waiting counts in it."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def train_config(epochs: int, seed: int, memory_format: str = "auto") -> pg.TrainConfig:
    """protege's side of the shared recipe: SGD, cosine per step, fp32 on the CPU, no extras.
    ``memory_format`` is protege's default (``auto``: channels_last on the CPU) unless a side says."""
    return pg.TrainConfig(
        epochs=epochs,
        memory_format=memory_format,
        optim={"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        schedule={"name": "cosine"},
        mixed_precision="no",
        cpu=True,
        seed=seed,
        progress=False,
        measure_cost=False,
    )


def train_protege(
    method: str,
    teacher: nn.Module,
    student: nn.Module,
    data: pg.DataSplits,
    epochs: int,
    seed: int,
    fold_teacher_bn: bool = True,
    teacher_precision: str = "fp32",
    memory_format: str = "auto",
) -> tuple[float, float]:
    """Train with ``pg.fit``; return the seconds the whole call took (wall clock, process CPU).

    The teacher's BatchNorms are folded into its convolutions (``fold_teacher_bn``), as
    ``protege.run`` does for the teachers it builds; the teacher is a private copy per run.
    ``teacher_precision="bf16"`` runs the frozen teacher under bf16 autocast (an opt-in side, not
    like-for-like); ``memory_format`` is fit's (default ``auto``: channels_last on the CPU)."""
    distiller = pg.Distiller(
        student,
        teacher,
        protege_terms(method),
        fold_teacher_bn=fold_teacher_bn,
        teacher_precision=teacher_precision,  # type: ignore[arg-type]
    )
    loader = pg.make_loader(data.train, BATCH, shuffle=True, seed=seed)
    cfg = train_config(epochs, seed, memory_format)
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        pg.fit(distiller, loader, None, cfg, run_dir=Path(tmp) / "run")
        elapsed = clock.read()
    distiller.close()
    return elapsed


def td_train_one_epoch(box: Any, epoch: int, log_freq: int) -> None:
    """``train_one_epoch`` of torchdistill's examples/torchvision/image_classification.py."""
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value}"))
    metric_logger.add_meter("img/s", SmoothedValue(window_size=10, fmt="{value}"))
    header = f"Epoch: [{epoch}]"
    for sample_batch, targets, supp_dict in metric_logger.log_every(box.train_data_loader, log_freq, header):
        start_time = time.time()
        sample_batch, targets = sample_batch.to(DEVICE), targets.to(DEVICE)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        batch_size = sample_batch.shape[0]
        metric_logger.update(loss=loss.item(), lr=box.optimizer.param_groups[0]["lr"])
        metric_logger.meters["img/s"].update(batch_size / (time.time() - start_time))
        if (torch.isnan(loss) or torch.isinf(loss)) and is_main_process():
            raise ValueError(f"The training loop was broken due to loss = {loss}")


def train_torchdistill(
    method: str,
    teacher: nn.Module,
    student: nn.Module,
    data: pg.DataSplits,
    epochs: int,
    seed: int,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Train with a torchdistill DistillationBox; return the seconds from box construction to the
    end (wall clock, process CPU). ``channels_last``: both models converted by hand first (what a
    torchdistill user can do in two lines; torchdistill itself does not)."""
    steps = math.ceil(len(data.train) / BATCH)
    config = td_train_config(method, epochs, seed, steps)
    clock = Clock()
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    box = get_distillation_box(teacher, student, {"train": data.train}, config, DEVICE, None, False, 1)
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        box.train_data_loader.sampler.set_epoch(epoch)  # the shared sampler's per-epoch permutation
        td_train_one_epoch(box, epoch, config["log_freq"])
        box.post_epoch_process()
    elapsed = clock.read()
    box.clean_modules()
    return elapsed


TAPS = {"kd": [], "at": list(AT_LAYERS), "rkd": ["avgpool"], "sp": ["layer3"]}


def write_method_cache(
    out: Path, method: str, teacher: nn.Module, data: pg.DataSplits, reduce: bool = True
) -> dict[str, Any]:
    """The teacher-output cache of ``method``: full fp32 logits and the taps it reads, one view since
    the inputs are not augmented; with ``reduce``, taps stored as the terms' teacher-side reductions
    (AT: the attention maps). The teacher runs as ``protege cache`` runs it: BatchNorms folded (taps
    kept), channels_last on the CPU (``teacher`` is a fresh copy: folding changes it in place)."""
    from protege.engine.cache import teacher_reductions, write_cache

    reductions = teacher_reductions(protege_terms(method)) if reduce else None
    return write_cache(
        out,
        data,
        [teacher],
        views=1,
        top_k="all",
        taps=TAPS[method],
        dtype="float32",
        reductions=reductions,
        fold_teacher_bn=True,
    )


def cache_bytes(method: str, teacher: nn.Module, data: pg.DataSplits) -> dict[str, float]:
    """Bytes per training sample of ``method``'s cache, with the taps reduced and raw."""
    with tempfile.TemporaryDirectory() as tmp:
        return {
            kind: write_method_cache(Path(tmp) / kind, method, teacher, data, reduce=kind == "reduced")[
                "train_bytes_per_sample"
            ]
            for kind in ("reduced", "raw")
        }


def train_protege_cached(
    method: str,
    teacher: nn.Module,
    student: nn.Module,
    data: pg.DataSplits,
    epochs: int,
    seed: int,
    reduce=True,
) -> tuple[float, float]:
    """protege's offline KD (``--with-cache``; an extra row, not the like-for-like comparison):
    write the teacher-output cache (:func:`write_method_cache`), then ``pg.fit`` from it with no
    teacher. Building the cache, which runs the teacher over train, val and test once, is timed too."""
    from protege.engine.cache import TeacherCache, cache_loader

    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        write_method_cache(Path(tmp) / "cache", method, teacher, data, reduce=reduce)
        train_set = TeacherCache.open(Path(tmp) / "cache").dataset("train", data.train, seed=seed)
        distiller = pg.Distiller(student, None, protege_terms(method), cached_teachers=1)
        loader = cache_loader(train_set, BATCH, shuffle=True, seed=seed)
        cfg = train_config(epochs, seed)
        pg.fit(distiller, loader, None, cfg, run_dir=Path(tmp) / "run")
        elapsed = clock.read()
    distiller.close()
    return elapsed


TRAINERS: dict[str, Callable[..., tuple[float, float]]] = {
    "protege": train_protege,
    "torchdistill": train_torchdistill,
}
EXTRA = {
    "protege+cache": train_protege_cached,
    "protege+cache-raw": functools.partial(train_protege_cached, reduce=False),
    "protege-unfolded": functools.partial(train_protege, fold_teacher_bn=False),
    "protege-bf16": functools.partial(train_protege, teacher_precision="bf16"),
    "protege-contiguous": functools.partial(train_protege, memory_format="contiguous"),
    "torchdistill-cl": functools.partial(train_torchdistill, channels_last=True),
}


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def test_accuracy(model: nn.Module, dataset: Any) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=500, shuffle=False):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def fresh_teacher(teacher0: nn.Module) -> nn.Module:
    """A private copy of the frozen teacher, in eval() (protege forces this; torchdistill leaves
    the mode to the caller, so it gets the same)."""
    teacher = copy.deepcopy(teacher0).eval()
    teacher.requires_grad_(False)
    return teacher


def get_teacher(output: Path, epochs: int) -> tuple[nn.Module, dict[str, Any]]:
    """Train the teacher once with protege (plain CE) and cache it; reuse it afterwards."""
    run_dir = output / f"teacher-{TEACHER}-e{epochs}"
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("status") != "completed" or "test" not in summary:
        print(f"training the teacher ({TEACHER}, {epochs} epochs) into {run_dir} ...", flush=True)
        cfg = pg.RunConfig.model_validate(
            {
                "name": run_dir.name,
                "output_dir": str(output),
                "data": {"source": "mnist5k", "batch_size": BATCH, "transforms": "augment"},
                "student": {"model": TEACHER},
                "epochs": epochs,
                "optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
                "schedule": {"name": "cosine"},
                "seed": 0,
                "progress": False,
            }
        )
        summary = pg.run(cfg, mode="train", overwrite=True)
    weights = checkpoint_dir(run_dir, "best")  # the checkpoint chosen on the validation split
    teacher = pg.build_model(TEACHER, num_classes=10, in_chans=1, weights=str(weights))
    return teacher.eval(), {"run_dir": str(run_dir), "weights": str(weights), "epochs": epochs}


def loss_check(
    method: str, teacher0: nn.Module, student0: nn.Module, data: pg.DataSplits
) -> dict[str, float]:
    """Total loss of ``method`` on one batch from identical models, computed by each framework."""
    x, y = next(iter(DataLoader(data.train, batch_size=BATCH, shuffle=False)))
    distiller = pg.Distiller(copy.deepcopy(student0).train(), fresh_teacher(teacher0), protege_terms(method))
    _, losses = distiller((x, y))
    ours = float(sum(losses.values()).detach())
    distiller.close()
    config = td_train_config(method, 1, 0, 1)
    box = get_distillation_box(
        fresh_teacher(teacher0),
        copy.deepcopy(student0),
        {"train": data.train},
        config,
        DEVICE,
        None,
        False,
        1,
    )
    box.pre_epoch_process(epoch=0)
    theirs = float(box.forward_process(x, y, {}))
    box.clean_modules()
    return {"protege": ours, "torchdistill": theirs, "rel_diff": abs(ours - theirs) / max(abs(theirs), 1e-12)}


def warm_up(teacher0: nn.Module, student0: nn.Module, data: pg.DataSplits, steps: int = 5) -> None:
    """A few untimed training steps, so one-time kernel initialisation hits neither side's timing."""
    teacher, student = fresh_teacher(teacher0), copy.deepcopy(student0).train()
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    for i, (x, y) in enumerate(DataLoader(data.train, batch_size=BATCH)):
        if i == steps:
            break
        with torch.no_grad():
            teacher(x)
        nn.functional.cross_entropy(student(x), y).backward()
        opt.step()
        opt.zero_grad()


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        row: dict[str, Any] = {}
        for fw in TRAINERS:
            rs = [r for r in runs if r["method"] == method and r["framework"] == fw]
            row[fw] = {
                key: mean_std([r[key] for r in rs])
                for key in ("samples_per_s", "samples_per_cpu_s", "test_acc")
            }
        p, t = row["protege"], row["torchdistill"]
        row["ratio"] = p["samples_per_s"][0] / t["samples_per_s"][0]
        row["ratio_cpu"] = p["samples_per_cpu_s"][0] / t["samples_per_cpu_s"][0]
        for side in EXTRA:  # each extra side against torchdistill (as it runs by default)
            rs = [r for r in runs if r["method"] == method and r["framework"] == side]
            if rs:
                u = {
                    k: mean_std([r[k] for r in rs])
                    for k in ("samples_per_s", "samples_per_cpu_s", "test_acc")
                }
                suffix = (
                    side.removeprefix("protege+").replace("-", "_")
                    if _is_cache(side)
                    else side.split("-", 1)[-1]
                )
                row[side] = u
                row[f"ratio_{suffix}"] = u["samples_per_s"][0] / t["samples_per_s"][0]
                row[f"ratio_{suffix}_cpu"] = u["samples_per_cpu_s"][0] / t["samples_per_cpu_s"][0]
        paired: dict[int, dict[str, float]] = {}
        for r in runs:
            if r["method"] == method:
                paired.setdefault(r["seed"], {})[r["framework"]] = r["samples_per_s"]
        row["paired_ratios"] = [
            x["protege"] / x["torchdistill"]
            for x in paired.values()
            if "protege" in x and "torchdistill" in x
        ]
        out[method] = row
    return out


def _pm(value: tuple[float, float], digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| method | protege samples/s | torchdistill samples/s | ratio | protege acc | torchdistill acc |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        p, t = row["protege"], row["torchdistill"]
        lines.append(
            f"| {method} | {_pm(p['samples_per_s'], 0)} | {_pm(t['samples_per_s'], 0)} | {row['ratio']:.3f} "
            f"| {_pm(p['test_acc'], 2)} | {_pm(t['test_acc'], 2)} |"
        )
    return "\n".join(lines)


def _is_cache(side: str) -> bool:
    return side.startswith("protege+cache")


def cache_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "| method | side | samples/s | ratio to torchdistill | samples/CPU-s | ratio (CPU time) | acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        for side in [s for s in EXTRA if _is_cache(s)]:
            rs = [r for r in runs if r["method"] == method and r["framework"] == side]
            if not rs:
                continue
            sps = mean_std([r["samples_per_s"] for r in rs])
            cps = mean_std([r["samples_per_cpu_s"] for r in rs])
            acc = mean_std([r["test_acc"] for r in rs])
            t = row["torchdistill"]
            lines.append(
                f"| {method} | {side} | {_pm(sps, 0)} | {sps[0] / t['samples_per_s'][0]:.3f} | {_pm(cps, 0)} "
                f"| {cps[0] / t['samples_per_cpu_s'][0]:.3f} | {_pm(acc, 2)} |"
            )
    return "\n".join(lines)


def _ratios(side: dict[str, Any], ref: dict[str, Any]) -> str:
    """``side``'s throughput over ``ref``'s, by wall clock and by CPU time."""
    wall = side["samples_per_s"][0] / ref["samples_per_s"][0]
    return f"{wall:.3f} / {side['samples_per_cpu_s'][0] / ref['samples_per_cpu_s'][0]:.3f}"


def sides_table(summary: dict[str, Any]) -> str:
    """Every protege side (and torchdistill by hand in channels_last, if run) against torchdistill
    as it runs by default, from the same interleaved run; with ``torchdistill-cl``, also against it."""
    with_cl = any("torchdistill-cl" in row for row in summary.values())
    head = "| method | side | samples/s | ÷ torchdistill (wall / CPU) |" + (
        " ÷ torchdistill-cl (wall / CPU) |" if with_cl else ""
    )
    lines = [head + " acc |", "|---|---|---|---|" + ("---|" if with_cl else "") + "---|"]
    for method, row in summary.items():
        t, cl = row["torchdistill"], row.get("torchdistill-cl")
        for side in ["protege", *EXTRA]:
            if side not in row or _is_cache(side):  # the cache has its own table
                continue
            v = row[side]
            cells = [method, side, _pm(v["samples_per_s"], 0), _ratios(v, t)]
            if with_cl:
                cells.append(_ratios(v, cl) if cl else "")
            cells.append(_pm(v["test_acc"], 2))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_table(summary: dict[str, Any]) -> str:
    lines = [
        "| method | protege samples/CPU-s | torchdistill samples/CPU-s | ratio (CPU time) | paired wall ratios |",
        "|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        p, t = row["protege"], row["torchdistill"]
        paired = ", ".join(f"{x:.3f}" for x in row["paired_ratios"])
        lines.append(
            f"| {method} | {_pm(p['samples_per_cpu_s'], 0)} | {_pm(t['samples_per_cpu_s'], 0)} "
            f"| {row['ratio_cpu']:.3f} | {paired} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- --profile: where the time goes


def time_components(
    teacher0: nn.Module, student0: nn.Module, data: pg.DataSplits, seed: int
) -> dict[str, Any]:
    """ms per step (wall, CPU) of the bare compute, hand-timed over one epoch: the teacher's forward
    (eval, no_grad) and the student's forward + CE + backward + SGD step, the latter also with the
    student in channels_last (``student_step_cl``, a copy trained beside it). The frameworks do
    this plus the distillation loss and their plumbing."""
    teacher, student = fresh_teacher(teacher0), copy.deepcopy(student0).train()
    student_cl = copy.deepcopy(student).to(memory_format=torch.channels_last)
    opts = [
        torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        for m in (student, student_cl)
    ]
    totals = {"teacher_fwd": [0.0, 0.0], "student_step": [0.0, 0.0], "student_step_cl": [0.0, 0.0]}
    n = 0
    for x, y in pg.make_loader(data.train, BATCH, shuffle=True, seed=seed):
        clock = Clock()
        with torch.no_grad():
            teacher(x)
        steps = [("teacher_fwd", clock.read())]
        for key, model, opt in (("student_step", student, opts[0]), ("student_step_cl", student_cl, opts[1])):
            clock = Clock()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append((key, clock.read()))
        for key, (wall, cpu) in steps:
            totals[key][0] += wall
            totals[key][1] += cpu
        n += 1
    return {key: (1000 * wall / n, 1000 * cpu / n) for key, (wall, cpu) in totals.items()}


def teacher_variants(teacher0: nn.Module, data: pg.DataSplits, rounds: int) -> dict[str, Any]:
    """ms per batch (wall, CPU) of the frozen teacher's forward run in ways a framework could run
    it, over the first 20 training batches, interleaved; with how far its logits move from fp32."""
    from torch.fx.experimental.optimization import fuse

    base = fresh_teacher(teacher0)
    folded = fuse(fresh_teacher(teacher0))  # conv+BN folded into one conv (eval-mode BN is affine)

    def run(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "no_grad":
            with torch.no_grad():
                return model(x)
        if mode == "bf16":
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x).float()
        with torch.inference_mode():
            return model(x)

    variants = {
        "fp32 no_grad (both frameworks)": (base, "no_grad"),
        "fp32 inference_mode": (base, "inference"),
        "fp32 conv+BN folded, inference_mode": (folded, "inference"),
        "bf16 autocast, inference_mode": (base, "bf16"),
        "bf16 autocast, conv+BN folded": (folded, "bf16"),
        "bf16 autocast, folded, channels_last": (
            copy.deepcopy(folded).to(memory_format=torch.channels_last),
            "bf16",
        ),
    }
    batches = [x for i, (x, _) in zip(range(20), DataLoader(data.train, batch_size=BATCH))]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, mode = variants[name]
            clock = Clock()
            for x in batches:
                run(model, x, mode)
            wall, cpu = clock.read()
            times[name].append((1000 * wall / len(batches), 1000 * cpu / len(batches)))
    ref = torch.cat([run(base, x, "no_grad") for x in batches])
    out: dict[str, Any] = {}
    for name, (model, mode) in variants.items():
        logits = torch.cat([run(model, x, mode) for x in batches])
        out[name] = {
            "ms_wall": statistics.median(t[0] for t in times[name]),
            "ms_cpu": statistics.median(t[1] for t in times[name]),
            "max_abs_logit_diff": float((logits - ref).abs().max()),
            "top1_agreement": float((logits.argmax(1) == ref.argmax(1)).float().mean()),
        }
    return out


def profile(args: argparse.Namespace, data: pg.DataSplits, teacher0: nn.Module, student0: nn.Module) -> None:
    """Per-step time of each framework against the bare compute, then cProfile of one epoch each."""
    import cProfile
    import pstats

    steps = math.ceil(len(data.train) / BATCH)
    out_dir = Path(args.output) / "profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    parts = ("teacher_fwd", "student_step", "student_step_cl", "protege", "torchdistill")
    variants = teacher_variants(teacher0, data, max(args.profile_rounds, 3))
    result["teacher_variants"] = variants
    print(f"frozen teacher ({TEACHER}) forward, ms per batch of {BATCH} (median, interleaved rounds):")
    for name, v in variants.items():
        print(
            f"  {name:<38} wall {v['ms_wall']:7.1f}  CPU {v['ms_cpu']:7.1f}  "
            f"max |Δlogit| {v['max_abs_logit_diff']:.2e}  top-1 agreement {v['top1_agreement']:.4f}",
            flush=True,
        )
    for method in args.methods:
        rows: dict[str, list[tuple[float, float]]] = {k: [] for k in parts}
        for r in range(args.profile_rounds):
            order = ["bare", "protege", "torchdistill"]
            if r % 2:
                order.reverse()
            for side in order:
                if side == "bare":
                    for key, value in time_components(teacher0, student0, data, r).items():
                        rows[key].append(value)
                else:
                    wall, cpu = TRAINERS[side](
                        method, fresh_teacher(teacher0), copy.deepcopy(student0), data, 1, r
                    )
                    rows[side].append((1000 * wall / steps, 1000 * cpu / steps))
        med = {k: [statistics.median(v[i] for v in rows[k]) for i in (0, 1)] for k in parts}
        result[method] = {"median_ms_per_step_wall_cpu": med, "rounds": rows}
        for i, clock in enumerate(("wall", "CPU")):
            bare = med["teacher_fwd"][i] + med["student_step"][i]
            print(
                f"{method}, {clock} ms/step (median of {args.profile_rounds} one-epoch rounds): teacher forward "
                f"{med['teacher_fwd'][i]:.1f} + student fwd/CE/bwd/step {med['student_step'][i]:.1f} = bare "
                f"{bare:.1f}; protege {med['protege'][i]:.1f} ({med['protege'][i] / bare:.3f}× bare), "
                f"torchdistill {med['torchdistill'][i]:.1f} ({med['torchdistill'][i] / bare:.3f}× bare); "
                f"teacher share of bare {med['teacher_fwd'][i] / bare:.0%}; student step in "
                f"channels_last {med['student_step_cl'][i]:.1f} ({med['student_step_cl'][i] / med['student_step'][i]:.3f}×)",
                flush=True,
            )
        for side in TRAINERS:
            prof = cProfile.Profile()
            prof.enable()
            TRAINERS[side](method, fresh_teacher(teacher0), copy.deepcopy(student0), data, 1, 0)
            prof.disable()
            path = out_dir / f"{method}-{side}.prof"
            prof.dump_stats(str(path))
            print(f"\n--- cProfile, one epoch of {method} with {side} ({path}), top 15 by own time:")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    (out_dir / "profile.json").write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="student training epochs per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--methods", nargs="+", default=["kd", "at", "rkd"], choices=["kd", "at", "rkd", "sp"]
    )
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--output", default="runs/bench-vs-torchdistill", help="where the teacher is cached")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    parser.add_argument("--json", default=None, help="write every run and the summary here")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, seed 0, 1-epoch teacher")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark: per-step time of each framework against the bare compute "
        "(interleaved one-epoch rounds), and a cProfile of one epoch each (files under OUTPUT/profile/)",
    )
    parser.add_argument("--profile-rounds", type=int, default=3)
    parser.add_argument(
        "--with-unfolded",
        action="store_true",
        help="also time protege without folding the teacher's BatchNorms (the like-for-like plumbing)",
    )
    parser.add_argument(
        "--teacher-precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: add a side 'protege-bf16', protege with teacher_precision bf16 (the frozen teacher "
        "under bf16 autocast), next to the like-for-like fp32 side",
    )
    parser.add_argument(
        "--with-contiguous",
        action="store_true",
        help="also time protege with memory_format contiguous (without its CPU default, channels_last)",
    )
    parser.add_argument(
        "--with-td-channels-last",
        action="store_true",
        help="also time torchdistill with both models converted to channels_last by hand",
    )
    parser.add_argument(
        "--with-cache",
        action="store_true",
        help="add a third side: protege from its teacher-output cache (offline KD; cache build timed)",
    )
    parser.add_argument(
        "--with-raw-cache",
        action="store_true",
        help="also time protege from a cache that stores the raw teacher maps (no teacher-side reduction)",
    )
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.teacher_epochs = 1, [0], 1
        args.output = args.output.rstrip("/") + "-quick"

    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    data = pg.load_data("mnist5k", transforms="none")
    teacher0, teacher_info = get_teacher(Path(args.output), args.teacher_epochs)
    teacher_info["test_acc"] = test_accuracy(teacher0, data.test)
    print(
        f"protege {pg.__version__}, torchdistill {torchdistill.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; teacher {TEACHER} test acc {teacher_info['test_acc']:.2f}%, "
        f"student {STUDENT}; {args.epochs} epochs × {len(data.train)} samples, batch {BATCH}",
        flush=True,
    )

    if args.profile:
        torch.manual_seed(args.seeds[0])
        student0 = pg.build_model(STUDENT, num_classes=10, in_chans=1)
        warm_up(teacher0, student0, data)
        profile(args, data, teacher0, student0)
        return

    students = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        students[seed] = pg.build_model(STUDENT, num_classes=10, in_chans=1)

    checks = {m: loss_check(m, teacher0, students[args.seeds[0]], data) for m in args.methods}
    for m, c in checks.items():
        print(
            f"loss check {m}: protege {c['protege']:.6f}  torchdistill {c['torchdistill']:.6f}  rel diff {c['rel_diff']:.1e}"
        )
    warm_up(teacher0, students[args.seeds[0]], data)

    runs: list[dict[str, Any]] = []
    k = 0
    for seed in args.seeds:
        for method in args.methods:
            sides = list(TRAINERS) + (["protege+cache"] if args.with_cache else [])
            sides += ["protege+cache-raw"] if args.with_raw_cache else []
            sides += ["protege-unfolded"] if args.with_unfolded else []
            sides += ["protege-bf16"] if args.teacher_precision == "bf16" else []
            sides += ["protege-contiguous"] if args.with_contiguous else []
            sides += ["torchdistill-cl"] if args.with_td_channels_last else []
            order = sides[k % len(sides) :] + sides[: k % len(sides)]
            if len(sides) >= 3 and (k // len(sides)) % 2:  # with 3+ sides, alternate the direction too
                order.reverse()
            k += 1
            for fw in order:
                student = copy.deepcopy(students[seed])
                torch.manual_seed(seed)
                trainer = TRAINERS.get(fw) or EXTRA[fw]
                seconds, cpu = trainer(method, fresh_teacher(teacher0), student, data, args.epochs, seed)
                acc = test_accuracy(student, data.test)
                sps = args.epochs * len(data.train) / seconds
                runs.append(
                    {
                        "method": method,
                        "framework": fw,
                        "seed": seed,
                        "train_s": seconds,
                        "train_cpu_s": cpu,
                        "samples_per_cpu_s": args.epochs * len(data.train) / cpu,
                        "samples_per_s": sps,
                        "test_acc": acc,
                    }
                )
                print(
                    f"{method:>4} seed {seed} {fw:>13}: {seconds:6.1f} s  {sps:6.1f} samples/s  test acc {acc:.2f}%",
                    flush=True,
                )

    summary = summarize(runs, args.methods)
    wall = time.perf_counter() - wall_start
    print()
    print(table(summary))
    print()
    print(cpu_table(summary))
    if len({r["framework"] for r in runs if not _is_cache(r["framework"])}) > 2:
        print()
        print(sides_table(summary))
    cache_sizes = {}
    if args.with_cache or args.with_raw_cache:
        print()
        print(cache_table(runs, summary))
        cache_sizes = {m: cache_bytes(m, fresh_teacher(teacher0), data) for m in args.methods}
        for m, sizes in cache_sizes.items():
            print(
                f"cache bytes per training sample, {m}: {sizes['reduced']:.1f} reduced, {sizes['raw']:.1f} raw"
            )
    print(
        f"\nratio = protege / torchdistill samples per second (mean over seeds); wall time {wall / 60:.1f} min"
    )
    if args.json:
        result = {
            "summary": summary,
            "runs": runs,
            "loss_check": checks,
            "teacher": {"model": TEACHER, **teacher_info},
            "student": STUDENT,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "batch": BATCH,
            "train_samples": len(data.train),
            "threads": torch.get_num_threads(),
            "versions": {
                "protege": pg.__version__,
                "torchdistill": torchdistill.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "wall_s": wall,
            "table": table(summary),
            "cpu_table": cpu_table(summary),
            "cache_table": cache_table(runs, summary) if args.with_cache or args.with_raw_cache else None,
            "cache_bytes_per_sample": cache_sizes,
            "sides_table": sides_table(summary),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
