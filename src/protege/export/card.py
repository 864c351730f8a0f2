"""The model card (``README.md``) of an export: everything in it is read from ``export.json``."""

from __future__ import annotations

from typing import Any

from .latency import table


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _how_to_load(info: dict[str, Any]) -> str:
    fmt = info["format"]
    files = info.get("files", {})
    if "embedder.json" in files:
        return (
            "```python\nfrom protege.export.embedder import OnnxEmbedder\n"
            'model = OnnxEmbedder("<this directory>")\n'
            'vectors = model.encode(["first text", "second text"])  # (N, D) torch tensor\n```\n'
            "Or with onnxruntime alone: tokenise with the tokenizer in this directory "
            "(`AutoTokenizer.from_pretrained`, truncation to `max_length` of `embedder.json`), feed "
            "`input_ids` and `attention_mask` (int64, (N, L)) to `model.onnx`; it returns `embedding` (N, D).\n"
        )
    if "encoder.onnx" in files:
        return (
            "```python\nfrom protege.export.sam_onnx import OnnxSam\n"
            'model = OnnxSam("<this directory>")  # encode(images) once, decode(embedding, points, labels | boxes=)\n'
            'masks = model.upscale(model.decode(model.encode(images), points, labels)["masks"]) > 0\n```\n'
            "Or with onnxruntime alone: `encoder.onnx` maps `images` (B, 3, S, S) in [0, 1] to `embeddings`; "
            "`decoder.onnx` maps one image's `embeddings` with `point_coords` (1, P, N, 2) pixels and "
            "`point_labels` (1, P, N) (1 foreground, 0 background, -1 padding) to low-resolution mask "
            "logits `masks` and predicted `iou`; `decoder_multimask.onnx` gives SAM's three masks per "
            "prompt; `decoder_box.onnx` takes `boxes` (1, P, 4) instead of points.\n"
        )
    if fmt == "native":
        native = info.get("native", {})
        if native.get("kind") == "timm":
            return (
                "```python\nimport timm\n"
                'model = timm.create_model("local-dir:<this directory>", pretrained=True).eval()\n```\n'
            )
        if native.get("kind") == "transformers":
            return (
                "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                'model = AutoModelForCausalLM.from_pretrained("<this directory>")\n'
                'tokenizer = AutoTokenizer.from_pretrained("<this directory>")\n```\n'
            )
        return (
            "```python\nimport protege as pg\n"
            'model = pg.load_model("<this directory>")  # model.safetensors + protege_model.json\n```\n'
        )
    name = next((f for f in files if f.endswith(".onnx")), "model.onnx")
    shape = info.get("model", {}).get("input_shape")
    return (
        "```python\nimport numpy as np, onnxruntime as ort\n"
        f'session = ort.InferenceSession("<this directory>/{name}", providers=["CPUExecutionProvider"])\n'
        f'logits = session.run(None, {{"input": batch.astype(np.float32)}})[0]  # batch: {shape}\n```\n'
    )


