"""KD³ on a proxy pool: instance selection (α schedule, FlexMatch thresholds, sampler), the
alignment and contrast losses, MixDistribution, and a proxy run that resumes exactly."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import ConcatDataset

import protege as pg
from protege.build import build_distiller, load_run_data
from protege.config import ProxyConfig, validate_config
from protege.data.splits import TensorImageDataset
from protege.errors import ProtegeError
from protege.losses.contrastive import KD3ContrastHeads, kd3_contrast, nt_xent
from protege.losses.registry import BuildContext
from protege.losses.reuse import kd3_align, simkd
from protege.strategies.proxy import (
    InstanceSelection,
    MixDistributionViews,
    SelectionSampler,
    alpha_at,
    class_thresholds,
    flexmatch_thresholds,
    mix_distribution,
    pool_domains,
    proxy_training,
    select_instances,
)

# --------------------------------------------------------------------------- selection math


def test_alpha_schedule_values() -> None:
    assert [alpha_at(e, 5) for e in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert alpha_at(1, 3, 0.9, 0.5) == pytest.approx(0.7)
    # cosine at t = 1/4: 0 + 1 * (1 + cos(pi/4)) / 2
    assert alpha_at(1, 5, schedule="cosine") == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert alpha_at(2, 5, schedule="cosine") == pytest.approx(0.5)
    assert alpha_at(1, 3, 1.0, 0.25, "exponential") == pytest.approx(0.5)  # 1 * 0.25^(1/2)
    assert alpha_at(0, 1, 0.8, 0.1) == 0.8  # one epoch: the start value
    with pytest.raises(ValueError, match="outside"):
        alpha_at(3, 3)
    with pytest.raises(ValueError, match="above 0"):
        alpha_at(0, 3, 1.0, 0.0, "exponential")


def test_flexmatch_thresholds_on_hand_counts() -> None:
    counts = torch.tensor([8, 4, 0, 2])
    # warm-up: max(8, 6 unconfident) = 8 -> beta = [1, 1/2, 0, 1/4]; M(x) = x / (2 - x)
    assert flexmatch_thresholds(counts, 6, 0.9).tolist() == pytest.approx([0.9, 0.3, 0.0, 0.9 / 7])
    # 10 unconfident dominate: beta = [0.8, 0.4, 0, 0.2] -> M = [2/3, 1/4, 0, 1/9]
    assert flexmatch_thresholds(counts, 10, 0.9).tolist() == pytest.approx([0.6, 0.225, 0.0, 0.1])
    assert flexmatch_thresholds(counts, 10, 0.9, warmup=False).tolist() == pytest.approx(
        [0.9, 0.3, 0.0, 0.9 / 7]
    )
    assert flexmatch_thresholds(counts, 10, 0.9, mapping="linear").tolist() == pytest.approx(
        [0.72, 0.36, 0.0, 0.18]
    )
    assert flexmatch_thresholds(torch.zeros(3, dtype=torch.long), 0, 0.9).tolist() == [0.0, 0.0, 0.0]


def test_class_thresholds_count_confident_predictions() -> None:
    probs = torch.tensor(
        [[0.97, 0.03, 0.0], [0.96, 0.04, 0.0], [0.02, 0.98, 0.0], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    )
    # sigma = [2, 1, 0], 2 unconfident: beta = [1, 1/2, 0]
    assert class_thresholds(probs, 0.95).tolist() == pytest.approx([0.95, 0.95 / 3, 0.0])
    assert class_thresholds(probs, 0.95, adaptive=False).tolist() == pytest.approx([0.95] * 3)
    mask, fallback = select_instances(probs, class_thresholds(probs, 0.95), 0.1)
    assert mask.tolist() == [True, True, True, False, True] and not fallback


def test_selection_falls_back_to_the_most_confident_share() -> None:
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.3, 0.7], [0.55, 0.45]])
    mask, fallback = select_instances(probs, class_thresholds(probs, 0.99, adaptive=False), 0.4)
    assert fallback and mask.tolist() == [False, True, False, True, False]


# --------------------------------------------------------------------------- selection on a pool


def _prototype_pool(per_class: list[int], n_noise: int) -> tuple[TensorImageDataset, nn.Module, torch.Tensor]:
    """Class prototypes (unit-norm, zero-mean 8x8 patterns) with small perturbations, then
    low-amplitude noise images; a linear teacher with the prototypes as its weights."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(len(per_class), 64, generator=g)
    protos = protos - protos.mean(1, keepdim=True)
    protos = protos / protos.norm(dim=1, keepdim=True)
    images, labels = [], []
    for c, n in enumerate(per_class):
        images.append(protos[c] + 0.02 * torch.randn(n, 64, generator=g))
        labels += [c] * n
    images.append(0.02 * torch.rand(n_noise, 64, generator=g))
    labels += [-1] * n_noise
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, len(per_class), bias=False))
    teacher[1].weight.data = 30 * protos
    pool = TensorImageDataset(torch.cat(images).view(-1, 1, 8, 8), torch.tensor(labels))
    return pool, teacher, torch.tensor(labels)


