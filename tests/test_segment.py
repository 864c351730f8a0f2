"""Segment everything (protege.segment): SAM's dense grid, TinySAM's hierarchical strategy, mask
matching, the files written and the images read."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from protege.errors import ProtegeError
from protege.segment import load_image, match_masks, save_everything, segment_everything
from sam_standin import OracleSam, shapes_image, tiny_sam


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _truth(labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([labels == k for k in range(1, int(labels.max()) + 1)])


def test_a_perfect_segmenter_finds_every_object_in_both_modes():
    image, labels, bg = shapes_image(64)
    truth = _truth(labels)
    for mode in ("dense", "hierarchical"):
        model = OracleSam(64, bg)
        result = segment_everything(model, image, mode=mode, points_per_side=16)
        scores = match_masks(result.masks, truth)
        assert scores["recall"] == 1.0 and scores["miou"] == 1.0, mode
        assert scores["precision"] == 1.0, mode  # duplicates (3 masks per point, many points) removed
        assert result.prompts == model.decoded  # every prompt decoded is reported
        assert result.masks.shape == (3, 64, 64) and result.masks.dtype == torch.bool
        # the boxes are the masks' extents, x1/y1 exclusive
        for mask, box in zip(result.masks, result.boxes):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [
                int(cols.min()),
                int(rows.min()),
                int(cols.max()) + 1,
                int(rows.max()) + 1,
            ]
        assert result.scores.tolist() == sorted(result.scores.tolist(), reverse=True)
        assert set(result.times) == {"encode", "decode", "post"}


def test_hierarchical_decodes_fewer_prompts_on_large_objects():
    image, _, bg = shapes_image(64)
    dense = segment_everything(OracleSam(64, bg), image, mode="dense", points_per_side=16)
    hier = segment_everything(OracleSam(64, bg), image, mode="hierarchical", points_per_side=16)
    assert dense.prompts == 256
    assert hier.prompts < dense.prompts * 0.75
    assert (hier.prompt_rounds == 0).sum() == 16  # the sparse round: points_per_side // 4 squared


def test_hierarchical_skips_exactly_the_points_in_the_covered_area():
    """The covered area is the union of the sparse round's high-confidence masks (recomputed here
    from the model's own answers), and the dense points decoded are exactly the grid's points
    outside it."""
    image, _, bg = shapes_image(64)
    model = OracleSam(64, bg, fg_iou=0.97)
    result = segment_everything(model, image, mode="hierarchical", points_per_side=16, high_conf_iou=0.9)
    # independently: decode the sparse grid (SAM's 4x4 grid, pixel centres) one point at a time
    sparse = torch.tensor([[(i + 0.5) * 16 + 0.5, (j + 0.5) * 16 + 0.5] for j in range(4) for i in range(4)])
    emb = model.encode(image[None])
    expected = torch.zeros(64, 64, dtype=torch.bool)
    for p in sparse:
        out = model.decode(emb, p.view(1, 1, 1, 2), torch.ones(1, 1, 1, dtype=torch.long), multimask=True)
        for logit, iou in zip(out["masks"][0, 0], out["iou"][0, 0]):
            if iou > 0.9:
                expected |= logit > 0
    assert expected.any() and not expected.all()
    assert torch.equal(result.covered, expected)
    dense_grid = torch.tensor(
        [[(i + 0.5) * 4 + 0.5, (j + 0.5) * 4 + 0.5] for j in range(16) for i in range(16)]
    )
    outside = dense_grid[~expected[dense_grid[:, 1].long(), dense_grid[:, 0].long()]]
    decoded = result.prompt_points[result.prompt_rounds == 1]
    assert torch.equal(decoded, outside)
    assert torch.equal(result.prompt_points[result.prompt_rounds == 0], sparse)


def test_low_confidence_sparse_masks_cover_nothing():
    """Sparse masks that pass the ordinary thresholds but not the high-confidence ones are kept
    but do not skip dense points."""
    image, labels, bg = shapes_image(64)
    model = OracleSam(64, bg, fg_iou=0.85)
    result = segment_everything(model, image, mode="hierarchical", points_per_side=16)
    assert not result.covered.any() and result.prompts == 16 + 256
    assert match_masks(result.masks, _truth(labels))["recall"] == 1.0


@pytest.mark.parametrize("nms", [1.0, 0.7])
def test_dense_mode_is_sams_automatic_mask_generator(nms):
    """On a real SAM (random weights), dense mode keeps exactly the masks, in the same order, that
    segment_anything's SamAutomaticMaskGenerator keeps with the same grid and thresholds."""
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import Sam

    model = tiny_sam()
    image, _, _ = shapes_image(64)
    pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    thresholds = {"pred_iou_thresh": -10.0}  # a random model's IoU head: let every mask through
    ours = segment_everything(
        model, image, mode="dense", points_per_side=8, stability_thresh=0.0, nms_thresh=nms, **thresholds
    )
    sam = Sam(model.image_encoder, model.prompt_encoder, model.mask_decoder).eval()
    generator = SamAutomaticMaskGenerator(
        sam, points_per_side=8, stability_score_thresh=0.0, box_nms_thresh=nms, **thresholds
    )
    theirs = sorted(generator.generate(pixels), key=lambda a: -a["predicted_iou"])
    assert len(ours) == len(theirs) > 0
    for i, ann in enumerate(theirs):
        assert torch.equal(ours.masks[i], torch.from_numpy(ann["segmentation"]))
        assert ours.scores[i].item() == pytest.approx(ann["predicted_iou"], abs=1e-5)
        assert ours.points[i].tolist() == pytest.approx([c + 0.5 for c in ann["point_coords"][0]])
    strict = segment_everything(model, image, mode="dense", points_per_side=4, pred_iou_thresh=10.0)
    assert len(strict) == 0 and strict.masks.shape == (0, 64, 64) and strict.prompts == 16
    hier = segment_everything(model, image, points_per_side=8, stability_thresh=0.0, **thresholds)
    assert hier.prompts <= 4 + 64