def model_card(info: dict[str, Any]) -> str:
    """The README.md of an export directory, from its ``export.json`` content ``info``."""
    src = info.get("source", {})
    fmt = info["format"]
    title = {"native": "native format", "onnx": "ONNX (fp32)", "int8": "ONNX int8 (W8A8, QDQ)"}[fmt]
    student = src.get("student") or {}
    lines = [f"# {student.get('model', 'model')} — {title}", ""]
    lines.append(f"Exported by protege {info.get('protege_version', '')} on {info.get('created', '')}.")
    lines.append("")
    lines.append("## What it is")
    lines.append("")
    rows = [
        ("task", src.get("task")),
        ("student", f"{student.get('model')} {student.get('kwargs') or ''}".strip() if student else None),
        ("teacher(s)", ", ".join(t["model"] for t in src.get("teachers", [])) or None),
        ("terms", ", ".join(_term(t) for t in src.get("terms", [])) or None),
        ("data", _data(src.get("data"))),
        ("run", f"`{src['run']}`, {src.get('checkpoint', '')} checkpoint" if src.get("run") else None),
        ("quantization-aware", "yes (quantize: int8)" if src.get("quantize") else None),
    ]
    lines += [f"- **{k}**: {v}" for k, v in rows if v]
    model = info.get("model", {})
    lines.append("")
    lines.append("## Files and cost")
    lines.append("")
    for name, f in info.get("files", {}).items():
        lines.append(f"- `{name}`: {f['bytes'] / 1e6:.3f} MB")
    if src.get("task") == "promptable_segmentation":
        lines += _segmenter_sections(info)
        return "\n".join(lines) + "\n"
    if src.get("task") == "embedding" and fmt != "native":
        lines += _embedder_sections(info)
        return "\n".join(lines) + "\n"
    if model:
        lines.append(
            f"- parameters: {model.get('params', 0):,}; FLOPs per sample: {model.get('flops', 0) / 1e6:.2f} M; "
            f"input: {model.get('input_shape')}"
        )
    if "onnx" in info:
        o = info["onnx"]
        lines.append(f"- ONNX opset {o['opset']}, {o['exporter']} exporter, dynamic batch axis")
    if "quantization" in info:
        q = info["quantization"]
        g = q["graph"]
        lines.append(
            f"- {q['method']} ({q['format']}): weights {q['weights']}; activations {q['activations']} "
            f"on {q['calibration']['samples']} {q['calibration']['split']} samples; "
            f"{g['weighted_ops_int8']}/{g['weighted_ops']} Conv/Gemm/MatMul read int8 weights, "
            f"{g['int8_initializers']} int8 initializers"
        )
        if q.get("excluded"):
            lines.append(
                f"- kept in float, as the quantization-aware run trained them: {q['excluded']['modules']}"
            )
        if "qad_ranges" in q:
            r = q["qad_ranges"]
            lines.append(
                f"- input ranges of {r['modules']} quantized modules ({r['tensors']} tensors) are the "
                "quantization-aware run's; the other tensors are calibrated"
            )
    lines.append("")
    lines.append("## Load it")
    lines.append("")
    lines.append(_how_to_load(info))
    lines.append("## Measured")
    lines.append("")
    ev = info.get("evaluation")
    if ev:
        lines.append(f"On the {ev['split']} split ({ev['samples']} samples):")
        lines.append("")
        columns = {
            "accuracy": "acc",
            "agreement with fp32 student": "agreement_fp32",
            "agreement with teacher": "agreement_teacher",
        }
        lines += _eval_table(ev, columns)
        int8 = ev.get("int8") or {}
        if "agreement_fake_quant" in int8:
            lines.append(
                f"The int8 model agrees with the fake-quantized PyTorch student on "
                f"{_pct(int8['agreement_fake_quant'])} of the samples (parity with the quantization-aware "
                "training graph)."
            )
        lines.append("")
    if "parity" in info:
        p = info["parity"]
        lines.append(
            f"Parity with PyTorch on {p['samples']} {p['inputs']} inputs: max |Δlogit| "
            f"{p['max_abs_diff']:.3g}, top-1 agreement {_pct(p['top1_agreement'])}."
        )
        lines.append("")
    if "latency" in info:
        lat = info["latency"]
        lines.append(f"Latency ({lat['machine']}; interleaved rounds, median and 10th–90th percentile):")
        lines.append("")
        lines.append(table(lat["rows"]))
    lines.append("## Reproduce")
    lines.append("")
    lines.append(f"```\n{info.get('command', '')}\n```")
    return "\n".join(lines) + "\n"


#: the models an export evaluates, in table order
EVAL_ROWS = (
    ("teacher", "teacher (PyTorch)"),
    ("fp32", "student fp32 (PyTorch)"),
    ("fake_quant", "student fake-quantized (PyTorch, as QAD trained it)"),
    ("onnx_fp32", "student fp32 (onnxruntime)"),
    ("int8", "student int8 (onnxruntime)"),
)


