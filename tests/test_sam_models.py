"""SAM teachers and students (protege.models.sam), checked against segment_anything's own classes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, Sam

from protege.errors import ProtegeError
from protege.metrics.cost import count_flops
from protege.models import sam as sam_module
from protege.models.sam import (
    BatchedMaskDecoder,
    PromptableSegmenter,
    build_sam,
    sam_student,
    sam_variant_of,
)

S = 128


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised position tables, unit norms included), so that
    no comparison passes because a term happens to vanish."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> PromptableSegmenter:
    torch.manual_seed(0)
    return _perturbed(build_sam("tiny"))


def _prompts(b: int, p: int, n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(b, p, n, 2, generator=gen) * S
    labels = torch.randint(0, 2, (b, p, n), generator=gen)
    labels[..., -1] = -1  # a padding point in every prompt
    x0 = torch.rand(b, p, 2, generator=gen) * S / 2
    boxes = torch.cat([x0, x0 + 8 + torch.rand(b, p, 2, generator=gen) * S / 2 - 8], dim=-1).clamp(0, S)
    images = torch.rand(b, 3, S, S, generator=gen)
    return images, points, labels, boxes


def _reference_sam(model: PromptableSegmenter) -> Sam:
    """segment_anything's Sam on the same weights, with its own (one-image) MaskDecoder."""
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=model.mask_decoder.transformer,
        transformer_dim=model.embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=model.embed_dim,
    )
    decoder.load_state_dict(model.mask_decoder.state_dict())
    return Sam(model.image_encoder, model.prompt_encoder, decoder).eval()


@pytest.mark.parametrize("kind", ["points", "boxes", "both"])
@pytest.mark.parametrize("multimask", [False, True])
def test_matches_segment_anything_sam(tiny, kind, multimask):
    images, points, labels, boxes = _prompts(2, 3, 4)
    use_points, use_boxes = kind in ("points", "both"), kind in ("boxes", "both")
    ref = _reference_sam(tiny)
    captured = []
    hook = ref.mask_decoder.transformer.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    records = []
    for b in range(2):
        record = {"image": images[b] * 255, "original_size": (S, S)}
        if use_points:  # SAM takes pixel indices and adds 0.5; ours are pixel-centre coordinates
            record["point_coords"], record["point_labels"] = points[b] - 0.5, labels[b]
        if use_boxes:  # SAM's boxes are inclusive; ours end one past the last pixel
            record["boxes"] = boxes[b] - torch.tensor([0.0, 0.0, 1.0, 1.0])
        records.append(record)
    try:
        expected = ref(records, multimask_output=multimask)  # loops over the images
    finally:
        hook.remove()
    with torch.no_grad():
        out = tiny(
            images,
            points if use_points else None,
            labels if use_points else None,
            boxes if use_boxes else None,
            multimask=multimask,
        )
    m = 3 if multimask else 1
    assert out["masks"].shape == (2, 3, m, 4 * 16, 4 * 16)
    assert out["iou"].shape == (2, 3, m)
    assert out["tokens"].shape == (2, 3, 5, tiny.embed_dim)
    for b in range(2):
        torch.testing.assert_close(out["masks"][b], expected[b]["low_res_logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["iou"][b], expected[b]["iou_predictions"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["tokens"][b], captured[b][:, :5], atol=1e-5, rtol=1e-5)
        # SAM's postprocessing of an unpadded S x S image is our upscale
        up = ref.postprocess_masks(expected[b]["low_res_logits"], (S, S), (S, S))
        torch.testing.assert_close(tiny.upscale(out["masks"][b]), up, atol=1e-5, rtol=1e-5)
        assert torch.equal(tiny.upscale(out["masks"][b]) > 0, expected[b]["masks"])


def test_coordinate_conventions(tiny):
    """A point at the centre of embedding cell (i, j) is position-coded as that cell of the dense code,
    and a tight exclusive box reaches SAM's prompt encoder as SAM's own (inclusive) box of the mask."""
    stride = S // 16
    i, j = 5, 11
    centre = torch.tensor([[[[(j + 0.5) * stride, (i + 0.5) * stride]]]])
    seen = {}
    hook = tiny.prompt_encoder.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs, sparse=out[0]), with_kwargs=True
    )
    emb = torch.zeros(1, tiny.embed_dim, 16, 16)
    mask = torch.zeros(1, S, S, dtype=torch.bool)
    mask[0, 20:41, 7:99] = True  # rows 20..40, columns 7..98
    box = torch.tensor([[[7.0, 20.0, 99.0, 41.0]]])  # x1, y1 one past the last pixel
    try:
        with torch.no_grad():
            tiny.decode(emb, centre, torch.ones(1, 1, 1, dtype=torch.long))
            code = seen["sparse"][0, 0] - tiny.prompt_encoder.point_embeddings[1].weight[0]
            torch.testing.assert_close(code, tiny.prompt_encoder.get_dense_pe()[0, :, i, j])
            tiny.decode(emb, boxes=box)
    finally:
        hook.remove()
    from segment_anything.utils.amg import batched_mask_to_box

    assert torch.equal(seen["boxes"], batched_mask_to_box(mask).float())


