"""``protege`` command line: a thin layer that parses arguments and calls the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ProtegeError, TrainingFailed

app = typer.Typer(
    name="protege",
    help="Knowledge distillation: make a model small and fast without losing what it knows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the run-config schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
analyze_app = typer.Typer(help="Analyses of distillation beyond one run's report.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
# Tables are wide; outside a terminal rich would wrap them at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)

ConfigArg = Annotated[Path, typer.Argument(help="run YAML (see configs/)")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a key: --set optim.lr=0.05 (repeatable)")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue the run from its last checkpoint")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing run of the same name")]
OverrideOpt = Annotated[
    bool,
    typer.Option(
        "--override-config",
        help="with --resume: accept a config that differs from the run's stored one; the change takes "
        "effect from the resumed epoch and is recorded in config_changes.jsonl",
    ),
]


def _run(
    config: Path, overrides: list[str] | None, mode: str, resume: bool, overwrite: bool, override_config: bool
) -> None:
    from .analysis.runs import run
    from .config import load_config

    if override_config and not resume:
        raise ProtegeError("--override-config only applies with --resume")
    cfg = load_config(config, overrides or [])
    summary = run(cfg, mode=mode, resume=resume, overwrite=overwrite, override_config=override_config)  # type: ignore[arg-type]
    _print_run(summary, cfg.run_dir)


@app.command()
def train(
    config: ConfigArg,
    overrides: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    override_config: OverrideOpt = False,
) -> None:
    """Train the config's student with plain label losses (a teacher, or the no-KD baseline)."""
    _run(config, overrides, "train", resume, overwrite, override_config)


@app.command()
def distill(
    config: ConfigArg,
    overrides: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    override_config: OverrideOpt = False,
) -> None:
    """Distill the config's teacher(s) into its student with the config's terms."""
    _run(config, overrides, "distill", resume, overwrite, override_config)


@app.command()
def cache(
    config: ConfigArg,
    overrides: SetOpt = None,
    views: Annotated[
        int | None, typer.Option("--views", help="augmented views stored per training sample")
    ] = None,
    top_k: Annotated[
        str | None,
        typer.Option(
            "--top-k",
            help="teacher classes stored per view: 'all' (the default: full float32 logits, exact for every "
            "term) or k (top-k only: for runs whose terms read no teacher logits; lm caches: default 128)",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="cache directory (default: the config's cache.path)")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing cache")] = False,
) -> None:
    """Run the teacher(s) once and store their outputs for offline distillation (cache: in the config)."""
    from .caching import build_cache
    from .config import load_config

    cfg = load_config(config, overrides or [])
    index = build_cache(cfg, out=out_dir, views=views, top_k=top_k, overwrite=overwrite)
    train = index["splits"]["train"]
    if index.get("task") == "lm":
        out.print(
            f"cache {index['path']}: {train['samples']} training sequences, {train['tokens']} tokens, "
            f"top-k {index['top_k']} ({index['dtype']}), {len(train['shards'])} shard(s); "
            f"{index['bytes'] / 1e6:.2f} MB in all, {index['train_bytes_per_token']:.1f} bytes per training "
            f"token; built in {index['build_seconds']:.1f} s",
            soft_wrap=True,
        )
        return
    if index.get("task") == "embedding":
        out.print(
            f"cache {index['path']}: {train['samples']} training texts, one {index['dim']}-d float32 teacher "
            f"vector each (validation and test too), {len(train['shards'])} shard(s); "
            f"{index['bytes'] / 1e6:.2f} MB in all; built in {index['build_seconds']:.1f} s",
            soft_wrap=True,
        )
        return
    logits = (
        "full float32 logits"
        if index["top_k"] == "all"
        else f"top-{index['top_k']} of {index['num_classes']} classes ({index['dtype']}; for terms that read "
        "no teacher logits)"
    )
    taps = f", taps in {index['dtype']}" if index.get("taps") else ""
    out.print(
        f"cache {index['path']}: {train['samples']} training samples x {index['views']} view(s), "
        f"{logits}{taps}, {len(train['shards'])} shard(s); "
        f"{index['bytes'] / 1e6:.2f} MB in all, {index['train_bytes_per_sample']:.0f} bytes per training "
        f"sample; built in {index['build_seconds']:.1f} s",
        soft_wrap=True,
    )


@app.command()
def synthesize(
    config: ConfigArg,
    overrides: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a set made from other teacher weights or options")
    ] = False,
) -> None:
    """Write the synthetic image set of a data.strategy: synthetic config without distilling
    (DeepInversion; adversarial: samples of a finished run's generator). A later distill reuses it."""
    from .config import load_config
    from .pipeline import synthesize as write_set

    path = write_set(load_config(config, overrides or []), overwrite=overwrite)
    index = json.loads((path / "index.json").read_text())
    out.print(
        f"synthetic set {path}: {index['n_images']} images ({index['method']}), "
        f"{index['seconds_per_batch']:.2f} s per batch on {index['device']}; the teacher is "
        f"{100 * index['teacher_mean_confidence']:.1f}% confident on average; grid: {path / 'grid.png'}",
        soft_wrap=True,
    )


