"""VLM-OOD on Fashion-MNIST: do the vision–language coherence terms and attribute prompts raise a
distilled student's zero-shot accuracy on classes it never saw?

Li et al., "Distilling Large Vision-Language Model with Out-of-Distribution Generalizability"
(ICCV 2023) distil a CLIP teacher's image encoder into a small one on a few classes and claim that
(a) imitating the teacher's visual space (feature MSE, image–image contrastive) and (b) keeping
vision–language coherence (VL-alignment over the teacher's top-k classes) and (c) richer class
prompts (attribute descriptions) raise the student's open-vocabulary accuracy on unseen classes.

**The benchmark (an honest substitute: no CLIP weights exist offline).** The teacher's text tower is
the real, pretrained, frozen all-MiniLM-L6-v2; its image tower (``cnn_m``) is trained here to land
in MiniLM's space on all 10 Fashion-MNIST classes (CLIP-style CE over the class prompts + image ↔
caption InfoNCE; captions with attribute descriptions). The student (``lenet5`` image tower, the same
frozen MiniLM text tower, so it lives in the teacher's text space) is distilled on the 6 **seen**
classes only (T-shirt/top, Trouser, Dress, Coat, Sneaker, Ankle boot; fixed in
``configs/vision_language/vlm-ood.yaml`` before any run); the 4 **unseen** ones (Pullover, Sandal,
Shirt, Bag) appear only in the test split. Rows, each the same classification term plus one
addition (weights 1, untuned):

- ``scratch``: ``clip_cls`` only, CE(cos(f_s, t_c)/0.07) through the class prompts' embeddings -- the
  student gets nothing from the teacher's images;
- ``+feat_mse``, ``+img_contrast``, ``+vl_align`` (k = 5 of the 6 seen classes), ``+attributes``
  (class prompts and captions with the hand-written attribute descriptions), ``+attributes
  (SmolLM2)`` (the descriptions ``protege prompts`` got from SmolLM2-135M instead), and ``all``
  (hand-written descriptions).

Columns (test split, 10,000 images; mean ± std over seeds; last epoch): zero-shot seen (6-way among
seen-class images), zero-shot unseen (4-way among unseen-class images), 5-shot linear probe on the
unseen classes (logistic regression on the image embeddings, 5 episodes), the teacher for
reference, and the image towers' params and CPU latency (measured side by side in one process).

    python benchmarks/vision_language.py --seeds 3 --json benchmarks/results/vlm-ood-fashion-mnist.json

**DC-CLIP** (``--part dc-clip``; "A Progressive Framework of Vision-language Knowledge Distillation
and Alignment for Multilingual Scene"). The multilingual teacher: the real, frozen multilingual
Universal Sentence Encoder (512-d) as text tower and a ``cnn_m`` image tower trained here against
English captions, all 10 classes. The student: a ``lenet5`` image tower and a small byte-level
Transformer text tower (its own tokenizer, trained from scratch). Stage 1 distils both towers
(smooth-L1 on image embeddings; on captions, each sample's in English or Chinese against the
teacher's embedding of the English one; on the HSK zh–en sentence pairs riding along); stage 2
aligns them (image–text InfoNCE). Rows: English and Chinese zero-shot (10-way, test split) after
stage 1 only and after stage 1 + 2 (the same runs: each stage's last checkpoint is tested), and the
teacher.

    python benchmarks/vision_language.py --part dc-clip --seeds 3 --json benchmarks/results/dc-clip-fashion-mnist.json

Finished runs are reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from protege.analysis.runs import run_or_reuse
from protege.config import load_config

SEEN = ["T-shirt/top", "Trouser", "Dress", "Coat", "Sneaker", "Ankle boot"]
TEXT = {"kind": "sentence_encoder", "path": "minilm"}
CLS = {"loss": "clip_cls", "weight": 1.0}
SMOLLM2_PROMPTS = "configs/vision_language/fashion-mnist-prompts.smollm2.json"
ROWS: dict[str, dict[str, Any]] = {
    "scratch": {"terms": [CLS], "attributes": False},
    "+feat_mse": {"terms": [CLS, {"loss": "feat_mse", "weight": 1.0}], "attributes": False},
    "+img_contrast": {"terms": [CLS, {"loss": "img_contrast", "weight": 1.0}], "attributes": False},
    "+vl_align": {"terms": [CLS, {"loss": "vl_align", "weight": 1.0, "k": 5}], "attributes": False},
    "+attributes": {"terms": [CLS], "attributes": True},
    # the same, with the descriptions SmolLM2-135M wrote (protege prompts; mostly not visual)
    "+attributes (SmolLM2)": {"terms": [CLS], "attributes": True, "prompts": SMOLLM2_PROMPTS},
    "all": {
        "terms": [
            CLS,
            {"loss": "feat_mse", "weight": 1.0},
            {"loss": "img_contrast", "weight": 1.0},
            {"loss": "vl_align", "weight": 1.0, "k": 5},
        ],
        "attributes": True,
    },
}
COLUMNS = ("zs_seen", "zs_unseen", "fewshot_unseen@5", "fewshot_unseen@1", "fewshot_unseen@10", "acc")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="vlm-ood", choices=["vlm-ood", "dc-clip"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--only-seeds", default=None, help="train only these seeds (comma list; e.g. one process per seed)"
    )
    ap.add_argument("--epochs", type=int, default=10, help="student epochs (DC-CLIP: stage 1)")
    ap.add_argument("--align-epochs", type=int, default=3, help="DC-CLIP: stage 2 epochs")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=20000, help="training images drawn (all classes)")
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=None, help="default: the full 10,000-image test set")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--teacher", default="cnn_m", help="the teacher's image tower")
    ap.add_argument("--student", default="lenet5", help="the student's image tower")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output-dir", default="runs/vlm-ood")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def data_section(
    args: argparse.Namespace, attributes: bool, seen: list[str] | None, prompts: str | None = None
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "train_size": args.train_size,
        "val_size": args.val_size,
        "languages": ["en"],
        "attributes": attributes,
    }
    if args.test_size:
        options["test_size"] = args.test_size
    if seen is not None:
        options["seen"] = seen
    if prompts is not None:
        options["prompts"] = prompts
    return {
        "source": "fashion-mnist",
        "transforms": "augment",
        "batch_size": args.batch_size,
        "options": options,
    }


def model(image: str) -> dict[str, Any]:
    return {"model": "dual_encoder", "kwargs": {"embed_dim": 384, "image": {"model": image}, "text": TEXT}}


def common(args: argparse.Namespace, name: str, seed: int, epochs: int) -> dict[str, Any]:
    return {
        "name": name,
        "output_dir": args.output_dir,
        "task": "vision_language",
        "seed": seed,
        "epochs": epochs,
        "cpu": True,
        "progress": False,
        "keep_checkpoints": "last+best",
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.05},
        "schedule": {"name": "cosine"},
    }


def run(cfg_dict: dict[str, Any], mode: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary = run_or_reuse(load_config(None, **cfg_dict), mode)  # type: ignore[arg-type]
    print(f"{cfg_dict['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
    return summary


def teacher(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the teacher once on all classes; its model section (weights: the run) and summary."""
    cfg = common(args, "teacher", 0, args.teacher_epochs) | {
        "data": data_section(args, attributes=True, seen=None),
        "student": model(args.teacher),
        "terms": [{"loss": "ce"}, {"loss": "clip_contrastive", "weight": 1.0}],
    }
    summary = run(cfg, "train")
    return model(args.teacher) | {"weights": str(Path(args.output_dir) / "teacher")}, summary


