"""The run config: one pydantic schema for a run YAML, loading with ``--set`` overrides, and clear errors.

A run YAML (see ``configs/``)::

    name: mnist-kd
    data: {source: mnist5k, batch_size: 128}
    teacher: {model: cnn_m, weights: runs/mnist-teacher}
    student: {model: mlp_s}
    terms:
      - {loss: ce, weight: 0.1}
      - {loss: kd, weight: 0.9, T: 4}
    epochs: 10
    optim: {name: sgd, lr: 0.05}

``protege config schema`` prints the JSON schema. Unknown keys, bad values and missing files are
reported in one message that names the key, the problem and the closest valid spelling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .core.distiller import TeacherPrecision
from .engine.options import OptimConfig, ScheduleConfig, Seed, TrainConfig
from .errors import ProtegeError, closest
from .losses import get_loss, list_losses

#: the longest file or directory name most file systems take, in bytes
NAME_MAX = 255


def _plain_dir_name(v: str) -> str:
    if not v or "/" in v or v in (".", ".."):
        raise ValueError("must be a plain directory name (no '/')")
    return _path_text(v)


def _path_text(v: str) -> str:
    if "\x00" in v:
        raise ValueError("must not contain a NUL character")
    for part in v.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise ValueError(
                f"{part[:20]!r}... is {len(part.encode('utf-8', 'surrogatepass'))} bytes long; a file "
                f"system takes names of at most {NAME_MAX} bytes: shorten it"
            )
    return v


#: a name used as a directory name (of a run, a stage, a search)
DirName = Annotated[str, AfterValidator(_plain_dir_name)]
#: a path of a directory protege writes into
DirPath = Annotated[str, AfterValidator(_path_text)]


class PoolConfig(BaseModel):
    """An image set used as unlabelled training data (a proxy / web pool): any data source."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="a data source (as data.source), e.g. shifted-pool or imagefolder")
    root: str | None = Field(None, description="directory of the pool, for sources that read files")
    split: Literal["train", "all"] = Field(
        "train", description="which of the source's splits form the pool (all: train+val+test)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="source-specific options")


# -- KD³ (proxy data): owned by protege.strategies.proxy ---------------------------------------------


class ProxyConfig(BaseModel):
    """Distillation on a proxy / web pool instead of the original training set (KD³, see
    ``protege.strategies.proxy``). The pool's labels, if it has any, are never used for training.

    KD³'s other two components are loss terms: ``kd3_align`` (feature and classifier alignment)
    and ``kd3_contrast`` (MixDistribution views + NT-Xent); each is on when its term is listed.
    """

    model_config = ConfigDict(extra="forbid")
    pool: PoolConfig
    selection: bool = Field(
        True, description="KD³ dynamic instance selection, re-run every epoch (false: the whole pool)"
    )
    alpha_start: float = Field(
        1.0, ge=0, le=1, description="selection: weight α of the teacher's prediction at the first epoch"
    )
    alpha_end: float = Field(
        0.0, ge=0, le=1, description="selection: α at the last epoch (1 - α goes to the student's prediction)"
    )
    alpha_schedule: Literal["linear", "cosine", "exponential"] = Field(
        "linear", description="selection: how α moves from alpha_start to alpha_end over the epochs"
    )
    threshold: float = Field(
        0.95, gt=0, le=1, description="selection: confidence threshold τ (FlexMatch's 0.95)"
    )
    adaptive: bool = Field(
        True,
        description="selection: class-wise FlexMatch thresholds τ_c = M(β_c)·τ (false: τ for every class)",
    )
    threshold_warmup: bool = Field(
        False,
        description="selection: FlexMatch's warm-up: β_c divides by max(max_c σ_c, unconfident count). Off "
        "by default: it assumes a model that starts untrained, but the teacher is trained and stays as "
        "unconfident on a pool's out-of-distribution part, so every threshold stays near 0 (measured on "
        "shifted-pool: all 6000 images kept)",
    )
    threshold_mapping: Literal["convex", "linear"] = Field(
        "convex", description="selection: M(x) = x / (2 - x) (FlexMatch's convex mapping) or M(x) = x"
    )
    fallback_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="selection: when no sample passes the thresholds, train on this most confident share",
    )
    samples_per_epoch: int | None = Field(
        None,
        gt=0,
        description="samples drawn per epoch from the kept ones (fixed: the LR schedule counts steps); "
        "default the pool's size",
    )
    mix_beta: float = Field(
        0.1, gt=0, description="kd3_contrast: MixDistribution's λ ~ Beta(mix_beta, mix_beta) per instance"
    )

    @model_validator(mode="after")
    def _exponential_needs_positive(self) -> ProxyConfig:
        if self.alpha_schedule == "exponential" and min(self.alpha_start, self.alpha_end) <= 0:
            raise ValueError("alpha_schedule 'exponential' needs alpha_start and alpha_end above 0")
        return self


