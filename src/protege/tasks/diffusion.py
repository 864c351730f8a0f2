"""Class-conditional image generation (``task: generation``): one-step students of a diffusion teacher.

A **batch** is a dict: ``"labels"`` ``(B,)`` class indices, ``"noise"`` ``(B, C, S, S)`` standard
normal, ``"images"`` ``(B, C, S, S)`` a real image of each label's class in [-1, 1] (the GAN term's
real samples, the teacher's training data and the evaluation's reference), ``"index"``; with ODE
pairs (``data.options.pairs``) also ``"pair_noise"``/``"pair_images"``: a teacher pair of the same
class. Training batches draw fresh noise; evaluation batches a fixed noise per index.

A **model** is ``model(noise, labels) -> images`` (:mod:`protege.models.diffusion`); the task builds:

- ``model: unet``: a :class:`~protege.models.diffusion.ScoreModel` (a diffusers ``UNet2DModel`` +
  scheduler); its forward is the N-step sampler. ``kwargs``: ``channels`` (``block_out_channels``,
  default ``[32, 64]``), ``layers_per_block`` (1), ``attention`` (true: attention in the mid block),
  ``scheduler`` (``{name: DDPMScheduler, num_train_timesteps: 1000, prediction_type: epsilon, …}``),
  ``sampler`` (a diffusers scheduler class that samples, e.g. ``DDIMScheduler``) and ``steps``.
  ``weights``: a protege run/checkpoint/safetensors file, or a **diffusers directory** with
  ``unet/`` and ``scheduler/`` (read with diffusers' ``from_pretrained``; then the kwargs other than
  ``sampler``/``steps`` are the directory's) or a hub id.
- ``model: one_step``: a :class:`~protege.models.diffusion.OneStepGenerator` built against the run's
  (first) teacher: the teacher's UNet copied (DMD2's initialisation), or with ``kwargs.channels`` a
  smaller UNet of the same design, randomly initialised, or with ``kwargs.init`` the UNet of a
  score model pretrained against the teacher (MSD's smaller students: a ``score_matching`` run).

In training, a ``ScoreModel`` student with real images returns its denoising pair
(``"denoise_pred"``, ``"denoise_target"``: the ``denoising`` term trains a teacher) and where it was
asked (``"denoise_input"`` ``x_t``, ``"denoise_t"``: ``score_matching`` asks the teacher there); otherwise a
model's forward gives ``"images"`` (and ``"real_images"``, ``"pair_images"``/``"pair_targets"``).
In evaluation the outputs also carry ``"logits"``/``"features"`` of the generated images and
``"real_features"`` of the real ones, from the **feature classifier**: a small CNN trained here on
the same data (``data.options.classifier``: its safetensors file, trained and written there when
missing; default under ``$PROTEGE_CACHE/generation/``).

**Evaluation** (:class:`GenerationEvaluator`): ``fd_<source>`` (``fd_fmnist`` on Fashion-MNIST): the
Fréchet distance between real and generated images in that classifier's feature space — not FID,
whose features are Inception's; ``neg_fd`` (its negative, the primary metric: higher is better);
``precision``/``recall`` (k-NN manifolds, k = 3, Kynkäänniemi et al. 2019) in the same space;
``class_consistency`` (the classifier's accuracy on the generated images, per class too:
``class_consistency/<c>``); with a teacher, ``class_agreement`` (student and teacher samples from the same noise get the same class) and
``teacher/class_consistency``. True FID: :func:`protege.metrics.generation.frechet_inception_distance`
with an Inception weights file the user gives (``data.options.inception``: then ``fid`` too).

**Several students** (Multi-Student Distillation): the classes are partitioned among them
(``data.options.partition``: ``contiguous``, the default, or ``{student: [classes]}``); each
student trains on its classes' samples, and the run predicts through a
:class:`~protege.models.diffusion.RoutedGenerator`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.splits import DataSplits
from ..errors import ProtegeError, closest
from .base import Evaluator, Outputs, Task

GENERATION_MODELS = ("unet", "one_step")
#: ``data.options`` this task reads itself (the rest go to the data source)
OPTIONS = ("classifier", "pairs", "partition", "inception", "classifier_epochs")
DEFAULT_SIZE = 16


# -- data ---------------------------------------------------------------------------------------


class ConditionedImages(Dataset):
    """Items ``{"labels", "noise", "images", "index"}`` (module docstring) from real images in [-1, 1].

    ``train``: fresh noise at each access (torch's global RNG); otherwise noise seeded by
    ``seed`` and the index, the same at every evaluation. ``pairs``: ODE pairs ``{"noise",
    "labels", "images"}``; each item then carries a pair of its own class, drawn at random in
    training, fixed by the index otherwise.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        train: bool,
        seed: int = 0,
        pairs: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()
        self.train = train
        self.seed = int(seed)
        self.pairs = dict(pairs) if pairs is not None else None
        if self.pairs is not None:
            by_class = {}
            for c in self.labels.unique().tolist():
                rows = (self.pairs["labels"] == c).nonzero().flatten()
                if rows.numel() == 0:
                    raise ProtegeError(f"the ODE pairs hold no pair of class {c}: make more pairs (pairs.n)")
                by_class[int(c)] = rows
            self._pair_rows = by_class

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        gen = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        item = {
            "labels": label,
            "noise": torch.randn(self.images.shape[1:], generator=gen),
            "images": self.images[i],
            "index": int(i),
        }
        if self.pairs is not None:
            rows = self._pair_rows[int(label)]
            pick = int(torch.randint(len(rows), (), generator=gen)) if self.train else int(i) % len(rows)
            row = int(rows[pick])
            item["pair_noise"] = self.pairs["noise"][row]
            item["pair_images"] = self.pairs["images"][row]
        return item


@dataclass
class GenerationDataSplits(DataSplits):
    """The generation task's splits, with its feature classifier and what its models are built against."""

    task: ClassVar[str] = "generation"

    #: the feature classifier of the evaluation (module docstring)
    classifier: nn.Module | None = None
    #: an Inception network for true FID, when the user gave its weights
    inception: nn.Module | None = None
    #: the class partition option (``contiguous`` or ``{student: [classes]}``)
    partition: Any = "contiguous"
    #: the model section a ``one_step`` student is built against (the first teacher)
    reference: dict[str, Any] | None = None


def _tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return tensors[0], tensors[1]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)


