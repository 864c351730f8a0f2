"""Facial-landmark data: a procedural face generator with exact 68 points, readers of the 300W,
WFLW and COFW annotation formats, and the Active Shape Model (PCA of shapes) that makes soft targets.

**Coordinates.** Every dataset here yields points *normalised to the image*: a pixel coordinate
``x`` (continuous, pixel (row r, column c) covers ``[c, c + 1) × [r, r + 1)``) of an ``S``-pixel
image is stored as ``x / S - 0.5``, so the image spans ``[-0.5, 0.5]`` on both axes (the
convention of the KD-Loss reference code, which regresses ``(px - 112) / 224`` on 224-px crops).
Models regress these numbers; errors normalised by an inter-ocular distance do not depend on it.

**Items** are dicts ``{"image": float32 (3, S, S) in [0, 1], "points": float32 (K, 2),
"visible": bool (K,), "index": int}``; the default collate batches them.

* :class:`SyntheticFaces`: deterministic procedural faces with the 68 points of the iBUG 300-W
  layout (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67) placed exactly: a 3-D
  parametric face (jaw width and length, brow, eye, nose and mouth shape, eye openness, smile and
  mouth opening as expression) under yaw, pitch and roll, scaled and shifted, rendered with skin
  tone and a directional lighting gradient over a random crop of a real scikit-image photograph or
  texture, sometimes with an occluding patch (the points under it are marked not visible). Item
  ``i`` of a split is drawn from the seed sequence ``(seed, split, i)``: the same on every machine,
  and the three splits never share a face.
* :func:`read_pts`, :func:`read_wflw`, :func:`read_cofw`: the datasets' own annotation files;
  :func:`load_landmark_folder` / :func:`load_wflw` / :func:`load_cofw` crop each face around its
  points (or box) and resize it to ``S`` (:func:`crop_face`).
* :class:`ShapeModel`: the Active Shape Model of Cootes et al. (1995): PCA of the training shapes
  (optionally after generalised Procrustes alignment), :meth:`ShapeModel.project` keeps the first
  ``modes`` modes: the *soft* landmarks a Tolerant teacher is trained on (Fard & Mahoor 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import ProtegeError
from .segmentation import _background

__all__ = [
    "IBUG_68",
    "LandmarkSet",
    "ShapeModel",
    "SyntheticFaces",
    "crop_face",
    "face_shape",
    "load_cofw",
    "load_landmark_folder",
    "load_wflw",
    "read_cofw",
    "read_pts",
    "read_wflw",
]

#: the iBUG 300-W 68-point layout: index ranges of each part (0-based, end exclusive)
IBUG_68: dict[str, tuple[int, int]] = {
    "jaw": (0, 17),
    "right_brow": (17, 22),
    "left_brow": (22, 27),
    "nose_bridge": (27, 31),
    "nostrils": (31, 36),
    "right_eye": (36, 42),
    "left_eye": (42, 48),
    "outer_mouth": (48, 60),
    "inner_mouth": (60, 68),
}
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


# ------------------------------------------------------------------------------------- the points


def _check_points(points: np.ndarray, where: str) -> np.ndarray:
    """``points`` as float64 (..., K, 2), refused with a clear error when not finite."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim < 2 or points.shape[-1] != 2:
        raise ProtegeError(f"{where}: landmarks must be (K, 2) x, y pairs, got shape {points.shape}")
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points)).any(-1).sum())
        raise ProtegeError(f"{where}: {bad} landmark(s) have NaN or infinite coordinates; fix or drop them")
    return points