# -- data-free synthesis: owned by protege.strategies.synthesis ----------------------------------------


class SynthesisConfig(BaseModel):
    """Distillation without data: images synthesized from the teacher (see ``protege.strategies.synthesis``).

    ``deepinversion`` optimizes a set of images once, at the start of the run (saved in
    ``runs/<name>/synthetic/``, or ``path``), then distills on it like on any data set.
    ``adversarial`` trains a generator between the student's steps to make images on which student
    and teacher disagree; the student trains on its freshly generated batches.
    """

    model_config = ConfigDict(extra="forbid")
    method: Literal["deepinversion", "adversarial"] = "deepinversion"
    seed: Seed | None = Field(None, description="seed of the synthesis (default: the run's seed)")
    bn_weight: float = Field(
        1.0, ge=0, description="weight of the BatchNorm-statistic loss (sum over the teacher's BN layers)"
    )
    bn_first_multiplier: float = Field(
        10.0,
        ge=0,
        description="extra factor on the first BN layer's statistic loss (DeepInversion's code: 10)",
    )
    # -- deepinversion ------------------------------------------------------------------------
    n_images: int = Field(2000, ge=1, description="deepinversion: images in the synthesized set")
    batch_size: int = Field(100, ge=1, description="deepinversion: images optimized together")
    iterations: int = Field(500, ge=1, description="deepinversion: Adam steps per batch")
    lr: float = Field(0.1, gt=0, description="deepinversion: Adam learning rate on the pixels (cosine decay)")
    ce_weight: float = Field(
        1.0, ge=0, description="deepinversion: cross-entropy to the sampled target classes"
    )
    tv_weight: float = Field(1e-3, ge=0, description="deepinversion: total-variation prior")
    l2_weight: float = Field(1e-4, ge=0, description="deepinversion: L2 prior on the (normalized) pixels")
    competition_weight: float = Field(
        0.0,
        ge=0,
        description="deepinversion: adaptive competition (ADI: 1 - JS(teacher, student)); it competes "
        "with the run's student as it is before distillation (protege synthesize: the config's student "
        "with its weights)",
    )
    jitter: int = Field(2, ge=0, description="deepinversion: random shift of up to this many pixels per step")
    flip: bool = Field(False, description="deepinversion: random horizontal flip per step (not for digits)")
    dtype: Literal["uint8", "float16"] = Field(
        "uint8", description="deepinversion: storage of the images (uint8 pixels, or float16 normalized)"
    )
    path: str | None = Field(
        None,
        description="deepinversion: directory of the set (default runs/<name>/synthetic); an existing set "
        "there is reused when teacher weights and options match",
    )
    overwrite: bool = Field(
        False,
        description="re-synthesize when the existing set was made from other teacher weights or options",
    )
    # -- adversarial --------------------------------------------------------------------------
    steps_per_epoch: int = Field(
        50, ge=1, description="adversarial: student steps per epoch (each on a fresh generated batch)"
    )
    generator_every: int = Field(
        1, ge=1, description="adversarial: train the generator every k student steps (DFAD: 5)"
    )
    generator_steps: int = Field(1, ge=1, description="adversarial: generator updates each time it trains")
    generator_lr: float = Field(1e-3, gt=0, description="adversarial: generator Adam learning rate")
    z_dim: int = Field(100, ge=1, description="adversarial: generator noise dimension")
    generator_width: int = Field(64, ge=4, description="adversarial: channels of the generator's last block")
    disagreement: Literal["l1", "kl"] = Field(
        "l1", description="adversarial: what the generator maximizes (l1: mean |logit gap| as DFAD; kl: ZSKT)"
    )
    oh_weight: float = Field(
        0.0, ge=0, description="adversarial: DAFL one-hot prior (CE of the teacher to its own argmax)"
    )
    ie_weight: float = Field(
        0.0, ge=0, description="adversarial: DAFL information-entropy prior (balanced classes over the batch)"
    )


