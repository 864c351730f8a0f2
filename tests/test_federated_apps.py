"""The Flower apps: reply checks, a server driven by a fake grid (malformed and missing replies),
what a client sends, and a real 2-round, 3-client simulation."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from protege.federated.apps import (  # noqa: E402
    FederationServer,
    build_client_model,
    check_knowledge,
    check_weights,
    make_client_app,
)
from protege.federated.config import validate_federation_config  # noqa: E402
from protege.federated.data import client_data  # noqa: E402
from protege.federated.record import Recorder  # noqa: E402
from protege.federated.run import federate  # noqa: E402


@pytest.fixture
def identity():
    """Messages read the sender's identity, which Flower sets in its own processes."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _cfg(tmp_path, **kw):
    data = {
        "name": "t",
        "output_dir": str(tmp_path),
        "dataset": "digits",
        "clients": 3,
        "transfer_size": 100,
        "global_test_size": 200,
        "rounds": 2,
        "timeout": 5,
        "strategy": {"name": "knfu"},
    }
    data.update(kw)
    return validate_federation_config(data)


def _probs(n=4, c=3, seed=0):
    return torch.softmax(torch.randn(n, c, generator=torch.Generator().manual_seed(seed)), 1).numpy()


def _record(arr):
    return ArrayRecord({"probs": Array(np.ascontiguousarray(arr))})


@pytest.mark.parametrize(
    "arr, reason",
    [
        (_probs().astype(np.float64), "dtype"),
        (_probs(5), "shape"),
        (np.where(np.eye(4, 3) > 0, np.nan, _probs()).astype(np.float32), "NaN"),
        (np.full((4, 3), np.inf, np.float32), "NaN or inf"),
        (np.array([[1.5, -0.5, 0.0]] * 4, np.float32), "outside"),
        (np.full((4, 3), 0.5, np.float32), "sum to 1"),
    ],
)
def test_malformed_knowledge_is_rejected(arr, reason):
    value, why = check_knowledge(_record(arr), 4, 3)
    assert value is None and reason in why


def test_valid_knowledge_and_weights_pass_and_bad_weights_fail():
    value, why = check_knowledge(_record(_probs()), 4, 3)
    assert why is None and value.shape == (4, 3)
    ref = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    assert check_weights(ArrayRecord(ref), ref)[1] is None
    assert "keys" in check_weights(ArrayRecord({"w": torch.zeros(2, 2)}), ref)[1]
    assert "expected" in check_weights(ArrayRecord({"w": torch.zeros(3, 2), "b": torch.zeros(2)}), ref)[1]
    assert (
        "NaN"
        in check_weights(ArrayRecord({"w": torch.full((2, 2), float("nan")), "b": torch.zeros(2)}), ref)[1]
    )


class FakeGrid:
    """Node 11 answers well, node 12 sends NaN knowledge, node 13 never answers (dropped)."""

    def __init__(self, n, c):
        self.n, self.c = n, c
        self.sent: list[Message] = []

    def get_node_ids(self):
        return [11, 12, 13]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node == 13:
                continue
            pid = {11: 0, 12: 1}[node]
            content = RecordDict({"metrics": MetricRecord({"partition_id": pid, "num_examples": 10})})
            if msg.metadata.message_type == "train":
                probs = _probs(self.n, self.c)
                if node == 12:
                    probs[0, 0] = np.nan
                content["knowledge"] = _record(probs)
            else:
                content["metrics"]["acc_local"] = 0.5 + 0.1 * pid
                content["metrics"]["acc_global"] = 0.4
            TaskIdentity.node_id = node  # the replying node's identity, as in its own process
            replies.append(Message(content=content, reply_to=msg))
        TaskIdentity.node_id = 0
        return replies


def test_server_rejects_bad_replies_and_goes_on(tmp_path, identity):
    cfg = _cfg(tmp_path)
    grid = FakeGrid(cfg.transfer_size, 10)
    with Recorder(cfg) as rec:
        summary = FederationServer(cfg, grid, rec).run()
    lines = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    rejected = [x for x in lines if x["kind"] == "rejected"]
    assert {(x["node"], x["round"]) for x in rejected if "NaN" in x["reason"]} == {(12, 1), (12, 2)}
    assert {x["round"] for x in rejected if x["node"] == 13 and "timeout" in x["reason"]} == {1, 2}
    rounds = [x for x in lines if x["kind"] == "round"]
    assert [r["alma"] for r in rounds] == pytest.approx([0.55, 0.55])  # both answering clients evaluated
    distill = [m for m in grid.sent if m.metadata.message_type == "train.distill"]
    assert all(("target" in m.content) == (m.metadata.dst_node_id == 11) for m in distill)
    assert summary["rejected"] == 6 and summary["rounds"] == 2


@pytest.mark.parametrize("strategy", ["knfu", "fedavg"])
def test_client_sends_no_samples(tmp_path, identity, strategy):
    cfg = _cfg(tmp_path, strategy={"name": strategy})
    app = make_client_app(cfg)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    msg = Message(
        content=RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=7, message_type="train"
    )
    reply = app(msg, context)
    arrays = {k: rec for k, rec in reply.content.items() if isinstance(rec, ArrayRecord)}
    data = client_data(cfg, 1)
    if strategy == "knfu":
        assert list(arrays) == ["knowledge"] and list(arrays["knowledge"]) == ["probs"]
        assert arrays["knowledge"]["probs"].shape == (cfg.transfer_size, 10)
    else:
        model = build_client_model(cfg, 1, 10, 1)
        assert list(arrays) == ["weights"] and set(arrays["weights"]) == set(model.state_dict())
    images = data.x_train.flatten(1).numpy()
    for rec in arrays.values():
        for arr in rec.values():
            flat = arr.numpy().reshape(-1)
            for img in images[:50]:  # no training image appears anywhere in what is sent
                assert not np.isin(img, flat).all()
    metrics = reply.content["metrics"]
    assert set(metrics) == {"partition_id", "num_examples", "train_loss"}
    assert "model" in context.state  # the weights stay on the node for the next step


def test_simulation_two_rounds_three_clients(tmp_path):
    cfg = _cfg(
        tmp_path, models=["mlp_s", "mlp"], partition={"scheme": "dirichlet", "alpha": 0.5}, timeout=300
    )
    summary = federate(cfg)
    run = tmp_path / "t"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    clients = [x for x in lines if x["kind"] == "client"]
    assert sorted((x["round"], x["client"]) for x in clients) == [(r, c) for r in (1, 2) for c in range(3)]
    assert summary["rounds"] == 2 and summary["rejected"] == 0
    assert 0.3 < summary["alma"] <= 1.0  # clients learn their own distribution (chance is 0.1)
    assert summary["alma"] == pytest.approx(np.mean([x["acc_local"] for x in clients if x["round"] == 2]))
    assert (run / "rounds.png").stat().st_size > 0 and (run / "config.yaml").is_file()
    assert summary["bytes_up_per_round"] == 3 * cfg.transfer_size * 10 * 4  # float32 knowledge only
