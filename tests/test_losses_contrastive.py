"""CRD: the NCE math against hand values and float64 numpy loops, the momentum memory bank, and
the bank's life in a Distiller and across a checkpoint/resume of ``protege.fit``.

The references are plain loops over samples, negatives and embedding coordinates, written from the
paper's and RepDistiller's formulas, sharing no code path with the implementation.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

import protege as pg
from protege.config import load_config
from protege.core.distiller import Term
from protege.engine.checkpoint import checkpoint_dir
from protege.engine.options import TrainConfig
from protege.errors import ProtegeError
from protege.losses import BuildContext, get_loss, list_losses
from protege.losses.contrastive import CRDMemory, crd, crd_nce, crd_normalizer, pool_features
from references import rand, t64

N_DATA, FEAT, K = 64, 8, 16


# --------------------------------------------------------------------------- references (loops)


def np_contrast(scores: np.ndarray, Z: float, n_data: int, T: float, eps: float = 1e-7) -> float:
    """RepDistiller's ContrastLoss on exp(scores / T) / Z, one sample and one negative at a time."""
    n, cols = scores.shape
    m = cols - 1
    pn = 1.0 / n_data
    total = 0.0
    for i in range(n):
        p_pos = math.exp(scores[i, 0] / T) / Z
        total += math.log(p_pos / (p_pos + m * pn + eps))
        for j in range(1, cols):
            p_neg = math.exp(scores[i, j] / T) / Z
            total += math.log(m * pn / (p_neg + m * pn + eps))
    return -total / n


def np_unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def np_embed(f: np.ndarray, w: np.ndarray, b: np.ndarray) -> list[list[float]]:
    """Linear layer then L2 normalisation, per sample."""
    out = []
    for row in f:
        z = [sum(w[o, i] * row[i] for i in range(len(row))) + b[o] for o in range(w.shape[0])]
        out.append(np_unit(z))
    return out


def np_crd_step(fs, ft, index, rows, mem, T, momentum):
    """One CRD step: (loss, Z_s, Z_t, new student bank, new teacher bank), Z estimated if unset."""
    ws, bs = mem["embed_s.weight"], mem["embed_s.bias"]
    wt, bt = mem["embed_t.weight"], mem["embed_t.bias"]
    bank_s, bank_t = mem["bank_s"].copy(), mem["bank_t"].copy()
    n_data = bank_s.shape[0]
    vs, vt = np_embed(fs, ws, bs), np_embed(ft, wt, bt)
    s_scores = np.zeros(rows.shape)
    t_scores = np.zeros(rows.shape)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            s_scores[i, j] = sum(bank_t[rows[i, j], d] * vs[i][d] for d in range(len(vs[i])))
            t_scores[i, j] = sum(bank_s[rows[i, j], d] * vt[i][d] for d in range(len(vt[i])))
    z_s, z_t = mem["Z"]
    if z_s < 0:
        z_s = sum(math.exp(x / T) for x in s_scores.ravel()) / s_scores.size * n_data
    if z_t < 0:
        z_t = sum(math.exp(x / T) for x in t_scores.ravel()) / t_scores.size * n_data
    loss = np_contrast(s_scores, z_s, n_data, T) + np_contrast(t_scores, z_t, n_data, T)
    for bank, vecs in ((bank_s, vs), (bank_t, vt)):
        for i, idx in enumerate(index):
            bank[idx] = np_unit([momentum * a + (1 - momentum) * b for a, b in zip(bank[idx], vecs[i])])
    return loss, z_s, z_t, bank_s, bank_t


def built_memory(d_s=5, d_t=7, n=N_DATA, feat_dim=FEAT, nce_m=0.5, seed=0) -> CRDMemory:
    torch.manual_seed(seed)
    mem = CRDMemory(feat_dim=feat_dim, nce_m=nce_m)
    mem.build(torch.randn(4, d_s), torch.randn(4, d_t), BuildContext(num_samples=n))
    return mem


# --------------------------------------------------------------------------- the NCE math


