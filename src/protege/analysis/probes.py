"""Probes of *what* got distilled: does the student look where the teacher looks, fall for the
teacher's adversarial examples, keep the teacher's invariances, and agree with it class by class?

After Ojha et al. (NeurIPS 2023, "What Knowledge Gets Distilled in Knowledge Distillation?"):
each probe compares a distilled student with the same student trained without distillation (the
*independent* student), relative to the teacher. Every function takes plain ``nn.Module``s and
tensors of model inputs, runs models in ``eval()`` and restores their modes, and imports nothing
else from protege (so any layer may use it).

- :func:`localization`: similarity of each student's class-evidence maps to the teacher's
  (Grad-CAM, Selvaraju et al., ICCV 2017, at each model's last spatial layer; gradient saliency,
  Simonyan et al., 2014, when a model has no spatial layer, e.g. an MLP), and the share of images
  where one student's map is closer to the teacher's than another's (:func:`share_closer`);
- :func:`adversarial_transfer`: success rate on each model of FGSM (Goodfellow et al., ICLR 2015)
  or PGD (Madry et al., ICLR 2018) examples crafted on the teacher;
- :func:`invariance`: prediction consistency under transformations, and agreement with the
  teacher on the transformed inputs;
- :func:`per_class_agreement`: agreement with the teacher and accuracy per true class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Transform = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    """Run models in eval mode; restore every submodule's own mode afterwards."""
    modes = {sub: sub.training for m in models for sub in m.modules()}
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for sub, mode in modes.items():
            sub.train(mode)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _chunks(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output["logits"] if isinstance(output, dict) else output.logits


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` on ``inputs`` (eval mode, batched), on the CPU in float32."""
    device = _device(model)
    with _evaluating(model):
        out = [_logits(model(inputs[s].to(device))).float().cpu() for s in _chunks(len(inputs), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


# -- localization -------------------------------------------------------------------------------


def spatial_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The path of the last module to finish whose output is a *learned* feature map: shaped
    ``(N, C, H, W)`` with ``H·W > 1``, from a module that has parameters or runs after one (so an
    MLP's input resizing does not count). E.g. ``layer4`` of a ResNet; ``None`` for an MLP."""
    found: list[str] = []
    learned = [False]
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        own = any(True for _ in module.parameters(recurse=False))

        def hook(_m: nn.Module, _a: Any, out: Any, name: str = name, own: bool = own) -> None:
            learned[0] = learned[0] or own
            if (
                learned[0]
                and isinstance(out, torch.Tensor)
                and out.dim() == 4
                and out.shape[-1] * out.shape[-2] > 1
            ):
                found.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        predict(model, example[:1])
    finally:
        for h in handles:
            h.remove()
    return found[-1] if found else None


def gradcam(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor, layer: str) -> torch.Tensor:
    """Grad-CAM maps (Selvaraju et al., ICCV 2017) of ``classes`` at ``layer``, at input resolution.

    With A (C × h × w) the layer's activation and y_c the class logit:
    α_k = mean_{i,j} ∂y_c/∂A_k[i,j],  map = ReLU(Σ_k α_k A_k), upsampled bilinearly to the
    input's H × W. Returns ``(N, H, W)``, float32 on the CPU.
    """
    module = model.get_submodule(layer)
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _a, out: seen.__setitem__("a", out))
    device = _device(model)
    maps = []
    try:
        with _evaluating(model):
            for s in _chunks(len(inputs), 128):
                x = inputs[s].to(device).requires_grad_(True)  # keeps the graph even for frozen models
                logits = _logits(model(x))
                score = logits.gather(1, classes[s].to(device).view(-1, 1)).sum()
                act = seen["a"]
                (grad,) = torch.autograd.grad(score, act)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * act).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
                maps.append(cam[:, 0].detach().float().cpu())
    finally:
        handle.remove()
    return torch.cat(maps)


def saliency(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Gradient saliency maps (Simonyan et al., 2014): max over channels of |∂y_c/∂x|, ``(N, H, W)``."""
    device = _device(model)
    maps = []
    with _evaluating(model):
        for s in _chunks(len(inputs), 128):
            x = inputs[s].to(device).requires_grad_(True)
            score = _logits(model(x)).gather(1, classes[s].to(device).view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
            maps.append(grad.abs().amax(1).detach().float().cpu())
    return torch.cat(maps)


def map_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two stacks of maps, per map: ``(N, …) × (N, …) → (N,)``.

    A map that is zero everywhere has similarity 0 to anything.
    """
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    return F.cosine_similarity(a, b, dim=1, eps=1e-12).float()


def share_closer(sim_a: torch.Tensor, sim_b: torch.Tensor) -> float:
    """Share of items where ``sim_a`` exceeds ``sim_b`` (a tie counts one half)."""
    return ((sim_a > sim_b).double() + 0.5 * (sim_a == sim_b).double()).mean().item()


def localization(
    teacher: nn.Module,
    students: Mapping[str, nn.Module],
    inputs: torch.Tensor,
    classes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Similarity of each student's class-evidence maps to the teacher's, per image.

    Maps are for ``classes`` (default: the teacher's predicted class, so every model explains the
    same decision). Grad-CAM at each model's last spatial layer when every model has one; else
    gradient saliency for all of them (one method for all, so the maps are comparable). Returns
    ``{"method", "layers", "classes", "maps": {name: (N, H, W)}, "similarity": {student: (N,)}}``.
    """
    models = {"teacher": teacher, **students}
    if classes is None:
        classes = predict(teacher, inputs).argmax(-1)
    layers = {name: spatial_layer(m, inputs) for name, m in models.items()}
    if all(layer is not None for layer in layers.values()):
        method = "grad-cam"
        maps = {name: gradcam(m, inputs, classes, layers[name]) for name, m in models.items()}  # type: ignore[arg-type]
    else:
        method = "saliency"
        layers = dict.fromkeys(models)
        maps = {name: saliency(m, inputs, classes) for name, m in models.items()}
    return {
        "method": method,
        "layers": layers,
        "classes": classes,
        "maps": maps,
        "similarity": {name: map_similarity(maps[name], maps["teacher"]) for name in students},
    }


# -- adversarial transfer -----------------------------------------------------------------------


def _bounded(x: torch.Tensor, lo: Any, hi: Any) -> torch.Tensor:
    if lo is not None:
        x = torch.max(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    if hi is not None:
        x = torch.min(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
    return x


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(_logits(model(x)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Any, lo: Any = None, hi: Any = None
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al., ICLR 2015), untargeted L∞:
    x' = clip(x + ε · sign(∇ₓ CE(model(x), y)), lo, hi).

    ``eps``, ``lo`` and ``hi`` are floats or tensors broadcastable to ``x`` (per channel for
    normalised images); ``lo``/``hi`` bound the valid input range (``None``: unbounded).
    """
    with _evaluating(model):
        return _bounded(
            x + torch.as_tensor(eps, dtype=x.dtype, device=x.device) * _loss_grad(model, x, y).sign(), lo, hi
        ).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Any,
    steps: int = 10,
    alpha: Any = None,
    lo: Any = None,
    hi: Any = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al., ICLR 2018), untargeted L∞, from x itself:
    x⁽ᵗ⁺¹⁾ = Π_{‖x'−x‖∞ ≤ ε, [lo, hi]} (x⁽ᵗ⁾ + α · sign(∇ CE(model(x⁽ᵗ⁾), y))), α = 2.5 ε / steps
    by default."""
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    step = eps_t * 2.5 / steps if alpha is None else torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    adv = x.clone()
    with _evaluating(model):
        for _ in range(steps):
            adv = adv + step * _loss_grad(model, adv, y).sign()
            adv = _bounded(torch.max(torch.min(adv, x + eps_t), x - eps_t), lo, hi).detach()
    return adv


def adversarial_transfer(
    teacher: nn.Module,
    students: Mapping[str, nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    eps: Any,
    attack: str = "pgd",
    steps: int = 10,
    lo: Any = None,
    hi: Any = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Success rate on each model of adversarial examples crafted on the teacher (white-box on it).

    Counted over the images that the teacher and every student classify correctly when clean
    (the same images for all, so the rates compare); success = the model misclassifies the
    adversarial version. Returns ``{"attack", "eps", "n", "success": {"teacher": r, name: r, …}}``;
    a student identical to the teacher has exactly the teacher's own rate.
    """
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack is 'fgsm' or 'pgd', got {attack!r}")
    device = _device(teacher)
    chunks = []
    for s in _chunks(len(inputs), batch_size):
        x, y = inputs[s].to(device), labels[s].to(device)
        if attack == "fgsm":
            chunks.append(fgsm(teacher, x, y, eps, lo, hi).cpu())
        else:
            chunks.append(pgd(teacher, x, y, eps, steps, lo=lo, hi=hi).cpu())
    adv = torch.cat(chunks) if chunks else inputs
    models = {"teacher": teacher, **students}
    clean = {name: predict(m, inputs).argmax(-1) == labels for name, m in models.items()}
    keep = torch.stack(list(clean.values())).all(0)
    fooled = {name: predict(m, adv[keep]).argmax(-1) != labels[keep] for name, m in models.items()}
    n = int(keep.sum())
    return {
        "attack": attack,
        "eps": eps,
        "n": n,
        "success": {name: f.float().mean().item() if n else float("nan") for name, f in fooled.items()},
    }


# -- invariance ---------------------------------------------------------------------------------


def shift(dx: int, dy: int, fill: Any = 0.0) -> Transform:
    """Translate images by ``dx`` pixels right and ``dy`` down, filling the uncovered border."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = torch.empty_like(x)
        out[...] = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1)  # per channel or one value
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[..., yd, xd] = x[..., ys, xs]
        return out

    return apply


def random_shift(max_px: int, fill: Any = 0.0, seed: int = 0) -> Transform:
    """Translate each image by its own random offset in [−max_px, max_px]² other than (0, 0)
    (what the bundled ``augment`` transform trains with), drawn with a fixed ``seed``."""
    offsets = [(dx, dy) for dx in range(-max_px, max_px + 1) for dy in range(-max_px, max_px + 1)]
    offsets.remove((0, 0))

    def apply(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(offsets), (len(x),), generator=g)
        out = torch.empty_like(x)
        for i, (dx, dy) in enumerate(offsets):
            rows = (pick == i).nonzero().flatten()
            if len(rows):
                out[rows] = shift(dx, dy, fill)(x[rows])
        return out

    return apply


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror images left to right."""
    return x.flip(-1)


def gaussian_noise(sigma: Any, seed: int = 0) -> Transform:
    """Add N(0, σ²) noise (``sigma`` per channel, in the inputs' units), drawn with a fixed ``seed``."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x + torch.as_tensor(sigma, dtype=x.dtype) * noise

    return apply


def invariance(
    models: Mapping[str, nn.Module], inputs: torch.Tensor, transforms: Mapping[str, Transform]
) -> dict[str, dict[str, dict[str, float]]]:
    """Prediction consistency of each model under each transformation.

    Returns ``{transform: {model: {"consistency": …, "agreement": …}}}``: consistency is the share
    of images whose top-1 class is unchanged by the transformation; agreement is top-1 agreement
    with the first model of ``models`` (the teacher) on the transformed images.
    """
    clean = {name: predict(m, inputs).argmax(-1) for name, m in models.items()}
    reference = next(iter(models))
    result: dict[str, dict[str, dict[str, float]]] = {}
    for tname, transform in transforms.items():
        moved = transform(inputs)
        preds = {name: predict(m, moved).argmax(-1) for name, m in models.items()}
        result[tname] = {
            name: {
                "consistency": (preds[name] == clean[name]).float().mean().item(),
                "agreement": (preds[name] == preds[reference]).float().mean().item(),
            }
            for name in models
        }
    return result


def per_class_agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Per true class c: ``"count"`` (images of c), ``"agreement"`` (share where the student's
    top-1 equals the teacher's), ``"student_acc"`` and ``"teacher_acc"``; NaN for an absent class."""
    s, t = student_logits.argmax(-1), teacher_logits.argmax(-1)
    count = torch.bincount(target, minlength=num_classes).double()

    def rate(hit: torch.Tensor) -> torch.Tensor:
        per = torch.bincount(target, weights=hit.double(), minlength=num_classes)
        return torch.where(count > 0, per / count.clamp_min(1), torch.full_like(per, float("nan")))

    return {
        "count": count,
        "agreement": rate(s == t),
        "student_acc": rate(s == target),
        "teacher_acc": rate(t == target),
    }