@app.command()
def generate(
    config: Annotated[
        Path, typer.Argument(help="generation YAML: model, prompts, out (see protege.generate)")
    ],
    overrides: SetOpt = None,
) -> None:
    """Complete a prompt file with the teacher into prompt-completion jsonl (sequence-level KD data);
    resumable: prompts already in the output are skipped."""
    from .generate import generate as run_generation
    from .generate import load_generate_config

    result = run_generation(load_generate_config(config, overrides or []))
    out.print(
        f"{result['out']}: {result['generated']} prompt(s) generated, {result['skipped']} already there "
        f"({result['prompts']} distinct); {result['seconds']:.1f} s, {result['tokens_per_second']:.1f} tokens/s",
        soft_wrap=True,
    )


@app.command()
def arte(
    config: Annotated[Path, typer.Argument(help="ARTE YAML: teacher, student, tasks (see protege.arte)")],
    overrides: SetOpt = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="the run directory (default: runs/arte-<config name>)")
    ] = None,
) -> None:
    """ARTE: the teacher drafts reasoning examples, the student's in-context preferences align the
    teacher (DPO), the aligned teacher writes the training set, the student is fine-tuned on it;
    resumable: finished steps are skipped."""
    from .arte import load_arte_config, run_arte

    cfg = load_arte_config(config, overrides or [])
    run_dir = output_dir if output_dir is not None else Path("runs") / f"arte-{config.stem}"
    summary = run_arte(cfg, run_dir)
    ev = summary["eval"]
    scores = summary["scores"]["before"].get("all", {})
    dpo = summary["dpo"] or {}
    out.print(
        f"{run_dir}: {scores.get('n', 0)} drafts (student score mean {scores.get('mean', 0.0):.3f}); "
        + (f"DPO skipped ({dpo['skipped']})" if dpo.get("skipped") else f"DPO on {dpo.get('pairs', 0)} pairs")
        + f"; generation {summary['generation_s']:.1f} s, DPO {summary['dpo_s']:.1f} s",
        soft_wrap=True,
    )
    for name, result in ev.items():
        if result:
            cells = ", ".join(f"{t} {100 * v:.1f}" for t, v in result["exact_match"].items())
            out.print(f"  {name}: exact match % {cells}", soft_wrap=True)


