"""Landmark (keypoint) regression: images → ``K`` points each; the facial-landmark task of 300W,
WFLW and COFW, and the distillation of Fard & Mahoor (a Tough and a Tolerant teacher, KD-Loss).

A **batch** is a dict: ``"image"`` ``(B, 3, S, S)`` in [0, 1], ``"points"`` ``(B, K, 2)`` the target
points *normalised to the image* (``x_px / S - 0.5``, so the image spans [-0.5, 0.5]; see
:mod:`protege.data.landmarks`), ``"visible"`` ``(B, K)`` (optional; not visible = occluded, still
scored, as the benchmarks do) and ``"index"``.

A **model** (:class:`PointRegressor`, built by :meth:`LandmarkTask.build_model`) is any model
:func:`protege.models.build_model` builds (a timm name such as ``resnet10t`` or
``mobilenetv2_050``, a protege zoo model) with ``2K`` outputs as its regression head, its outputs
read as ``(B, K, 2)`` points. :meth:`LandmarkTask.forward` returns them as ``"logits"`` (the key
every term reads by default): ``(B, K, 2)``.

**Data** (``data.source``; every option under ``data.options``):

- ``faces``: procedural faces with exact 68 points (:class:`~protege.data.landmarks.SyntheticFaces`;
  ``size``, ``train``, ``val``, ``test`` counts, ``occlusion`` probability);
- ``300w``: ``.pts`` files with their images (``root``; ``train``/``val``/``test`` sub-directories;
  no ``val``: a ``val_fraction`` of train, seeded by ``split_seed``);
- ``wflw``: ``train``/``test`` annotation files and the ``images`` directory (relative to ``root``);
- ``cofw``: ``train``/``test`` ``.mat`` files (relative to ``root``).

``targets: asm`` trains on *soft* landmarks: the training shapes projected on an Active Shape Model
fitted on them (``asm_modes``: a number of modes, or a variance share in (0, 1) such as 0.9;
``asm_align``: Procrustes-align before the PCA); validation and test keep the ground truth. That is
the Tolerant teacher's training set; ``targets: hard`` (default) is the Tough teacher's.

**Evaluation** (:class:`LandmarkEvaluator`; shares, not percent): ``nme_io`` the mean error per point
divided by the inter-ocular distance (outer eye corners; 68 points: 36 and 45), ``nme_ip`` divided by
the inter-pupil distance (the eyes' centres: the mean of each eye's contour points), ``fr_*`` the
share of images whose error is above 0.1, ``auc_*`` the area under the cumulative error curve up to
0.1 (divided by 0.1), ``nme``/``fr``/``auc`` those of ``data.options.nme.norm`` (default
inter-ocular), ``nme_pt/<k>`` the error of point ``k`` alone (the per-landmark table), and with a
teacher ``tnme`` (the student's error against the teacher's points) and ``teacher/…``. The index
sets are known for 68 (300W), 98 (WFLW) and 29 (COFW, pupils only) points; other layouts give them
as ``data.options.nme: {ocular: [i, j], pupil: [[…left eye…], […right eye…]]}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..data.splits import DataSplits
from ..errors import ProtegeError, closest
from .base import Evaluator, Outputs, Task

SOURCES = ("faces", "300w", "wflw", "cofw")
TARGETS = ("hard", "asm")
NORMS = ("ocular", "pupil")
#: failure threshold and the AUC's upper limit (300W/WFLW convention)
THRESHOLD = 0.1

#: default normalisation index sets by layout: outer eye corners; each eye's points (pupil centre)
DEFAULT_NORMS: dict[int, dict[str, Any]] = {
    68: {"ocular": (36, 45), "pupil": (tuple(range(36, 42)), tuple(range(42, 48)))},
    98: {"ocular": (60, 72), "pupil": ((96,), (97,))},
    29: {"pupil": ((16,), (17,))},
}
_OPTIONS = {
    "faces": {"size", "train", "val", "test", "occlusion"},
    "300w": {"size", "train", "val", "test", "margin"},
    "wflw": {"size", "train", "test", "images", "margin"},
    "cofw": {"size", "train", "test", "margin"},
}
_COMMON = {"targets", "asm_modes", "asm_align", "nme"}


# -- normalisation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalisation:
    """Which points define the NME's normalising distances (module docstring), and the primary one."""

    ocular: tuple[int, int] | None = None
    pupil: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    norm: str = "ocular"

    @classmethod
    def parse(cls, given: Any, num_points: int) -> Normalisation:
        given = dict(given or {})
        bad = sorted(set(given) - {"ocular", "pupil", "norm"})
        if bad:
            raise ProtegeError(f"data.options.nme: unknown key {bad[0]!r}; keys: ocular, pupil, norm")
        base = DEFAULT_NORMS.get(num_points, {})
        has = {k for k in ("ocular", "pupil") if k in given or k in base}
        norm = str(given.get("norm", "pupil" if has == {"pupil"} else "ocular"))
        if norm not in NORMS:
            raise ProtegeError(f"data.options.nme.norm is one of {', '.join(NORMS)}, not {norm!r}")
        ocular, pupil = given.get("ocular", base.get("ocular")), given.get("pupil", base.get("pupil"))

        def index(i: Any) -> int:
            if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < num_points:
                raise ProtegeError(
                    f"data.options.nme: point index {i!r} is not in 0..{num_points - 1} ({num_points} points)"
                )
            return int(i)

        if ocular is not None:
            if len(ocular) != 2:
                raise ProtegeError(f"data.options.nme.ocular is two point indices [i, j], got {ocular!r}")
            ocular = (index(ocular[0]), index(ocular[1]))
        if pupil is not None:
            if len(pupil) != 2 or not all(isinstance(p, (list, tuple)) and p for p in pupil):
                raise ProtegeError(
                    f"data.options.nme.pupil is two lists of point indices (one per eye), got {pupil!r}"
                )
            pupil = (tuple(index(i) for i in pupil[0]), tuple(index(i) for i in pupil[1]))
        out = cls(ocular, pupil, norm)
        if getattr(out, norm) is None:
            raise ProtegeError(
                f"NME normalised by the inter-{norm} distance needs its points, which a {num_points}-point "
                f"layout has no default for: give data.options.nme.{norm} "
                + ("[i, j] (the outer eye corners)" if norm == "ocular" else "[[left eye…], [right eye…]]")
            )
        return out

    def distances(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The normalising distance of each shape ``(N, K, 2)`` by kind (``io``, ``ip``), ``(N,)``."""
        out = {}
        if self.ocular is not None:
            out["io"] = (target[:, self.ocular[0]] - target[:, self.ocular[1]]).norm(dim=-1)
        if self.pupil is not None:
            left = target[:, list(self.pupil[0])].mean(1)
            right = target[:, list(self.pupil[1])].mean(1)
            out["ip"] = (left - right).norm(dim=-1)
        return out

    @property
    def primary(self) -> str:
        return "io" if self.norm == "ocular" else "ip"


def nme_per_image(pred: torch.Tensor, target: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Each image's mean point error over its normalising distance: ``(N, K, 2)``, ``(N,)`` → ``(N,)``."""
    return (pred - target).norm(dim=-1).mean(-1) / distance


def auc_fr(errors: torch.Tensor, threshold: float = THRESHOLD) -> tuple[float, float]:
    """The area under the cumulative error distribution up to ``threshold`` (divided by it) and the
    failure rate (share of errors above it). ``CED(x) = P(e ≤ x)``, so
    ``∫_0^τ CED(x) dx / τ = mean(max(0, τ - e)) / τ`` exactly (no binning)."""
    e = errors.double()
    return float((threshold - e).clamp(min=0).mean() / threshold), float((e > threshold).double().mean())


# -- data ---------------------------------------------------------------------------------------


@dataclass
class LandmarkDataSplits(DataSplits):
    """The splits of the landmarks task, with the point count and the NME's normalisation."""

    task: ClassVar[str] = "landmarks"

    num_points: int = 68
    normalisation: Normalisation = dataclasses.field(default_factory=Normalisation)


def _count(options: Mapping[str, Any], key: str, default: int, low: int = 1) -> int:
    value = options.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ProtegeError(f"data.options.{key} must be an integer ≥ {low}, got {value!r}")
    return value


def _carve(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    from ..data.landmarks import LandmarkSet

    n = len(data)
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise ProtegeError(f"{n} training shapes are too few to carve a validation split from")

    def take(idx: np.ndarray) -> LandmarkSet:
        return LandmarkSet(data.images[idx], data.points[idx], data.visible[idx])

    return take(np.sort(order[k:])), take(np.sort(order[:k]))


def load_landmark_data(
    data: Mapping[str, Any],
    teachers: Sequence[Mapping[str, Any]] = (),
    students: Sequence[Mapping[str, Any]] = (),
) -> LandmarkDataSplits:
    """The run's splits (module docstring, "Data")."""
    from ..data import landmarks as lm

    source = str(data.get("source") or "faces")
    if source not in SOURCES:
        near = closest(source, SOURCES)
        raise ProtegeError(
            f"task landmarks reads data.source {', '.join(SOURCES)}, not {source!r}"
            + (f"; did you mean {near[0]!r}?" if near else "")
        )
    options = dict(data.get("options") or {})
    bad = sorted(set(options) - _OPTIONS[source] - _COMMON)
    if bad:
        raise ProtegeError(
            f"data.options.{bad[0]} is not an option of source {source}; options: "
            + ", ".join(sorted(_OPTIONS[source] | _COMMON))
        )
    size = _count(options, "size", 64, 8)
    seed = int(data.get("split_seed", 0))
    root = Path(str(data.get("root") or "."))
    margin = float(options.get("margin", 0.1 if source in ("wflw", "cofw") else 0.25))
    if source == "faces":
        occlusion = float(options.get("occlusion", 0.3))
        train, val, test = (
            lm.SyntheticFaces(_count(options, split, n), size, split, seed, occlusion)
            for split, n in (("train", 2000), ("val", 200), ("test", 500))
        )
    elif source == "300w":
        train = lm.load_landmark_folder(root / str(options.get("train", "train")), size, margin)
        test = (
            lm.load_landmark_folder(root / str(options["test"]), size, margin) if "test" in options else None
        )
        if "val" in options:
            val = lm.load_landmark_folder(root / str(options["val"]), size, margin)
        else:
            train, val = _carve(train, float(data.get("val_fraction", 0.1)), seed)
    elif source == "wflw":
        images = root / str(options.get("images", "WFLW_images"))
        train = lm.load_wflw(
            root / str(options.get("train", "list_98pt_rect_attr_train.txt")), images, size, margin
        )
        test = lm.load_wflw(
            root / str(options.get("test", "list_98pt_rect_attr_test.txt")), images, size, margin
        )
        train, val = _carve(train, float(data.get("val_fraction", 0.1)), seed)
    else:
        train = lm.load_cofw(root / str(options.get("train", "COFW_train_color.mat")), size, "train", margin)
        test = lm.load_cofw(root / str(options.get("test", "COFW_test_color.mat")), size, "test", margin)
        train, val = _carve(train, float(data.get("val_fraction", 0.1)), seed)
    k = train.num_points
    for name, split in (("val", val), ("test", test)):
        if split is not None and split.num_points != k:
            raise ProtegeError(f"the {name} split has {split.num_points} points per shape, train has {k}")
    targets = str(options.get("targets", "hard"))
    if targets not in TARGETS:
        raise ProtegeError(f"data.options.targets is one of {', '.join(TARGETS)}, not {targets!r}")
    asm: dict[str, Any] = {}
    if targets == "asm":
        modes = options.get("asm_modes", 0.9)
        if isinstance(modes, bool) or not isinstance(modes, (int, float)) or modes < 0:
            raise ProtegeError(
                f"data.options.asm_modes is a number of modes (int ≥ 0) or a variance share in (0, 1), got {modes!r}"
            )
        align = bool(options.get("asm_align", False))
        train.targets = lm.asm_targets(train.points, modes, align)
        asm = {"asm_modes": modes, "asm_align": align}
    norm = Normalisation.parse(options.get("nme"), k)
    return LandmarkDataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=2 * k,
        in_chans=3,
        input_size=size,
        class_names=[f"p{i}" for i in range(k)],
        source=source,
        options={**options, "targets": targets, **asm, "seed": seed, "size": size},
        num_points=k,
        normalisation=norm,
    )


# -- models -------------------------------------------------------------------------------------


class PointRegressor(nn.Module):
    """A backbone with a ``2K``-output head, read as ``(B, K, 2)`` points (module docstring)."""

    def __init__(self, net: nn.Module, num_points: int) -> None:
        super().__init__()
        self.net = net
        self.num_points = int(num_points)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(images)
        if out.dim() != 2 or out.shape[1] != 2 * self.num_points:
            raise ProtegeError(
                f"the landmark model outputs {tuple(out.shape)}, not (B, {2 * self.num_points}) "
                f"({self.num_points} points × 2)"
            )
        return out.view(out.shape[0], self.num_points, 2)


def build_landmark_model(
    name: str, weights: str | None, kwargs: Mapping[str, Any], num_points: int
) -> PointRegressor:
    """``name`` (timm or protege zoo) with a ``2 · num_points`` regression head; ``weights``: a
    checkpoint of such a model (a protege run, checkpoint directory or safetensors file).

    The head (the last ``Linear`` with ``2K`` outputs) starts at zero: every point at the image
    centre, which trains markedly faster than a classifier's random head (measured here: after 150
    steps on procedural faces, 0.28 vs 0.85 of the mean-shape error)."""
    from ..models import build_model, load_weights

    kwargs = dict(kwargs)
    for key in ("num_classes", "in_chans"):
        if key in kwargs:
            raise ProtegeError(
                f"model {name!r}: remove kwargs.{key} (the landmarks task sets it from the data)"
            )
    model = PointRegressor(build_model(name, num_classes=2 * num_points, in_chans=3, **kwargs), num_points)
    head = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 2 * num_points]
    if head:  # start at the image centre: a classifier's random head makes far-off points, slow to unlearn
        nn.init.zeros_(head[-1].weight)
        if head[-1].bias is not None:
            nn.init.zeros_(head[-1].bias)
    if weights is not None:
        try:
            load_weights(model, weights, model_name=name)
        except ProtegeError as e:
            raise ProtegeError(f"{e} (is it a landmark model with {num_points} points?)") from None
    return model