@dataclass
class LandmarkSet(Dataset[dict[str, Any]]):
    """Images with landmarks in memory: ``images`` uint8 ``(N, S, S, 3)``, ``points`` float32
    ``(N, K, 2)`` normalised (module docstring), ``visible`` bool ``(N, K)``.

    ``targets``: when set, the points an item carries *instead of* ``points`` (soft landmarks, the
    ASM projections of the training shapes); ``points`` stays the ground truth.
    """

    images: np.ndarray
    points: np.ndarray
    visible: np.ndarray
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.points.shape[0] != n or self.visible.shape[:1] != (n,):
            raise ProtegeError(
                f"landmark set: {n} images but {self.points.shape[0]} shapes and {self.visible.shape[0]} "
                "visibility rows"
            )
        _check_points(self.points, "landmark set")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_points(self) -> int:
        return int(self.points.shape[1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        points = self.points if self.targets is None else self.targets
        image = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).float() / 255.0
        return {
            "image": image,
            "points": torch.as_tensor(points[i], dtype=torch.float32),
            "visible": torch.as_tensor(self.visible[i], dtype=torch.bool),
            "index": int(i),
        }


# ------------------------------------------------------------------------------ procedural faces


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def face_shape(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random neutral-to-expressive face in its own frame: ``(68, 3)`` points (x right, y down,
    z toward the viewer; the face about 2 units wide) in the iBUG 300-W order, and the outline of the
    head above the jaw (the forehead, ``(9, 3)``) for drawing the skin."""
    u = rng.uniform
    jaw_w, jaw_h = u(0.85, 1.05), u(1.0, 1.3)
    eye_y, eye_x, eye_w = u(-0.28, -0.15), u(0.36, 0.46), u(0.22, 0.3)
    open_ = u(0.25, 1.0)  # eye openness (blink .. wide)
    eye_h = eye_w * 0.45 * open_
    brow_y, brow_lift = eye_y - u(0.2, 0.3), u(-0.04, 0.08)
    nose_y, nose_w = u(0.25, 0.4), u(0.14, 0.22)
    mouth_y, mouth_w = nose_y + u(0.25, 0.35), u(0.3, 0.45)
    smile, gape = u(-0.05, 0.12), u(0.0, 0.18) if rng.random() < 0.4 else 0.0
    pts = np.zeros((68, 2))
    # jaw 0..16: from the image-left ear, down round the chin (8), to the image-right ear
    theta = np.linspace(math.pi + 0.15, -0.15, 17)
    pts[0:17] = np.stack([jaw_w * np.cos(theta), -0.05 + jaw_h * np.sin(theta)], 1)
    arch = 0.06 * (1 - np.linspace(-1, 1, 5) ** 2)
    for start, cx in ((17, -eye_x), (22, eye_x)):  # brows, each left to right in the image
        xs = cx + np.linspace(-1, 1, 5) * 0.2
        pts[start : start + 5] = np.stack([xs, brow_y - brow_lift - arch], 1)
    pts[27:31] = np.stack([np.zeros(4), np.linspace(eye_y + 0.02, nose_y - 0.05, 4)], 1)
    pts[31:36] = np.stack(
        [np.linspace(-nose_w, nose_w, 5), nose_y + np.array([0.0, 0.03, 0.05, 0.03, 0.0])], 1
    )
    for start, cx in ((36, -eye_x), (42, eye_x)):
        # 6 points: corner, two upper, corner, two lower; order clockwise from the image-left corner
        xs = cx + eye_w / 2 * np.array([-1.0, -0.35, 0.35, 1.0, 0.35, -0.35])
        ys = eye_y + eye_h / 2 * np.array([0.0, -1.0, -1.0, 0.0, 1.0, 1.0])
        pts[start : start + 6] = np.stack([xs, ys], 1)
    mw = mouth_w / 2
    outer_x = mw * np.array([-1.0, -0.6, -0.25, 0.0, 0.25, 0.6, 1.0, 0.6, 0.25, 0.0, -0.25, -0.6])
    lift = -smile * np.abs(outer_x / mw) ** 2
    outer_y = (
        mouth_y + lift + np.array([0, -0.06, -0.08, -0.06, -0.08, -0.06, 0, 0.09, 0.11, 0.12, 0.11, 0.09])
    )
    outer_y[7:] += gape
    pts[48:60] = np.stack([outer_x, outer_y], 1)
    inner_x = mw * np.array([-0.8, -0.3, 0.0, 0.3, 0.8, 0.3, 0.0, -0.3])
    inner_y = (
        mouth_y - smile * np.abs(inner_x / mw) ** 2 + np.array([0, -0.02, -0.02, -0.02, 0, 0.02, 0.02, 0.02])
    )
    inner_y[5:] += gape
    pts[60:68] = np.stack([inner_x, inner_y], 1)
    # depth: a rounded face, the nose tip forward
    r2 = (pts[:, 0] / (jaw_w * 1.1)) ** 2
    z = 0.6 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    z[27:31] += np.linspace(0.05, 0.3, 4)
    z[31:36] += np.array([0.05, 0.12, 0.18, 0.12, 0.05])
    forehead_t = np.linspace(math.pi, 2 * math.pi, 9)
    forehead = np.stack([jaw_w * np.cos(forehead_t), -0.05 + 1.0 * np.sin(forehead_t), 0.3 * np.ones(9)], 1)
    return np.concatenate([pts, z[:, None]], 1), forehead


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (
        math.cos(yaw),
        math.sin(yaw),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(roll),
        math.sin(roll),
    )
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def render_face(
    rng: np.random.Generator, size: int, occlusion: float = 0.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One procedural face: uint8 ``(S, S, 3)`` image, ``(68, 2)`` pixel points, ``(68,)`` visibility."""
    shape, forehead = face_shape(rng)
    rot = _rotation(rng.uniform(-0.45, 0.45), rng.uniform(-0.25, 0.25), rng.uniform(-0.35, 0.35))
    scale = size * rng.uniform(0.26, 0.36)
    centre = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    project = lambda p: (p @ rot.T)[:, :2] * scale + centre  # noqa: E731 (orthographic camera)
    pts, head = project(shape), project(forehead)
    up = 3  # draw large, then downsample: anti-aliased edges
    big = size * up
    bg = (_background(rng, big) * 255).astype(np.uint8)
    canvas = Image.fromarray(bg)
    draw = ImageDraw.Draw(canvas)
    skin = rng.uniform(90, 250) * np.array([1.0, rng.uniform(0.7, 0.85), rng.uniform(0.55, 0.75)])
    skin = tuple(int(c) for c in np.clip(skin, 0, 255))
    outline = np.concatenate([pts[0:17], head[::-1][1:-1]]) * up
    draw.polygon([tuple(p) for p in outline], fill=skin)
    dark = tuple(int(c * rng.uniform(0.2, 0.45)) for c in skin)
    line = max(1, int(round(0.018 * scale * up)))
    for a, b in (IBUG_68["right_brow"], IBUG_68["left_brow"]):
        draw.line([tuple(p) for p in pts[a:b] * up], fill=dark, width=line * 2)
    for a, b in (IBUG_68["right_eye"], IBUG_68["left_eye"]):
        eye = pts[a:b] * up
        draw.polygon([tuple(p) for p in eye], fill=(235, 235, 235), outline=dark)
        c, r = eye.mean(0), 0.35 * np.linalg.norm(eye[3] - eye[0]) / 2
        iris = tuple(int(v) for v in rng.uniform(20, 120, 3))
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=iris)
    draw.line([tuple(p) for p in pts[27:31] * up], fill=dark, width=line)
    draw.line([tuple(p) for p in pts[31:36] * up], fill=dark, width=line)
    lips = (int(rng.uniform(140, 220)), int(rng.uniform(40, 100)), int(rng.uniform(50, 110)))
    draw.polygon([tuple(p) for p in pts[48:60] * up], fill=lips)
    draw.polygon([tuple(p) for p in pts[60:68] * up], fill=(60, 20, 25))
    image = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    # directional lighting: a linear gradient across the face, and a global exposure
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    light = 1.0 + rng.uniform(0.0, 0.6) * (np.cos(angle) * xx + np.sin(angle) * yy)
    image = image * light[..., None] * rng.uniform(0.7, 1.2)
    visible = np.ones(68, dtype=bool)
    if rng.random() < occlusion:  # an occluding patch of another texture over part of the face
        lo, hi = pts.min(0), pts.max(0)
        w, h = rng.uniform(0.25, 0.5) * (hi - lo)
        x0, y0 = rng.uniform(lo[0], hi[0] - w), rng.uniform(lo[1], hi[1] - h)
        ix0, iy0 = int(max(0, x0)), int(max(0, y0))
        ix1, iy1 = int(min(size, x0 + w)), int(min(size, y0 + h))
        if ix1 > ix0 and iy1 > iy0:
            patch = _background(rng, size) * 255
            image[iy0:iy1, ix0:ix1] = patch[iy0:iy1, ix0:ix1]
            inside = (pts[:, 0] >= ix0) & (pts[:, 0] < ix1) & (pts[:, 1] >= iy0) & (pts[:, 1] < iy1)
            visible &= ~inside
    return np.clip(image, 0, 255).astype(np.uint8), pts, visible


class SyntheticFaces(LandmarkSet):
    """``count`` procedural faces of ``size`` pixels (module docstring), split ``split`` of ``seed``."""

    def __init__(
        self, count: int, size: int = 64, split: str = "train", seed: int = 0, occlusion: float = 0.3
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ProtegeError(f"split must be one of {', '.join(_SPLIT_IDS)}, not {split!r}")
        images = np.zeros((count, size, size, 3), dtype=np.uint8)
        points = np.zeros((count, 68, 2), dtype=np.float32)
        visible = np.zeros((count, 68), dtype=bool)
        for i in range(count):
            rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], i])
            images[i], px, visible[i] = render_face(rng, size, occlusion)
            points[i] = px / size - 0.5
        super().__init__(images, points, visible)


