"""Promptable segmenters (SAM, TinySAM-style students) to ONNX, to int8, and back behind the same
``encode``/``decode`` interface.

SAM is two graphs, as in ``segment_anything``'s own ONNX export and TinySAM's deployment: the image
encoder runs once per image, the prompt encoder + mask decoder once per batch of prompts.

- ``encoder.onnx``: ``images`` (B, 3, S, S) in [0, 1] -> ``embeddings`` (B, C, h, w); dynamic B.
- ``decoder.onnx`` (single mask, ``multimask=False``) and ``decoder_multimask.onnx`` (SAM's three
  masks, ``multimask=True``): ``embeddings`` (1, C, h, w), ``point_coords`` (1, P, N, 2) float pixel
  (x, y), ``point_labels`` (1, P, N) int64 (1 foreground, 0 background, -1 padding) -> ``masks``
  (1, P, M, 4h, 4w) low-resolution mask logits and ``iou`` (1, P, M); dynamic P and N. Two files
  because the model's ``decode`` picks its masks by ``multimask`` in Python: one graph holding both
  choices runs the decoder twice (onnxruntime does not merge the copies).
- ``decoder_box.onnx``: ``embeddings`` (1, C, h, w), ``boxes`` (1, P, 4) float pixel
  (x0, y0, x1, y1), x1/y1 exclusive -> ``masks`` (1, P, 1, 4h, 4w), ``iou`` (1, P, 1); dynamic P.
  A box prompt is two corner tokens and no padding token, so it is a graph of its own rather than
  points with SAM's labels 2/3 (which would need the caller to drop the padding point).
- ``sam_onnx.json``: image size, embedding shape, the exporter and opset of each file, and the
  largest difference to PyTorch measured right after the export on prompts of another shape
  than the traced example (so a graph whose dynamic axes were baked in fails here, not later).

:func:`quantize_sam_int8` quantizes the graphs with :func:`protege.export.quantize.quantize_int8`
(W8A8 QDQ: int8 per-channel symmetric weights, uint8 per-tensor activations, MinMax calibration):
the encoder calibrated on images, the decoders on those images' embeddings with a grid of point
prompts. :class:`OnnxSam` runs either set with onnxruntime and has the interface
:func:`protege.segment.segment_everything` and the segmentation evaluation take
(``img_size``, ``encode``, ``decode``, ``upscale``), so a model is measured the same way before
and after export and quantization.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtegeError
from ..files import atomic_write_text
from ._deps import require
from .onnx_io import export_graph, quiet, session
from .quantize import quantize_int8

__all__ = ["FILES", "OnnxSam", "export_sam_onnx", "quantize_sam_int8"]

#: the graphs of an exported model: key -> file name
FILES = {
    "encoder": "encoder.onnx",
    "decoder": "decoder.onnx",
    "decoder_multimask": "decoder_multimask.onnx",
    "decoder_box": "decoder_box.onnx",
}
#: the decoder graphs, in the order they are written
DECODERS = ("decoder", "decoder_multimask", "decoder_box")
INFO = "sam_onnx.json"
DECODER_INPUTS = ("embeddings", "point_coords", "point_labels")
DECODER_OUTPUTS = ("masks", "iou")
#: operator types the int8 decoders keep in float. The decoder concatenates its learned output tokens
#: with the prompt tokens; QDQ gives a Concat one scale for all inputs, and with it the int8 point
#: decoder's masks kept a mask IoU of 0.20 with the fp32 masks on 1-point prompts (0.96 with Concat
#: in float; the other elementwise types are harmless: benchmarks/segmentation.py's student, 40 test
#: images; BENCHMARKS.md)
DECODER_FLOAT_OPS = ("Concat",)
#: the largest |ONNX - PyTorch| an export may show, relative to the largest |PyTorch output| (>= 1)
TOLERANCE = 1e-3


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.encode(images)


class _Decoder(nn.Module):
    def __init__(self, model: nn.Module, multimask: bool) -> None:
        super().__init__()
        self.model, self.multimask = model, multimask

    def forward(self, embeddings: Tensor, points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.decode(embeddings, points, labels, multimask=self.multimask)
        return out["masks"], out["iou"]


class _BoxDecoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.decode(embeddings, boxes=boxes)
        return out["masks"], out["iou"]


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A hidden directory inside ``out_dir`` to write into; :func:`_publish` renames its files into
    ``out_dir`` one by one (each appears whole), and what is left is removed in any case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out_dir: Path, names: Iterable[str]) -> dict[str, Path]:
    """Move the files ``names`` (and any external-data file each has, ``<name>.data``) from ``tmp``
    to ``out_dir``; the data files first, so a model file never points at missing weights."""
    moved = {}
    for name in names:
        data = tmp / f"{name}.data"
        if data.exists():
            os.replace(data, out_dir / data.name)
        os.replace(tmp / name, out_dir / name)
        moved[name] = out_dir / name
    return moved


def _points(count: int, per_prompt: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    coords = torch.rand(1, count, per_prompt, 2, generator=generator) * size
    labels = torch.randint(0, 2, (1, count, per_prompt), generator=generator)
    labels[..., 0] = 1
    return coords, labels


def _boxes(count: int, size: int, generator: torch.Generator) -> Tensor:
    """``(1, count, 4)`` boxes inside an ``size`` image, each at least 1 pixel wide and high."""
    corner = torch.rand(1, count, 2, generator=generator) * (size / 2)
    extent = 1 + torch.rand(1, count, 2, generator=generator) * (size / 2 - 1)
    return torch.cat([corner, corner + extent], -1)


def _gap(got: np.ndarray, want: Tensor) -> float:
    """max |got - want| relative to max(1, max |want|)."""
    want_np = want.detach().cpu().float().numpy()
    if got.shape != want_np.shape:
        return float("inf")
    return float(np.abs(got - want_np).max() / max(1.0, float(np.abs(want_np).max())))


def export_sam_onnx(
    model: nn.Module,
    out_dir: str | Path,
    opset: int = 17,
    multimask: bool | None = None,
    boxes: bool = True,
) -> dict[str, Path]:
    """Write ``model`` (a promptable segmenter: ``img_size``, ``encode``, ``decode``) to ONNX in
    ``out_dir``: ``encoder.onnx``, ``decoder.onnx`` (``multimask=False``) and/or
    ``decoder_multimask.onnx`` (``multimask=True``; ``multimask=None`` writes both),
    ``decoder_box.onnx`` (with ``boxes``) and ``sam_onnx.json``. Returns ``{"encoder",
    "decoder"?, "decoder_multimask"?, "decoder_box"?, "info"}`` paths.

    Each graph goes through :func:`protege.export.onnx_io.export_graph` (the dynamo exporter, whose
    opset is at least 18, then the TorchScript one at ``opset``), then is run by onnxruntime on
    inputs of other sizes than the traced ones (another batch; another number of prompts and of
    points per prompt) and compared with PyTorch: a difference above :data:`TOLERANCE` is a
    :class:`ProtegeError`. Files are written in a staging directory and renamed into ``out_dir``;
    the model is left on its device and in its mode.
    """
    require()
    out_dir = Path(out_dir)
    size = int(model.img_size)
    wanted = [k for k, mm in (("decoder", False), ("decoder_multimask", True)) if multimask in (None, mm)]
    wanted += ["decoder_box"] if boxes else []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    training = model.training
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, size, size, generator=generator)
    info: dict[str, Any] = {"img_size": size, "files": {}}
    try:
        model.eval().cpu()
        with torch.no_grad():
            embeddings = model.encode(images)
        info["embedding"] = list(embeddings.shape[1:])
        with _staging(out_dir) as tmp:
            path = tmp / FILES["encoder"]
            batch = {0: "batch"}
            exported = export_graph(
                _Encoder(model), (images[:2],), path, ["images"], ["embeddings"],
                {"images": batch, "embeddings": batch}, opset,
            )  # fmt: skip
            with quiet():
                got = session(path, threads=1).run(None, {"images": images.numpy()})[0]
            info["files"]["encoder"] = {**exported, "max_rel_diff": _check("encoder", got, embeddings)}
            emb = embeddings[:1]
            for key in wanted:
                info["files"][key] = _export_decoder(
                    model, key, emb, size, generator, tmp / FILES[key], opset
                )
            names = [FILES[k] for k in ("encoder", *wanted)]
            paths = _publish(tmp, out_dir, names)
        atomic_write_text(out_dir / INFO, json.dumps(info, indent=2))
    finally:
        model.to(device).train(training)
    out = {key: paths[FILES[key]] for key in ("encoder", *wanted)}
    return {**out, "info": out_dir / INFO}


def _export_decoder(
    model: nn.Module, key: str, emb: Tensor, size: int, generator: torch.Generator, path: Path, opset: int
) -> dict[str, Any]:
    """Export decoder graph ``key`` traced on one prompt shape, run it on another and compare."""
    if key == "decoder_box":
        module: nn.Module = _BoxDecoder(model)
        names: tuple[str, ...] = ("embeddings", "boxes")
        axes = {"boxes": {1: "prompts"}}
        traced: tuple[Tensor, ...] = (_boxes(3, size, generator),)
        other: tuple[Tensor, ...] = (_boxes(5, size, generator),)
        shapes = "5 boxes after tracing 3"
    else:
        module = _Decoder(model, key == "decoder_multimask")
        names = DECODER_INPUTS
        axes = {"point_coords": {1: "prompts", 2: "points"}, "point_labels": {1: "prompts", 2: "points"}}
        traced, other = _points(3, 2, size, generator), _points(5, 1, size, generator)
        shapes = "5 prompts of 1 point after tracing 3 of 2"
    out_axes = {"masks": {1: "prompts"}, "iou": {1: "prompts"}}
    exported = export_graph(module, (emb, *traced), path, names, DECODER_OUTPUTS, {**axes, **out_axes}, opset)
    with torch.no_grad():
        want = module(emb, *other)
    feed = {name: value.numpy() for name, value in zip(names, (emb, *other), strict=True)}
    with quiet():
        try:
            masks, iou = session(path, threads=1).run(None, feed)
        except Exception as e:  # e.g. a graph with the example's shapes baked in
            why = (
                f"; the dynamo exporter said: {exported['dynamo_error']}"
                if "dynamo_error" in exported
                else ""
            )
            raise ProtegeError(
                f"the exported {FILES[key]} ({exported['exporter']} exporter{why}) fails on {shapes} "
                f"({type(e).__name__}: {str(e)[:300]})"
            ) from None
    gap = max(_check(key, masks, want[0]), _check(key, iou, want[1]))
    return {**exported, "max_rel_diff": gap}


def _check(what: str, got: np.ndarray, want: Tensor) -> float:
    gap = _gap(got, want)
    if not gap <= TOLERANCE:
        raise ProtegeError(
            f"the exported {what} disagrees with PyTorch (largest relative difference {gap:.3g}, "
            f"shapes {got.shape} and {tuple(want.shape)}); the model holds an operation the ONNX exporters "
            "translate wrongly. Keep the PyTorch model for this one"
        )
    return gap


def _batches(images: Tensor | Iterable[Tensor], size: int) -> list[Tensor]:
    """Calibration images as a list of (b, 3, S, S) float batches."""
    if isinstance(images, Tensor):
        images = [images]
    batches = []
    for x in images:
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ProtegeError(
                f"calibration images must be (B, 3, {size}, {size}) tensors in [0, 1], not {tuple(x.shape)}"
            )
        batches.extend(x.float().split(8))
    if not batches:
        raise ProtegeError("quantize_sam_int8 needs at least one calibration image")
    return batches


def quantize_sam_int8(
    onnx_paths: Mapping[str, str | Path] | str | Path,
    calibration_images: Tensor | Iterable[Tensor],
    out_dir: str | Path,
    decoder: bool = True,
    points_per_side: int = 4,
) -> dict[str, Path]:
    """The int8 (W8A8, QDQ) model of an exported segmenter, in ``out_dir`` under the same file names.

    ``onnx_paths``: :func:`export_sam_onnx`'s result or its directory. ``calibration_images``:
    (B, 3, S, S) tensors in [0, 1] (a few dozen typical images). The encoder is calibrated on them;
    with ``decoder`` the decoders are quantized too, calibrated on the fp32 encoder's embeddings of
    those images with the prompts of :func:`_calibration_prompts` (a ``points_per_side``² grid);
    without, they are copied as they are. Writes
    ``sam_onnx.json`` with what each quantization did. Returns the paths like
    :func:`export_sam_onnx`.
    """
    require("onnx", "onnxruntime")
    fp32 = _paths(onnx_paths)
    out_dir = Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == fp32["encoder"].parent.resolve():
        raise ProtegeError(f"{out_dir} holds the fp32 model; write the int8 model to another directory")
    source = OnnxSam(fp32)
    size = source.img_size
    batches = _batches(calibration_images, size)
    info: dict[str, Any] = {"img_size": size, "files": {}, "calibration_images": sum(len(b) for b in batches)}
    with _staging(out_dir) as tmp:
        info["files"]["encoder"] = quantize_int8(
            fp32["encoder"], tmp / FILES["encoder"], ({"images": b} for b in batches)
        )
        decoders = [k for k in DECODERS if k in fp32]
        if decoder and decoders:
            embeddings = [source.encode(b) for b in batches]
            for key in decoders:
                feeds = [
                    {"embeddings": e[i : i + 1], **prompt}
                    for e in embeddings
                    for i in range(len(e))
                    for prompt in _calibration_prompts(key, size, points_per_side)
                ]
                info["files"][key] = quantize_int8(
                    fp32[key], tmp / FILES[key], feeds, float_op_types=DECODER_FLOAT_OPS
                )
        else:
            for key in decoders:
                shutil.copyfile(fp32[key], tmp / FILES[key])
                info["files"][key] = "copied (fp32)"
        keys = ["encoder", *decoders]
        paths = _publish(tmp, out_dir, [FILES[k] for k in keys])
    atomic_write_text(out_dir / INFO, json.dumps(info, indent=2, default=str))
    return {**{k: paths[FILES[k]] for k in keys}, "info": out_dir / INFO}


def _calibration_prompts(key: str, size: int, per_side: int) -> list[dict[str, Tensor]]:
    """The prompts a decoder graph is calibrated with on each image: a ``per_side``² grid of single
    foreground points and the same points paired with a background point at the image centre; for
    the box graph, boxes of a quarter and of half the image's side centred on that grid."""
    grid = (torch.arange(per_side) + 0.5) * size / per_side
    points = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(1, -1, 1, 2)
    if key == "decoder_box":
        boxes = []
        for half in (size / 8, size / 4):
            centre = points[:, :, 0]
            boxes.append({"boxes": torch.cat([centre - half, centre + half], -1).clamp(0, size)})
        return boxes
    single = {"point_coords": points, "point_labels": torch.ones(points.shape[:3], dtype=torch.long)}
    background = torch.full_like(points, size / 2)
    paired = {
        "point_coords": torch.cat([points, background], 2),
        "point_labels": torch.tensor([1, 0]).expand(1, points.shape[1], 2),
    }
    return [single, paired]


