"""`evaluate` accepts a student without parameters (an exported runtime model wrapped as a module)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from protege.engine import evaluate, make_loader
from protege.tasks import build_task


class FirstTen(nn.Module):
    """No parameters: the logits are the first 10 inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def test_parameterless_student_is_evaluated_on_the_cpu() -> None:
    x = torch.zeros(8, 1, 4, 4)
    y = torch.arange(8) % 10
    x.view(8, -1)[torch.arange(8), y] = 1.0  # the argmax is the label: accuracy 1
    x.view(8, -1)[:4, 0] = 2.0  # samples 0-3 now predict class 0: right for sample 0 only
    metrics = evaluate(FirstTen(), make_loader(TensorDataset(x, y), 4, shuffle=False), build_task("classification"))
    assert metrics["acc"] == 5 / 8  # samples 1, 2, 3 are now predicted 0; the others keep their label
