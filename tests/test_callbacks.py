"""fit's callbacks: hooks are called in order, may replace batches and add metrics, and their
state is checkpointed and restored on resume."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import protege as pg
from protege.errors import ProtegeError


class Recorder(pg.Callback):
    name = "rec"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.counter = torch.zeros(())
        self.replaced = 0

    def on_fit_start(self, distiller: nn.Module, device: torch.device) -> None:
        self.events.append(f"start:{float(self.counter)}")

    def on_epoch_start(self, distiller: nn.Module, epoch: int) -> None:
        self.events.append(f"epoch{epoch}")

    def on_batch(self, distiller: nn.Module, batch: Any, epoch: int, step: int) -> Any:
        self.counter += 1
        x, y = batch
        self.replaced += 1
        return torch.zeros_like(x), y  # every step trains on zeros

    def on_epoch_end(self, distiller: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        record["rec/count"] = float(self.counter)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counter": self.counter.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counter = state["counter"].clone()


def _setup() -> tuple[pg.Distiller, DataLoader, pg.TrainConfig]:
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    student = nn.Linear(4, 3)
    distiller = pg.Distiller(student, None, terms=[pg.ce()])
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    cfg = pg.TrainConfig(
        epochs=2, progress=False, measure_cost=False, optim={"name": "sgd", "lr": 0.1, "weight_decay": 0.0}
    )
    return distiller, loader, cfg


def test_hooks_run_replace_batches_and_log(tmp_path: Any) -> None:
    distiller, loader, cfg = _setup()
    rec = Recorder()
    bias_before = distiller.student.bias.detach().clone()
    weight_before = distiller.student.weight.detach().clone()
    pg.fit(distiller, loader, None, cfg, tmp_path / "r", callbacks=[rec])
    assert rec.events == ["start:0.0", "epoch0", "epoch1"]
    assert rec.replaced == 8
    # inputs were all zeros: only the bias can have moved
    assert torch.equal(distiller.student.weight, weight_before)
    assert not torch.equal(distiller.student.bias, bias_before)
    lines = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["rec/count"] for ln in lines] == [4.0, 8.0]
    assert (tmp_path / "r" / "checkpoints").glob("epoch_*/callbacks.safetensors")


def test_state_resumes(tmp_path: Any) -> None:
    distiller, loader, cfg = _setup()
    pg.fit(distiller, loader, None, cfg, tmp_path / "r", callbacks=[Recorder()], stop_after_epochs=1)
    distiller, loader, cfg = _setup()
    rec = Recorder()
    pg.fit(distiller, loader, None, cfg, tmp_path / "r", resume=True, callbacks=[rec])
    assert rec.events == ["start:4.0", "epoch1"]  # state loaded before on_fit_start
    assert float(rec.counter) == 8.0


def test_names_must_be_unique(tmp_path: Any) -> None:
    distiller, loader, cfg = _setup()
    with pytest.raises(ProtegeError, match="unique"):
        pg.fit(distiller, loader, None, cfg, tmp_path / "r", callbacks=[Recorder(), Recorder()])
