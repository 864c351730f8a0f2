"""Segment everything in an image with a promptable segmenter: SAM's grid of point prompts, or
TinySAM's hierarchical strategy that skips the prompts an earlier, sparser round already answered.

- :func:`segment_everything`: the masks of all objects of one image. ``mode="dense"`` is SAM's
  automatic mask generator on one crop (Kirillov et al., 2023, "Segment Anything", §7.1 and
  ``segment_anything.SamAutomaticMaskGenerator``): one foreground point per cell of an n×n grid,
  three masks per point (multimask), kept when the predicted IoU and the stability score pass their
  thresholds, duplicates removed by box NMS. ``mode="hierarchical"`` is TinySAM's "hierarchical
  segment everything" (Shu et al., 2024, "TinySAM: Pushing the Envelope for Efficient Segment
  Anything Model", §3.3): a sparse grid first; the area its high-confidence masks cover is marked,
  and the dense grid's points falling inside it are not decoded (a point on an object already
  segmented with confidence would only find that object again), then both rounds' masks are merged
  by the same NMS. The image encoder runs once per image in both modes, so the saving is in the
  decoder: large objects cover most of the dense grid.
- :func:`match_masks`: how well predicted masks recover reference masks (Hungarian matching on
  mask IoU: mean IoU, recall and precision at an IoU threshold).
- :func:`save_everything` and :func:`load_image`: the files a user reads (a label map, a JSON
  record per mask, an overlay) and the letterboxed image the model takes.

The model is anything with ``img_size``, ``encode(images)``, ``decode(embeddings, points, labels,
multimask=...)`` and ``upscale(low_res_logits)`` (``protege.models.sam.PromptableSegmenter``, or
``protege.export.sam_onnx.OnnxSam`` for exported models). Points are pixel coordinates (x, y) in the
image frame, pixel (row r, column c) spanning [c, c+1) × [r, r+1).
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .errors import ProtegeError
from .files import fsync_dir, replace_dir, staged_dir, write_durable

__all__ = [
    "EverythingResult",
    "load_image",
    "match_masks",
    "save_everything",
    "segment_everything",
    "segment_file",
    "load_segmenter",
]

MODES = ("hierarchical", "dense")
#: mask logits above this are foreground (SAM's ``mask_threshold``)
MASK_THRESHOLD = 0.0


@dataclass
class EverythingResult:
    """What :func:`segment_everything` found in one image, masks ordered by score (best first).

    ``masks`` (K, S, S) bool (nothing outside ``valid_size``); ``scores`` (K,) predicted IoU;
    ``stability`` (K,) stability score; ``boxes`` (K, 4) float xyxy pixel boxes, x1/y1 exclusive;
    ``points`` (K, 2) the point prompt each mask answered; ``rounds`` (K,) 0 for the sparse round of
    the hierarchical mode, 1 for the dense grid; ``prompt_points`` (Q, 2) every point decoded, in
    order, ``prompt_rounds`` (Q,) their round; ``covered`` (S, S) bool, the area the sparse round's
    high-confidence masks cover (hierarchical mode; ``None`` for dense); ``times`` seconds spent in
    ``encode``, ``decode`` (the model's decoder and upscaling) and ``post`` (filtering, NMS)."""

    masks: Tensor
    scores: Tensor
    stability: Tensor
    boxes: Tensor
    points: Tensor
    rounds: Tensor
    prompt_points: Tensor
    prompt_rounds: Tensor
    covered: Tensor | None
    mode: str
    image_size: int
    valid_size: tuple[int, int]
    times: dict[str, float] = field(default_factory=dict)

    @property
    def prompts(self) -> int:
        """How many point prompts the decoder answered."""
        return len(self.prompt_points)

    @property
    def total_seconds(self) -> float:
        """Encoding, decoding and post-processing time together."""
        return sum(self.times.values())

    def __len__(self) -> int:
        return len(self.masks)


@dataclass
class _Candidates:
    """Masks that passed the filters of one round, with what they are kept or ordered by."""

    masks: Tensor  # (k, h, w) bool, cropped to the valid area
    scores: Tensor
    stability: Tensor
    points: Tensor
    rounds: Tensor

    @classmethod
    def cat(cls, parts: list[_Candidates], h: int, w: int) -> _Candidates:
        if not parts:
            empty = torch.zeros(0)
            return cls(torch.zeros(0, h, w, dtype=torch.bool), empty, empty, torch.zeros(0, 2), empty.long())
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in cls.__dataclass_fields__))

    def take(self, keep: Tensor) -> _Candidates:
        return _Candidates(*(getattr(self, name)[keep] for name in self.__dataclass_fields__))


