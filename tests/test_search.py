"""Search spaces, regularized evolution under budgets, rank statistics, the search runner and CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from protege.build import build_from, load_run_data
from protege.cli import app
from protege.config import load_config
from protege.errors import ProtegeError
from protege.models import build_model
from protege.search import (
    Budget,
    Candidate,
    CandidateScorer,
    ModelListSpace,
    MultiplierSpace,
    NB201Space,
    ResNetDepthSpace,
    aggregate,
    correlate,
    kendall_tau,
    load_search_config,
    pareto_front,
    random_search,
    rank_correlations,
    regularized_evolution,
    search,
    spearman_rho,
    validate_search_config,
)
from protege.search.proxies import get_proxy
from protege.search.spaces import NB201Cell, parse_nb201

TINY = [4, 4, 8, 8]
ROOT = Path(__file__).resolve().parents[1]


def _batch(n: int = 8, chans: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, chans, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _scorer(space, budget: Budget, proxy: str = "params", teacher=None) -> CandidateScorer:
    return CandidateScorer(space, get_proxy(proxy), teacher, [_batch()], budget, num_classes=10, in_chans=1)


# --------------------------------------------------------------------------- spaces


def test_resnet_depth_space_samples_mutates_and_builds():
    space = ResNetDepthSpace(widths=TINY)
    archs = list(space.enumerate())
    assert space.size == 64 and len({space.encode(a) for a in archs}) == 64
    rng = random.Random(0)
    for _ in range(20):
        arch = space.sample(rng)
        child = space.mutate(arch, rng)
        assert sum(a != b for a, b in zip(arch, child)) == 1
        assert all(d in (1, 3, 5, 7) for d in child)
        assert space.decode(space.encode(child)) == child
    model = space.build((1, 5, 7), num_classes=10, in_chans=1)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [1, 5, 7]
    assert model(_batch()[0]).shape == (8, 10)
    assert model.feature_modules == ["layer1", "layer2", "layer3"] and model.classifier_name == "fc"
    # depths (3, 3, 3) is the zoo's ResNet-20 module for module
    ours = space.build((3, 3, 3), 10, 1).state_dict()
    zoo = build_model("resnet20", num_classes=10, in_chans=1, widths=TINY).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in zoo.items()}
    with pytest.raises(ProtegeError, match="not in this space"):
        space.decode("2-2-2")


def test_nb201_space_has_15625_unique_cells_that_round_trip():
    space = NB201Space(channels=4, cells_per_stage=1)
    ids = [space.encode(a) for a in space.enumerate()]
    assert space.size == 15_625 and len(set(ids)) == 15_625
    assert ids[0] == "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    rng = random.Random(1)
    arch = space.sample(rng)
    assert parse_nb201(space.encode(arch)) == arch
    child = space.mutate(arch, rng)
    assert sum(a != b for a, b in zip(arch, child)) == 1
    for bad in ("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|", "|none~0|+|none~0|", "|none~1|+|x|"):
        with pytest.raises(ProtegeError, match="NB201 cell"):
            parse_nb201(bad)


def test_nb201_cell_is_the_hand_written_dag():
    x = torch.randn(2, 3, 6, 6)
    skip = NB201Cell(["skip_connect"] * 6, 3)
    # n1 = x, n2 = x + n1 = 2x, n3 = x + n1 + n2 = 4x
    torch.testing.assert_close(skip(x), 4 * x)
    ops = ("nor_conv_3x3", "none", "skip_connect", "avg_pool_3x3", "nor_conv_1x1", "skip_connect")
    cell = NB201Cell(ops, 3).eval()
    e = cell.edges
    n1 = e["0_1"](x)
    n2 = 0 * x + n1
    pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    n3 = pooled + e["1_3"](n1) + n2
    torch.testing.assert_close(cell(x), n3)
    assert isinstance(e["0_1"][1], torch.nn.Conv2d) and e["0_1"][1].kernel_size == (3, 3)
    assert isinstance(e["0_1"][0], torch.nn.ReLU)  # ReLU-Conv-BN


def test_nb201_net_builds_by_name_with_metadata():
    cell = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    net = build_model("nb201", num_classes=10, in_chans=1, cell=cell, channels=4, cells_per_stage=2, stages=3)
    assert net(_batch()[0]).shape == (8, 10)
    assert len(net.stage1) == 2 and net.stage3[0].edges["0_1"][1].in_channels == 16
    for path in net.feature_modules:
        net.get_submodule(path)
    assert net.feature_modules[-1] == "lastact" and net.classifier_name == "classifier"
    with pytest.raises(ProtegeError, match="NB201 cell"):
        build_model("nb201", num_classes=10, cell="|nope~0|")


@pytest.mark.parametrize("size", [14, 15, 16])
def test_nb201_net_takes_odd_feature_map_sizes(size: int):
    # 14 -> 7 -> 4: the reduction block's pooled shortcut must round up like its strided conv
    cell = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    net = build_model("nb201", num_classes=10, in_chans=1, cell=cell, channels=4, cells_per_stage=1, stages=3)
    assert net(torch.randn(2, 1, size, size)).shape == (2, 10)
    reduce = net.reduce2
    x = torch.ones(1, reduce.downsample[1].in_channels, 7, 7)
    assert reduce.downsample[0](x).shape[-1] == 4 and torch.allclose(reduce.downsample[0](x), torch.ones(1))


def test_model_list_and_multiplier_spaces():
    space = ModelListSpace(["resnet8", "resnet14"], kwargs={"widths": TINY})
    rng = random.Random(0)
    assert space.mutate("resnet8", rng) == "resnet14"
    assert space.build("resnet14", 10, 1)(_batch()[0]).shape == (8, 10)
    mult = MultiplierSpace("resnet20", width=[0.5, 1.0], depth=[1 / 3, 1.0])
    assert mult.size == 4
    assert mult.model_spec((0.5, 1 / 3)) == {
        "model": "resnet_depth",
        "kwargs": {"depths": [1, 1, 1], "widths": [8, 8, 16, 32]},
    }
    small, big = (mult.build(a, 10, 1) for a in [(0.5, 1 / 3), (1.0, 1.0)])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())
    assert len(big.layer2) == 3
    assert MultiplierSpace("mobilenetv2", width=[0.5]).model_spec((0.5, 1.0))["kwargs"] == {
        "width_mult": 0.25
    }
    with pytest.raises(ProtegeError, match="no width to multiply"):
        MultiplierSpace("vgg8", width=[0.5, 1.0])
    with pytest.raises(ProtegeError, match="no 'depths'"):
        MultiplierSpace("mobilenetv2", width=[1.0], depth=[0.5, 1.0])


# --------------------------------------------------------------------------- search algorithms


def _fake(space, score, fail=lambda arch: False):
    """An evaluator without models: a known score per architecture."""

    def evaluate(arch, index):
        if fail(arch):
            return Candidate(index, space.encode(arch), arch, "failed", error="RuntimeError: boom")
        return Candidate(index, space.encode(arch), arch, "scored", score=score(arch), params=sum(arch))

    return evaluate


def test_regularized_evolution_mutates_tournament_winners_and_is_deterministic():
    space = ResNetDepthSpace(widths=TINY)
    evaluate = _fake(space, lambda a: -abs(a[0] - 5) - abs(a[1] - 3) - abs(a[2] - 7))
    budget = Budget(max_candidates=20)
    runs = [
        regularized_evolution(space, evaluate, budget, population=5, sample=2, seed=s, progress=False)
        for s in (0, 0, 1)
    ]
    ids = [[c.id for c in h.candidates] for h in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    hist = runs[0]
    assert hist.counts()["scored"] == 20 and hist.stop == "max_candidates"
    # after the initial population, each new candidate is a one-gene mutation of an earlier one
    for i, cand in enumerate(hist.candidates[5:], start=5):
        assert any(sum(a != b for a, b in zip(cand.arch, p.arch)) == 1 for p in hist.candidates[:i])
    assert [c.score for c in hist.ranked] == sorted((c.score for c in hist.candidates), reverse=True)
    assert hist.best.id == max(hist.candidates, key=lambda c: c.score).id


def test_random_search_exhausts_a_finite_space_once():
    space = ResNetDepthSpace(choices=[1, 2], widths=TINY)
    hist = random_search(
        space, _fake(space, lambda a: float(sum(a))), Budget(max_candidates=100), progress=False
    )
    assert len(hist.candidates) == 8 and hist.stop == "space exhausted"
    assert hist.best.id == "2-2-2"


def test_budgets_are_respected_and_the_winner_is_the_best_in_budget():
    space = ResNetDepthSpace(choices=[1, 2], widths=TINY)
    sizes = {
        space.encode(a): sum(p.numel() for p in space.build(a, 10, 1).parameters()) for a in space.enumerate()
    }
    limit = sorted(sizes.values())[4]
    budget = Budget(max_params=limit, max_candidates=8)
    hist = random_search(space, _scorer(space, budget), budget, seed=3, progress=False)
    over = [c for c in hist.candidates if c.status == "over_budget"]
    assert all(c.params > limit and c.reason == "max_params" for c in over) and over
    assert all(c.params <= limit for c in hist.ranked)
    # with the "params" proxy the winner is the biggest model under budget
    assert hist.best.params == max(v for v in sizes.values() if v <= limit)
    flops_budget = Budget(max_flops=min(c.flops for c in hist.ranked) + 1, max_candidates=8)
    hist = random_search(space, _scorer(space, flops_budget), flops_budget, progress=False)
    assert len(hist.ranked) >= 1 and all(c.flops <= flops_budget.max_flops for c in hist.ranked)
    assert {c.reason for c in hist.candidates if c.status == "over_budget"} == {"max_flops"}


def test_a_crashing_candidate_is_recorded_and_the_search_goes_on():
    space = ResNetDepthSpace(choices=[1, 2], widths=TINY)

    class Flaky(ResNetDepthSpace):
        def build(self, arch, num_classes, in_chans):
            if arch[0] == 2:
                raise RuntimeError("cannot build this one")
            return super().build(arch, num_classes, in_chans)

    flaky = Flaky(choices=[1, 2], widths=TINY)
    budget = Budget(max_candidates=8)
    hist = random_search(flaky, _scorer(flaky, budget), budget, progress=False)
    failed = [c for c in hist.candidates if c.status == "failed"]
    assert len(failed) == 4 and all("cannot build this one" in c.error for c in failed)
    assert len(hist.ranked) == 4 and all(c.arch[0] == 1 for c in hist.ranked)
    # everything failing alike stops early with the error itself
    with pytest.raises(ProtegeError, match="first 5 candidates all failed.*boom"):
        random_search(space, _fake(space, sum, fail=lambda a: True), Budget(max_candidates=8), progress=False)


def test_an_impossible_budget_names_the_tightest_limit_and_smallest_cost():
    space = ResNetDepthSpace(choices=[1, 2], widths=TINY)
    budget = Budget(max_params=100, max_candidates=4)
    smallest = sum(p.numel() for p in space.build((1, 1, 1), 10, 1).parameters())
    with pytest.raises(
        ProtegeError, match=rf"max_params=100 rejected 8 of 8.*smallest seen has {smallest:,}"
    ):
        regularized_evolution(space, _scorer(space, budget), budget, population=2, sample=2, progress=False)
    with pytest.raises(ProtegeError, match="max_candidates"):
        Budget(max_candidates=0)


# --------------------------------------------------------------------------- rank statistics


def test_kendall_and_spearman_on_a_hand_example():
    scores, truth = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # one discordant pair of six: tau = (5 - 1) / 6; rho = 1 - 6 * (1 + 1) / (4 * 15)
    assert kendall_tau(scores, truth) == pytest.approx(2 / 3)
    assert spearman_rho(scores, truth) == pytest.approx(0.8)
    assert rank_correlations(scores, [-t for t in truth])["kendall"] == pytest.approx(-2 / 3)
    both = correlate({"a": 1, "b": 2, "c": 3, "x": 9}, {"a": 10, "b": 30, "c": 20})
    assert both["n"] == 3 and both["kendall"] == pytest.approx(1 / 3)
    agg = aggregate([{"kendall": 0.5}, {"kendall": 0.7}])
    assert agg["kendall"]["mean"] == pytest.approx(0.6) and agg["kendall"]["std"] == pytest.approx(
        0.2 / 2**0.5
    )
    with pytest.raises(ProtegeError, match="length"):
        kendall_tau([1, 2], [1, 2, 3])


def test_pareto_front_on_a_hand_example():
    points = [(1.0, 0.1), (2.0, 0.5), (2.0, 0.3), (3.0, 0.4), (4.0, 0.9)]
    assert pareto_front(points) == [0, 1, 4]


# --------------------------------------------------------------------------- runner and CLI


def _config(tmp_path: Path, **extra) -> dict:
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp_path / "out"),
        "data": {"source": "digits"},
        "teacher": {"model": "resnet_depth", "kwargs": {"depths": [2, 2, 2], "widths": [8, 8, 16, 16]}},
        "space": {"kind": "resnet_depth", "choices": [1, 2], "widths": TINY},
        "proxy": "diswot",
        "batch_size": 8,
        "budget": {"max_candidates": 4},
        "algorithm": {"name": "evolution", "population": 2, "sample": 2},
        "latency_top": 1,
        "progress": False,
        "distill": {"epochs": 1, "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9}]},
    }
    cfg.update(extra)
    return cfg


def test_search_writes_json_plot_and_a_distill_config_that_builds_the_winner(tmp_path):
    cfg = validate_search_config(_config(tmp_path))
    result = search(cfg)
    out = tmp_path / "out" / "tiny"
    summary = json.loads((out / "search.json").read_text())
    assert summary["counts"]["scored"] == 4 and summary["proxy"] == "diswot"
    scores = [c["score"] for c in summary["ranked"]]
    assert scores == sorted(scores, reverse=True) and summary["best"]["id"] == summary["ranked"][0]["id"]
    assert summary["ranked"][0]["latency_ms"] > 0 and summary["candidates_per_minute"] > 0
    assert set(summary["pareto"]["ids"]) <= {c["id"] for c in summary["ranked"]}
    assert all(c["params"] and c["flops"] for c in summary["candidates"])
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*tmp*")), "atomic writes leave no temp files"
    run_cfg = load_config(out / "distill.yaml")
    assert run_cfg.student.model == "resnet_depth" and run_cfg.student.kwargs["depths"] == list(
        result.best.arch
    )
    assert run_cfg.teacher.model == "resnet_depth"
    winner = build_from(run_cfg.student, load_run_data(run_cfg))
    assert sum(p.numel() for p in winner.parameters()) == result.best.params
    # the same seed gives the same search
    again = search(cfg, out_dir=tmp_path / "again")
    assert [(c.id, c.score) for c in again.history.candidates] == [
        (c.id, c.score) for c in result.history.candidates
    ]


def test_search_then_distill_the_winner(tmp_path):
    cfg = validate_search_config(_config(tmp_path, proxy="params", budget={"max_candidates": 2}))
    result = search(cfg, distill=True)
    assert result.distill_summary is not None and result.distill_summary["status"] == "completed"
    assert (result.run_config.run_dir / "summary.json").is_file()


def test_search_config_errors_are_clear(tmp_path):
    with pytest.raises(ProtegeError, match="did you mean 'max_params'"):
        validate_search_config(_config(tmp_path, budget={"max_param": 10}))
    with pytest.raises(ProtegeError, match="kind must be one of"):
        validate_search_config(_config(tmp_path, space={"kind": "resnet"}))
    with pytest.raises(ProtegeError, match="come from the search itself"):
        validate_search_config(_config(tmp_path, distill={"student": {"model": "resnet8"}}))
    with pytest.raises(ProtegeError, match="teacher"):
        search(validate_search_config(_config(tmp_path, teacher=None)))
    with pytest.raises(ProtegeError, match="diswot"):
        search(validate_search_config(_config(tmp_path, proxy="diswt")))


def test_example_search_config_validates():
    cfg = load_search_config(ROOT / "configs" / "search" / "resnet20-depth.yaml")
    assert cfg.space.kind == "resnet_depth" and cfg.space.build().size == 64
    assert cfg.run_config({"model": "resnet_depth", "kwargs": {"depths": [1, 3, 5]}}).terms[1].loss == "kd"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protege.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_search_end_to_end(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, proxy="flops")))
    args = ["search", str(path), "--set", "budget.max_flops=1e9", "--out", str(tmp_path / "cli")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 scored" in result.output and (tmp_path / "cli" / "distill.yaml").is_file()
    summary = json.loads((tmp_path / "cli" / "search.json").read_text())
    assert summary["budget"]["max_flops"] == 1_000_000_000 and summary["proxy"] == "flops"
    # a user mistake: one message, exit status 2, no traceback
    bad = _cli(
        "search", str(path), "--set", "budget.max_params=10", "--out", str(tmp_path / "bad"), cwd=tmp_path
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "no candidate meets the budget" in bad.stderr.replace("\n", " ")
