"""Zero-cost proxies: score a student architecture (and its fit to a teacher) without training it.

Every proxy has one signature, ``score(teacher, student, (x, y)) -> float``, and **higher is
better**. Look proxies up by name with :func:`get_proxy`; :func:`list_proxies` names them all:

=================== ========================================================================
``diswot``          DisWOT (Dong, Li & Wei, CVPR 2023): ``-(M_r + M_s)``, needs a teacher
``diswot_relation`` ``-M_r`` alone (batch Gram matrices of the pre-pooling features)
``diswot_semantic`` ``-M_s`` alone (class-wise channel correlation of the fc-weight gradients)
``grad_norm``       sum over layers of the L2 norm of the CE gradient of each weight
``snip``            sum of ``|theta * dL/dtheta|`` (Lee et al., ICLR 2019)
``grasp``           sum of ``-theta * (H g)`` (Wang et al., ICLR 2020)
``fisher``          sum of the per-channel Fisher information of activations (Theis et al. 2018)
``synflow``         sum of ``|theta * dR/dtheta|``, R the all-ones output of ``|theta|`` (Tanaka 2020)
``jacob_cov``       input-Jacobian correlation score (Mellor et al. 2020, v1)
``nwot``            ``log|K_H|`` of the ReLU activation-code kernel (Mellor et al., ICML 2021)
``zen``             Zen-score (Lin et al., ICCV 2021)
``params``          number of parameters (baseline)
``flops``           FLOPs per sample (baseline)
``kd:<loss>``       minus a registered logit KD loss between student and teacher at init
=================== ========================================================================

The classic proxies follow the aggregation of the reference implementations
(SamsungLabs/zero-cost-nas for grad_norm, snip, grasp, fisher, synflow and jacob_cov; the
authors' code for NWOT and Zen-NAS): per-weight (or per-channel) scores summed over every
``Conv``/``Linear`` weight of the network. Each function's docstring gives its formula and any
departure from the reference.

Conventions shared by all proxies:

* **Mode.** Networks run in training mode (batch statistics in batch norm), as every reference
  does: at random initialisation, eval-mode batch norm is the identity and hides the architecture.
* **No lasting effect.** Weights, buffers (batch-norm running statistics), ``train``/``eval``
  modes and ``requires_grad`` flags are restored afterwards; gradients are cleared (set to
  ``None``) before and after, and computed with :func:`torch.autograd.grad` where possible, so
  nothing accumulates from one candidate to the next (the DisWOT reference scripts accumulate
  ``fc.weight.grad`` across candidates). Proxies that change weights (synflow, zen) work on a copy.
* **Deterministic.** Randomness (dropout, Zen's Gaussian inputs and re-initialisation) is drawn
  from a generator seeded by the batch contents, inside :func:`torch.random.fork_rng`: the same
  batch and weights give the same score, and the global random state is untouched.
* **Features before global pooling** (DisWOT, Zen) are found by :func:`pre_pool_features`: the
  input of the last global pooling module the forward pass calls (``nn.AdaptiveAvgPool2d`` or
  ``nn.AdaptiveMaxPool2d`` reducing to 1x1, timm's ``SelectAdaptivePool2d``: our zoo, timm CNNs,
  torchvision ResNets/VGG/MobileNets), else the output of the model's last ``feature_modules``
  entry (timm's ``feature_info``, torchvision's ``layer4``) when it is a 4-D map. Pass
  ``student_tap=``/``teacher_tap=`` (a :class:`~protege.core.taps.Taps` path, ``":in"`` for a
  module's input) to :func:`get_proxy` to choose the layer yourself.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..core.taps import Taps
from ..errors import ProtegeError, unknown
from ..losses.diswot import ALIGNMENTS, relation_distance, semantic_distance
from ..losses.registry import LossInfo, get_loss, list_losses
from ..metrics.cost import count_flops, count_params

__all__ = [
    "Batch",
    "Proxy",
    "diswot",
    "diswot_relation",
    "diswot_semantic",
    "diswot_terms",
    "fisher",
    "flops",
    "get_proxy",
    "grad_norm",
    "grasp",
    "jacob_cov",
    "kd_proxy",
    "list_proxies",
    "needs_teacher",
    "nwot",
    "params",
    "pre_pool_features",
    "scoring",
    "snip",
    "synflow",
    "zen",
]

Batch = tuple[Tensor, Tensor]
Proxy = Callable[[nn.Module | None, nn.Module, Batch], float]

_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


# --------------------------------------------------------------------------- shared machinery


def _batch_seed(x: Tensor) -> int:
    return zlib.crc32(x.detach().cpu().contiguous().numpy().tobytes())


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_batch(batch: Batch) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ProtegeError("a proxy scores one batch given as a pair (inputs, labels)")
    x, y = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[0] != y.shape[0]:
        raise ProtegeError(
            "the proxy batch must be two tensors (inputs, labels) with the same first dimension"
        )
    if x.shape[0] < 2:
        raise ProtegeError(
            f"proxies need a batch of at least 2 samples (batch statistics, Gram matrices), got {x.shape[0]}"
        )
    return x, y


@contextmanager
def scoring(*models: nn.Module | None, seed: int = 0) -> Iterator[None]:
    """Put models in the state every proxy scores them in, and restore them exactly afterwards.

    Inside: training mode, every parameter requiring grad, no ``.grad``, the random generators
    seeded with ``seed`` (forked, so the caller's random state is untouched). Afterwards: each
    module's ``training`` flag, each parameter's ``requires_grad``, every buffer's value (batch-norm
    running statistics and counters) restored, and ``.grad`` set to ``None``.
    """
    present = [m for m in dict.fromkeys(models) if m is not None]
    modes = [(mod, mod.training) for m in present for mod in m.modules()]
    flags = [(p, p.requires_grad) for m in present for p in m.parameters()]
    buffers = [(b, b.detach().clone()) for m in present for b in m.buffers()]
    cuda = sorted({d.index or 0 for m in present for d in [_device(m)] if d.type == "cuda"})
    try:
        for m in present:
            m.train()
            m.requires_grad_(True)
            m.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for mod, training in modes:
            mod.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


def _logits(model: nn.Module, x: Tensor, who: str) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ProtegeError(f"the {who} must return logits of shape (batch, classes), got {shape}")
    return out


def _check_labels(logits: Tensor, y: Tensor, who: str) -> None:
    if y.dtype not in (torch.int64, torch.int32) or y.dim() != 1:
        raise ProtegeError(
            f"proxy labels must be a 1-D integer tensor of class indices, got {y.dtype} {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ProtegeError(
            f"labels range over [{int(y.min())}, {int(y.max())}] but the {who} has {logits.shape[1]} "
            "classes: build it with the dataset's num_classes"
        )


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor, who: str = "student") -> Tensor:
    logits = _logits(model, x, who)
    _check_labels(logits, y, who)
    return F.cross_entropy(logits, y.long())


def _prunable(model: nn.Module) -> list[nn.Module]:
    """The layers the references score: every convolution and linear layer with a weight."""
    return [m for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear)) and m.weight is not None]


def _grads(loss: Tensor, weights: list[Tensor], **kwargs: Any) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, weights, allow_unused=True, **kwargs))


# --------------------------------------------------------------------------- pre-pooling features


class _PrePool:
    """Hooks recording the feature map before global pooling (see the module docstring)."""

    def __init__(self, model: nn.Module, tap: str | None) -> None:
        self.model = model
        self.tap = tap
        self.pooled: Tensor | None = None
        self.taps = Taps(model, [tap]) if tap else None
        self.handles: list[Any] = []
        if tap is None:
            for module in model.modules():
                if isinstance(module, _GLOBAL_POOLS) or type(module).__name__ == "SelectAdaptivePool2d":
                    self.handles.append(module.register_forward_hook(self._record))
            last = (getattr(model, "feature_modules", None) or [None])[-1]
            self.fallback = Taps(model, [last]) if last else None

    def _record(self, _module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        inp = args[0] if args else None
        if isinstance(inp, Tensor) and inp.dim() == 4 and isinstance(out, Tensor):
            if out.numel() == inp.shape[0] * inp.shape[1]:  # pooled to one value per channel
                self.pooled = inp

    def read(self) -> Tensor:
        if self.taps is not None:
            return self.taps.outputs[self.tap]  # type: ignore[index]
        if self.pooled is not None:
            return self.pooled
        if self.fallback is not None:
            feat = next(iter(self.fallback.outputs.values()), None)
            if feat is not None and feat.dim() == 4:
                return feat
        raise ProtegeError(
            f"cannot find the feature map before global pooling in {type(self.model).__name__} (no "
            "AdaptiveAvgPool2d/AdaptiveMaxPool2d to 1x1 was called and its last feature_modules entry "
            "is not a 4-D map); name the layer with student_tap=/teacher_tap= (a module path, "
            "':in' for its input)"
        )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for taps in (self.taps, getattr(self, "fallback", None)):
            if taps is not None:
                taps.remove()


def pre_pool_features(model: nn.Module, x: Tensor, tap: str | None = None) -> tuple[Tensor, Tensor]:
    """Run ``model`` on ``x``; return ``(output, feature map before global pooling)``.

    ``tap`` overrides the automatic choice (see the module docstring) with a module path.
    """
    hooks = _PrePool(model, tap)
    try:
        out = model(x)
        return out, hooks.read()
    finally:
        hooks.remove()


# --------------------------------------------------------------------------- DisWOT


def _classifier_weight(model: nn.Module, num_classes: int, who: str) -> Tensor:
    name = getattr(model, "classifier_name", None)
    if name:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ProtegeError(f"the {who}'s classifier_name {name!r} names no module") from None
    else:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        layer = linears[-1] if linears else None
    if not isinstance(layer, nn.Linear):
        raise ProtegeError(
            f"DisWOT's semantic metric needs the {who}'s classifier, an nn.Linear: {type(model).__name__} "
            "has none (set model.classifier_name to the path of its final nn.Linear, or use the "
            "diswot_relation proxy, which needs no classifier)"
        )
    return layer.weight


# The teacher's side of DisWOT on a batch (its pre-pooling features, its fc-weight gradient) is the
# same for every candidate of a search: it is kept per teacher (weakly, so it dies with the model)
# for the last few batches and used again while the teacher's weights are unchanged. Any in-place
# change of a teacher parameter (an optimizer step, ``load_state_dict``) bumps its version counter
# and so misses the memo.
_TEACHER_MEMO: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[Any, ...], tuple[Tensor | None, Tensor | None]]
]
_TEACHER_MEMO = weakref.WeakKeyDictionary()
_MEMO_SIZE = 8


def _memo_key(
    model: nn.Module, seed: int, x: Tensor, y: Tensor, tap: str | None, relation: bool, semantic: bool
) -> tuple[Any, ...]:
    weights = tuple((p.data_ptr(), p._version, p.dtype, str(p.device)) for p in model.parameters())
    labels = zlib.crc32(y.detach().cpu().contiguous().numpy().tobytes())
    return (weights, seed, tuple(x.shape), str(x.dtype), labels, tap, relation, semantic)


def _diswot_side(
    who: str, model: nn.Module, tap: str | None, x: Tensor, y: Tensor, relation: bool, semantic: bool
) -> tuple[Tensor | None, Tensor | None]:
    """One network's DisWOT inputs: ``(pre-pooling feature map, fc-weight CE gradient)`` on the CPU."""
    dev = _device(model)
    xd, yd = x.to(dev), y.to(dev)
    grad = None
    with torch.enable_grad():
        out, feat = pre_pool_features(model, xd, tap) if relation else (model(xd), None)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ProtegeError(f"the {who} must return logits of shape (batch, classes)")
        if semantic:
            _check_labels(out, yd, who)
            weight = _classifier_weight(model, out.shape[1], who)
            (g,) = _grads(F.cross_entropy(out, yd.long()), [weight])
            if g is None:
                raise ProtegeError(f"the {who}'s classifier weight does not take part in its forward pass")
            grad = g.detach().float().cpu()
    return (None if feat is None else feat.detach().float().cpu()), grad


