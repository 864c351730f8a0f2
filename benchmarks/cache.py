"""Epoch time of distillation from a teacher-output cache vs online KD vs plain student training.

MNIST-5k (bundled, 3,500 training images) with the ``augment`` transform (random shifts of up to
2 pixels), teacher ``convnet`` (0.83M params; random weights: this measures throughput only),
student ``mlp_s`` (or ``--student lenet5``), batch 64, SGD. Three ways to run one epoch, all with
the same loop (``Distiller`` step, backward, SGD step) and the same seeded batch order:

- **plain**: the student alone with cross-entropy (no teacher at all), random shifts;
- **online**: CE + KD with the teacher run on every batch, random shifts;
- **cached**: CE + KD from a cache built once by ``protege.engine.cache.write_cache``
  (``--views`` stored shifts per image, the teacher's full float32 logits); the stored views are
  replayed and no teacher is loaded. (``--top-k k`` below the 10 classes builds a top-k cache,
  which KD cannot read exactly: the benchmark then stops with the refusal a distill run gives.)

Rounds of one epoch each are interleaved (the order rotates every round; the machine is shared
and noisy); the figures are medians over rounds of the per-round times and ratios, for wall time
and for the process's CPU time (steadier when other jobs compete for the cores; use
``--threads 1`` so that idle-spinning worker threads do not count). The cache's
build time, bytes per training sample, and open time with and without SHA-256 verification are
reported too. Target: cached ≤ 1.1× plain.

    python benchmarks/cache.py [--rounds 5] [--views 4] [--top-k all] [--student mlp_s] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import protege as pg
from protege.engine.cache import TeacherCache, cache_loader, check_cached_logits, write_cache


def epoch(distiller: pg.Distiller, loader, epoch_index: int, lr: float = 0.05) -> tuple[float, float]:
    """Wall and process-CPU seconds of one training epoch."""
    opt = torch.optim.SGD(distiller.parameters(), lr=lr, momentum=0.9)
    distiller.train()
    loader.sampler.set_epoch(epoch_index)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in loader:
        _, losses = distiller(batch)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--top-k", default="all")
    parser.add_argument("--student", default="mlp_s")
    parser.add_argument("--teacher", default="convnet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    data = pg.load_data("mnist5k", transforms="augment")
    teacher = pg.build_model(args.teacher, num_classes=10, in_chans=1)
    student0 = pg.build_model(args.student, num_classes=10, in_chans=1)
    terms = lambda: [pg.ce(0.1), pg.kd(0.9, T=4.0)]  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        t0 = time.perf_counter()
        index = write_cache(
            path, data, [teacher], views=args.views, top_k=args.top_k, batch_size=512, device="cpu"
        )
        build_s = time.perf_counter() - t0
        opens = {}
        for verify in ("sha256", "size"):
            t0 = time.perf_counter()
            cache = TeacherCache.open(path, verify=verify)
            opens[verify] = time.perf_counter() - t0
        check_cached_logits(terms(), cache)  # KD reads the teacher's logits: exact, or refused here
        cached_set = cache.dataset("train", data.train, seed=0)

        runs = {
            "plain": lambda: (
                pg.Distiller(copy.deepcopy(student0), None, [pg.ce(1.0)]),
                pg.make_loader(data.train, args.batch, shuffle=True, seed=0),
            ),
            "online": lambda: (
                pg.Distiller(copy.deepcopy(student0), teacher, terms()),
                pg.make_loader(data.train, args.batch, shuffle=True, seed=0),
            ),
            "cached": lambda: (
                pg.Distiller(copy.deepcopy(student0), None, terms(), cached_teachers=1),
                cache_loader(cached_set, args.batch, shuffle=True, seed=0),
            ),
        }
        names = list(runs)
        epoch(*runs["cached"](), 0)  # warm-up (allocator, lazy imports), not timed
        epoch(*runs["online"](), 0)
        rounds = []
        for r in range(args.rounds):
            order = names[r % 3 :] + names[: r % 3]
            measured = {name: epoch(*runs[name](), r) for name in order}
            times: dict[str, float] = {}
            for clock, at in (("", 0), ("cpu ", 1)):
                for name in names:
                    times[clock + name] = measured[name][at]
                times[clock + "cached/plain"] = times[clock + "cached"] / times[clock + "plain"]
                times[clock + "cached/online"] = times[clock + "cached"] / times[clock + "online"]
                times[clock + "online/plain"] = times[clock + "online"] / times[clock + "plain"]
            rounds.append(times)
            print(
                f"round {r + 1}: wall plain {times['plain']:.2f} s  online {times['online']:.2f} s  "
                f"cached {times['cached']:.2f} s ({times['cached/plain']:.3f}x plain) | CPU plain "
                f"{times['cpu plain']:.2f} s  online {times['cpu online']:.2f} s  cached "
                f"{times['cpu cached']:.2f} s ({times['cpu cached/plain']:.3f}x plain)",
                flush=True,
            )

    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result = {
        "data": "mnist5k train (3500), transforms=augment",
        "teacher": args.teacher,
        "student": args.student,
        "batch": args.batch,
        "views": index["views"],
        "top_k": index["top_k"],
        "logits_dtype": index["splits"]["train"]["logits_dtype"],
        "cache_train_bytes_per_sample": index["train_bytes_per_sample"],
        "cache_total_bytes": index["bytes"],
        "cache_build_s": build_s,
        "cache_open_s": opens,
        "rounds": rounds,
        "median": median,
        "threads": torch.get_num_threads(),
    }
    for clock, label in (("", "wall"), ("cpu ", "process CPU")):
        print(
            f"median epoch ({label}): plain {median[clock + 'plain']:.2f} s, online "
            f"{median[clock + 'online']:.2f} s, cached {median[clock + 'cached']:.2f} s; cached/plain "
            f"{median[clock + 'cached/plain']:.3f} (target ≤ 1.1), cached/online "
            f"{median[clock + 'cached/online']:.3f}, online/plain {median[clock + 'online/plain']:.3f}"
        )
    print(
        f"cache: {index['train_bytes_per_sample']:.1f} bytes per training sample ({index['views']} views, "
        f"full float32 logits), {index['bytes'] / 1e6:.2f} MB in all; built in "
        f"{build_s:.1f} s; opened in {opens['sha256'] * 1e3:.0f} ms with SHA-256, "
        f"{opens['size'] * 1e3:.0f} ms with sizes only"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
