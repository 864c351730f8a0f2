"""Point-cloud data: a procedural benchmark built from real geometry, and readers of the usual formats.

No ModelNet, ShapeNet or KITTI ships in any package reachable offline, so the benchmark
(:class:`ShapeClouds`, data source ``shapes3d``) samples surfaces (``trimesh``) of

- parametric primitives and their compositions, 14 classes with random proportions
  (:data:`PROCEDURAL`: ellipsoid, box, cylinder, cone, torus, capsule, table, lamp, snowman,
  dumbbell, mushroom, chair, rocket, mug), and
- the real meshes shipped with ``pyvista`` (:data:`REAL`: airplane, ant, nut; ``families`` picks
  them), an extra class family. Each real class is one mesh: its samples differ only by the
  stretch, view, rotation and noise below (they are not held out between splits).

Every cloud: area-uniform surface samples, a random anisotropic stretch (±15 % per axis), centred and
scaled into the unit sphere, a partial view with probability ``partial`` (the points behind a random
plane through the cloud are dropped, 20–45 % of them, then the rest resampled to ``num_points``), a
random rotation (``rotation``: ``"z"`` about the up axis, ``"so3"`` any, ``"none"``) and Gaussian
noise (``noise``, clipped at 3σ). Part labels (segmentation): which primitive of a composition a
point came from (a table's top or legs), and for the real meshes the rank of the connected component
by area (the largest; the next two; the rest). Every cloud is a pure function of ``(seed, split,
index)``; train, val and test draw from disjoint seed streams. Labels are balanced (``index % C``).

Readers (:func:`read_points`): ModelNet ``.off`` meshes (surface-sampled) and ``.txt`` resampled
clouds (``x,y,z,nx,ny,nz`` per line), ModelNet40 HDF5 (``data``/``label``, needs ``h5py``), ShapeNet-Part
``.txt`` (``x y z nx ny nz part`` per line), ``.ply`` (mesh or cloud, via trimesh) and ``.npy``
(``(N, C)`` arrays). :class:`PointFolder` reads a folder of class sub-folders of such files,
:class:`PartFolder` ShapeNet-Part's category folders (:func:`load_part_folder` splits it).

Items: ``(points float32 (N, C), label int64)`` for classification; with ``target="parts"`` a dict
``{"points": (N, C), "parts": int64 (N,), "category": int64, "index": int}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ProtegeError, closest
from .splits import DataSplits

__all__ = [
    "FAMILIES",
    "PROCEDURAL",
    "REAL",
    "PartFolder",
    "PartSplits",
    "PointFolder",
    "ShapeClouds",
    "load_part_folder",
    "load_pointcloud_splits",
    "read_points",
    "resample",
]

Part = tuple[Any, str]  # (trimesh.Trimesh, part name)
_SPLITS = {"train": 0, "val": 1, "test": 2}
ROTATIONS = ("z", "so3", "none")
SUFFIXES = (".off", ".txt", ".ply", ".npy", ".h5")


# --------------------------------------------------------------------------- shapes


def _tm() -> Any:
    import trimesh

    return trimesh


def _moved(mesh: Any, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Any:
    mesh.apply_translation([x, y, z])
    return mesh


def _ellipsoid(r: np.random.Generator) -> list[Part]:
    m = _tm().creation.icosphere(subdivisions=2)
    m.apply_scale(r.uniform(0.5, 1.0, 3))
    return [(m, "body")]


def _box(r: np.random.Generator) -> list[Part]:
    return [(_tm().creation.box(extents=r.uniform(0.4, 1.2, 3)), "body")]


def _cylinder(r: np.random.Generator) -> list[Part]:
    return [(_tm().creation.cylinder(radius=r.uniform(0.2, 0.5), height=r.uniform(0.8, 1.6)), "body")]


def _cone(r: np.random.Generator) -> list[Part]:
    return [(_tm().creation.cone(radius=r.uniform(0.3, 0.6), height=r.uniform(0.8, 1.5)), "body")]


def _torus(r: np.random.Generator) -> list[Part]:
    return [(_tm().creation.torus(r.uniform(0.6, 0.9), r.uniform(0.12, 0.3)), "body")]


def _capsule(r: np.random.Generator) -> list[Part]:
    return [(_tm().creation.capsule(height=r.uniform(0.6, 1.4), radius=r.uniform(0.2, 0.4)), "body")]


def _table(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    w, d, h, t = r.uniform(1.0, 1.6), r.uniform(0.6, 1.1), r.uniform(0.5, 0.9), r.uniform(0.05, 0.12)
    top = _moved(c.box(extents=[w, d, t]), z=h)
    legs = [
        _moved(c.cylinder(radius=0.04, height=h), sx * (w / 2 - 0.08), sy * (d / 2 - 0.08), h / 2)
        for sx in (-1, 1)
        for sy in (-1, 1)
    ]
    return [(top, "top"), *((leg, "leg") for leg in legs)]


def _lamp(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    h = r.uniform(0.8, 1.4)
    base = c.cylinder(radius=r.uniform(0.25, 0.4), height=0.06)
    pole = _moved(c.cylinder(radius=0.03, height=h), z=h / 2)
    shade = _moved(c.cone(radius=r.uniform(0.25, 0.45), height=r.uniform(0.25, 0.4)), z=h - 0.1)
    return [(base, "base"), (pole, "pole"), (shade, "shade")]


def _snowman(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    r1, r2, r3 = r.uniform(0.4, 0.5), r.uniform(0.28, 0.36), r.uniform(0.16, 0.24)
    low = c.icosphere(2, radius=r1)
    mid = _moved(c.icosphere(2, radius=r2), z=r1 + r2 * 0.8)
    head = _moved(c.icosphere(2, radius=r3), z=r1 + 1.6 * r2 + r3 * 0.8)
    return [(low, "body"), (mid, "body"), (head, "head")]


def _dumbbell(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    length, w = r.uniform(0.8, 1.4), r.uniform(0.2, 0.35)
    bar = c.cylinder(radius=0.05, height=length)
    return [(bar, "bar"), (_moved(c.icosphere(2, radius=w), z=length / 2), "weight"),
            (_moved(c.icosphere(2, radius=w), z=-length / 2), "weight")]  # fmt: skip


def _mushroom(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    h = r.uniform(0.5, 0.9)
    stem = _moved(c.cylinder(radius=r.uniform(0.08, 0.16), height=h), z=h / 2)
    cap = c.icosphere(2, radius=1.0)
    cap.apply_scale([r.uniform(0.4, 0.6), r.uniform(0.4, 0.6), r.uniform(0.15, 0.3)])
    return [(stem, "stem"), (_moved(cap, z=h), "cap")]


def _chair(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    w, h, back = r.uniform(0.5, 0.7), r.uniform(0.4, 0.6), r.uniform(0.4, 0.8)
    seat = _moved(c.box(extents=[w, w, 0.06]), z=h)
    rest = _moved(c.box(extents=[w, 0.06, back]), y=w / 2, z=h + back / 2)
    legs = [
        _moved(c.box(extents=[0.05, 0.05, h]), sx * (w / 2 - 0.03), sy * (w / 2 - 0.03), h / 2)
        for sx in (-1, 1)
        for sy in (-1, 1)
    ]
    return [(seat, "seat"), (rest, "back"), *((leg, "leg") for leg in legs)]


def _rocket(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    h, rad = r.uniform(1.0, 1.6), r.uniform(0.12, 0.2)
    body = _moved(c.cylinder(radius=rad, height=h), z=h / 2)
    nose = _moved(c.cone(radius=rad, height=r.uniform(0.25, 0.5)), z=h)
    fins = []
    for i in range(3):
        fin = c.box(extents=[0.3, 0.02, 0.3])
        fin.apply_translation([rad + 0.12, 0, 0.15])
        fin.apply_transform(_tm().transformations.rotation_matrix(2 * math.pi * i / 3, [0, 0, 1]))
        fins.append((fin, "fin"))
    return [(body, "body"), (nose, "nose"), *fins]


def _mug(r: np.random.Generator) -> list[Part]:
    c = _tm().creation
    rad, h = r.uniform(0.3, 0.45), r.uniform(0.6, 1.0)
    body = _moved(c.annulus(r_min=rad - 0.04, r_max=rad, height=h), z=h / 2)
    handle = c.torus(h * 0.25, 0.04)
    handle.apply_transform(_tm().transformations.rotation_matrix(math.pi / 2, [1, 0, 0]))
    return [(body, "body"), (_moved(handle, x=rad, z=h / 2), "handle")]


#: the procedural classes, in label order
PROCEDURAL: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "ellipsoid": _ellipsoid,
    "box": _box,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "capsule": _capsule,
    "table": _table,
    "lamp": _lamp,
    "snowman": _snowman,
    "dumbbell": _dumbbell,
    "mushroom": _mushroom,
    "chair": _chair,
    "rocket": _rocket,
    "mug": _mug,
}
#: the real meshes shipped with pyvista (files in ``pyvista/examples``)
REAL: tuple[str, ...] = ("airplane", "ant", "nut")
FAMILIES = ("procedural", "real")


@lru_cache(maxsize=8)
def _real_parts(name: str) -> tuple[tuple[Any, str], ...]:
    """A pyvista mesh split into parts by connected components ranked by area."""
    import importlib.util

    spec = importlib.util.find_spec("pyvista")
    if spec is None or not spec.submodule_search_locations:
        raise ProtegeError("the real-mesh family needs pyvista (pip install 'protege[pointcloud]')")
    path = Path(spec.submodule_search_locations[0]) / "examples" / f"{name}.ply"
    mesh = _tm().load(str(path), force="mesh")
    comps = sorted(mesh.split(only_watertight=False), key=lambda m: -m.area)
    names = ["main", "second", "second", *(["rest"] * max(0, len(comps) - 3))]
    return tuple((comp, names[i]) for i, comp in enumerate(comps) if comp.area > 0)


def class_parts(classes: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Global part names (``"table/top"``) and, per class, the indices of its parts."""
    names: list[str] = []
    per_class: list[list[int]] = []
    for cls in classes:
        if cls in PROCEDURAL:
            local = list(dict.fromkeys(p for _, p in PROCEDURAL[cls](np.random.default_rng(0))))
        else:
            local = list(dict.fromkeys(p for _, p in _real_parts(cls)))
        per_class.append([len(names) + i for i in range(len(local))])
        names += [f"{cls}/{p}" for p in local]
    return names, per_class


