"""The search config: one pydantic schema for ``protege search search.yaml``.

::

    name: resnet20-depth
    data: {source: digits, options: {size: 16}}
    teacher: {model: resnet_depth, kwargs: {depths: [7, 7, 7]}, weights: runs/teacher}
    space: {kind: resnet_depth, choices: [1, 3, 5, 7]}
    proxy: diswot
    budget: {max_params: 200000, max_candidates: 30}
    algorithm: {name: evolution, population: 8, sample: 3}
    distill: {epochs: 10, terms: [{loss: ce, weight: 0.1}, {loss: kd, weight: 0.9, T: 4}]}

``distill`` holds the run-config keys (terms, epochs, optim, schedule, ...) of the ``distill.yaml``
the search writes for its winner; its data and teacher are the search's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import (
    DataConfig,
    DirName,
    ModelConfig,
    RunConfig,
    apply_overrides,
    format_validation_error,
    read_yaml_mapping,
)
from ..errors import ProtegeError
from .spaces import NB201_OPS, ModelListSpace, MultiplierSpace, NB201Space, ResNetDepthSpace, SearchSpace

__all__ = ["AlgorithmConfig", "BudgetConfig", "SearchConfig", "load_search_config", "validate_search_config"]


class ResNetDepthSpaceConfig(BaseModel):
    """CIFAR ResNet-20 with 1/3/5/7 blocks per stage (64 architectures)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["resnet_depth"] = "resnet_depth"
    choices: list[int] = Field([1, 3, 5, 7], description="blocks each stage may have")
    widths: list[int] = Field([16, 16, 32, 64], description="stem and stage channels")

    def build(self) -> SearchSpace:
        return ResNetDepthSpace(self.choices, self.widths)


class NB201SpaceConfig(BaseModel):
    """The NAS-Bench-201 cell space (15,625 cells) in a configurable skeleton."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["nb201"] = "nb201"
    channels: int = Field(16, gt=0, description="channels of the first stage (benchmark: 16)")
    cells_per_stage: int = Field(5, gt=0, description="cells per stage (benchmark: 5)")
    stages: int = Field(3, gt=0, description="stages (benchmark: 3)")
    ops: list[str] = Field(list(NB201_OPS), description="operations allowed on each edge")

    def build(self) -> SearchSpace:
        return NB201Space(self.channels, self.cells_per_stage, self.stages, self.ops)


class ModelListSpaceConfig(BaseModel):
    """A list of model names build_model accepts (zoo, timm, torchvision)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["models"] = "models"
    models: list[str] = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to every builder")

    def build(self) -> SearchSpace:
        return ModelListSpace(self.models, self.kwargs)


class MultiplierSpaceConfig(BaseModel):
    """Width and depth multipliers of a base model."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["multiplier"] = "multiplier"
    base: str
    width: list[float] = Field([0.5, 1.0], min_length=1)
    depth: list[float] = Field([1.0], min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the base's keyword arguments")

    def build(self) -> SearchSpace:
        return MultiplierSpace(self.base, self.width, self.depth, self.kwargs)


class SupernetSpaceConfig(BaseModel):
    """Subnets of trained AutoDistil supernets, scored by their inherited relation loss (no training)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["supernet"] = "supernet"
    paths: list[str] = Field(
        min_length=1, description="supernet folders or 'protege supernet' run directories"
    )
    teacher: str | None = Field(None, description="default: the teacher the supernets were trained with")
    corpora: list[str] = Field(
        ["pydoc-topics", "stdlib-docstrings"], min_length=1, description="held-out text"
    )
    eval_texts: int = Field(64, gt=0, description="held-out texts the loss is measured on")
    max_length: int = Field(64, gt=1, description="tokens per text; FLOPs are per sequence of this length")
    extract_top: int = Field(
        5, ge=1, description="extract the winner and Pareto-front subnets, at most this many"
    )


SpaceConfig = Annotated[
    ResNetDepthSpaceConfig
    | NB201SpaceConfig
    | ModelListSpaceConfig
    | MultiplierSpaceConfig
    | SupernetSpaceConfig,
    Field(discriminator="kind"),
]