def test_batched_decoder_is_a_drop_in_mask_decoder(tiny):
    """With one image, BatchedMaskDecoder.forward is MaskDecoder.forward (same keys, same outputs)."""
    plain = _reference_sam(tiny).mask_decoder
    assert set(plain.state_dict()) == set(tiny.mask_decoder.state_dict())
    emb = torch.randn(1, tiny.embed_dim, 16, 16)
    sparse = torch.randn(5, 3, tiny.embed_dim)
    dense = torch.randn(5, tiny.embed_dim, 16, 16)
    pe = tiny.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for multimask in (False, True):
            got = tiny.mask_decoder(emb, pe, sparse, dense, multimask)
            want = plain(emb, pe, sparse, dense, multimask)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_batch_equals_images_one_by_one(tiny):
    images, points, labels, boxes = _prompts(3, 4, 2, seed=5)
    with torch.no_grad():
        batched = tiny(images, points, labels, boxes, multimask=True)
        for b in range(3):
            alone = tiny(
                images[b : b + 1], points[b : b + 1], labels[b : b + 1], boxes[b : b + 1], multimask=True
            )
            for key in ("masks", "iou", "tokens", "embedding"):
                torch.testing.assert_close(batched[key][b : b + 1], alone[key], atol=1e-5, rtol=1e-5)
    # and the images really differ in the result (the batch is not one image repeated)
    assert not torch.allclose(batched["masks"][0], batched["masks"][1], atol=1e-3)


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_official_configurations(variant):
    with torch.device("meta"):
        ours = build_sam(variant)
        official = sam_model_registry[variant]()
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert mine == theirs
    assert isinstance(ours.mask_decoder, BatchedMaskDecoder)
    assert ours.img_size == 1024 and ours.grid == (64, 64) and ours.embed_dim == 256
    assert sam_variant_of(official.state_dict()) == variant
    if variant == "vit_b":  # the SAM paper's ViT-B image encoder: ~89.7M with the neck
        params = sum(p.numel() for p in ours.image_encoder.parameters())
        assert params == sum(p.numel() for p in official.image_encoder.parameters())
        assert 89e6 < params < 90e6


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tiny, tmp_path, suffix):
    path = tmp_path / f"sam_tiny{suffix}"
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    torch.manual_seed(123)  # other random weights, unless the file replaces them all
    loaded = build_sam("tiny", checkpoint=path).eval()
    images, points, labels, boxes = _prompts(2, 2, 3, seed=9)
    with torch.no_grad():
        a, b = (
            tiny(images, points, labels, boxes, multimask=True),
            loaded(images, points, labels, boxes, multimask=True),
        )
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_of_another_width(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(build_sam("tiny", encoder_dim=96).state_dict(), path)
    with pytest.raises(ProtegeError) as err:
        build_sam("tiny", checkpoint=path, encoder_dim=64, heads=2)
    message = str(err.value)
    assert (
        f"checkpoint {path} is a tiny SAM (encoder width 96); you chose tiny with encoder width 64" in message
    )
    assert "pass encoder_dim=96, heads=3" in message
    # following the advice loads it
    build_sam("tiny", checkpoint=path, encoder_dim=96, heads=3)


def test_checkpoint_of_another_variant(tmp_path, monkeypatch):
    """An official vit_l checkpoint given for vit_b (shapes only: both built on the meta device)."""
    with torch.device("meta"):
        vit_l = sam_model_registry["vit_l"]().state_dict()
    path = tmp_path / "sam_vit_l_0b3195.pth"
    path.touch()
    monkeypatch.setattr(sam_module, "_read_state_dict", lambda p: dict(vit_l))
    with pytest.raises(
        ProtegeError, match=r"is a vit_l SAM \(encoder width 1024\); you chose vit_b — use variant: vit_l"
    ):
        with torch.device("meta"):
            build_sam("vit_b", checkpoint=path)


def test_checkpoint_with_foreign_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["extra.weight"] = torch.zeros(2)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(
        ProtegeError,
        match=r"(?s)missing from the file \(1\): mask_decoder.iou_token.weight.*not in the model \(1\): extra.weight",
    ):
        build_sam("tiny", checkpoint=path)
    with pytest.raises(ProtegeError, match="not found"):
        build_sam("tiny", checkpoint=tmp_path / "absent.pth")


def test_bad_variant_and_options():
    with pytest.raises(ProtegeError, match="unknown SAM variant 'vit_x'"):
        build_sam("vit_x")
    with pytest.raises(ProtegeError, match=r"unknown SAM option\(s\) \['width'\]"):
        build_sam("tiny", width=32)
    with pytest.raises(ProtegeError, match="multiple of patch_size"):
        build_sam("tiny", img_size=100)
    with pytest.raises(ProtegeError, match="global_attn_indexes"):
        build_sam("tiny", global_attn_indexes=[7])


def test_input_validation(tiny):
    images, points, labels, boxes = _prompts(2, 3, 2)
    emb = torch.zeros(2, tiny.embed_dim, 16, 16)
    cases = [
        (lambda: tiny.encode(images[:, :1]), "images have 1 channels"),
        (
            lambda: tiny.encode(torch.rand(2, 3, 64, 64)),
            r"shape \(2, 3, 64, 64\); this model expects \(B, 3, 128, 128\)",
        ),
        (lambda: tiny.encode(images[0]), "add the batch dimension"),
        (lambda: tiny.encode((images * 255).to(torch.uint8)), "divide by 255"),
        (lambda: tiny.decode(emb), "no prompt"),
        (lambda: tiny.decode(emb, points), "points and labels go together"),
        (
            lambda: tiny.decode(emb, points, labels[:, :, :1]),
            r"labels have shape \(2, 3, 1\); expected \(2, 3, 2\)",
        ),
        (lambda: tiny.decode(emb, points[:, :0], labels[:, :0]), r"empty prompt list \(P = 0\)"),
        (lambda: tiny.decode(emb, boxes=boxes[:, :0]), r"empty prompt list \(P = 0\)"),
        (lambda: tiny.decode(emb, points, labels, boxes[:, :2]), "P must be equal"),
        (lambda: tiny.decode(emb, points, labels.float()), "expected integers"),
        (lambda: tiny.decode(emb[:1], points, labels), "points are for 2 images, embeddings for 1"),
        (lambda: tiny.decode(emb[:, :8], points, labels), "embeddings have shape"),
    ]
    for call, pattern in cases:
        with pytest.raises(ProtegeError, match=pattern):
            call()

    outside = points.clone()
    outside[1, 2, 0] = torch.tensor([S + 0.5, 3.0])
    with pytest.raises(ProtegeError, match=r"point \[128.5, 3.0\] of image 1, prompt 2, point 0 is outside"):
        tiny.decode(emb, outside, labels)
    nan = points.clone()
    nan[0, 1, 0, 1] = float("nan")
    with pytest.raises(ProtegeError, match="image 0, prompt 1, point 0 is outside"):
        tiny.decode(emb, nan, labels)
    padded = outside.clone()
    padded_labels = labels.clone()
    padded_labels[1, 2, 0] = -1  # a padding point may be anywhere
    tiny.decode(emb, padded, padded_labels)
    bad_label = labels.clone()
    bad_label[0, 0, 0] = 2
    with pytest.raises(ProtegeError, match="label 2 of image 0, prompt 0, point 0"):
        tiny.decode(emb, points, bad_label)
    wide = boxes.clone()
    wide[1, 1, 2] = S + 1
    with pytest.raises(ProtegeError, match="of image 1, prompt 1 is outside the image"):
        tiny.decode(emb, boxes=wide)


@pytest.mark.parametrize("encoder", ["cnn", "vit", "timm:mobilenetv3_small_050"])
def test_student_fits_the_teacher(tiny, encoder):
    student = sam_student(encoder, from_model=tiny).eval()
    assert (student.img_size, student.embed_dim, student.grid) == (tiny.img_size, tiny.embed_dim, tiny.grid)
    images, points, labels, _ = _prompts(2, 2, 3)
    with torch.no_grad():
        out = student(images, points, labels)
        assert out["embedding"].shape == (2, tiny.embed_dim, *tiny.grid)
        # the copied decoder decodes a teacher embedding exactly as the teacher does
        emb = tiny.encode(images)
        torch.testing.assert_close(
            student.decode(emb, points, labels)["masks"], tiny.decode(emb, points, labels)["masks"]
        )
    for key, value in tiny.mask_decoder.state_dict().items():
        copied = student.mask_decoder.state_dict()[key]
        assert torch.equal(value, copied) and value.data_ptr() != copied.data_ptr()


def test_student_costs_and_learns(tiny):
    student = sam_student("cnn", from_model=tiny)
    images, points, labels, boxes = _prompts(2, 3, 2)
    teacher_flops = count_flops(tiny.image_encoder, images)
    student_flops = count_flops(student.image_encoder, images)
    assert student_flops < teacher_flops / 4, (student_flops, teacher_flops)
    vit_flops = count_flops(sam_student("vit", from_model=tiny).image_encoder, images)
    assert vit_flops < teacher_flops / 4, (vit_flops, teacher_flops)

    student.train()
    out = student(images, points, labels, boxes, multimask=True)
    target = (torch.rand_like(out["masks"]) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(out["masks"], target).backward()
    for name, p in student.image_encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tiny.parameters())  # the teacher's decoder was copied, not shared


def test_student_options(tiny):
    fresh = sam_student("cnn", from_model=tiny, copy_decoder=False, widths=(8, 16, 24), blocks=1)
    assert {k: v.shape for k, v in fresh.mask_decoder.state_dict().items()} == {
        k: v.shape for k, v in tiny.mask_decoder.state_dict().items()
    }
    assert not torch.equal(fresh.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight)
    alone = sam_student("cnn", img_size=64, embed_dim=32)
    assert alone.grid == (8, 8) and alone.encode(torch.rand(1, 3, 64, 64)).shape == (1, 32, 8, 8)
    with pytest.raises(ProtegeError, match="give 3 widths"):
        sam_student("cnn", from_model=tiny, widths=(8, 16))
    with pytest.raises(ProtegeError, match="img_size=64 contradicts"):
        sam_student("cnn", from_model=tiny, img_size=64)
    with pytest.raises(ProtegeError, match="unknown student encoder"):
        sam_student("resnet", from_model=tiny)
    with pytest.raises(ProtegeError, match="unknown option"):
        sam_student("vit", from_model=tiny, width=3)