def _to_unit_range(images: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """Images normalised by ``mean``/``std`` (or in [0, 1] when those are None) → [-1, 1]."""
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
        images = images * s + m
    return (images.clamp(0, 1) * 2 - 1).contiguous()


def load_generation_data(
    data: Mapping[str, Any],
    teachers: Sequence[Mapping[str, Any]] = (),
    students: Sequence[Mapping[str, Any]] = (),
) -> GenerationDataSplits:
    """The run's splits (module docstring): an image source (``fashion-mnist`` by default) resized to
    ``options.size`` (16), as :class:`ConditionedImages`; the feature classifier (trained here once
    and cached) and, with ``options.pairs``, the teacher's ODE pairs (made once and stored)."""
    from ..data import load_data

    options = dict(data.get("options") or {})
    own = {k: options.pop(k) for k in OPTIONS if k in options}
    options.setdefault("size", DEFAULT_SIZE)
    source = str(data.get("source") or "fashion-mnist")
    seed = int(data.get("split_seed", 0))
    base = load_data(
        source,
        root=data.get("root"),
        transforms="none",
        val_fraction=float(data.get("val_fraction", 0.1)),
        test_fraction=float(data.get("test_fraction", 0.2)),
        seed=seed,
        download=bool(data.get("download", False)),
        **options,
    )
    splits = {}
    for name in ("train", "val", "test"):
        part = getattr(base, name)
        if part is None:
            splits[name] = None
            continue
        x, y = _tensors(part)
        splits[name] = (_to_unit_range(x.float(), base.mean, base.std), y.long())
    classifier = _classifier(own, base, *splits["train"])
    inception = None
    if own.get("inception"):
        from ..metrics.generation import load_inception

        inception = load_inception(str(own["inception"]))
    pairs = None
    if own.get("pairs") is not None:
        pairs = _pairs(own["pairs"], teachers, base)
    seeds = {"train": seed, "val": seed + 1, "test": seed + 2}
    datasets = {
        name: ConditionedImages(*value, train=name == "train", seed=seeds[name], pairs=pairs)
        if value is not None
        else None
        for name, value in splits.items()
    }
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields.update(
        datasets,
        mean=None,
        std=None,
        options={**dict(base.options), **{k: v for k, v in own.items() if k != "classifier"}},
    )
    return GenerationDataSplits(
        **fields,
        classifier=classifier,
        inception=inception,
        partition=own.get("partition", "contiguous"),
        reference=dict(teachers[0]) if teachers else None,
    )


def _cache_root() -> Path:
    base = os.environ.get("PROTEGE_CACHE") or Path.home() / ".cache" / "protege"
    return Path(base).expanduser() / "generation"


def _classifier(
    own: Mapping[str, Any], base: DataSplits, images: torch.Tensor, labels: torch.Tensor
) -> nn.Module:
    """The feature classifier: read from ``options.classifier`` (or the cache), else trained and written."""
    from safetensors.torch import load_file

    from ..files import atomic_save_tensors
    from ..models.diffusion import FeatureClassifier

    epochs = int(own.get("classifier_epochs", 3))
    given = own.get("classifier")
    path = (
        Path(str(given)).expanduser()
        if given
        else _cache_root() / f"classifier-{base.fingerprint()[:16]}-e{epochs}.safetensors"
    )
    model = FeatureClassifier(base.in_chans, base.num_classes, base.input_size)
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError) as e:
            raise ProtegeError(
                f"{path} is not a feature classifier for these images ({str(e).splitlines()[0]}): delete it "
                "(it is trained again) or give another data.options.classifier"
            ) from None
        return model.eval()
    model = train_feature_classifier(model, images, labels, epochs=epochs)
    atomic_save_tensors(model.state_dict(), path)
    return model.eval()


