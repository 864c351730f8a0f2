"""A proxy pool for an MNIST teacher that is clearly shifted from MNIST: the ``shifted-pool`` source.

Distilling without the original data (``data.strategy: proxy``, KD³) needs a pool of *other*
images. This module builds one offline, deterministically for a seed, from nothing that is MNIST:
a mixture of in-distribution classes drawn in other styles and out-of-distribution content. Every
image is a 28×28 grey image stored as ``uint8`` (0 = background, 255 = ink, like raw MNIST) and
normalised exactly like ``mnist5k`` (``(x / 255 − 0.1307) / 0.3081``).

Parts (option ``parts``; default shares in brackets; a sample's *domain* is its part):

``digits`` (0.25) — in-distribution classes, shifted style
    scikit-learn's 1,797 8×8 digits (UCI optical digits, 0-16 grey levels). Each is upscaled
    bilinearly to fit a 20×20 box (blocky, blurred strokes) after a random rotation of ±10° and a
    random scale of 0.9-1.1, then framed like MNIST (see below). Each of the 1,797 is used once
    before any is used again (with another random rotation and scale). True class: the digit.
``rendered`` (0.25) — in-distribution classes, typeset
    The digits 0-9 typeset with one of the TrueType fonts matplotlib ships (DejaVu Sans/Serif/Mono
    and their bold/oblique faces, STIX General, Computer Modern roman/sans/typewriter/bold/italic;
    see :data:`FONTS`) at 34-46 pt on a 64×64 canvas, extra stroke width 0-2 px, rotation ±15°,
    horizontal shear ±0.3, an elastic distortion (Simard et al. 2003: a uniform random
    displacement field smoothed by a Gaussian of σ = 5 px, scaled by α ∈ [0, 60] px), framed like
    MNIST, then with probability 0.3 Gaussian pixel noise (σ = 10-40 grey levels). True class: the
    digit.
``letters`` (0.15) — out of distribution
    Latin letters that do not look like a digit (:data:`LETTERS`: no O/o/D/Q (0), I/l/i/j/J (1),
    Z/z (2), S/s (5), G/b (6), B (8), g/q (9)) rendered exactly like ``rendered``. Class -1.
``shapes`` (0.20) — out of distribution
    1-3 random primitives drawn with a 3-7 px pen on a 64×64 canvas: ellipse arcs (60-360°),
    rectangle or triangle outlines, straight lines and cubic Bézier strokes; then a mild elastic
    distortion (α ≤ 30) and MNIST framing. Class -1.
``noise`` (0.15) — out of distribution, full-frame textures
    One of: white noise smoothed by a Gaussian of σ = 0.5-3 px, a sinusoidal grating (random
    period 3-12 px, orientation and phase), a checkerboard (cells of 2-7 px, random rotation), or
    sparse random dots; contrast and brightness random. Class -1.

*Framing like MNIST* (LeCun et al.): the ink's bounding box is scaled so its longer side is 20 px
(aspect kept) and pasted into a 28×28 canvas so that its centre of mass lies at the centre.

The sample counts per part are the shares (normalised to sum 1) times ``size``, rounded by largest
remainder so they add up to ``size``; the pool is then shuffled. Image ``i`` of a part is drawn
from its own random stream (``numpy.random.default_rng([seed, part index, i + 1])``; which
scikit-learn digit, from a permutation of all 1,797, repeated as needed), so other parts' shares
do not change a part's images, and a larger share only appends images. A pool is a pure function of
``(size, seed, parts)`` and the fonts found; it is cached on disk (:func:`shifted_pool`) keyed by
exactly these, as a safetensors file written atomically.

``labels`` (a sample's true digit, -1 out of distribution) and ``domains`` (its part) are there
for analysis only; KD³ never trains on them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ProtegeError, unknown
from .splits import TensorImageDataset
from .transforms import MNIST_MEAN, MNIST_STD

__all__ = [
    "DEFAULT_PARTS",
    "FONTS",
    "LETTERS",
    "PARTS",
    "PoolDataset",
    "ShiftedPool",
    "default_cache_dir",
    "generate_shifted_pool",
    "part_counts",
    "shifted_pool",
]

#: bump when the generator changes, so cached pools are rebuilt
VERSION = 1
PARTS = ("digits", "rendered", "letters", "shapes", "noise")
DEFAULT_PARTS: dict[str, float] = {
    "digits": 0.25,
    "rendered": 0.25,
    "letters": 0.15,
    "shapes": 0.20,
    "noise": 0.15,
}
#: matplotlib's bundled TrueType faces used for typeset glyphs (those missing in an install are skipped)
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
)
#: letters drawn for the ``letters`` part: none that reads as a digit
LETTERS = "ACEFHKLMNPRTUVWXYacefhkmnprtuvwx"

_CANVAS = 64  # glyphs and shapes are drawn at this size, then framed down to 28x28
_BOX = 20  # MNIST: the digit's bounding box is scaled to fit 20x20 ...
_SIDE = 28  # ... and centred by centre of mass in 28x28


@dataclass(frozen=True)
class ShiftedPool:
    """A generated pool: ``images`` uint8 ``(N, 28, 28)`` (0 background, 255 ink), ``labels``
    int64 ``(N,)`` (the true digit, -1 out of distribution), ``domains`` int64 ``(N,)`` (index
    into ``parts``) and ``parts``, the part names."""

    images: np.ndarray
    labels: np.ndarray
    domains: np.ndarray
    parts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Number of samples per part."""
        return {name: int((self.domains == i).sum()) for i, name in enumerate(self.parts)}