@app.command()
def prompts(
    classes: Annotated[
        str,
        typer.Option(help="fashion-mnist, or a file: .txt (one class per line) or .json (a list of names)"),
    ],
    model: Annotated[
        str, typer.Option(help="a causal LM: model directory, .gguf file, or smollm2 (offline)")
    ],
    out_file: Annotated[Path, typer.Option("--out", help="the class prompts file to write (.json)")],
    n: Annotated[int, typer.Option(help="descriptions per class, at most")] = 5,
    manual: Annotated[
        Path | None, typer.Option(help="a hand-written prompts file (may be partial): it wins per class")
    ] = None,
    language: Annotated[
        list[str] | None,
        typer.Option("--language", "-l", help="language to ask in: en (default), zh; repeatable"),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer, at most")] = 96,
    seed: Annotated[int, typer.Option(help="seed of the sampled retries")] = 0,
) -> None:
    """Ask a causal LM for short visual descriptions of each class (VLM-OOD's attribute prompts) and
    write a class prompts file; resumable (OUT.partial keeps the answers so far)."""
    import warnings

    from .data.prompts import load_prompts, read_class_names
    from .prompts import generate_prompts

    names = read_class_names(classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            path = generate_prompts(
                names, model, out_file, n=n, languages=language or ["en"], max_new_tokens=max_new_tokens,
                seed=seed, manual=manual,
            )  # fmt: skip
        finally:
            for w in caught:
                Console(stderr=True).print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    written = load_prompts(path, names)
    counts = {code: sum(len(lang.descriptions[c]) for c in names) for code, lang in written.languages.items()}
    by_hand = (written.source.get("manual") or {}).get("classes", {})
    out.print(
        f"{path}: {len(names)} classes; descriptions "
        + ", ".join(
            f"{code} {k} ({len(by_hand.get(code, []))} classes from --manual)" for code, k in counts.items()
        ),
        soft_wrap=True,
    )


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory, e.g. runs/mnist-kd")],
    split: Annotated[str, typer.Option(help="val or test")] = "test",
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
    latency: Annotated[bool, typer.Option(help="measure CPU/GPU latency")] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the result to this JSON file")
    ] = None,
) -> None:
    """Accuracy, top-5, agreement, KL, ECE, NLL, params, FLOPs and latency of a run's student."""
    from .files import atomic_write_text
    from .pipeline import evaluate_run

    if split not in ("val", "test") or checkpoint not in ("best", "last"):
        raise ProtegeError("--split is val or test; --checkpoint is best or last")
    result = evaluate_run(run_dir, split=split, which=checkpoint, latency=latency)  # type: ignore[arg-type]
    table = Table(title=f"{run_dir} — {split} split, {checkpoint} checkpoint")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4f}")
    for who in ("teacher", "student"):
        if who in result:
            c = result[who]
            table.add_row(f"{who} params", f"{c['params']:,}")
            table.add_row(f"{who} MFLOPs", f"{c['flops'] / 1e6:.2f}")
            if "latency" in c:
                table.add_row(f"{who} latency (ms, batch 1)", f"{c['latency']['ms']:.3f}")
    if "speedup" in result:
        table.add_row("speed-up", f"{result['speedup']:.2f}×")
    out.print(table)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result, indent=2))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory, e.g. runs/mnist-kd")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="native (the model's own library's format), onnx (fp32) or int8 (onnxruntime static W8A8)",
        ),
    ] = "onnx",
    calibration: Annotated[
        int, typer.Option(help="int8: training samples the activation ranges are calibrated on")
    ] = 512,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="directory to write (default: <run_dir>/export-<format>)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an existing export directory")
    ] = False,
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
    bench_: Annotated[
        bool,
        typer.Option("--bench", help="also time teacher, student and the exported model side by side"),
    ] = False,
    qad_ranges: Annotated[
        bool,
        typer.Option(
            help="int8 of a quantization-aware run: use the input ranges it learned (else calibrate all)"
        ),
    ] = True,
) -> None:
    """Write a run's student in its native format, as ONNX, or as int8 ONNX; checked against PyTorch
    on the run's test split, described by export.json and a model card (README.md)."""
    from .export import export as run_export

    info = run_export(
        run_dir,
        format,  # type: ignore[arg-type]
        out_dir,
        calibration=calibration,
        overwrite=overwrite,
        bench=bench_,
        checkpoint=checkpoint,  # type: ignore[arg-type]
        qad_ranges=qad_ranges,
    )
    segmenter = info.get("source", {}).get("task") == "promptable_segmentation"
    embedder = info.get("source", {}).get("task") == "embedding"
    if segmenter:  # mask mIoU per prompt kind, and IoU with the fp32 student's and the teacher's masks
        cols = {"1 point": "miou_1pt", "3 points": "miou_3pt", "box": "miou_box"}
        cols |= {"IoU with fp32": "fp32_miou", "IoU with teacher": "teacher_miou"}
    elif embedder:  # fidelity to the teacher and to the fp32 student (cosines as numbers, overlaps in %)
        cols = {"cos with teacher": "cos", "top-10 overlap": "knn10", "cos with fp32": "fp32_cos"}
        cols |= {"top-10 with fp32": "fp32_knn10"}
    else:
        cols = {
            "accuracy": "acc",
            "agreement with fp32": "agreement_fp32",
            "agreement with teacher": "agreement_teacher",
        }
    table = Table(title=f"{run_dir} → {info['path']} ({format})")
    table.add_column("")
    for col in cols:
        table.add_column(col, justify="right")
    ev = info.get("evaluation", {})
    for key, label in (
        ("teacher", "teacher (PyTorch)"),
        ("fp32", "student fp32 (PyTorch)"),
        ("fake_quant", "student fake-quantized (PyTorch, QAD)"),
        ("onnx_fp32", "student fp32 (onnxruntime)"),
        ("int8", "student int8 (onnxruntime)"),
    ):
        m = ev.get(key)
        if m and (not embedder or key != "teacher"):
            table.add_row(
                label,
                *(
                    "—" if k not in m else f"{m[k]:.4f}" if k.endswith("cos") else f"{100 * m[k]:.2f}%"
                    for k in cols.values()
                ),
            )
    if ev:
        out.print(table)
    if "parity" in info and embedder:
        p = info["parity"]
        out.print(
            f"parity with PyTorch on {p['samples']} {p['inputs']}: max |Δ| of the vectors {p['max_abs_diff']:.3g}",
            soft_wrap=True,
        )
    elif "parity" in info:
        p = info["parity"]
        out.print(
            f"parity with PyTorch on {p['samples']} {p['inputs']} inputs: max |Δlogit| {p['max_abs_diff']:.3g}, "
            f"top-1 agreement {100 * p['top1_agreement']:.2f}%",
            soft_wrap=True,
        )
    if "latency" in info and segmenter:
        lat = info["latency"]
        out.print(
            f"latency ({lat['machine']}; {lat['threads']} thread(s), {lat['prompts']} prompts per decode):"
        )
        for name, r in lat["rows"].items():
            out.print(
                f"  {name}: encoder {r['encoder_ms']:.2f} ms/image, decoder {r['decoder_ms_per_prompt']:.3f} ms/prompt"
            )
    elif "latency" in info and embedder:
        lat = info["latency"]
        out.print(f"sentences per second ({lat['machine']}; 1 thread, tokenisation included):")
        for name, r in lat["rows"].items():
            up = f", {r['speedup_t1_b64']:.2f}x the teacher at batch 64" if "speedup_t1_b64" in r else ""
            out.print(f"  {name}: batch 1 {r['t1_b1']:.1f}, batch 64 {r['t1_b64']:.1f}{up}")
    elif "latency" in info:
        _print_latency(info["latency"]["rows"], info["latency"]["machine"])
    files = ", ".join(f"{k} {v['bytes'] / 1e6:.3f} MB" for k, v in info["files"].items())
    out.print(f"wrote {info['path']}: {files} (+ export.json, README.md)", soft_wrap=True)