def train_feature_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 128,
) -> nn.Module:
    """Train the feature classifier on real images in [-1, 1] (Adam, cross-entropy, ``epochs``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=gen)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                loss = F.cross_entropy(model(images[rows]), labels[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()


PAIR_DEFAULTS = {"path": None, "n": 1000, "steps": None, "seed": 0}


def _pairs(spec: Any, teachers: Sequence[Mapping[str, Any]], base: DataSplits) -> dict[str, torch.Tensor]:
    """The teacher's ODE pairs at ``spec["path"]`` (safetensors), made by its sampler when missing."""
    from safetensors.torch import load_file

    from ..files import atomic_save_tensors

    if not isinstance(spec, Mapping) or not spec.get("path"):
        raise ProtegeError(
            "data.options.pairs is {path: FILE.safetensors, n: 1000, steps: N}: give at least its path"
        )
    bad = sorted(set(spec) - set(PAIR_DEFAULTS))
    if bad:
        raise ProtegeError(f"unknown pairs option {bad[0]!r}; options: {', '.join(PAIR_DEFAULTS)}")
    values = {**PAIR_DEFAULTS, **dict(spec)}
    path = Path(str(values["path"])).expanduser()
    if path.is_file():
        pairs = load_file(str(path))
        if set(pairs) != {"noise", "labels", "images"}:
            raise ProtegeError(
                f"{path} is not a file of ODE pairs (noise, labels, images); remove it to make one"
            )
        return pairs
    if not teachers:
        raise ProtegeError("making ODE pairs needs the run's teacher (its N-step sampler): give a teacher")
    teacher = build_generation_model(
        str(teachers[0]["model"]), teachers[0].get("weights"), teachers[0].get("kwargs") or {}, base, None
    ).eval()
    pairs = make_ode_pairs(teacher, base.num_classes, int(values["n"]), values["steps"], int(values["seed"]))
    atomic_save_tensors(pairs, path)
    return pairs


