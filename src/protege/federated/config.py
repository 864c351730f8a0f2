"""The federation config: one pydantic schema for ``protege federate fed.yaml``.

A federation YAML (see ``configs/fed-*.yaml``)::

    name: fed-knfu
    dataset: mnist5k
    clients: 10
    partition: {scheme: dirichlet, alpha: 0.5}
    models: [mlp_s]            # cycled over the clients: client i gets models[i % len(models)]
    strategy: {name: knfu, beta: 10}
    rounds: 5

Unknown keys and bad values are reported in one message naming the key and the valid spellings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import DirName, apply_overrides, format_validation_error
from ..errors import ProtegeError

StrategyName = Literal["knfu", "fedmd", "feddf", "fedavg", "local"]
#: strategies whose clients share predictions on the transfer set, not weights
KNOWLEDGE_STRATEGIES = ("knfu", "fedmd")
#: strategies whose clients send model weights
WEIGHT_STRATEGIES = ("fedavg", "feddf")


class PartitionConfig(BaseModel):
    """How the clients' data is drawn (see :mod:`protege.federated.partition`)."""

    model_config = ConfigDict(extra="forbid")
    scheme: Literal["iid", "dirichlet", "classes"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet)")
    classes_per_client: int = Field(2, ge=1, description="classes each client holds (classes)")
    samples_per_client: int | None = Field(
        None, ge=2, description="cap on each client's samples (train + test): the local data size"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each client's data for its own test set"
    )
    min_samples: int = Field(10, ge=1, description="fewest samples a client may hold (dirichlet redraws)")


class LocalConfig(BaseModel):
    """A client's optimisation: local training on its data, and distillation on a target."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1, description="local epochs on the private data per round")
    batch_size: int = Field(32, gt=0)
    lr: float = Field(0.05, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    distill_epochs: int = Field(1, ge=1, description="epochs on the transfer set towards the fused target")
    distill_lr: float = Field(0.01, gt=0, description="SGD learning rate of the distillation epochs")
    T: float = Field(1.0, gt=0, description="temperature of the client's KD term on the fused target")


class StrategyConfig(BaseModel):
    """The strategy and its parameters (those of other strategies are ignored)."""

    model_config = ConfigDict(extra="forbid")
    name: StrategyName = "knfu"
    beta: float = Field(10.0, gt=0, description="KnFu sharpness of the effectiveness weights (paper: 10)")
    divergence: Literal["kl", "js"] = Field(
        "kl", description="KnFu divergence between two clients' knowledge"
    )
    neighbours: int | None = Field(
        None,
        ge=1,
        description="KnFu: fuse only the k semantically nearest clients (None: all, soft-weighted)",
    )
    include_self: bool = Field(
        True, description="KnFu: a client's own knowledge takes part in its fused target"
    )
    server_epochs: int = Field(
        2, ge=1, description="FedDF: epochs of server distillation on the transfer set"
    )
    server_lr: float = Field(1e-3, gt=0, description="FedDF: Adam learning rate of the server distillation")
    server_T: float = Field(1.0, gt=0, description="FedDF: temperature of the ensemble distillation")


class FederationConfig(BaseModel):
    """A whole federation run."""

    model_config = ConfigDict(extra="forbid")
    name: DirName = "federation"
    output_dir: str = "runs"
    dataset: Literal["mnist5k", "digits"] = "mnist5k"
    clients: int = Field(3, ge=1, description="number of clients (SuperNodes)")
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    transfer_size: int = Field(
        500, ge=1, description="public unlabeled transfer set, held out of the clients' data"
    )
    global_test_size: int = Field(
        500, ge=1, description="held-out test set of the global (uniform) distribution"
    )
    models: list[str] = Field(
        default_factory=lambda: ["mlp_s"], min_length=1, description="cycled over clients"
    )
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    rounds: int = Field(3, ge=1)
    local: LocalConfig = Field(default_factory=LocalConfig)
    timeout: float = Field(
        600.0,
        gt=0,
        description="seconds the server waits for the replies of one step; late clients are dropped",
    )
    min_clients: int = Field(1, ge=1, description="fewest replies a round needs to go on")
    seed: int = 0
    num_cpus_per_client: float = Field(1.0, gt=0, description="simulation: CPU cores reserved per client")

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.strategy.name == "fedavg" and len(set(self.models)) > 1:
            raise ValueError(
                "fedavg averages weights and needs one architecture for all clients; "
                "use feddf, knfu or fedmd for heterogeneous models"
            )
        if self.min_clients > self.clients:
            raise ValueError(f"min_clients ({self.min_clients}) exceeds clients ({self.clients})")
        return self

    def model_of(self, client: int) -> str:
        """The architecture of client ``client``."""
        return self.models[client % len(self.models)]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


_SECTIONS: dict[str, type[BaseModel]] = {
    "partition": PartitionConfig,
    "local": LocalConfig,
    "strategy": StrategyConfig,
}


def _valid_keys(loc: list[str]) -> list[str]:
    model = _SECTIONS.get(loc[0], FederationConfig) if loc else FederationConfig
    return sorted(model.model_fields)


def validate_federation_config(data: dict[str, Any], source: str = "config") -> FederationConfig:
    """``data`` as a :class:`FederationConfig`, or a :class:`ProtegeError` naming every problem."""
    try:
        return FederationConfig.model_validate(data)
    except ValidationError as e:
        raise ProtegeError(format_validation_error(e, source, _valid_keys)) from None


def load_federation_config(source: str | Path, overrides: list[str] | None = None) -> FederationConfig:
    """Read a federation YAML (or a JSON string of one, as the Flower apps receive it), apply
    ``--set key=value`` overrides, and validate. ``output_dir`` is made absolute, so the apps
    write to the same place whatever their working directory."""
    text = str(source)
    if text.lstrip().startswith("{"):
        data, where = json.loads(text), "config"
    else:
        p = Path(source)
        if not p.is_file():
            raise ProtegeError(f"federation config not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ProtegeError(f"{p} is not valid YAML: {e}") from None
        where = str(p)
    if not isinstance(data, dict):
        raise ProtegeError(f"{where} must hold a mapping of keys (name:, clients:, strategy: ...)")
    if overrides:
        data = apply_overrides(data, overrides)
    cfg = validate_federation_config(data, where)
    return cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir).resolve())})
