"""Point-cloud part segmentation: a part label per point, scored by class and instance mIoU.

**Shape classification needs no task of its own**: a point backbone of
:mod:`protege.models.pointcloud` maps ``(B, N, C)`` points to ``(B, num_classes)`` logits exactly as an
image classifier maps images, so the ``classification`` task (its loop, accuracy/NLL/ECE/fidelity
evaluator and native export) runs it unchanged with ``data.source: shapes3d`` or ``pointfolder``.

**Part segmentation** (``task: pointcloud_parts``, this module) differs in what a batch is and what
counts. A **batch** is a dict: ``"points"`` ``(B, N, C)``, ``"parts"`` ``(B, N)`` global part labels
(ShapeNet-Part style: every category has its own parts), ``"category"`` ``(B,)`` the object class,
``"index"``. :meth:`PointPartsTask.forward` returns ``"logits"`` ``(B·N, P)``: one row per point, so
the per-sample losses (``ce``, ``kd``) apply per point unchanged, and the per-point taps of the
backbone stay ``(B, N, C)`` for ``fitnet`` and ``pointdistiller``; and ``"category"``.

Data (``data.source``): ``shapes3d`` (:func:`protege.data.pointcloud.load_pointcloud_splits` with
part labels: which primitive of a composition a point came from) or ``shapenetpart`` (``root``: the
ShapeNet-Part folder, :func:`protege.data.pointcloud.load_part_folder`). Models: any name of the zoo
(``pointnet``, ``dgcnn``, ``pointnet2``), built with ``head="parts"`` and one output per part label.

**Evaluation** (:class:`PartsEvaluator`, the ShapeNet-Part protocol of PointNet/DGCNN): each point's
prediction is the arg-max over the parts of its shape's (known) category; a shape's IoU is the mean
over its category's parts of ``|pred ∩ gt| / |pred ∪ gt|`` (a part absent from both counts 1);
``instance_miou`` averages shapes, ``class_miou`` (the primary metric) averages categories' means;
``acc`` is the point accuracy; ``agreement`` the share of points where student and teacher agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError
from .base import Evaluator, Outputs, Task

SOURCES = ("shapes3d", "shapenetpart")


def load_parts_data(data: Mapping[str, Any]) -> Any:
    """The run's splits (:class:`protege.data.pointcloud.PartSplits`) from its data section."""
    from ..data.pointcloud import load_part_folder, load_pointcloud_splits

    source = str(data.get("source") or "shapes3d")
    options = dict(data.get("options") or {})
    seed = int(data.get("split_seed", 0))
    if source == "shapes3d":
        return load_pointcloud_splits(options, seed, target="parts")
    if source == "shapenetpart":
        root = data.get("root") or options.pop("root", None)
        if not root:
            raise ProtegeError("data source shapenetpart needs `root`: the ShapeNet-Part folder")
        bad = sorted(set(options) - {"num_points", "channels"})
        if bad:
            raise ProtegeError(f"unknown shapenetpart option {bad[0]!r}; options: num_points, channels")
        return load_part_folder(
            root,
            int(options.get("num_points", 2048)),
            int(options.get("channels", 3)),
            seed,
            float(data.get("val_fraction", 0.1)),
            float(data.get("test_fraction", 0.2)),
        )
    raise ProtegeError(f"task pointcloud_parts reads data.source {' or '.join(SOURCES)}, not {source!r}")


class PointPartsTask(Task):
    """Part segmentation of point clouds (module docstring)."""

    name = "pointcloud_parts"
    primary_metric = "class_miou"
    output_keys = frozenset({"logits", "category"})

    def __init__(self) -> None:
        self.category_parts: list[list[int]] | None = None

    def bind(self, data: Any) -> None:
        parts = getattr(data, "category_parts", None)
        if parts:
            self.category_parts = [list(p) for p in parts]

    def load_data(self, data, teachers, students):  # type: ignore[no-untyped-def]
        splits = load_parts_data(data)
        self.bind(splits)
        return splits

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        from ..models import build_model

        kwargs = {"head": "parts", **dict(kwargs)}
        if kwargs["head"] != "parts":
            raise ProtegeError(
                f"task pointcloud_parts needs per-point outputs: model {name!r} with head: parts"
            )
        return build_model(
            name, num_classes=data.num_classes, in_chans=data.in_chans, weights=weights, **kwargs
        )

    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if not isinstance(batch, Mapping) or "points" not in batch:
            raise ProtegeError(
                "a pointcloud_parts batch is a dict with 'points' (B, N, C), 'parts' (B, N) and 'category' "
                f"(B,); got {type(batch).__name__}"
            )
        points = batch["points"]
        parts = batch.get("parts")
        if parts is not None and tuple(parts.shape) != tuple(points.shape[:2]):
            raise ProtegeError(
                f"pointcloud_parts: part labels {tuple(parts.shape)} do not match the points "
                f"{tuple(points.shape)}: one label per point"
            )
        inputs = {"points": points, "category": batch.get("category")}
        return inputs, parts.reshape(-1) if parts is not None else None

    def meta(self, batch: Any) -> dict[str, Any]:
        return {"index": batch["index"]} if isinstance(batch, Mapping) and "index" in batch else {}

    def batch_size(self, inputs: Any) -> int:
        return int(inputs["points"].shape[0])

    def model_input(self, inputs: Any) -> Any:
        return inputs["points"]

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        logits = model(inputs["points"])
        if logits.dim() != 3:
            raise ProtegeError(
                f"pointcloud_parts: the model returned {tuple(logits.shape)}, not per-point logits (B, N, P); "
                "build it with head: parts"
            )
        out: Outputs = {"logits": logits.reshape(-1, logits.shape[-1])}
        if inputs.get("category") is not None:
            out["category"] = torch.as_tensor(inputs["category"])
        return out

    def eval_outputs(self) -> tuple[str, ...]:
        return ("logits", "category")

    def report_figures(
        self, student: nn.Module, teachers: Sequence[nn.Module], data: Any
    ) -> list[tuple[str, bytes]]:
        """The first test (else validation) shapes seen from above (x, y), points coloured by part:
        ground truth, student, teacher in rows."""
        import io

        from matplotlib.figure import Figure

        split = data.test if data.test is not None else data.val
        items = [split[i] for i in range(min(5, len(split)))]
        batch = torch.utils.data.default_collate(items)
        inputs, target = self.split(batch)
        b, n = batch["points"].shape[:2]
        rows = {"ground truth": target.view(b, n)}
        for name, model in [("student", student)] + [("teacher", t) for t in teachers[:1]]:
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    rows[name] = self.forward(model, inputs)["logits"].argmax(-1).view(b, n).cpu()
            finally:
                model.train(was)
        fig = Figure(figsize=(2.0 * b, 2.0 * len(rows)))
        xyz = batch["points"][..., :3]
        for r, (name, parts) in enumerate(rows.items()):
            for j in range(b):
                ax = fig.add_subplot(len(rows), b, r * b + j + 1)
                ax.scatter(xyz[j, :, 0], xyz[j, :, 1], c=parts[j] % 20, cmap="tab20", vmin=0, vmax=19, s=3)
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(name, fontsize=9)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        caption = "test shapes seen from above, points coloured by part: " + ", ".join(rows) + " (rows)"
        return [(caption, buffer.getvalue())]

    def evaluator(self, with_teacher: bool) -> Evaluator:
        return PartsEvaluator(self.category_parts, with_teacher)


