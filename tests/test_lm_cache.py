"""The lm teacher-output cache: the top-k codec round trip, the cached divergences against the top-k
losses on live logits, and ``protege cache`` → ``protege distill`` on a tiny random LLaMA without
building the teacher; stale and truncated caches refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

import protege.tasks.lm as lm  # noqa: E402
from protege.analysis.runs import run  # noqa: E402
from protege.cli import app  # noqa: E402
from protege.config import load_config  # noqa: E402
from protege.engine.cache import TeacherCache  # noqa: E402
from protege.engine.lm_cache import _with_rest  # noqa: E402
from protege.engine.topk_codec import decode_topk, encode_topk
from protege.errors import ProtegeError  # noqa: E402
from protege.losses.sequence import EMPTY_LOGP, IGNORE_INDEX, TopKLogProbs, fkl, generalized_jsd, rkl  # noqa: E402
from test_lm import CONFIG, make_llama, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _top_k(n: int = 300, vocab: int = 5000, k: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3 - torch.arange(vocab) * 1e-3  # frequent low ids
    top, index = logits.log_softmax(-1).topk(k, dim=-1)
    return index, top


def test_codec_round_trip_fp16_is_lossless_up_to_fp16() -> None:
    index, logp = _top_k()
    ids, values, _ = decode_topk(encode_topk(index, logp, levels=None))
    assert values.dtype == torch.float16 and (values[:, :-1] >= values[:, 1:]).all()  # most likely first
    by_id, order = ids.long().sort(-1)
    want_id, want_order = index.sort(-1)
    assert torch.equal(by_id, want_id)
    assert torch.allclose(values.float().gather(-1, order), logp.gather(-1, want_order), rtol=1e-3, atol=1e-3)


def test_codec_quantized_keeps_sqrt_p_within_half_a_level() -> None:
    index, logp = _top_k(vocab=70_000)  # ranks and ids beyond uint16: 4-byte planes are exercised too
    levels = 64
    stream = encode_topk(index, logp, levels=levels)
    ids, values, _ = decode_topk(stream)
    root = logp.exp().sqrt()
    kept = root * levels >= 0.5
    for row in range(len(index)):
        got = {int(i): float(v) for i, v in zip(ids[row], values[row]) if v > EMPTY_LOGP / 2}
        want = {int(i): float(r) for i, r, keep in zip(index[row], root[row], kept[row]) if keep}
        assert got.keys() == want.keys()
        for i, r in want.items():
            assert abs(torch.tensor(got[i] / 2).exp().item() - r) <= 0.5 / levels + 1e-3
    raw = index.numel() * (4 + 2)
    assert stream["stream.payload"].numel() < raw / 2  # it compresses


@pytest.mark.parametrize("levels", [96, None])
def test_stored_rest_mass_keeps_the_reverse_kl_of_a_peaked_teacher(levels: int | None) -> None:
    """The top-k hold all but ~1e-5 of the teacher's mass; the quantization errors of 64 entries sum to
    more than that, so the entries alone leave no rest bucket where they sum to 1 (found by
    benchmarks/lm_losses.py: reverse KL from the cache exploded). The stored rest restores it."""
    g = torch.Generator().manual_seed(2)
    vocab, k, n = 1000, 64, 40
    teacher = torch.randn(n, vocab, generator=g)
    teacher[:, :k] += 14.0
    student = torch.randn(n, vocab, generator=g)  # puts most of its mass outside the teacher's top-k
    logp, index = teacher.log_softmax(-1).topk(k, dim=-1)
    true_rest = 1.0 - logp.double().exp().sum(-1)
    assert 1e-6 < true_rest.min() and true_rest.max() < 1e-4
    ids, values, log_rest = decode_topk(encode_topk(index, logp, levels=levels))
    assert torch.allclose(log_rest.double().exp(), true_rest, rtol=1e-2)
    target = torch.zeros(n, dtype=torch.long)
    live = rkl(student, teacher, target, top_k=k).item()
    rows_only = rkl(student, TopKLogProbs(ids.long(), values.float()), target).item()
    cached = rkl(student, TopKLogProbs(ids.long(), _with_rest(values.float(), log_rest)), target).item()
    assert cached == pytest.approx(live, rel=2e-2)
    assert abs(rows_only - live) > 0.3 * live  # what the entries alone give


def test_cached_divergences_equal_top_k_losses_on_live_logits() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g) * 2
    target = torch.randint(0, 40, (2, 5), generator=g)
    target[0, :2] = IGNORE_INDEX
    top, index = teacher.log_softmax(-1).topk(8, dim=-1)
    cached = TopKLogProbs(index, top)
    assert fkl(student, cached, target).item() == pytest.approx(
        fkl(student, teacher, target, top_k=8).item(), rel=1e-5
    )
    jsd = generalized_jsd(student, cached, target, beta=0.3)
    assert jsd.item() == pytest.approx(
        generalized_jsd(student, teacher, target, beta=0.3, top_k=8).item(), rel=1e-5
    )
    # empty slots change nothing: the same entries padded to 12 slots
    pad = TopKLogProbs(
        torch.cat([index, torch.zeros(2, 5, 4, dtype=torch.long)], -1),
        torch.cat([top, torch.full((2, 5, 4), EMPTY_LOGP)], -1),
    )
    assert fkl(student, pad, target).item() == pytest.approx(fkl(student, cached, target).item(), rel=1e-6)
    with pytest.raises(ValueError, match="T must be 1"):
        fkl(student, cached, target, T=2.0)


@pytest.fixture()
def tiny(tmp_path: Path) -> dict[str, Path]:
    tokenizer = make_tokenizer()
    teacher = make_llama(tmp_path / "teacher", tokenizer)
    corpus = tmp_path / "corpus.txt"
    import pydoc_data.topics

    corpus.write_text(" ".join(list(pydoc_data.topics.topics.values())[:20])[:8000])
    return {"root": tmp_path, "teacher": teacher, "corpus": corpus}


def _sets(tiny: dict[str, Path]) -> list[str]:
    return [
        f"teacher.model={tiny['teacher']}",
        f"data.root={tiny['corpus']}",
        "data.options.block_size=16",
        f"output_dir={tiny['root'] / 'runs'}",
        f"cache.path={tiny['root'] / 'cache'}",
        "cache.top_k=32",
        "epochs=2",
        "progress=false",
        "measure_cost=false",
    ]


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output[-3000:]


def test_distill_from_cache_never_builds_the_teacher(tiny, monkeypatch) -> None:
    sets = _sets(tiny)
    _cli("cache", str(CONFIG), *(a for s in sets for a in ("--set", s)))
    index = json.loads((tiny["root"] / "cache" / "index.json").read_text())
    assert index["task"] == "lm" and index["top_k"] == 32 and index["splits"]["train"]["tokens"] > 0

    built: list[str] = []
    real = lm._pretrained
    monkeypatch.setattr(lm, "_pretrained", lambda name, *a, **kw: built.append(name) or real(name, *a, **kw))
    summary = run(load_config(CONFIG, sets), "distill")
    assert built == []  # the student is built from the teacher's config only; the teacher never
    kls = [
        json.loads(line)["val/kl"]
        for line in (tiny["root"] / "runs" / "lm-tiny" / "metrics.jsonl").read_text().splitlines()
    ]
    assert kls[-1] < kls[0] and summary["test"]["best"]["agreement"] > 0

    # the cached fidelity metrics agree with the live teacher's on the same student (k = 32 of 128 tokens)
    online = run(
        load_config(
            CONFIG,
            [*sets[:-5], "cache=null", "epochs=2", "progress=false", "measure_cost=false", "name=online"],
        ),
        "distill",
    )
    assert online["test"]["best"]["agreement"] == pytest.approx(
        summary["test"]["best"]["agreement"], abs=0.05
    )


def test_stale_and_truncated_caches_are_refused(tiny) -> None:
    sets = _sets(tiny)
    _cli("cache", str(CONFIG), *(a for s in sets for a in ("--set", s)))
    cfg = load_config(CONFIG, sets)
    shard = (
        tiny["root"]
        / "cache"
        / json.loads((tiny["root"] / "cache" / "index.json").read_text())["splits"]["train"]["shards"][0][
            "file"
        ]
    )
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ProtegeError, match="truncated"):
        run(cfg, "distill")
    shard.write_bytes(blob)
    assert TeacherCache.open(tiny["root"] / "cache").index["task"] == "lm"

    make_llama(tiny["teacher"], make_tokenizer(), seed=1)  # the teacher's weights change
    with pytest.raises(
        ProtegeError, match=r"stale(.|\n)*teacher 0's model files changed \(model.safetensors"
    ):
        run(cfg, "distill")