# ------------------------------------------------------------------------------------------------


class DataConfig(BaseModel):
    """Where the data comes from and how it is batched (see ``protege.data.load_data``).

    ``strategy`` says what the student trains on: ``original`` (the source's training split),
    ``proxy`` (the unlabelled pool under ``proxy``, KD³) or ``synthetic`` (images synthesized
    from the teacher, ``synthesis``). Validation and test always come from ``source``.
    """

    model_config = ConfigDict(extra="forbid")
    source: str = Field(
        "mnist5k", description="mnist5k | digits | fashion-mnist | imagefolder | torchvision:<Name> | hf"
    )
    root: str | None = Field(None, description="directory of the data, for sources that read files")
    transforms: str = Field(
        "auto",
        description=(
            "auto | a recipe (cifar, imagenet, mnist, resize, none) for file-based sources; in-memory "
            "sources: auto | none | augment (random 2-px shift), and strong (random resized crop, "
            "flip for fashion-mnist only, random erasing; Hao et al. 2023) for mnist5k, digits, fashion-mnist"
        ),
    )
    batch_size: int = Field(128, gt=0, le=2**31 - 1)
    eval_batch_size: int = Field(512, gt=0, le=2**31 - 1)
    num_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="DataLoader worker processes (0: load in the main process); at most 256, each is a process",
    )
    download: bool = False
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="validation share carved from train when the source has no val split"
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="test share, for sources with a single split")
    split_seed: Seed = Field(
        0, description="seed of carved splits; fixed so runs with different seeds share them"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="source-specific options")
    strategy: Literal["original", "proxy", "synthetic"] = Field(
        "original", description="train on the source's data, a proxy pool (proxy:), or synthesized images"
    )
    proxy: ProxyConfig | None = Field(None, description="the proxy pool and KD³ options (strategy: proxy)")
    synthesis: SynthesisConfig | None = Field(
        None, description="how images are synthesized from the teacher (strategy: synthetic)"
    )

    @model_validator(mode="after")
    def _strategy_options(self) -> DataConfig:
        if self.strategy == "proxy" and self.proxy is None:
            raise ValueError("strategy 'proxy' needs 'proxy: {pool: {source: ...}}' (the unlabelled pool)")
        if self.strategy == "synthetic" and self.synthesis is None:
            self.synthesis = SynthesisConfig()
        if self.proxy is not None and self.strategy != "proxy":
            raise ValueError("'proxy' is given but strategy is not 'proxy': set strategy: proxy or remove it")
        if self.synthesis is not None and self.strategy != "synthetic":
            raise ValueError(
                "'synthesis' is given but strategy is not 'synthetic': set strategy: synthetic or remove it"
            )
        return self