# -- the task -----------------------------------------------------------------------------------


class LandmarkTask(Task):
    """Landmark regression (module docstring)."""

    name = "landmarks"
    primary_metric = "auc"
    output_keys = frozenset({"logits"})

    def __init__(self) -> None:
        self.num_points: int | None = None
        self.normalisation: Normalisation | None = None

    def bind(self, data: Any) -> None:
        if isinstance(data, LandmarkDataSplits):
            self.num_points, self.normalisation = data.num_points, data.normalisation

    def load_data(self, data, teachers, students):  # type: ignore[no-untyped-def]
        splits = load_landmark_data(data, teachers, students)
        self.bind(splits)
        return splits

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        return build_landmark_model(name, weights, kwargs, int(getattr(data, "num_points", 68)))

    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if not isinstance(batch, Mapping) or "image" not in batch:
            raise ProtegeError(
                "a landmarks batch is a dict with 'image' (B, 3, S, S) and 'points' (B, K, 2); "
                f"got {type(batch).__name__}"
            )
        points = batch.get("points")
        if points is not None and not bool(torch.isfinite(points).all()):
            raise ProtegeError("the batch's landmark points hold NaN or infinite coordinates")
        return batch["image"], points

    def meta(self, batch: Any) -> dict[str, Any]:
        return {"index": batch["index"]} if isinstance(batch, Mapping) and "index" in batch else {}

    def batch_size(self, inputs: Any) -> int:
        return int(inputs.shape[0])

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        points = model(inputs)
        if points.dim() == 2 and points.shape[1] % 2 == 0:
            points = points.view(points.shape[0], -1, 2)
        if self.num_points is not None and tuple(points.shape[1:]) != (self.num_points, 2):
            raise ProtegeError(
                f"the model predicts {tuple(points.shape[1:])} points, the data has ({self.num_points}, 2): "
                "build the model for the data's point count"
            )
        return {"logits": points}

    def evaluator(self, with_teacher: bool) -> Evaluator:
        return LandmarkEvaluator(with_teacher, self.normalisation)

    def report_figures(
        self, student: nn.Module, teachers: Sequence[nn.Module], data: Any
    ) -> list[tuple[str, bytes]]:
        """The first test (else validation) images with the ground-truth points (green), the student's
        (red) and each teacher's (blue, orange), in pixels."""
        import io

        from matplotlib.figure import Figure

        split = data.test if data.test is not None else data.val
        items = [split[i] for i in range(min(6, len(split)))]
        images = torch.stack([it["image"] for it in items]).float()
        models = [("student", student, "red")] + [
            (f"teacher {i}", t, c) for i, (t, c) in enumerate(zip(teachers, ("blue", "orange"), strict=False))
        ]
        preds = {}
        for name, model, _ in models:
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    device = next(model.parameters()).device
                    preds[name] = self.forward(model, images.to(device))["logits"].float().cpu()
            finally:
                model.train(was)
        size = images.shape[-1]
        fig = Figure(figsize=(2.2 * len(items), 2.4))
        for j, item in enumerate(items):
            ax = fig.add_subplot(1, len(items), j + 1)
            ax.imshow(images[j].permute(1, 2, 0).clamp(0, 1).numpy())
            for name, pts, colour in [("ground truth", item["points"], "limegreen")] + [
                (name, preds[name][j], c) for name, _, c in models
            ]:
                xy = (pts.float() + 0.5) * size - 0.5  # the normalised frame back to pixel centres
                ax.scatter(xy[:, 0], xy[:, 1], s=4, c=colour, label=name if j == 0 else None)
            ax.set_axis_off()
        fig.legend(loc="lower center", ncol=len(models) + 1, fontsize=7, frameon=False)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        caption = "test images: ground truth (green), student (red), teachers (blue, orange)"
        return [(caption, buffer.getvalue())]

    def combine_teachers(self, outputs: Sequence[Outputs], weights: Sequence[float]) -> torch.Tensor:
        """The teachers' points, weighted-averaged (one teacher: its points)."""
        total = sum(weights)
        return sum(w / total * o["logits"].float() for w, o in zip(weights, outputs))  # type: ignore[return-value]