def shape_ious(
    logits: torch.Tensor,
    target: torch.Tensor,
    category: torch.Tensor,
    category_parts: Sequence[Sequence[int]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shape mIoU ``(B,)`` and predictions ``(B, N)`` from logits ``(B, N, P)``, labels ``(B, N)``
    and categories ``(B,)`` (module docstring; without ``category_parts`` every label competes and a
    shape's parts are those in its labels or its prediction)."""
    b = logits.shape[0]
    ious, preds = [], []
    for i in range(b):
        z = logits[i].float()
        if category_parts is not None:
            allowed = torch.as_tensor(category_parts[int(category[i])], dtype=torch.long)
            pred = allowed[z[:, allowed].argmax(-1)]
            parts = allowed.tolist()
        else:
            pred = z.argmax(-1)
            parts = sorted(set(target[i].tolist()) | set(pred.tolist()))
        per = []
        for p in parts:
            inter = ((pred == p) & (target[i] == p)).sum().item()
            union = ((pred == p) | (target[i] == p)).sum().item()
            per.append(1.0 if union == 0 else inter / union)
        ious.append(sum(per) / len(per))
        preds.append(pred)
    return torch.tensor(ious), torch.stack(preds)


class PartsEvaluator(Evaluator):
    """Class and instance mIoU, point accuracy, and agreement with the teacher (module docstring)."""

    def __init__(self, category_parts: Sequence[Sequence[int]] | None, with_teacher: bool) -> None:
        self.category_parts = category_parts
        self.with_teacher = with_teacher
        self.ious: list[torch.Tensor] = []
        self.teacher_ious: list[torch.Tensor] = []
        self.categories: list[torch.Tensor] = []
        self.correct = self.agree = self.points = 0

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        if target is None:
            raise ProtegeError("evaluation needs labelled data: the evaluation batches carry no part labels")
        if "category" not in student:
            raise ProtegeError("pointcloud_parts evaluation needs each shape's 'category' in the batch")
        category = student["category"].detach().cpu().reshape(-1)
        b = category.shape[0]
        logits = student["logits"].detach().cpu()
        logits = logits.reshape(b, -1, logits.shape[-1])
        target = target.detach().cpu().reshape(b, -1)
        ious, pred = shape_ious(logits, target, category, self.category_parts)
        self.ious.append(ious)
        self.categories.append(category)
        self.correct += int((pred == target).sum())
        self.points += target.numel()
        if self.with_teacher and teacher is not None:
            t_logits = teacher["logits"].detach().cpu().reshape(b, -1, logits.shape[-1])
            t_ious, t_pred = shape_ious(t_logits, target, category, self.category_parts)
            self.teacher_ious.append(t_ious)
            self.agree += int((pred == t_pred).sum())

    @staticmethod
    def _class_miou(ious: torch.Tensor, categories: torch.Tensor) -> float:
        means = [ious[categories == c].mean() for c in categories.unique()]
        return float(torch.stack(means).mean())

    def compute(self) -> dict[str, float]:
        if not self.ious:
            return {}
        ious, cats = torch.cat(self.ious), torch.cat(self.categories)
        out = {
            "class_miou": self._class_miou(ious, cats),
            "instance_miou": float(ious.mean()),
            "acc": self.correct / max(1, self.points),
        }
        if self.teacher_ious:
            t = torch.cat(self.teacher_ious)
            out["teacher/class_miou"] = self._class_miou(t, cats)
            out["teacher/instance_miou"] = float(t.mean())
            out["agreement"] = self.agree / max(1, self.points)
        return out