def test_selection_keeps_prototypes_and_drops_noise() -> None:
    per_class = [12, 10, 7, 10]
    pool, teacher, labels = _prototype_pool(per_class, n_noise=8)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    distiller = pg.Distiller(student, teacher, [pg.kd(1.0)])
    with torch.no_grad():  # the setup's premise: prototypes confident, noise not
        p = teacher(pool.images).softmax(-1).max(1).values
    assert bool((p[labels >= 0] > 0.99).all()) and bool((p[labels < 0] < 0.4).all())
    pool.domains = (labels < 0).long()  # tagged as a pool source may tag its parts
    pool.domain_names = ("prototypes", "noise")
    sampler = SelectionSampler(pool, seed=0)
    settings = ProxyConfig(pool={"source": "digits"}, threshold=0.95)
    domains = pool_domains(ConcatDataset([pool, TensorImageDataset(torch.zeros(0, 1, 8, 8), labels[:0])]))
    assert domains is not None and torch.equal(domains[0], pool.domains)
    selection = InstanceSelection(pool, sampler, settings, 3, 4, batch_size=16, domains=domains)
    distiller.train()
    selection.on_epoch_start(distiller, 0)  # alpha = 1: the teacher's prediction alone
    assert sampler.kept.tolist() == (labels >= 0).nonzero().squeeze(1).tolist()
    record: dict[str, Any] = {}
    selection.on_epoch_end(distiller, 0, record)
    assert record["proxy/kept"] == sum(per_class) and record["proxy/fallback"] == 0
    assert [record[f"proxy/kept_c{c}"] for c in range(4)] == per_class
    assert record["proxy/in_dist_share"] == 1.0 and record["proxy/pseudo_acc"] == 1.0
    assert record["proxy/pool_in_dist_share"] == pytest.approx(sum(per_class) / len(pool))
    assert record["proxy/alpha"] == 1.0
    assert (record["proxy/kept_prototypes"], record["proxy/kept_noise"]) == (sum(per_class), 0)
    assert student.training and not teacher.training  # modes restored


def test_sampler_draws_a_fixed_number_reproducibly() -> None:
    pool = TensorImageDataset(torch.zeros(20, 1, 2, 2), torch.zeros(20, dtype=torch.long))
    sampler = SelectionSampler(pool, seed=3)
    sampler.num_samples = 7
    sampler.kept = torch.tensor([2, 5, 11])
    sampler.set_epoch(1)
    first = list(sampler)
    assert len(first) == 7 == len(sampler) and set(first) == {2, 5, 11}
    assert sorted(first).count(2) in (2, 3)  # cycled through reshuffled copies
    assert list(sampler) == first
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.kept = torch.arange(20)
    assert len(set(sampler)) == 7  # enough kept: no repeats


# --------------------------------------------------------------------------- MixDistribution


def test_mix_distribution_keeps_shapes_and_mixes_statistics() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3.0
    lam = torch.tensor([0.0, 0.3, 0.7, 1.0])
    perm = torch.tensor([2, 0, 3, 1])
    out = mix_distribution(x, lam, perm, eps=0.0)
    assert out.shape == x.shape
    mu, sd = x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)
    lam_ = lam.view(4, 1)
    assert torch.allclose(out.mean(dim=(2, 3)), lam_ * mu + (1 - lam_) * mu[perm], atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), lam_ * sd + (1 - lam_) * sd[perm], atol=1e-5)
    assert torch.allclose(out[3], x[3], atol=1e-5)  # lambda = 1: the instance's own statistics
    with pytest.raises(ValueError, match="N, C, H, W"):
        mix_distribution(torch.zeros(2, 3), lam[:2], perm[:2])


def test_mixdistribution_views_double_the_batch_reproducibly() -> None:
    distiller = pg.Distiller(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), None, [pg.ce()])
    x = torch.randn(3, 1, 2, 2)
    batch = (x, torch.full((3,), -1), {"index": torch.tensor([4, 0, 7])})
    views = MixDistributionViews(beta=0.1, seed=5)
    xs, ys, meta = views.on_batch(distiller, batch, epoch=2, step=1)
    assert xs.shape == (6, 1, 2, 2) and torch.equal(xs[:3], x) and ys.tolist() == [-1] * 6
    assert meta["index"].tolist() == [4, 0, 7, 4, 0, 7]
    assert torch.equal(views.on_batch(distiller, batch, 2, 1)[0], xs)
    assert not torch.equal(views.on_batch(distiller, batch, 2, 2)[0], xs)


