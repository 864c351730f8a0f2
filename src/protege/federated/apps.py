"""The Flower apps: a ``ServerApp`` that runs a strategy round by round, and a ``ClientApp``.

Each round is two exchanges of Flower messages:

1. ``train``: every client trains on its private data (``ce``) and replies with what the
   strategy shares — ``knowledge`` (its probabilities on the public transfer set: KnFu, FedMD),
   ``weights`` (its ``state_dict``: FedAvg, FedDF) or nothing (local) — and its metrics.
2. ``train.distill``: the server sends each client its update — a fused target (KnFu: personal;
   FedMD: the consensus) that the client distills towards on the transfer set, or fused weights
   that it loads — and the client replies with its accuracy on its own test set (local accuracy,
   averaged into ALMA) and on the global test set.

Replies are checked before use (:func:`check_knowledge`, :func:`check_weights`): a wrong key,
shape, dtype, a NaN/inf or probabilities off the simplex are rejected and logged, and the round
goes on with the rest. A client that does not answer within ``timeout`` is left out of that step.
Clients only ever send arrays of transfer-set predictions or model weights and scalar metrics;
their samples stay where they are.

``server_app`` and ``client_app`` (module level) read the config from the Flower run config
key ``config`` (a YAML path or a JSON string): that is what ``flwr run`` and the deployment
engine use. :func:`make_server_app` / :func:`make_client_app` bind a config directly (simulation).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from torch import nn

from ..errors import ProtegeError
from ..models import build_model
from .config import KNOWLEDGE_STRATEGIES, WEIGHT_STRATEGIES, FederationConfig, load_federation_config
from .data import ClientData, PublicData, client_data, public_data
from .record import Recorder
from .strategies import (
    accuracy,
    consensus,
    distill_towards,
    fedavg,
    fuse,
    knfu_weights,
    predict_logits,
    train_local,
)

log = logging.getLogger("protege.federated")

#: tolerance on a knowledge row's sum and range (float32 softmax rounding)
PROB_TOL = 1e-3


def build_client_model(cfg: FederationConfig, client: int, num_classes: int, in_chans: int) -> nn.Module:
    """Client ``client``'s model, initialised from a seed of its own (``seed``, ``client``)."""
    torch.manual_seed(cfg.seed * 100_003 + client)
    return build_model(cfg.model_of(client), num_classes=num_classes, in_chans=in_chans)


# ----------------------------------------------------------------------------- reply checks


def check_knowledge(record: Any, n: int, num_classes: int) -> tuple[np.ndarray | None, str | None]:
    """The ``(n, C)`` float32 probabilities in a ``knowledge`` record, or ``(None, reason)``."""
    if not isinstance(record, ArrayRecord) or set(record.keys()) != {"probs"}:
        keys = sorted(record.keys()) if isinstance(record, ArrayRecord) else type(record).__name__
        return None, f"knowledge must be an ArrayRecord with the one key 'probs', got {keys}"
    arr = record["probs"]
    if arr.dtype != "float32":
        return None, f"knowledge dtype {arr.dtype}, expected float32"
    if tuple(arr.shape) != (n, num_classes):
        return None, f"knowledge shape {tuple(arr.shape)}, expected {(n, num_classes)}"
    probs = arr.numpy()
    if not np.isfinite(probs).all():
        return None, "knowledge holds NaN or inf"
    if probs.min() < -PROB_TOL or probs.max() > 1 + PROB_TOL:
        return None, f"knowledge outside [0, 1] (min {probs.min():.3g}, max {probs.max():.3g})"
    if np.abs(probs.sum(1) - 1).max() > PROB_TOL:
        return None, "knowledge rows do not sum to 1"
    return np.clip(probs, 0.0, 1.0), None