def test_valid_size_limits_grid_and_masks():
    image, labels, bg = shapes_image(64)
    result = segment_everything(
        OracleSam(64, bg), image, mode="dense", points_per_side=8, valid_size=(40, 64)
    )
    assert not result.masks[:, 40:].any()
    assert (result.prompt_points[:, 1] < 40).all()


def test_bad_arguments_are_protege_errors():
    image, _, bg = shapes_image(64)
    model = OracleSam(64, bg)
    with pytest.raises(ProtegeError, match="mode"):
        segment_everything(model, image, mode="everything")
    with pytest.raises(ProtegeError, match=r"\(3, 64, 64\)"):
        segment_everything(model, image[:, :32])
    with pytest.raises(ProtegeError, match="points_per_side"):
        segment_everything(model, image, points_per_side=0)


def test_match_masks_against_hand_computed_ious():
    z = torch.zeros(3, 4, 4, dtype=torch.bool)
    ref = z.clone()
    ref[0, :2, :2] = True  # 4 px
    ref[1, 2:, :] = True  # 8 px
    ref[2, 0, 3] = True  # 1 px
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0, 2:, :2] = True  # inside ref 1: IoU 4/8 = 0.5
    pred[1, :2, :3] = True  # covers ref 0: IoU 4/6
    out = match_masks(pred, ref)
    assert out["matched_iou"] == pytest.approx([4 / 6, 0.5, 0.0])
    assert out["miou"] == pytest.approx((4 / 6 + 0.5) / 3)
    assert out["recall"] == pytest.approx(2 / 3) and out["precision"] == 1.0
    assert sorted(out["pairs"]) == [(0, 1, 0.5), (1, 0, pytest.approx(4 / 6))]
    strict = match_masks(pred, ref, iou=0.6)
    assert strict["recall"] == pytest.approx(1 / 3) and strict["precision"] == 0.5
    # one-to-one: the prediction nearest both references goes to the one nothing else fits as well
    a = torch.zeros(2, 1, 4, dtype=torch.bool)
    a[0, 0, :3] = True  # IoU with r0 (cols 0-1): 2/3, with r1 (cols 0-3): 3/4
    a[1, 0, :2] = True  # IoU with r0: 1, with r1: 2/4
    r = torch.zeros(2, 1, 4, dtype=torch.bool)
    r[0, 0, :2] = True
    r[1, 0, :] = True
    assert match_masks(a, r)["matched_iou"] == pytest.approx([1.0, 0.75])
    empty = match_masks(torch.zeros(0, 4, 4, dtype=torch.bool), ref)
    assert empty["miou"] == 0.0 and empty["recall"] == 0.0 and math.isnan(empty["precision"])
    with pytest.raises(ProtegeError):
        match_masks(pred, ref[:, :2])