@torch.no_grad()
def make_ode_pairs(
    teacher: nn.Module,
    num_classes: int,
    n: int,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """``n`` pairs (noise, class, image) from the teacher's sampler (``steps``: its default when None),
    the classes cycling over ``range(num_classes)``: DMD's regression dataset."""
    if n < num_classes:
        raise ProtegeError(f"pairs.n must be at least the number of classes ({num_classes}), got {n}")
    shape = teacher.image_shape
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=gen)
    labels = torch.arange(n) % num_classes
    device = next(teacher.parameters()).device
    images = torch.cat(
        [
            teacher.sample(
                noise[i : i + batch_size].to(device), labels[i : i + batch_size].to(device), steps
            ).cpu()
            for i in range(0, n, batch_size)
        ]
    )
    return {"noise": noise, "labels": labels, "images": images}


# -- models -------------------------------------------------------------------------------------

UNET_KEYS = ("channels", "layers_per_block", "attention", "scheduler", "sampler", "steps")


def build_generation_model(
    name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any, reference: Mapping[str, Any] | None
) -> nn.Module:
    """The model a run's model section names (module docstring)."""
    from ..models import load_weights
    from ..models.diffusion import OneStepGenerator, ScoreModel, tiny_unet, unet_like

    kwargs = dict(kwargs)
    if name == "unet":
        bad = sorted(set(kwargs) - set(UNET_KEYS))
        if bad:
            raise ProtegeError(f"model unet has no option {bad[0]!r}; its options: {', '.join(UNET_KEYS)}")
        sampler, steps = kwargs.get("sampler"), int(kwargs.get("steps", 50))
        if weights is not None and _is_diffusers(weights):
            model = ScoreModel.from_pretrained(weights, sampler=sampler, steps=steps)
            _check_fits(model, data)
            return model
        unet = tiny_unet(
            int(data.input_size),
            int(data.num_classes),
            int(data.in_chans),
            channels=kwargs.get("channels", (32, 64)),
            layers_per_block=int(kwargs.get("layers_per_block", 1)),
            attention=bool(kwargs.get("attention", True)),
        )
        scheduler = kwargs.get("scheduler")
        if scheduler is None and reference is not None and reference.get("model") == "unet":
            # a score model student (score_matching) takes the teacher's noise schedule unless it names one
            ref = build_generation_model(
                "unet", reference.get("weights"), reference.get("kwargs") or {}, data, None
            )
            scheduler = copy.deepcopy(ref.scheduler)
        model = ScoreModel(unet, scheduler or {}, sampler, steps)
        if weights is not None:
            load_weights(model, weights, model_name="unet")
        return model
    if name == "one_step":
        if reference is None:
            raise ProtegeError(
                "model one_step is built against the run's teacher: give a teacher (model: unet)"
            )
        bad = sorted(set(kwargs) - {"channels", "timestep", "init"})
        if bad:
            raise ProtegeError(
                f"model one_step has no option {bad[0]!r}; its options: channels, timestep, init"
            )
        teacher = build_generation_model(
            str(reference["model"]), reference.get("weights"), reference.get("kwargs") or {}, data, None
        )
        if not isinstance(teacher, ScoreModel):
            raise ProtegeError("model one_step needs a teacher with model: unet (a diffusion model)")
        if kwargs.get("init"):  # MSD's smaller students: the UNet of a score model pretrained with TSM
            unet = _init_unet(str(kwargs["init"]), teacher, kwargs.get("channels"), data)
        elif "channels" in kwargs:  # a smaller student of the same design, trained from scratch
            unet = unet_like(teacher.unet, block_out_channels=tuple(int(c) for c in kwargs["channels"]))
        else:  # DMD2: the generator starts from the teacher's weights
            unet = teacher.unet
        model = OneStepGenerator(unet, teacher.scheduler, kwargs.get("timestep"))
        if weights is not None:
            load_weights(model, weights, model_name="one_step")
        return model
    near = closest(name, GENERATION_MODELS)
    hint = f" did you mean {near[0]!r}?" if near else ""
    raise ProtegeError(f"task generation builds models {', '.join(GENERATION_MODELS)}, not {name!r}.{hint}")


