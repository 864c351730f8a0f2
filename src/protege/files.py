"""Files that are never half written: atomic text and safetensors writes, and staged directories.

Everything protege writes into a run, a cache or a synthetic set goes through here: a file is
written beside its destination and renamed into place (``os.replace``), a directory is assembled
beside its destination, fsync'ed and renamed, so a reader (or a crash) only ever sees complete
files. This module sits at the bottom of the package: any layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import ProtegeError

__all__ = [
    "atomic_save_tensors",
    "atomic_write_text",
    "commit_dir",
    "creatable_dir_problem",
    "digest",
    "exclusive_lock",
    "fsync_dir",
    "replace_dir",
    "sha256_file",
    "staged_dir",
    "storable",
    "write_durable",
]


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each with storage of its own: tensors sharing storage
    (tied weights, e.g. an LM's input and output embeddings) are copied, since safetensors refuses
    shared storage; loading the copies back restores the tie."""
    seen: set[int] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        plain[key] = value.clone() if value.numel() and ptr in seen else value
        seen.add(ptr)
    return plain


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors`` save through a temp file and a rename (tensors made contiguous, on CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(storable(tensors), tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a ``.jsonl`` file; a line that is not
    JSON, or not a JSON object, is a :class:`ProtegeError` naming ``path:line``, and so is a file
    that is not UTF-8 text."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProtegeError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProtegeError(f"{path}:{n} is not valid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise ProtegeError(f"{path}:{n} must hold a JSON object, not {type(record).__name__}")
        yield n, record


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """SHA-256 of a JSON-able value (keys sorted), stable across processes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (inside a staged directory, before its rename)."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A new directory beside ``out`` to write into (then :func:`commit_dir` it); removed on failure,
    so a crash leaves nothing half written at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp: Path, out: Path, index: dict[str, Any], index_name: str = "index.json") -> None:
    """Write ``index`` into the finished ``tmp`` directory, then move it to ``out`` (atomically)."""
    write_durable(tmp / index_name, json.dumps(index, indent=2).encode())
    fsync_dir(tmp)
    replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first, then removed."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "cache")
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def creatable_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be created and written into, or ``None`` when it can: its nearest
    existing ancestor (itself, when it exists) must be a directory this process may write in.
    Creates nothing: for checks before a run writes anything."""
    path = Path(os.path.abspath(directory))
    try:
        while not path.exists() and path != path.parent:
            path = path.parent
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        return f"it is not a usable path ({e})"
    if not path.is_dir():
        return f"{path} is a file, not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by this user"
    return None


LOCK = ".lock"
_held: dict[str, int] = {}  # directories this process holds the lock of, and how deeply


@contextlib.contextmanager
def exclusive_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s writer lock (``<directory>/.lock``) for the duration of the block.

    One writer per run: a second process that asks for the lock of a directory another holds gets
    a :class:`ProtegeError` naming the holder (pid, host, since when). The lock is an OS lock on the
    file (``fcntl.flock``), released by the kernel when its process ends however it ends, so a lock
    file left by a killed run never blocks the next one (no stale locks); the file keeps its last
    holder's description. The same process may nest the lock (``fit`` inside ``pg.run``). Creates
    ``directory`` if needed: validate before locking."""
    key = str(directory.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, directory)
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.write(fd, holder.encode())
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the lock


def _take(fd: int, directory: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one writer is not enforced
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        raise ProtegeError(
            f"{directory} is being written by {holder}: one writer per run. Wait for it to finish or "
            "stop it, or give this run another name"
        ) from None