def diswot_terms(
    teacher: nn.Module | None,
    student: nn.Module,
    batch: Batch,
    *,
    relation: bool = True,
    semantic: bool = True,
    align: str = "pool",
    student_tap: str | None = None,
    teacher_tap: str | None = None,
    reuse_teacher: bool = True,
) -> dict[str, float]:
    r"""DisWOT's two metrics for one teacher-student pair on one batch: ``{"relation": M_r, "semantic": M_s}``.

    Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR
    2023. Each network runs once on ``x`` (training mode):

    * ``M_r = ||G~_t - G~_s||_F^2 / B^2`` with ``G~`` the row-L2-normalised ``F F^T`` of the (B,
      C*H*W) flattened feature map before global pooling
      (:func:`protege.losses.diswot.relation_distance`);
    * ``M_s = 1/(K c) sum_k ||A~^t_k - A~^s_k||_F^2`` with ``g = dCE(z, y)/dW`` the (K, C) gradient
      of the mean cross-entropy w.r.t. the classifier weight (the paper's "Grad-CAM of the fc
      layer"; computed with ``autograd.grad``, so no ``.grad`` accumulates) and ``A~_k`` the
      row-normalised ``g_k g_k^T`` (:func:`protege.losses.diswot.semantic_distance`). Different
      classifier widths are aligned to ``c = min(C_t, C_s)`` channels by ``align``: ``"pool"``
      (default, adaptive average pooling over channels) or ``"truncate"``.

    The paper scores a randomly initialised teacher against randomly initialised students; pass a
    trained teacher for the trained-teacher variant. Only the requested terms are computed. The
    teacher's side is computed once per (teacher weights, batch) and reused for the next candidates
    of a search; random draws (dropout) are seeded from the batch, separately for each network, so
    a reused teacher side is exactly the one that would be computed again. ``reuse_teacher=False``
    computes it every call (to measure what the reuse saves).
    """
    if teacher is None:
        raise ProtegeError("the DisWOT proxies compare a student with a teacher: pass a teacher model")
    if align not in ALIGNMENTS:
        raise ProtegeError(f"diswot: align must be one of {', '.join(ALIGNMENTS)}, got {align!r}")
    x, y = _check_batch(batch)
    result: dict[str, float] = {}
    feats: dict[str, Tensor | None] = {}
    grads: dict[str, Tensor | None] = {}
    seed = _batch_seed(x)
    memo_key = _memo_key(teacher, seed, x, y, teacher_tap, relation, semantic)
    memo = _TEACHER_MEMO.setdefault(teacher, {})
    with scoring(teacher, student, seed=seed):
        if reuse_teacher and memo_key in memo:
            feats["teacher"], grads["teacher"] = memo[memo_key]
        else:
            torch.manual_seed(seed)
            feats["teacher"], grads["teacher"] = _diswot_side(
                "teacher", teacher, teacher_tap, x, y, relation, semantic
            )
            if reuse_teacher:
                memo[memo_key] = (feats["teacher"], grads["teacher"])
                while len(memo) > _MEMO_SIZE:
                    memo.pop(next(iter(memo)))
        torch.manual_seed(seed + 1)
        feats["student"], grads["student"] = _diswot_side(
            "student", student, student_tap, x, y, relation, semantic
        )
    if relation:
        assert feats["student"] is not None and feats["teacher"] is not None
        result["relation"] = float(relation_distance(feats["student"], feats["teacher"]))
    if semantic:
        assert grads["student"] is not None and grads["teacher"] is not None
        if grads["student"].shape[0] != grads["teacher"].shape[0]:
            raise ProtegeError(
                f"teacher and student classify into different numbers of classes ({grads['teacher'].shape[0]} "
                f"vs {grads['student'].shape[0]}): build both with the dataset's num_classes"
            )
        result["semantic"] = float(semantic_distance(grads["student"], grads["teacher"], align))
    return result