# -- evaluation ---------------------------------------------------------------------------------


class LandmarkEvaluator(Evaluator):
    """NME (inter-ocular, inter-pupil), failure rate and AUC at 0.1, per-point error (module docstring)."""

    def __init__(self, with_teacher: bool, normalisation: Normalisation | None = None) -> None:
        self.with_teacher = with_teacher
        self.normalisation = normalisation
        self.student: list[torch.Tensor] = []
        self.teacher: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        if target is None:
            raise ProtegeError("evaluation needs the ground-truth points: the evaluation batches carry none")
        pred = student["logits"].detach().float().cpu()
        target = target.detach().float().cpu()
        if pred.shape != target.shape:
            raise ProtegeError(
                f"the model predicts {tuple(pred.shape[1:])} points, the data has {tuple(target.shape[1:])}"
            )
        if not bool(torch.isfinite(target).all()):
            raise ProtegeError("the evaluation points hold NaN or infinite coordinates")
        self.student.append(pred)
        self.target.append(target)
        if self.with_teacher and teacher is not None:
            self.teacher.append(teacher["logits"].detach().float().cpu())

    def compute(self) -> dict[str, float]:
        target = torch.cat(self.target)
        norm = self.normalisation or Normalisation.parse(None, target.shape[1])
        dists = norm.distances(target)
        if any(bool((d <= 0).any()) for d in dists.values()):
            raise ProtegeError(
                "a ground-truth shape has a zero normalising distance (its eye points coincide)"
            )
        out: dict[str, float] = {}
        for who, preds in (("", self.student), ("teacher/", self.teacher)):
            if not preds:
                continue
            pred = torch.cat(preds)
            for kind, d in dists.items():
                errors = nme_per_image(pred, target, d)
                auc, fr = auc_fr(errors)
                out[f"{who}nme_{kind}"], out[f"{who}fr_{kind}"], out[f"{who}auc_{kind}"] = (
                    float(errors.mean()),
                    fr,
                    auc,
                )
            p = norm.primary
            for key in ("nme", "fr", "auc"):
                out[f"{who}{key}"] = out[f"{who}{key}_{p}"]
            if not who:
                per_point = ((pred - target).norm(dim=-1) / dists[p][:, None]).mean(0)
                width = len(str(target.shape[1] - 1))
                out.update({f"nme_pt/{k:0{width}d}": float(v) for k, v in enumerate(per_point)})
        if self.teacher:
            t = torch.cat(self.teacher)
            out["tnme"] = float(nme_per_image(torch.cat(self.student), t, dists[norm.primary]).mean())
        return out
