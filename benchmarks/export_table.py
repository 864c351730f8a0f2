"""The BENCHMARKS.md table of `protege export`: size, accuracy and latency of one teacher-student pair.

Reads what was measured, nothing else: a `protege bench --json` file (latency, all models timed side
by side in interleaved rounds) and the `export.json` of the int8 PTQ export and of the int8 export of
the quantization-aware run (accuracies on the test split, file sizes).

    protege bench runs/quickstart/distilled -e runs/quickstart/distilled/export-int8 \\
        -e runs/quickstart-qad/export-int8 --json runs/bench-quickstart.json
    python benchmarks/export_table.py runs/bench-quickstart.json \\
        --ptq runs/quickstart/distilled/export-int8 --qad runs/quickstart-qad/export-int8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bench", type=Path, help="protege bench --json output")
    parser.add_argument("--ptq", type=Path, required=True, help="export directory of the int8 PTQ export")
    parser.add_argument(
        "--qad", type=Path, required=True, help="export directory of the QAD run's int8 export"
    )
    args = parser.parse_args()
    bench = json.loads(args.bench.read_text())
    ptq = json.loads((args.ptq / "export.json").read_text())
    qad = json.loads((args.qad / "export.json").read_text())
    ev, qev = ptq["evaluation"], qad["evaluation"]
    labels = [r["model"] for r in bench["rows"]]
    labels = list(dict.fromkeys(labels))
    ptq_label = next(m for m, info in bench["models"].items() if info.get("export") == str(args.ptq))
    qad_label = next(m for m, info in bench["models"].items() if info.get("export") == str(args.qad))
    mb = {label: info["bytes"] / 1e6 for label, info in bench["models"].items()}
    rows = {
        "teacher": ("teacher, PyTorch fp32", mb["teacher"], ev["teacher"]["acc"]),
        "student": ("student, PyTorch fp32", mb["student"], ev["fp32"]["acc"]),
        "student fp32": ("student, onnxruntime fp32", mb["student fp32"], ev["onnx_fp32"]["acc"]),
        ptq_label: ("student, onnxruntime int8 PTQ", mb[ptq_label], ev["int8"]["acc"]),
        qad_label: ("student, onnxruntime int8 QAD", mb[qad_label], qev["int8"]["acc"]),
    }
    settings = sorted({(r["batch"], r["threads"]) for r in bench["rows"]})

    def row(label: str, batch: int, threads: int) -> dict:
        return next(
            x
            for x in bench["rows"]
            if x["model"] == label and x["batch"] == batch and x["threads"] == threads
        )

    head = (
        "| model | size MB | test acc | " + " | ".join(f"b{b}/{t}t ms (× eager)" for b, t in settings) + " |"
    )
    lines = [head, "|---" * (3 + len(settings)) + "|"]
    for label in labels:
        name, size, acc = rows[label]
        cells = [f"{row(label, b, t)['ms']:.3f} ({row(label, b, t)['vs_eager']:.2f}×)" for b, t in settings]
        lines.append(f"| {name} | {size:.3f} | {_pct(acc)} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print()
    over_teacher = [f"b{b}/{t}t {row(ptq_label, b, t)['vs_teacher']:.1f}×" for b, t in settings]
    print("int8 PTQ speed-up over the teacher (same rounds): " + ", ".join(over_teacher))
    fq = qev.get("fake_quant", {}).get("acc")
    print(
        f"QAD run: fp32 weights {_pct(qev['fp32']['acc'])}, fake-quantized in PyTorch {_pct(fq)}, "
        f"exported int8 {_pct(qev['int8']['acc'])} (agreement with the fake-quantized model "
        f"{_pct(qev['int8'].get('agreement_fake_quant'))}); PTQ int8 − fp32: "
        f"{100 * (ev['int8']['acc'] - ev['fp32']['acc']):+.2f} points; QAD int8 − distilled fp32: "
        f"{100 * (qev['int8']['acc'] - ev['fp32']['acc']):+.2f} points"
    )
    print(f"machine: {bench['machine']}")


if __name__ == "__main__":
    main()