class ModelConfig(BaseModel):
    """A model by name (protege zoo, timm or torchvision), optionally with local weights."""

    model_config = ConfigDict(extra="forbid")
    model: str
    weights: str | None = Field(
        None,
        description="safetensors/.pt file, checkpoint directory, or a protege run directory (its best checkpoint)",
    )
    weight: float = Field(1.0, ge=0, description="this teacher's weight in a multi-teacher ensemble")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the model")
    name: str | None = Field(
        None, description="a teacher's role name, which terms' teacher_index may use (e.g. tough, tolerant)"
    )


class TermConfig(BaseModel):
    """One loss term; any further key is a hyper-parameter of the loss (e.g. ``T: 4``)."""

    model_config = ConfigDict(extra="allow")
    loss: str
    weight: float = 1.0
    student: str | list[str] = Field(
        "logits",
        description="logits, a tap path, or a list of taps; left out: the loss's default keys "
        "(logits, unless the loss names others, e.g. clip_cls reads image_embeds)",
    )
    teacher: str | list[str] = Field(
        "logits",
        description="logits, a tap path, or a list of taps; left out: the loss's default keys",
    )
    name: str | None = None
    warmup: float = Field(0.0, ge=0)
    teacher_index: int | str | list[int | str] | None = Field(
        None,
        description="read only this teacher (an index, or a teacher's name), or these teachers in this order "
        "(a list; a two-teacher loss such as kd_loss reads [tough, tolerant]); default: every teacher",
    )
    adapter: str | None = Field(None, description="auto | linear | conv1x1 | conv_bn | conv_bn_relu")
    allow_negative: bool = Field(
        False,
        description="accept a negative weight (the student then moves away from what the term measures)",
    )

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def term_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`protege.core.distiller.Term` (the loss's params included)."""
        return self.model_dump(exclude={"allow_negative"})

    @model_validator(mode="after")
    def _default_keys(self) -> TermConfig:
        """Keys left out are the loss's default keys (see :mod:`protege.losses.registry`); an unknown
        loss keeps ``logits`` here and is reported where the term is built."""
        given = self.model_fields_set
        if ("student" in given and "teacher" in given) or self.loss not in {i.name for i in list_losses()}:
            return self
        for field, key in zip(("student", "teacher"), get_loss(self.loss).default_keys):
            value = key if isinstance(key, str) else list(key)
            if field not in given and value != getattr(self, field):
                setattr(self, field, value)
        return self

    @model_validator(mode="after")
    def _weight(self) -> TermConfig:
        if not math.isfinite(self.weight):
            raise ValueError(f"weight must be a finite number, got {self.weight}")
        if self.weight < 0 and not self.allow_negative:
            raise ValueError(
                f"weight {self.weight} is negative: the term would be maximized (the student pushed away "
                "from it). Use a positive weight, or set allow_negative: true on the term if that is meant"
            )
        return self


class StudentConfig(ModelConfig):
    """One of several students trained in one run (``students:``)."""

    name: str | None = Field(None, description="the student's name in metrics and outputs (default: model)")


class MutualConfig(BaseModel):
    """Deep mutual learning among the students: each also distills from its peers."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(
        1.0, ge=0, description="weight of the peer KL term (0: students do not teach each other)"
    )
    T: float = Field(1.0, gt=0, description="temperature of the peer KL")


class OnPolicyConfig(BaseModel):
    """On-policy distillation (GKD, ``protege.core.on_policy``): some training batches are the
    student's own samples after each prompt, scored by the teacher (task ``lm``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lam: float = Field(
        0.5,
        alias="lambda",
        ge=0,
        le=1,
        description="fraction of training batches the student generates (GKD's λ)",
    )
    max_new_tokens: int = Field(64, ge=1, description="tokens generated after each prompt (fewer at EOS)")
    temperature: float = Field(1.0, ge=0, description="the student's sampling temperature (0: greedy)")
    prompt_length: int | None = Field(
        None,
        ge=1,
        description="prompt tokens kept from examples without a prompt (packed text); default half",
    )


