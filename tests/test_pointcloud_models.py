"""Point backbones: shapes, widths, permutation invariance, kNN/FPS against brute force, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from protege.core.taps import Taps
from protege.errors import ProtegeError
from protege.metrics.cost import count_params
from protege.models import build_model, load_model, save_model
from protege.models.pointcloud import farthest_point_sample, knn

SMALL = {"pointnet": {}, "dgcnn": {"k": 8}, "pointnet2": {"k": 8}}


@pytest.mark.parametrize("name", SMALL)
def test_heads_shapes_taps_and_width(name):
    x = torch.randn(3, 64, 3)
    cls = build_model(name, num_classes=7, **SMALL[name]).eval()
    parts = build_model(name, num_classes=5, head="parts", **SMALL[name]).eval()
    assert cls(x).shape == (3, 7)
    assert parts(x).shape == (3, 64, 5)
    with Taps(cls, cls.feature_modules) as taps:
        cls(x)
        for path in cls.feature_modules:
            out = taps.outputs[path]
            assert out.dim() == 3 and out.shape[0] == 3, (path, out.shape)  # (B, N', C): per point
    narrow = build_model(name, num_classes=7, width=0.25, **SMALL[name])
    assert count_params(narrow) < count_params(cls) / 8  # 4x narrower: ~16x fewer weights


@pytest.mark.parametrize("name", SMALL)
def test_classifier_ignores_point_order_and_segmenter_follows_it(name):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 3)
    perm = torch.randperm(64)
    cls = build_model(name, num_classes=4, **SMALL[name]).eval()
    seg = build_model(name, num_classes=3, head="parts", **SMALL[name]).eval()
    if name == "pointnet2":  # FPS starts at point 0: keep it first so the same centroids are picked
        perm = torch.cat([torch.tensor([0]), perm[perm != 0]])
    torch.testing.assert_close(cls(x[:, perm]), cls(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seg(x[:, perm]), seg(x)[:, perm], atol=1e-4, rtol=1e-4)


def test_knn_and_fps_match_brute_force():
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(2, 20, 3, generator=g)
    idx = knn(pts, pts, 4)
    for b, i in itertools.product(range(2), range(20)):
        d = ((pts[b] - pts[b, i]) ** 2).sum(-1)
        assert set(idx[b, i].tolist()) == set(d.argsort()[:4].tolist())
        assert idx[b, i, 0] == i
    chosen = farthest_point_sample(pts, 5)
    for b in range(2):
        picked = [0]
        for _ in range(4):
            d = torch.stack([((pts[b] - pts[b, j]) ** 2).sum(-1) for j in picked]).min(0).values
            picked.append(int(d.argmax()))
        assert chosen[b].tolist() == picked


def test_bad_point_clouds_are_refused_clearly():
    model = build_model("dgcnn", num_classes=3, k=8)
    with pytest.raises(ProtegeError, match="fewer than the 8"):
        model(torch.randn(2, 5, 3))
    nan = torch.randn(2, 16, 3)
    nan[1, 3, 0] = float("nan")
    with pytest.raises(ProtegeError, match="NaN"):
        model(nan)
    with pytest.raises(ProtegeError, match="different numbers of points"):
        model([torch.randn(16, 3), torch.randn(12, 3)])
    with pytest.raises(ProtegeError, match="channels-first"):
        model(torch.randn(2, 3, 16))
    assert model.eval()([torch.randn(16, 3), torch.randn(16, 3)]).shape == (2, 3)


def test_save_and_load_round_trip(tmp_path):
    model = build_model("pointnet2", num_classes=4, in_chans=6, width=0.25, k=8).eval()
    save_model(model, tmp_path / "m", "pointnet2", 4, 6, {"width": 0.25, "k": 8})
    x = torch.randn(2, 32, 6)
    torch.testing.assert_close(load_model(tmp_path / "m")(x), model(x))
