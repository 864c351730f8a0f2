"""A grid PNG of the ``shifted-pool`` proxy pool: one row of examples per part, above a row of
MNIST-5k training digits for comparison (see :mod:`protege.data.pools`). With ``--teacher`` (a
trained MNIST-5k run, e.g. runs/bench-datafree/teacher), also a markdown table of how the teacher
sees each part: its accuracy on the true digits (in-distribution parts), its mean top-1
probability, and the share of images it predicts with probability >= 0.95.

    python benchmarks/show_pool.py [--size 6000] [--seed 0] [--per-part 16]
        [--output benchmarks/results/shifted-pool.png] [--cache-dir DIR] [--teacher RUN --model convnet]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import protege as pg  # noqa: E402
from protege.data import load_data  # noqa: E402
from protege.data.pools import PoolDataset, ShiftedPool, shifted_pool  # noqa: E402
from protege.data.transforms import MNIST_MEAN, MNIST_STD  # noqa: E402


def teacher_view(pool: ShiftedPool, mnist_test: torch.utils.data.Dataset, run: str, model: str) -> str:
    """Markdown: per part (and the MNIST-5k test split), the teacher's accuracy, mean top-1
    probability and share of predictions at probability >= 0.95."""
    teacher = pg.build_model(model, num_classes=10, in_chans=1, weights=run).eval()
    sets = {"MNIST-5k test": mnist_test.tensors, "pool": PoolDataset(pool).tensors}  # type: ignore[attr-defined]
    with torch.no_grad():
        probs = {k: torch.cat([teacher(x).softmax(1) for x in v[0].split(500)]) for k, v in sets.items()}
    lines = ["| images | n | teacher acc. % | mean top-1 prob. | share >= 0.95 |", "|---|---|---|---|---|"]

    def row(name: str, p: torch.Tensor, y: torch.Tensor) -> None:
        conf, pred = p.max(1)
        acc = f"{100 * (pred == y).float().mean():.1f}" if (y >= 0).all() else "— (OOD)"
        lines.append(
            f"| {name} | {len(y)} | {acc} | {conf.mean():.3f} | {(conf >= 0.95).float().mean():.3f} |"
        )

    row("MNIST-5k test", probs["MNIST-5k test"], sets["MNIST-5k test"][1])
    labels, domains = torch.from_numpy(pool.labels), torch.from_numpy(pool.domains)
    for index, name in enumerate(pool.parts):
        keep = domains == index
        if keep.any():
            row(f"pool: {name}", probs["pool"][keep], labels[keep])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-part", type=int, default=16, help="examples per row")
    parser.add_argument("--output", default="benchmarks/results/shifted-pool.png")
    parser.add_argument("--cache-dir", default=None, help="default ~/.cache/protege/pools")
    parser.add_argument("--teacher", default=None, help="a trained MNIST-5k run (its best checkpoint)")
    parser.add_argument("--model", default="convnet", help="the teacher's architecture")
    args = parser.parse_args()

    pool = shifted_pool(args.size, args.seed, cache_dir=args.cache_dir)
    data = load_data("mnist5k")
    mnist = data.train
    rows: list[tuple[str, np.ndarray, list[str]]] = []
    for index, name in enumerate(pool.parts):
        where = np.flatnonzero(pool.domains == index)[: args.per_part]
        if len(where):
            tags = [str(c) if c >= 0 else "" for c in pool.labels[where]]
            rows.append((f"{name} ({int((pool.domains == index).sum())})", pool.images[where], tags))
    pick = np.linspace(0, len(mnist) - 1, args.per_part).astype(int)  # the split is sorted by class
    ref = mnist.images[pick, 0].numpy() * MNIST_STD[0] + MNIST_MEAN[0]
    rows.append(("MNIST-5k train", np.rint(ref * 255), [str(int(c)) for c in mnist.labels[pick]]))

    n = args.per_part
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.7, len(rows) * 0.85), squeeze=False)
    for r, (title, images, tags) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c], cmap="gray", vmin=0, vmax=255)
                ax.set_title(tags[c], fontsize=6, pad=1)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(
        f"shifted-pool, size {args.size}, seed {args.seed} (title: true digit; none: OOD)", fontsize=9
    )
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    print(f"wrote {out} ({', '.join(f'{k}: {v}' for k, v in pool.counts().items())})")
    if args.teacher:
        print(teacher_view(pool, data.test, args.teacher, args.model))


if __name__ == "__main__":
    main()