class PoolDataset(TensorImageDataset):
    """A :class:`ShiftedPool` as MNIST-normalised ``(1, 28, 28)`` float32 images and int64 labels
    (the true digit or -1; for analysis only). ``domains`` (int64, index into ``domain_names``)
    tags each item with the part it came from. ``shift``: random shifts as
    :class:`~protege.data.sources.TensorImageDataset` (transforms ``augment``)."""

    def __init__(self, pool: ShiftedPool, shift: int = 0) -> None:
        x = torch.from_numpy(pool.images.astype(np.float32)).unsqueeze(1) / 255.0
        background = (0.0 - MNIST_MEAN[0]) / MNIST_STD[0]
        super().__init__((x - MNIST_MEAN[0]) / MNIST_STD[0], torch.from_numpy(pool.labels), shift, background)
        self.domains = torch.from_numpy(pool.domains.astype(np.int64))
        self.domain_names = tuple(pool.parts)


# ----------------------------------------------------------------------------------- options


def _shares(parts: Mapping[str, Any] | None) -> dict[str, float]:
    """Validated part shares in :data:`PARTS` order, normalised to sum 1 (zero shares dropped)."""
    if parts is None:
        parts = DEFAULT_PARTS
    if not isinstance(parts, Mapping):
        raise ProtegeError(
            f"option `parts` must map part names to shares, e.g. {{digits: 0.5, noise: 0.5}}; got {parts!r}"
        )
    for name in parts:
        if name not in PARTS:
            raise unknown("shifted-pool part", str(name), PARTS)
    shares: dict[str, float] = {}
    for name in PARTS:
        if name not in parts:
            continue
        try:
            share = float(parts[name])
        except (TypeError, ValueError):
            raise ProtegeError(f"share of part {name!r} must be a number, got {parts[name]!r}") from None
        if not np.isfinite(share) or share < 0:
            raise ProtegeError(f"share of part {name!r} must be a non-negative number, got {share}")
        if share > 0:
            shares[name] = share
    total = sum(shares.values())
    if total <= 0:
        raise ProtegeError(f"option `parts` needs a positive share for at least one of {', '.join(PARTS)}")
    return {name: share / total for name, share in shares.items()}