# --------------------------------------------------------------------------- losses


def _np_nt_xent(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for k in range(n2):
        partner = (k + n2 // 2) % n2
        denominator = sum(math.exp(z[k] @ z[m] / tau) for m in range(n2) if m != k)
        total += -math.log(math.exp(z[k] @ z[partner] / tau) / denominator)
    return total / n2


def test_nt_xent_matches_hand_computation() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[0.9, 0.1], [-0.2, 1.0], [0.5, -1.0]])
    value = nt_xent(torch.tensor(a), torch.tensor(b), temperature=0.5)
    assert value.item() == pytest.approx(_np_nt_xent(a, b, 0.5), rel=1e-6)
    # by hand for one pair of orthogonal... a = [e1], b = [e1]: one row's only other row is its partner
    assert nt_xent(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.zeros(2, 3), torch.zeros(3, 3))


def test_kd3_align_matches_hand_value() -> None:
    head = nn.Linear(2, 2, bias=False)
    head.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # vectors (N, D): maps of size 1x1
    t = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # sample 0: z_s = [1, 0], z_t = [0, 0]: p_s = [e/(1+e), 1/(1+e)], p_t = [1/2, 1/2]
    g0 = abs(math.e / (1 + math.e) - 0.5)  # = TV distance (1/2 * two equal gaps)
    # sample 1: z_s = [0, 0], z_t = [0, 2]: TV = |1/2 - 1/(1+e^2)|
    g1 = abs(0.5 - 1 / (1 + math.e**2))
    mse0, mse1 = (1.0 + 0.0) / 2, (0.0 + 4.0) / 2
    expected = ((1 + g0) * mse0 + (1 + g1) * mse1) / 2
    value = kd3_align(s, t, projector=nn.Identity(), head=head, kd=0.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)

    # plus KD on the deployed prediction, by hand at kd_T = 2 (kd * kd_T^2 * mean_i KL(q_t,i || q_s,i))
    def softmax2(a: float, b: float) -> list[float]:
        ea, eb = math.exp(a), math.exp(b)
        return [ea / (ea + eb), eb / (ea + eb)]

    def kl(p: list[float], q: list[float]) -> float:
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    kl0 = kl(softmax2(0, 0), softmax2(0.5, 0))  # z_t = [0, 0], z_s = [1, 0], over kd_T = 2
    kl1 = kl(softmax2(0, 1), softmax2(0, 0))  # z_t = [0, 2], z_s = [0, 0]
    with_kd = kd3_align(s, t, projector=nn.Identity(), head=head, kd=0.5, kd_T=2.0)
    assert with_kd.item() == pytest.approx(expected + 0.5 * 4 * (kl0 + kl1) / 2, rel=1e-6)
    # the KD part trains what the student deploys: gradient reaches the projected feature
    s_grad = s.clone().requires_grad_(True)
    kd3_align(s_grad, t, projector=nn.Identity(), head=head, kd=1.0).backward()
    assert s_grad.grad is not None and s_grad.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kd must be"):
        kd3_align(s, t, projector=nn.Identity(), head=head, kd=-1.0)
    # when the predictions agree the weights are 1 and the KL is 0: SimKD's MSE
    agree = nn.Linear(2, 2)
    agree.weight.data.zero_()
    same = kd3_align(s, t, projector=nn.Identity(), head=agree)
    assert same.item() == pytest.approx(simkd(s, t, projector=nn.Identity()).item())