def _eval_table(ev: dict[str, Any], columns: dict[str, str]) -> list[str]:
    """The markdown table of an export's evaluation: one row per evaluated model, ``columns``
    ({header: metric key}) as percentages."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for key, label in EVAL_ROWS:
        m = ev.get(key)
        if m:
            lines.append(f"| {label} | " + " | ".join(_pct(m.get(k)) for k in columns.values()) + " |")
    return lines


def _segmenter_sections(info: dict[str, Any]) -> list[str]:
    """Cost, loading, measurements and the command of an exported promptable segmenter."""
    lines = []
    if info.get("model"):
        lines.append(f"- parameters: {info['model'].get('params', 0):,}")
    for key, f in (info.get("onnx") or {}).get("files", {}).items():
        lines.append(
            f"- `{key}`: {f.get('exporter')} exporter, opset {f.get('opset')}; largest difference to "
            f"PyTorch right after the export {f.get('max_rel_diff', float('nan')):.2g} (relative)"
        )
    q = info.get("quantization")
    if q:
        cal = q.get("calibration", {})
        lines.append(
            f"- int8 W8A8 (onnxruntime, QDQ: int8 per-channel weights, uint8 per-tensor activations, "
            f"MinMax) calibrated on {cal.get('samples')} {cal.get('split')} images; decoders on those "
            "images' embeddings with a grid of point and box prompts"
        )
        for key, f in q.get("files", {}).items():
            if isinstance(f, dict) and "graph" in f:
                g = f["graph"]
                lines.append(
                    f"  - `{key}`: {g['weighted_ops_int8']}/{g['weighted_ops']} Conv/Gemm/MatMul read int8 weights"
                )
    lines += ["", "## Load it", "", _how_to_load(info), "## Measured", ""]
    ev = info.get("evaluation")
    if ev:
        lines.append(
            f"Mask mIoU on the {ev['split']} split ({ev.get('samples')} images, the run's fixed prompts), "
            "against the ground truth, the fp32 PyTorch student's masks and the teacher's masks:"
        )
        lines.append("")
        columns = {
            "1 point": "miou_1pt",
            "3 points": "miou_3pt",
            "box": "miou_box",
            "IoU with fp32 student": "fp32_miou",
            "IoU with teacher": "teacher_miou",
        }
        lines += _eval_table(ev, columns)
        lines.append("")
    if "latency" in info:
        lat = info["latency"]
        lines.append(
            f"Latency ({lat.get('machine', '')}; {lat['threads']} thread(s), median of {lat['rounds']} "
            f"interleaved rounds; decoder: {lat['prompts']} single-point prompts on one image):"
        )
        lines.append("")
        lines.append("| model | encoder ms / image | decoder ms / prompt |")
        lines.append("|---|---:|---:|")
        for name, r in lat["rows"].items():
            lines.append(f"| {name} | {r['encoder_ms']:.2f} | {r['decoder_ms_per_prompt']:.3f} |")
        lines.append("")
    lines += ["## Reproduce", "", f"```\n{info.get('command', '')}\n```"]
    return lines


def _embedder_sections(info: dict[str, Any]) -> list[str]:
    """Cost, loading, measurements and the command of an exported sentence encoder."""
    lines = []
    if info.get("model"):
        lines.append(f"- parameters: {info['model'].get('params', 0):,}")
    if "onnx" in info:
        o = info["onnx"]
        lines.append(f"- ONNX opset {o['opset']}, {o['exporter']} exporter, dynamic batch and token axes")
    q = info.get("quantization")
    if q:
        g = q["graph"]
        lines.append(
            f"- {q['method']}: weights {q['weights']}, activations {q['activations']}; "
            f"{g['weighted_ops_int8']}/{g['weighted_ops']} Conv/Gemm/MatMul read int8 weights"
        )
    lines += ["", "## Load it", "", _how_to_load(info), "## Measured", ""]
    if "parity" in info:
        p = info["parity"]
        lines.append(
            f"The fp32 graph gives the PyTorch student's vectors on {p['samples']} {p['inputs']} to "
            f"{p['max_abs_diff']:.2g} (largest absolute difference)."
        )
        lines.append("")
    ev = info.get("evaluation")
    if ev:
        lines.append(
            f"On the {ev['split']} split ({ev.get('samples')} texts): mean cosine and top-10 neighbour overlap "
            "with the teacher and with the fp32 PyTorch student, Spearman of pairwise similarities vs the teacher:"
        )
        lines.append("")
        lines.append(
            "| model | cos with teacher | top-10 overlap | Spearman | cos with fp32 | top-10 with fp32 |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|")
        for key, label in EVAL_ROWS:
            m = ev.get(key)
            if m and key != "teacher":
                lines.append(
                    f"| {label} | {m.get('cos', float('nan')):.4f} | {_pct(m.get('knn10'))} | "
                    f"{m.get('spearman', float('nan')):.4f} | {m.get('fp32_cos', float('nan')):.4f} | "
                    f"{_pct(m.get('fp32_knn10'))} |"
                )
        lines.append("")
    if "latency" in info:
        lat = info["latency"]
        lines.append(f"Sentences per second ({lat.get('machine', '')}; 1 thread, tokenisation included):")
        lines.append("")
        lines.append("| model | batch 1 | batch 64 | × teacher (batch 64) |")
        lines.append("|---|---:|---:|---:|")
        for name, r in lat["rows"].items():
            up = r.get("speedup_t1_b64")
            lines.append(
                f"| {name} | {r['t1_b1']:.1f} | {r['t1_b64']:.1f} | {'—' if up is None else f'{up:.2f}'} |"
            )
        lines.append("")
    lines += ["## Reproduce", "", f"```\n{info.get('command', '')}\n```"]
    return lines


def _term(t: dict[str, Any]) -> str:
    extra = {
        k: v for k, v in t.items() if k not in ("loss", "weight") and v not in (None, "logits", 0.0, False)
    }
    shown = ", ".join(f"{k}={v}" for k, v in extra.items())
    return f"{t['loss']}×{t.get('weight', 1.0):g}" + (f" ({shown})" if shown else "")


def _data(d: dict[str, Any] | None) -> str | None:
    if not d:
        return None
    sizes = d.get("sizes") or {}
    shown = ", ".join(f"{k} {v}" for k, v in sizes.items())
    return f"{d.get('source')}" + (f" ({shown})" if shown else "")
