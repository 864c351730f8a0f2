"""Fidelity and cost metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from protege.metrics.cost import count_flops, count_params, measure_latency, model_costs
from protege.metrics.fidelity import accuracy, agreement, classification_report, ece, nll, predictive_kl


def test_agreement_accuracy_topk():
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.1, 0.2]])
    t = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert agreement(s, t) == pytest.approx(0.5)  # rows 0 and 2 agree
    assert accuracy(s, y) == pytest.approx(0.75)  # rows 0, 1, 3
    assert accuracy(s, y, k=2) == pytest.approx(0.75)  # row 2: top-2 = {2, 0}, label 1 missing
    assert accuracy(s, y, k=5) == 1.0  # k larger than the class count is clamped


def test_predictive_kl_and_nll_by_hand():
    pt = [0.7, 0.2, 0.1]
    ps = [0.5, 0.3, 0.2]
    t = torch.tensor([pt]).log()
    s = torch.tensor([ps]).log()
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert predictive_kl(t, s) == pytest.approx(expected, rel=1e-6)
    assert predictive_kl(t, t) == pytest.approx(0.0, abs=1e-12)
    assert nll(s, torch.tensor([1])) == pytest.approx(-math.log(0.3), rel=1e-6)


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.58 (correct), 0.55 (wrong); 15 equal bins:
    # bin (0.8667, 0.9333]: acc 0.5, conf 0.9 -> |0.5-0.9| * 2/4 = 0.2
    # bin (0.5333, 0.6]: samples 0.58 and 0.55 -> acc 0.5, conf 0.565 -> 0.065 * 2/4 = 0.0325
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.42, 0.58], [0.55, 0.45]])
    y = torch.tensor([0, 1, 1, 1])
    assert ece(probs.log(), y) == pytest.approx(0.2 + 0.0325, rel=1e-6)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 50
    assert ece(perfect, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-9)


def test_report_keys():
    s, t = torch.randn(10, 4), torch.randn(10, 4)
    y = torch.randint(0, 4, (10,))
    assert set(classification_report(s, y)) == {"acc", "top5", "nll", "ece"}
    assert {"agreement", "kl", "teacher_acc"} <= set(classification_report(s, y, t))


def test_cost():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert count_params(model) == 8 * 16 + 16 + 16 * 4 + 4
    # a matmul of (1×8)·(8×16) is 8·16 multiply-adds = 256 FLOPs; plus (1×16)·(16×4) = 128
    assert count_flops(model, torch.randn(5, 8)) == 2 * (8 * 16 + 16 * 4)
    lat = measure_latency(model, torch.randn(1, 8), warmup=2, iters=5)
    assert lat["ms"] > 0 and lat["runs"] == 5 and lat["batch"] == 1
    shared = nn.Linear(3, 3)
    assert count_params(nn.Sequential(shared, shared)) == 12  # tied weights counted once


def test_side_by_side_costs_name_speedup_against_teacher():
    big = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    small = nn.Linear(64, 4)
    costs = model_costs({"teacher": big, "student": small}, torch.randn(3, 64))
    assert costs["student"]["compression"] == pytest.approx(count_params(big) / count_params(small))
    assert costs["student"]["speedup"] == pytest.approx(
        costs["teacher"]["latency"]["ms"] / costs["student"]["latency"]["ms"]
    )
    assert costs["student"]["latency"]["batch"] == 1 and "speedup" not in costs["teacher"]
    assert costs["student"]["latency"]["runs"] == costs["teacher"]["latency"]["runs"]  # interleaved rounds
