"""Federated distillation on Flower: partitions, strategies (KnFu, FedMD, FedDF, FedAvg, local)
and the Flower apps. The Flower apps live in :mod:`protege.federated.apps` (imported on use, so
the rest works without ``flwr`` installed)."""

from .config import FederationConfig, load_federation_config
from .deploy import deploy, make_certificates
from .partition import Partition, partition
from .run import federate
from .strategies import consensus, divergence_matrix, fedavg, fuse, knfu_weights

__all__ = [
    "FederationConfig",
    "Partition",
    "consensus",
    "deploy",
    "divergence_matrix",
    "federate",
    "fedavg",
    "fuse",
    "knfu_weights",
    "load_federation_config",
    "make_certificates",
    "partition",
]