def student(args: argparse.Namespace, row: str, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    r = ROWS[row]
    slug = row.lstrip("+").replace("_", "-").replace(" (", "-").replace(")", "").lower()
    name = f"{slug}-s{seed}"
    cfg = common(args, name, seed, args.epochs) | {
        "data": data_section(args, attributes=r["attributes"], seen=SEEN, prompts=r.get("prompts")),
        "teacher": spec,
        "student": model(args.student),
        "terms": r["terms"],
    }
    return run(cfg, "distill")


def latency(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Image-tower params and CPU latency of teacher and student, timed interleaved in one process."""
    from protege.models.vlm import build_vl_model

    models = {
        "teacher": build_vl_model("dual_encoder", None, spec["kwargs"], in_chans=1).eval(),
        "student": build_vl_model("dual_encoder", None, model(args.student)["kwargs"], in_chans=1).eval(),
    }
    out: dict[str, Any] = {}
    for name, m in models.items():
        out[name] = {"image_params": sum(p.numel() for p in m.image.parameters())}
    for batch in (1, 64):
        x = torch.randn(batch, 1, 28, 28)
        times: dict[str, list[float]] = {k: [] for k in models}
        with torch.no_grad():
            for m in models.values():
                for _ in range(5):
                    m.encode_image(x)
            for _ in range(30):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m.encode_image(x)
                    times[k].append(time.perf_counter() - t0)
        for k in models:
            out[k][f"ms_batch{batch}"] = 1000 * statistics.median(times[k])
        out[f"speedup_batch{batch}"] = out["teacher"][f"ms_batch{batch}"] / out["student"][f"ms_batch{batch}"]
    return out


def seeds_of(args: argparse.Namespace) -> list[int]:
    if args.only_seeds:
        return [int(x) for x in args.only_seeds.split(",")]
    return list(range(args.seeds))


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}"


DC_TEXT_TEACHER = {"kind": "use"}
DC_TEXT_STUDENT = {"kind": "transformer", "width": 128, "layers": 2, "heads": 4, "max_length": 64}
SMOOTH = {"loss": "feat_mse", "kind": "smooth_l1"}


def dc_model(image: str, text: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "dual_encoder",
        "kwargs": {"embed_dim": 512, "image": {"model": image}, "text": text, **extra},
    }


def dc_clip(args: argparse.Namespace) -> dict[str, Any]:
    """The DC-CLIP table (module docstring)."""
    data = data_section(args, attributes=True, seen=None)
    data["options"]["languages"] = ["en", "zh"]
    teacher_cfg = common(args, "teacher-use", 0, args.teacher_epochs) | {
        "data": data,
        "student": dc_model(args.teacher, DC_TEXT_TEACHER),
        "terms": [{"loss": "ce"}, {"loss": "clip_contrastive", "weight": 1.0}],
    }
    teacher_summary = run(teacher_cfg, "train")
    spec = dc_model(args.teacher, DC_TEXT_TEACHER) | {"weights": str(Path(args.output_dir) / "teacher-use")}
    student_data = json.loads(json.dumps(data))
    student_data["options"]["parallel"] = "hsk"
    stages = [
        {
            "name": "distill",
            "terms": [
                SMOOTH | {"name": "image", "student": "image_embeds", "teacher": "image_embeds"},
                SMOOTH | {"name": "text", "student": "text_embeds", "teacher": "text_embeds"},
                SMOOTH | {"name": "parallel", "student": "para_embeds", "teacher": "para_embeds"},
            ],
        },
        {
            "name": "align",
            "epochs": args.align_epochs,
            "terms": [{"loss": "clip_contrastive", "weight": 1.0}],
        },
    ]
    keys = ("acc", "acc:zh", "i2t_r1", "i2t_r1:zh", "t2i_r1", "t2i_r1:zh")
    out: dict[str, Any] = {
        "teacher": {k: teacher_summary["test"]["last"].get(k) for k in keys},
        "stage1": {k: [] for k in keys},
        "stage1+2": {k: [] for k in keys},
    }
    for seed in seeds_of(args):
        cfg = common(args, f"dc-clip-s{seed}", seed, args.epochs) | {
            "data": student_data,
            "teacher": spec,
            "student": dc_model(args.student, DC_TEXT_STUDENT, text_field="text_mix"),
            "stages": stages,
        }
        summary = run(cfg, "distill")
        for k in keys:
            out["stage1"][k].append(summary["stages"][0]["test"]["last"][k])
            out["stage1+2"][k].append(summary["test"]["last"][k])
    print("\n| | English zero-shot | Chinese zero-shot | i2t R@1 en | i2t R@1 zh |")
    print("|---|---|---|---|---|")
    for row in ("stage1", "stage1+2"):
        r = out[row]
        print(
            f"| {row} | {_ms(r['acc'])} | {_ms(r['acc:zh'])} | {_ms(r['i2t_r1'])} | {_ms(r['i2t_r1:zh'])} |"
        )
    t = out["teacher"]
    print(
        f"| teacher | {100 * t['acc']:.2f} | {100 * t['acc:zh']:.2f} | {100 * t['i2t_r1']:.2f} | {100 * t['i2t_r1:zh']:.2f} |"
    )
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.part == "dc-clip":
        results = {
            "settings": vars(args),
            "dc_clip": dc_clip(args),
            "total_s": round(time.perf_counter() - t0, 1),
        }
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return
    spec, teacher_summary = teacher(args)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    results: dict[str, Any] = {"settings": vars(args) | {"seen": SEEN}, "rows": {}}
    results["teacher"] = {k: teacher_summary["test"]["last"].get(k) for k in (*COLUMNS, "acc")}
    for seed in seeds_of(args):
        for row in rows:
            summary = student(args, row, seed, spec)
            cell = results["rows"].setdefault(row, {"last": {}, "best": {}, "teacher": {}})
            for which in ("last", "best"):
                for k in COLUMNS:
                    v = summary["test"][which].get(k)
                    if v is not None:
                        cell[which].setdefault(k, []).append(v)
            for k in ("teacher_zs_seen", "teacher_zs_unseen"):
                cell["teacher"][k] = summary["test"]["last"].get(k)
    results["cost"] = latency(args, spec)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["command"] = "python benchmarks/vision_language.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"
    )
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def print_table(results: dict[str, Any]) -> None:
    t = results["teacher"]
    print(
        "\n| row | zero-shot seen | zero-shot unseen | 5-shot unseen | 1-shot unseen | teacher seen / unseen |"
    )
    print("|---|---|---|---|---|---|")
    for row, cell in results["rows"].items():
        last = cell["last"]
        teach = cell["teacher"]
        ref = (
            f"{100 * teach['teacher_zs_seen']:.2f} / {100 * teach['teacher_zs_unseen']:.2f}"
            if teach.get("teacher_zs_seen") is not None
            else "–"
        )
        print(
            f"| {row} | {_ms(last.get('zs_seen', []))} | {_ms(last.get('zs_unseen', []))} | "
            f"{_ms(last.get('fewshot_unseen@5', []))} | {_ms(last.get('fewshot_unseen@1', []))} | {ref} |"
        )
    c = results["cost"]
    print(
        f"\nteacher all-class acc {100 * (t.get('acc') or 0):.2f}; image towers: teacher "
        f"{c['teacher']['image_params']:,} params, student {c['student']['image_params']:,}; "
        f"CPU latency batch 1 {c['teacher']['ms_batch1']:.2f} vs {c['student']['ms_batch1']:.2f} ms "
        f"({c['speedup_batch1']:.1f}×), batch 64 {c['teacher']['ms_batch64']:.1f} vs "
        f"{c['student']['ms_batch64']:.1f} ms ({c['speedup_batch64']:.1f}×)"
    )


if __name__ == "__main__":
    main()