def _init_unet(path: str, teacher: Any, channels: Any, data: Any) -> nn.Module:
    """The UNet of the score model at ``path`` (a diffusers directory, or a protege run whose
    ``model/`` is one: e.g. a ``score_matching`` run's student), checked against the teacher."""
    from ..models.diffusion import ScoreModel

    where = Path(path).expanduser()
    if (where / "model" / "unet").is_dir():
        where = where / "model"
    if not (where / "unet").is_dir():
        raise ProtegeError(
            f"one_step init {path!r} is not a diffusers directory (unet/ and scheduler/) nor a run with model/: "
            "give the run of the pretrained score model (e.g. a score_matching run) or its model/ folder"
        )
    start = ScoreModel.from_pretrained(str(where))
    _check_fits(start, data)
    if (start.prediction_type, start.num_train_timesteps) != (
        teacher.prediction_type,
        teacher.num_train_timesteps,
    ):
        raise ProtegeError(
            f"one_step init {path!r} predicts {start.prediction_type!r} over {start.num_train_timesteps} steps, the "
            f"teacher {teacher.prediction_type!r} over {teacher.num_train_timesteps}: pretrain it against this teacher"
        )
    have = tuple(int(c) for c in start.unet.config.block_out_channels)
    if channels is not None and tuple(int(c) for c in channels) != have:
        raise ProtegeError(
            f"one_step channels {list(channels)} differ from init {path!r}'s UNet ({list(have)})"
        )
    return start.unet


def _is_diffusers(weights: str) -> bool:
    """A diffusers directory (``unet/`` inside) or, not being a local path, a hub id."""
    path = Path(weights).expanduser()
    if path.exists():
        return (path / "unet").is_dir()
    return weights.count("/") == 1 and not weights.endswith((".safetensors", ".pt", ".pth"))


def _check_fits(model: Any, data: Any) -> None:
    c, s, _ = model.image_shape
    if data is not None and (c != data.in_chans or s != data.input_size):
        raise ProtegeError(
            f"the diffusers UNet makes {c}×{s}×{s} images, the data has {data.in_chans}×{data.input_size}×"
            f"{data.input_size}: set data.options.size to {s}"
        )
    n = getattr(model.unet.config, "num_class_embeds", None)
    if data is not None and n is not None and n < data.num_classes:
        raise ProtegeError(
            f"the diffusers UNet has {n} class embeddings, the data {data.num_classes} classes"
        )


# -- the task -----------------------------------------------------------------------------------


