"""Why `protege export --format int8` quantizes activations to uint8: onnxruntime latency of the same
model quantized with uint8 (U8S8) and with int8 (S8S8) activations, timed side by side.

resnet8x4 (random init, 3x32x32 input, CIFAR's shapes) exported with protege's ONNX exporter, then
quantized by onnxruntime's `quantize_static` (QDQ, per-channel int8 weights) twice, calibrated on
the same random batches; both, and the fp32 graph, timed with `protege.export.latency.measure`
(shuffled interleaved rounds) at batch 1 and 32.

    python benchmarks/int8_activation_type.py [--model resnet8x4] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import protege as pg
from protege.export import latency
from protege.export.onnx_io import quiet, to_onnx


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet8x4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    args = parser.parse_args()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    model = pg.build_model(args.model, num_classes=100).eval()
    example = torch.randn(32, 3, 32, 32)
    batches = [torch.randn(32, 3, 32, 32).numpy() for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x.astype(np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        to_onnx(model, example[:2], fp32)
        candidates = [latency.Candidate("onnxruntime fp32", "onnxruntime", "fp32", onnx=fp32)]
        for name, act in (
            ("uint8 activations (U8S8)", QuantType.QUInt8),
            ("int8 activations (S8S8)", QuantType.QInt8),
        ):
            out = Path(tmp) / f"{act.name}.onnx"
            with quiet():
                quantize_static(
                    str(fp32),
                    str(out),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                )
            candidates.append(latency.Candidate(name, "onnxruntime", "int8", onnx=out))
        rows = latency.measure(
            candidates, example, batch_sizes=(1, 32), threads=(args.threads,), max_seconds=args.max_seconds
        )
    print(f"{args.model}, {args.threads} thread(s)")
    print("| graph | batch | median ms | p10–p90 ms | rounds |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['ms']:.3f} | {r['ms_p10']:.3f}–{r['ms_p90']:.3f} | {r['rounds']} |"
        )


if __name__ == "__main__":
    main()
