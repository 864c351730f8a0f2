"""Promptable segmentation (SAM): images + prompts (points, boxes) → a mask and a predicted IoU per prompt.

A **model** of this task is a :class:`~protege.models.sam.PromptableSegmenter`: ``encode(images) ->
embeddings``, ``decode(embeddings, points, labels, boxes) -> {"masks", "iou", "tokens"}`` with SAM's
prompt encoder and mask decoder. The task builds them itself (:meth:`SegmentationTask.build_model`):

- ``model: sam`` — the ``segment_anything`` SAM: ``kwargs: {variant: vit_b|vit_l|vit_h}`` (the official
  sizes; ``weights:`` an official checkpoint file, read with ``torch.load(weights_only=True)``, or a
  protege run) or ``{variant: tiny, ...}`` (the same classes at a small size, for training here);
- ``model: sam_student`` — a light image encoder (``encoder: cnn | vit | timm:<name>``) + SAM's neck,
  and SAM's prompt encoder and mask decoder of the run's teacher's design, the decoder's weights copied
  from the (first) teacher unless ``copy_decoder: false`` (MobileSAM/TinySAM start from it).

A **batch** (:class:`PromptedImages`) is a dict: ``"image"`` ``(B, 3, S, S)`` in [0, 1]; ``P1`` point
prompts ``"points"`` ``(B, P1, N, 2)`` (pixel x, y) with ``"labels"`` ``(B, P1, N)`` (1 foreground, 0
background, -1 padding); ``P2`` box prompts ``"boxes"`` ``(B, P2, 4)``; ``"masks"`` ``(B, P1 + P2, S, S)``
the ground-truth mask of the object each prompt points at (the target); ``"mode"`` ``(B, P1 + P2)``
what each prompt is (0: one point, 1: several points, 2: a box, -1: padding); ``"index"``.

- Training batches: each prompt picks an object at random; point prompts get 1..``max_points`` random
  points inside it (``sampler: uniform``) or one point that the **hard-prompt sampler** extends
  (``sampler: hard``, TinySAM): in each of 1..``rounds`` rounds (drawn per batch) student and teacher
  predict the masks, and each prompt gets a point drawn from where the two masks disagree, labelled by
  the teacher's mask (foreground where the teacher says so) — :meth:`SegmentationTask.refine_batch`,
  which the distiller calls on every training batch. Box prompts: the object's box with SAM's noise.
- Evaluation batches (fixed per image): for every object, one point (the pixel farthest from its
  boundary), three points (that one + two seeded points inside), and its tight box.

:meth:`SegmentationTask.forward` encodes the images once and decodes both prompt groups; it returns
``"logits"`` ``(B, P, 4h, 4w)`` (SAM's low-resolution mask logits, single-mask output), ``"iou"``
``(B, P)``, ``"tokens"`` ``(B, P, T, C)`` (the decoder's output tokens), ``"embedding"`` ``(B, C, h, w)``
(the image encoder's output) and ``"mode"``. Terms: ``sam_gt`` (SAM's focal + dice + IoU-head loss
against the ground truth), ``mask_kd`` (the teacher's mask logits), ``fitnet`` on ``embedding`` (the
image-embedding loss) and on ``tokens`` (the output-token loss): TinySAM's full-stage distillation.

**Evaluation** (:class:`SegmentationEvaluator`): mask IoU, masks upsampled to the image and thresholded
at 0, averaged over objects, per prompt kind: ``miou_1pt``, ``miou_3pt``, ``miou_box`` against the
ground truth and ``tmiou_*`` against the teacher's masks (fidelity), ``miou`` the mean of the three
kinds (the primary metric), ``iou_mae`` the IoU head's mean absolute error, ``teacher/miou_*``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.segmentation import error_points
from ..data.splits import DataSplits
from ..errors import ProtegeError, closest
from .base import Evaluator, Outputs, Task

#: what each prompt is (``"mode"``)
ONE_POINT, POINTS, BOX, PAD = 0, 1, 2, -1
MODE_NAMES = {ONE_POINT: "1pt", POINTS: "3pt", BOX: "box"}
SAMPLERS = ("uniform", "hard")
#: prompt options (``data.options.prompts``) and their defaults
PROMPT_DEFAULTS: dict[str, Any] = {
    "point_prompts": 4,  # point prompts per training image
    "box_prompts": 2,  # box prompts per training image
    "max_points": 3,  # points per point prompt (uniform: 1..max_points; hard: 1 + up to rounds)
    "sampler": "uniform",
    "rounds": 2,  # hard sampler: correction rounds, drawn from 1..rounds per batch
    "box_noise": 0.1,  # SAM's box noise: std of each coordinate's shift as a fraction of the box side
    "eval_points": 3,  # points of the evaluation's several-point prompt
    "multimask": False,  # also output SAM's three ambiguity-aware masks per prompt (multi_logits, multi_iou)
}
SAM_MODELS = ("sam", "sam_student")
#: objects prompted per evaluation image when the data sets no ``max_objects`` (a folder of images)
EVAL_OBJECTS = 16


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are drawn (module docstring); validated from ``data.options.prompts``."""

    point_prompts: int = 4
    box_prompts: int = 2
    max_points: int = 3
    sampler: str = "uniform"
    rounds: int = 2
    box_noise: float = 0.1
    eval_points: int = 3
    multimask: bool = False

    @classmethod
    def parse(cls, given: Any) -> PromptSettings:
        if given is None:
            return cls()
        if not isinstance(given, Mapping):
            raise ProtegeError(
                f"data.options.prompts must be a mapping of {', '.join(PROMPT_DEFAULTS)}, got {given!r}"
            )
        bad = sorted(set(given) - set(PROMPT_DEFAULTS))
        if bad:
            near = closest(bad[0], PROMPT_DEFAULTS)
            hint = f" did you mean {near[0]!r}?" if near else ""
            raise ProtegeError(
                f"unknown prompt option {bad[0]!r}.{hint} Options: {', '.join(PROMPT_DEFAULTS)}"
            )
        values = {**PROMPT_DEFAULTS, **dict(given)}
        if values["sampler"] not in SAMPLERS:
            raise ProtegeError(
                f"prompts.sampler must be one of {', '.join(SAMPLERS)}, not {values['sampler']!r}"
            )
        for key in ("point_prompts", "box_prompts", "rounds"):
            if not isinstance(values[key], int) or values[key] < 0:
                raise ProtegeError(f"prompts.{key} must be an integer ≥ 0, got {values[key]!r}")
        for key in ("max_points", "eval_points"):
            if not isinstance(values[key], int) or values[key] < 1:
                raise ProtegeError(f"prompts.{key} must be an integer ≥ 1, got {values[key]!r}")
        if values["point_prompts"] + values["box_prompts"] == 0:
            raise ProtegeError(
                "prompts: point_prompts + box_prompts is 0, an empty prompt list; ask for at least one"
            )
        if not 0 <= float(values["box_noise"]) <= 1:
            raise ProtegeError(f"prompts.box_noise must be in [0, 1], got {values['box_noise']!r}")
        values["box_noise"] = float(values["box_noise"])
        if not isinstance(values["multimask"], bool):
            raise ProtegeError(f"prompts.multimask is true or false, got {values['multimask']!r}")
        return cls(**values)

    @property
    def slots(self) -> int:
        """Point slots of a training point prompt (the hard sampler adds one per round)."""
        return 1 + self.rounds if self.sampler == "hard" else self.max_points


