"""Which Transformer students of a sentence encoder are fast enough, before training any of them.

A student's speed does not depend on its weights, so the candidates of ``benchmarks/embedding.py``
(layer selection, optionally with each FFN cut to its most important neurons) are built straight
from the teacher and timed side by side with it on the held-out texts of the benchmark's corpora:
sentences per second at batch 64 (and 1) on one thread, measured round-robin in one process
(:func:`protege.metrics.cost.text_throughput`), and the speed-up over the teacher. Nothing is trained.

    python benchmarks/embedding_speed.py --transformers L3,L2,L1,L3f768,L3f384,L2f768,L2f384
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedding import TEACHER, data_section, transformer_spec  # noqa: E402

from protege.metrics.cost import count_params, text_throughput  # noqa: E402
from protege.models.embedding import load_sentence_encoder, transformer_student  # noqa: E402
from protege.tasks import build_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transformers", default="L3,L2,L1,L3f768,L3f384,L2f768,L2f384")
    ap.add_argument("--batch-sizes", default="64,1")
    ap.add_argument("--texts", type=int, default=512, help="held-out texts cycled through")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per batch size at most")
    ap.add_argument(
        "--max-train", type=int, default=6000, help="as benchmarks/embedding.py (fixes the split)"
    )
    ap.add_argument("--eval-size", type=int, default=3000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = build_task("embedding")
    splits = task.load_data(data_section(args), [TEACHER], [])
    teacher = load_sentence_encoder("minilm").eval()
    models = {"teacher": teacher}
    for label in args.transformers.split(","):
        layers, ffn = transformer_spec(label)
        models[label] = transformer_student(teacher, layers=layers, intermediate_size=ffn).eval()
    texts = [splits.test.texts[i] for i in range(min(args.texts, len(splits.test)))]
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    with torch.no_grad():
        speed = text_throughput(
            models, texts, batch_sizes=sizes, threads=(1,), max_seconds=args.seconds, iters=8
        )
    print("| student | params | " + " | ".join(f"sent/s b{b} | × teacher b{b}" for b in sizes) + " |")
    print("|---|---|" + "---|---|" * len(sizes))
    for name, model in models.items():
        cells = []
        for b in sizes:
            up = speed[name].get(f"speedup_t1_b{b}")
            cells += [f"{speed[name][f't1_b{b}']:.1f}", "—" if up is None else f"{up:.2f}"]
        print(f"| {name} | {count_params(model) / 1e6:.1f}M | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "speed": speed}, indent=1))


if __name__ == "__main__":
    main()