def test_crd_nce_by_hand() -> None:
    # One sample, one negative, scores 0, T = 1, Z = 1, n = 2: P = 1, K * Pn = 1/2, so
    # L = -[log(1 / 1.5) + log(0.5 / 1.5)] = log(1.5) + log(3) = log(4.5) (eps = 1e-7 aside).
    value = crd_nce(t64([[0.0, 0.0]]), 1.0, num_samples=2, nce_t=1.0).item()
    assert value == pytest.approx(math.log(4.5), abs=1e-6)
    # A perfect contrast (positive far above every negative) costs nothing but the eps terms:
    # 2 negatives x log(1 + eps / (K Pn)) with K Pn = 2/1000.
    value = crd_nce(t64([[1.0, -1.0, -1.0]]), 1.0, 1000, nce_t=0.01).item()
    assert value == pytest.approx(2 * math.log1p(1e-7 / 0.002), rel=1e-3)


@pytest.mark.parametrize(("T", "n_data", "Z"), [(0.07, 64, 53.0), (0.5, 1000, 1234.5), (1.0, 17, 2.0)])
def test_crd_nce_matches_loops(T: float, n_data: int, Z: float) -> None:
    scores = np.tanh(rand(3, 6, seed=1))  # dot products of unit vectors lie in [-1, 1]
    got = crd_nce(t64(scores), Z, n_data, T).item()
    assert got == pytest.approx(np_contrast(scores, Z, n_data, T), rel=1e-10)
    assert crd_nce(t64(scores), torch.tensor(Z, dtype=torch.float64), n_data, T).item() == pytest.approx(
        got, rel=1e-12
    )


def test_crd_normalizer_matches_loops() -> None:
    scores = np.tanh(rand(4, 5, seed=2))
    ref = sum(math.exp(x / 0.07) for x in scores.ravel()) / scores.size * 100
    assert crd_normalizer(t64(scores), 100, 0.07).item() == pytest.approx(ref, rel=1e-12)


def test_crd_nce_is_finite_where_exp_overflows_float32() -> None:
    scores = torch.tensor([[1.0, 0.9, -1.0]])  # exp(1 / 0.01) overflows float32
    value = crd_nce(scores, 1e40, 100, nce_t=0.01)
    assert torch.isfinite(value)
    ref = np_contrast(scores.double().numpy(), 1e40, 100, 0.01)
    assert value.item() == pytest.approx(ref, rel=1e-5)


def test_pool_features_and_bad_ranks() -> None:
    f = torch.randn(2, 3, 4, 5)
    assert torch.allclose(pool_features(f), f.mean(dim=(2, 3)))
    g = torch.randn(2, 3)
    assert pool_features(g) is g
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*'fc:in'"):
        pool_features(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="K >= 1"):
        crd_nce(torch.zeros(2, 1), 1.0, 10)
    with pytest.raises(ValueError, match="positive"):
        crd_nce(torch.zeros(2, 3), 0.0, 10)


# --------------------------------------------------------------------------- the memory


def test_build_sizes_and_initial_bank() -> None:
    mem = built_memory(d_s=5, d_t=7)
    assert not mem.pending and mem.num_samples == N_DATA
    assert mem.bank_s.shape == mem.bank_t.shape == (N_DATA, FEAT)
    assert (mem.embed_s.in_features, mem.embed_t.in_features) == (5, 7)
    assert mem.embed_s.out_features == mem.embed_t.out_features == FEAT
    stdv = 1.0 / math.sqrt(FEAT / 3)  # the reference's uniform initialisation
    for bank in (mem.bank_s, mem.bank_t):
        assert bank.abs().max() <= stdv and bank.abs().max() > 0.8 * stdv
        assert bank.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.2)  # rows of ~unit norm
    assert not torch.equal(mem.bank_s, mem.bank_t)
    assert mem.Z.tolist() == [-1.0, -1.0]
    names = dict(mem.named_buffers())
    assert set(names) == {"bank_s", "bank_t", "Z"}
    assert {n for n, _ in mem.named_parameters()} == {
        "embed_s.weight",
        "embed_s.bias",
        "embed_t.weight",
        "embed_t.bias",
    }
    # A (N, C, H, W) map is sized by its channels (global average pooling).
    m2 = CRDMemory(feat_dim=4)
    m2.build(torch.randn(2, 6, 3, 3), torch.randn(2, 9), BuildContext(num_samples=10))
    assert (m2.embed_s.in_features, m2.embed_t.in_features) == (6, 9)