# --------------------------------------------------------------------------------- real datasets


def crop_face(
    image: np.ndarray, points: np.ndarray, size: int, box: Sequence[float] | None = None, margin: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """A square crop around the face, resized to ``size``: uint8 ``(S, S, 3)`` and the points
    normalised to it (module docstring). The square is centred on ``box`` (``x0, y0, x1, y1``; by
    default the points' bounding box) with side ``(1 + 2 margin)`` times its longer side; parts
    outside the image are black."""
    points = _check_points(points, "crop_face")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    x0, y0, x1, y1 = box if box is not None else (*points.min(0), *points.max(0))
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    if not side > 0:
        raise ProtegeError(f"crop_face: an empty face box {(x0, y0, x1, y1)}")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = cx - side / 2, cy - side / 2
    crop = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8)).crop(
        (round(left), round(top), round(left + side), round(top + side))
    )
    crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    real_side = round(left + side) - round(left)
    norm = (points - [round(left), round(top)]) / real_side - 0.5
    return np.asarray(crop, dtype=np.uint8), norm.astype(np.float32)


def read_pts(path: str | Path, one_based: bool = True) -> np.ndarray:
    """The points of an iBUG/300W ``.pts`` file (``version: 1``, ``n_points: K``, ``{``, K lines
    ``x y``, ``}``) as ``(K, 2)`` float64 pixel coordinates; ``one_based``: the file counts pixels from
    1 (300W's Matlab convention), so 1 is subtracted."""
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    try:
        head = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[: lines.index("{")])}
        n = int(head["n_points"])
        body = lines[lines.index("{") + 1 : lines.index("}")]
        points = np.array([[float(v) for v in ln.split()[:2]] for ln in body])
    except (ValueError, KeyError) as e:
        raise ProtegeError(
            f"{path}: not a .pts file (version/n_points header, then {{ x y lines }}): {e}"
        ) from None
    if points.shape != (n, 2):
        raise ProtegeError(f"{path}: header says n_points {n}, the file has {len(body)} point lines")
    return _check_points(points - (1.0 if one_based else 0.0), str(path))


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_landmark_folder(root: str | Path, size: int, margin: float = 0.25) -> LandmarkSet:
    """Every ``<stem>.pts`` under ``root`` (recursively, the 300W layout) with the image of the same
    stem beside it, cropped around its points and resized to ``size``."""
    root = Path(root)
    files = sorted(root.rglob("*.pts"))
    if not files:
        raise ProtegeError(f"no .pts files under {root} (the 300W layout: image.jpg beside image.pts)")
    images, points = [], []
    for pts_file in files:
        image_file = next(
            (pts_file.with_suffix(s) for s in _IMAGE_SUFFIXES if pts_file.with_suffix(s).exists()), None
        )
        if image_file is None:
            raise ProtegeError(f"{pts_file}: no image beside it ({', '.join(_IMAGE_SUFFIXES)})")
        img, pts = crop_face(_read_image(image_file), read_pts(pts_file), size, margin=margin)
        images.append(img)
        points.append(pts)
    counts = {p.shape[0] for p in points}
    if len(counts) > 1:
        raise ProtegeError(f"{root}: the .pts files hold different point counts {sorted(counts)}")
    pts_arr = np.stack(points)
    return LandmarkSet(np.stack(images), pts_arr, np.ones(pts_arr.shape[:2], dtype=bool))


