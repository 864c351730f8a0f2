"""Which operators an int8 SAM decoder can quantize: an ablation on a trained student.

``protege export --format int8`` keeps the decoders' Concat operators in float
(``protege.export.sam_onnx.DECODER_FLOAT_OPS``). This script measures why, on a finished
``promptable_segmentation`` run: the student exported to ONNX, then quantized (W8A8 QDQ, MinMax,
calibrated on training images) in several ways, each evaluated with the run's own test prompts:

- ``encoder int8``: the image encoder quantized, the decoders fp32;
- ``all types``: encoder and decoders, every operator type onnxruntime quantizes by default;
- ``all but Concat``: the same with the decoders' Concat in float (what the export does);
- ``weighted only``: the decoders' MatMul/Gemm/Conv/ConvTranspose only.

Columns: mask mIoU (1 point, 3 points, box) against the ground truth, and mask IoU with the fp32
PyTorch student's masks (1.0: quantization changed nothing).

    python benchmarks/sam_int8_ops.py --run runs/seg-bench/gt-s0 --test-size 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from segmentation import data_section, teacher_section  # noqa: E402

from protege.export.quantize import quantize_int8  # noqa: E402
from protege.export.sam_onnx import FILES, OnnxSam, _calibration_prompts, export_sam_onnx  # noqa: E402
from protege.export.segmenter import calibration_images, evaluate_segmenters  # noqa: E402
from protege.pipeline import load_run  # noqa: E402
from protege.tasks import build_task  # noqa: E402

WEIGHTED = ("MatMul", "Gemm", "Conv", "ConvTranspose")
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "encoder int8": None,  # decoders stay fp32
    "all types": (),
    "all but Concat": ("Concat",),
    "weighted only": ("weighted",),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/seg-bench/gt-s0", help="a finished promptable_segmentation run")
    ap.add_argument("--teacher", default="runs/seg/sam-tiny-teacher")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=100)
    ap.add_argument("--calibration", type=int, default=64, help="training images to calibrate on")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = build_task("promptable_segmentation")
    splits = task.load_data(data_section(args, "uniform"), [teacher_section(args)], [])
    run = load_run(args.run, "best", data=splits)
    model = run.student.eval()
    images, _ = calibration_images(splits.train, args.calibration, int(model.img_size))
    models: dict[str, object] = {"fp32": model}
    with tempfile.TemporaryDirectory(prefix="sam-int8-ops-") as scratch:
        root = Path(scratch)
        fp32 = export_sam_onnx(model, root / "fp32", multimask=False)
        encoder_q = root / "encoder-int8.onnx"
        quantize_int8(fp32["encoder"], encoder_q, ({"images": b} for b in images.split(8)))
        reference = OnnxSam(fp32)
        embeddings = [reference.encode(b) for b in images.split(8)]
        for name, float_ops in VARIANTS.items():
            folder = root / name.replace(" ", "-")
            folder.mkdir()
            shutil.copyfile(encoder_q, folder / FILES["encoder"])
            for key in ("decoder", "decoder_box"):
                target = folder / FILES[key]
                if float_ops is None:
                    shutil.copyfile(fp32[key], target)
                    continue
                feeds = [
                    {"embeddings": e[i : i + 1], **prompt}
                    for e in embeddings
                    for i in range(len(e))
                    for prompt in _calibration_prompts(key, int(model.img_size), 4)
                ]
                if float_ops == ("weighted",):
                    import onnx

                    kinds = {n.op_type for n in onnx.load(str(fp32[key])).graph.node}
                    quantize_int8(fp32[key], target, feeds, float_op_types=sorted(kinds - set(WEIGHTED)))
                else:
                    quantize_int8(fp32[key], target, feeds, float_op_types=float_ops)
            models[name] = OnnxSam(folder)
        result = evaluate_segmenters(models, splits.test, run.task)
    keys = ("miou_1pt", "miou_3pt", "miou_box", "fp32_miou_1pt", "fp32_miou_3pt", "fp32_miou_box")
    print(f"| {args.run} ({args.test_size} test images) | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for name, m in result.items():
        print(f"| {name} | " + " | ".join(f"{100 * m[k]:.1f}" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": result}, indent=1))


if __name__ == "__main__":
    main()
