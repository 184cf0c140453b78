"""Atomic file writes, locked appends and guarded reads.

- Writes go to a temporary file in the same folder, are fsynced and renamed over the target: a reader never
  sees a half-written file and a kill leaves the old one intact. The new file gets the usual permissions
  (``0666 & ~umask``), not ``mkstemp``'s owner-only ``0600``.
- ``locked(path)`` is an advisory ``flock`` on ``path.lock`` that serialises read-modify-write updates from
  several processes (two evals on one workspace).
- Reads of state cdmbench wrote (``read_json``, ``load_safetensors``) turn a missing, truncated or corrupt
  file into one ``CorruptStateError`` line naming the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cdmbench.errors import CorruptStateError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would create a file with: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` + ``.lock`` (created beside it) for the block; the lock file is
    removed when the block ends, so none is left behind.

    Removal is safe with several processes: the holder unlinks the file before unlocking, and a process that
    then gets the lock of an unlinked file sees that its file is no longer the one at the path and locks again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    while True:
        f = open(lock, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder before us removed this file: lock the current one
    try:
        yield
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "", fix: str = "") -> Any:
    """The JSON in ``path``; a missing, unreadable or invalid file is one ``CorruptStateError`` line.

    Args:
        what: what the file is (e.g. "run config"), for the message.
        fix: what the user can do about it, appended to the message.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CorruptStateError(f"{label} is missing" + (f"; {fix}" if fix else "")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptStateError(f"cannot read {label} ({type(e).__name__}: {e})" + (f"; {fix}" if fix else "")) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptStateError(f"{label} is not valid JSON (line {e.lineno}: {e.msg})"
                                + (f"; {fix}" if fix else "")) from None


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_safetensors(path: str | os.PathLike, *, fix: str = "") -> dict:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is one ``CorruptStateError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CorruptStateError(f"weights file {path} is missing" + (f"; {fix}" if fix else ""))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CorruptStateError(f"weights file {path} is truncated or corrupt ({reason})"
                                + (f"; {fix}" if fix else "")) from None