class BudgetConfig(BaseModel):
    """What a candidate may cost, and how many candidates the proxy scores."""

    model_config = ConfigDict(extra="forbid")
    max_params: int | None = Field(None, gt=0)
    max_flops: int | None = Field(None, gt=0, description="per sample, a multiply-add counting 2")
    max_latency_ms: float | None = Field(None, gt=0, description="batch-1 forward on this machine")
    max_candidates: int = Field(50, gt=0, description="candidates scored by the proxy")

    @field_validator("max_params", "max_flops", "max_candidates", mode="before")
    @classmethod
    def _scientific(cls, v: Any) -> Any:
        # YAML reads 2e6 as a string and 2.0e+6 as a float; both are a whole number here
        try:
            number = float(v) if isinstance(v, (str, float)) else v
        except ValueError:
            return v
        return int(number) if isinstance(number, float) and number.is_integer() else v


class AlgorithmConfig(BaseModel):
    """Random search or regularized evolution."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["evolution", "random"] = "evolution"
    population: int = Field(10, gt=0)
    sample: int = Field(3, gt=0, description="tournament size")


class SearchConfig(BaseModel):
    """A whole search: data for the proxy, the teacher, the space, the proxy, budgets and algorithm."""

    model_config = ConfigDict(extra="forbid")
    name: DirName = Field("search", description="the search's directory name under output_dir")
    output_dir: str = "runs/search"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelConfig | None = Field(
        None, description="trained checkpoint (weights:) or a bare architecture (randomly initialised)"
    )
    space: SpaceConfig
    proxy: str = Field("diswot", description="a name from protege.search.proxies.list_proxies()")
    batch_size: int = Field(16, gt=0, description="samples per proxy batch")
    proxy_batches: int = Field(1, gt=0, description="the score is the mean over this many batches")
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    seed: int = 0
    progress: bool = True
    latency_top: int = Field(10, ge=0, description="measure batch-1 latency of the best N candidates")
    plot_cost: Literal["params", "flops", "latency_ms"] = Field("params", description="x axis of search.png")
    distill: dict[str, Any] = Field(
        default_factory=lambda: {
            "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}],
            "epochs": 10,
        },
        description="run-config keys of the winner's distill.yaml (terms, epochs, optim, schedule, ...)",
    )

    @field_validator("distill")
    @classmethod
    def _distill(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = sorted({"data", "teacher", "teachers", "student", "students"} & set(v))
        if owned:
            raise ValueError(f"{owned} come from the search itself; leave them out of distill:")
        return v

    def run_config(self, student: dict[str, Any], output_dir: str | None = None) -> RunConfig:
        """The distill run config of ``student`` (``{"model": ..., "kwargs": ...}``)."""
        data: dict[str, Any] = {
            "name": f"{self.name}-winner",
            "output_dir": output_dir or "runs",
            "seed": self.seed,
            **self.distill,
            "data": self.data.model_dump(mode="json"),
            "student": student,
        }
        if self.teacher is not None:
            data["teacher"] = self.teacher.model_dump(mode="json")
        try:
            return RunConfig.model_validate(data)
        except ValidationError as e:
            raise ProtegeError(format_validation_error(e, "search config 'distill:'")) from None


def validate_search_config(data: dict[str, Any], source: str = "search config") -> SearchConfig:
    """Validate a search config dict, with one clear message for all problems."""
    try:
        cfg = SearchConfig.model_validate(data)
    except ValidationError as e:
        raise ProtegeError(
            format_validation_error(
                e,
                source,
                _valid_keys,
                {
                    "union_tag_invalid": "kind must be one of resnet_depth, nb201, models, multiplier, supernet"
                },
            )
        ) from None
    cfg.run_config({"model": "placeholder"})  # the distill: keys must make a valid run config
    return cfg


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """Read a search YAML, apply ``--set key=value`` overrides, and validate."""
    p = Path(path)
    data = read_yaml_mapping(p, "search config", "space:, proxy:, budget: ...")
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_search_config(data, str(p))


_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "teacher": ModelConfig,
    "budget": BudgetConfig,
    "algorithm": AlgorithmConfig,
    "resnet_depth": ResNetDepthSpaceConfig,
    "nb201": NB201SpaceConfig,
    "models": ModelListSpaceConfig,
    "multiplier": MultiplierSpaceConfig,
    "supernet": SupernetSpaceConfig,
}


def _valid_keys(loc: list[str]) -> list[str]:
    """Field names of the section at ``loc`` (a space's section is named by its kind)."""
    model: type[BaseModel] = SearchConfig
    if loc:
        model = _SECTIONS.get(loc[-1], _SECTIONS.get(loc[0], SearchConfig))
    return sorted(model.model_fields)
