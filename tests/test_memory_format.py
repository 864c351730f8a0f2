"""``memory_format``: conv models train in channels_last on a CPU (``auto``), come back contiguous,
and train the same as in the standard layout; a model that cannot run channels_last is handled."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import protege as pg
from protege.errors import ProtegeError

CL = torch.channels_last


class Net(nn.Module):
    """A small conv net; ``flat_view`` flattens its feature map with ``view``, which channels_last breaks."""

    def __init__(self, flat_view: bool = False, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)  # > 1 input channel: its layout is unambiguous
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 6 * 6, 3)
        self.flat_view = flat_view
        self.layouts: list[bool] = []  # per forward: was conv2's weight channels_last?

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layouts.append(self.conv2.weight.is_contiguous(memory_format=CL))
        h = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(h.view(h.shape[0], -1) if self.flat_view else h.flatten(1))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(student: nn.Module, tmp_path, name: str, memory_format: str, teacher: nn.Module | None = None):
    terms = [pg.ce(0.5), pg.kd(0.5)] if teacher is not None else [pg.ce()]
    distiller = pg.Distiller(student, teacher, terms)
    cfg = pg.TrainConfig(epochs=2, cpu=True, progress=False, measure_cost=False, memory_format=memory_format)
    summary = pg.fit(distiller, _loader(), None, cfg, tmp_path / name)
    distiller.close()
    return summary


def test_auto_trains_channels_last_on_cpu_the_same_and_hands_back_contiguous(tmp_path, one_thread):
    torch.manual_seed(0)
    student, teacher = Net(), Net().eval()
    plain = copy.deepcopy(student)
    _fit(student, tmp_path, "auto", "auto", teacher)
    _fit(plain, tmp_path, "plain", "contiguous", copy.deepcopy(teacher))
    assert student.layouts[-1] and teacher.layouts[-1], (
        "auto on a CPU trains student and teacher channels_last"
    )
    assert not any(plain.layouts), "contiguous leaves the layout alone"
    for p in (*student.parameters(), *teacher.parameters(), *student.buffers()):
        assert p.is_contiguous(), "fit hands the models back in the standard layout"
    # the same fp32 training: only the summation order of the convolutions differs
    for a, b in zip(student.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_model_that_fails_channels_last_trains_contiguous_or_says_what_to_set(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    student = Net(flat_view=True)
    summary = _fit(student, tmp_path, "auto", "auto")
    assert summary["status"] == "completed"
    assert not student.layouts[-1]
    assert "training in the contiguous layout" in capsys.readouterr().err
    with pytest.raises(ProtegeError, match="set memory_format: auto or contiguous"):
        _fit(Net(flat_view=True), tmp_path, "strict", "channels_last")


def test_models_without_convolutions_are_left_alone(tmp_path, one_thread):
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    _fit(student, tmp_path, "mlp", "auto")
    assert len(calls) == 2 * 3, "no probe forward for a model channels_last cannot change"


def test_auto_keeps_narrow_networks_contiguous(tmp_path, one_thread):
    # torch 2.14's CPU channels_last kernels corrupt the heap training < 16-channel convs with 2 threads
    narrow, forced = Net(width=8), Net(width=8)
    _fit(narrow, tmp_path, "auto", "auto")
    assert not narrow.layouts[-1]
    _fit(forced, tmp_path, "forced", "channels_last")
    assert forced.layouts[-1]