@app.command()
def bench(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory (its teacher and student)")],
    exports: Annotated[
        list[Path] | None,
        typer.Option("--export", "-e", help="an export directory (onnx/int8) to time too (repeatable)"),
    ] = None,
    batch: Annotated[list[int] | None, typer.Option("--batch", help="batch sizes (repeatable)")] = None,
    max_seconds: Annotated[float, typer.Option(help="timed seconds per batch size and thread count")] = 20.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the result to this JSON file")
    ] = None,
) -> None:
    """Latency of a run's teacher and student (PyTorch), the student in onnxruntime fp32 and its
    exports, side by side in interleaved rounds: batch 1 and 32, 1 thread and all threads."""
    from .export import bench as run_bench

    result = run_bench(run_dir, exports or [], batch or [1, 32], max_seconds=max_seconds, out=json_out)
    _print_latency(result["rows"], result["machine"])
    for label, m in result["models"].items():
        acc = f", accuracy {100 * m['acc']:.2f}%" if m.get("acc") is not None else ""
        out.print(f"{label}: {m['bytes'] / 1e6:.3f} MB{acc}", soft_wrap=True)


def _print_latency(rows: list[dict[str, Any]], machine: str) -> None:
    table = Table(title=f"latency — {machine}")
    for col in (
        "model",
        "runtime",
        "batch",
        "threads",
        "median ms",
        "p10–p90 ms",
        "× vs fp32 eager",
        "× vs teacher",
    ):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['runtime']} {r['precision']}",
            str(r["batch"]),
            str(r["threads"]),
            f"{r['ms']:.3f}",
            f"{r['ms_p10']:.3f}–{r['ms_p90']:.3f}",
            f"{r['vs_eager']:.2f}×" if "vs_eager" in r else "—",
            f"{r['vs_teacher']:.2f}×" if "vs_teacher" in r else "—",
        )
    out.print(table)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory, e.g. runs/mnist-kd")],
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="run directory of the same student trained without KD (default: found beside the run)"
        ),
    ] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="default: <run_dir>/report.html")] = None,
    probes: Annotated[bool, typer.Option(help="run the probes of what got distilled")] = True,
    max_images: Annotated[int, typer.Option(help="images for CKA and the probes")] = 500,
    latency: Annotated[
        bool, typer.Option(help="measure the models' latency again, side by side (default: the run's)")
    ] = False,
) -> None:
    """Write a run's report.html: summary, curves, calibration, CKA, probes, gradient variance.

    A run of another task (vision_language, lm) gets its task's metrics instead: summary and cost,
    every test metric beside the baseline's and the teacher's, one row per stage, the curves
    (--probes, --max-images and --latency apply to classification runs)."""
    from .analysis.report import build_report

    path = build_report(
        run_dir, baseline=baseline, out=out_file, probes=probes, max_images=max_images, latency=latency
    )
    out.print(f"report: {path}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished run directories")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="default: compare.html in the runs' common parent")
    ] = None,
) -> None:
    """Put several runs side by side in one HTML page (table, fidelity-vs-accuracy scatter, curves)."""
    from .analysis.report import compare_runs

    out.print(f"comparison: {compare_runs(run_dirs, out=out_file)}")