def test_build_errors() -> None:
    with pytest.raises(ValueError, match=r"num_samples=len\(train_dataset\)"):
        CRDMemory().build(torch.randn(2, 3), torch.randn(2, 3), BuildContext())
    with pytest.raises(ValueError, match=">= 2"):
        CRDMemory().build(torch.randn(2, 3), torch.randn(2, 3), BuildContext(num_samples=1))
    with pytest.raises(ValueError, match="one student tap"):
        CRDMemory().build([torch.randn(2, 3)], torch.randn(2, 3), BuildContext(num_samples=8))
    with pytest.raises(ValueError, match="nce_m"):
        CRDMemory(nce_m=1.0)
    with pytest.raises(ValueError, match="feat_dim"):
        CRDMemory(feat_dim=0)


def test_sampling_excludes_the_positive_and_covers_the_rest() -> None:
    mem = built_memory(n=6)
    torch.manual_seed(1)
    index = torch.tensor([0, 3, 5, 3])
    rows = mem.sample(index, 3000)
    assert rows.shape == (4, 3001)
    assert torch.equal(rows[:, 0], index)
    for i, pos in enumerate(index.tolist()):
        neg = rows[i, 1:]
        assert not (neg == pos).any()
        counts = torch.bincount(neg, minlength=6).tolist()
        others = [c for j, c in enumerate(counts) if j != pos]
        assert counts[pos] == 0 and min(others) > 500 and max(others) < 700  # uniform: 600 each


def test_crd_step_matches_loops_with_z_and_momentum_update() -> None:
    T, momentum, n_data = 0.5, 0.3, 10
    mem = built_memory(d_s=3, d_t=4, n=n_data, feat_dim=3, nce_m=momentum).double()
    fs, ft = rand(4, 3, seed=3), rand(4, 4, seed=4)
    index = torch.tensor([7, 2, 9, 0])
    for step in range(2):  # the first step estimates Z, the second reuses it
        before = {k: v.detach().numpy().copy() for k, v in mem.state_dict().items()}
        torch.manual_seed(10 + step)
        rows = mem.sample(index, 5)
        torch.manual_seed(10 + step)  # crd draws the same negatives
        loss = crd(t64(fs), t64(ft), index=index, memory=mem, nce_k=5, nce_t=T)
        ref_loss, z_s, z_t, bank_s, bank_t = np_crd_step(
            fs, ft, index.tolist(), rows.numpy(), before, T, momentum
        )
        assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
        assert mem.Z.tolist() == pytest.approx([z_s, z_t], rel=1e-12)
        np.testing.assert_allclose(mem.bank_s.numpy(), bank_s, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(mem.bank_t.numpy(), bank_t, rtol=1e-12, atol=1e-14)
        if step == 0:
            z_first = mem.Z.clone()
    assert torch.equal(mem.Z, z_first)  # estimated once


def test_bank_updates_only_the_batch_rows_and_keeps_them_unit_norm() -> None:
    mem = built_memory()
    before_s, before_t = mem.bank_s.clone(), mem.bank_t.clone()
    index = torch.tensor([3, 10, 42, 63])
    crd(torch.randn(4, 5), torch.randn(4, 7), index=index, memory=mem, nce_k=K)
    other = torch.ones(N_DATA, dtype=torch.bool)
    other[index] = False
    for bank, before in ((mem.bank_s, before_s), (mem.bank_t, before_t)):
        assert torch.equal(bank[other], before[other])
        assert not torch.isclose(bank[index], before[index]).all(dim=1).any()
        assert torch.allclose(bank[index].norm(dim=1), torch.ones(4), atol=1e-6)
    # momentum 0: the bank row becomes the new embedding itself
    mem0 = built_memory(nce_m=0.0)
    fs = torch.randn(2, 5)
    crd(fs, torch.randn(2, 7), index=torch.tensor([1, 2]), memory=mem0, nce_k=K)
    v_s, _ = mem0.embed(fs, torch.randn(2, 7))
    assert torch.allclose(mem0.bank_s[[1, 2]], v_s, atol=1e-6)


def test_eval_mode_does_not_touch_the_memory() -> None:
    mem = built_memory().eval()
    snapshot = {k: v.clone() for k, v in mem.state_dict().items()}
    loss = crd(torch.randn(4, 5), torch.randn(4, 7), index=torch.arange(4), memory=mem, nce_k=K)
    assert torch.isfinite(loss)  # an unset Z is estimated from the batch, but not stored
    for k, v in mem.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    mem.train()
    crd(torch.randn(4, 5), torch.randn(4, 7), index=torch.arange(4), memory=mem, nce_k=K)
    assert (mem.Z > 0).all() and not torch.equal(mem.bank_s, snapshot["bank_s"])


def test_gradients_reach_the_student_and_both_heads_not_the_banks() -> None:
    mem = built_memory()
    fs = torch.randn(4, 5, requires_grad=True)
    loss = crd(fs, torch.randn(4, 7), index=torch.tensor([0, 1, 2, 3]), memory=mem, nce_k=K)
    loss.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not mem.bank_s.requires_grad and not mem.bank_t.requires_grad


def test_nce_k_is_clamped_with_a_warning() -> None:
    # 8 samples: at most 7 negatives. The default nce_k (16384) must give exactly the loss, the
    # estimated Z and the bank update of nce_k=7, from the same memory and the same random draws.
    pristine = built_memory(n=8)
    mem, explicit = copy.deepcopy(pristine), copy.deepcopy(pristine)
    fs, ft, index = torch.randn(3, 5), torch.randn(3, 7), torch.tensor([0, 1, 2])
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="nce_k=16384 .* only 7 other samples; using nce_k=7"):
        loss = crd(fs, ft, index=index, memory=mem)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = crd(fs, ft, index=index, memory=explicit, nce_k=7)
    assert torch.equal(loss, expected)
    for key, value in explicit.state_dict().items():
        assert torch.equal(mem.state_dict()[key], value), key
    torch.manual_seed(5)
    assert not torch.equal(crd(fs, ft, index=index, memory=pristine, nce_k=6), expected)  # k matters


