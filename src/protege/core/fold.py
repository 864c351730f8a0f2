"""Fold BatchNorm into the preceding convolution of a frozen model (a cheaper teacher forward).

A teacher runs in ``eval()``: each BatchNorm applies a fixed affine map per channel, which can be
merged into the convolution that feeds it,

    W' = W · γ / sqrt(σ² + ε)   (per output channel),   b' = (b − μ) · γ / sqrt(σ² + ε) + β,

and the BatchNorm replaced by an identity. The result computes the same function (up to float
rounding) with one pass over the activations less per conv–BN pair.

The model's module tree is kept (only the BatchNorm modules become ``nn.Identity``), so taps by
module path still work: a tap on a folded BatchNorm reads exactly what it read before (the
folded convolution's output is the BatchNorm's). A pair is folded only when it is safe:

- the graph traced by ``torch.fx`` shows the convolution's output used by that BatchNorm alone,
  and each module is called once (no weight sharing);
- neither the convolution nor the BatchNorm is in ``keep`` (a tap on the convolution itself would
  otherwise read normalised values);
- the BatchNorm tracks running statistics and the model is frozen (nothing requires grad).

A model ``torch.fx`` cannot trace (data-dependent control flow) is left unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def fold_batchnorm(model: nn.Module, keep: Iterable[str] = ()) -> list[str]:
    """Fold every safe conv→BatchNorm pair of the frozen ``model`` in place; return the folded
    BatchNorm paths. ``keep``: module paths (taps; a ``:in`` suffix is ignored) not to touch."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("fold_batchnorm changes weights: only a frozen model (no parameter requiring grad)")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # not traceable: leave it as it is
        return []
    kept = {k.split(":")[0] for k in keep}
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats or bn.running_mean is None:
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module":
            continue
        conv = modules.get(prev.target)
        if not isinstance(conv, nn.Conv2d) or len(prev.users) != 1:
            continue
        if calls[prev.target] != 1 or calls[node.target] != 1 or {prev.target, node.target} & kept:
            continue
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        with torch.no_grad():
            conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
            conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
        parent_path, _, name = node.target.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, nn.Identity())
        folded.append(node.target)
    return folded
