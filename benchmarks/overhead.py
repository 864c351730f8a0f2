"""Overhead of protege's Distiller + fit against a hand-written PyTorch loop, side by side.

Both sides train the same student (CIFAR resnet20) from the same frozen teacher (resnet56) on the
same batches (64×3×32×32, 10 classes) with CE + KD and SGD, from the same initial weights:

- **hand loop**: teacher forward under no_grad, student forward, CE + KD written inline,
  backward, step, zero_grad;
- **protege**: ``pg.fit(pg.Distiller(student, teacher, [pg.ce(0.1), pg.kd(0.9)]), loader, cfg)``
  for one epoch, everything included (Accelerate set-up, progress bar, loss logging, the NaN
  check and the end-of-epoch safetensors checkpoint).

Rounds alternate the two sides (this machine is shared and noisy); the figure is the median of
the per-round ratios of wall time per step. Target: ratio ≤ 1.05.

    python benchmarks/overhead.py [--steps 30] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import protege as pg


def hand_loop(student: torch.nn.Module, teacher: torch.nn.Module, loader: DataLoader, lr: float) -> float:
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    student.train()
    teacher.eval()
    start = time.perf_counter()
    for x, y in loader:
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        ce = F.cross_entropy(s, y)
        kd = (
            F.kl_div(
                F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True
            )
            * 16
        )
        loss = 0.1 * ce + 0.9 * kd
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def protege_fit(student: torch.nn.Module, teacher: torch.nn.Module, loader: DataLoader, lr: float) -> float:
    distiller = pg.Distiller(student, teacher, [pg.ce(0.1), pg.kd(0.9, T=4.0)])
    cfg = pg.TrainConfig(
        epochs=1,
        optim={"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 5e-4},
        schedule={"name": "constant"},
        measure_cost=False,
        cpu=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pg.fit(distiller, loader, None, cfg, run_dir=f"{tmp}/run")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher = pg.build_model("resnet56", num_classes=10)
    student0 = pg.build_model("resnet20", num_classes=10)
    n = args.steps * args.batch
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch, shuffle=False)

    hand_loop(copy.deepcopy(student0), teacher, DataLoader(data, batch_size=args.batch), 0.05)  # warm-up
    rows = []
    for r in range(args.rounds):
        order = [("hand", hand_loop), ("protege", protege_fit)]
        if r % 2:
            order.reverse()
        times = {name: fn(copy.deepcopy(student0), teacher, loader, 0.05) / args.steps for name, fn in order}
        rows.append({**times, "ratio": times["protege"] / times["hand"]})
        print(
            f"round {r + 1}: hand {1000 * times['hand']:.1f} ms/step  protege {1000 * times['protege']:.1f} ms/step  ratio {rows[-1]['ratio']:.3f}"
        )
    ratio = statistics.median(r["ratio"] for r in rows)
    result = {
        "ratio_median": ratio,
        "hand_ms_per_step_median": 1000 * statistics.median(r["hand"] for r in rows),
        "protege_ms_per_step_median": 1000 * statistics.median(r["protege"] for r in rows),
        "rounds": rows,
        "steps": args.steps,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"median ratio protege/hand = {ratio:.3f} (target ≤ 1.05)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