def test_bad_inputs_raise_value_errors_naming_shapes() -> None:
    mem = built_memory()
    s, t = torch.randn(4, 5), torch.randn(4, 7)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(3, 7\).*batch size"):
        crd(s, torch.randn(3, 7), index=torch.arange(4), memory=mem, nce_k=K)
    with pytest.raises(ValueError, match=r"index of shape \(3,\) does not match a batch of 4"):
        crd(s, t, index=torch.arange(3), memory=mem, nce_k=K)
    with pytest.raises(ValueError, match="index 64 is outside the memory bank of 64"):
        crd(s, t, index=torch.tensor([0, 1, 2, 64]), memory=mem, nce_k=K)
    with pytest.raises(ValueError, match="integer tensor"):
        crd(s, t, index=torch.zeros(4), memory=mem, nce_k=K)
    with pytest.raises(ValueError, match=r"width 6 \(student\).*built for 5"):
        crd(torch.randn(4, 6), t, index=torch.arange(4), memory=mem, nce_k=K)
    with pytest.raises(ValueError, match="not built yet"):
        crd(s, t, index=torch.arange(4), memory=CRDMemory(), nce_k=K)
    with pytest.raises(ValueError, match="nce_k"):
        crd(s, t, index=torch.arange(4), memory=mem, nce_k=0)


def test_registry_lists_crd_with_paper_and_params() -> None:
    info = get_loss("crd")
    assert "Contrastive Representation Distillation" in info.paper and "ICLR 2020" in info.paper
    assert info.params == {"nce_k": 16384, "nce_t": 0.07}
    assert info.state is CRDMemory and info.state_params == {"feat_dim": 128, "nce_m": 0.5}
    assert info.uses_index and info.uses_teacher and info.reads == "embeddings"
    assert "crd" in [i.name for i in list_losses()]
    term = Term("crd", 0.8, student="fc:in", teacher="fc:in", nce_k=K, feat_dim=FEAT, nce_m=0.9)
    assert term.params == {"nce_k": K} and term.state.feat_dim == FEAT and term.state.nce_m == 0.9
    assert term.pending
    with pytest.raises(ProtegeError, match="did you mean 'nce_k'"):
        Term("crd", student="fc:in", teacher="fc:in", nce_kk=4)


# --------------------------------------------------------------------------- through the Distiller


class TinyCNN(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.conv(x)))