def part_counts(size: int, parts: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Samples per part: ``size`` × share, rounded by largest remainder (the counts sum to ``size``;
    ties go to the earlier part in :data:`PARTS`)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ProtegeError(f"option `size` must be a positive integer, got {size!r}")
    shares = _shares(parts)
    exact = {name: share * size for name, share in shares.items()}
    counts = {name: int(np.floor(v)) for name, v in exact.items()}
    order = sorted(exact, key=lambda n: (-(exact[n] - counts[n]), PARTS.index(n)))
    for name in order[: size - sum(counts.values())]:
        counts[name] += 1
    return counts


def _fonts() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [folder / name for name in FONTS if (folder / name).is_file()]


# ---------------------------------------------------------------------------------- drawing


def _frame_like_mnist(img: np.ndarray) -> np.ndarray:
    """``img`` (float, 0 background .. 1 ink): the ink's bounding box scaled to fit 20×20 (aspect
    kept) and placed in 28×28 with its centre of mass at the centre; uint8."""
    from PIL import Image

    ys, xs = np.nonzero(img > 0.05)
    if len(ys) == 0:  # nothing drawn: an empty frame (callers redraw)
        return np.zeros((_SIDE, _SIDE), np.uint8)
    crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = _BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pil = Image.fromarray(np.clip(crop * 255, 0, 255).astype(np.uint8))
    small = np.asarray(pil.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
    mass = small.sum()
    cy = (small.sum(1) * np.arange(nh)).sum() / mass
    cx = (small.sum(0) * np.arange(nw)).sum() / mass
    top = int(np.clip(round(_SIDE / 2 - 0.5 - cy), 0, _SIDE - nh))
    left = int(np.clip(round(_SIDE / 2 - 0.5 - cx), 0, _SIDE - nw))
    out = np.zeros((_SIDE, _SIDE), np.float32)
    out[top : top + nh, left : left + nw] = small
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _elastic(img: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Elastic distortion (Simard, Steinkraus & Platt 2003): displace every pixel by a uniform
    random field in [-1, 1] smoothed by a Gaussian of ``sigma`` px and scaled by ``alpha`` px."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = img.shape
    dy = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha
    dx = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return map_coordinates(img, [yy + dy, xx + dx], order=1, mode="constant", cval=0.0)


def _rotate_shear(img: np.ndarray, angle: float, shear: float) -> np.ndarray:
    """Rotate by ``angle`` degrees and shear horizontally by ``shear`` about the canvas centre."""
    from PIL import Image

    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    c = _CANVAS / 2
    # PIL's affine maps output to input coordinates: x_in = x + shear * (y - c)
    pil = pil.transform(
        pil.size, Image.Transform.AFFINE, (1, shear, -shear * c, 0, 1, 0), Image.Resampling.BILINEAR
    )
    pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR)
    return np.asarray(pil, dtype=np.float32) / 255.0


def _glyph(char: str, rng: np.random.Generator, fonts: list[Path]) -> np.ndarray:
    """One typeset character, distorted and framed like MNIST (see the ``rendered`` part)."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = fonts[int(rng.integers(len(fonts)))]
    font = ImageFont.truetype(str(font_path), size=int(rng.integers(34, 47)))
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    stroke = int(rng.integers(0, 3))
    ImageDraw.Draw(canvas).text(
        (_CANVAS / 2, _CANVAS / 2),
        char,
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    img = np.asarray(canvas, dtype=np.float32) / 255.0
    img = _rotate_shear(img, float(rng.uniform(-15, 15)), float(rng.uniform(-0.3, 0.3)))
    img = _elastic(img, rng, alpha=float(rng.uniform(0, 60)), sigma=5.0)
    out = _frame_like_mnist(img)
    if rng.random() < 0.3:
        noisy = out.astype(np.float32) + rng.normal(0, rng.uniform(10, 40), out.shape)
        out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def _upscaled_digit(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One scikit-learn digit (8×8, values 0-1) upscaled, rotated and framed (the ``digits`` part)."""
    from PIL import Image

    side = int(round(_BOX * rng.uniform(0.9, 1.1)))
    pil = Image.fromarray(np.rint(image * 255).astype(np.uint8))
    pil = pil.resize((side, side), Image.Resampling.BILINEAR)
    pil = pil.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR, expand=True)
    return _frame_like_mnist(np.asarray(pil, dtype=np.float32) / 255.0)


def _bezier(p: np.ndarray, steps: int = 32) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, steps)[:, None]
    pts = (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]
    return [tuple(q) for q in pts.tolist()]