def segment_everything(
    model: Any,
    image: Tensor,
    mode: str = "hierarchical",
    points_per_side: int = 16,
    sparse_per_side: int | None = None,
    batch_points: int = 64,
    pred_iou_thresh: float = 0.8,
    stability_thresh: float = 0.9,
    stability_offset: float = 1.0,
    nms_thresh: float = 0.7,
    min_area: int = 0,
    high_conf_iou: float | None = None,
    high_conf_stability: float | None = None,
    valid_size: tuple[int, int] | None = None,
    multimask: bool = True,
) -> EverythingResult:
    """All the objects of ``image`` (3, S, S) in [0, 1], ``S = model.img_size``.

    Each point prompt gets three masks (``multimask``, SAM's way; ``multimask=False``: the one
    single-mask output, for a model whose multimask outputs were never trained, e.g. a
    ``promptable_segmentation`` run without ``prompts.multimask``); a mask is kept when its predicted IoU is above
    ``pred_iou_thresh``, its stability score (the IoU of the mask thresholded at logit
    ``+stability_offset`` and at ``-stability_offset``) at least ``stability_thresh``, and its area
    at least ``min_area`` pixels (empty masks never); then box NMS at ``nms_thresh`` keeps the best
    scored of overlapping masks. ``batch_points`` prompts are decoded at once.

    ``mode="dense"``: a ``points_per_side``² grid. ``mode="hierarchical"`` (TinySAM): a
    ``sparse_per_side``² grid first (default ``points_per_side // 4``); its masks that also pass
    ``high_conf_iou`` and ``high_conf_stability`` (default: halfway from the ordinary thresholds to
    1, e.g. 0.9 and 0.95) mark the area they cover; then the ``points_per_side``² grid's points in
    that area are skipped, the others decoded. All kept masks of both rounds go through one NMS.

    ``valid_size`` (h, w): the part of ``image`` that is the picture (the rest is padding, as
    :func:`load_image` letterboxes): grids cover only it and masks stop at its edge.
    """
    if mode not in MODES:
        raise ProtegeError(f"segment_everything mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    size = int(model.img_size)
    if image.ndim != 3 or tuple(image.shape) != (3, size, size):
        raise ProtegeError(
            f"segment_everything takes one image (3, {size}, {size}) (the model's img_size), not "
            f"{tuple(image.shape)}; load files with protege.segment.load_image(path, {size})"
        )
    sparse_per_side = max(1, points_per_side // 4) if sparse_per_side is None else sparse_per_side
    counts = {
        "points_per_side": points_per_side,
        "sparse_per_side": sparse_per_side,
        "batch_points": batch_points,
    }
    for name, value in counts.items():
        if int(value) < 1:
            raise ProtegeError(f"segment_everything {name} must be at least 1, not {value}")
    h, w = (size, size) if valid_size is None else (int(valid_size[0]), int(valid_size[1]))
    if not (0 < h <= size and 0 < w <= size):
        raise ProtegeError(f"valid_size {valid_size} must lie within the image ({size}, {size})")
    hc_iou = (1 + pred_iou_thresh) / 2 if high_conf_iou is None else high_conf_iou
    hc_stab = (1 + stability_thresh) / 2 if high_conf_stability is None else high_conf_stability

    device = _device_of(model)
    times = {"encode": 0.0, "decode": 0.0, "post": 0.0}
    prompts: list[tuple[Tensor, int]] = []

    with torch.no_grad(), _eval(model):
        start = time.perf_counter()
        embedding = model.encode(image[None].to(device=device, dtype=torch.float32))
        _sync(device)
        times["encode"] = time.perf_counter() - start

        def decode_round(points: Tensor, round_: int) -> _Candidates:
            """Decode ``points`` (Q, 2) in batches; the masks that pass the filters."""
            prompts.append((points, round_))
            kept = []
            for chunk in points.split(batch_points):
                start = time.perf_counter()
                coords = chunk.to(device)[None, :, None, :]
                labels = torch.ones(coords.shape[:3], dtype=torch.long, device=device)
                out = model.decode(embedding, coords, labels, multimask=multimask)
                logits = model.upscale(out["masks"][0])  # (q, M, S, S)
                iou = out["iou"][0]
                _sync(device)
                middle = time.perf_counter()
                times["decode"] += middle - start
                thresholds = (pred_iou_thresh, stability_thresh, stability_offset, min_area)
                kept.append(_filter(logits[..., :h, :w], iou, chunk, round_, *thresholds))
                times["post"] += time.perf_counter() - middle
            return _Candidates.cat(kept, h, w)

        dense_grid = _grid(points_per_side, h, w)
        covered: Tensor | None = None
        if mode == "dense":
            found = decode_round(dense_grid, 1)
        else:
            first = decode_round(_grid(sparse_per_side, h, w), 0)
            start = time.perf_counter()
            confident = (first.scores > hc_iou) & (first.stability >= hc_stab)
            covered = (
                first.masks[confident].any(0)
                if bool(confident.any())
                else torch.zeros(h, w, dtype=torch.bool)
            )
            rows, cols = _pixels(dense_grid, h, w)
            todo = dense_grid[~covered[rows, cols]]
            times["post"] += time.perf_counter() - start
            second = decode_round(todo, 1) if len(todo) else _Candidates.cat([], h, w)
            found = _Candidates.cat([first, second], h, w)

        start = time.perf_counter()
        boxes = batched_mask_to_box(found.masks).float()  # inclusive x1/y1, as SAM's NMS takes them
        keep = batched_nms(boxes, found.scores, torch.zeros(len(boxes)), iou_threshold=nms_thresh)
        found = found.take(keep)  # by descending score
        boxes = boxes[keep] + torch.tensor([0.0, 0.0, 1.0, 1.0])
        masks = torch.zeros(len(keep), size, size, dtype=torch.bool)
        masks[:, :h, :w] = found.masks
        if covered is not None:
            covered = torch.nn.functional.pad(covered, (0, size - w, 0, size - h))
        times["post"] += time.perf_counter() - start

    return EverythingResult(
        masks=masks,
        scores=found.scores,
        stability=found.stability,
        boxes=boxes,
        points=found.points,
        rounds=found.rounds,
        prompt_points=torch.cat([p for p, _ in prompts]) if prompts else torch.zeros(0, 2),
        prompt_rounds=torch.cat([torch.full((len(p),), r, dtype=torch.long) for p, r in prompts]),
        covered=covered,
        mode=mode,
        image_size=size,
        valid_size=(h, w),
        times=times,
    )


def _filter(
    logits: Tensor,
    iou: Tensor,
    points: Tensor,
    round_: int,
    iou_thresh: float,
    stability_thresh: float,
    offset: float,
    min_area: int,
) -> _Candidates:
    """The masks of one decoded batch (``logits`` (q, M, h, w), ``iou`` (q, M)) that pass SAM's
    filters: predicted IoU above the threshold, stability score at least its threshold, area."""
    m = logits.shape[1]
    logits, iou = logits.flatten(0, 1).float(), iou.flatten(0, 1).float()
    pts = points.repeat_interleave(m, dim=0)
    keep = iou > iou_thresh
    logits, iou, pts = logits[keep], iou[keep], pts[keep]
    stability = calculate_stability_score(logits, MASK_THRESHOLD, offset)
    keep = stability >= stability_thresh  # NaN (an empty mask at -offset) fails
    masks = logits[keep] > MASK_THRESHOLD
    iou, stability, pts = iou[keep], stability[keep], pts[keep]
    keep = masks.flatten(1).sum(1) >= max(1, min_area)
    return _Candidates(
        masks[keep].cpu(),
        iou[keep].cpu(),
        stability[keep].cpu(),
        pts[keep].cpu(),
        torch.full((int(keep.sum()),), round_, dtype=torch.long),
    )


def _grid(n: int, h: int, w: int) -> Tensor:
    """SAM's n×n point grid over an h×w image, as (n², 2) pixel (x, y): the points
    ``SamAutomaticMaskGenerator`` prompts. SAM reads coordinates as pixel indices and its prompt
    encoder adds 0.5 (the pixel's centre); in this frame a pixel's centre is already at +0.5, so the
    grid is shifted by 0.5 here (the model's ``decode`` takes the shift back before SAM adds it)."""
    return torch.from_numpy(build_point_grid(n) * np.array([[w, h]]) + 0.5).float()


def _pixels(points: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """The (row, column) of the pixel each point (x, y) lies in."""
    cols = points[:, 0].floor().long().clamp(0, w - 1)
    rows = points[:, 1].floor().long().clamp(0, h - 1)
    return rows, cols


def _device_of(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _eval(model: Any) -> Iterator[None]:
    """``model`` in eval mode for the block (a module in training mode is put back in it)."""
    training = isinstance(model, nn.Module) and model.training
    if training:
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()


# -- evaluation ---------------------------------------------------------------------------------


def match_masks(pred: Tensor, ref: Tensor, iou: float = 0.5) -> dict[str, Any]:
    """How well the masks ``pred`` (K, H, W) bool recover the reference masks ``ref`` (R, H, W).

    One-to-one Hungarian matching (``scipy.optimize.linear_sum_assignment``) maximizing the total
    mask IoU. Returns ``miou``: the mean over reference masks of their matched IoU (an unmatched
    reference counts 0); ``recall``: the fraction of reference masks matched with IoU ≥ ``iou``;
    ``precision``: the fraction of predicted masks matched with IoU ≥ ``iou``; ``matched_iou``: each
    reference mask's IoU; ``pairs``: (pred index, ref index, IoU) of the matching; ``n_pred``,
    ``n_ref``. With no reference masks ``miou`` and ``recall`` are NaN, with no predictions
    ``precision`` is.
    """
    from scipy.optimize import linear_sum_assignment

    if pred.ndim != 3 or ref.ndim != 3 or pred.shape[1:] != ref.shape[1:]:
        raise ProtegeError(
            f"match_masks takes two stacks of masks of the same size, (K, H, W) and (R, H, W); got "
            f"{tuple(pred.shape)} and {tuple(ref.shape)}"
        )
    k, r = len(pred), len(ref)
    p = pred.flatten(1).to(torch.float64)
    q = ref.flatten(1).to(torch.float64)
    inter = p @ q.T
    union = p.sum(1)[:, None] + q.sum(1)[None, :] - inter
    ious = (inter / union.clamp(min=1)).cpu().numpy()
    matched = np.zeros(r)
    pairs: list[tuple[int, int, float]] = []
    if k and r:
        rows, cols = linear_sum_assignment(ious, maximize=True)
        matched[cols] = ious[rows, cols]
        pairs = [(int(i), int(j), float(ious[i, j])) for i, j in zip(rows, cols)]
    hits = int((matched >= iou).sum())
    return {
        "miou": float(matched.mean()) if r else math.nan,
        "recall": hits / r if r else math.nan,
        "precision": hits / k if k else math.nan,
        "matched_iou": matched.tolist(),
        "pairs": pairs,
        "n_pred": k,
        "n_ref": r,
    }


# -- files --------------------------------------------------------------------------------------


def label_map(masks: Tensor) -> np.ndarray:
    """The (H, W) instance label map of masks ordered best first: pixel = 1 + the index of the first
    mask covering it (a later, lower-scored mask never overwrites an earlier one), 0 = none; uint8
    for up to 255 masks, else uint16."""
    if len(masks) > 65535:
        raise ProtegeError(f"{len(masks)} masks do not fit a 16-bit label map (at most 65535)")
    dtype = np.uint8 if len(masks) <= 255 else np.uint16
    labels = np.zeros(masks.shape[-2:], dtype=dtype)
    for i, mask in enumerate(masks.cpu().numpy()):
        labels[mask & (labels == 0)] = i + 1
    return labels


def save_everything(
    result: EverythingResult, image: Tensor, out_dir: str | Path, overwrite: bool = False
) -> dict[str, Path]:
    """Write what :func:`segment_everything` found in ``image`` to ``out_dir``, cropped to the valid
    area: ``masks.png`` (the instance label map, 8-bit, or 16-bit beyond 255 masks: label i is
    ``masks.json``'s mask i), ``masks.json`` (per mask: label, score, stability, box, area, visible
    area in the label map, point, round; and the run's mode, prompt count, times), ``overlay.png``
    (the image under translucent coloured masks with their outlines). The directory is assembled
    beside ``out_dir`` and renamed into place; a non-empty ``out_dir`` is refused unless
    ``overwrite``."""
    from PIL import Image

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ProtegeError(f"{out} is a file; give save_everything a directory to write into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ProtegeError(f"{out} is not empty; choose another directory or pass overwrite=True")
    h, w = result.valid_size
    labels = label_map(result.masks[:, :h, :w])
    picture = (image[:, :h, :w].detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    picture = picture.permute(1, 2, 0).numpy()
    visible = np.bincount(labels.ravel(), minlength=len(result) + 1)[1:]
    record = {
        "mode": result.mode,
        "image_size": result.image_size,
        "valid_size": [h, w],
        "prompts": result.prompts,
        "times": result.times,
        "masks": [
            {
                "label": i + 1,
                "score": float(result.scores[i]),
                "stability": float(result.stability[i]),
                "box": [float(v) for v in result.boxes[i]],
                "area": int(result.masks[i].sum()),
                "visible_area": int(visible[i]),
                "point": [float(v) for v in result.points[i]],
                "round": int(result.rounds[i]),
            }
            for i in range(len(result))
        ],
    }
    files = {
        "masks.png": _png(Image.fromarray(labels)),
        "masks.json": json.dumps(record, indent=2).encode(),
        "overlay.png": _png(Image.fromarray(overlay(picture, labels))),
    }
    with staged_dir(out) as tmp:
        for name, data in files.items():
            write_durable(tmp / name, data)
        fsync_dir(tmp)
        replace_dir(tmp, out)
    return {"labels": out / "masks.png", "json": out / "masks.json", "overlay": out / "overlay.png"}


def overlay(picture: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``picture`` (H, W, 3) uint8 with each label's pixels tinted by its colour (opacity ``alpha``)
    and its outline (pixels with a 4-neighbour of another label) in the full colour."""
    n = int(labels.max())
    colours = np.zeros((n + 1, 3))
    for i in range(1, n + 1):  # golden-ratio hues: neighbouring labels far apart
        colours[i] = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    colours *= 255
    out = picture.astype(np.float64)
    inside = labels > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[labels[inside]]
    edge = np.zeros_like(inside)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge &= inside
    out[edge] = colours[labels[edge]]
    return out.round().clip(0, 255).astype(np.uint8)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


#: the PIL modes :func:`load_image` reads (greyscale and RGBA are converted to RGB)
IMAGE_MODES = ("RGB", "L", "RGBA")


def segment_file(
    model: Any,
    image_path: str | Path,
    out_dir: str | Path,
    mode: str = "hierarchical",
    points_per_side: int = 16,
    multimask: bool = True,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Segment everything in the image file ``image_path`` and write the result to ``out_dir``.

    :func:`load_image` (letterboxed to ``model.img_size``), :func:`segment_everything` (``mode``,
    ``points_per_side``, ``multimask`` and any of its other ``options``), :func:`save_everything`.
    ``out_dir`` is checked before the model runs, so a refused directory costs nothing. Returns
    ``{"masks", "prompts", "seconds", "times", "files"}``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ProtegeError(f"{out} is a file; give a directory to write the masks into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ProtegeError(f"{out} is not empty; choose another directory or pass overwrite")
    image, valid = load_image(image_path, int(model.img_size))
    start = time.perf_counter()
    result = segment_everything(
        model,
        image,
        mode=mode,
        points_per_side=points_per_side,
        multimask=multimask,
        valid_size=valid,
        **options,
    )
    seconds = time.perf_counter() - start
    files = save_everything(result, image, out, overwrite=overwrite)
    return {
        "masks": len(result),
        "prompts": result.prompts,
        "seconds": seconds,
        "times": result.times,
        "files": files,
    }


def load_segmenter(run_dir: str | Path, model: str = "student", checkpoint: str = "best") -> nn.Module:
    """A finished ``promptable_segmentation`` run's student (its ``checkpoint``: best or last) or
    its first teacher (``model="teacher"``), in eval mode."""
    from .pipeline import load_run

    if model not in ("student", "teacher"):
        raise ProtegeError(f"the model to segment with is student or teacher, not {model!r}")
    if checkpoint not in ("best", "last"):
        raise ProtegeError(f"the checkpoint is best or last, not {checkpoint!r}")
    run = load_run(run_dir, checkpoint)  # type: ignore[arg-type]
    if run.task.name != "promptable_segmentation":
        raise ProtegeError(
            f"{run_dir} is a {run.task.name!r} run; segmenting an image needs a promptable_segmentation run"
        )
    if model == "teacher":
        if not run.teachers:
            raise ProtegeError(f"{run_dir} has no teacher; segment with its student")
        return run.teachers[0].eval()
    return run.student.eval()


def load_image(path: str | Path, size: int) -> tuple[Tensor, tuple[int, int]]:
    """The image at ``path`` as the model takes it, and the size of its picture: a (3, size, size)
    float tensor in [0, 1], resized so its longest side is ``size`` (SAM's ``ResizeLongestSide``)
    and zero-padded at the bottom and right, and the valid (h, w) (pass it to
    :func:`segment_everything` as ``valid_size``; outputs are cropped back to it)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ProtegeError(f"{path}: no such image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            img = opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ProtegeError(f"{path} is not an image PIL can read ({type(e).__name__}: {e})") from None
    if img.mode not in IMAGE_MODES:
        raise ProtegeError(
            f"{path} has pixel mode {img.mode!r}; load_image reads {', '.join(IMAGE_MODES)} images. "
            "Convert it to 8-bit RGB first"
        )
    img = img.convert("RGB")
    h, w = ResizeLongestSide.get_preprocess_shape(img.height, img.width, size)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    out = torch.zeros(3, size, size)
    out[:, :h, :w] = pixels
    return out, (h, w)