@app.command("segment-everything")
def segment_everything_cmd(
    image: Annotated[Path, typer.Argument(help="an image file (RGB, grey or RGBA; any size: letterboxed)")],
    run_dir: Annotated[Path, typer.Option("--run", help="a finished promptable_segmentation run")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="directory to write (default: <image stem>-masks beside it)")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="hierarchical (TinySAM) or dense (SAM's point grid)")
    ] = "hierarchical",
    points_per_side: Annotated[int, typer.Option(help="points per side of the dense grid")] = 16,
    which: Annotated[str, typer.Option("--model", help="student or teacher")] = "student",
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
    multimask: Annotated[
        bool,
        typer.Option(
            help="three masks per point, SAM's way: for models whose multimask outputs were trained "
            "(official SAM weights, or a run with prompts.multimask); else one mask per point"
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a non-empty output directory")
    ] = False,
) -> None:
    """Segment everything in IMAGE with a run's student (or teacher): writes masks.png (the instance
    label map), masks.json (score, stability, box, area per mask) and overlay.png."""
    from .segment import load_segmenter, segment_file

    target = out_dir if out_dir is not None else image.with_name(f"{image.stem}-masks")
    if target.is_dir() and any(target.iterdir()) and not overwrite:  # before loading anything
        raise ProtegeError(f"{target} is not empty; choose another --out or pass --overwrite")
    model = load_segmenter(run_dir, which, checkpoint)
    info = segment_file(
        model,
        image,
        target,
        mode=mode,
        points_per_side=points_per_side,
        multimask=multimask,
        overwrite=overwrite,
    )
    out.print(
        f"{info['masks']} masks ({mode}, {info['prompts']} prompts decoded, {info['seconds']:.2f} s) → {target}"
    )


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="a finished generation run")],
    label: Annotated[str, typer.Option("--class", help="the class to draw: its index or its name")],
    n: Annotated[int, typer.Option("--n", help="how many images")] = 16,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="PNG to write (default RUN/samples/<model>-class<c>.png)")
    ] = None,
    which: Annotated[
        str, typer.Option("--model", help="student (one step) or teacher (N steps)")
    ] = "student",
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
    seed: Annotated[int, typer.Option(help="seed of the noise")] = 0,
) -> None:
    """Draw N images of one class with a generation run's student (or teacher) as a PNG grid."""
    from .sample import sample_grid

    path = sample_grid(run_dir, label, n, out_file, which, checkpoint, seed)  # type: ignore[arg-type]
    out.print(f"{n} samples of class {label} ({which}) → {path}")


