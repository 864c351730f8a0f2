"""Build teachers and students by name, optionally with weights from a local file.

Name resolution in :func:`build_model`, first match wins:

1. the protege zoo (case-insensitive): the CIFAR KD zoo of :mod:`protege.models.cifar`
   (``resnet20``, ``resnet32x4``, ``wrn_40_2``, ``vgg13``, ``mobilenetv2``, ``shufflenetv2``, ...),
   the MNIST-scale networks of :mod:`protege.models.small` (``mlp``, ``lenet5``, ``cnn_m``, ...),
   the search spaces' families of :mod:`protege.models.nas` (``resnet_depth``, ``nb201``),
   the point-cloud backbones of :mod:`protege.models.pointcloud` (``pointnet``, ``dgcnn``,
   ``pointnet2``; ``in_chans`` is then the values per point)
   and anything added with :func:`register_model`;
2. an explicit source prefix: ``timm:NAME``, ``torchvision:NAME`` (or ``protege:NAME``);
3. a bare name timm knows (``timm.is_model``), built with
   ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``;
4. a bare name torchvision knows (``torchvision.models.list_models()``), built with
   ``torchvision.models.get_model(name, weights=None, num_classes=..., **kwargs)`` (and
   ``weights_backbone=None`` where the builder has it). torchvision models have no
   ``in_chans`` argument: for ``in_chans != 3`` the first ``nn.Conv2d`` is replaced by one with
   the same configuration and ``in_chans`` input channels, its weight initialised from the
   original's channel mean (scaled by ``3 / in_chans``, as timm adapts stems).

So ``vgg13`` is the CIFAR VGG-13 of the KD papers; the ImageNet one is ``timm:vgg13`` or
``torchvision:vgg13``. Nothing is ever downloaded: pretrained weights come only from ``weights``.

Every model returned has ``feature_modules: list[str]`` (stage outputs to tap with forward hooks,
shallow to deep) and, when one is found, ``classifier_name: str`` (path of the final
``nn.Linear``). Zoo models define them exactly (see the module docstrings); for timm they come
from ``model.feature_info`` and ``pretrained_cfg["classifier"]``, for torchvision from the
``layer1..layer4`` stages when present and the last ``nn.Linear`` with ``num_classes`` outputs
(best effort; ``feature_modules`` may be empty).

Vision-language models (CLIP-style dual encoders, open_clip and transformers CLIP) have their own
builder, :func:`protege.models.vlm.build_vl_model`, and their own directory format
(:func:`protege.models.vlm.save_vl_model`); the image towers of dual encoders come from here.
Sentence-embedding models (texts -> vectors: Transformer encoders read from sentence-transformers
folders, their layer-selected or narrower students) are in :mod:`protege.models.embedding`.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ProtegeError, unknown
from ..files import storable
from . import cifar, nas, pointcloud, small

__all__ = [
    "MODEL_SPEC",
    "build_model",
    "list_models",
    "load_model",
    "load_weights",
    "register_model",
    "save_model",
]

_ZOO: dict[str, Callable[..., nn.Module]] = {**cifar.MODELS, **small.MODELS, **nas.MODELS, **pointcloud.MODELS}
_ALIASES: dict[str, str] = dict(cifar.ALIASES)
_PREFIXES = ("protege", "timm", "torchvision")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def register_model(name: str, builder: Callable[..., nn.Module] | None = None) -> Callable[..., Any]:
    """Add a model to the protege zoo, directly or as a decorator.

    ``builder(num_classes=..., in_chans=..., **kwargs)`` must return an ``nn.Module``; it should
    set ``feature_modules`` and ``classifier_name`` (see the module docstring).

    Args:
        name: the name :func:`build_model` will accept (stored lowercase).
        builder: the constructor; omit it to use ``@register_model("name")``.

    Returns:
        ``builder`` (or the decorator).

    Raises:
        ValueError: ``name`` is already in the zoo.
    """

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _ZOO or key in _ALIASES:
            raise ValueError(f"model {name!r} is already registered")
        _ZOO[key] = fn
        return fn

    return add(builder) if builder is not None else add


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models())


def _timm_has(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def list_models(pattern: str | None = None, *, external: bool = True) -> list[str]:
    """Names :func:`build_model` accepts.

    The zoo comes first (sorted), then timm's models, then torchvision's. Every listed string
    builds exactly that model: a timm name the zoo shadows is listed as ``timm:NAME``, a
    torchvision name the zoo or timm shadows as ``torchvision:NAME``. Aliases (``mobile_half``,
    ...) are accepted but not listed.

    Args:
        pattern: case-insensitive shell-style pattern (``"resnet*"``, ``"wrn_??_2"``); a pattern
            without ``*?[`` matches as a substring. Prefixed names match on the full string or on
            the bare name.
        external: include timm and torchvision names (importing those libraries on first use).

    Returns:
        The matching names.
    """
    names = sorted(_ZOO)
    if external:
        zoo = set(_ZOO)
        timm_names = _timm_names()
        names += [n if n not in zoo else f"timm:{n}" for n in timm_names]
        shadow = zoo | set(timm_names)
        names += [n if n not in shadow else f"torchvision:{n}" for n in sorted(_torchvision_names())]
    if pattern is None:
        return names
    pat = pattern.lower()
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    return [n for n in names if fnmatch.fnmatchcase(n.lower(), pat) or fnmatch.fnmatchcase(_bare(n), pat)]


def _bare(name: str) -> str:
    prefix, sep, rest = name.partition(":")
    return rest.lower() if sep and prefix.lower() in _PREFIXES else name.lower()


def build_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name (zoo, timm or torchvision; see the module docstring).

    Args:
        name: a zoo name, ``timm:NAME``, ``torchvision:NAME`` or a bare timm/torchvision name.
        num_classes: classifier outputs.
        in_chans: input image channels.
        weights: optional local weights, see :func:`load_weights`. Never downloaded.
        **kwargs: passed to the model constructor (e.g. ``hidden_sizes`` for ``mlp``,
            ``width_mult`` for ``mobilenetv2``, ``drop_rate`` for timm models).

    Returns:
        The model (in training mode), with ``feature_modules`` and ``classifier_name``.

    Raises:
        ProtegeError: unknown name, bad constructor arguments, unreadable or unfitting weights.
    """
    if not isinstance(name, str) or not name.strip():
        raise ProtegeError(f"model name must be a non-empty string, got {name!r}")
    if kwargs.pop("pretrained", False):
        raise ProtegeError(
            "pretrained=True is not supported: protege never downloads weights; pass weights=PATH to a local file"
        )
    name = name.strip()
    prefix, sep, rest = name.partition(":")
    source = prefix.lower() if sep and prefix.lower() in _PREFIXES else None
    bare = rest if source else name

    if source in (None, "protege"):
        key = _ALIASES.get(bare.lower(), bare.lower())
        if key in _ZOO:
            model = _build_zoo(key, num_classes, in_chans, kwargs)
        elif source == "protege":
            raise unknown("protege model", bare, list(_ZOO))
        elif _timm_has(bare):
            model = _build_timm(bare, num_classes, in_chans, kwargs)
        elif bare in _torchvision_names():
            model = _build_torchvision(bare, num_classes, in_chans, kwargs)
        else:
            raise unknown("model", name, [*_ZOO, *_ALIASES, *_timm_names(), *_torchvision_names()])
    elif source == "timm":
        if not _timm_has(bare):
            raise unknown("timm model", bare, _timm_names())
        model = _build_timm(bare, num_classes, in_chans, kwargs)
    else:
        if bare not in _torchvision_names():
            raise unknown("torchvision model", bare, _torchvision_names())
        model = _build_torchvision(bare, num_classes, in_chans, kwargs)

    if weights is not None:
        load_weights(model, weights, model_name=name, num_classes=num_classes, in_chans=in_chans)
    return model


def _build_zoo(key: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    builder = _ZOO[key]
    try:
        inspect.signature(builder).bind(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise ProtegeError(f"model {key!r} does not accept these arguments: {e}") from None
    except ValueError:  # no signature available
        pass
    try:
        return builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        # a value of the wrong type or out of range (a negative width, a size whose weights
        # cannot be allocated): the user's kwargs, not a bug of the model
        if kwargs:
            raise ProtegeError(
                f"model {key!r} does not accept the arguments {kwargs}: {str(e).splitlines()[0]}; "
                "fix or remove them (see the model's docstring)"
            ) from None
        raise


def _build_timm(name: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    features: list[str] = []
    for info in getattr(model, "feature_info", None) or []:
        module = info.get("module") if isinstance(info, Mapping) else None
        if module and _resolves(model, module):
            features.append(module)
    model.feature_modules = features
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(head, str) and isinstance(_get(model, head), nn.Linear):
        model.classifier_name = head
    else:
        _set_last_linear(model, num_classes)
    return model


def _build_torchvision(name: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    if "weights_backbone" in params:
        kwargs.setdefault("weights_backbone", None)  # never fetch an ImageNet backbone
    if kwargs.get("weights_backbone") is not None:
        raise ProtegeError("protege never downloads weights; leave weights_backbone unset")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ProtegeError(
            f"torchvision model {name!r} cannot be built with num_classes/{sorted(kwargs)}: {e}"
        ) from e
    if in_chans != 3:
        _replace_first_conv(model, in_chans, name)
    model.feature_modules = [f"layer{i}" for i in range(1, 5) if _resolves(model, f"layer{i}")]
    _set_last_linear(model, num_classes)
    return model


def _replace_first_conv(model: nn.Module, in_chans: int, name: str) -> None:
    first = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ProtegeError(f"torchvision model {name!r} has no Conv2d to adapt to in_chans={in_chans}")
    path, module = first
    if module.groups != 1:
        raise ProtegeError(
            f"cannot adapt the grouped first convolution {path!r} of {name!r} to in_chans={in_chans}"
        )
    new = nn.Conv2d(
        in_chans,
        module.out_channels,
        module.kernel_size,  # type: ignore[arg-type]
        stride=module.stride,  # type: ignore[arg-type]
        padding=module.padding,  # type: ignore[arg-type]
        dilation=module.dilation,  # type: ignore[arg-type]
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    ).to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        mean = module.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.expand(-1, in_chans, -1, -1) * (3.0 / in_chans))
        if module.bias is not None:
            new.bias.copy_(module.bias)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _resolves(model: nn.Module, path: str) -> bool:
    return _get(model, path) is not None


def _set_last_linear(model: nn.Module, num_classes: int) -> None:
    last = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if last:
        model.classifier_name = last[-1]


# --------------------------------------------------------------------------- weights


def _read_state_dict(path: Path) -> dict[str, Any]:
    if path.is_dir():
        inner = path / "model.safetensors"
        if not inner.is_file():
            raise ProtegeError(f"weights directory {path} has no model.safetensors")
        path = inner
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        if suffix not in _TORCH_SUFFIXES:
            raise ProtegeError(
                f"unsupported weights file {path}: expected .safetensors, "
                f"{', '.join(_TORCH_SUFFIXES)} or a checkpoint directory containing model.safetensors"
            )
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except ProtegeError:
        raise
    except Exception as e:  # corrupt file, pickled objects refused by weights_only, ...
        raise ProtegeError(f"could not read weights {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "student"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ProtegeError(
            f"weights {path} hold no state dict (a mapping of names to tensors, possibly under "
            "'state_dict' or 'model'); save one with torch.save(model.state_dict(), path)"
        )
    return dict(obj)


def _strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in ("module.", "student.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def _classifier_only(
    model: nn.Module, state_dict: Mapping[str, Any], expected: Mapping[str, Any], mismatched: list[str]
) -> int | None:
    """The file's class count when the classifier's output size is the only difference."""
    head = getattr(model, "classifier_name", None)
    if not head or not set(mismatched) <= {f"{head}.weight", f"{head}.bias"}:
        return None
    file_w, model_w = state_dict.get(f"{head}.weight"), expected.get(f"{head}.weight")
    if file_w is None or model_w is None or tuple(file_w.shape[1:]) != tuple(model_w.shape[1:]):
        return None
    return int(file_w.shape[0])


def _matching_zoo_models(state_dict: Mapping[str, Any], in_chans: int) -> list[str]:
    """Zoo models (built shape-only, on the meta device) the file fits, with their class count."""
    fits: list[str] = []
    seen: set[int] = set()
    for name, builder in _ZOO.items():
        if id(builder) in seen:  # e.g. mobilenetv2_half is mobilenetv2
            continue
        seen.add(id(builder))
        try:
            with torch.device("meta"):
                candidate = builder(num_classes=1, in_chans=in_chans)
        except Exception:  # a registered builder that cannot run on meta
            continue
        translate = getattr(candidate, "translate_legacy_keys", None)
        sd = translate(state_dict) if callable(translate) else state_dict
        expected = candidate.state_dict()
        if set(expected) - set(sd) - {k for k in expected if k.endswith("num_batches_tracked")} or set(
            sd
        ) - set(expected):
            continue
        mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
        classes = _classifier_only(candidate, sd, expected, mismatched) if mismatched else 1
        if classes is not None:
            fits.append(f"{name} (num_classes={classes})")
    return fits


def _hint(
    model: nn.Module,
    raw: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    mismatched: list[str],
    missing: list[str],
    unexpected: list[str],
    in_chans: int | None,
) -> str:
    classes = None if missing or unexpected else _classifier_only(model, state_dict, expected, mismatched)
    if classes is not None:
        head = getattr(model, "classifier_name", "")
        return f"the file's classifier {head!r} has {classes} outputs: pass num_classes={classes}"
    fits = _matching_zoo_models(raw, in_chans or 3)
    if fits:
        return "the weights fit the zoo model " + " or ".join(fits[:3]) + ": check the model name"
    return "check that the model name, num_classes and in_chans are those the weights were trained with"


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_diff(
    state_dict: Mapping[str, Any], expected: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mismatched)``: keys of ``expected`` absent from ``state_dict``, keys of
    ``state_dict`` the model lacks, and keys in both whose shapes differ."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def diff_lines(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> list[str]:
    """The indented lines of a load error listing shape mismatches, missing and unexpected keys."""
    lines = []
    if mismatched:
        shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}): {_listing(shapes)}")
    if missing:
        lines.append(f"  missing from the file ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {_listing(unexpected)}")
    return lines


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
) -> nn.Module:
    """Load a local state dict into ``model`` strictly, with a readable error on mismatch.

    Accepted files: ``.safetensors``; a protege checkpoint directory containing
    ``model.safetensors``; a protege run directory (its best checkpoint); ``.pt``/``.pth``/``.bin``/``.ckpt``/``.tar`` read with
    ``torch.load(..., weights_only=True)``, holding a state dict or a dict with the state dict
    under ``state_dict``/``model``/``model_state_dict``/``student`` (so RepDistiller and mdistiller
    teacher checkpoints load). A ``module.``/``student.``/``_orig_mod.`` prefix shared by all
    keys is stripped, reference-implementation key names are translated for zoo models, and
    BatchNorm ``num_batches_tracked`` counters missing from the file are kept as they are.

    Args:
        model: the model to fill, in place.
        weights: path of the file or directory.
        model_name, num_classes, in_chans: what the model was built with, quoted in errors.

    Returns:
        ``model``.

    Raises:
        ProtegeError: the file is missing or unreadable, or its tensors do not fit ``model``
            (the message lists up to 5 missing/unexpected keys and shape mismatches).
    """
    path = Path(weights).expanduser()
    if not path.exists():
        raise ProtegeError(f"weights file not found: {path}")
    pointers = path / "checkpoints" / "pointers.json"
    if path.is_dir() and not (path / "model.safetensors").exists() and pointers.is_file():
        # a protege run directory stands for its best checkpoint (its last, if it kept no best)
        marks = json.loads(pointers.read_text())
        which = marks.get("best") or marks.get("last")
        if which is None:
            raise ProtegeError(f"the run {path} has no checkpoint yet (did it finish an epoch?)")
        path = path / "checkpoints" / which
    raw = _strip_prefixes(_read_state_dict(path))
    translate = getattr(model, "translate_legacy_keys", None)
    state_dict = dict(translate(raw)) if callable(translate) else dict(raw)

    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    missing, unexpected, mismatched = key_diff(state_dict, expected)
    if missing or unexpected or mismatched:
        what = f"model {model_name!r}" if model_name else f"the {type(model).__name__}"
        built = ", ".join(
            f"{k}={v}" for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None
        )
        lines = [f"weights {path} do not fit {what}" + (f" ({built})" if built else "") + ":"]
        lines += diff_lines(state_dict, expected, missing, unexpected, mismatched)
        lines.append(
            "  " + _hint(model, raw, state_dict, expected, mismatched, missing, unexpected, in_chans)
        )
        raise ProtegeError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
    return model


# --------------------------------------------------------------------------- a model directory

#: the file beside ``model.safetensors`` that says how to build the model (``protege export --format native``)
MODEL_SPEC = "protege_model.json"


def save_model(
    model: nn.Module,
    directory: str | os.PathLike[str],
    name: str,
    num_classes: int,
    in_chans: int,
    kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a directory :func:`load_model` reads back: ``model.safetensors`` (its state
    dict) and ``protege_model.json`` (the :func:`build_model` arguments: name, num_classes, in_chans,
    kwargs). ``build_model(name, num_classes, in_chans, weights=directory, **kwargs)`` loads it too.

    Raises:
        ProtegeError: the kwargs are not JSON values, or the weights do not fit the model ``name``
            builds (checked by building it on the meta device).
    """
    from safetensors.torch import save_file

    out = Path(directory)
    kwargs = dict(kwargs or {})
    spec = {
        "format": "protege-model",
        "model": name,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "kwargs": kwargs,
    }
    try:
        text = json.dumps(spec, indent=2)
    except TypeError as e:
        raise ProtegeError(
            f"model {name!r}: its kwargs are not JSON values ({e}), so no spec can record them"
        ) from None
    state = model.state_dict()
    with torch.device("meta"):
        expected = build_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs).state_dict()
    if set(expected) != set(state) or any(tuple(expected[k].shape) != tuple(state[k].shape) for k in state):
        raise ProtegeError(
            f"the model to save is not what build_model({name!r}, ...) builds (its state-dict keys or shapes "
            "differ: e.g. a method that predicts through extra modules); export it as onnx instead"
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(storable(state), str(out / "model.safetensors"), metadata={"protege_model": name})
    (out / MODEL_SPEC).write_text(text + "\n")
    return out


def load_model(directory: str | os.PathLike[str]) -> nn.Module:
    """The model a directory written by :func:`save_model` (``protege export --format native``)
    holds, built and loaded (in eval mode).

    Raises:
        ProtegeError: no ``protege_model.json`` (a timm export loads with
            ``timm.create_model("local-dir:<dir>", pretrained=True)``), an unreadable spec, or
            weights that do not fit.
    """
    path = Path(directory).expanduser()
    spec_file = path / MODEL_SPEC
    if not spec_file.is_file():
        hint = (
            f"; it is a timm export: timm.create_model('local-dir:{path}', pretrained=True) loads it"
            if (path / "config.json").is_file()
            else ""
        )
        raise ProtegeError(f"{path} holds no {MODEL_SPEC} (not a protege model directory){hint}")
    try:
        spec = json.loads(spec_file.read_text())
        name, num_classes, in_chans = spec["model"], int(spec["num_classes"]), int(spec["in_chans"])
        kwargs = dict(spec.get("kwargs") or {})
    except (ValueError, KeyError, TypeError) as e:
        raise ProtegeError(
            f"{spec_file} is damaged ({type(e).__name__}: {e}); export the model again"
        ) from None
    model = build_model(name, num_classes=num_classes, in_chans=in_chans, weights=path, **kwargs)
    return model.eval()