def diswot(teacher: nn.Module | None, student: nn.Module, batch: Batch, **options: Any) -> float:
    """DisWOT score ``-(M_r + M_s)`` (:func:`diswot_terms`; options ``align``, ``*_tap``)."""
    terms = diswot_terms(teacher, student, batch, **options)
    return -(terms["relation"] + terms["semantic"])


def diswot_relation(teacher: nn.Module | None, student: nn.Module, batch: Batch, **options: Any) -> float:
    """DisWOT's relation term alone, ``-M_r`` (:func:`diswot_terms`)."""
    return -diswot_terms(teacher, student, batch, semantic=False, **options)["relation"]


def diswot_semantic(teacher: nn.Module | None, student: nn.Module, batch: Batch, **options: Any) -> float:
    """DisWOT's semantic term alone, ``-M_s`` (:func:`diswot_terms`)."""
    return -diswot_terms(teacher, student, batch, relation=False, **options)["semantic"]


# --------------------------------------------------------------------------- gradient proxies


def grad_norm(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    r"""Gradient norm: ``sum_l ||dL/dW_l||_2`` over every conv/linear weight ``W_l``, ``L`` the mean CE.

    Abdelfattah, Mehrotra, Dudziak & Lane, "Zero-Cost Proxies for Lightweight NAS", ICLR 2021.
    The reference (``grad_norm.py``) takes the Frobenius norm of each layer's weight gradient and
    sums the per-layer norms; it is not the norm of the whole gradient vector.
    """
    x, y = _check_batch(batch)
    with scoring(student, seed=_batch_seed(x)):
        weights = [m.weight for m in _prunable(student)]
        grads = _grads(_cross_entropy(student, *_on(student, x, y)), weights)
        return float(sum(g.norm() for g in grads if g is not None))


def snip(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    r"""SNIP saliency summed over the network: ``sum |theta * dL/dtheta|`` over conv/linear weights.

    Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR
    2019, as aggregated by Abdelfattah et al. (ICLR 2021). The reference multiplies each weight by
    a mask of ones and takes ``|dL/dmask|``; by the chain rule that is ``|theta * dL/dtheta|``,
    computed here without patching the layers.
    """
    x, y = _check_batch(batch)
    with scoring(student, seed=_batch_seed(x)):
        weights = [m.weight for m in _prunable(student)]
        grads = _grads(_cross_entropy(student, *_on(student, x, y)), weights)
        return float(
            sum((w.detach() * g).abs().sum() for w, g in zip(weights, grads, strict=True) if g is not None)
        )


def grasp(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    r"""GraSP summed over the network: ``sum -theta * (H g)`` over conv/linear weights.

    Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving Gradient Flow",
    ICLR 2020, as aggregated by Abdelfattah et al. (ICLR 2021, ``grasp.py``, ``T = 1``, one
    iteration): ``g = dL/dtheta`` from a first forward, then ``H g = d(g_detached . dL/dtheta)/dtheta``
    by double back-propagation through a second forward.
    """
    x, y = _check_batch(batch)
    with scoring(student, seed=_batch_seed(x)):
        xd, yd = _on(student, x, y)
        weights = [m.weight for m in _prunable(student)]
        first = _grads(_cross_entropy(student, xd, yd), weights)
        second = _grads(_cross_entropy(student, xd, yd), weights, create_graph=True)
        z = sum(
            (a.detach() * b).sum()
            for a, b in zip(first, second, strict=True)
            if a is not None and b is not None
        )
        if not isinstance(z, Tensor):
            return 0.0
        hg = _grads(z, weights)
        return float(sum((-w.detach() * h).sum() for w, h in zip(weights, hg, strict=True) if h is not None))


def fisher(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    r"""Fisher information of the activations, summed per weight as the reference does.

    Theis, Korshunova, Tejani & Huszar, "Faster gaze prediction with dense networks and Fisher
    pruning", 2018; Turner et al., BlockSwap, ICLR 2020; aggregation of Abdelfattah et al. (ICLR
    2021, ``fisher.py``). For each output channel ``k`` of each conv/linear layer, with ``a`` the
    layer's output and ``g = dL/da``:

        F_k = 1/2 * mean_n ( sum_{h,w} a_{nkhw} g_{nkhw} )^2

    The reference broadcasts ``F_k`` to every weight of channel ``k`` before summing, so the score is
    ``sum_l sum_k F_{lk} * numel(W_l[k])``. A layer called twice adds both calls' values.
    """
    x, y = _check_batch(batch)
    per_channel: dict[nn.Module, Tensor] = {}

    def forward_hook(layer: nn.Module, _args: Any, out: Tensor) -> None:
        act = out.detach().clone()

        def grad_hook(g: Tensor) -> None:
            prod = act * g if act.dim() <= 2 else (act * g).sum(dim=tuple(range(2, act.dim())))
            value = prod.pow(2).mean(0).mul(0.5)
            per_channel[layer] = per_channel[layer] + value if layer in per_channel else value

        if out.requires_grad:
            out.register_hook(grad_hook)

    layers = _prunable(student)
    with scoring(student, seed=_batch_seed(x)):
        handles = [layer.register_forward_hook(forward_hook) for layer in layers]
        try:
            _cross_entropy(student, *_on(student, x, y)).backward()
        finally:
            for h in handles:
                h.remove()
    per_weight = [v.abs().sum() * layer.weight[0].numel() for layer, v in per_channel.items()]
    return float(sum(per_weight))


def synflow(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    r"""SynFlow: ``sum |theta * dR/dtheta|`` with ``R = sum f_{|theta|}(1)``, in double precision.

    Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by iteratively
    conserving synaptic flow", NeurIPS 2020; aggregation of Abdelfattah et al. (ICLR 2021,
    ``synflow.py``). On a copy of the network: every parameter and buffer replaced by its absolute
    value, batch norm removed (the reference's ``synflow`` measure scores a copy built with
    ``bn=False``; here every ``_BatchNorm`` becomes ``nn.Identity``), converted to float64; the input
    is one all-ones sample of the batch's shape; ``R`` is the sum of the outputs. The sum runs over
    conv/linear weights. Only the batch's input shape is used.
    """
    x, _ = _check_batch(batch)
    student.zero_grad(set_to_none=True)
    net = copy.deepcopy(student)
    _strip_batchnorm(net)
    net = net.double().train()
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.abs_()
    net.requires_grad_(True)
    ones = torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=_device(net))
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(_batch_seed(x))
        weights = [m.weight for m in _prunable(net)]
        grads = _grads(net(ones).sum(), weights)
    return float(
        sum((w.detach() * g).abs().sum() for w, g in zip(weights, grads, strict=True) if g is not None)
    )


def _strip_batchnorm(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _strip_batchnorm(child)


def jacob_cov(teacher: nn.Module | None, student: nn.Module, batch: Batch, k: float = 1e-5) -> float:
    r"""Jacobian covariance score of Mellor et al. (arXiv:2006.04647 v1, "NAS without training").

    With ``J`` the (N, D) matrix of input gradients ``d(sum_j z_nj)/dx_n`` (the logits summed, as the
    reference's ``y.backward(ones_like(y))``), ``Sigma = corrcoef(J)`` (N x N) with eigenvalues
    ``lambda_i``:

        score = -sum_i ( log(lambda_i + k) + 1 / (lambda_i + k) ),  k = 1e-5

    Eigenvalues come from ``numpy.linalg.eigvalsh`` (``Sigma`` is symmetric; the reference's ``eig``
    can return complex noise). A sample with a constant Jacobian makes ``Sigma`` undefined: the
    reference returns NaN, this raises a :class:`ProtegeError` that the search records as a failure.
    """
    x, _ = _check_batch(batch)
    with scoring(student, seed=_batch_seed(x)):
        xd = x.to(_device(student)).clone().requires_grad_(True)
        (jac,) = torch.autograd.grad(_logits(student, xd, "student").sum(), [xd])
    j = jac.detach().double().cpu().reshape(x.shape[0], -1).numpy()
    if np.any(j.std(axis=1) == 0):
        raise ProtegeError(
            "jacob_cov: a sample has a constant input Jacobian, so its correlation is undefined"
        )
    v = np.linalg.eigvalsh(np.corrcoef(j))
    return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))


def nwot(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    r"""NWOT (Mellor, Turner, Storkey & Crowley, "Neural Architecture Search without Training", ICML 2021).

    Each ReLU module (the reference hooks every module whose type name contains ``ReLU``) turns a
    sample into a binary code ``c_n = 1[input > 0]`` (flattened). Over all ReLUs,

        K_H = sum_relu ( C C^T + (1 - C)(1 - C)^T )     (N x N; = N_A - d_H of the paper)

    and the score is ``log|det K_H|`` (``numpy.linalg.slogdet``, float64), ``-inf`` when ``K_H`` is
    singular (two samples with identical codes). Models that call ``F.relu`` instead of a module
    have no hooks to read: those raise a :class:`ProtegeError`.
    """
    x, _ = _check_batch(batch)
    n = x.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64)

    def hook(_module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal kernel
        code = (args[0].detach().reshape(n, -1) > 0).double().cpu()
        kernel = kernel + code @ code.t() + (1 - code) @ (1 - code).t()

    relus = [m for m in student.modules() if "ReLU" in type(m).__name__]
    if not relus:
        raise ProtegeError(
            f"nwot reads ReLU modules, and {type(student).__name__} has none (it may call F.relu): use another proxy"
        )
    with scoring(student, seed=_batch_seed(x)):
        handles = [m.register_forward_hook(hook) for m in relus]
        try:
            with torch.no_grad():
                student(x.to(_device(student)))
        finally:
            for h in handles:
                h.remove()
    return float(np.linalg.slogdet(kernel.numpy())[1])


def zen(
    teacher: nn.Module | None,
    student: nn.Module,
    batch: Batch,
    mixup_gamma: float = 1e-2,
    repeat: int = 1,
    student_tap: str | None = None,
) -> float:
    r"""Zen-score (Lin, Wang, Sun, Chen, Sun, Qian, Li & Jin, "Zen-NAS", ICCV 2021).

    On a copy of the student re-initialised as the reference does (conv/linear weights ~ N(0, 1),
    biases 0, batch-norm weight 1 and bias 0), in training mode, with Gaussian inputs ``x, e`` of
    the batch's shape and ``f`` the map before global pooling (:func:`pre_pool_features`):

        Delta = mean_n sum_{c,h,w} | f(x)_n - f(x + gamma e)_n |,     gamma = mixup_gamma = 0.01
        Zen   = log(Delta) + sum_{BN i} log( sqrt( mean_c sigma_{i,c}^2 ) )

    averaged over ``repeat`` draws. ``sigma_{i,c}^2`` is the batch variance of channel ``c`` at
    ``BatchNorm2d`` ``i`` in the unperturbed pass (the paper's definition). The reference reads
    ``running_var`` instead, after both passes have moved it with momentum 0.1 from 1, which
    mostly measures that update rule. Only the batch's input shape is used. A network whose
    features do not depend on its input (``Delta = 0``, or a batch norm that sees a constant) scores
    ``-inf``, the limit of the formula: it ranks last.
    """
    x, _ = _check_batch(batch)
    student.zero_grad(set_to_none=True)
    net = copy.deepcopy(student).train()
    variances: list[Tensor] = []
    recording = [True]

    def bn_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        if recording[0]:
            variances.append(args[0].detach().double().var(dim=(0, 2, 3), unbiased=False).mean())

    handles = [m.register_forward_pre_hook(bn_hook) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    scores = []
    device = _device(net)
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(_batch_seed(x))
        for _ in range(repeat):
            _gaussian_init(net)
            x1 = torch.randn(x.shape, device=device, dtype=dtype)
            x2 = torch.randn(x.shape, device=device, dtype=dtype)
            variances.clear()
            recording[0] = True
            _, f1 = pre_pool_features(net, x1, student_tap)
            recording[0] = False
            _, f2 = pre_pool_features(net, x1 + mixup_gamma * x2, student_tap)
            delta = (f1.double() - f2.double()).abs().flatten(1).sum(1).mean()
            if float(delta) <= 0.0 or any(float(v) <= 0.0 for v in variances):
                scores.append(-math.inf)  # log 0: the features ignore the input (e.g. cut by "none" edges)
                continue
            bn_term = sum(0.5 * math.log(float(v)) for v in variances)
            scores.append(math.log(float(delta)) + bn_term)
    for h in handles:
        h.remove()
    return float(np.mean(scores))


def _gaussian_init(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- baselines


def params(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """Number of parameters of the student (baseline proxy: bigger is assumed better)."""
    student.zero_grad(set_to_none=True)
    return float(count_params(student))


def flops(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """FLOPs per sample of the student on the batch's input shape (baseline proxy)."""
    x, _ = _check_batch(batch)
    with scoring(student):  # count_flops resets every submodule's mode to the root's: restore them
        return float(count_flops(student, x[:1].to(_device(student))))


# --------------------------------------------------------------------------- KD losses at init


def _is_logit_kd(info: LossInfo) -> bool:
    return (
        info.reads == "logits"
        and info.uses_teacher
        and not info.multi_teacher
        and info.state is None
        and not info.uses_index
    )


def kd_proxy(loss: str, **loss_params: Any) -> Proxy:
    """The proxy ``-loss(student_logits, teacher_logits)`` of a registered logit KD loss at init.

    Both networks run once on ``x`` (training mode, no gradients); ``target=y`` is passed to losses
    that use labels. Lower loss means a student whose untrained outputs already resemble the
    teacher's, hence the minus sign. Only logit losses without trainable state qualify.
    """
    info = get_loss(loss)
    if not _is_logit_kd(info):
        raise ProtegeError(
            f"kd:{loss} is not a logit KD loss without state; proxies accept "
            + ", ".join(f"kd:{i.name}" for i in list_losses() if _is_logit_kd(i))
        )

    def score(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
        if teacher is None:
            raise ProtegeError(f"the kd:{loss} proxy compares a student with a teacher: pass a teacher model")
        x, y = _check_batch(batch)
        with scoring(teacher, student, seed=_batch_seed(x)), torch.no_grad():
            t = _logits(teacher, x.to(_device(teacher)), "teacher")
            s = _logits(student, x.to(_device(student)), "student")
            if s.shape != t.shape:
                raise ProtegeError(
                    f"kd:{loss}: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ: "
                    "build both with the dataset's num_classes"
                )
            kwargs = dict(loss_params)
            if info.uses_target:
                _check_labels(s, y, "student")
                kwargs["target"] = y.to(s.device).long()
            return -float(info.fn(s, t.to(s.device), **kwargs))

    score.__name__ = f"kd:{loss}"
    score.__doc__ = f"Minus the {loss!r} loss at initialisation ({info.paper})."
    return score


# --------------------------------------------------------------------------- registry


_PROXIES: dict[str, Callable[..., float]] = {
    "diswot": diswot,
    "diswot_relation": diswot_relation,
    "diswot_semantic": diswot_semantic,
    "grad_norm": grad_norm,
    "snip": snip,
    "grasp": grasp,
    "fisher": fisher,
    "synflow": synflow,
    "jacob_cov": jacob_cov,
    "nwot": nwot,
    "zen": zen,
    "params": params,
    "flops": flops,
}
_WITH_TEACHER = frozenset({"diswot", "diswot_relation", "diswot_semantic"})
_DISWOT_OPTIONS = frozenset({"align", "student_tap", "teacher_tap", "reuse_teacher"})


def _on(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    dev = _device(model)
    return x.to(dev), y.to(dev)


def list_proxies() -> list[str]:
    """Every proxy name :func:`get_proxy` accepts, ``kd:<loss>`` for each registered logit KD loss."""
    return [*_PROXIES, *(f"kd:{i.name}" for i in list_losses() if _is_logit_kd(i))]


def get_proxy(name: str, **options: Any) -> Proxy:
    """The proxy called ``name`` as a ``score(teacher, student, (x, y)) -> float`` (higher is better).

    ``options`` fix keyword settings of the proxy: ``align``, ``student_tap``, ``teacher_tap``,
    ``reuse_teacher`` for the DisWOT proxies, ``mixup_gamma``, ``repeat``, ``student_tap`` for ``zen``, ``k`` for
    ``jacob_cov``, the loss's hyper-parameters (``T`` ...) for ``kd:<loss>``. An unknown name or
    option raises a :class:`ProtegeError` naming the valid ones.
    """
    if not isinstance(name, str):
        raise ProtegeError(f"a proxy name must be a string, got {name!r}")
    key = name.strip()
    if key.startswith("kd:"):
        loss = key[3:]
        info = get_loss(loss)
        bad = set(options) - set(info.params)
        if bad:
            raise ProtegeError(
                f"proxy {key!r} has no option {', '.join(sorted(bad))}; options: {', '.join(info.params) or 'none'}"
            )
        return kd_proxy(loss, **options)
    if key not in _PROXIES:
        raise unknown("proxy", key, list_proxies())
    fn = _PROXIES[key]
    if key in _WITH_TEACHER:
        allowed = _DISWOT_OPTIONS
    else:
        allowed = frozenset(list(inspect.signature(fn).parameters)[3:])
    bad = set(options) - allowed
    if bad:
        raise ProtegeError(
            f"proxy {key!r} has no option {', '.join(sorted(bad))}; options: {', '.join(sorted(allowed)) or 'none'}"
        )
    return functools.partial(fn, **options) if options else fn


def needs_teacher(name: str) -> bool:
    """Whether the proxy ``name`` reads the teacher (DisWOT and ``kd:<loss>``); unknown names raise."""
    get_proxy(name)
    key = name.strip()
    return key in _WITH_TEACHER or key.startswith("kd:")