class Blobs(Dataset):
    def __init__(self, n: int = N_DATA) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def make_distiller(seed: int = 0, feat_dim: int = FEAT, **params) -> pg.Distiller:
    torch.manual_seed(0)  # the teacher stands for fixed weights
    teacher = TinyCNN(6, 10)
    torch.manual_seed(seed)
    student = TinyCNN(4, 5)
    terms = [
        pg.ce(1.0),
        Term("crd", 0.8, student="conv", teacher="fc:in", nce_k=K, feat_dim=feat_dim, **params),
    ]
    return pg.Distiller(student, teacher, terms)


def index_batch(ds: Dataset, idx: list[int]):
    items = [ds[i] for i in idx]
    return (
        torch.stack([x for x, _, _ in items]),
        torch.stack([y for _, y, _ in items]),
        {"index": torch.tensor([m["index"] for _, _, m in items])},
    )


def test_distiller_trains_heads_and_updates_the_bank() -> None:
    ds = pg.data.WithIndex(Blobs())
    d = make_distiller()
    batch = index_batch(ds, list(range(8)))
    d.prepare(batch, num_samples=len(ds))
    mem = d.terms[1].state
    assert not d.needs_prepare and mem.embed_s.in_features == 4 and mem.embed_t.in_features == 10
    keys = d.state_dict().keys()
    assert {"terms.1.state.bank_s", "terms.1.state.bank_t", "terms.1.state.Z"} <= set(keys)
    assert "terms.1.state.embed_s.weight" in keys
    opt = torch.optim.SGD(d.parameters(), lr=0.5)
    heads = {n: p.detach().clone() for n, p in mem.named_parameters()}
    student = [p.detach().clone() for p in d.student.parameters()]
    bank = mem.bank_s.clone()
    for step in range(3):
        _, losses = d(index_batch(ds, list(range(8 * step, 8 * step + 8))))
        assert set(losses) == {"ce", "crd:conv"} and torch.isfinite(losses["crd:conv"])
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
    for n, p in mem.named_parameters():
        assert not torch.equal(p, heads[n]), n
    assert any(not torch.equal(p, q) for p, q in zip(d.student.parameters(), student))
    assert not torch.equal(mem.bank_s[:24], bank[:24]) and torch.equal(mem.bank_s[24:], bank[24:])
    assert torch.allclose(mem.bank_t[:24].norm(dim=1), torch.ones(24), atol=1e-5)
    # eval(): the loss is still computed, the memory stays put
    d.eval()
    frozen = {k: v.clone() for k, v in d.state_dict().items()}
    d(index_batch(ds, [30, 31]))
    assert all(torch.equal(v, frozen[k]) for k, v in d.state_dict().items())


def test_missing_index_or_size_gives_clear_errors() -> None:
    ds = Blobs()
    d = make_distiller()
    x, y = ds.x[:4], ds.y[:4]
    with pytest.raises(ProtegeError, match=r"crd:conv.*num_samples=len\(train_dataset\)"):
        d.prepare((x, y))
    d.prepare((x, y), num_samples=len(ds))
    with pytest.raises(ProtegeError, match="crd:conv.*WithIndex"):
        d((x, y))
    with pytest.raises(ProtegeError, match="crd:conv.*outside the memory bank"):
        d((x, y, {"index": torch.tensor([0, 1, 2, 99])}))
    fresh = make_distiller()
    with pytest.raises(ProtegeError, match="prepare"):
        fresh((x, y, {"index": torch.arange(4)}))


def test_state_dict_loads_into_an_unprepared_distiller() -> None:
    ds = pg.data.WithIndex(Blobs())
    d = make_distiller()
    d.prepare(index_batch(ds, [0, 1]), num_samples=len(ds))
    d(index_batch(ds, [0, 1, 2]))
    fresh = make_distiller(seed=5)
    fresh.load_state_dict(d.state_dict())
    assert not fresh.needs_prepare
    for k, v in d.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    other = make_distiller(feat_dim=4)  # a memory of another width refuses the saved one
    with pytest.raises(RuntimeError, match="feat_dim=8.*feat_dim=4"):
        other.load_state_dict(d.state_dict())


# --------------------------------------------------------------------------- checkpoint / resume


def _cfg(**kw) -> TrainConfig:
    base = dict(
        epochs=2,
        progress=False,
        measure_cost=False,
        optim={"lr": 0.1, "momentum": 0.9},
        schedule={"name": "constant"},
        cpu=True,
        mixed_precision="no",
    )
    base.update(kw)
    return TrainConfig(**base)