class GenerationTask(Task):
    """Class-conditional generation with one-step students (module docstring)."""

    name = "generation"
    primary_metric = "neg_fd"
    partition_students = True
    output_keys = frozenset(
        {
            "images",
            "labels",
            "real_images",
            "pair_images",
            "pair_targets",
            "denoise_pred",
            "denoise_target",
            "denoise_input",
            "denoise_t",
            "logits",
            "features",
            "real_features",
            "inception",
            "real_inception",
        }
    )
    native_format = "diffusers"
    #: a diffusion model trained here is also written as a diffusers directory (``runs/<name>/model/``)
    export_after_run = True

    def __init__(self) -> None:
        self.data: GenerationDataSplits | None = None

    def bind(self, data: Any) -> None:
        if isinstance(data, GenerationDataSplits):
            self.data = data

    def load_data(self, data, teachers, students):  # type: ignore[no-untyped-def]
        splits = load_generation_data(data, teachers, students)
        self.bind(splits)
        return splits

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        return build_generation_model(name, weights, kwargs, data, getattr(data, "reference", None))

    # -- batches
    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if not isinstance(batch, Mapping) or "labels" not in batch or "noise" not in batch:
            raise ProtegeError(
                "a generation batch is a dict with 'labels', 'noise' and optionally 'images' "
                f"(protege.tasks.diffusion.ConditionedImages); got {type(batch).__name__}"
            )
        inputs = {k: v for k, v in batch.items() if k != "index"}
        return inputs, batch["labels"]

    def meta(self, batch: Any) -> dict[str, Any]:
        return {"index": batch["index"]} if isinstance(batch, Mapping) and "index" in batch else {}

    def batch_size(self, inputs: Any) -> int:
        return int(inputs["labels"].shape[0])

    def model_input(self, inputs: Any) -> Any:
        """``model(noise=…, labels=…)``."""
        return {"noise": inputs["noise"], "labels": inputs["labels"]}

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        labels = inputs["labels"]
        if model.training and hasattr(model, "noised") and "images" in inputs:
            x_t, t, target = model.noised(inputs["images"])
            return {
                "denoise_pred": model.predict(x_t, t, labels),
                "denoise_target": target,
                "denoise_input": x_t,  # where the UNet was asked: a teacher's score there (score_matching)
                "denoise_t": t,
                "labels": labels,
            }
        images = model(inputs["noise"], labels)
        out: Outputs = {"images": images, "labels": labels}
        if "images" in inputs:
            out["real_images"] = inputs["images"]
        if model.training and "pair_noise" in inputs:
            out["pair_images"] = model(inputs["pair_noise"], labels)
            out["pair_targets"] = inputs["pair_images"]
        if not model.training:
            out.update(self._judge(images, inputs.get("images")))
        return out

    @torch.no_grad()
    def _judge(self, images: torch.Tensor, real: torch.Tensor | None) -> Outputs:
        """The feature classifier's logits and features of the generated (and real) images."""
        data = self.data
        if data is None or data.classifier is None:
            return {}
        clf = data.classifier.to(images.device).eval()
        images = images.float().clamp(-1, 1)  # as a sample is shown or saved
        logits, features = clf.classify(images)
        out: Outputs = {"logits": logits, "features": features}
        if real is not None:
            out["real_features"] = clf.classify(real.float())[1]
        if data.inception is not None:
            from ..metrics.generation import inception_features

            net = data.inception.to(images.device)
            out["inception"] = inception_features(net, images)
            if real is not None:
                out["real_inception"] = inception_features(net, real.float())
        return out

    def eval_outputs(self) -> tuple[str, ...]:
        return ("logits", "features", "real_features", "inception", "real_inception")

    def evaluator(self, with_teacher: bool) -> Evaluator:
        source = self.data.source if self.data is not None else "data"
        return GenerationEvaluator(with_teacher, fd_name(source))

    # -- multi-student distillation
    def report_figures(
        self, student: nn.Module, teachers: Sequence[nn.Module], data: Any
    ) -> list[tuple[str, bytes]]:
        """Samples per class, one row per class, from the same noise: the teacher's N-step sampler and
        the student's one step (a multi-student run's routed model: each class from its student)."""
        from ..models.diffusion import grid_png

        shape = tuple(data.val[0]["images"].shape)
        n_classes, per_class = min(int(data.num_classes), 10), 8
        noise = torch.randn((n_classes * per_class, *shape), generator=torch.Generator().manual_seed(0))
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        names = list(getattr(data, "class_names", None) or range(n_classes))[:n_classes]
        rows = ", ".join(str(n) for n in names)
        figures = []
        for who, model in [("teacher", t) for t in teachers[:1]] + [("student", student)]:
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    device = next(model.parameters()).device
                    images = model(noise.to(device), labels.to(device)).clamp(-1, 1).cpu()
            finally:
                model.train(was)
            steps = "its N-step sampler" if who == "teacher" else "one step"
            caption = f"{who}, {steps}: {per_class} samples per class (rows: {rows}); the same noise for both"
            figures.append((caption, grid_png(images, nrow=per_class)))
        return figures

    def partition(self, students: Sequence[str]) -> dict[str, Any] | None:
        from ..models.diffusion import partition_classes

        if self.data is None:
            raise ProtegeError(
                "the generation task partitions the classes of its data: bind it to the run's data"
            )
        spec = self.data.partition
        if spec in (None, "contiguous"):
            return dict(partition_classes(self.data.num_classes, students))
        if not isinstance(spec, Mapping):
            raise ProtegeError(
                f"data.options.partition is 'contiguous' or a mapping {{student: [classes]}}, got {spec!r}"
            )
        return dict(partition_classes(self.data.num_classes, students, spec))

    def route(self, batch: Any, part: Any) -> Any:
        labels = batch["labels"]
        keep = torch.isin(labels, torch.as_tensor(list(part), device=labels.device))
        if not bool(keep.any()):
            return None
        if bool(keep.all()):
            return batch
        return {
            k: v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == labels.shape else v
            for k, v in batch.items()
        }

    def routed(self, models: Mapping[str, nn.Module], parts: Mapping[str, Any]) -> nn.Module:
        from ..models.diffusion import RoutedGenerator

        return RoutedGenerator(models, parts)

    def export(
        self, model: nn.Module, data: Any, directory: Path, spec: Mapping[str, Any] | None = None
    ) -> bool:
        """A diffusion model (a teacher trained here) as a diffusers directory (``unet/`` +
        ``scheduler/``, loaded by ``ScoreModel.from_pretrained`` and diffusers). One-step generators
        have no diffusers format: their checkpoints are the export."""
        if not hasattr(model, "save_pretrained"):
            return False
        model.save_pretrained(directory)
        return True