@analyze_app.command("gradvar")
def gradvar(
    config: ConfigArg,
    overrides: SetOpt = None,
    lambdas: Annotated[str, typer.Option(help="KD weights to sweep, comma-separated")] = "0,0.25,0.5,0.75,1",
    epochs: Annotated[int | None, typer.Option(help="epochs per λ (default: the config's)")] = None,
    batches: Annotated[int, typer.Option(help="minibatches the variance is estimated from")] = 32,
    temperature: Annotated[
        float | None, typer.Option("--T", help="KD temperature (default: the config's)")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: runs/<name>/gradvar")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Variance of the student's stochastic gradient with and without the KD term, across a sweep of λ."""
    from .analysis.gradvar import gradvar_sweep, relative_variance
    from .config import load_config

    try:
        values = [float(v) for v in lambdas.split(",") if v.strip()]
    except ValueError:
        raise ProtegeError(
            f"--lambdas takes numbers separated by commas, e.g. 0,0.5,1; got {lambdas!r}"
        ) from None
    cfg = load_config(config, overrides or [])
    result = gradvar_sweep(
        cfg, values, T=temperature, epochs=epochs, n_batches=batches, out_dir=out_dir, overwrite=overwrite
    )
    table = Table(title=f"{cfg.name}: gradient variance, (1-λ)·CE + λ·KD (T={result['T']:g})")
    for col in ("λ", "final acc", "var with KD", "var CE only", "ratio", "relative with KD", "relative CE"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        ratio = r["var_kd_final"] / r["var_ce_final"] if r["var_ce_final"] > 0 else float("nan")
        table.add_row(
            f"{r['lambda']:g}",
            f"{100 * r['acc']:.2f}%",
            f"{r['var_kd_final']:.4g}",
            f"{r['var_ce_final']:.4g}",
            f"{ratio:.3f}",
            f"{relative_variance(r, 'kd'):.4g}",
            f"{relative_variance(r, 'ce'):.4g}",
        )
    out.print(table)
    where = Path(result["rows"][0]["run_dir"]).parent
    out.print(
        f"least variance at λ = {result['argmin_lambda']:g}; results in {where}/gradvar.json and gradvar.html"
    )


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="search YAML (see configs/search/)")],
    overrides: SetOpt = None,
    distill_winner: Annotated[
        bool, typer.Option("--distill", help="then distill the winner (its distill.yaml)")
    ] = False,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="output directory (default: output_dir/name)")
    ] = None,
) -> None:
    """Rank a space's students by a training-free proxy under budgets; write search.json/png and distill.yaml."""
    from .search import load_search_config
    from .search import search as run_search

    result = run_search(load_search_config(config, overrides or []), out_dir=out_dir, distill=distill_winner)
    table = Table(title=f"{result.summary['name']} — {result.summary['proxy']}, best first")
    for col in ("rank", "id", "score", "params", "MFLOPs", "latency ms"):
        table.add_column(col, justify="left" if col == "id" else "right")
    for rank, cand in enumerate(result.history.ranked[:10], start=1):
        latency = f"{cand.latency_ms:.3f}" if cand.latency_ms is not None else "—"
        table.add_row(
            str(rank), cand.id, f"{cand.score:.5g}", f"{cand.params:,}", f"{cand.flops / 1e6:.2f}", latency
        )
    out.print(table)
    counts = result.summary["counts"]
    out.print(
        f"{counts['scored']} scored, {counts['over_budget']} over budget, {counts['failed']} failed "
        f"({result.summary['candidates_per_minute']:.1f} candidates/min); results in {result.out_dir}",
        soft_wrap=True,
    )
    if result.distill_summary is not None and result.run_config is not None:
        _print_run(result.distill_summary, result.run_config.run_dir)


