"""Segment Anything (SAM) teachers and SAM-style students for promptable segmentation.

SAM (Kirillov et al., 2023, "Segment Anything") is an image encoder (a ViT with windowed and
global attention and a conv neck to a ``C x S/16 x S/16`` embedding), a prompt encoder (random
Fourier position features of points and box corners) and a light two-way-transformer mask decoder
that turns prompt tokens into low-resolution mask logits and IoU predictions. TinySAM (Shu et
al., 2023) distills it into a much cheaper image encoder that feeds the same decoder; the students
built here follow that design: a light encoder plus SAM's neck reaching the teacher's embedding
grid, and a copy of the teacher's prompt encoder and mask decoder.

Everything is built from ``segment_anything``'s own classes, so official checkpoints
(``sam_vit_b_01ec64.pth``, ...) load into :func:`build_sam` unchanged. Two things differ from
``segment_anything.modeling.Sam``:

- :class:`BatchedMaskDecoder` decodes ``P`` prompts for each of ``B`` images in one call (SAM's
  decoder repeats the embedding of ONE image for all prompts; ``Sam.forward`` loops over images);
- :class:`PromptableSegmenter` takes tensors, not lists of dicts: images ``(B, 3, S, S)`` in
  ``[0, 1]`` (no resizing: images are already ``S x S``), points ``(B, P, N, 2)`` with labels
  ``(B, P, N)``, boxes ``(B, P, 4)``, and validates them.

Coordinates (the interface shared with :mod:`protege.data.segmentation`): pixel ``(row r, col c)``
covers ``[c, c + 1) x [r, r + 1)`` and its centre is the point ``(c + 0.5, r + 0.5)``; a box is
``(x0, y0, x1, y1)`` with exclusive ``x1, y1`` (a tight box of a mask ends one past its last
pixel). SAM's prompt encoder instead takes integer pixel indices and adds 0.5 itself, and SAM's
boxes are inclusive (``batched_mask_to_box``), so :meth:`PromptableSegmenter.decode` passes
``points - 0.5`` and ``(x0, y0, x1 - 1, y1 - 1)``: the encoder then sees exactly what SAM sees for
the same pixels, and a point at a pixel centre gets the position code of that pixel's centre.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ProtegeError, unknown
from . import _read_state_dict, _strip_prefixes, diff_lines, key_diff

__all__ = [
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "SAM_VARIANTS",
    "BatchedMaskDecoder",
    "ConvEncoder",
    "PromptableSegmenter",
    "build_sam",
    "sam_student",
    "sam_variant_of",
]

#: SAM's normalisation, on the 0..255 scale (``Sam.pixel_mean`` / ``Sam.pixel_std``)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

_SAM_COMMON: dict[str, Any] = {
    "img_size": 1024,
    "patch_size": 16,
    "window_size": 14,
    "embed_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp": 2048,
    "decoder_heads": 8,
}

#: the configuration of every variant :func:`build_sam` knows (``segment_anything.build_sam``'s
#: for the official three); each key is also an override
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {
        **_SAM_COMMON,
        "encoder_dim": 768,
        "depth": 12,
        "heads": 12,
        "global_attn_indexes": (2, 5, 8, 11),
    },
    "vit_l": {
        **_SAM_COMMON,
        "encoder_dim": 1024,
        "depth": 24,
        "heads": 16,
        "global_attn_indexes": (5, 11, 17, 23),
    },
    "vit_h": {
        **_SAM_COMMON,
        "encoder_dim": 1280,
        "depth": 32,
        "heads": 16,
        "global_attn_indexes": (7, 15, 23, 31),
    },
    "tiny": {
        "img_size": 128,
        "patch_size": 8,
        "encoder_dim": 96,
        "depth": 4,
        "heads": 3,
        "window_size": 8,
        "global_attn_indexes": None,  # None: the last block
        "embed_dim": 64,
        "decoder_depth": 2,
        "decoder_mlp": 256,
        "decoder_heads": 4,
    },
}
_OFFICIAL = {cfg["encoder_dim"]: name for name, cfg in SAM_VARIANTS.items() if name != "tiny"}
_MASK_IN_CHANS = 16  # SAM's mask-prompt downscaling width (mask prompts are not used here)


# --------------------------------------------------------------------------- the decoder


class BatchedMaskDecoder(MaskDecoder):
    """SAM's mask decoder for ``P`` prompts on each of ``B`` images in one call.

    ``MaskDecoder.predict_masks`` repeats the embedding of one image for every prompt, so it is
    only right for a batch of one image; here image embeddings ``(B, C, h, w)`` go with sparse
    prompt embeddings ``(B * P, T, C)`` grouped by image (image ``b`` owns rows ``b*P ... b*P+P-1``)
    and each image's embedding is repeated ``P`` times. The modules, and so the state-dict keys, are
    exactly ``MaskDecoder``'s: official checkpoints load. With ``B = 1`` it computes what
    ``MaskDecoder`` computes.
    """

    def forward(  # type: ignore[override]
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """``MaskDecoder.forward``'s contract, batched: ``(masks (B*P, M, 4h, 4w), iou (B*P, M))``."""
        masks, iou, _ = self.predict(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
        )
        return masks, iou

    def predict(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool | str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Masks, IoU predictions and output tokens for ``B * P`` prompts.

        Args:
            image_embeddings: ``(B, C, h, w)``.
            image_pe: ``(1, C, h, w)`` (the prompt encoder's dense positional code) or ``(B, C, h, w)``.
            sparse_prompt_embeddings: ``(B * P, T, C)``, grouped by image.
            dense_prompt_embeddings: ``(B * P, C, h, w)``.
            multimask_output: SAM's convention: ``True`` returns mask tokens 1..3 (``M = 3``),
                ``False`` mask token 0 (``M = 1``); ``"all"``: all four, token 0 first (``M = 4``:
                the decoder computes them all anyway, so training both outputs costs one pass).

        Returns:
            ``(masks (B*P, M, 4h, 4w) logits, iou (B*P, M), tokens (B*P, 1 + num_mask_tokens, C))``;
            ``tokens`` are the decoder's output IoU token and all its mask tokens.
        """
        masks, iou, tokens = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        if multimask_output not in (True, False, "all"):
            raise ValueError(f"multimask_output is True, False or 'all', not {multimask_output!r}")
        keep = slice(None) if multimask_output == "all" else slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep], tokens

    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """All ``num_mask_tokens`` masks, their IoU predictions and the output tokens (see :meth:`predict`)."""
        images, prompts = image_embeddings.shape[0], sparse_prompt_embeddings.shape[0]
        if images == 0 or prompts % images:
            raise ValueError(f"{prompts} prompt rows cannot be split evenly among {images} image embeddings")
        per_image = prompts // images
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(prompts, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        src = torch.repeat_interleave(image_embeddings, per_image, dim=0) + dense_prompt_embeddings
        if image_pe.shape[0] == 1:
            pos_src = image_pe.expand(prompts, -1, -1, -1)
        else:
            pos_src = torch.repeat_interleave(image_pe, per_image, dim=0)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        out_tokens = hs[:, : 1 + self.num_mask_tokens, :]
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred, out_tokens


def _prompt_modules(
    embed_dim: int,
    grid: int,
    img_size: int,
    decoder_depth: int,
    decoder_mlp: int,
    decoder_heads: int,
    mask_in_chans: int = _MASK_IN_CHANS,
    iou_hidden: int | None = None,
) -> tuple[PromptEncoder, BatchedMaskDecoder]:
    """SAM's prompt encoder and mask decoder (``segment_anything.build_sam._build_sam``'s design)."""
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = BatchedMaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=decoder_depth, embedding_dim=embed_dim, mlp_dim=decoder_mlp, num_heads=decoder_heads
        ),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_hidden or embed_dim,
    )
    return prompt_encoder, mask_decoder


# --------------------------------------------------------------------------- the model


class PromptableSegmenter(nn.Module):
    """An image encoder, SAM's prompt encoder and a :class:`BatchedMaskDecoder`.

    The state-dict keys are those of ``segment_anything.modeling.Sam`` (``image_encoder.*``,
    ``prompt_encoder.*``, ``mask_decoder.*``; the pixel statistics are not saved), so a SAM
    checkpoint loads into a model of the same configuration.

    Args:
        image_encoder: maps normalised images ``(B, 3, S, S)`` to ``(B, C, h, w)`` with ``h, w``
            the prompt encoder's ``image_embedding_size``.
        prompt_encoder: SAM's ``PromptEncoder`` with ``input_image_size == (S, S)``.
        mask_decoder: the decoder.
        img_size: ``S``.
        pixel_mean, pixel_std: normalisation on the 0..255 scale (SAM's by default).
        config: how the model was built (recorded as ``self.config``; used in error messages).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: BatchedMaskDecoder,
        img_size: int,
        pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
        pixel_std: Sequence[float] = SAM_PIXEL_STD,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(mask_decoder, BatchedMaskDecoder):
            raise TypeError("mask_decoder must be a BatchedMaskDecoder (SAM's MaskDecoder decodes one image)")
        if tuple(prompt_encoder.input_image_size) != (img_size, img_size):
            raise ValueError(
                f"prompt encoder frame {tuple(prompt_encoder.input_image_size)} is not the image size {img_size}"
            )
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = int(img_size)
        self.embed_dim = int(prompt_encoder.embed_dim)
        self.config: dict[str, Any] = dict(config or {})
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the image embedding."""
        h, w = self.prompt_encoder.image_embedding_size
        return int(h), int(w)

    def _check_images(self, images: Tensor) -> None:
        s = self.img_size
        expected = f"(B, 3, {s}, {s}) float images in [0, 1]"
        if not isinstance(images, Tensor):
            raise ProtegeError(f"images must be a tensor {expected}, got {type(images).__name__}")
        shape = tuple(images.shape)
        if images.ndim != 4:
            hint = ": add the batch dimension (images[None])" if images.ndim == 3 else ""
            raise ProtegeError(f"images have shape {shape}; expected {expected}{hint}")
        if shape[1] != 3:
            raise ProtegeError(
                f"images have {shape[1]} channels (shape {shape}); SAM models take 3 (RGB) channels: "
                "repeat a grey channel 3 times, drop an alpha channel"
            )
        if shape[2:] != (s, s):
            raise ProtegeError(
                f"images have shape {shape}; this model expects {expected} (img_size {s}): "
                f"resize the longest side to {s} and zero-pad to {s}x{s} (SAM's ResizeLongestSide)"
            )
        if not images.is_floating_point():
            raise ProtegeError(f"images have dtype {images.dtype}; expected floats in [0, 1] (divide by 255)")

    def encode(self, images: Tensor) -> Tensor:
        """Image embeddings ``(B, C, h, w)`` of images ``(B, 3, S, S)`` in ``[0, 1]`` (normalised here,
        with SAM's statistics on the 0..255 scale, exactly as ``Sam.preprocess``)."""
        self._check_images(images)
        x = (images * 255.0 - self.pixel_mean) / self.pixel_std
        embeddings = self.image_encoder(x)
        expected = (images.shape[0], self.embed_dim, *self.grid)
        if tuple(embeddings.shape) != expected:
            raise ProtegeError(
                f"the image encoder returned {tuple(embeddings.shape)}, the decoder expects {expected}: "
                "the encoder's output width or stride does not fit the prompt encoder"
            )
        return embeddings

    def _check_prompts(
        self, embeddings: Tensor, points: Tensor | None, labels: Tensor | None, boxes: Tensor | None
    ) -> tuple[int, int, int]:
        """``(B, P, N)`` of valid prompts (``N = 0`` without points); one device sync for all values."""
        expected = (self.embed_dim, *self.grid)
        if (
            not isinstance(embeddings, Tensor)
            or embeddings.ndim != 4
            or tuple(embeddings.shape[1:]) != expected
        ):
            got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ProtegeError(f"embeddings have shape {got}; expected (B, {', '.join(map(str, expected))})")
        b = embeddings.shape[0]
        if points is None and boxes is None:
            raise ProtegeError("no prompt: give points (with labels) or boxes, or both")
        if (points is None) != (labels is None):
            raise ProtegeError(
                "points and labels go together: labels (B, P, N) say 1 foreground, 0 background, -1 padding"
            )
        p = n = None
        bad_points = bad_boxes = None
        if points is not None and labels is not None:
            if points.ndim != 4 or points.shape[-1] != 2:
                raise ProtegeError(
                    f"points have shape {tuple(points.shape)}; expected (B, P, N, 2) (x, y) pixels"
                )
            b_pts, p, n = points.shape[:3]
            if tuple(labels.shape) != (b_pts, p, n):
                raise ProtegeError(
                    f"labels have shape {tuple(labels.shape)}; expected {(b_pts, p, n)}, one per point "
                    f"(points have shape {tuple(points.shape)})"
                )
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise ProtegeError(
                    f"labels have dtype {labels.dtype}; expected integers: 1 foreground, 0 background, -1 padding"
                )
            if b_pts != b:
                raise ProtegeError(f"points are for {b_pts} images, embeddings for {b}")
            inside = ((points >= 0) & (points <= self.img_size)).all(-1)
            labels_ok = (labels >= -1) & (labels <= 1)
            bad_points = ~((inside | (labels == -1)) & labels_ok)
        if boxes is not None:
            if boxes.ndim != 3 or boxes.shape[-1] != 4:
                raise ProtegeError(f"boxes have shape {tuple(boxes.shape)}; expected (B, P, 4) xyxy pixels")
            if boxes.shape[0] != b:
                raise ProtegeError(f"boxes are for {boxes.shape[0]} images, embeddings for {b}")
            if p is not None and boxes.shape[1] != p:
                raise ProtegeError(
                    f"boxes have {boxes.shape[1]} prompts per image, points {p}: points and boxes of the same "
                    "prompt go together, so P must be equal"
                )
            p = boxes.shape[1]
            bad_boxes = ~((boxes >= 0) & (boxes <= self.img_size)).all(-1)
        assert p is not None
        if p == 0:
            raise ProtegeError("empty prompt list (P = 0): give at least one prompt per image")
        if n == 0 and boxes is None:
            raise ProtegeError(
                "points have N = 0 points per prompt and there are no boxes: nothing to segment"
            )
        flags = [t.any() for t in (bad_points, bad_boxes) if t is not None and t.numel()]
        # the value check is skipped while a graph is traced for export (torch.export / ONNX): a
        # data-dependent branch cannot be traced, and a graph is not where a user's mistake surfaces
        tracing = torch.compiler.is_exporting() or torch.jit.is_tracing()
        if flags and not tracing and bool(torch.stack(flags).any()):  # the only device sync of the check
            self._report(points, labels, bad_points, boxes, bad_boxes)
        return b, p, n or 0

    def _report(
        self,
        points: Tensor | None,
        labels: Tensor | None,
        bad_points: Tensor | None,
        boxes: Tensor | None,
        bad_boxes: Tensor | None,
    ) -> None:
        """Raise for the first invalid point (or label), else the first invalid box."""
        if points is not None and labels is not None and bad_points is not None and bool(bad_points.any()):
            i, j, k = bad_points.nonzero()[0].tolist()
            label = int(labels[i, j, k])
            if label not in (-1, 0, 1):
                raise ProtegeError(
                    f"label {label} of image {i}, prompt {j}, point {k}: labels are 1 foreground, "
                    "0 background, -1 padding"
                )
            raise ProtegeError(
                f"point {points[i, j, k].tolist()} of image {i}, prompt {j}, point {k} is outside the image "
                f"[0, {self.img_size}] (x, y pixel coordinates, a pixel's centre at +0.5); label padding "
                "points -1"
            )
        if boxes is not None and bad_boxes is not None:
            i, j = bad_boxes.nonzero()[0].tolist()
            raise ProtegeError(
                f"box {boxes[i, j].tolist()} of image {i}, prompt {j} is outside the image "
                f"[0, {self.img_size}]; clip boxes to the image"
            )

    def decode(
        self,
        embeddings: Tensor,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        multimask: bool | str = False,
    ) -> dict[str, Tensor]:
        """Mask logits for ``P`` prompts on each of ``B`` image embeddings.

        Args:
            embeddings: ``(B, C, h, w)`` from :meth:`encode` (or a student's encoder).
            points: ``(B, P, N, 2)`` pixel coordinates ``(x, y)`` in ``[0, S]``.
            labels: ``(B, P, N)`` integers: 1 foreground, 0 background, -1 padding (ignored point).
            boxes: ``(B, P, 4)`` ``(x0, y0, x1, y1)``, ``x1, y1`` exclusive; with points, prompt ``p``
                is points ``p`` and box ``p`` together.
            multimask: three masks per prompt (SAM's ambiguity-aware output) instead of one;
                ``"all"``: the single-mask output and the three, in that order (``M = 4``).

        Returns:
            ``{"masks": (B, P, M, 4h, 4w) logits (> 0 is foreground), "iou": (B, P, M) predicted IoU,
            "tokens": (B, P, 1 + num_mask_tokens, C) the decoder's output tokens}``, ``M = 3`` with
            ``multimask``, 4 with ``"all"``, else 1.

        Raises:
            ProtegeError: no prompt, ``P = 0``, shapes that do not fit, a point or box outside the
                image, a label not in {-1, 0, 1}.
        """
        b, p, n = self._check_prompts(embeddings, points, labels, boxes)
        device = embeddings.device
        point_input = None
        if points is not None and labels is not None and n:
            coords = points.to(device=device, dtype=torch.float32).reshape(b * p, n, 2) - 0.5
            point_input = (coords, labels.to(device).reshape(b * p, n))
        box_input = None
        if boxes is not None:
            inclusive = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
            box_input = boxes.to(device=device, dtype=torch.float32).reshape(b * p, 4) - inclusive
        sparse, dense = self.prompt_encoder(points=point_input, boxes=box_input, masks=None)
        masks, iou, tokens = self.mask_decoder.predict(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(embeddings.dtype),
            dense_prompt_embeddings=dense.to(embeddings.dtype),
            multimask_output=multimask,
        )
        return {
            "masks": masks.reshape(b, p, *masks.shape[1:]),
            "iou": iou.reshape(b, p, -1),
            "tokens": tokens.reshape(b, p, *tokens.shape[1:]),
        }

    def forward(
        self,
        images: Tensor,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        multimask: bool = False,
    ) -> dict[str, Tensor]:
        """:meth:`encode` then :meth:`decode`; the result also holds ``"embedding"`` ``(B, C, h, w)``."""
        embedding = self.encode(images)
        out = self.decode(embedding, points, labels, boxes, multimask)
        out["embedding"] = embedding
        return out

    def upscale(self, masks: Tensor) -> Tensor:
        """Low-resolution logits ``(..., 4h, 4w)`` bilinearly resized to ``(..., S, S)`` (SAM's
        ``postprocess_masks`` for an unpadded ``S x S`` image)."""
        lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
        flat = masks.reshape(1, -1, h, w)
        up = F.interpolate(flat, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return up.reshape(*lead, self.img_size, self.img_size)


# --------------------------------------------------------------------------- teachers


def _positive(config: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProtegeError(f"SAM option {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _resolve(variant: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(variant, str) or variant.lower() not in SAM_VARIANTS:
        raise unknown("SAM variant", str(variant), SAM_VARIANTS)
    base = SAM_VARIANTS[variant.lower()]
    extra = set(overrides) - set(base)
    if extra:
        raise ProtegeError(
            f"unknown SAM option(s) {sorted(extra)}; the options are {', '.join(sorted(base))}"
        )
    config = {**base, **overrides}
    for key in (
        "img_size",
        "patch_size",
        "encoder_dim",
        "depth",
        "heads",
        "embed_dim",
        "decoder_depth",
        "decoder_mlp",
        "decoder_heads",
    ):
        _positive(config, key)
    _positive(config, "window_size", 0)
    if config["global_attn_indexes"] is None:
        config["global_attn_indexes"] = (config["depth"] - 1,)
    try:
        indexes = tuple(int(i) for i in config["global_attn_indexes"])
    except (TypeError, ValueError):
        raise ProtegeError(
            f"global_attn_indexes must be a list of block indexes, got {config['global_attn_indexes']!r}"
        ) from None
    if any(not 0 <= i < config["depth"] for i in indexes):
        raise ProtegeError(f"global_attn_indexes {list(indexes)} must lie in [0, depth={config['depth']})")
    config["global_attn_indexes"] = indexes
    if config["img_size"] % config["patch_size"]:
        raise ProtegeError(
            f"img_size {config['img_size']} must be a multiple of patch_size {config['patch_size']}"
        )
    if config["encoder_dim"] % config["heads"]:
        raise ProtegeError(
            f"encoder_dim {config['encoder_dim']} must be a multiple of heads {config['heads']}"
        )
    # the decoder upscales to embed_dim // 8 channels; its cross-attention works at embed_dim // 2
    if config["embed_dim"] % 8 or (config["embed_dim"] // 2) % config["decoder_heads"]:
        raise ProtegeError(
            f"embed_dim {config['embed_dim']} must be a multiple of 8 and embed_dim // 2 a multiple of "
            f"decoder_heads {config['decoder_heads']}"
        )
    return {"variant": variant.lower(), **config}


def build_sam(
    variant: str = "tiny", checkpoint: str | os.PathLike[str] | None = None, **overrides: Any
) -> PromptableSegmenter:
    """A SAM of one of :data:`SAM_VARIANTS`, optionally loaded from a local checkpoint.

    ``vit_b``, ``vit_l``, ``vit_h`` are the official configurations of ``segment_anything.build_sam``
    (ViT widths 768/1024/1280, depths 12/24/32, heads 12/16/16, 1024-pixel images, 16-pixel patches,
    14x14 windows, 256-wide prompts, a 2-layer two-way transformer of MLP width 2048 and 8 heads).
    ``tiny`` is the same design at 128 pixels: patch 8 (a 16x16 grid), width 96, depth 4, 3 heads,
    8x8 windows, global attention in the last block, prompt width 64, decoder MLP 256 and 4 heads.

    Args:
        variant: ``"tiny"``, ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``.
        checkpoint: a state dict: an official ``.pth`` (read with ``torch.load(weights_only=True)``,
            never unpickled further) or ``.safetensors``; keys as ``Sam.state_dict()``.
        **overrides: ``img_size, patch_size, encoder_dim, depth, heads, window_size,
            global_attn_indexes, embed_dim, decoder_depth, decoder_mlp, decoder_heads``.

    Returns:
        The model (training mode; the ViT has no dropout or batch norm).

    Raises:
        ProtegeError: unknown variant or option, invalid option values, an unreadable checkpoint
            or one of another configuration (naming the variant and options it was saved with).
    """
    config = _resolve(variant, overrides)
    img, patch, embed = config["img_size"], config["patch_size"], config["embed_dim"]
    encoder = ImageEncoderViT(
        depth=config["depth"],
        embed_dim=config["encoder_dim"],
        img_size=img,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=config["heads"],
        patch_size=patch,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config["global_attn_indexes"],
        window_size=config["window_size"],
        out_chans=embed,
    )
    prompt_encoder, mask_decoder = _prompt_modules(
        embed, img // patch, img, config["decoder_depth"], config["decoder_mlp"], config["decoder_heads"]
    )
    model = PromptableSegmenter(encoder, prompt_encoder, mask_decoder, img, config=config)
    if checkpoint is not None:
        _load_checkpoint(model, Path(checkpoint).expanduser())
    return model


def _block_indexes(state_dict: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def _vit_config_of(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The :func:`build_sam` options a ViT SAM state dict was saved with, as far as shapes tell
    (attention heads of the decoder leave no trace in shapes)."""
    config: dict[str, Any] = {}
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is not None:
        config["encoder_dim"], config["patch_size"] = int(patch.shape[0]), int(patch.shape[-1])
    pos = state_dict.get("image_encoder.pos_embed")
    grid = int(pos.shape[1]) if pos is not None else None
    if grid is not None and "patch_size" in config:
        config["img_size"] = grid * config["patch_size"]
    blocks = _block_indexes(state_dict, "image_encoder.blocks.")
    if blocks:
        config["depth"] = len(blocks)
        rel = [state_dict.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in blocks]
        if all(r is not None for r in rel):
            head_dim = int(rel[0].shape[1])  # type: ignore[union-attr]
            if "encoder_dim" in config and head_dim and config["encoder_dim"] % head_dim == 0:
                config["heads"] = config["encoder_dim"] // head_dim
            sizes = [(int(r.shape[0]) + 1) // 2 for r in rel]  # type: ignore[union-attr]
            windows = {s for s in sizes if s != grid}
            if len(windows) == 1:
                config["window_size"] = windows.pop()
                config["global_attn_indexes"] = tuple(i for i, s in zip(blocks, sizes) if s == grid)
    token = state_dict.get("mask_decoder.iou_token.weight")
    if token is not None:
        config["embed_dim"] = int(token.shape[1])
    layers = _block_indexes(state_dict, "mask_decoder.transformer.layers.")
    if layers:
        config["decoder_depth"] = len(layers)
        lin1 = state_dict.get("mask_decoder.transformer.layers.0.mlp.lin1.weight")
        if lin1 is not None:
            config["decoder_mlp"] = int(lin1.shape[0])
    return config


def sam_variant_of(state_dict: Mapping[str, Tensor]) -> str:
    """Which :func:`build_sam` variant a SAM state dict is: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``
    (the official encoder width AND depth), ``"tiny"`` (any other ViT SAM) or ``"custom"`` (a SAM
    prompt encoder and mask decoder behind another image encoder, e.g. a student).

    Raises:
        ProtegeError: the state dict has no SAM mask decoder.
    """
    if "mask_decoder.iou_token.weight" not in state_dict:
        raise ProtegeError("not a SAM state dict: it has no mask_decoder.iou_token.weight")
    config = _vit_config_of(state_dict)
    if "encoder_dim" not in config:
        return "custom"
    name = _OFFICIAL.get(config["encoder_dim"])
    if name is not None and config.get("depth") == SAM_VARIANTS[name]["depth"]:
        return name
    return "tiny"


def _mismatch_message(
    path: Path,
    model: PromptableSegmenter,
    state_dict: Mapping[str, Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    chosen = model.config.get("variant", "tiny")
    try:
        found = sam_variant_of(state_dict)
    except ProtegeError:
        found = None
    if found in SAM_VARIANTS:
        saved = _vit_config_of(state_dict)
        width = saved["encoder_dim"]
        head = f"checkpoint {path} is a {found} SAM (encoder width {width}); you chose {chosen}"
        if found != "tiny" and found != chosen:
            return f"{head} — use variant: {found}"
        differ = {k: v for k, v in saved.items() if model.config.get(k) != v}
        if differ:
            mine = model.config.get("encoder_dim")
            if found != chosen:
                head += " — use variant: tiny with"
            else:
                head += f" with encoder width {mine}" if mine != width else ""
                head += " — pass"
            options = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in differ.items())
            return f"{head} {options}"
    lines = [f"checkpoint {path} does not fit this {chosen} SAM:"]
    lines += diff_lines(state_dict, model.state_dict(), missing, unexpected, mismatched)
    return "\n".join(lines)


def _load_checkpoint(model: PromptableSegmenter, path: Path) -> None:
    if not path.exists():
        raise ProtegeError(f"SAM checkpoint not found: {path}")
    state_dict = _strip_prefixes(_read_state_dict(path))
    missing, unexpected, mismatched = key_diff(state_dict, model.state_dict())
    if missing or unexpected or mismatched:
        raise ProtegeError(_mismatch_message(path, model, state_dict, missing, unexpected, mismatched))
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- students


def _neck(in_chans: int, embed_dim: int) -> nn.Sequential:
    """SAM's neck (``ImageEncoderViT.neck``): 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d."""
    return nn.Sequential(
        nn.Conv2d(in_chans, embed_dim, kernel_size=1, bias=False),
        LayerNorm2d(embed_dim),
        nn.Conv2d(embed_dim, embed_dim, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(embed_dim),
    )


class _ResidualBlock(nn.Module):
    """Depthwise 3x3 conv, BN, GELU, pointwise conv, BN; plus the input (a depthwise-separable
    residual block: about ``C^2 + 9C`` multiply-adds per pixel against ``9C^2`` for a full 3x3 conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """A light convolutional image encoder with SAM's neck: ``(B, 3, S, S) -> (B, C, S/stride, S/stride)``.

    One stage per entry of ``widths``, each a stride-2 3x3 conv (BN, GELU) and ``blocks`` residual
    depthwise-separable blocks, so ``len(widths)`` stages reach stride ``2 ** len(widths)``; then
    SAM's neck to ``embed_dim`` channels.

    Args:
        img_size: ``S`` (recorded; any multiple of the stride works).
        embed_dim: ``C``.
        widths: channels of each stage.
        blocks: residual blocks per stage (an int for all, or one per stage).
    """

    def __init__(
        self,
        img_size: int,
        embed_dim: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int | Sequence[int] = 2,
    ) -> None:
        super().__init__()
        per_stage = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
        if not widths or len(per_stage) != len(widths):
            raise ProtegeError(f"blocks {blocks!r} must be an int or one count per width {tuple(widths)}")
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in per_stage
        ):
            raise ProtegeError(f"widths {tuple(widths)} must be positive integers and blocks {blocks!r} >= 0")
        self.img_size = img_size
        stages: list[nn.Module] = []
        previous = 3
        for width, count in zip(widths, per_stage):
            down = [
                nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.GELU(),
            ]
            stages.append(nn.Sequential(*down, *(_ResidualBlock(width) for _ in range(count))))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.neck = _neck(previous, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.neck(self.stages(x))


class _TimmEncoder(nn.Module):
    """A timm ``features_only`` trunk cut at one feature level, and SAM's neck."""

    def __init__(self, trunk: nn.Module, channels: int, img_size: int, embed_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = _neck(channels, embed_dim)
        self.img_size = img_size

    def forward(self, x: Tensor) -> Tensor:
        return self.neck(self.trunk(x)[-1])


def _timm_encoder(name: str, img_size: int, embed_dim: int, stride: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if kwargs.pop("pretrained", False):
        raise ProtegeError("pretrained=True is not supported: protege never downloads weights")
    if not timm.is_model(name):
        raise unknown("timm model", name, timm.list_models())
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        reductions = [int(r) for r in probe.feature_info.reduction()]
        if stride not in reductions:
            raise ProtegeError(
                f"timm model {name!r} has feature strides {reductions}, none equal to the teacher's "
                f"embedding stride {stride}; choose a model with a stride-{stride} feature level"
            )
        level = reductions.index(stride)
        trunk = timm.create_model(name, pretrained=False, features_only=True, out_indices=(level,), **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ProtegeError(
            f"timm model {name!r} cannot be built with {kwargs}: {str(e).splitlines()[0]}"
        ) from None
    return _TimmEncoder(trunk, int(trunk.feature_info.channels()[-1]), img_size, embed_dim)


def _vit_encoder(img_size: int, embed_dim: int, stride: int, kwargs: dict[str, Any]) -> nn.Module:
    options = {
        "encoder_dim": 48,
        "depth": 2,
        "heads": 2,
        "window_size": 8,
        "global_attn_indexes": None,
        "mlp_ratio": 4.0,
    }
    extra = set(kwargs) - set(options)
    if extra:
        raise ProtegeError(
            f"unknown option(s) {sorted(extra)} of the vit student; the options are {sorted(options)}"
        )
    options.update(kwargs)
    depth = options["depth"]
    indexes = options["global_attn_indexes"]
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=stride,
        embed_dim=options["encoder_dim"],
        depth=depth,
        num_heads=options["heads"],
        mlp_ratio=options["mlp_ratio"],
        out_chans=embed_dim,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        window_size=options["window_size"],
        global_attn_indexes=tuple(indexes) if indexes is not None else (depth - 1,),
    )


def _cnn_encoder(img_size: int, embed_dim: int, stride: int, kwargs: dict[str, Any]) -> nn.Module:
    stages = int(math.log2(stride))
    if 2**stages != stride:
        raise ProtegeError(
            f"the cnn student reaches power-of-two strides only; the teacher's stride is {stride}"
        )
    extra = set(kwargs) - {"widths", "blocks"}
    if extra:
        raise ProtegeError(
            f"unknown option(s) {sorted(extra)} of the cnn student; the options are blocks, widths"
        )
    widths = tuple(kwargs.get("widths", tuple(min(16 * 2**i, 256) for i in range(stages))))
    if len(widths) != stages:
        raise ProtegeError(
            f"widths {widths} give stride {2 ** len(widths)}; the teacher's embedding has stride {stride}: "
            f"give {stages} widths, one per stride-2 stage"
        )
    return ConvEncoder(img_size, embed_dim, widths, kwargs.get("blocks", 2))


def sam_student(
    encoder: str = "cnn",
    from_model: PromptableSegmenter | None = None,
    img_size: int | None = None,
    embed_dim: int | None = None,
    copy_decoder: bool = True,
    *,
    stride: int | None = None,
    **encoder_kwargs: Any,
) -> PromptableSegmenter:
    """A TinySAM-style student: a light image encoder + SAM's neck, and SAM's prompt encoder and
    mask decoder of the reference model's design.

    The student's embedding has the reference's grid and width, so the decoder (copied or not)
    reads it as it reads the teacher's, and embeddings can be distilled directly.

    Args:
        encoder: ``"cnn"`` (:class:`ConvEncoder`; options ``widths`` (one per stride-2 stage,
            default 16, 32, 64, ...) and ``blocks`` (per stage, default 2)), ``"vit"`` (a small
            ``ImageEncoderViT`` with patch = stride; options ``encoder_dim`` 48, ``depth`` 2,
            ``heads`` 2, ``window_size`` 8, ``global_attn_indexes`` (the last block), ``mlp_ratio``
            4) or ``"timm:NAME"`` (a timm ``features_only`` model, never pretrained, cut at its
            feature level of the reference's stride; options go to ``timm.create_model``).
        from_model: the reference (teacher); without it, the tiny SAM's decoder design.
        img_size: ``S``; must equal the reference's (default: it, or 128).
        embed_dim: ``C``; must equal the reference's (default: it, or 64).
        copy_decoder: copy the reference's prompt encoder and mask decoder weights (else a fresh
            decoder of the same design).
        stride: embedding stride (default: the reference's, or 8).
        **encoder_kwargs: the encoder's options.

    Raises:
        ProtegeError: unknown encoder or option, sizes that contradict the reference, a stride the
            encoder cannot reach.
    """
    if from_model is not None:
        grid = from_model.grid[0]
        ref_stride = from_model.img_size // grid
        for what, given, ref in (
            ("img_size", img_size, from_model.img_size),
            ("embed_dim", embed_dim, from_model.embed_dim),
            ("stride", stride, ref_stride),
        ):
            if given is not None and given != ref:
                raise ProtegeError(
                    f"{what}={given} contradicts the reference model's {what} {ref}; leave it out"
                )
        img_size, embed_dim, stride = from_model.img_size, from_model.embed_dim, ref_stride
        if copy_decoder:
            prompt_encoder = copy.deepcopy(from_model.prompt_encoder)
            mask_decoder = copy.deepcopy(from_model.mask_decoder)
        else:
            transformer = from_model.mask_decoder.transformer
            prompt_encoder, mask_decoder = _prompt_modules(
                embed_dim,
                grid,
                img_size,
                transformer.depth,
                transformer.mlp_dim,
                transformer.num_heads,
                mask_in_chans=from_model.prompt_encoder.mask_downscaling[3].out_channels,
                iou_hidden=from_model.mask_decoder.iou_prediction_head.layers[0].out_features,
            )
    else:
        tiny = SAM_VARIANTS["tiny"]
        img_size = img_size or tiny["img_size"]
        embed_dim = embed_dim or tiny["embed_dim"]
        stride = stride or tiny["patch_size"]
        config = _resolve("tiny", {"img_size": img_size, "embed_dim": embed_dim, "patch_size": stride})
        prompt_encoder, mask_decoder = _prompt_modules(
            embed_dim,
            img_size // stride,
            img_size,
            config["decoder_depth"],
            config["decoder_mlp"],
            config["decoder_heads"],
        )
    kind, _, name = encoder.partition(":")
    kwargs = dict(encoder_kwargs)
    if kind == "cnn" and not name:
        image_encoder = _cnn_encoder(img_size, embed_dim, stride, kwargs)
    elif kind == "vit" and not name:
        image_encoder = _vit_encoder(img_size, embed_dim, stride, kwargs)
    elif kind == "timm" and name:
        image_encoder = _timm_encoder(name, img_size, embed_dim, stride, kwargs)
    else:
        raise ProtegeError(f"unknown student encoder {encoder!r}; use cnn, vit or timm:NAME")
    config = {
        "student": encoder,
        "img_size": img_size,
        "embed_dim": embed_dim,
        "stride": stride,
        **encoder_kwargs,
    }
    student = PromptableSegmenter(image_encoder, prompt_encoder, mask_decoder, img_size, config=config)
    return student.to(from_model.pixel_mean.device) if from_model is not None else student
