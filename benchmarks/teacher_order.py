"""Why the Distiller runs its teachers before the student: step time of both orders, side by side.

A hand-written KD step (resnet56 teacher under no_grad, resnet20 student, CE + KD, SGD) on one
64×3×32×32 batch, once with the teacher's forward first and once with the student's first.
Steps of the two orders alternate (the machine is shared and noisy); the figure is the ratio of
the median step times.

    python benchmarks/teacher_order.py [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import protege as pg


def make_step(student: torch.nn.Module, teacher: torch.nn.Module, teacher_first: bool) -> Callable[[], None]:
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        if teacher_first:
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
        else:
            s = student(x)
            with torch.no_grad():
                t = teacher(x)
        kd = F.kl_div(
            F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True
        )
        (0.1 * F.cross_entropy(s, y) + 0.9 * 16 * kd).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = pg.build_model("resnet56", num_classes=10).eval()
    student = pg.build_model("resnet20", num_classes=10)
    first = make_step(copy.deepcopy(student), teacher, teacher_first=True)
    second = make_step(copy.deepcopy(student), teacher, teacher_first=False)
    for _ in range(3):
        first()
        second()
    times: dict[str, list[float]] = {"teacher first": [], "student first": []}
    for i in range(args.steps):
        order = [("teacher first", first), ("student first", second)]
        for name, fn in order if i % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(
        f"teacher first {med['teacher first']:.1f} ms/step, student first {med['student first']:.1f} ms/step, "
        f"ratio {med['student first'] / med['teacher first']:.3f}"
    )


if __name__ == "__main__":
    main()