def test_kd3_contrast_pairs_views_across_networks() -> None:
    torch.manual_seed(0)
    heads = KD3ContrastHeads(feat_dim=4)
    s, t = torch.randn(6, 5), torch.randn(6, 3, 2, 2)
    heads.build(s, t, BuildContext())
    index = torch.tensor([3, 1, 8, 3, 1, 8])
    value = kd3_contrast(s, t, index=index, heads=heads, temperature=0.3)
    es, et = heads.embed(s, t)
    expected = 0.5 * (nt_xent(es[:3], et[3:], 0.3) + nt_xent(es[3:], et[:3], 0.3))
    assert value.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="MixDistribution views"):
        kd3_contrast(s, t, index=torch.arange(6), heads=heads)
    rebuilt = KD3ContrastHeads(feat_dim=4)
    rebuilt.load_state_dict(heads.state_dict())
    assert not rebuilt.pending and torch.equal(rebuilt.embed(s, t)[0], es)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: Any) -> str:
    """A small digits teacher, trained for one epoch (a random one would keep the whole pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to a busy box
    torch.manual_seed(0)
    data = pg.load_data("digits")
    teacher = pg.build_model("cnn_m", num_classes=10, in_chans=1, widths=[4, 8, 8])
    opt = torch.optim.Adam(teacher.parameters(), lr=0.02)
    for x, y in torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(teacher.state_dict(), str(path))
    return str(path)


def _config(tmp_path: Any, name: str, teacher: str | None = None, **proxy: Any) -> Any:
    return validate_config(
        {
            "name": name,
            "output_dir": str(tmp_path),
            "data": {
                "source": "digits",
                "batch_size": 32,
                "strategy": "proxy",
                "proxy": {"pool": {"source": "digits"}, "samples_per_epoch": 96, **proxy},
            },
            "teacher": {"model": "cnn_m", "weights": teacher, "kwargs": {"widths": [4, 8, 8]}},
            "student": {"model": "cnn_m", "kwargs": {"widths": [4, 4, 8]}},
            "terms": [
                {"loss": "kd", "weight": 1.0, "T": 4},
                {"loss": "kd3_align", "weight": 1.0, "student": "fc:in", "teacher": "fc:in", "head": "fc"},
                {
                    "loss": "kd3_contrast",
                    "weight": 0.1,
                    "student": "fc:in",
                    "teacher": "fc:in",
                    "feat_dim": 8,
                },
            ],
            "epochs": 2,
            "progress": False,
            "measure_cost": False,
        }
    )


def _metrics(cfg: Any) -> list[dict[str, Any]]:
    lines = [json.loads(ln) for ln in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k != "time_s"} for ln in lines]


def test_proxy_run_logs_selection_and_resumes_exactly(
    tmp_path: Any, monkeypatch: Any, one_thread: Any, teacher_file: str
) -> None:
    # a fixed threshold, and at the last epoch half the vote to the barely trained student: the
    # selection keeps a part of the pool that changes from epoch to epoch
    settings = {"adaptive": False, "threshold": 0.6, "alpha_end": 0.5}
    straight = _config(tmp_path, "straight", teacher_file, **settings)
    pg.run(straight, report=False)
    metrics = _metrics(straight)
    assert len(metrics) == 2 and all(0 < m["proxy/kept"] < 1257 for m in metrics)  # the pool: 1257
    assert sum(metrics[0][f"proxy/kept_c{c}"] for c in range(10)) == metrics[0]["proxy/kept"]
    assert metrics[0]["proxy/alpha"] == 1.0 and metrics[1]["proxy/alpha"] == 0.5
    assert metrics[0]["step"] == 3  # 96 samples per epoch in batches of 32, whatever is kept

    resumed = _config(tmp_path, "resumed", teacher_file, **settings)
    from protege import pipeline

    monkeypatch.setattr(pipeline, "fit", functools.partial(pg.fit, stop_after_epochs=1))
    pg.run(resumed, report=False)  # interrupted after the first epoch
    monkeypatch.undo()
    assert len(_metrics(resumed)) == 1
    pg.run(resumed, resume=True, report=False)
    assert _metrics(resumed) == metrics


def test_proxy_training_switches_components(tmp_path: Any) -> None:
    cfg = _config(tmp_path, "parts", selection=False)
    cfg.terms = cfg.terms[:1]  # KD only
    data = load_run_data(cfg)
    distiller = build_distiller(cfg, data)
    loader, callbacks = proxy_training(cfg, data, distiller)
    assert callbacks == [] and len(loader) == 3
    assert loader.sampler.kept.tolist() == list(range(len(data.train)))  # the whole pool
    x, y, meta = next(iter(loader))
    assert y.tolist() == [-1] * 32 and meta["index"].shape == (32,)  # no pool label reaches training
    full = _config(tmp_path, "full")
    _, callbacks = proxy_training(full, data, build_distiller(full, data))
    assert [type(c) for c in callbacks] == [InstanceSelection, MixDistributionViews]


def test_pool_of_another_shape_is_refused(tmp_path: Any) -> None:
    cfg = _config(tmp_path, "bad")
    cfg.data.proxy.pool.source = "mnist5k"
    data = load_run_data(cfg)
    with pytest.raises(ProtegeError, match=r"28x28.*8x8.*size"):
        proxy_training(cfg, data, build_distiller(cfg, data))
