"""Every distillation method on MNIST-5k, three teacher→student pairs, several seeds: one table.

Columns follow RepDistiller's CIFAR-100 table: the teacher, the student trained from scratch
(CE only), and the student distilled by each method (CE + the method's term at the weight the
reference implementations use; KD is 0.1·CE + 0.9·KD at T=4; SimKD has no CE: it classifies with
the teacher's head). Multi-stage methods run their pre-training stage first (FT: paraphraser,
FSP and AB: student initialisation) and then CE. Every run is a plain ``protege.run`` of a config
built here, so each cell can be reproduced alone from its ``runs/<table>/<run>/config.yaml``.

Pairs, scaled to 28×28 single-channel digits (the KD papers' CIFAR nets are too large for 3,500
training images and a CPU):

- ``resnet``: CIFAR ResNet-14 → ResNet-8, half width (8/16/32 channels): same family, depth differs;
- ``cnn-lenet``: a VGG-style BN ConvNet → LeNet-5 (no BatchNorm, 5×5 convs): different family;
- ``resnet-cnn``: ResNet-14 → a plain VGG-style CNN of the same widths: residual → plain.

A method that cannot apply to a pair says so in the table (FSP needs equal channel counts per
layer; AB needs pre-activation taps, which our CIFAR ResNets do not expose).

    python benchmarks/method_table.py --seeds 3 --epochs 6 --json method_table.json
    python benchmarks/method_table.py --pairs cnn-lenet --methods kd,at --seeds 1   # a few cells

Finished runs are skipped when the command is run again (delete ``runs/method-table`` to redo).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import protege as pg
from protege.config import load_config

PAIRS: dict[str, dict[str, Any]] = {
    "resnet": {
        "teacher": {"model": "resnet14", "kwargs": {"widths": [8, 8, 16, 32]}},
        "student": {"model": "resnet8", "kwargs": {"widths": [8, 8, 16, 32]}},
        "t_maps": ["layer1", "layer2", "layer3"],
        "s_maps": ["layer1", "layer2", "layer3"],
        "t_pre": None,
        "s_pre": None,
    },
    "cnn-lenet": {
        "teacher": {"model": "convnet"},
        "student": {"model": "lenet5"},
        "t_maps": ["layer2", "layer3"],
        "s_maps": ["layer1", "layer2"],
        "t_pre": ["layer2.1", "layer3.1"],  # BatchNorm outputs, before the ReLU
        "s_pre": ["layer1.0", "layer2.0"],  # conv outputs, before the ReLU
        # the ConvNet classifies a hidden fc layer's output, not its pooled last map
        "simkd": ("fc:in", "fc:in"),
    },
    "resnet-cnn": {
        "teacher": {"model": "resnet14", "kwargs": {"widths": [8, 8, 16, 32]}},
        "student": {"model": "cnn_m", "kwargs": {"widths": [8, 16, 32]}},
        "t_maps": ["layer1", "layer2", "layer3"],
        "s_maps": ["layer1", "layer2", "layer3"],
        "t_pre": None,
        "s_pre": None,
    },
}

EMBED = "fc:in"  # the pooled features the classifier sees


def _pairs(p: dict[str, Any]) -> list[tuple[str, str]]:
    return list(zip(p["s_maps"], p["t_maps"]))


def method_spec(method: str, p: dict[str, Any], epochs: int) -> dict[str, Any] | str:
    """Terms (and stages) of ``method`` for pair ``p``, or the reason it does not apply."""
    ce = {"loss": "ce"}
    s_last, t_last = p["s_maps"][-1], p["t_maps"][-1]
    init = max(epochs // 3, 1)
    if method == "scratch":
        return {"terms": [ce]}
    if method == "kd":
        return {"terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]}
    if method == "kd_ls":
        # logit standardization (Sun et al., CVPR 2024) with its repository's recipe: CE 0.1, KD 9 at T 2
        return {
            "terms": [
                {"loss": "ce", "weight": 0.1},
                {"loss": "kd", "weight": 9.0, "T": 2, "standardize": True},
            ]
        }
    if method == "ctkd":  # kd's recipe with CTKD's learned, adversarial temperature
        return {"terms": [{"loss": "ce", "weight": 0.1}, {"loss": "ctkd", "weight": 0.9}]}
    if method == "dkd":  # mdistiller's CIFAR recipe: CE 1, alpha 1, beta 8, T 4, warm-up 1/12 of the run
        return {
            "terms": [
                ce,
                {"loss": "dkd", "weight": 1.0, "alpha": 1, "beta": 8, "T": 4, "warmup": max(epochs / 12, 1)},
            ]
        }
    if method == "dist":  # the paper's CIFAR-100 recipe: CE 1, beta = gamma = 2, T 4
        return {"terms": [ce, {"loss": "dist", "weight": 1.0, "beta": 2.0, "gamma": 2.0, "T": 4}]}
    if method == "diswot":  # DisWOT's two distillers beside CE, weight 1 each (the paper gives none)
        return {
            "terms": [
                ce,
                {"loss": "diswot_relation", "weight": 1.0, "student": s_last, "teacher": t_last},
                {
                    "loss": "diswot_semantic",
                    "weight": 1.0,
                    "student": [EMBED, "logits"],
                    "teacher": [EMBED, "logits"],
                },
            ]
        }
    if method == "fitnet":
        s, t = p["s_maps"][-2], p["t_maps"][-2]
        return {
            "terms": [
                ce,
                {"loss": "fitnet", "weight": 100, "student": s, "teacher": t, "adapter": "conv_bn_relu"},
            ]
        }
    if method in ("at", "nst", "vid"):
        weight = {"at": 1000, "nst": 50, "vid": 1}[method]
        terms = [{"loss": method, "weight": weight, "student": s, "teacher": t} for s, t in _pairs(p)]
        return {"terms": [ce, *terms]}
    if method == "sp":
        return {"terms": [ce, {"loss": "sp", "weight": 3000, "student": s_last, "teacher": t_last}]}
    if method == "ickd":
        return {
            "terms": [
                ce,
                {"loss": "ickd", "weight": 2.5, "student": s_last, "teacher": t_last, "adapter": "conv_bn"},
            ]
        }
    if method == "cc":
        return {
            "terms": [
                ce,
                {"loss": "cc", "weight": 0.02, "student": EMBED, "teacher": EMBED, "adapter": "linear"},
            ]
        }
    if method == "rkd":
        return {"terms": [ce, {"loss": "rkd", "weight": 1.0, "student": EMBED, "teacher": EMBED}]}
    if method == "pkt":
        return {"terms": [ce, {"loss": "pkt", "weight": 30000, "student": EMBED, "teacher": EMBED}]}
    if method == "crd":
        return {
            "terms": [ce, {"loss": "crd", "weight": 0.8, "student": EMBED, "teacher": EMBED, "nce_k": 2048}]
        }
    if method == "reviewkd":
        keys_s, keys_t = [*p["s_maps"], EMBED], [*p["t_maps"], EMBED]
        return {
            "terms": [
                ce,
                {
                    "loss": "reviewkd",
                    "weight": 1.0,
                    "student": keys_s,
                    "teacher": keys_t,
                    "warmup": epochs / 2,
                },
            ]
        }
    if method == "simkd":  # the teacher tap must be what the teacher's classifier reads (pooled)
        s_tap, t_tap = p.get("simkd", (s_last, t_last))
        return {"terms": [{"loss": "simkd", "weight": 1.0, "student": s_tap, "teacher": t_tap}]}
    if method == "ft":
        ft = {"loss": "ft", "name": "ft", "student": s_last, "teacher": t_last}
        return {
            "stages": [
                {
                    "name": "paraphraser",
                    "epochs": init,
                    "freeze_student": True,
                    "terms": [{**ft, "weight": 1.0, "phase": "paraphrase"}],
                },
                {"name": "main", "epochs": epochs, "terms": [ce, {**ft, "weight": 500, "phase": "transfer"}]},
            ]
        }
    if method == "fsp":
        return {
            "stages": [
                {
                    "name": "fsp",
                    "epochs": init,
                    "terms": [{"loss": "fsp", "student": p["s_maps"], "teacher": p["t_maps"]}],
                },
                {"name": "main", "epochs": epochs, "terms": [ce]},
            ],
            "needs_equal_channels": True,
        }
    if method == "ab":
        if not p["s_pre"] or not p["t_pre"]:
            return "n/a: no pre-activation taps"
        terms = [
            {"loss": "ab", "weight": 0.003 / 2**i, "student": s, "teacher": t, "adapter": "conv_bn"}
            for i, (s, t) in enumerate(reversed(list(zip(p["s_pre"], p["t_pre"]))))
        ]
        return {
            "stages": [
                {"name": "init", "epochs": init, "terms": terms},
                {"name": "main", "epochs": epochs, "terms": [ce]},
            ]
        }
    raise SystemExit(f"unknown method {method!r}")


METHODS = ["scratch", "kd", "kd_ls", "ctkd", "dkd", "dist", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd",
           "ickd", "reviewkd", "simkd", "diswot"]  # fmt: skip


def _channels_match(p: dict[str, Any], data: pg.DataSplits) -> bool:
    from protege.build import build_from
    from protege.config import ModelConfig

    x = data.train[0][0].unsqueeze(0)
    shapes = []
    for who, keys in (("student", p["s_maps"]), ("teacher", p["t_maps"])):
        model = build_from(ModelConfig(**p[who]), data).eval()
        with pg.Taps(model, keys) as taps, torch.no_grad():
            model(x)
            shapes.append([taps.outputs[k].shape[1] for k in keys])
    return shapes[0] == shapes[1]


def data_spec(args: argparse.Namespace, transforms: str = "augment") -> dict[str, Any]:
    """The data section of every run: ``--source`` with its size options."""
    options = {
        key: value
        for key, value in (
            ("size", args.size),
            ("train_size", args.train_size),
            ("val_size", args.val_size),
            ("test_size", args.test_size),
        )
        if value is not None
    }
    spec: dict[str, Any] = {"source": args.source, "batch_size": args.batch_size, "transforms": transforms}
    if options:
        spec["options"] = options
    return spec


def base_config(args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    return {
        "name": name,
        "output_dir": str(Path(args.output_dir)),
        "data": data_spec(args),
        "epochs": args.epochs,
        "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "clip_grad_norm": args.clip_grad_norm,
        "seed": seed,
        "progress": False,
        "measure_cost": False,
    }


def run_one(cfg_dict: dict[str, Any], mode: str) -> dict[str, Any]:
    cfg = load_config(None, **cfg_dict)
    done = cfg.run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if "test" in summary:
            return summary
    return pg.run(cfg, mode=mode, overwrite=True, report=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--source", default="mnist5k", help="mnist5k (default) or fashion-mnist (`make data`)")
    ap.add_argument("--size", type=int, default=None, help="resize the images to SIZE x SIZE")
    ap.add_argument("--train-size", type=int, default=None, help="fashion-mnist: training images drawn")
    ap.add_argument("--val-size", type=int, default=None, help="fashion-mnist: validation images drawn")
    ap.add_argument("--test-size", type=int, default=None, help="fashion-mnist: test images drawn")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--teacher-epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument(
        "--clip-grad-norm",
        type=float,
        default=5.0,
        help="for every run alike: LeNet (no BatchNorm) diverges under AT's weight 1000 without it",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-dir", default="runs/method-table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = data_spec(args)
    data = pg.load_data(args.source, **spec.get("options", {}))
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for pair in args.pairs.split(","):
        p = PAIRS[pair]
        teacher_name = f"{pair}-teacher"
        tcfg = base_config(args, teacher_name, 0) | {"student": p["teacher"], "epochs": args.teacher_epochs}
        teacher = run_one(tcfg, "train")
        results[pair] = {
            "teacher": {"acc": [teacher["test"]["last"]["acc"]], "best": [teacher["test"]["best"]["acc"]]}
        }
        teacher_spec = p["teacher"] | {"weights": str(Path(args.output_dir) / teacher_name)}
        equal_channels = _channels_match(p, data)
        for method in args.methods.split(","):
            spec = method_spec(method, p, args.epochs)
            if isinstance(spec, dict) and spec.pop("needs_equal_channels", False) and not equal_channels:
                spec = "n/a: channel counts differ"
            if isinstance(spec, str):
                results[pair][method] = {"note": spec}
                continue
            cell: dict[str, list[float]] = {"acc": [], "best": [], "agreement": [], "time_s": []}
            for seed in range(args.seeds):
                cfg = base_config(args, f"{pair}-{method}-s{seed}", seed) | spec
                cfg["student"] = p["student"]
                cfg["teacher"] = teacher_spec
                t0 = time.perf_counter()
                summary = run_one(cfg, "train" if method == "scratch" else "distill")
                test = summary["test"]
                cell["acc"].append(test["last"]["acc"])
                cell["best"].append(test["best"]["acc"])
                cell["agreement"].append(test["last"].get("agreement", float("nan")))
                cell["time_s"].append(time.perf_counter() - t0)
                print(f"{pair:10s} {method:9s} seed {seed}: acc {test['last']['acc']:.4f} "
                      f"(best-epoch {test['best']['acc']:.4f})  {time.perf_counter() - start:7.0f} s", flush=True)  # fmt: skip
            results[pair][method] = cell
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, args)


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    pairs = list(results)
    head = [f"{pair}: {PAIRS[pair]['teacher']['model']}→{PAIRS[pair]['student']['model']}" for pair in pairs]
    rows = ["teacher", *[m for m in METHODS if any(m in results[p] for p in pairs)]]
    titles = {
        "acc": f"Test accuracy (%), last epoch, mean ± std over {args.seeds} seeds; {args.epochs} epochs",
        "best": "Best-epoch (by validation) test accuracy:",
    }
    for key, title in titles.items():
        print(f"\n{title}\n")
        print("| method | " + " | ".join(head) + " |")
        print("|---|" + "---|" * len(pairs))
        for row in rows:
            cells = [results[pair].get(row) for pair in pairs]
            shown = ["—" if c is None else c.get("note") or _ms(c[key]) for c in cells]
            print(f"| {row} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()
