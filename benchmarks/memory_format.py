"""Training-step time of protege's small conv families in channels_last against the standard layout, on the CPU.

What ``TrainConfig.memory_format: auto`` (channels_last on a CPU) rests on: for each model, one
SGD step (forward, cross-entropy, backward, step, ``zero_grad(set_to_none=True)``) on a random batch,
timed in the contiguous (NCHW) and the channels_last layout, interleaved, median of the rounds.
The two copies start from the same weights; the arithmetic is fp32 in both.

    .venv/bin/python benchmarks/memory_format.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import protege as pg

# (model, input channels, input side, batch): the CIFAR-style families at their usual sizes
CASES = [
    ("resnet8", 1, 28, 64),
    ("resnet20", 1, 28, 64),
    ("resnet8x4", 3, 32, 64),
    ("wrn_16_2", 3, 32, 64),
    ("vgg8", 3, 32, 64),
    ("mobilenetv2", 3, 32, 64),
    ("shufflenetv2", 3, 32, 64),
    ("cnn_m", 1, 28, 128),
    ("lenet5", 1, 28, 128),
]


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); ms per training step (median)")
    print("| model | input | NCHW ms | channels_last ms | channels_last / NCHW |")
    print("|---|---|---|---|---|")
    for name, chans, side, batch in CASES:
        torch.manual_seed(0)
        model = pg.build_model(name, num_classes=10, in_chans=chans).train()
        x, y = torch.randn(batch, chans, side, side), torch.randint(0, 10, (batch,))
        steps = {
            False: step_fn(copy.deepcopy(model), x, y),
            True: step_fn(copy.deepcopy(model).to(memory_format=torch.channels_last), x, y),
        }
        for step in steps.values():  # warm-up: oneDNN builds its kernels once per layout
            step(), step()
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for cl in (False, True) if r % 2 else (True, False):
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[cl]()
                times[cl].append((time.perf_counter() - start) / args.steps * 1000)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {batch}×{chans}×{side}×{side} | {a:.1f} | {b:.1f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