def check_weights(
    record: Any, reference: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The state dict in a ``weights`` record if it matches ``reference`` key by key in shape and
    dtype and is finite, or ``(None, reason)``."""
    if not isinstance(record, ArrayRecord):
        return None, f"weights must be an ArrayRecord, got {type(record).__name__}"
    if set(record.keys()) != set(reference):
        missing, extra = (
            sorted(set(reference) - set(record.keys())),
            sorted(set(record.keys()) - set(reference)),
        )
        return None, f"weights keys differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
    state = {}
    for key, ref in reference.items():
        arr = record[key]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != str(ref.dtype).removeprefix("torch."):
            return (
                None,
                f"weights {key!r}: {arr.dtype}{tuple(arr.shape)}, expected {ref.dtype}{tuple(ref.shape)}",
            )
        value = torch.from_numpy(arr.numpy().copy())
        if value.is_floating_point() and not torch.isfinite(value).all():
            return None, f"weights {key!r} hold NaN or inf"
        state[key] = value
    return state, None


def _partition_id(content: RecordDict, clients: int) -> tuple[int | None, str | None]:
    metrics = content.get("metrics")
    pid = metrics.get("partition_id") if isinstance(metrics, MetricRecord) else None
    if not isinstance(pid, int) or not 0 <= pid < clients:
        return None, f"reply carries no valid partition_id (got {pid!r})"
    return pid, None


def _client_error(reason: str, limit: int = 300) -> str:
    """The client's error, without the remote traceback's noise (the last line, shortened)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return "client error: " + (lines[-1] if lines else "unknown")[:limit]


def _nbytes(content: RecordDict) -> int:
    return sum(
        int(a.numpy().nbytes)
        for rec in content.values()
        if isinstance(rec, ArrayRecord)
        for a in rec.values()
    )


# ----------------------------------------------------------------------------- server


class GridLike(Protocol):
    """The part of Flower's ``Grid`` the server uses (a fake one drives the tests)."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]: ...


@dataclass
class _Reply:
    node: int
    pid: int
    content: RecordDict


@dataclass
class FederationServer:
    """Runs ``cfg.rounds`` rounds of ``cfg.strategy`` over a grid, recording into ``recorder``."""

    cfg: FederationConfig
    grid: GridLike
    recorder: Recorder
    on_reply: Callable[[Message], None] | None = None
    nodes: dict[int, int] = field(default_factory=dict)  # node id -> partition id

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.public: PublicData = public_data(cfg)
        node_ids = self._wait_for_nodes()
        for rnd in range(1, cfg.rounds + 1):
            start = time.perf_counter()
            replies, up = self._exchange(node_ids, rnd, "train", lambda node: RecordDict())
            updates, server_metrics = self._fuse(replies, rnd)

            contents = {n: updates.get(self.nodes.get(n, -1), RecordDict()) for n in node_ids}
            evals, up2 = self._exchange(node_ids, rnd, "train.distill", contents.__getitem__)
            down = sum(_nbytes(c) for c in contents.values())
            per_client = {r.pid: dict(r.content["metrics"]) for r in evals}  # type: ignore[arg-type]
            self.recorder.round(
                rnd,
                per_client,
                {k: float(v) for k, v in server_metrics.items()},
                seconds=time.perf_counter() - start,
                bytes_up=up + up2,
                bytes_down=down,
                trained=sorted(r.pid for r in replies),
            )
        return self.recorder.finish()

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            ids = sorted(self.grid.get_node_ids())
            if len(ids) >= self.cfg.clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if len(ids) < self.cfg.min_clients:
            raise ProtegeError(
                f"only {len(ids)} of {self.cfg.clients} clients connected within {self.cfg.timeout:.0f} s "
                f"(min_clients: {self.cfg.min_clients}): start more SuperNodes or raise timeout"
            )
        return ids[: self.cfg.clients]

    def _exchange(
        self, node_ids: list[int], rnd: int, kind: str, content_for: Callable[[int], RecordDict]
    ) -> tuple[list[_Reply], int]:
        """Send ``kind`` to every node and return the valid replies and the bytes they carried."""
        messages = []
        for node in node_ids:
            content = content_for(node)
            content["config"] = ConfigRecord({"round": rnd})
            messages.append(Message(content=content, dst_node_id=node, message_type=kind, group_id=str(rnd)))
        replies, received = [], 0
        for msg in self.grid.send_and_receive(messages, timeout=self.cfg.timeout):
            if self.on_reply is not None:
                self.on_reply(msg)
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.recorder.rejected(rnd, kind, node, self.nodes.get(node), _client_error(msg.error.reason))
                continue
            pid, why = _partition_id(msg.content, self.cfg.clients)
            if pid is None:
                self.recorder.rejected(rnd, kind, node, self.nodes.get(node), why or "")
                continue
            self.nodes[node] = pid
            received += _nbytes(msg.content)
            replies.append(_Reply(node, pid, msg.content))
        answered = {r.node for r in replies}
        for node in node_ids:
            if node not in answered and not any(
                e["node"] == node for e in self.recorder.rejections_of(rnd, kind)
            ):
                self.recorder.rejected(rnd, kind, node, self.nodes.get(node), "no reply before the timeout")
        return replies, received

    def _fuse(self, replies: list[_Reply], rnd: int) -> tuple[dict[int, RecordDict], dict[str, float]]:
        """The update per partition id, and the server's own metrics."""
        name = self.cfg.strategy.name
        if name in KNOWLEDGE_STRATEGIES:
            return self._fuse_knowledge(replies, rnd), {}
        if name in WEIGHT_STRATEGIES:
            return self._fuse_weights(replies, rnd)
        return {}, {}

    def _valid(
        self, replies: list[_Reply], rnd: int, key: str, check: Callable[[_Reply], tuple[Any, str | None]]
    ) -> list[tuple[_Reply, Any]]:
        kept = []
        for r in replies:
            value, why = check(r)
            if value is None:
                self.recorder.rejected(rnd, "train", r.node, r.pid, why or f"no {key}")
                continue
            kept.append((r, value))
        if len(kept) < self.cfg.min_clients:
            self.recorder.note(
                rnd, f"{len(kept)} valid {key} replies < min_clients {self.cfg.min_clients}: no fusion"
            )
            return []
        return kept

    def _fuse_knowledge(self, replies: list[_Reply], rnd: int) -> dict[int, RecordDict]:
        n, c = len(self.public.x_transfer), self.public.num_classes
        kept = self._valid(
            replies, rnd, "knowledge", lambda r: check_knowledge(r.content.get("knowledge"), n, c)
        )
        if not kept:
            return {}
        pids = [r.pid for r, _ in kept]
        knowledge = torch.from_numpy(np.stack([v for _, v in kept]))
        s = self.cfg.strategy
        if s.name == "knfu":
            weights = knfu_weights(knowledge, s.beta, s.divergence, s.neighbours, s.include_self)
            targets = fuse(knowledge, weights)
            self.recorder.note(rnd, "knfu weights", clients=pids, weights=weights.tolist())
        else:
            targets = consensus(knowledge).expand(len(pids), -1, -1)
        return {pid: _array_content("target", {"probs": targets[i].float()}) for i, pid in enumerate(pids)}

    def _fuse_weights(
        self, replies: list[_Reply], rnd: int
    ) -> tuple[dict[int, RecordDict], dict[str, float]]:
        pub = self.public
        models: dict[int, nn.Module] = {}

        def check(r: _Reply) -> tuple[Any, str | None]:
            model = models.setdefault(
                r.pid, build_client_model(self.cfg, r.pid, pub.num_classes, pub.in_chans)
            )
            return check_weights(r.content.get("weights"), model.state_dict())

        kept = self._valid(replies, rnd, "weights", check)
        if not kept:
            return {}, {}
        groups: dict[str, list[tuple[_Reply, dict[str, torch.Tensor]]]] = {}
        for r, state in kept:
            groups.setdefault(self.cfg.model_of(r.pid), []).append((r, state))
        n_examples = {r.pid: int(r.content["metrics"]["num_examples"]) for r, _ in kept}  # type: ignore[index]
        fused: dict[str, nn.Module] = {}
        for arch, members in groups.items():
            model = models[members[0][0].pid]
            model.load_state_dict(fedavg([st for _, st in members], [n_examples[r.pid] for r, _ in members]))
            fused[arch] = model
        metrics: dict[str, float] = {}
        if self.cfg.strategy.name == "feddf":
            ensemble = torch.stack([_logits_of(models[r.pid], st, pub.x_transfer) for r, st in kept]).mean(0)
            s, local = self.cfg.strategy, self.cfg.local
            for arch, model in fused.items():
                metrics[f"server_distill_loss:{arch}"] = distill_towards(
                    model,
                    pub.x_transfer,
                    ensemble,
                    s.server_epochs,
                    local.batch_size,
                    s.server_lr,
                    s.server_T,
                    optimizer="adam",
                    target_is_logits=True,
                    seed=self.cfg.seed + rnd,
                )
        for arch, model in fused.items():
            metrics[f"global_acc:{arch}"] = accuracy(model, pub.x_global, pub.y_global)
        updates = {}
        for r, _ in kept:
            updates[r.pid] = _array_content("weights", fused[self.cfg.model_of(r.pid)].state_dict())
        for pid in range(self.cfg.clients):  # clients rejected this round still get their group's model
            arch = self.cfg.model_of(pid)
            if pid not in updates and arch in fused:
                updates[pid] = _array_content("weights", fused[arch].state_dict())
        return updates, metrics


def _logits_of(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits on ``x`` of a copy of ``model`` holding ``state``."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return predict_logits(clone, x)


def _array_content(key: str, tensors: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict(
        {
            key: ArrayRecord(
                {k: Array.from_torch_tensor(v.detach().cpu().contiguous()) for k, v in tensors.items()}
            )
        }
    )


# ----------------------------------------------------------------------------- client


@lru_cache(maxsize=8)
def _client_data(cfg_json: str, client: int) -> ClientData:
    return client_data(load_federation_config(cfg_json), client)


class _Client:
    """One client's data and model; the model's weights live in the node's ``context.state``."""

    def __init__(self, cfg: FederationConfig, context: Context) -> None:
        self.cfg = cfg
        self.context = context
        if "partition-id" not in context.node_config:
            raise ProtegeError(
                "this SuperNode has no node config 'partition-id': start it with --node-config"
            )
        self.pid = int(context.node_config["partition-id"])
        self.data = _client_data(cfg.to_json(), self.pid)
        self.model = build_client_model(cfg, self.pid, self.data.num_classes, int(self.data.x_train.shape[1]))
        if "model" in context.state:
            self.model.load_state_dict(context.state["model"].to_torch_state_dict())  # type: ignore[union-attr]
        torch.set_num_threads(max(1, int(cfg.num_cpus_per_client)))

    def save(self) -> None:
        self.context.state["model"] = ArrayRecord(self.model.state_dict())

    def metrics(self, **values: float) -> MetricRecord:
        return MetricRecord({"partition_id": self.pid, **values})


def _config_of(context: Context) -> FederationConfig:
    source = context.run_config.get("config")
    if not isinstance(source, str):
        raise ProtegeError(
            "the Flower run config has no 'config' key: pass --run-config \"config='fed.yaml'\""
        )
    return load_federation_config(source)


def make_client_app(cfg: FederationConfig | None = None) -> ClientApp:
    """The client: local training, knowledge or weights out, fused update in, evaluation."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        c = _Client(cfg or _config_of(context), context)
        rnd = int(msg.content["config"]["round"])  # type: ignore[index]
        local = c.cfg.local
        seed = c.cfg.seed * 1_000 + c.pid * 100 + rnd
        loss = train_local(
            c.model,
            c.data.x_train,
            c.data.y_train,
            local.epochs,
            local.batch_size,
            local.lr,
            local.momentum,
            seed,
        )
        c.save()
        content = RecordDict({"metrics": c.metrics(num_examples=len(c.data.y_train), train_loss=loss)})
        if c.cfg.strategy.name in KNOWLEDGE_STRATEGIES:
            probs = torch.softmax(predict_logits(c.model, c.data.x_transfer), dim=1)
            content["knowledge"] = ArrayRecord({"probs": Array.from_torch_tensor(probs.float().contiguous())})
        elif c.cfg.strategy.name in WEIGHT_STRATEGIES:
            content["weights"] = ArrayRecord(c.model.state_dict())
        return Message(content=content, reply_to=msg)

    @app.train("distill")
    def distill(msg: Message, context: Context) -> Message:
        c = _Client(cfg or _config_of(context), context)
        rnd = int(msg.content["config"]["round"])  # type: ignore[index]
        local, values = c.cfg.local, {}
        if "target" in msg.content:
            target = torch.from_numpy(msg.content["target"]["probs"].numpy().copy())  # type: ignore[index]
            values["distill_loss"] = distill_towards(
                c.model,
                c.data.x_transfer,
                target,
                local.distill_epochs,
                local.batch_size,
                local.distill_lr,
                local.T,
                momentum=local.momentum,
                seed=c.cfg.seed * 1_000 + c.pid * 100 + rnd,
            )
        elif "weights" in msg.content:
            c.model.load_state_dict(msg.content["weights"].to_torch_state_dict())  # type: ignore[union-attr]
        c.save()
        values["acc_local"] = accuracy(c.model, c.data.x_test, c.data.y_test)
        values["acc_global"] = accuracy(c.model, c.data.x_global, c.data.y_global)
        return Message(content=RecordDict({"metrics": c.metrics(**values)}), reply_to=msg)

    return app


def make_server_app(
    cfg: FederationConfig | None = None, on_reply: Callable[[Message], None] | None = None
) -> ServerApp:
    """The server: :class:`FederationServer` writing ``runs/<name>/`` (see :class:`Recorder`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        run_cfg = cfg or _config_of(context)
        with Recorder(run_cfg) as recorder:
            FederationServer(run_cfg, grid, recorder, on_reply).run()

    return app


server_app = make_server_app()
client_app = make_client_app()
