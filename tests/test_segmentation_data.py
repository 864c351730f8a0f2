"""Promptable-segmentation data (protege.data.segmentation): prompt samplers on hand-checked masks
and against brute force / segment_anything, composites (exact masks, determinism, Fashion-MNIST
pools), option validation, and the folder reader on tiny files written in tmp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protege.data import fashion_mnist as fm
from protege.data import segmentation as seg
from protege.data.segmentation import (
    SAM_PIXEL_MEAN,
    TEXTURES,
    SegmentationImages,
    collate_segmentation,
    error_point,
    instance_masks,
    interior_point,
    load_segmentation_splits,
    mask_box,
    point_grid,
    random_points,
)
from protege.errors import ProtegeError


def _rect(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def _needs_fashion() -> None:
    try:
        fm.find_dir()
    except ProtegeError:
        pytest.skip("Fashion-MNIST files absent (make data)")


# ---------------------------------------------------------------------------------------- samplers


def test_instance_masks_numpy_and_torch():
    labels = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 2]], dtype=np.uint8)
    masks = instance_masks(labels)
    assert masks.dtype == bool and masks.shape == (2, 3, 3)
    np.testing.assert_array_equal(masks[0], labels == 1)
    np.testing.assert_array_equal(masks[1], labels == 2)
    t = instance_masks(torch.from_numpy(labels.astype(np.int64)))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bool
    np.testing.assert_array_equal(t.numpy(), masks)
    sparse = np.where(labels == 2, 7, labels)  # ids 1 and 7: ascending order, no empty masks
    np.testing.assert_array_equal(instance_masks(sparse), masks)
    assert instance_masks(np.zeros((4, 4), dtype=np.int64)).shape == (0, 4, 4)


def test_interior_point_rectangle_is_its_centre():
    m = _rect(12, 15, 3, 8, 2, 11)  # 5 rows x 9 columns: centre pixel (row 5, col 6)
    assert interior_point(m) == (6.5, 5.5)
    assert interior_point(torch.from_numpy(m)) == (6.5, 5.5)
    assert interior_point(_rect(7, 7, 0, 7, 0, 7)) == (3.5, 3.5)  # image edge counts as boundary
    assert interior_point(_rect(5, 5, 2, 3, 4, 5)) == (4.5, 2.5)  # a single pixel
    with pytest.raises(ValueError):
        interior_point(np.zeros((4, 4), dtype=bool))


def test_interior_point_is_farthest_from_the_boundary_brute_force():
    m = np.zeros((20, 24), dtype=bool)
    m[2:18, 3:8] = True  # an L: a thin bar and a thick foot
    m[10:19, 3:22] = True
    x, y = interior_point(m)
    row, col = int(y - 0.5), int(x - 0.5)
    assert m[row, col]
    padded = np.pad(m, 1)
    bg = np.argwhere(~padded)

    def clearance(r: int, c: int) -> float:
        return float(np.sqrt(((bg - [r + 1, c + 1]) ** 2).sum(1)).min())

    best = max(clearance(r, c) for r, c in np.argwhere(m))
    assert clearance(row, col) == pytest.approx(best)
    assert row >= 10  # in the thick foot, not the 5-wide bar


def test_random_points_inside_uniform_and_deterministic():
    m = _rect(10, 10, 2, 4, 3, 5)  # 4 pixels
    pts = random_points(m, 4000, np.random.default_rng(0))
    assert pts.shape == (4000, 2) and pts.dtype == np.float32
    cols, rows = (pts[:, 0] - 0.5).astype(int), (pts[:, 1] - 0.5).astype(int)
    assert np.all(pts % 1 == 0.5) and m[rows, cols].all()
    counts = np.unique(rows * 10 + cols, return_counts=True)[1]
    assert len(counts) == 4 and counts.min() > 850  # 1000 expected each (with replacement: n > area)
    big = _rect(30, 30, 0, 30, 0, 30)
    few = random_points(big, 50, np.random.default_rng(1))
    assert len({tuple(p) for p in few.tolist()}) == 50  # without replacement when the mask is large
    np.testing.assert_array_equal(few, random_points(big, 50, np.random.default_rng(1)))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_points(torch.from_numpy(big), 20, g1), random_points(torch.from_numpy(big), 20, g2)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and torch.equal(a, b)
    assert len({tuple(p) for p in a.tolist()}) == 20
    assert not np.array_equal(few, random_points(big, 50, np.random.default_rng(2)))


def test_mask_box_tight_and_noisy():
    m = np.zeros((40, 50), dtype=bool)
    m[5:17, 10:30] = True
    m[20, 40] = True  # a stray pixel widens the box
    np.testing.assert_array_equal(mask_box(m), [10, 5, 41, 21])
    t = mask_box(torch.from_numpy(m))
    assert isinstance(t, torch.Tensor) and t.tolist() == [10, 5, 41, 21]
    tight = mask_box(m)
    noisy = [mask_box(m, np.random.default_rng(s), noise=0.1) for s in range(300)]
    for box in noisy:
        assert 0 <= box[0] < box[2] <= 50 and 0 <= box[1] < box[3] <= 40
        assert np.abs(box - tight).max() <= 20 + 1e-4
    shifts = np.stack(noisy) - tight
    assert np.abs(shifts).max() > 0.5
    # the x shifts have std 0.1 * width (3.1 px), the y shifts 0.1 * height (1.6 px)
    assert shifts[:, 0].std() == pytest.approx(3.1, rel=0.2)
    assert shifts[:, 1].std() == pytest.approx(1.6, rel=0.2)
    np.testing.assert_array_equal(noisy[7], mask_box(m, np.random.default_rng(7), noise=0.1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(
        mask_box(torch.from_numpy(m), g, 0.1),
        mask_box(torch.from_numpy(m), torch.Generator().manual_seed(0), 0.1),
    )
    with pytest.raises(ValueError):
        mask_box(m, None, noise=0.1)


def test_error_point_only_in_the_disagreement_with_the_right_label():
    ref = _rect(16, 16, 2, 10, 2, 10)
    pred = _rect(16, 16, 4, 12, 4, 12)
    fn, fp = ref & ~pred, pred & ~ref
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(600):
        (x, y), label = error_point(pred, ref, rng)
        r, c = int(y - 0.5), int(x - 0.5)
        assert (x % 1, y % 1) == (0.5, 0.5)
        assert (fn if label == 1 else fp)[r, c]
        labels.append(label)
    # uniform over the XOR: the share of positive clicks is the false negatives' share of it
    assert np.mean(labels) == pytest.approx(fn.sum() / (fn.sum() + fp.sum()), abs=0.07)
    assert error_point(ref, ref.copy(), rng) is None
    g = torch.Generator().manual_seed(5)
    a = error_point(torch.from_numpy(pred), torch.from_numpy(ref), g)
    assert a == error_point(pred, ref, torch.Generator().manual_seed(5))


def test_point_grid_matches_segment_anything():
    from segment_anything.utils.amg import build_point_grid

    for n, size in ((1, 128), (4, 64), (16, 1024)):
        grid = point_grid(n, size)
        assert grid.shape == (n * n, 2) and grid.dtype == np.float32
        np.testing.assert_allclose(grid, build_point_grid(n) * size, rtol=1e-6)
    np.testing.assert_array_equal(point_grid(2, 8), [[2, 2], [6, 2], [2, 6], [6, 6]])


# -------------------------------------------------------------------------------------- composites


def test_textures_all_load_offline():
    assert tuple(name for name, _ in seg._textures()) == TEXTURES


def test_shape_composites_exact_masks_and_deterministic():
    size, n = 64, 12
    ds = SegmentationImages(n, size=size, seed=3, kinds=("shapes",), max_objects=4)
    min_area = max(16, int(np.ceil(0.005 * size * size)))
    assert ds.min_area == min_area and len(ds) == n
    assert ds.images.shape == (n, size, size, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n, size, size) and ds.labels.dtype == np.uint8
    for i in range(n):
        item = ds[i]
        image, labels = item["image"], item["instances"]
        assert item["index"] == i and image.dtype == torch.float32 and labels.dtype == torch.int64
        assert image.shape == (3, size, size) and 0 <= image.min() and image.max() <= 1
        objects = ds.objects(i)
        k = len(objects)
        assert 1 <= k <= 4 and all(kind in seg.SHAPES and item == -1 for kind, item in objects)
        areas = np.bincount(labels.numpy().ravel(), minlength=k + 1)
        assert len(areas) == k + 1  # compact labels 1..K
        assert areas.sum() == size * size and (areas[1:] >= min_area).all()
        for label in range(1, k + 1):  # a flat colour +- 0.05: the labelled pixels all came from it
            pixels = image[:, labels == label]
            spread = (pixels.max(1).values - pixels.min(1).values).max()
            assert spread <= 0.1 + 2 / 255
    again = SegmentationImages(5, size=size, seed=3, kinds=("shapes",))
    np.testing.assert_array_equal(again.images, ds.images[:5])  # image i depends on (seed, split, i)
    np.testing.assert_array_equal(again.labels, ds.labels[:5])
    other = SegmentationImages(5, size=size, seed=4, kinds=("shapes",))
    assert not np.array_equal(other.images, again.images)
    val = SegmentationImages(5, size=size, seed=3, kinds=("shapes",), split="val")
    assert not np.array_equal(val.images, again.images)


def test_min_area_drops_small_objects():
    ds = SegmentationImages(6, size=48, seed=0, kinds=("shapes",), min_area=300)
    for i in range(6):
        areas = np.bincount(ds.labels[i].ravel())[1:]
        assert len(areas) == len(ds.objects(i)) and (areas >= 300).all()


def test_fashion_composites_pools_and_colours():
    _needs_fashion()
    arrays = fm.read_arrays()
    kw = {"size": 64, "seed": 1, "kinds": ("fashion",), "max_objects": 3}
    parts = {split: SegmentationImages(8, split=split, **kw) for split in ("train", "val", "test")}
    items = {s: [it for i in range(8) for _, it in d.objects(i)] for s, d in parts.items()}
    assert all(kind == "fashion" for d in parts.values() for i in range(8) for kind, _ in d.objects(i))
    assert parts["train"].fashion_pool == (0, 50_000) and parts["val"].fashion_pool == (50_000, 60_000)
    assert parts["test"].fashion_pool == (0, len(arrays.test_images))
    assert all(0 <= it < 50_000 for it in items["train"]) and all(
        50_000 <= it < 60_000 for it in items["val"]
    )
    assert all(0 <= it < 10_000 for it in items["test"])
    for d in parts.values():
        for i in range(8):
            image, labels = d[i]["image"].numpy(), d.labels[i]
            for label in range(1, len(d.objects(i)) + 1):
                # grey level x one colour: every bright enough pixel of the object has the same hue
                px = image[:, labels == label].T
                px = px[px.max(1) > 40 / 255]
                if len(px) < 5:
                    continue
                unit = px / np.linalg.norm(px, axis=1, keepdims=True)
                mean = unit.mean(0) / np.linalg.norm(unit.mean(0))
                assert (unit @ mean).min() > 0.98


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(ProtegeError, match="make data") as info:
        SegmentationImages(2, size=32)
    assert "kinds: [shapes]" in str(info.value)
    assert len(SegmentationImages(2, size=32, kinds=("shapes",))) == 2  # shapes need no files


def test_collate_and_dataloader():
    ds = SegmentationImages(5, size=32, seed=0, kinds=("shapes",))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_segmentation)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["instances"].shape == (2, 32, 32)
    assert batch["instances"].dtype == torch.int64 and batch["index"].tolist() == [0, 1]
    assert torch.equal(batch["instances"][1], ds[1]["instances"])


# -------------------------------------------------------------------------------------------- splits


def test_load_composite_splits():
    opts = {"size": 32, "train": 4, "val": 2, "test": 3, "kinds": ["shapes"], "max_objects": 2}
    data = load_segmentation_splits(opts, seed=0)
    assert data.sizes() == {"train": 4, "val": 2, "test": 3}
    assert (data.num_classes, data.class_names, data.in_chans, data.input_size) == (1, ["object"], 3, 32)
    assert data.source == "composites" and data.mean is None
    assert data.options["min_area"] == 16 and data.options["textures"] == list(TEXTURES)
    assert data.fingerprint() == load_segmentation_splits(opts, seed=0).fingerprint()
    assert data.fingerprint() != load_segmentation_splits(opts, seed=1).fingerprint()
    assert data.train.split == "train" and data.val.split == "val" and data.test.split == "test"
    assert load_segmentation_splits({**opts, "test": 0}, seed=0).test is None


@pytest.mark.parametrize(
    "options",
    [
        {"sise": 32},
        {"size": 0},
        {"size": 8},
        {"train": -1},
        {"val": 0},
        {"test": -2},
        {"train": "many"},
        {"train": True},
        {"train": 2.5},
        {"max_objects": 0},
        {"max_objects": 300},
        {"kinds": ["circles"]},
        {"kinds": []},
        {"min_area": 0},
        {"source": "sa1b"},
        {"source": "folder"},
        {"source": "folder", "root": "x", "train": 3},
        {"source": "folder", "root": "x", "val_fraction": 1.5},
    ],
)
def test_bad_options_are_protege_errors(options):
    with pytest.raises(ProtegeError):
        load_segmentation_splits(
            {"train": 2, "val": 2, "test": 0, "size": 32, "kinds": ["shapes"], **options}
            if options.get("source") != "folder"
            else options,
            seed=0,
        )


def test_unknown_kind_names_the_choices():
    with pytest.raises(ProtegeError, match="shapes"):
        load_segmentation_splits({"kinds": ["shape"]}, seed=0)
    with pytest.raises(ProtegeError, match="seed"):
        load_segmentation_splits({}, seed=-1)


# --------------------------------------------------------------------------------------------- folder


def _write_pair(directory: Path, stem: str, w: int = 40, h: int = 20, suffix: str = ".png") -> np.ndarray:
    rng = np.random.default_rng(len(stem) + w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels = np.zeros((h, w), dtype=np.uint8)
    labels[2:10, 4:20] = 3
    labels[12:18, 25:38] = 7
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(directory / f"{stem}{suffix}")
    Image.fromarray(labels).save(directory / f"{stem}.masks.png")
    return image


def test_folder_letterbox_like_sam(tmp_path):
    from segment_anything.utils.transforms import ResizeLongestSide

    image = _write_pair(tmp_path, "a")
    ds = seg.SegmentationFolder([tmp_path / "a.png"], size=32)
    item = ds[0]
    x, lab = item["image"], item["instances"]
    assert x.shape == (3, 32, 32) and lab.shape == (32, 32) and lab.dtype == torch.int64
    nh, nw = ResizeLongestSide.get_preprocess_shape(20, 40, 32)
    assert (nh, nw) == (16, 32)
    expected = ResizeLongestSide(32).apply_image(image)  # SAM's own resize of the same pixels
    np.testing.assert_array_equal(np.round(x[:, :nh, :nw].permute(1, 2, 0).numpy() * 255), expected)
    pad = torch.tensor(SAM_PIXEL_MEAN).view(3, 1)
    assert torch.allclose(x[:, nh:, :].reshape(3, -1), pad.expand(3, (32 - nh) * 32))
    assert (lab[nh:] == 0).all()
    assert sorted(torch.unique(lab).tolist()) == [0, 1, 2]  # ids 3 and 7 relabelled compactly
    assert lab[int(6 * 0.8), int(12 * 0.8)] == 1 and lab[int(15 * 0.8), int(31 * 0.8)] == 2


def test_folder_splits_flat_and_subfolders(tmp_path):
    flat = tmp_path / "flat"
    for i in range(10):
        _write_pair(flat, f"img{i}", suffix=".jpg" if i % 2 else ".png")
    (flat / "README.txt").write_text("not an image, ignored")
    opts = {"source": "folder", "root": str(flat), "size": 24, "val_fraction": 0.2, "test_fraction": 0.2}
    data = load_segmentation_splits(opts, seed=0)
    assert data.sizes() == {"train": 6, "val": 2, "test": 2} and data.source == "folder"
    names = [set(map(str, part.files)) for part in (data.train, data.val, data.test)]
    assert set.union(*names) == {
        str(p) for p in flat.iterdir() if p.suffix in (".png", ".jpg") and not p.name.endswith(".masks.png")
    }
    assert sum(map(len, names)) == 10
    assert data.train[0]["image"].shape == (3, 24, 24)
    assert load_segmentation_splits(opts, seed=0).fingerprint() == data.fingerprint()
    assert load_segmentation_splits(opts, seed=1).fingerprint() != data.fingerprint()
    tree = tmp_path / "tree"
    for split, count in (("train", 3), ("val", 1)):
        for i in range(count):
            _write_pair(tree / split, f"{split}{i}")
    data = load_segmentation_splits({"source": "folder", "root": str(tree)}, seed=0)
    assert data.sizes() == {"train": 3, "val": 1, "test": 0} and data.test is None


def test_folder_bad_input(tmp_path):
    def load(root: Path) -> None:
        load_segmentation_splits(
            {"source": "folder", "root": str(root), "val_fraction": 0.5, "test_fraction": 0}, seed=0
        )

    missing = tmp_path / "missing"
    _write_pair(missing, "a")
    _write_pair(missing, "b")
    (missing / "b.masks.png").unlink()
    with pytest.raises(ProtegeError, match="has no mask b.masks.png"):
        load(missing)
    mismatch = tmp_path / "mismatch"
    _write_pair(mismatch, "a")
    _write_pair(mismatch, "b")
    Image.fromarray(np.zeros((21, 40), dtype=np.uint8)).save(mismatch / "b.masks.png")
    with pytest.raises(ProtegeError, match="same size"):
        load(mismatch)
    junk = tmp_path / "junk"
    _write_pair(junk, "a")
    (junk / "b.png").write_text("this is not a PNG")
    (junk / "b.masks.png").write_text("nor this")
    with pytest.raises(ProtegeError, match="not an image"):
        load(junk)
    colour = tmp_path / "colour"
    _write_pair(colour, "a")
    _write_pair(colour, "b")
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(colour / "b.masks.png")
    with pytest.raises(ProtegeError, match="single-channel"):
        load(colour)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProtegeError, match="holds no images"):
        load(empty)
    with pytest.raises(ProtegeError, match="not found"):
        load(tmp_path / "nowhere")
