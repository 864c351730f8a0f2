"""The vision_language task: its evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from protege.tasks.vision_language import _restricted_acc, few_shot_probe, retrieval


def test_restricted_accuracy_only_lets_the_set_compete() -> None:
    # classes 0,1 seen, 2 unseen; sample 0 (class 0) is wrong 3-way (class 2 wins) but right 2-way
    logits = torch.tensor([[2.0, 1.0, 3.0], [0.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 2, 2])
    assert _restricted_acc(logits, y, [0, 1]) == 1.0  # both seen samples right among {0, 1}
    assert _restricted_acc(logits, y, [2]) == 1.0  # one class alone: always right
    assert _restricted_acc(logits, y, [1, 2]) == pytest.approx(2 / 3)  # sample 2 predicts 1 among {1,2}
    assert math.isnan(_restricted_acc(logits, torch.tensor([0, 0, 0, 0]), [2]))


def test_retrieval_recall_by_hand() -> None:
    # 3 images, 3 captions; classes 0, 1, 0. Image 1's nearest caption is caption 0 (class 0): a miss at R@1
    image = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    y = torch.tensor([0, 1, 0])
    r = retrieval(image, text, y, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3)
    # image 1's top-2 captions: caption 0 (cos 0.994) and caption 2 (cos 0.999): both class 0 → miss
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    # captions → images: caption 0 → image 0 (hit), caption 1 → image 1 (cos .110 vs .050: hit),
    # caption 2 (class 0) → image 1 (cos .9999 vs .9987 for image 2): a miss
    assert r["t2i_r1"] == pytest.approx(2 / 3)
    assert r["t2i_r2"] == pytest.approx(1.0)


def test_few_shot_probe_separable_and_refusal() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4)[:3] * 5
    y = torch.arange(3).repeat_interleave(20)
    x = centers[y] + 0.3 * torch.randn(len(y), 4, generator=g)
    assert few_shot_probe(x, y, 1) == pytest.approx(1.0)
    assert few_shot_probe(x, y, 5) == pytest.approx(1.0)
    assert few_shot_probe(x, y, 20) is None  # no query left for a class: refused, not made up
    noise = torch.randn(len(y), 4, generator=g)
    assert few_shot_probe(noise, y, 5) < 0.7  # no signal → near chance (1/3)
