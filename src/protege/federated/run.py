"""``protege federate``: run a federation in Flower's simulation engine and return its summary."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ProtegeError
from .config import FederationConfig


def federate(cfg: FederationConfig) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.clients`` simulated SuperNodes (Flower's Ray backend) and return the
    summary written to ``runs/<name>/summary.json``. The same apps run in deployment mode
    (``flwr run`` against a SuperLink, see the README)."""
    try:
        from flwr.simulation import run_simulation
    except ImportError:
        raise ProtegeError('federated runs need Flower: pip install "protege[federated]"') from None
    from .apps import make_client_app, make_server_app

    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config={"client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": 0.0}},
    )
    path = cfg.run_dir / "summary.json"
    if not path.is_file():
        raise ProtegeError(
            f"the federation ended without writing {path}: see the log above for the server's error"
        )
    return json.loads(path.read_text())
