"""Federated distillation on MNIST-5k, 10 clients: ALMA per strategy across label skew and local
data size, wall time and bytes per round (knowledge vs weights), and one heterogeneous-architecture run.

Every run is ``protege.federated.federate`` (Flower's simulation engine), the same path as
``protege federate``. The grid is strategy × Dirichlet alpha × local data size × seed:

- strategies: local, fedavg, fedmd, knfu, feddf;
- alpha ∈ {0.1, 0.5, 10} (0.1: a few classes per client; 10: close to IID);
- local data size: ``small`` (``samples_per_client`` 50: 40 train + 10 test per client) and
  ``large`` (no cap: all of a client's Dirichlet share of the 3,500 private images, ~350 on average);
- seeds 0, 1, 2 (the seed draws the partition, the public split and the initial weights).

The default is the subset that fits ~25 min on a loaded 2-core CPU: seed 0 only (30 runs); ``--full``
runs all three seeds (90 runs). Plus one heterogeneous run (KnFu and FedDF with clients alternating
``mlp_s`` and ``lenet5``, alpha 0.5, large). Results are appended to a JSON-lines file as each run
ends, and runs already in it are skipped, so an interrupted benchmark resumes.

    python benchmarks/federated.py [--full] [--seeds 0 1 2] [--rounds 3] [--cells 0.1:large 10:large]
        [--no-hetero] [--results benchmarks/results/federated-mnist5k.jsonl] [--table-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from protege.federated import federate
from protege.federated.config import validate_federation_config

STRATEGIES = ("local", "fedavg", "fedmd", "knfu", "feddf")
#: the strategy section of each label (``knfu-b1``: KnFu with a softer β = 1, not in the default grid)
STRATEGY_SPECS: dict[str, dict[str, Any]] = {
    **{name: {"name": name} for name in STRATEGIES},
    "knfu-b1": {"name": "knfu", "beta": 1.0},
}
ALPHAS = (0.1, 0.5, 10.0)
SIZES = {"small": 50, "large": None}
HETERO_MODELS = ["mlp_s", "lenet5"]
#: the extreme cells first (KnFu's claim is about large, highly skewed local data), then alpha 0.5
CELL_ORDER = [
    (0.1, "large"),
    (10.0, "large"),
    (0.1, "small"),
    (10.0, "small"),
    (0.5, "large"),
    (0.5, "small"),
]


#: per dataset: the public transfer set and the global test set (the rest is cut among the clients);
#: digits has 1,797 images, so both are smaller there (~120 images per client are left)
DATASETS = {
    "mnist5k": {"transfer_size": 500, "global_test_size": 1000},
    "digits": {"transfer_size": 300, "global_test_size": 300},
}


def run_config(
    strategy: str,
    alpha: float,
    size: str,
    seed: int,
    rounds: int,
    models: list[str],
    out: str,
    dataset: str = "mnist5k",
):
    tag = f"{strategy}-a{alpha:g}-{size}-s{seed}" + ("-hetero" if len(models) > 1 else "")
    data: dict[str, Any] = {
        "name": tag,
        "output_dir": out,
        "dataset": dataset,
        "clients": 10,
        "partition": {"scheme": "dirichlet", "alpha": alpha, "samples_per_client": SIZES[size]},
        **DATASETS[dataset],
        "models": models,
        "strategy": STRATEGY_SPECS[strategy],
        "rounds": rounds,
        "local": {"epochs": 2, "distill_epochs": 1},
        "seed": seed,
        "timeout": 600,
    }
    return tag, validate_federation_config(data, tag)


def grid(
    seeds: list[int],
    rounds: int,
    out: str,
    cells: list[tuple[float, str]] | None = None,
    strategies: list[str] | None = None,
    dataset: str = "mnist5k",
) -> list[tuple[dict[str, Any], Any]]:
    jobs = []
    strategies = strategies or list(STRATEGIES)
    for seed, (alpha, size), strategy in itertools.product(seeds, cells or CELL_ORDER, strategies):
        tag, cfg = run_config(strategy, alpha, size, seed, rounds, ["mlp_s"], out, dataset)
        jobs.append(({"tag": tag, "strategy": strategy, "alpha": alpha, "size": size, "seed": seed}, cfg))
    hetero = []
    for strategy in ("knfu", "feddf"):
        tag, cfg = run_config(strategy, 0.5, "large", seeds[0], rounds, HETERO_MODELS, out, dataset)
        key = {"tag": tag, "strategy": strategy, "alpha": 0.5, "size": "large", "seed": seeds[0]}
        hetero.append(({**key, "hetero": True}, cfg))
    first = 4 * len(strategies)  # hetero after the extreme cells of the first seed
    return jobs[:first] + hetero + jobs[first:]


def knfu_self_weight(run_dir: Path) -> float | None:
    """Mean over clients of KnFu's weight w[i, i] on a client's own knowledge in the last round."""
    notes = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"knfu weights"' in line
    ]
    if not notes:
        return None
    w = notes[-1]["weights"]
    return statistics.mean(w[i][i] for i in range(len(w)))


def load_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: ALMA (mean ± std over seeds, %) per strategy × (alpha, size); then cost per strategy."""
    plain = [r for r in results if not r.get("hetero")]
    cols = [(a, s) for s in SIZES for a in ALPHAS]
    head = "| strategy | " + " | ".join(f"α={a:g}, {s}" for a, s in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for strategy in STRATEGY_SPECS:
        cells = []
        for a, s in cols:
            xs = [
                100 * r["alma"] for r in plain if (r["strategy"], r["alpha"], r["size"]) == (strategy, a, s)
            ]
            std = f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
            cells.append(f"{statistics.mean(xs):.1f}{std} (n={len(xs)})" if xs else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    self_w = []
    for a, s in cols:
        ws = [
            r.get("knfu_self_weight")
            for r in plain
            if (r["strategy"], r["alpha"], r["size"]) == ("knfu", a, s)
        ]
        ws = [w for w in ws if w is not None]
        self_w.append(f"{statistics.mean(ws):.3f}" if ws else "—")
    lines.append("| KnFu self-weight w_ii | " + " | ".join(self_w) + " |")
    lines += [
        "",
        "| strategy | s / round | bytes up / round | bytes down / round | shares |",
        "|---|---|---|---|---|",
    ]
    for strategy in STRATEGY_SPECS:
        rs = [r for r in plain if r["strategy"] == strategy]
        if not rs:
            continue
        shares = {"fedmd": "knowledge", "knfu": "knowledge", "fedavg": "weights", "feddf": "weights"}
        lines.append(
            f"| {strategy} | {statistics.mean(r['seconds_per_round'] for r in rs):.1f} "
            f"| {statistics.mean(r['bytes_up_per_round'] for r in rs):,.0f} "
            f"| {statistics.mean(r['bytes_down_per_round'] for r in rs):,.0f} | {shares.get(STRATEGY_SPECS[strategy]['name'], 'nothing')} |"
        )
    hetero = [r for r in results if r.get("hetero")]
    if hetero:
        lines += ["", "| heterogeneous (mlp_s / lenet5), α=0.5, large | ALMA % | global acc % | s / round |"]
        lines.append("|---|---|---|---|")
        for r in hetero:
            glob = "—" if r["global_acc"] is None else f"{100 * r['global_acc']:.1f}"
            lines.append(
                f"| {r['strategy']} | {100 * r['alma']:.1f} | {glob} | {r['seconds_per_round']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="all three seeds (90 + 2 runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dataset", default="mnist5k", choices=sorted(DATASETS), help="digits: use --no-hetero (8x8 images)"
    )
    parser.add_argument("--output", default=None, help="default runs/bench-federated[-digits]")
    parser.add_argument(
        "--results", default=None, help="default benchmarks/results/federated-<dataset>.jsonl"
    )
    parser.add_argument("--table-only", action="store_true", help="print the table of the results file")
    parser.add_argument(
        "--cells",
        nargs="+",
        default=None,
        metavar="ALPHA:SIZE",
        help="only these cells, e.g. 0.1:large 10:large",
    )
    parser.add_argument(
        "--strategies", nargs="+", default=None, choices=sorted(STRATEGY_SPECS), help="default: the five"
    )
    parser.add_argument("--no-hetero", action="store_true", help="skip the heterogeneous-architecture runs")
    args = parser.parse_args()
    cells = [(float(c.split(":")[0]), c.split(":")[1]) for c in args.cells] if args.cells else None
    if cells and any(size not in SIZES for _, size in cells):
        parser.error(f"a cell is ALPHA:SIZE with SIZE one of {sorted(SIZES)}")
    seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    suffix = "" if args.dataset == "mnist5k" else f"-{args.dataset}"
    args.output = args.output or f"runs/bench-federated{suffix}"
    path = Path(args.results or f"benchmarks/results/federated-{args.dataset}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        done = {r["tag"] for r in load_results(path) if r.get("rounds") == args.rounds}
        start = time.perf_counter()
        out = str(Path(args.output).resolve())
        for key, cfg in grid(seeds, args.rounds, out, cells, args.strategies, args.dataset):
            if key["tag"] in done or (args.no_hetero and key.get("hetero")):
                continue
            t = time.perf_counter()
            summary = federate(cfg)
            row = {
                **key,
                "rounds": args.rounds,
                "wall_s": time.perf_counter() - t,
                **{k: summary[k] for k in ("alma", "global_acc", "mean_client_global_acc", "rejected")},
                **{
                    k: summary[k] for k in ("seconds_per_round", "bytes_up_per_round", "bytes_down_per_round")
                },
                "alma_per_round": summary["alma_per_round"],
                "knfu_self_weight": knfu_self_weight(cfg.run_dir),
            }
            with path.open("a") as f:  # one line per finished run: an interrupted benchmark resumes
                f.write(json.dumps(row) + "\n")
            print(f"{key['tag']}: ALMA {summary['alma']:.4f} ({row['wall_s']:.0f} s)", flush=True)
        print(f"total {time.perf_counter() - start:.0f} s")
    results = load_results(path)
    for r in results:  # rows written before the self-weight was recorded: read it from the run
        run_dir = Path(args.output) / r["tag"]
        if "knfu_self_weight" not in r and (run_dir / "metrics.jsonl").is_file():
            r["knfu_self_weight"] = knfu_self_weight(run_dir)
    print(table(results))


if __name__ == "__main__":
    main()