@dataclass(frozen=True)
class WflwRecord:
    """One line of a WFLW annotation file: 98 points, the face box, 6 attribute flags, the image."""

    points: np.ndarray
    box: tuple[float, float, float, float]
    attributes: dict[str, int]
    image: str


def read_wflw(path: str | Path) -> list[WflwRecord]:
    """The records of a WFLW annotation ``.txt`` (``list_98pt_rect_attr_{train,test}.txt``): per line
    196 numbers (x0 y0 … x97 y97), the box ``x_min y_min x_max y_max``, six 0/1 attributes (pose,
    expression, illumination, make-up, occlusion, blur) and the image's path under ``WFLW_images``."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 196 + 4 + 6 + 1:
            raise ProtegeError(
                f"{path}:{n}: a WFLW line has 207 fields (196 coordinates, 4 box, 6 attributes, image), got {len(fields)}"
            )
        try:
            values = [float(v) for v in fields[:200]]
            flags = [int(v) for v in fields[200:206]]
        except ValueError as e:
            raise ProtegeError(f"{path}:{n}: {e}") from None
        points = _check_points(np.array(values[:196]).reshape(98, 2), f"{path}:{n}")
        records.append(
            WflwRecord(points, tuple(values[196:200]), dict(zip(WFLW_ATTRIBUTES, flags)), fields[206])
        )  # type: ignore[arg-type]
    return records


def load_wflw(annotations: str | Path, images: str | Path, size: int, margin: float = 0.1) -> LandmarkSet:
    """A WFLW split: the records of ``annotations`` with their images under ``images``, cropped
    around the annotated face box."""
    recs = read_wflw(annotations)
    if not recs:
        raise ProtegeError(f"{annotations}: no WFLW records")
    imgs, pts = [], []
    for r in recs:
        file = Path(images) / r.image
        if not file.exists():
            raise ProtegeError(f"WFLW image {file} not found (images: the WFLW_images directory)")
        img, p = crop_face(_read_image(file), r.points, size, box=r.box, margin=margin)
        imgs.append(img)
        pts.append(p)
    pts_arr = np.stack(pts)
    return LandmarkSet(np.stack(imgs), pts_arr, np.ones(pts_arr.shape[:2], dtype=bool))


def read_cofw(
    path: str | Path, split: str = "train"
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """COFW's Matlab file (``COFW_train.mat`` / ``COFW_test.mat``, Burgos-Artizzu et al. 2013):
    ``(images, points (N, 29, 2), occluded (N, 29) bool, boxes (N, 4) x0 y0 x1 y1)``. The file holds
    ``IsTr``/``phisTr``/``bboxesTr`` (train) or ``IsT``/``phisT``/``bboxesT`` (test); a ``phis`` row is
    29 x, 29 y, 29 occlusion flags; a box is ``x y w h``; coordinates count pixels from 1."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise ProtegeError(
            f"{path}: a Matlab v7.3 (HDF5) file, which scipy.io cannot read; re-save it with "
            "save(file, '-v7') in Matlab/Octave"
        ) from None
    except (ValueError, OSError) as e:
        raise ProtegeError(f"{path}: not a readable .mat file: {e}") from None
    suffix = "Tr" if split == "train" else "T"
    keys = [f"Is{suffix}", f"phis{suffix}", f"bboxes{suffix}"]
    missing = [k for k in keys if k not in mat]
    if missing:
        raise ProtegeError(f"{path}: no {', '.join(missing)} (COFW {split} keys {', '.join(keys)})")
    cells = mat[keys[0]].reshape(-1)
    images = [np.asarray(c) for c in cells]
    phis = np.asarray(mat[keys[1]], dtype=np.float64)
    if phis.ndim != 2 or phis.shape[1] != 87 or phis.shape[0] != len(images):
        raise ProtegeError(f"{path}: {keys[1]} must be (N, 87) for {len(images)} images, got {phis.shape}")
    points = _check_points(np.stack([phis[:, :29], phis[:, 29:58]], -1) - 1.0, str(path))
    occluded = phis[:, 58:] > 0
    b = np.asarray(mat[keys[2]], dtype=np.float64).reshape(-1, 4)
    boxes = np.stack([b[:, 0] - 1, b[:, 1] - 1, b[:, 0] - 1 + b[:, 2], b[:, 1] - 1 + b[:, 3]], 1)
    return images, points, occluded, boxes