def test_save_everything_writes_files_that_load_back(tmp_path):
    image, labels, bg = shapes_image(64)
    result = segment_everything(OracleSam(64, bg), image, mode="hierarchical")
    # an extra, lower-scored mask overlapping the best one: it must not overwrite it in the label map
    extra = result.masks[0].clone()
    extra[:, :] = False
    extra[:32, :32] = True
    result.masks = torch.cat([result.masks, extra[None]])
    result.scores = torch.cat([result.scores, torch.tensor([0.5])])
    result.stability = torch.cat([result.stability, torch.tensor([1.0])])
    result.boxes = torch.cat([result.boxes, torch.tensor([[0.0, 0, 32, 32]])])
    result.points = torch.cat([result.points, torch.tensor([[1.0, 1.0]])])
    result.rounds = torch.cat([result.rounds, torch.tensor([1])])
    out = tmp_path / "everything"
    paths = save_everything(result, image, out)
    assert sorted(p.name for p in out.iterdir()) == ["masks.json", "masks.png", "overlay.png"]
    assert set(paths) == {"labels", "json", "overlay"}
    label_map = np.asarray(Image.open(paths["labels"]))
    assert label_map.dtype == np.uint8 and label_map.shape == (64, 64)
    expected = np.zeros((64, 64), dtype=np.uint8)
    for i in reversed(range(len(result))):  # earlier (better) masks painted last win
        expected[result.masks[i].numpy()] = i + 1
    assert np.array_equal(label_map, expected)
    for i in range(3):
        assert np.array_equal(label_map == i + 1, result.masks[i].numpy())  # the three objects intact
    record = json.loads(paths["json"].read_text())
    assert [m["label"] for m in record["masks"]] == [1, 2, 3, 4]
    assert record["masks"][0]["area"] == int(result.masks[0].sum())
    assert record["masks"][3]["visible_area"] == int((label_map == 4).sum())
    assert record["masks"][0]["box"] == result.boxes[0].tolist()
    assert record["prompts"] == result.prompts
    overlay = np.asarray(Image.open(paths["overlay"]))
    assert overlay.shape == (64, 64, 3)
    picture = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(overlay[label_map == 0], picture[label_map == 0])  # background untouched
    assert (overlay[label_map > 0] != picture[label_map > 0]).any(1).all()  # masks tinted

    with pytest.raises(ProtegeError, match="not empty"):
        save_everything(result, image, out)
    one = segment_everything(OracleSam(64, bg), image, mode="dense", points_per_side=2)
    save_everything(one, image, out, overwrite=True)
    assert len(json.loads((out / "masks.json").read_text())["masks"]) == len(one)
    assert not [p for p in tmp_path.iterdir() if p.name != "everything"]  # no staging left behind


def test_save_everything_crops_to_the_valid_area(tmp_path):
    image, _, bg = shapes_image(64)
    result = segment_everything(
        OracleSam(64, bg), image, mode="dense", points_per_side=8, valid_size=(40, 50)
    )
    paths = save_everything(result, image, tmp_path / "out")
    assert np.asarray(Image.open(paths["labels"])).shape == (40, 50)
    assert np.asarray(Image.open(paths["overlay"])).shape == (40, 50, 3)


def test_load_image_letterboxes(tmp_path):
    rgb = np.zeros((30, 60, 3), dtype=np.uint8)
    rgb[:, :, 0] = 200
    rgb[:, 30:, 2] = 100
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    x, (h, w) = load_image(tmp_path / "wide.png", 64)
    assert x.shape == (3, 64, 64) and (h, w) == (32, 64)
    assert not x[:, 32:].any()  # zero padding at the bottom
    assert torch.allclose(x[0, :32], torch.full((32, 64), 200 / 255))
    assert torch.allclose(x[2, :32, :31], torch.zeros(32, 31)) and torch.allclose(
        x[2, :32, 33:], torch.full((32, 31), 100 / 255)
    )
    # greyscale and RGBA become RGB
    Image.fromarray(np.full((64, 32), 77, dtype=np.uint8)).save(tmp_path / "grey.png")
    x, (h, w) = load_image(tmp_path / "grey.png", 64)
    assert (h, w) == (64, 32) and torch.allclose(x[:, :, :32], torch.full((3, 64, 32), 77 / 255))
    assert not x[:, :, 32:].any()
    Image.fromarray(np.full((8, 8, 4), 50, dtype=np.uint8)).save(tmp_path / "rgba.png")
    x, (h, w) = load_image(tmp_path / "rgba.png", 16)
    assert (h, w) == (16, 16) and torch.allclose(x, torch.full((3, 16, 16), 50 / 255))


def test_load_image_errors(tmp_path):
    with pytest.raises(ProtegeError, match="no such image"):
        load_image(tmp_path / "missing.png", 64)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ProtegeError, match="not an image"):
        load_image(tmp_path / "notes.png", 64)
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ProtegeError, match="'F'"):
        load_image(tmp_path / "float.tif", 64)
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.jpg")
    with pytest.raises(ProtegeError, match="'CMYK'"):
        load_image(tmp_path / "cmyk.jpg", 64)