class PromptedImages(Dataset):
    """Prompts and per-prompt target masks for images with instance label maps (module docstring).

    ``images``: a dataset of ``{"image": (3, S, S), "instances": (S, S) label map, "index"}``.
    ``train``: random prompts at each access; otherwise the fixed evaluation prompts of each image
    (``max_objects`` objects at most, padded), seeded by ``seed`` and the index.
    """

    def __init__(
        self, images: Dataset, settings: PromptSettings, train: bool, max_objects: int, seed: int = 0
    ) -> None:
        self.images = images
        self.settings = settings
        self.train = train
        self.max_objects = int(max_objects)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ..data.segmentation import instance_masks

        item = self.images[i]
        image = item["image"]
        masks = torch.as_tensor(instance_masks(np.asarray(item["instances"])), dtype=torch.bool)
        size = image.shape[-1]
        if self.train:
            gen = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            out = self._train_prompts(masks, size, gen)
        else:
            gen = np.random.default_rng([self.seed, int(i)])
            out = self._eval_prompts(masks, size, gen)
        return {"image": image, **out, "index": int(item.get("index", i))}

    def _train_prompts(
        self, masks: torch.Tensor, size: int, gen: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        from ..data.segmentation import mask_box, random_points

        s = self.settings
        k = masks.shape[0]
        n = s.slots
        points = torch.zeros(s.point_prompts, n, 2)
        labels = torch.full((s.point_prompts, n), -1, dtype=torch.long)
        boxes = torch.zeros(s.box_prompts, 4)
        target = torch.zeros(s.point_prompts + s.box_prompts, size, size, dtype=torch.bool)
        mode = torch.full((s.point_prompts + s.box_prompts,), PAD, dtype=torch.long)
        if k == 0:  # an image without objects: padding prompts only (no loss weight: empty masks)
            return {"points": points, "labels": labels, "boxes": boxes, "masks": target, "mode": mode}
        for p in range(s.point_prompts):
            o = int(gen.integers(k))
            count = 1 if s.sampler == "hard" else int(gen.integers(1, s.max_points + 1))
            points[p, :count] = torch.as_tensor(
                random_points(masks[o].numpy(), count, gen), dtype=torch.float32
            )
            labels[p, :count] = 1
            target[p] = masks[o]
            mode[p] = ONE_POINT if count == 1 else POINTS
        for b in range(s.box_prompts):
            o = int(gen.integers(k))
            boxes[b] = torch.as_tensor(
                mask_box(masks[o].numpy(), gen, noise=s.box_noise), dtype=torch.float32
            )
            target[s.point_prompts + b] = masks[o]
            mode[s.point_prompts + b] = BOX
        return {"points": points, "labels": labels, "boxes": boxes, "masks": target, "mode": mode}

    def _eval_prompts(
        self, masks: torch.Tensor, size: int, gen: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        from ..data.segmentation import interior_point, mask_box, random_points

        m = self.max_objects
        n = self.settings.eval_points
        points = torch.full((2 * m, n, 2), size / 2.0)
        labels = torch.full((2 * m, n), -1, dtype=torch.long)
        boxes = torch.tensor([0.0, 0.0, float(size), float(size)]).repeat(m, 1)
        target = torch.zeros(3 * m, size, size, dtype=torch.bool)
        mode = torch.full((3 * m,), PAD, dtype=torch.long)
        for o in range(min(masks.shape[0], m)):
            mask = masks[o].numpy()
            first = torch.as_tensor(interior_point(mask), dtype=torch.float32)
            points[o, 0], labels[o, 0] = first, 1  # one point
            points[m + o, 0], labels[m + o, 0] = first, 1  # several points: the same first one …
            if n > 1:  # … and n - 1 seeded points inside the object
                points[m + o, 1:] = torch.as_tensor(random_points(mask, n - 1, gen), dtype=torch.float32)
                labels[m + o, 1:] = 1
            boxes[o] = torch.as_tensor(mask_box(mask), dtype=torch.float32)
            target[o] = target[m + o] = target[2 * m + o] = masks[o]
            mode[o], mode[m + o], mode[2 * m + o] = ONE_POINT, POINTS, BOX
        return {"points": points, "labels": labels, "boxes": boxes, "masks": target, "mode": mode}


def load_segmentation_data(
    data: Mapping[str, Any],
    teachers: Sequence[Mapping[str, Any]] = (),
    students: Sequence[Mapping[str, Any]] = (),
) -> Any:
    """The run's splits: images with instance masks (``protege.data.segmentation``) wrapped in
    :class:`PromptedImages` (training: random prompts; val/test: the fixed evaluation prompts)."""
    from ..data.segmentation import load_segmentation_splits

    options = dict(data.get("options") or {})
    settings = PromptSettings.parse(options.pop("prompts", None))
    seed = int(data.get("split_seed", 0))
    options["source"] = str(data.get("source") or "composites")
    if data.get("root") and "root" not in options:
        options["root"] = str(data["root"])
    splits = load_segmentation_splits(options, seed)
    # objects prompted per evaluation image: the composites' cap, else (a folder) up to EVAL_OBJECTS
    max_objects = int((splits.options or {}).get("max_objects", EVAL_OBJECTS))
    fields = {f.name: getattr(splits, f.name) for f in dataclasses.fields(splits)}
    fields.update(
        train=PromptedImages(splits.train, settings, True, max_objects, seed),
        val=PromptedImages(splits.val, settings, False, max_objects, seed),
        test=PromptedImages(splits.test, settings, False, max_objects, seed)
        if splits.test is not None
        else None,
        options={**dict(splits.options or {}), "prompts": dataclasses.asdict(settings)},
    )
    return SegmentationDataSplits(
        **fields, settings=settings, reference=dict(teachers[0]) if teachers else None
    )


@dataclass
class SegmentationDataSplits(DataSplits):
    """Prompted splits of the promptable-segmentation task, with what its models are built against."""

    task: ClassVar[str] = "promptable_segmentation"

    #: how prompts are drawn
    settings: PromptSettings = dataclasses.field(default_factory=PromptSettings)
    #: the model section a ``sam_student`` is built against (the first teacher)
    reference: dict[str, Any] | None = None


# -- models -------------------------------------------------------------------------------------


def build_segmentation_model(
    name: str, weights: str | None, kwargs: Mapping[str, Any], reference: Mapping[str, Any] | None
) -> nn.Module:
    """The model a run's model section names (module docstring); ``reference``: the first teacher's
    section, whose model a ``sam_student`` takes its grid, widths and decoder from."""
    from ..models import load_weights, sam

    kwargs = dict(kwargs)
    if name == "sam":
        variant = str(kwargs.pop("variant", "tiny"))
        official = variant != "tiny" and weights is not None and not _is_protege_weights(weights)
        try:
            model = sam.build_sam(variant, checkpoint=weights if official else None, **kwargs)
        except TypeError as e:
            raise ProtegeError(f"model sam: {e}") from None
        if weights is not None and not official:
            load_weights(model, weights, model_name=f"sam ({variant})")
        return model
    if name == "sam_student":
        if reference is None or str(reference.get("model")) != "sam":
            raise ProtegeError(
                "model sam_student is built against the run's teacher (its embedding grid, widths and mask "
                "decoder): give a teacher with model: sam"
            )
        ref_kwargs = dict(reference.get("kwargs") or {})
        teacher = build_segmentation_model("sam", reference.get("weights"), ref_kwargs, None)
        try:
            model = sam.sam_student(from_model=teacher, **kwargs)
        except TypeError as e:
            raise ProtegeError(f"model sam_student: {e}") from None
        if weights is not None:
            load_weights(model, weights, model_name="sam_student")
        return model
    near = closest(name, SAM_MODELS)
    hint = f" did you mean {near[0]!r}?" if near else ""
    raise ProtegeError(
        f"task promptable_segmentation builds models {', '.join(SAM_MODELS)}, not {name!r}.{hint}"
    )


def _is_protege_weights(weights: str) -> bool:
    """A protege run/checkpoint directory or a .safetensors file (not an official SAM .pth)."""
    from pathlib import Path

    path = Path(weights)
    return path.is_dir() or path.suffix == ".safetensors"


# -- the task -----------------------------------------------------------------------------------


class SegmentationTask(Task):
    """Promptable segmentation (module docstring)."""

    name = "promptable_segmentation"
    primary_metric = "miou"
    output_keys = frozenset({"logits", "iou", "tokens", "embedding", "mode", "multi_logits", "multi_iou"})

    def __init__(self) -> None:
        self.data: Any = None
        self.settings = PromptSettings()
        self._generator: torch.Generator | None = None

    def bind(self, data: Any) -> None:
        settings = getattr(data, "settings", None)
        if isinstance(settings, PromptSettings):
            self.data, self.settings = data, settings

    def load_data(self, data, teachers, students):  # type: ignore[no-untyped-def]
        splits = load_segmentation_data(data, teachers, students)
        self.bind(splits)
        return splits

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        return build_segmentation_model(name, weights, kwargs, getattr(data, "reference", None))

    # -- batches
    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if not isinstance(batch, Mapping) or "image" not in batch:
            raise ProtegeError(
                "a promptable_segmentation batch is a dict with 'image', 'points', 'labels', 'boxes', 'masks' "
                f"and 'mode' (protege.tasks.segmentation.PromptedImages); got {type(batch).__name__}"
            )
        inputs = {k: batch[k] for k in ("image", "points", "labels", "boxes", "mode") if k in batch}
        return inputs, batch.get("masks")

    def meta(self, batch: Any) -> dict[str, Any]:
        return {"index": batch["index"]} if isinstance(batch, Mapping) and "index" in batch else {}

    def batch_size(self, inputs: Any) -> int:
        return int(inputs["image"].shape[0])

    def model_input(self, inputs: Any) -> Any:
        """The images and their point prompts: ``model(images=…, points=…, labels=…)`` (encoder + decoder)."""
        return {"images": inputs["image"], "points": inputs["points"], "labels": inputs["labels"]}

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        embedding = model.encode(inputs["image"])
        parts = []
        multi = "all" if self.settings.multimask else False  # one decoder pass gives all four masks
        points = inputs.get("points")
        if points is not None and points.shape[1] > 0:
            parts.append(model.decode(embedding, points=points, labels=inputs["labels"], multimask=multi))
        boxes = inputs.get("boxes")
        if boxes is not None and boxes.shape[1] > 0:
            parts.append(model.decode(embedding, boxes=boxes, multimask=multi))
        if not parts:
            raise ProtegeError("a promptable_segmentation batch has no prompts (no points and no boxes)")
        out: Outputs = {
            "logits": torch.cat([p["masks"][:, :, 0] for p in parts], dim=1),
            "iou": torch.cat([p["iou"][:, :, 0] for p in parts], dim=1),
            "embedding": embedding,
        }
        if multi:
            out["multi_logits"] = torch.cat([p["masks"][:, :, 1:] for p in parts], dim=1)
            out["multi_iou"] = torch.cat([p["iou"][:, :, 1:] for p in parts], dim=1)
        if all("tokens" in p for p in parts):  # an exported model's graphs return masks and IoU only
            out["tokens"] = torch.cat([p["tokens"] for p in parts], dim=1)
        if "mode" in inputs:
            out["mode"] = torch.as_tensor(inputs["mode"])
        return out

    def refine_batch(self, batch: Any, student: nn.Module, teachers: Sequence[nn.Module]) -> Any:
        """TinySAM's online hard-prompt sampling (``sampler: hard``; module docstring): the point
        prompts get, round by round, a point where the student's mask and the (first) teacher's
        disagree, labelled by the teacher. Other samplers, or no teacher: the batch as it is."""
        s = self.settings
        if s.sampler != "hard" or not teachers or s.rounds == 0 or batch["points"].shape[1] == 0:
            return batch
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        teacher = teachers[0]
        points, labels = batch["points"].clone(), batch["labels"].clone()
        rounds = int(torch.randint(1, s.rounds + 1, (), generator=self._generator))
        was_training = student.training
        student.eval()  # no running-statistics updates from these extra passes
        try:
            with torch.no_grad():
                t_emb, s_emb = teacher.encode(batch["image"]), student.encode(batch["image"])
                for _ in range(rounds):
                    t_mask = (
                        teacher.upscale(teacher.decode(t_emb, points=points, labels=labels)["masks"][:, :, 0])
                        > 0
                    )
                    s_mask = (
                        student.upscale(student.decode(s_emb, points=points, labels=labels)["masks"][:, :, 0])
                        > 0
                    )
                    b, p = t_mask.shape[:2]
                    xy, lab, found = error_points(
                        s_mask.flatten(0, 1).cpu(), t_mask.flatten(0, 1).cpu(), self._generator
                    )
                    slot = (labels.flatten(0, 1) == -1).float().argmax(1)  # first free slot of each prompt
                    free = (labels.flatten(0, 1) == -1).any(1)
                    keep = (found & free.cpu()).to(labels.device)
                    rows = torch.arange(b * p, device=labels.device)[keep]
                    flat_points, flat_labels = points.view(b * p, -1, 2), labels.view(b * p, -1)
                    flat_points[rows, slot[keep]] = xy.to(points.device, points.dtype)[keep.cpu()]
                    flat_labels[rows, slot[keep]] = lab.to(labels.device)[keep.cpu()]
        finally:
            student.train(was_training)
        mode = batch["mode"].clone()
        used = (labels != -1).sum(-1)
        point_modes = mode[:, : points.shape[1]]
        point_modes[(point_modes != PAD) & (used > 1)] = POINTS
        return {**batch, "points": points, "labels": labels, "mode": mode}

    def refines_batches(self) -> str | None:
        return (
            "prompts.sampler: hard (TinySAM's online hard-prompt sampling)"
            if self.settings.sampler == "hard"
            else None
        )

    def eval_outputs(self) -> tuple[str, ...]:
        return ("logits", "iou", "mode")

    def evaluator(self, with_teacher: bool) -> Evaluator:
        return SegmentationEvaluator(with_teacher)

    def report_figures(
        self, student: nn.Module, teachers: Sequence[nn.Module], data: Any
    ) -> list[tuple[str, bytes]]:
        """The first test (else validation) images with each object's one-point prompt (white cross)
        and the outline of the mask it gets: ground truth (green), student (red), teacher (blue)."""
        import io

        from matplotlib.figure import Figure

        split = data.test if data.test is not None else data.val
        items = [split[i] for i in range(min(6, len(split)))]
        batch = torch.utils.data.default_collate(items)
        inputs, target = self.split(batch)
        masks = {"ground truth": target.bool()}
        for name, model in [("student", student)] + [("teacher", t) for t in teachers[:1]]:
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    logits = self.forward(model, inputs)["logits"].float()
            finally:
                model.train(was)
            masks[name] = upsample_logits(logits, target.shape[-1]) > 0
        colours = {"ground truth": "limegreen", "student": "red", "teacher": "deepskyblue"}
        fig = Figure(figsize=(2.2 * len(items), 2.5))
        for j in range(len(items)):
            ax = fig.add_subplot(1, len(items), j + 1)
            ax.imshow(batch["image"][j].permute(1, 2, 0).clamp(0, 1).numpy())
            for p in (batch["mode"][j] == ONE_POINT).nonzero().flatten().tolist():
                for name, m in masks.items():
                    if m[j, p].any():
                        ax.contour(
                            m[j, p].numpy().astype(float), levels=[0.5], colors=colours[name], linewidths=0.8
                        )
                x, y = batch["points"][j, p, 0].tolist()
                ax.plot(x - 0.5, y - 0.5, marker="+", color="white", markersize=6)
            ax.set_axis_off()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        caption = (
            "test images, one-point prompts (white +): mask outlines of the ground truth (green), the student "
            "(red)" + (" and the teacher (blue)" if teachers else "")
        )
        return [(caption, buffer.getvalue())]


# -- evaluation ---------------------------------------------------------------------------------


def mask_iou(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks ``(..., H, W)``; 1 where both are empty."""
    inter = (pred & ref).flatten(-2).sum(-1).float()
    union = (pred | ref).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def upsample_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Low-resolution mask logits ``(B, P, h, w)`` → ``(B, P, size, size)`` (bilinear, as SAM)."""
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits.float()
    return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)


class SegmentationEvaluator(Evaluator):
    """Mask IoU per prompt kind against the ground truth and the teacher (module docstring)."""

    def __init__(self, with_teacher: bool) -> None:
        self.with_teacher = with_teacher
        kinds = list(MODE_NAMES)
        self.sums = {k: {"gt": 0.0, "teacher": 0.0, "teacher_gt": 0.0, "n": 0} for k in kinds}
        self.iou_err, self.iou_n = 0.0, 0

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        if target is None:
            raise ProtegeError("evaluation needs the ground-truth masks: the evaluation batches carry none")
        size = target.shape[-1]
        pred = upsample_logits(student["logits"].detach(), size) > 0
        target = target.bool().to(pred.device)
        mode = student["mode"].to(pred.device)
        iou = mask_iou(pred, target)
        t_pred = (
            upsample_logits(teacher["logits"].detach(), size).to(pred.device) > 0
            if teacher is not None
            else None
        )
        valid = mode != PAD
        if "iou" in student:
            self.iou_err += float((student["iou"].detach().float().to(pred.device) - iou)[valid].abs().sum())
            self.iou_n += int(valid.sum())
        for k, acc in self.sums.items():
            sel = mode == k
            acc["n"] += int(sel.sum())
            acc["gt"] += float(iou[sel].sum())
            if t_pred is not None:
                acc["teacher"] += float(mask_iou(pred, t_pred)[sel].sum())
                acc["teacher_gt"] += float(mask_iou(t_pred, target)[sel].sum())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        kinds = [k for k, acc in self.sums.items() if acc["n"]]
        for k in kinds:
            acc, name = self.sums[k], MODE_NAMES[k]
            out[f"miou_{name}"] = acc["gt"] / acc["n"]
            if self.with_teacher:
                out[f"tmiou_{name}"] = acc["teacher"] / acc["n"]
                out[f"teacher/miou_{name}"] = acc["teacher_gt"] / acc["n"]
        if kinds:
            out["miou"] = float(np.mean([out[f"miou_{MODE_NAMES[k]}"] for k in kinds]))
            if self.with_teacher:
                out["tmiou"] = float(np.mean([out[f"tmiou_{MODE_NAMES[k]}"] for k in kinds]))
        if self.iou_n:
            out["iou_mae"] = self.iou_err / self.iou_n
        return out