def _shape(rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        pen = int(rng.integers(3, 8))
        kind = int(rng.integers(5))
        a, b = rng.uniform(6, 58, 2), rng.uniform(6, 58, 2)
        x0, x1 = sorted((a[0], b[0]))
        y0, y1 = sorted((a[1], b[1]))
        x1, y1 = max(x1, x0 + 8), max(y1, y0 + 8)
        if kind == 0:
            start = float(rng.uniform(0, 360))
            draw.arc((x0, y0, x1, y1), start, start + float(rng.uniform(60, 360)), fill=255, width=pen)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), outline=255, width=pen)
        elif kind == 2:
            pts = [tuple(q) for q in rng.uniform(6, 58, (3, 2)).tolist()]
            draw.line([*pts, pts[0]], fill=255, width=pen, joint="curve")
        elif kind == 3:
            draw.line((float(a[0]), float(a[1]), float(b[0]), float(b[1])), fill=255, width=pen)
        else:
            draw.line(_bezier(rng.uniform(4, 60, (4, 2))), fill=255, width=pen, joint="curve")
    img = np.asarray(canvas, dtype=np.float32) / 255.0
    return _frame_like_mnist(_elastic(img, rng, alpha=float(rng.uniform(0, 30)), sigma=5.0))


def _texture(rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    yy, xx = np.meshgrid(np.arange(_SIDE), np.arange(_SIDE), indexing="ij")
    theta = rng.uniform(0, np.pi)
    u = np.cos(theta) * xx + np.sin(theta) * yy
    v = -np.sin(theta) * xx + np.cos(theta) * yy
    kind = int(rng.integers(4))
    if kind == 0:
        img = gaussian_filter(rng.normal(size=(_SIDE, _SIDE)), rng.uniform(0.5, 3.0))
    elif kind == 1:
        img = np.sin(2 * np.pi * u / rng.uniform(3, 12) + rng.uniform(0, 2 * np.pi))
    elif kind == 2:
        cell = rng.uniform(2, 7)
        img = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
    else:
        img = (rng.random((_SIDE, _SIDE)) < rng.uniform(0.03, 0.15)).astype(np.float64)
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    top = rng.uniform(128, 255)
    bottom = rng.uniform(0, 0.4) * top
    return np.clip(np.rint(bottom + (top - bottom) * img), 0, 255).astype(np.uint8)


def _draw_part(name: str, n: int, seed: int, index: int, fonts: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of part ``name`` (the ``index``-th of :data:`PARTS`) and their true digits (-1
    out of distribution). Image ``i`` is drawn from its own stream ``default_rng([seed, index,
    i + 1])``; the ``digits`` part's choice of source image from ``default_rng([seed, index])``."""
    streams = [np.random.default_rng([seed, index, i + 1]) for i in range(n)]
    drawn: list[tuple[np.ndarray, int]] = []
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.asarray(bunch.images, dtype=np.float32) / 16.0
        order_rng = np.random.default_rng([seed, index])
        order = np.concatenate([order_rng.permutation(len(images)) for _ in range(-(-n // len(images)))])
        drawn = [(_upscaled_digit(images[j], rng), int(bunch.target[j])) for j, rng in zip(order, streams)]
    elif name in ("rendered", "letters"):
        for rng in streams:
            if name == "rendered":
                digit = int(rng.integers(10))
                drawn.append((_glyph(str(digit), rng, fonts), digit))
            else:
                drawn.append((_glyph(LETTERS[int(rng.integers(len(LETTERS)))], rng, fonts), -1))
    elif name == "shapes":
        drawn = [(_shape(rng), -1) for rng in streams]
    else:
        drawn = [(_texture(rng), -1) for rng in streams]
    return np.stack([img for img, _ in drawn]), np.array([y for _, y in drawn], dtype=np.int64)


def generate_shifted_pool(
    size: int = 6000, seed: int = 0, parts: Mapping[str, Any] | None = None
) -> ShiftedPool:
    """Draw the pool described in the module docstring (no cache; see :func:`shifted_pool`).

    Args:
        size: number of images.
        seed: seed of every random choice (part streams and the final shuffle).
        parts: share per part name (:data:`PARTS`), normalised to sum 1; parts left out are not
            drawn. Default :data:`DEFAULT_PARTS`.

    Raises:
        ProtegeError: a bad size, an unknown part or bad shares, or no typeset font found.
    """
    counts = part_counts(size, parts)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProtegeError(f"the pool's seed must be a non-negative integer, got {seed!r}")
    fonts = _fonts()
    if not fonts and (counts.get("rendered") or counts.get("letters")):
        raise ProtegeError(
            "no matplotlib TrueType font found for the rendered/letters parts; reinstall matplotlib "
            "or give those parts a share of 0"
        )
    images, labels, domains = [], [], []
    for index, name in enumerate(PARTS):
        n = counts.get(name, 0)
        if n == 0:
            continue
        x, y = _draw_part(name, n, seed, index, fonts)
        images.append(x)
        labels.append(y)
        domains.append(np.full(n, index, np.int64))
    order = np.random.default_rng([seed, len(PARTS)]).permutation(size)
    return ShiftedPool(
        images=np.concatenate(images)[order],
        labels=np.concatenate(labels)[order],
        domains=np.concatenate(domains)[order],
        parts=PARTS,
    )


# ------------------------------------------------------------------------------------ cache


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/protege/pools`` (``~/.cache/protege/pools`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "protege" / "pools"


def _cache_key(size: int, seed: int, parts: Mapping[str, Any] | None) -> dict[str, Any]:
    counts = part_counts(size, parts)
    return {
        "version": VERSION,
        "size": int(size),
        "seed": int(seed),
        "parts": {name: round(share, 12) for name, share in _shares(parts).items()},
        "counts": counts,
        "fonts": [p.name for p in _fonts()],
    }


def shifted_pool(
    size: int = 6000,
    seed: int = 0,
    parts: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> ShiftedPool:
    """The pool of :func:`generate_shifted_pool`, read from ``cache_dir`` (default
    :func:`default_cache_dir`) when it was built before with the same options, else generated and
    saved there atomically (``shifted-pool-<key>.safetensors``; the key hashes size, seed, shares,
    generator version and fonts)."""
    from safetensors.numpy import load_file

    from ..files import atomic_save_tensors

    key = _cache_key(size, seed, parts)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"shifted-pool-{digest}.safetensors"
    if path.is_file():
        try:
            arrays = load_file(str(path))
            return ShiftedPool(arrays["images"], arrays["labels"], arrays["domains"], PARTS)
        except Exception:  # a damaged cache file (e.g. disk full on another writer): rebuild it
            pass
    pool = generate_shifted_pool(size, seed, parts)
    try:
        atomic_save_tensors(
            {name: torch.from_numpy(getattr(pool, name)) for name in ("images", "labels", "domains")},
            path,
            metadata={"options": json.dumps(key, sort_keys=True)},
        )
    except OSError as e:
        raise ProtegeError(
            f"cannot write the pool cache to {folder}: {e}; set the source's `root` to a writable folder"
        ) from e
    return pool