def _paths(onnx_paths: Mapping[str, str | Path] | str | Path) -> dict[str, Path]:
    """The model files of an export: its result dict or its directory."""
    if isinstance(onnx_paths, Mapping):
        paths = {k: Path(v) for k, v in onnx_paths.items() if k in FILES}
    else:
        folder = Path(onnx_paths)
        paths = {k: folder / name for k, name in FILES.items() if (folder / name).is_file()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if "encoder" not in paths or missing or len(paths) < 2:
        raise ProtegeError(
            f"{onnx_paths} is not an exported segmenter: it needs {FILES['encoder']} and a decoder "
            f"({FILES['decoder']} or {FILES['decoder_multimask']}) (missing: {', '.join(missing) or 'a file'}); "
            "write them with protege.export.sam_onnx.export_sam_onnx"
        )
    return paths


class OnnxSam:
    """An exported segmenter run by onnxruntime on the CPU, with the model's interface: ``img_size``,
    ``encode(images)``, ``decode(embeddings, points, labels, multimask=...)``, ``upscale(masks)``
    and ``__call__`` (encode + decode). Point prompts, or box prompts where the export has
    ``decoder_box.onnx`` (not both in one prompt). ``upscale`` is bilinear interpolation to (S, S),
    as SAM's."""

    def __init__(self, paths: Mapping[str, str | Path] | str | Path, threads: int | None = None) -> None:
        files = _paths(paths)
        with quiet():
            self.encoder = session(files["encoder"], threads=threads, spin=False)
            self.decoders = {
                mm: session(files[key], threads=threads, spin=False)
                for key, mm in (("decoder", False), ("decoder_multimask", True))
                if key in files
            }
            self.box_decoder = (
                session(files["decoder_box"], threads=threads, spin=False) if "decoder_box" in files else None
            )
        shape = self.encoder.get_inputs()[0].shape
        self.img_size = int(shape[-1])
        self.paths = files

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) images in [0, 1] -> (B, C, h, w) embeddings."""
        array = images.detach().cpu().numpy().astype(np.float32)
        return torch.from_numpy(self.encoder.run(None, {"images": array})[0])

    def decode(
        self,
        embeddings: Tensor,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        multimask: bool | str = False,
    ) -> dict[str, Tensor]:
        """``{"masks": (B, P, M, 4h, 4w) logits, "iou": (B, P, M)}`` for point prompts (B, P, N, 2)
        or box prompts (B, P, 4) (``M = 1``)."""
        if boxes is not None:
            if points is not None or labels is not None:
                raise ProtegeError(
                    "an exported segmenter takes points or boxes in one decode, not both: decode them apart"
                )
            if multimask:
                raise ProtegeError(
                    "an exported box decoder gives SAM's single mask per box: decode boxes with multimask=False"
                )
            if self.box_decoder is None:
                raise ProtegeError(
                    f"this export has no {FILES['decoder_box']} and so takes point prompts, not boxes; "
                    "export it with boxes=True"
                )
            return self._run(self.box_decoder, embeddings, {"boxes": boxes.float()})
        if points is None or labels is None:
            raise ProtegeError("decode needs point prompts (points and labels) or boxes")
        if multimask not in (False, True):
            raise ProtegeError(
                f"an exported segmenter decodes with multimask False or True, not {multimask!r}: decode twice"
            )
        if multimask not in self.decoders:
            name = FILES["decoder_multimask" if multimask else "decoder"]
            raise ProtegeError(
                f"this export has no {name} (multimask={multimask}); export it with that decoder"
            )
        return self._run(
            self.decoders[multimask],
            embeddings,
            {"point_coords": points.float(), "point_labels": labels.long()},
        )

    @staticmethod
    def _run(sess: Any, embeddings: Tensor, prompts: dict[str, Tensor]) -> dict[str, Tensor]:
        """One graph run per image: the graphs take one image's embedding (SAM's export does too)."""
        masks, ious = [], []
        for b in range(len(embeddings)):
            feed = {"embeddings": embeddings[b : b + 1].detach().cpu().numpy().astype(np.float32)}
            feed |= {k: v[b : b + 1].detach().cpu().numpy() for k, v in prompts.items()}
            m, iou = sess.run(None, feed)
            masks.append(torch.from_numpy(m))
            ious.append(torch.from_numpy(iou))
        return {"masks": torch.cat(masks), "iou": torch.cat(ious)}

    def upscale(self, masks: Tensor) -> Tensor:
        """Low-resolution logits (..., 4h, 4w) -> (..., S, S), bilinear."""
        lead = masks.shape[:-2]
        flat = masks.reshape(1, -1, *masks.shape[-2:])  # as PromptableSegmenter.upscale: same numbers
        up = F.interpolate(flat, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return up.reshape(*lead, self.img_size, self.img_size)

    def __call__(
        self,
        images: Tensor,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        multimask: bool = False,
    ) -> dict[str, Tensor]:
        embedding = self.encode(images)
        return {**self.decode(embedding, points, labels, boxes, multimask), "embedding": embedding}