@app.command()
def supernet(
    config: Annotated[Path, typer.Argument(help="supernet YAML (see configs/autodistil/)")],
    overrides: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """AutoDistil: train one weight-sharing SuperLM per sub-space with the MiniLM relation loss (sandwich rule)."""
    from .autodistil import load_autodistil_config, train_supernets

    cfg = load_autodistil_config(config, overrides or [])
    summary = train_supernets(cfg, resume=resume, overwrite=overwrite)
    table = Table(title=f"{summary['name']} — held-out relation loss (start → end)")
    for col in ("sub-space", "archs", "largest", "smallest", "loss largest", "loss smallest", "seconds"):
        table.add_column(col, justify="left" if col in ("sub-space", "largest", "smallest") else "right")
    for name, r in summary["subspaces"].items():
        first, final = r["first"] or {}, r["final"] or {}

        def span(key: str, first: dict = first, final: dict = final) -> str:
            return f"{first.get(key, float('nan')):.4f} → {final.get(key, float('nan')):.4f}"

        table.add_row(
            name,
            str(r["archs"]),
            r["largest"],
            r["smallest"],
            span("loss/largest"),
            span("loss/smallest"),
            f"{r['seconds']:.1f}",
        )
    out.print(table)
    out.print(f"supernets in {cfg.run_dir / 'subspaces'}; search them: protege search (space kind: supernet)")


@app.command()
def federate(
    config: Annotated[Path, typer.Argument(help="federation YAML (see configs/fed-*.yaml)")],
    overrides: SetOpt = None,
    deploy: Annotated[
        bool,
        typer.Option(
            "--deploy",
            help="run in Flower's deployment engine: a SuperLink + one SuperNode per client on loopback",
        ),
    ] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="--deploy without TLS (plain HTTP)")] = False,
) -> None:
    """Run a federation (KnFu, FedMD, FedDF, FedAvg, local) in Flower's simulation engine, or with
    --deploy as real SuperLink/SuperNode processes (TLS with generated certificates)."""
    from .federated import deploy as run_deployed
    from .federated import federate as run_federation
    from .federated import load_federation_config

    if insecure and not deploy:
        raise ProtegeError("--insecure only applies to --deploy (the simulation engine has no network)")
    cfg = load_federation_config(config, overrides or [])
    summary = run_deployed(cfg, tls=not insecure) if deploy else run_federation(cfg)
    glob = summary["global_acc"]
    out.print(
        f"{summary['strategy']}: ALMA {summary['alma']:.4f}"
        + (f", global model acc {glob:.4f}" if glob is not None else "")
        + f", {summary['rejected']} rejected replies; results in {cfg.run_dir}",
        soft_wrap=True,
    )


@app.command()
def quickstart(
    fast: Annotated[bool, typer.Option("--fast", help="a much shorter run (for CI)")] = False,
    output_dir: Annotated[Path, typer.Option(help="where runs/quickstart goes")] = Path("runs"),
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing runs/quickstart")] = True,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default)", min=0)] = 1,
) -> None:
    """Teacher → baseline student → distilled student on Fashion-MNIST, and a table comparing them."""
    from .quickstart import SEEDS_NOTE, format_table, run_quickstart

    result = run_quickstart(
        fast=fast, output_dir=output_dir, seed=seed, overwrite=overwrite, threads=threads or None
    )
    out.print(format_table(result))
    out.print(SEEDS_NOTE, markup=False)
    out.print(f"wall time {result['wall_time_s']:.1f} s — everything is in {result['run_dir']}")


