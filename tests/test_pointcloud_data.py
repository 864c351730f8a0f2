"""The shapes3d benchmark and the point-cloud file readers, on small files the tests write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protege.data import load_data
from protege.data.pointcloud import (
    PROCEDURAL,
    REAL,
    CloudSettings,
    PartFolder,
    ShapeClouds,
    load_part_folder,
    load_pointcloud_splits,
    read_points,
)
from protege.errors import ProtegeError

CLASSES = ["table", "box", "airplane"]


def test_clouds_are_deterministic_distinct_between_splits_and_normalised():
    settings = CloudSettings(num_points=64, rotation="so3")
    a = ShapeClouds("train", 6, CLASSES, settings, seed=3)
    b = ShapeClouds("train", 6, CLASSES, settings, seed=3)
    val = ShapeClouds("val", 6, CLASSES, settings, seed=3)
    other = ShapeClouds("train", 6, CLASSES, settings, seed=4)
    assert torch.equal(a.points, b.points) and torch.equal(a.parts, b.parts)
    assert not torch.equal(a.points, val.points) and not torch.equal(a.points, other.points)
    assert a.labels.tolist() == [0, 1, 2, 0, 1, 2]
    radius = a.points.norm(dim=-1).amax(dim=1)
    assert ((radius > 0.9) & (radius < 1.1)).all()  # unit sphere, up to noise
    x, y = a[1]
    assert x.shape == (64, 3) and x.dtype == torch.float32 and int(y) == 1


def test_part_labels_come_from_the_primitives():
    clouds = ShapeClouds(
        "train", 3, CLASSES, CloudSettings(num_points=400, partial=0.0, rotation="none", noise=0)
    )
    names = clouds.part_names
    assert names[:3] == ["table/top", "table/leg", "box/body"]
    parts, pts = clouds.parts[0], clouds.points[0]
    top = parts == names.index("table/top")
    # the top is a slab above every leg point: its points are the highest ones
    assert top.any() and (~top).any()
    assert pts[top, 2].min() > pts[~top, 2].mean()
    assert set(clouds.parts[2].tolist()) <= set(clouds.class_parts[2])  # airplane's own parts


def test_partial_views_and_the_source():
    settings = {"num_points": 256, "rotation": "none", "noise": 0.0}
    full = ShapeClouds("train", 8, ["box", "torus"], CloudSettings(partial=0.0, **settings))
    cut = ShapeClouds("train", 8, ["box", "torus"], CloudSettings(partial=1.0, **settings))
    # whole shapes are centred; a partial view drops the points behind a plane, moving the centroid off
    assert (full.points.mean(1).norm(dim=-1) < 0.1).all()
    assert (cut.points.mean(1).norm(dim=-1) > 0.15).all()
    data = load_data("shapes3d", num_points=32, train=17, val=17, test=0, seed=1)
    assert data.num_classes == len(PROCEDURAL) + len(REAL) >= 10
    assert data.in_chans == 3 and data.input_size == 32 and data.test is None
    parts = load_pointcloud_splits(
        {"num_points": 32, "train": 3, "val": 3, "test": 0, "families": "real"}, target="parts"
    )
    assert parts.categories == list(REAL) and len(parts.category_parts) == 3
    with pytest.raises(ProtegeError, match="did you mean 'num_points'"):
        load_data("shapes3d", num_point=32)
    with pytest.raises(ProtegeError, match="rotation must be one of"):
        load_pointcloud_splits({"rotation": "x"})


def test_readers(tmp_path):
    off = tmp_path / "cube.off"
    # ModelNet's quirk: counts glued to the OFF keyword; a quad face, fan-triangulated
    off.write_text("OFF4 1 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n")
    pts = read_points(off, num_points=50)["points"]
    assert (
        pts.shape == (50, 3) and np.allclose(pts[:, 2], 0) and pts[:, :2].min() >= 0 and pts[:, :2].max() <= 1
    )

    txt = tmp_path / "chair_0001.txt"
    txt.write_text("0.1,0.2,0.3,0,0,1\n0.4,0.5,0.6,0,1,0\n")
    want = [[0.1, 0.2, 0.3, 0, 0, 1], [0.4, 0.5, 0.6, 0, 1, 0]]
    assert np.allclose(read_points(txt)["points"], want)

    part = tmp_path / "shape.txt"
    part.write_text("0 0 0 0 0 1 12\n1 1 1 0 1 0 13\n")
    item = read_points(part)
    assert item["parts"].tolist() == [12, 13] and item["points"].shape == (2, 6)

    arr = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    assert np.array_equal(read_points(tmp_path / "a.npy")["points"], arr)

    import trimesh

    trimesh.creation.box().export(tmp_path / "box.ply")
    assert read_points(tmp_path / "box.ply", num_points=40)["points"].shape == (40, 3)
    trimesh.PointCloud(arr[:, :3]).export(tmp_path / "cloud.ply")
    assert np.allclose(read_points(tmp_path / "cloud.ply")["points"], arr[:, :3], atol=1e-6)

    (tmp_path / "x.h5").write_bytes(b"\x89HDF")
    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(ProtegeError, match="needs h5py"):
            read_points(tmp_path / "x.h5")
    (tmp_path / "bad.off").write_text("OFF\n3 1 0\n0 0 0\n")
    with pytest.raises(ProtegeError, match="damaged OFF"):
        read_points(tmp_path / "bad.off")
    (tmp_path / "cube.obj").write_text("v 0 0 0\n")
    with pytest.raises(ProtegeError, match="unsupported"):
        read_points(tmp_path / "cube.obj")


def test_modelnet_folder_and_shapenet_part_folder(tmp_path):
    root = tmp_path / "modelnet"
    for c, name in enumerate(["bench", "cup"]):
        for split, count in (("train", 4), ("test", 2)):
            d = root / name / split
            d.mkdir(parents=True)
            for i in range(count):
                pts = np.random.default_rng([c, i]).normal(size=(30, 3)) + 5 * c
                np.savetxt(d / f"{name}_{i:04d}.txt", pts, delimiter=",")
    data = load_data("pointfolder", root=str(root), num_points=16, val_fraction=0.25)
    assert data.class_names == ["bench", "cup"] and data.sizes() == {"train": 6, "val": 2, "test": 4}
    x, y = data.test[3]
    assert x.shape == (16, 3) and int(y) == 1 and x.mean() > 2

    sn = tmp_path / "shapenet"
    for cat, labels in (("02691156", (0, 1)), ("03001627", (12, 13, 14))):
        (sn / cat).mkdir(parents=True)
        for i in range(5):
            rows = [[0.1 * j, 0, 0, 0, 0, 1, labels[j % len(labels)]] for j in range(20)]
            np.savetxt(sn / cat / f"{i}.txt", rows)
    folder = PartFolder(sn, num_points=24)
    assert folder.category_parts == [[0, 1], [12, 13, 14]] and folder.num_parts == 15
    splits = load_part_folder(sn, num_points=24, val=0.2, test=0.2)
    assert sum(splits.sizes().values()) == 10 and splits.categories == ["02691156", "03001627"]
    item = splits.train[0]
    assert item["points"].shape == (24, 3) and item["parts"].shape == (24,)