def _rotation(r: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "none":
        return np.eye(3)
    if kind == "z":
        a = r.uniform(0, 2 * math.pi)
        return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    q, rr = np.linalg.qr(r.normal(size=(3, 3)))
    q = q * np.sign(np.diag(rr))
    return q if np.linalg.det(q) > 0 else -q


def resample(
    points: np.ndarray, n: int, rng: np.random.Generator, *extra: np.ndarray
) -> tuple[np.ndarray, ...]:
    """``n`` rows of ``points`` (and the same rows of each of ``extra``): a random subset when there
    are more, all of them plus random repeats when fewer (repeats change no max-pooled feature)."""
    if len(points) == 0:
        raise ProtegeError("a point cloud has no points")
    if len(points) >= n:
        idx = rng.choice(len(points), n, replace=False)
    else:
        idx = np.concatenate([rng.permutation(len(points)), rng.choice(len(points), n - len(points))])
    return (points[idx], *(e[idx] for e in extra))


@dataclass(frozen=True)
class CloudSettings:
    """How :class:`ShapeClouds` draws a cloud (module docstring)."""

    num_points: int = 1024
    rotation: str = "z"
    partial: float = 0.25
    noise: float = 0.01


def make_cloud(
    parts: Sequence[Part], settings: CloudSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(points (N, 3) float32, part index (N,) int64 into the distinct names of parts)`` sampled
    from the meshes ``parts`` as the module docstring says."""
    tm = _tm()
    local = list(dict.fromkeys(p for _, p in parts))
    mesh = tm.util.concatenate([m for m, _ in parts])
    face_part = np.concatenate([np.full(len(m.faces), local.index(p)) for m, p in parts])
    over = int(settings.num_points * 2)
    pts, faces = tm.sample.sample_surface(mesh, over, seed=rng)
    labels = face_part[faces]
    pts = pts * rng.uniform(0.85, 1.15, 3)
    pts = pts - (pts.max(0) + pts.min(0)) / 2
    pts = pts / max(float(np.linalg.norm(pts, axis=1).max()), 1e-9)
    if rng.random() < settings.partial:
        view = rng.normal(size=3)
        depth = pts @ (view / np.linalg.norm(view))
        keep = depth > np.quantile(depth, rng.uniform(0.2, 0.45))
        pts, labels = pts[keep], labels[keep]
    pts, labels = resample(pts, settings.num_points, rng, labels)
    pts = pts @ _rotation(rng, settings.rotation).T
    if settings.noise > 0:
        pts = pts + np.clip(rng.normal(0, settings.noise, pts.shape), -3 * settings.noise, 3 * settings.noise)
    return pts.astype(np.float32), labels.astype(np.int64)


class ShapeClouds(Dataset[Any]):
    """The procedural benchmark's ``split`` (module docstring): ``size`` clouds of ``classes``,
    generated once at construction (a few ms each)."""

    def __init__(
        self,
        split: str,
        size: int,
        classes: Sequence[str],
        settings: CloudSettings = CloudSettings(),
        seed: int = 0,
        target: str = "class",
    ) -> None:
        if split not in _SPLITS:
            raise ProtegeError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        self.classes, self.settings, self.target = list(classes), settings, target
        self.part_names, self.class_parts = class_parts(self.classes)
        clouds, labels, parts = [], [], []
        for i in range(int(size)):
            rng = np.random.default_rng([int(seed), _SPLITS[split], i])
            c = i % len(self.classes)
            name = self.classes[c]
            pieces = PROCEDURAL[name](rng) if name in PROCEDURAL else list(_real_parts(name))
            pts, local = make_cloud(pieces, settings, rng)
            clouds.append(pts)
            labels.append(c)
            parts.append(np.asarray(self.class_parts[c])[local])
        self.points = torch.from_numpy(np.stack(clouds)) if clouds else torch.zeros(0, settings.num_points, 3)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.parts = (
            torch.from_numpy(np.stack(parts)) if parts else torch.zeros(0, settings.num_points).long()
        )

    def __len__(self) -> int:
        return len(self.labels)

    def fixed_tensors(self) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``(points, labels, description)``: a classification split is read as stored, so a teacher-output
        cache (:mod:`protege.engine.cache`) holds one exact view per cloud.

        Raises:
            ProtegeError: a part-segmentation split (its items are dicts; cache it with a classification
                split, or distill online).
        """
        if self.target == "parts":
            raise ProtegeError(
                "a teacher-output cache holds classification splits of shapes3d, not part segmentation "
                "(per-point targets); distill online (remove `cache:` from the config)"
            )
        return self.points, self.labels, f"ShapeClouds(classes={len(self.classes)}, transform=None)"

    def __getitem__(self, i: int) -> Any:
        if self.target == "parts":
            return {"points": self.points[i], "parts": self.parts[i], "category": self.labels[i], "index": i}
        return self.points[i], self.labels[i]


# --------------------------------------------------------------------------- file formats


def _read_off(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of an OFF file; ModelNet's ``OFF<nv> <nf> <ne>`` first lines included."""
    tokens = path.read_text().split()
    if not tokens or not tokens[0].upper().startswith("OFF"):
        raise ProtegeError(f"{path} is not an OFF file (it must start with 'OFF')")
    head = tokens[0][3:]
    rest = ([head] if head else []) + tokens[1:]
    try:
        nv, nf = int(rest[0]), int(rest[1])
        values = rest[3:]
        verts = np.asarray(values[: 3 * nv], dtype=np.float64).reshape(nv, 3)
        faces: list[list[int]] = []
        pos = 3 * nv
        for _ in range(nf):
            k = int(values[pos])
            ring = [int(v) for v in values[pos + 1 : pos + 1 + k]]
            faces += [[ring[0], ring[j], ring[j + 1]] for j in range(1, k - 1)]  # fan triangulation
            pos += 1 + k
    except (ValueError, IndexError):
        raise ProtegeError(f"{path}: a damaged OFF file (counts and values do not agree)") from None
    return verts, np.asarray(faces, dtype=np.int64).reshape(-1, 3)


def _sample_mesh(verts: np.ndarray, faces: np.ndarray, n: int, seed: int, path: Path) -> np.ndarray:
    if len(faces) == 0:
        return verts.astype(np.float32)
    mesh = _tm().Trimesh(vertices=verts, faces=faces, process=False)
    if mesh.area <= 0:
        raise ProtegeError(f"{path}: the mesh has no surface to sample")
    pts, _ = _tm().sample.sample_surface(mesh, n, seed=np.random.default_rng(seed))
    return np.asarray(pts, dtype=np.float32)


def read_points(path: str | Path, num_points: int = 1024, seed: int = 0) -> dict[str, np.ndarray]:
    """The cloud(s) in ``path``: ``{"points": (N, C) float32}`` plus ``"parts"`` (N,) for
    ShapeNet-Part files, or for an HDF5 file ``{"points": (M, N, C), "labels": (M,)}``.

    Meshes (``.off``, a ``.ply`` with faces) are surface-sampled to ``num_points`` (seeded); point
    files are returned as stored (see :func:`resample`). Suffixes: :data:`SUFFIXES`."""
    p = Path(path)
    if not p.is_file():
        raise ProtegeError(f"point-cloud file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".off":
        return {"points": _sample_mesh(*_read_off(p), num_points, seed, p)}
    if suffix == ".txt":
        text = p.read_text().strip()
        delimiter = "," if "," in text.splitlines()[0] else None
        try:
            arr = np.loadtxt(p, delimiter=delimiter, ndmin=2, dtype=np.float64)
        except ValueError as e:
            raise ProtegeError(f"{p}: not a table of numbers ({e})") from None
        if arr.shape[1] == 7:  # ShapeNet-Part: x y z nx ny nz part
            return {"points": arr[:, :6].astype(np.float32), "parts": arr[:, 6].astype(np.int64)}
        return {"points": _checked(arr, p)}
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise ProtegeError(f"{p}: not a plain numeric .npy array ({e})") from None
        return {"points": _checked(arr, p)}
    if suffix == ".ply":
        loaded = _tm().load(str(p))
        faces = getattr(loaded, "faces", None)
        verts = np.asarray(loaded.vertices)
        if faces is not None and len(faces):
            return {"points": _sample_mesh(verts, np.asarray(faces), num_points, seed, p)}
        return {"points": _checked(verts, p)}
    if suffix == ".h5":
        try:
            import h5py
        except ImportError:
            raise ProtegeError(
                f"{p} is a ModelNet40 HDF5 file; reading it needs h5py (pip install h5py)"
            ) from None
        with h5py.File(p, "r") as f:
            if "data" not in f or "label" not in f:
                raise ProtegeError(f"{p}: a ModelNet40 HDF5 file holds 'data' and 'label'; found {list(f)}")
            return {
                "points": np.asarray(f["data"], dtype=np.float32),
                "labels": np.asarray(f["label"], dtype=np.int64).reshape(-1),
            }
    raise ProtegeError(f"{p}: unsupported point-cloud file; expected one of {', '.join(SUFFIXES)}")


def _checked(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.number):
        raise ProtegeError(f"{path}: expected an (N, C >= 3) array of points, got shape {arr.shape}")
    return arr.astype(np.float32)


class PointFolder(Dataset[Any]):
    """A folder of class sub-folders of point-cloud files (``root/<class>/*.off``); ModelNet's
    ``root/<class>/<split>/*.off`` layout is read with ``split``. Every cloud is read, resampled to
    ``num_points`` (seeded by its index) and kept in memory; ``channels`` keeps the first values of
    each point (3: coordinates only)."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        num_points: int = 1024,
        channels: int = 3,
        seed: int = 0,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ProtegeError(f"point-cloud folder not found: {root}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        files: list[tuple[Path, int]] = []
        for c, name in enumerate(self.classes):
            folder = root / name / split if split and (root / name / split).is_dir() else root / name
            files += [(f, c) for f in sorted(folder.iterdir()) if f.suffix.lower() in SUFFIXES[:4]]
        if not files:
            raise ProtegeError(f"{root} holds no class folders of {', '.join(SUFFIXES[:4])} files")
        clouds = []
        for i, (f, _) in enumerate(files):
            pts = read_points(f, num_points, seed + i)["points"]
            if pts.shape[1] < channels:
                raise ProtegeError(f"{f}: {pts.shape[1]} values per point, fewer than channels={channels}")
            (pts,) = resample(pts[:, :channels], num_points, np.random.default_rng([seed, i]))
            clouds.append(pts)
        self.points = torch.from_numpy(np.stack(clouds))
        self.labels = torch.tensor([c for _, c in files], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def fixed_tensors(self) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``(points, labels, description)``: the clouds are read as stored (one view each in a
        teacher-output cache, :mod:`protege.engine.cache`)."""
        return self.points, self.labels, f"PointFolder(classes={len(self.classes)}, transform=None)"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[i], self.labels[i]


class PartFolder(Dataset[Any]):
    """ShapeNet-Part as distributed (``shapenetcore_partanno_segmentation_benchmark_v0_normal``):
    ``root/<category>/*.txt``, one ``x y z nx ny nz part`` line per point, part labels global across
    categories. Every cloud is read and resampled to ``num_points`` (seeded); ``channels`` keeps the
    first values per point (6 with normals). Items as :class:`ShapeClouds`' with ``target="parts"``."""

    def __init__(self, root: str | Path, num_points: int = 2048, channels: int = 3, seed: int = 0) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ProtegeError(f"ShapeNet-Part folder not found: {root}")
        self.categories = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.txt")))
        if not self.categories:
            raise ProtegeError(f"{root} holds no category folders of ShapeNet-Part .txt files")
        clouds, parts, labels = [], [], []
        seen: list[set[int]] = [set() for _ in self.categories]
        for c, name in enumerate(self.categories):
            for f in sorted((root / name).glob("*.txt")):
                item = read_points(f)
                if "parts" not in item:
                    raise ProtegeError(
                        f"{f}: a ShapeNet-Part file has 7 values per line (x y z nx ny nz part)"
                    )
                rng = np.random.default_rng([seed, len(clouds)])
                pts, lab = resample(item["points"][:, :channels], num_points, rng, item["parts"])
                clouds.append(pts)
                parts.append(lab)
                labels.append(c)
                seen[c].update(int(v) for v in np.unique(lab))
        self.points = torch.from_numpy(np.stack(clouds))
        self.parts = torch.from_numpy(np.stack(parts)).long()
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.category_parts = [sorted(s) for s in seen]
        self.num_parts = int(self.parts.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"points": self.points[i], "parts": self.parts[i], "category": self.labels[i], "index": i}


class _Subset(Dataset[Any]):
    def __init__(self, base: Dataset[Any], indices: Sequence[int]) -> None:
        self.base, self.indices = base, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def load_part_folder(
    root: str | Path,
    num_points: int = 2048,
    channels: int = 3,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.2,
) -> PartSplits:
    """:class:`PartFolder` split (stratified by category, ``seed``) into train, val and test."""
    from .splits import stratified_split

    data = PartFolder(root, num_points, channels, seed)
    labels = data.labels.numpy()
    rest, test_idx = stratified_split(labels, test, seed)
    kept, val_idx = stratified_split(labels[rest], val / max(1e-9, 1 - test), seed)
    names = [f"part{i}" for i in range(data.num_parts)]
    return PartSplits(
        train=_Subset(data, rest[kept]),
        val=_Subset(data, rest[val_idx]),
        test=_Subset(data, test_idx),
        num_classes=data.num_parts,
        in_chans=channels,
        input_size=num_points,
        class_names=names,
        source="shapenetpart",
        options={"root": str(root), "num_points": num_points, "channels": channels, "seed": seed},
        categories=data.categories,
        category_parts=data.category_parts,
    )


# --------------------------------------------------------------------------- splits

#: options of the ``shapes3d`` source and their defaults
OPTIONS: dict[str, Any] = {
    "num_points": 1024,
    "train": 1400,
    "val": 340,
    "test": 680,
    "families": ["procedural", "real"],
    "rotation": "z",
    "partial": 0.25,
    "noise": 0.01,
}


@dataclass
class PartSplits(DataSplits):
    """Splits of part segmentation: ``num_classes`` counts part labels (``class_names`` names them,
    ``"table/top"``); ``categories`` the object classes and ``category_parts`` each one's parts."""

    task: ClassVar[str] = "pointcloud_parts"

    categories: list[str] = field(default_factory=list)
    category_parts: list[list[int]] = field(default_factory=list)


def _settings(options: Mapping[str, Any]) -> tuple[dict[str, Any], CloudSettings, list[str]]:
    bad = sorted(set(options) - set(OPTIONS))
    if bad:
        near = closest(bad[0], OPTIONS)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(f"unknown shapes3d option {bad[0]!r}.{hint} Options: {', '.join(OPTIONS)}")
    values = {**OPTIONS, **dict(options)}
    for key in ("num_points", "train", "val"):
        if not isinstance(values[key], int) or values[key] < 1:
            raise ProtegeError(f"shapes3d: {key} must be a whole number >= 1, got {values[key]!r}")
    if not isinstance(values["test"], int) or values["test"] < 0:
        raise ProtegeError(f"shapes3d: test must be a whole number >= 0, got {values['test']!r}")
    if values["rotation"] not in ROTATIONS:
        raise ProtegeError(
            f"shapes3d: rotation must be one of {', '.join(ROTATIONS)}, got {values['rotation']!r}"
        )
    if not 0 <= float(values["partial"]) <= 1 or not 0 <= float(values["noise"]) < 1:
        raise ProtegeError("shapes3d: partial must be in [0, 1] and noise in [0, 1)")
    families = values["families"]
    families = [families] if isinstance(families, str) else list(families)
    if not families or set(families) - set(FAMILIES):
        raise ProtegeError(f"shapes3d: families must be a list of {', '.join(FAMILIES)}, got {families!r}")
    classes = [*(PROCEDURAL if "procedural" in families else ()), *(REAL if "real" in families else ())]
    values["families"] = families
    settings = CloudSettings(
        int(values["num_points"]), str(values["rotation"]), float(values["partial"]), float(values["noise"])
    )
    return values, settings, classes


def load_pointcloud_splits(options: Mapping[str, Any], seed: int = 0, target: str = "class") -> DataSplits:
    """The ``shapes3d`` benchmark's splits (``target="class"``: :class:`DataSplits`, labels the
    object classes; ``"parts"``: :class:`PartSplits`, per-point part labels)."""
    values, settings, classes = _settings(options)
    made = {
        s: ShapeClouds(s, values[s], classes, settings, seed, target)
        for s in ("train", "val", "test")
        if values[s]
    }
    common = dict(
        train=made["train"],
        val=made["val"],
        test=made.get("test"),
        in_chans=3,
        input_size=settings.num_points,
        source="shapes3d",
        options={**values, "seed": seed, "target": target},
    )
    if target == "parts":
        first = made["train"]
        return PartSplits(
            num_classes=len(first.part_names),
            class_names=first.part_names,
            categories=list(classes),
            category_parts=first.class_parts,
            **common,
        )
    return DataSplits(num_classes=len(classes), class_names=list(classes), **common)
