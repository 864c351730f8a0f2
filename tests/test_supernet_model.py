"""SuperLM: exact extraction, round-trip, importance reordering, bad sub-spaces."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from protege.errors import ProtegeError
from protege.metrics.cost import count_flops, count_params
from protege.models.supernet import (
    SubnetArch,
    SubSpace,
    SuperLM,
    arch_flops,
    bert_qkv,
    default_subspaces,
    reorder_by_importance,
)

VOCAB = 50


def tiny_teacher(seed: int = 0) -> transformers.BertModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    config._attn_implementation = "eager"
    return transformers.BertModel(config).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


SPACE = SubSpace("t", layers=(1, 2), hidden=(16, 32), heads=(2, 4), mlp_ratio=(1.0, 2.0))


def test_subspace_enumerates_valid_archs_and_sandwich() -> None:
    assert all(a.hidden % a.heads == 0 for a in SPACE.archs)
    assert SPACE.largest == SubnetArch(2, 32, 4, 64) or SPACE.largest.intermediate == 64
    assert SPACE.smallest.layers == 1 and SPACE.smallest.hidden == 16
    picked = SPACE.sandwich(random.Random(0))
    assert picked[0] == SPACE.largest and picked[1] == SPACE.smallest and len(picked) == 4
    assert SubnetArch.parse(SPACE.largest.id) == SPACE.largest


def test_supernet_equals_teacher_at_full_size_and_subnets_extract_exactly() -> None:
    teacher = tiny_teacher()
    net = SuperLM.from_teacher(teacher, SPACE).eval()
    ids, mask = batch()
    with torch.no_grad():
        ref = teacher(input_ids=ids, attention_mask=mask)
        full = net(ids, mask, SubnetArch(2, 32, 4, 64))
        torch.testing.assert_close(full.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
        q, k, v = bert_qkv(teacher, ids, mask)
        torch.testing.assert_close(full.qkv[0], q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full.qkv[2], v, atol=1e-5, rtol=1e-5)
        for arch in SPACE.archs:
            sub = net.extract(arch)
            assert isinstance(sub, transformers.BertModel)
            assert sub.config.hidden_size == arch.hidden and sub.config.num_attention_heads == arch.heads
            out = sub(input_ids=ids, attention_mask=mask)
            mine = net(ids, mask, arch)
            keep = mask.bool()
            torch.testing.assert_close(
                mine.last_hidden_state[keep], out.last_hidden_state[keep], atol=1e-5, rtol=1e-5
            )
            assert count_params(sub) == net.params(arch)


def test_extracted_subnet_round_trips_save_pretrained(tmp_path) -> None:
    net = SuperLM.from_teacher(tiny_teacher(), SPACE).eval()
    arch = SubnetArch(1, 16, 2, 16)
    sub = net.extract(arch)
    sub.save_pretrained(tmp_path / "sub")
    back = transformers.AutoModel.from_pretrained(tmp_path / "sub").eval()
    ids, mask = batch()
    with torch.no_grad():
        a = sub(input_ids=ids, attention_mask=mask).last_hidden_state
        b = back(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b)
    assert back.config.intermediate_size == 16 and back.config.num_hidden_layers == 1


def test_flops_formula_matches_the_counter() -> None:
    net = SuperLM.from_teacher(tiny_teacher(), SPACE)
    ids, mask = batch()
    for arch in (SPACE.largest, SPACE.smallest):
        counted = count_flops(net.extract(arch), {"input_ids": ids, "attention_mask": mask})
        assert counted == arch_flops(arch, ids.shape[1])


def test_reordering_keeps_the_function_and_sorts_heads() -> None:
    teacher = tiny_teacher()
    state = reorder_by_importance(teacher)
    other = tiny_teacher(seed=5)
    other.load_state_dict(state)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            other(input_ids=ids, attention_mask=mask).last_hidden_state,
            teacher(input_ids=ids, attention_mask=mask).last_hidden_state,
            atol=1e-5,
            rtol=1e-5,
        )
    o = state["encoder.layer.0.attention.output.dense.weight"]
    norms = [o[:, j * 8 : (j + 1) * 8].norm() for j in range(4)]
    assert state["encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
    w_in, w_out = (
        state["encoder.layer.0.intermediate.dense.weight"],
        state["encoder.layer.0.output.dense.weight"],
    )
    importance = w_in.norm(dim=1) * w_out.norm(dim=0)
    assert torch.all(importance[:-1] >= importance[1:])
    assert len(norms) == 4
    reordered = SuperLM.from_teacher(teacher, SPACE, reorder=True)
    plain = SuperLM.from_teacher(teacher, SPACE)
    key = "encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(reordered.bert.state_dict()[key], plain.bert.state_dict()[key])


def test_range_outside_the_teacher_is_an_error() -> None:
    teacher = tiny_teacher()
    with pytest.raises(ProtegeError, match="beyond the teacher's hidden_size"):
        SuperLM.from_teacher(teacher, SubSpace("big", (2,), (64,), (4,), (1.0,)))
    with pytest.raises(ProtegeError, match="num_hidden_layers"):
        SuperLM.from_teacher(teacher, SubSpace("deep", (3,), (32,), (4,), (1.0,)))
    with pytest.raises(ProtegeError, match="intermediate"):
        SuperLM.from_teacher(teacher, SubSpace("fat", (2,), (32,), (4,), (4.0,)))
    with pytest.raises(ProtegeError, match="no architecture"):
        SubSpace("odd", (1,), (30,), (4,), (1.0,))


def test_teacher_without_bert_attention_is_an_error() -> None:
    with pytest.raises(ProtegeError, match="not a BERT-style encoder"):
        SuperLM.from_teacher(torch.nn.Linear(2, 2), SPACE)


def test_default_subspaces_scale_with_the_teacher() -> None:
    config = transformers.BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    base, small, tiny = default_subspaces(config)
    assert (base.name, small.name, tiny.name) == ("base", "small", "tiny")
    assert base.maxima.hidden == 384 and base.maxima.layers == 6 and base.maxima.intermediate == 1536
    assert tiny.maxima.hidden < small.maxima.hidden <= base.smallest.hidden + 96
    for s in (base, small, tiny):
        s.check_within(config)
    (whole,) = default_subspaces(config, k=1)
    assert len(whole.archs) > len(base.archs)
