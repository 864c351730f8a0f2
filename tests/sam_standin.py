"""Promptable segmenters for the tests of :mod:`protege.segment` and :mod:`protege.export.sam_onnx`
(the interface ``img_size``, ``encode``, ``decode``, ``upscale``).

- :func:`tiny_sam`: ``protege.models.sam``'s SAM at toy size, random weights.
- :class:`OracleSam`: a model that "segments perfectly" an image of flat-coloured shapes on a flat
  background: a point prompt gets the mask of the pixels of the colour under it (high predicted
  IoU), a background point gets a low predicted IoU.
"""

from __future__ import annotations

import torch
from torch import nn

from protege.models.sam import PromptableSegmenter, build_sam


def tiny_sam(seed: int = 0) -> PromptableSegmenter:
    """SAM's design (``protege.models.sam.build_sam``) at toy size: 64-px images, patch 8 (an 8x8
    grid), a 2-block ViT of width 48, prompt width 32; random weights, eval mode."""
    torch.manual_seed(seed)
    model = build_sam(
        "tiny", img_size=64, encoder_dim=48, depth=2, heads=3, window_size=4, global_attn_indexes=(1,),
        embed_dim=32, decoder_mlp=64,
    )  # fmt: skip
    return model.eval()


class OracleSam(nn.Module):
    """Segments flat-coloured shapes perfectly: the embedding is the image; a point's mask is the
    pixels of its pixel's colour (logits +/-``margin``, at full resolution so ``upscale`` is the
    identity); its predicted IoU is ``fg_iou`` on a shape, ``bg_iou`` on the background colour. The
    three multimask outputs are the same mask with IoU ``fg_iou``, ``fg_iou - 0.05``, ``fg_iou - 0.1``."""

    def __init__(
        self, img_size: int, background: tuple[float, float, float], fg_iou: float = 0.97, margin: float = 8.0
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.background = torch.tensor(background)
        self.fg_iou, self.margin = fg_iou, margin
        self.decoded = 0  # point prompts decoded so far

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()

    def decode(self, embeddings, points=None, labels=None, boxes=None, multimask=False):
        B, P, N, _ = points.shape
        self.decoded += B * P
        out_m, out_i = [], []
        for b in range(B):
            img = embeddings[b]  # (3,S,S)
            px = points[b, :, 0].floor().long().clamp(0, self.img_size - 1)  # (P,2) x,y
            colours = img[:, px[:, 1], px[:, 0]].T  # (P,3)
            same = (img[None] == colours[:, :, None, None]).all(1)  # (P,S,S)
            logits = torch.where(same, self.margin, -self.margin)
            on_bg = (colours == self.background).all(1)
            iou = torch.where(on_bg, 0.1, self.fg_iou)
            if multimask:
                logits = logits[:, None].expand(P, 3, *logits.shape[-2:])
                iou = iou[:, None] - torch.tensor([0.0, 0.05, 0.1])
            else:
                logits, iou = logits[:, None], iou[:, None]
            out_m.append(logits)
            out_i.append(iou)
        return {"masks": torch.stack(out_m), "iou": torch.stack(out_i)}

    def upscale(self, masks: torch.Tensor) -> torch.Tensor:
        return masks


def shapes_image(size: int = 64) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]:
    """A (3,S,S) image of a few large flat-coloured shapes on a flat background, its (S,S) label map
    (0 background, 1..3 shapes) and the background colour."""
    bg = (0.2, 0.2, 0.2)
    img = torch.tensor(bg).view(3, 1, 1).expand(3, size, size).clone()
    labels = torch.zeros(size, size, dtype=torch.long)
    s = size / 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    shapes = [
        ((xx >= int(4 * s)) & (xx < int(36 * s)) & (yy >= int(4 * s)) & (yy < int(30 * s)), (0.9, 0.1, 0.1)),
        (((xx - 44 * s) ** 2 + (yy - 44 * s) ** 2) < (16 * s) ** 2, (0.1, 0.8, 0.2)),
        ((xx >= int(40 * s)) & (xx < int(60 * s)) & (yy >= int(4 * s)) & (yy < int(20 * s)), (0.1, 0.3, 0.9)),
    ]
    for k, (region, colour) in enumerate(shapes, start=1):
        img[:, region] = torch.tensor(colour)[:, None]
        labels[region] = k
    return img, labels, bg