def load_cofw(path: str | Path, size: int, split: str = "train", margin: float = 0.1) -> LandmarkSet:
    """A COFW split (:func:`read_cofw`), cropped around the annotated boxes; visible = not occluded."""
    images, points, occluded, boxes = read_cofw(path, split)
    imgs, pts = [], []
    for img, p, box in zip(images, points, boxes):
        im, q = crop_face(img, p, size, box=box, margin=margin)
        imgs.append(im)
        pts.append(q)
    return LandmarkSet(np.stack(imgs), np.stack(pts), ~occluded)


# ------------------------------------------------------------------------------- the shape model


def _apply(transform: tuple[float, np.ndarray, np.ndarray], shape: np.ndarray) -> np.ndarray:
    scale, rot, shift = transform
    return scale * shape @ rot.T + shift


def _similarity(shape: np.ndarray, ref: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale ``s``, rotation ``R`` and translation ``t`` minimising ``|s R x + t - ref|`` (Umeyama)."""
    mx, mr = shape.mean(0), ref.mean(0)
    x, r = shape - mx, ref - mr
    u, sv, vt = np.linalg.svd(r.T @ x)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag([1.0, d]) @ vt
    var = (x**2).sum()
    scale = (sv * [1.0, d]).sum() / var if var > 0 else 1.0
    return float(scale), rot, mr - scale * rot @ mx


class ShapeModel:
    """The Active Shape Model's point-distribution model: a mean shape and PCA modes.

    Cootes, Taylor, Cooper & Graham, "Active Shape Models — Their Training and Application", CVIU
    1995. ``fit(shapes)``: with ``align=True``, generalised Procrustes analysis first (each shape
    brought onto the running mean by a similarity transform, the mean re-normalised, until it
    settles); then PCA of the flattened ``(N, 2K)`` shapes (SVD of the centred matrix: up to
    ``min(N, 2K)`` modes). :meth:`project` maps shapes onto the first ``modes`` modes:

        b = P_m^T (x - mean),   x_soft = mean + P_m b

    (for aligned models in the aligned frame, then back with the inverse similarity). The reference
    code of Fard & Mahoor (``pca_utility.py``) fits scikit-learn's PCA on the points as they are, with
    no alignment ("no normalization is needed"), and keeps the modes explaining a share of the
    variance: ``align=False`` is that default here; :meth:`modes_for` turns a share into a count.
    """

    def __init__(
        self, mean: np.ndarray, components: np.ndarray, variances: np.ndarray, align: bool, count: int
    ) -> None:
        self.mean = mean  # (K, 2)
        self.components = components  # (M, 2K), orthonormal rows
        self.variances = variances  # (M,)
        self.align = align
        self.count = count  # shapes it was fitted on
        #: the frame shapes are aligned to before projection (aligned models; else ``None``)
        self.frame: np.ndarray | None = None

    @classmethod
    def fit(cls, shapes: np.ndarray, align: bool = False, iterations: int = 10) -> ShapeModel:
        x = _check_points(shapes, "shape model")
        if x.ndim != 3 or len(x) < 1:
            raise ProtegeError(f"shape model: fit needs (N, K, 2) shapes, got {x.shape}")
        frame = None
        if align:
            frame = cls._procrustes(x, iterations)
            x = np.stack([_apply(_similarity(shape, frame), shape) for shape in x])
        n, k = x.shape[:2]
        flat = x.reshape(n, 2 * k)
        mean = flat.mean(0)
        _, sv, vt = np.linalg.svd(flat - mean, full_matrices=False)
        variances = sv**2 / max(n - 1, 1)
        model = cls(mean.reshape(k, 2), vt, variances, align, n)
        model.frame = frame
        return model

    @staticmethod
    def _procrustes(x: np.ndarray, iterations: int) -> np.ndarray:
        """The generalised Procrustes mean: centred, unit norm (the frame shapes are aligned to)."""
        ref = x[0] - x[0].mean(0)
        ref = ref / np.linalg.norm(ref)
        for _ in range(iterations):
            new = np.mean([_apply(_similarity(shape, ref), shape) for shape in x], axis=0)
            new = new - new.mean(0)
            new = new / np.linalg.norm(new)
            if np.abs(new - ref).max() < 1e-10:
                break
            ref = new
        return ref

    @property
    def max_modes(self) -> int:
        return int(self.components.shape[0])

    def modes_for(self, share: float) -> int:
        """The fewest modes whose variance reaches ``share`` of the total (the reference's 80-90 %)."""
        if not 0 < share <= 1:
            raise ProtegeError(f"shape model: a variance share is in (0, 1], got {share}")
        cum = np.cumsum(self.variances) / max(self.variances.sum(), 1e-300)
        return int(min(np.searchsorted(cum, share - 1e-12) + 1, self.max_modes))

    def project(self, shapes: np.ndarray, modes: int) -> np.ndarray:
        """``shapes`` ``(N, K, 2)`` (or one ``(K, 2)``) reconstructed from their first ``modes`` modes."""
        x = _check_points(shapes, "shape model")
        one = x.ndim == 2
        x = x[None] if one else x
        if x.shape[1:] != self.mean.shape:
            raise ProtegeError(
                f"shape model: it was fitted on {self.mean.shape[0]}-point shapes, got {x.shape[1]} points"
            )
        if not 0 <= modes <= self.max_modes:
            raise ProtegeError(
                f"shape model: {modes} modes asked, but {self.count} shapes of {self.mean.shape[0]} points "
                f"give at most {self.max_modes} (min(shapes, 2·points)); ask for 0..{self.max_modes}"
            )
        p = self.components[:modes]  # (m, 2K)
        out = np.empty_like(x)
        for i, shape in enumerate(x):
            if self.frame is not None:
                s, r, t = _similarity(shape, self.frame)
                aligned = s * shape @ r.T + t
            else:
                aligned = shape
            d = aligned.reshape(-1) - self.mean.reshape(-1)
            soft = (self.mean.reshape(-1) + p.T @ (p @ d)).reshape(self.mean.shape)
            out[i] = (soft - t) @ r / s if self.frame is not None else soft
        return out[0] if one else out


def asm_targets(points: np.ndarray, modes: int | float, align: bool = False) -> np.ndarray:
    """Soft landmarks: ``points`` ``(N, K, 2)`` projected on the shape model fitted on them with
    ``modes`` modes (an int) or the fewest reaching that variance share (a float in (0, 1))."""
    model = ShapeModel.fit(points, align=align)
    count = model.modes_for(modes) if isinstance(modes, float) and modes < 1 else int(modes)
    return model.project(points, count).astype(np.float32)