@app.command()
def methods() -> None:
    """List every registered loss with its paper, what it reads and its parameters."""
    from .losses import list_losses

    table = Table(title="registered losses")
    for col in ("name", "reads", "paper", "parameters"):
        table.add_column(col)
    for info in list_losses():
        params = ", ".join(f"{k}={v}" for k, v in {**info.params, **info.state_params}.items())
        keys = [",".join(k) if isinstance(k, tuple) else k for k in info.default_keys]
        shown = (
            ""
            if keys == ["logits", "logits"]
            else f" [{keys[0]}" + (f" → {keys[1]}]" if info.uses_teacher else "]")
        )
        reads = (
            info.reads
            + shown
            + (" + labels" if info.uses_target else "")
            + ("" if info.uses_teacher else " (no teacher)")
            + (f"; teacher → {info.teacher_reduction.name}" if info.teacher_reduction else "")
        )
        table.add_row(info.name, reads, info.paper, params)
    out.print(table)


@app.command()
def models(
    pattern: Annotated[str | None, typer.Argument(help="substring or glob, e.g. 'resnet*'")] = None,
) -> None:
    """List model names build_model accepts (protege zoo first; timm and torchvision by name)."""
    from .models import list_models

    for name in list_models(pattern):
        out.print(name)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of a run YAML."""
    from .config import json_schema

    print(json_schema())


def _print_run(summary: dict[str, Any], run_dir: Path) -> None:
    table = Table(title=f"{run_dir} — {summary['status']}")
    table.add_column("")
    rows = [("val last", summary.get("final", {}), "val/"), ("val best", summary.get("best", {}), "val/")]
    for which, metrics in summary.get("test", {}).items():
        rows.append((f"test {which}", metrics, ""))
    columns = _run_columns(rows)
    for col in columns:
        table.add_column(col, justify="right")
    for label, metrics, prefix in rows:
        table.add_row(
            label,
            *(f"{metrics[prefix + k]:.4f}" if prefix + k in metrics else "—" for k in columns),
        )
    out.print(table)


#: the columns of a classification run's table
_CLASSIFICATION_COLUMNS = ("acc", "agreement", "kl", "ece", "nll")


def _run_columns(rows: list[tuple[str, dict[str, Any], str]], limit: int = 7) -> list[str]:
    """The classification columns when the run has them, else the task's own metrics (the
    student's, not ``teacher/…``), in the order the task reports them, at most ``limit``."""
    seen: list[str] = []
    for _, metrics, prefix in rows:
        for key in metrics:
            name = key[len(prefix) :] if key.startswith(prefix) else None
            if (
                name
                and not name.startswith("teacher/")
                and name not in seen
                and isinstance(metrics[key], (int, float))
            ):
                seen.append(name)
    if any(c in seen for c in _CLASSIFICATION_COLUMNS) or not seen:
        return list(_CLASSIFICATION_COLUMNS)
    return seen[:limit]


def _message(error: ProtegeError) -> str:
    """The error's own message; one raised in a DataLoader worker comes back wrapped in the worker's
    traceback text, which is not for the user: its last line is the message."""
    text = str(error)
    marker = "ProtegeError: "
    if text.startswith("Caught ProtegeError") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def main() -> None:
    """Entry point: user errors print one message (no traceback) and exit with status 2; a run that
    failed (non-finite loss) says what happened and exits with status 1."""
    try:
        app()  # standalone: usage errors print their own message and exit 2
    except ProtegeError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(_message(e))}", highlight=False)
        sys.exit(2)
    except TrainingFailed as e:
        Console(stderr=True).print(f"[bold red]run failed:[/] {escape(str(e))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
