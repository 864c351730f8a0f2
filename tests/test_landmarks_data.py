"""Landmark data: the ASM shape model, the procedural faces, and the 300W / WFLW / COFW readers on
fixture files written here."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from PIL import Image

from protege.data.landmarks import (
    ShapeModel,
    SyntheticFaces,
    _similarity,
    asm_targets,
    crop_face,
    load_cofw,
    load_landmark_folder,
    load_wflw,
    read_cofw,
    read_pts,
    read_wflw,
)
from protege.errors import ProtegeError


@pytest.fixture(scope="module")
def faces() -> SyntheticFaces:
    return SyntheticFaces(12, size=48, split="train", seed=3)


@pytest.mark.parametrize("align", [False, True])
def test_shape_model_all_modes_reproduce_and_zero_modes_give_the_mean(faces, align) -> None:
    shapes = faces.points.astype(np.float64)
    model = ShapeModel.fit(shapes, align=align)
    assert model.max_modes == 12  # min(shapes, 2K)
    np.testing.assert_allclose(model.project(shapes, model.max_modes), shapes, atol=1e-9)
    zero = model.project(shapes, 0)
    if align:  # the mean shape, brought back into each shape's own pose and scale
        for z, x in zip(zero, shapes):
            s, r, t = _similarity(x, model.frame)  # the shape's transform into the model's frame
            np.testing.assert_allclose(z, (model.mean - t) @ r / s, atol=1e-9)
    else:
        np.testing.assert_allclose(zero, np.broadcast_to(model.mean, shapes.shape), atol=1e-12)
    # more modes never fit worse, and soft targets differ from the hard ones for few modes
    errs = [np.abs(model.project(shapes, m) - shapes).mean() for m in (1, 3, 6, 12)]
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:])) and errs[0] > 1e-3
    with pytest.raises(ProtegeError, match="at most 12"):
        model.project(shapes, 13)
    with pytest.raises(ProtegeError, match="68-point shapes, got 5 points"):
        model.project(shapes[:, :5], 2)


def test_procrustes_removes_pose_and_asm_targets_pick_modes_by_variance(faces) -> None:
    shapes = faces.points.astype(np.float64)
    rng = np.random.default_rng(0)
    moved = []
    for x in shapes:  # the same shapes rotated, scaled, shifted: aligned, the model has the same mean
        a = rng.uniform(-1, 1)
        r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        moved.append(rng.uniform(0.5, 2) * x @ r.T + rng.uniform(-1, 1, 2))
    m1, m2 = ShapeModel.fit(shapes, align=True), ShapeModel.fit(np.stack(moved), align=True)
    c1, c2 = m1.mean - m1.mean.mean(0), m2.mean - m2.mean.mean(0)
    s, r, t = _similarity(c2, c1)
    np.testing.assert_allclose(s * c2 @ r.T + t, c1, atol=1e-6)
    plain = ShapeModel.fit(shapes)
    k = plain.modes_for(0.9)
    share = plain.variances[:k].sum() / plain.variances.sum()
    assert share >= 0.9 and (k == 1 or plain.variances[: k - 1].sum() / plain.variances.sum() < 0.9)
    np.testing.assert_allclose(asm_targets(shapes, 0.9), plain.project(shapes, k), atol=1e-6)


def test_synthetic_faces_are_deterministic_disjoint_and_exact(faces) -> None:
    again = SyntheticFaces(12, size=48, split="train", seed=3)
    np.testing.assert_array_equal(again.images, faces.images)
    np.testing.assert_array_equal(again.points, faces.points)
    val = SyntheticFaces(12, size=48, split="val", seed=3)
    assert not np.isclose(val.points[:, None], faces.points[None]).all(axis=(2, 3)).any()
    assert np.abs(faces.points).max() < 0.5  # every point inside the image
    item = faces[0]
    assert item["image"].shape == (3, 48, 48) and item["points"].shape == (68, 2)
    # exact: the inner mouth is painted dark, the sclera light, at the points' own positions
    big = SyntheticFaces(8, size=96, split="test", seed=1, occlusion=0.0)
    for img, pts in zip(big.images, big.points):
        px = (pts + 0.5) * 96
        for eye in (slice(36, 42), slice(42, 48)):
            corner_mid = (px[eye][0] + px[eye][3]) / 2  # between the corners: sclera or iris, not skin
            left_sclera = (3 * px[eye][0] + px[eye][3]) / 4
            c, r = int(left_sclera[0]), int(left_sclera[1])
            if np.linalg.norm(px[eye][1] - px[eye][5]) > 3:  # an open eye
                assert img[r, c].astype(float).mean() > 120 or img[r, c].std() < 5, corner_mid
    assert big.visible.all()
    occluded = SyntheticFaces(30, size=48, split="train", seed=0, occlusion=1.0)
    assert (~occluded.visible).any(axis=1).mean() > 0.5


def test_pts_folder_reader(tmp_path) -> None:
    pts = np.round(np.stack([np.linspace(20, 80, 68), np.linspace(30, 90, 68)], 1), 3)
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts)
    (tmp_path / "a.pts").write_text(f"version: 1\nn_points:  68\n{{\n{body}\n}}\n")
    Image.fromarray(np.full((120, 100, 3), 200, np.uint8)).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_pts(tmp_path / "a.pts"), pts - 1)
    data = load_landmark_folder(tmp_path, size=32)
    assert data.images.shape == (1, 32, 32, 3) and data.points.shape == (1, 68, 2)
    # the crop's square is (1 + 2·0.25) × 60 px wide, centred on the points' box
    side, left, top = 90, 49 - 45, 59 - 45  # box x 19..79, y 29..89 (0-based)
    np.testing.assert_allclose(data.points[0, 0], (pts[0] - 1 - [left, top]) / side - 0.5, atol=1e-5)
    (tmp_path / "bad.pts").write_text("version: 1\nn_points: 3\n{\n1 2\nnan 3\n4 5\n}\n")
    with pytest.raises(ProtegeError, match="NaN or infinite"):
        read_pts(tmp_path / "bad.pts")
    (tmp_path / "bad.pts").write_text("version: 1\nn_points: 4\n{\n1 2\n3 3\n4 5\n}\n")
    with pytest.raises(ProtegeError, match="n_points 4, the file has 3"):
        read_pts(tmp_path / "bad.pts")


def test_wflw_reader(tmp_path) -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(30, 70, (98, 2))
    line = " ".join(f"{v:.2f}" for v in pts.reshape(-1)) + " 25 25 75 75 1 0 0 0 1 0 sub/img.jpg"
    (tmp_path / "ann.txt").write_text(line + "\n")
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "imgs" / "sub" / "img.jpg")
    (rec,) = read_wflw(tmp_path / "ann.txt")
    np.testing.assert_allclose(rec.points, np.round(pts, 2))
    assert rec.box == (25, 25, 75, 75) and rec.attributes["pose"] == 1 and rec.attributes["occlusion"] == 1
    assert rec.image == "sub/img.jpg"
    data = load_wflw(tmp_path / "ann.txt", tmp_path / "imgs", size=40)
    assert data.points.shape == (1, 98, 2) and np.abs(data.points).max() < 0.5
    (tmp_path / "short.txt").write_text("1 2 3\n")
    with pytest.raises(ProtegeError, match="207 fields"):
        read_wflw(tmp_path / "short.txt")


def test_cofw_reader(tmp_path) -> None:
    rng = np.random.default_rng(1)
    n = 2
    images = np.empty((n, 1), dtype=object)
    for i in range(n):
        images[i, 0] = rng.integers(0, 255, (60, 50), dtype=np.uint8)  # COFW has grey images
    xs, ys = rng.uniform(10, 40, (n, 29)), rng.uniform(10, 50, (n, 29))
    occ = rng.integers(0, 2, (n, 29)).astype(float)
    phis = np.concatenate([xs + 1, ys + 1, occ], 1)
    boxes = np.array([[6.0, 6.0, 40.0, 50.0]] * n)
    scipy.io.savemat(tmp_path / "cofw.mat", {"IsTr": images, "phisTr": phis, "bboxesTr": boxes})
    imgs, points, occluded, bx = read_cofw(tmp_path / "cofw.mat", "train")
    assert len(imgs) == 2 and imgs[0].shape == (60, 50)
    np.testing.assert_allclose(points[..., 0], xs) and np.testing.assert_allclose(points[..., 1], ys)
    np.testing.assert_array_equal(occluded, occ > 0)
    np.testing.assert_allclose(bx[0], [5, 5, 45, 55])
    data = load_cofw(tmp_path / "cofw.mat", size=32)
    assert data.images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(data.visible, occ == 0)
    with pytest.raises(ProtegeError, match="IsT, phisT, bboxesT"):
        read_cofw(tmp_path / "cofw.mat", "test")


def test_crop_refuses_non_finite_points() -> None:
    pts = np.array([[1.0, 2.0], [np.inf, 3.0]])
    with pytest.raises(ProtegeError, match="NaN or infinite"):
        crop_face(np.zeros((10, 10, 3), np.uint8), pts, 8)