class StageConfig(BaseModel):
    """One stage of a multi-stage run (e.g. FT's paraphraser pre-training, then distillation).

    Keys left out come from the run's top level. The student's weights and the trainable state
    of terms that keep the same ``name`` carry over from one stage to the next.
    """

    model_config = ConfigDict(extra="forbid")
    name: DirName = Field(description="the stage's name; its outputs go to runs/<run>/stages/<name>/")
    epochs: int | None = Field(None, gt=0)
    optim: OptimConfig | None = None
    schedule: ScheduleConfig | None = None
    terms: list[TermConfig] | None = None
    freeze_student: bool = Field(
        False,
        description="train only the terms' own modules (e.g. FT's paraphraser); the student stays fixed",
    )


class QuantizeConfig(BaseModel):
    """Quantization-aware distillation (QAD, :mod:`protege.core.fake_quant`): the student trains with
    its Conv/Linear weights (int8, per output channel, symmetric) and their inputs (uint8, per
    tensor, moving-average ranges) fake-quantized, under the run's terms. Start it from a trained
    student (``student.weights``) for a few epochs at a low learning rate; ``protege export --format
    int8`` then writes the int8 model with the ranges it learned.

    ``quantize: int8`` is short for ``quantize: {mode: int8}``.
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["int8"] = Field("int8", description="int8: what protege export --format int8 deploys")
    averaging_constant: float = Field(
        0.01,
        gt=0,
        le=1,
        description="weight of each training batch in the moving average of the input ranges (PyTorch's "
        "MovingAverageMinMaxObserver default); the first batch sets them",
    )
    exclude: list[str] = Field(
        default_factory=list, description="module paths (shell patterns) left in float, e.g. ['fc']"
    )

    @model_validator(mode="before")
    @classmethod
    def _mode_only(cls, data: Any) -> Any:
        return {"mode": data} if isinstance(data, str) else data

    def fake_quant_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`protege.core.fake_quant.FakeQuant`."""
        return {"averaging_constant": self.averaging_constant, "exclude": list(self.exclude)}