def fd_name(source: str) -> str:
    """The Fréchet-distance metric's name for a data source: ``fd_fmnist`` on Fashion-MNIST."""
    short = {"fashion-mnist": "fmnist"}.get(source, source)
    return "fd_" + "".join(ch if ch.isalnum() else "_" for ch in short.lower())


# -- evaluation ---------------------------------------------------------------------------------


class GenerationEvaluator(Evaluator):
    """FD, k-NN precision/recall and class consistency in the feature classifier's space (module docstring)."""

    def __init__(self, with_teacher: bool, fd_key: str = "fd_fmnist", k: int = 3) -> None:
        self.with_teacher = with_teacher
        self.fd_key = fd_key
        self.k = k
        self.parts: dict[str, list[torch.Tensor]] = {
            k: []
            for k in ("features", "real_features", "inception", "real_inception", "pred", "labels", "teacher")
        }

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        if target is None:
            raise ProtegeError("evaluating generation needs the batch's class labels")
        if "features" not in student:
            raise ProtegeError(
                "the generation evaluator needs the feature classifier's outputs (bind the task to its data)"
            )
        for key in ("features", "real_features", "inception", "real_inception"):
            if key in student:
                self.parts[key].append(student[key].detach().float().cpu())
        self.parts["pred"].append(student["logits"].detach().argmax(-1).cpu())
        self.parts["labels"].append(target.detach().cpu())
        if teacher is not None and "logits" in teacher:
            self.parts["teacher"].append(teacher["logits"].detach().argmax(-1).cpu())

    def compute(self) -> dict[str, float]:
        from ..metrics.generation import frechet_distance_of, precision_recall

        out: dict[str, float] = {}
        cat = {k: torch.cat(v) for k, v in self.parts.items() if v}
        if not cat:
            return out
        pred, labels = cat["pred"], cat["labels"]
        fd = None
        if "real_features" in cat and len(labels) > 1:
            fd = frechet_distance_of(cat["real_features"].double(), cat["features"].double())
            out[self.fd_key] = fd
            if len(labels) > self.k:
                out["precision"], out["recall"] = precision_recall(
                    cat["real_features"], cat["features"], k=self.k
                )
        out["class_consistency"] = float((pred == labels).float().mean())
        if "real_inception" in cat and len(labels) > 1:
            out["fid"] = frechet_distance_of(cat["real_inception"].double(), cat["inception"].double())
        if fd is not None:
            out["neg_fd"] = -fd
        if "teacher" in cat:
            t = cat["teacher"]
            out["class_agreement"] = float((t == pred).float().mean())
            out["teacher/class_consistency"] = float((t == labels).float().mean())
        for c in labels.unique().tolist():
            sel = labels == c
            out[f"class_consistency/{int(c)}"] = float((pred[sel] == c).float().mean())
        return out


__all__ = [
    "ConditionedImages",
    "GenerationDataSplits",
    "GenerationEvaluator",
    "GenerationTask",
    "build_generation_model",
    "fd_name",
    "load_generation_data",
    "make_ode_pairs",
    "train_feature_classifier",
]
