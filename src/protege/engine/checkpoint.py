"""Checkpoints in safetensors (+ JSON for the non-tensor parts), written atomically.

Layout of ``<run>/checkpoints/``::

    epoch_0003/              one directory per saved epoch, renamed into place when complete
        model.safetensors    the plain student (loadable by build_model(..., weights=dir))
        distiller.safetensors  trainable parts beside the student (adapters, learned temperatures)
        optimizer.safetensors + optimizer.json
        rng.safetensors + trainer.json   (epoch, step, best metric, scheduler, Python/NumPy RNG)
        callbacks.safetensors  state of fit's callbacks (e.g. a data-free generator), when any
        manifest.json        every file's size and SHA-256, written last
    pointers.json            {"last": "epoch_0003", "best": "epoch_0002"}, replaced atomically

A reader only ever sees complete checkpoints: a directory becomes visible by ``os.replace`` of a
finished temporary directory, and the pointer file is written to a temp file and renamed.
No pickle is involved anywhere.

What the rename cannot prevent (a disk that loses or truncates files later, a copy that stopped
halfway, a hand edit) the manifest catches: :func:`verify_checkpoint` checks every file's size and
SHA-256, and :func:`intact_checkpoint` falls back from a damaged checkpoint to the newest intact
one, saying what it skipped and why. A kill during a write leaves a ``.epoch_NNNN.*`` temp folder;
:func:`remove_partial_checkpoints` clears them when the run is next started or resumed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ProtegeError
from ..files import (
    atomic_write_text,
    creatable_dir_problem,
    fsync_dir,
    sha256_file,
    storable,
    write_durable,
)

POINTERS = "pointers.json"
MANIFEST = "manifest.json"
#: the files every checkpoint has (the others are optional)
REQUIRED = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer.json")
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


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
        files = sorted(f for f in tmp.iterdir() if f.is_file())
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files}
        write_durable(tmp / MANIFEST, json.dumps({"epoch": epoch, "files": manifest}, indent=1).encode())
        fsync_dir(tmp)
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
    """``pointers.json`` of a checkpoints folder; ``{}`` when there is none.

    A damaged pointer file (truncated, not JSON) is rebuilt in memory from the checkpoint folders
    themselves: ``last`` is the newest ``epoch_NNNN``, ``best`` the best epoch its ``trainer.json``
    records when that folder exists (else ``last``). Nothing is written here."""
    path = ckpt_root / POINTERS
    if not path.exists():
        return {}
    try:
        pointers = json.loads(path.read_text())
        if isinstance(pointers, dict) and isinstance(pointers.get("last"), str):
            return pointers
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return _pointers_from_folders(ckpt_root)


def _epoch_dirs(ckpt_root: Path) -> list[Path]:
    """The ``epoch_NNNN`` folders, newest first."""
    found = [d for d in ckpt_root.glob("epoch_*") if d.is_dir() and _EPOCH_DIR.match(d.name)]
    return sorted(found, key=lambda d: int(d.name.split("_")[1]), reverse=True)


def _pointers_from_folders(ckpt_root: Path) -> dict[str, str]:
    folders = _epoch_dirs(ckpt_root)
    if not folders:
        return {}
    last = folders[0].name
    best = last
    try:
        best_epoch = json.loads((folders[0] / "trainer.json").read_text())["best"]["epoch"]
        if (ckpt_root / f"epoch_{int(best_epoch):04d}").is_dir():
            best = f"epoch_{int(best_epoch):04d}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"last": last, "best": best}


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used, or ``None`` when it is intact.

    With a manifest (every checkpoint written since manifests exist): each listed file is present,
    has its size and its SHA-256. Without one (older checkpoints): the required files are present
    and non-empty and the JSON parts parse."""
    if not path.is_dir():
        return "its folder is missing"
    manifest_file = path / MANIFEST
    if manifest_file.exists():
        try:
            files = json.loads(manifest_file.read_text())["files"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return f"{MANIFEST} is damaged"
        for name in REQUIRED:
            if name not in files:
                return f"{MANIFEST} does not list {name}"
        for name, info in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != info["bytes"]:
                return f"{name} has {size} bytes, {info['bytes']} were written"
            if sha256_file(file) != info["sha256"]:
                return f"{name} does not match its SHA-256"
        return None
    for name in REQUIRED:
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is missing or empty"
    for name in ("trainer.json", "optimizer.json"):
        try:
            json.loads((path / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{name} is damaged"
    return None


def _pointed(run_dir: str | Path, which: str) -> Path:
    """The folder ``pointers.json`` names for ``which`` (not verified)."""
    root = Path(run_dir) / "checkpoints"
    pointers = read_pointers(root)
    if which not in pointers:
        raise ProtegeError(
            f"no {which} checkpoint in {root}: was the run started (and did it finish an epoch)?"
        )
    return root / pointers[which]


def intact_checkpoint(run_dir: str | Path, which: str = "last") -> tuple[Path, list[str]]:
    """The checkpoint ``which`` points to if it is intact, else the newest intact older one.

    Returns the folder and one note per checkpoint skipped (its name and why), for the caller to
    show. Raises a :class:`ProtegeError` naming every damaged checkpoint when none is intact."""
    target = _pointed(run_dir, which)
    root = target.parent
    match = _EPOCH_DIR.match(target.name)
    newest = int(match.group(1)) if match else None
    candidates = [target] + [
        d for d in _epoch_dirs(root) if d != target and (newest is None or int(d.name[6:]) < newest)
    ]
    skipped: list[str] = []
    for folder in candidates:
        reason = verify_checkpoint(folder)
        if reason is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {reason}")
    raise ProtegeError(
        f"no intact checkpoint in {root} ({'; '.join(skipped)}). Start the run again with --overwrite"
    )


def remove_partial_checkpoints(ckpt_root: Path) -> list[str]:
    """Remove the temp folders (``.epoch_NNNN.*``) and pointer files (``.pointers.json.*.tmp``)
    that a kill during a checkpoint write leaves; returns their names."""
    removed = []
    for tmp in ckpt_root.glob(".epoch_*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp.name)
    for tmp in ckpt_root.glob(f".{POINTERS}.*.tmp"):  # atomic_write_text's temp file, never renamed
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return sorted(removed)


def check_writable(run_dir: str | Path) -> None:
    """Refuse a run directory that cannot be created or written (a file in its way, no permission);
    creates nothing."""
    problem = creatable_dir_problem(Path(run_dir))
    if problem is not None:
        raise ProtegeError(
            f"cannot write the run directory {run_dir}: {problem}. Choose another output_dir or name"
        )


def check_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to resume a run that has no checkpoint, or to start over one that has, unasked, and a
    run directory that cannot be written (:func:`check_writable`)."""
    check_writable(run_dir)
    has_run = bool(read_pointers(Path(run_dir) / "checkpoints"))
    if resume and not has_run:
        raise ProtegeError(f"cannot resume: no checkpoint in {run_dir}. Start the run without --resume.")
    if not resume and not overwrite and has_run:
        raise ProtegeError(
            f"{run_dir} already holds a run. Resume it with --resume, start over with --overwrite, "
            "or choose another name."
        )


def checkpoint_dir(run_dir: str | Path, which: str = "last") -> Path:
    """The directory of a run's ``last`` or ``best`` checkpoint, verified (:func:`verify_checkpoint`):
    a damaged one is a :class:`ProtegeError` that says what is wrong (resuming falls back to an
    intact one; reading a damaged checkpoint's weights never happens silently)."""
    path = _pointed(run_dir, which)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ProtegeError(
            f"the {which} checkpoint {path} is damaged ({reason}); resume the run (--resume) to continue "
            "from the newest intact checkpoint, or train it again"
        )
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read every part of a checkpoint directory (RNG state is returned, not applied).

    A part that cannot be read is a :class:`ProtegeError` naming the file (check a folder first
    with :func:`verify_checkpoint`, or pick one with :func:`intact_checkpoint`)."""
    try:
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
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ProtegeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None


def check_fits(
    run_dir: str | Path, student: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor]
) -> None:
    """Refuse a resume whose checkpoint does not fit the run's models, before anything is written:
    the tensors of the checkpoint :func:`fit` will resume from (see :func:`intact_checkpoint`) must
    be the ``student`` state's (same names and shapes), and the trainable parts beside it
    (``extra``: adapters, learned temperatures) must have the same shapes where both have them.
    Reads only the tensors' shapes."""
    last, _ = intact_checkpoint(run_dir, "last")

    def shapes(path: Path) -> dict[str, list[int]]:
        if not path.is_file():
            return {}
        with safe_open(path, "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    saved = shapes(last / "model.safetensors")
    problems = [f"{k} is not in the checkpoint" for k in student if k not in saved]
    problems += [f"the checkpoint has {k}, the student not" for k in saved if k not in student]
    for own, stored in ((student, saved), (extra, shapes(last / "distiller.safetensors"))):
        problems += [
            f"{k}: {list(v.shape)} here, {stored[k]} in the checkpoint"
            for k, v in own.items()
            if k in stored and list(v.shape) != stored[k]
        ]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ProtegeError(
            f"checkpoint {last} does not fit this run's models ({shown}): resume with the config the run "
            "was started with"
        )


def restore_rng(rng: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
    """Apply the RNG state saved in a checkpoint (torch, CUDA, Python, NumPy)."""
    _restore_rng(*rng)
