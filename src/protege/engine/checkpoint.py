"""Checkpoints in safetensors (+ JSON for the non-tensor parts), written atomically.

Layout of ``<run>/checkpoints/``::

    epoch_0003/              one directory per saved epoch, renamed into place when complete
        model.safetensors    the plain student (loadable by build_model(..., weights=dir))
        distiller.safetensors  trainable parts beside the student (adapters, learned temperatures)
        optimizer.safetensors + optimizer.json
        rng.safetensors + trainer.json   (epoch, step, best metric, scheduler, Python/NumPy RNG)
        callbacks.safetensors  state of fit's callbacks (e.g. a data-free generator), when any
    pointers.json            {"last": "epoch_0003", "best": "epoch_0002"}, replaced atomically

A reader only ever sees complete checkpoints: a directory becomes visible by ``os.replace`` of a
finished temporary directory, and the pointer file is written to a temp file and renamed.
No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ProtegeError
from ..files import atomic_write_text, storable

POINTERS = "pointers.json"


# -- optimizer state <-> tensors + JSON ----------------------------------------------------------


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(meta["python"]))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# -- save / load --------------------------------------------------------------------------------


def save_checkpoint(
    ckpt_root: Path,
    epoch: int,
    student: dict[str, torch.Tensor],
    extra: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    trainer: dict[str, Any],
    is_best: bool,
    keep_best: bool = True,
    callbacks: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint for ``epoch`` and point ``last`` (and ``best``) at it.

    ``callbacks``: the state of :class:`~protege.engine.callbacks.Callback` s (``callbacks.safetensors``)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}."))
    try:
        save_file(storable(student), tmp / "model.safetensors")
        if extra:
            save_file(storable(extra), tmp / "distiller.safetensors")
        if callbacks:
            save_file(storable(callbacks), tmp / "callbacks.safetensors")
        opt_tensors, opt_meta = _split_optimizer(optimizer)
        save_file(storable(opt_tensors), tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "rng": rng_meta}))
        final = ckpt_root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointers = read_pointers(ckpt_root)
    pointers["last"] = name
    if is_best or "best" not in pointers:
        pointers["best"] = name
    atomic_write_text(ckpt_root / POINTERS, json.dumps(pointers))
    keep = {pointers["last"]} | ({pointers["best"]} if keep_best else set())
    for old in ckpt_root.glob("epoch_*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_pointers(ckpt_root: Path) -> dict[str, str]:
    path = ckpt_root / POINTERS
    return json.loads(path.read_text()) if path.exists() else {}


def check_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to resume a run that has no checkpoint, or to start over one that has, unasked."""
    has_run = bool(read_pointers(Path(run_dir) / "checkpoints"))
    if resume and not has_run:
        raise ProtegeError(f"cannot resume: no checkpoint in {run_dir}. Start the run without --resume.")
    if not resume and not overwrite and has_run:
        raise ProtegeError(
            f"{run_dir} already holds a run. Resume it with --resume, start over with --overwrite, "
            "or choose another name."
        )


def checkpoint_dir(run_dir: str | Path, which: str = "last") -> Path:
    """The directory of a run's ``last`` or ``best`` checkpoint."""
    root = Path(run_dir) / "checkpoints"
    pointers = read_pointers(root)
    if which not in pointers:
        raise ProtegeError(
            f"no {which} checkpoint in {root}: was the run started (and did it finish an epoch)?"
        )
    return root / pointers[which]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read every part of a checkpoint directory (RNG state is returned, not applied)."""
    trainer = json.loads((path / "trainer.json").read_text())
    distiller_file = path / "distiller.safetensors"
    callbacks_file = path / "callbacks.safetensors"
    return {
        "callbacks": load_file(callbacks_file) if callbacks_file.exists() else {},
        "student": load_file(path / "model.safetensors"),
        "extra": load_file(distiller_file) if distiller_file.exists() else {},
        "optimizer": _join_optimizer(
            load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
        ),
        "trainer": trainer,
        "rng": (load_file(path / "rng.safetensors"), trainer["rng"]),
    }


def restore_rng(rng: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
    """Apply the RNG state saved in a checkpoint (torch, CUDA, Python, NumPy)."""
    _restore_rng(*rng)