def _loader():
    return pg.make_loader(pg.data.WithIndex(Blobs()), 16, shuffle=True, seed=0)


def test_crd_bank_survives_checkpoint_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = make_distiller()
    pg.fit(straight, _loader(), None, _cfg(), tmp_path / "a")

    first = make_distiller()
    pg.fit(first, _loader(), None, _cfg(), tmp_path / "b", stop_after_epochs=1)
    saved = load_file(checkpoint_dir(tmp_path / "b", "last") / "distiller.safetensors")
    assert {"terms.1.state.bank_s", "terms.1.state.bank_t", "terms.1.state.Z"} <= set(saved)
    assert (saved["terms.1.state.Z"] > 0).all()
    for key in ("bank_s", "bank_t", "Z"):
        assert torch.equal(saved[f"terms.1.state.{key}"], getattr(first.terms[1].state, key)), key

    # A fresh process builds the distiller anew (different init), then resumes: right after the
    # checkpoint is loaded, the memory is the saved one.
    second = make_distiller(seed=123)
    loaded = {}
    orig = pg.Distiller.load_state_dict

    def spy(self, state, strict=True, **kw):
        out = orig(self, state, strict=strict, **kw)
        loaded.update({k: v.clone() for k, v in self.state_dict().items() if ".state." in k})
        return out

    monkeypatch.setattr(pg.Distiller, "load_state_dict", spy)
    pg.fit(second, _loader(), None, _cfg(), tmp_path / "b", resume=True)
    monkeypatch.undo()
    assert loaded, "resume did not load the distiller's extras"
    for key, value in saved.items():
        if ".state." in key:
            assert torch.equal(loaded[key], value), key

    # ... and the resumed run ends where the uninterrupted one does.
    a, b = straight.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    assert torch.equal(a["terms.1.state.Z"], b["terms.1.state.Z"])


# --------------------------------------------------------------------------- the example config


def test_example_config_builds_its_terms() -> None:
    path = Path(__file__).parent.parent / "configs" / "mnist-crd.yaml"
    cfg = load_config(path)
    terms = [Term(**t.term_kwargs()) for t in cfg.terms]
    crd_terms = [t for t in terms if t.loss == "crd"]
    assert len(crd_terms) == 1 and crd_terms[0].info.uses_index
    raw = yaml.safe_load(path.read_text())
    assert raw["teacher"]["model"] == "convnet" and raw["teacher"]["weights"] == "runs/mnist-teacher"
    # The taps exist and give per-sample (N, D) embeddings on both models.
    t, s = crd_terms[0].teacher_key, crd_terms[0].student_key
    teacher = pg.build_model(raw["teacher"]["model"], num_classes=10, in_chans=1)
    student = pg.build_model(raw["student"]["model"], num_classes=10, in_chans=1)
    for model, key in ((teacher, t), (student, s)):
        taps = pg.Taps(model.eval(), [key])
        model(torch.randn(2, 1, 28, 28))
        assert taps.pop()[key].dim() == 2
        taps.remove()


# --------------------------------------------------------------------------- several processes


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mem = built_memory(n=16, seed=0)  # the same initial memory on every process
        # each process sees its own samples (a different number of them on each)
        index = torch.tensor([[1, 5, 9], [2, 6]][rank])
        torch.manual_seed(100 + rank)
        crd(torch.randn(len(index), 5), torch.randn(len(index), 7), index=index, memory=mem, nce_k=4)
        torch.save({k: v.clone() for k, v in mem.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_processes_gather_before_updating_so_banks_agree(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imports (spawning re-imports torch and protege: ~30 s here)
    ctx = mp.start_processes(
        _ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two CRD processes did not finish within 60 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    initial = built_memory(n=16, seed=0)
    for key in ("bank_s", "bank_t", "Z"):
        assert torch.equal(r0[key], r1[key]), key  # every process holds the same memory
    changed = (r0["bank_s"] != initial.bank_s).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 2, 5, 6, 9]  # both processes' samples, nothing else
    assert torch.allclose(r0["bank_t"][changed].norm(dim=1), torch.ones(5), atol=1e-6)
    assert (r0["Z"] > 0).all()