class CacheConfig(BaseModel):
    """Teacher-output cache (offline KD, see ``protege.engine.cache``): ``protege cache run.yaml``
    builds it; ``protege distill`` then trains from it and never loads the teacher.

    ``cache: path`` is short for ``cache: {path: path}``.
    """

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="directory of the cache (index.json + safetensors shards)")
    views: int = Field(
        4,
        ge=1,
        description="augmented views stored per training sample (1 when the transform has no randomness)",
    )
    top_k: int | Literal["all"] = Field(
        "all",
        description="'all': the teacher's full logits, in float32, from which every term computes its online "
        "loss exactly; k: only the top-k log-probabilities (dtype) + indices per view, for runs whose terms "
        "read no teacher logits (a distill run whose terms read them is refused: no loss over the classes is "
        "exact from top-k). lm caches: top-k next tokens, 128 when not set",
    )
    taps: list[str] = Field(
        default_factory=list, description="teacher taps to store too (for feature losses)"
    )
    reduce: bool = Field(
        True,
        description="store a tap reduced when every term reading it only needs the teacher's reduction "
        "(AT: the attention map, H*W floats instead of C*H*W); false: store raw maps",
    )
    dtype: Literal["float16", "float32", "bfloat16"] = Field(
        "float16",
        description="storage of the taps (and of top-k log-probabilities); full logits are always float32",
    )
    shard_size: int = Field(10_000, gt=0, description="samples per shard file")
    seed: Seed = Field(0, description="seed of the drawn augmentation parameters")
    levels: int | None = Field(
        96,
        ge=1,
        le=255,
        description="lm caches: each stored probability's square root quantized to this many levels (one "
        "byte), entries below the first level merged into the rest bucket; null: fp16 log-probabilities",
    )
    verify: Literal["sha256", "size"] = Field(
        "sha256", description="check shards' SHA-256 on open (else only their sizes)"
    )

    @model_validator(mode="before")
    @classmethod
    def _path_only(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("top_k")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive number of classes or 'all'")
        return v

    @model_serializer(mode="wrap")
    def _top_k_unset_stays_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A dump leaves ``top_k`` out when the config did not set it, so that it stays unset through
        ``--set`` overrides (applied to a dump, validated again): an lm cache then takes its own
        default, 128 tokens, rather than the classification default, all classes."""
        data = handler(self)
        if "top_k" not in self.model_fields_set:
            data.pop("top_k", None)
        return data


class RunConfig(TrainConfig):
    """A whole run: data, teacher(s), student, loss terms, and the training options."""

    name: DirName = Field("run", description="the run's directory name under output_dir")
    output_dir: DirPath = "runs"
    task: str = "classification"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelConfig | None = None
    teachers: list[ModelConfig] = Field(
        default_factory=list, description="several teachers (instead of teacher)"
    )
    student: ModelConfig | None = None
    students: list[StudentConfig] = Field(
        default_factory=list,
        description="several students trained together on shared batches (instead of student)",
    )
    mutual: MutualConfig | None = Field(
        None, description="students also teach each other (deep mutual learning)"
    )
    baseline: str | None = Field(
        None,
        description="run directory of the same student trained without distillation (protege train), "
        "the report's reference; default: looked for among the runs beside this one",
    )
    terms: list[TermConfig] = Field(default_factory=lambda: [TermConfig(loss="ce")])
    cache: CacheConfig | None = Field(
        None, description="read the teachers' outputs from this cache (protege cache) instead of running them"
    )
    on_policy: OnPolicyConfig | None = Field(
        None,
        description="on-policy distillation (GKD): with probability lambda the student generates the batch",
    )
    teacher_precision: TeacherPrecision = Field(
        "fp32",
        description="fp32: the frozen teachers run as they are; bf16: their forward in training steps "
        "runs under bfloat16 autocast (CPU or CUDA; ~40% less teacher time on a CPU with bf16 support), "
        "the losses still get float32 tensors; evaluation's fidelity reference stays fp32. 'protege "
        "cache' uses it for the training views",
    )
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="run as consecutive stages (each overrides epochs/optim/schedule/terms)",
    )
    quantize: QuantizeConfig | None = Field(
        None,
        description="quantization-aware distillation: train the student in int8 fake quantization "
        "(quantize: int8); export it with protege export --format int8",
    )

    @model_validator(mode="after")
    def _one_teacher_key(self) -> RunConfig:
        if self.teacher is not None and self.teachers:
            raise ValueError("give either 'teacher' or 'teachers', not both")
        if (self.student is None) == (not self.students):
            raise ValueError("give either 'student' or 'students' (a list), exactly one of them")
        names = [s.name or s.model for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"students need distinct names (got {names}); set name: on each")
        if self.mutual is not None and len(self.students) < 2:
            raise ValueError("'mutual' needs at least two students under 'students'")
        if self.students and self.stages:
            raise ValueError("multi-stage runs train one student: use 'student' with 'stages'")
        if self.data.strategy != "original":
            labelled = [
                t.loss
                for t in self.terms
                if t.loss in {i.name for i in list_losses()} and get_loss(t.loss).uses_target
            ]
            if labelled:
                raise ValueError(
                    f"data.strategy {self.data.strategy!r} trains without labels, but terms {labelled} "
                    "read them: remove them (the teacher's outputs are the only supervision)"
                )
            if self.all_teachers() == [] or self.cache is not None or self.students or self.stages:
                raise ValueError(
                    f"data.strategy {self.data.strategy!r} needs one student, a teacher run online "
                    "(no cache), and no stages"
                )
        if self.quantize is not None:
            if self.students or self.stages:
                raise ValueError(
                    "quantize trains one student in one stage: use 'student' without 'stages' (run the "
                    "quantization-aware stage as a run of its own, student.weights: the earlier run)"
                )
            if self.task != "classification":
                raise ValueError(
                    f"quantize supports task 'classification' (the int8 export's task), not {self.task!r}"
                )
        stage_names = [st.name for st in self.stages]
        if len(set(stage_names)) != len(stage_names):
            raise ValueError(f"stage names must be distinct, got {stage_names}")
        return self

    @model_validator(mode="after")
    def _teacher_names(self) -> RunConfig:
        """Terms' ``teacher_index`` given as teachers' names, resolved to their indices."""
        names = [t.name for t in self.all_teachers()]
        given = [n for n in names if n is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"teachers need distinct names, got {given}")

        def resolve(value: int | str) -> int:
            if isinstance(value, int):
                return value
            if value not in names:
                known = ", ".join(repr(n) for n in given) or "none (set name: on each teacher)"
                raise ValueError(f"teacher_index {value!r} names no teacher; the teachers' names: {known}")
            return names.index(value)

        for term in [*self.terms, *(t for st in self.stages for t in (st.terms or []))]:
            index = term.teacher_index
            if isinstance(index, list):
                if not index:
                    raise ValueError(
                        "teacher_index: an empty list picks no teacher; remove it to read them all"
                    )
                term.teacher_index = [resolve(i) for i in index]
            elif isinstance(index, str):
                term.teacher_index = resolve(index)
        return self

    def all_students(self) -> dict[str, ModelConfig]:
        """The students by name (one student is named ``student``)."""
        if self.student is not None:
            return {"student": self.student}
        return {s.name or s.model: s for s in self.students}

    def stage_config(self, index: int) -> RunConfig:
        """This config with stage ``index``'s overrides applied (and no stages)."""
        stage = self.stages[index]
        update: dict[str, Any] = {"stages": []}
        for key in ("epochs", "optim", "schedule", "terms"):
            value = getattr(stage, key)
            if value is not None:
                update[key] = value
        return self.model_copy(update=update)

    def all_teachers(self) -> list[ModelConfig]:
        return [self.teacher] if self.teacher is not None else list(self.teachers)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def train_config(self) -> TrainConfig:
        """The engine's part of this config."""
        return TrainConfig(**{k: getattr(self, k) for k in TrainConfig.model_fields})


def json_schema() -> str:
    """The JSON schema of a run YAML."""
    return json.dumps(RunConfig.model_json_schema(), indent=2)


# -- loading ------------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["optim.lr=0.05", "terms.1.T=2"]`` → ``[(["optim", "lr"], 0.05), (["terms", "1", "T"], 2)]``."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ProtegeError(f"--set expects KEY=VALUE (e.g. optim.lr=0.05), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested config dict (list items by index)."""
    for path, value in parse_overrides(overrides):
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                node = node[_index(part, node, where)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ProtegeError(f"--set {'.'.join(path)}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            node[_index(last, node, ".".join(path))] = value
        else:
            node[last] = value
    return data


def _index(part: str, node: list[Any], where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ProtegeError(
            f"--set {where}: the list has {len(node)} items; use an index from 0 to {len(node) - 1}"
        )
    return int(part)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last one
    silently: half a config would be ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first {seen[key]}); keep one",
                    key_node.start_mark,
                )
            seen[key] = f"line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, what: str, keys: str) -> dict[str, Any]:
    """The mapping a YAML file holds; a clear error for a missing file, bad YAML or another type
    (``what``: the kind of file, ``keys``: examples of its keys, both for the messages)."""
    p = Path(path)
    if p.is_dir():
        raise ProtegeError(f"{p} is a directory; give the {what} itself (a .yaml file)")
    if not p.is_file():
        raise ProtegeError(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ProtegeError(
            f"{p} is not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ProtegeError(f"cannot read {p}: {e.strerror}") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ProtegeError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ProtegeError(f"{p} must hold a mapping of keys ({keys}), not a {type(loaded).__name__}")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any
) -> RunConfig:
    """Read a run YAML (or start from ``defaults``), apply ``--set`` overrides, and validate."""
    data: dict[str, Any] = dict(defaults)
    if path is not None:
        data.update(read_yaml_mapping(path, "config file", "name:, data:, student: …"))
    source = str(path) if path else "config"
    if overrides:  # overrides apply to the resolved config, so defaults (e.g. terms) can be set too
        data = apply_overrides(validate_config(data, source).model_dump(mode="json"), overrides)
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ProtegeError(format_validation_error(e, source)) from None


_Model = TypeVar("_Model", bound=BaseModel)


def load_yaml_model(
    path: str | Path, overrides: Sequence[str] | None, model: type[_Model], what: str, keys: str
) -> _Model:
    """A YAML file (``what``, with example ``keys`` for the messages) read, ``--set KEY=VALUE``
    ``overrides`` applied, and validated as ``model``; any problem is one readable ProtegeError that
    lists the valid keys."""
    data = read_yaml_mapping(path, what, keys)
    if overrides:
        data = apply_overrides(data, list(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ProtegeError(
            format_validation_error(e, str(path), valid_keys=lambda _loc: sorted(model.model_fields))
        ) from None


def format_validation_error(
    error: ValidationError,
    source: str,
    valid_keys: Callable[[list[str]], list[str]] | None = None,
    messages: Mapping[str, str] | None = None,
) -> str:
    """One readable message for a pydantic error: every problem on its own line, with the valid
    keys (from ``valid_keys(section_location)``, default: the run config's) and a "did you mean"
    for unknown ones. ``messages`` replaces pydantic's text for given error types."""
    valid_keys = valid_keys or _valid_keys
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for err in error.errors():
        loc = [str(x) for x in err["loc"]]
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = valid_keys(loc[:-1])
            near = closest(loc[-1], valid)
            hint = f" did you mean {near[0]!r}?" if near else ""
            lines.append(f"  {where}: unknown key.{hint} Valid keys here: {', '.join(valid)}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required, but missing")
        elif messages and err["type"] in messages:
            lines.append(f"  {where}: {messages[err['type']]}")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) and got is not None else ""
            lines.append(f"  {where}: {err['msg']}{shown}")
    return "\n".join(lines)


def _valid_keys(loc: list[str]) -> list[str]:
    """The field names of the schema section at ``loc`` (list indices skipped)."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        sub = _model_of(field.annotation)
        if sub is None:
            break
        model = sub
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``runs/<name>/config.yaml`` holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# -- resuming a run: the stored config is the truth ----------------------------------------------

#: keys that change how a run is shown or fed, never what it computes: a run made with other values of
#: them is the same run (``protege.analysis.runs.run_or_reuse`` reuses it)
PRESENTATION_KEYS = ("progress", "trackers", "log_every", "data.num_workers")

#: keys a resumed run may change without ``--override-config``: they change what is evaluated,
#: logged or shown, never what is trained (``epochs`` too, when more are asked for under a constant
#: schedule: the learning rate of the epochs done stays what it was)
RESUME_SAFE_KEYS = PRESENTATION_KEYS + (
    "name",  # the run directory the stored config was read from is the run: a moved run resumes
    "output_dir",
    "eval_every",
    "measure_cost",
    "keep_checkpoints",
    "baseline",
    "data.eval_batch_size",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}


def config_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """Every resolved key whose value differs, as ``(dotted.key, old, new)`` (``<absent>`` where a
    key exists on one side only, e.g. a term added)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    missing = "<absent>"
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def unsafe_resume_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """The changes of :func:`config_changes` that a resume may not make without ``--override-config``
    (everything but :data:`RESUME_SAFE_KEYS`, and more ``epochs`` under a constant schedule)."""
    constant = old.schedule.name == new.schedule.name == "constant"
    return [
        (k, a, b)
        for k, a, b in config_changes(old, new)
        if k not in RESUME_SAFE_KEYS and not (k == "epochs" and constant and b > a)
    ]
