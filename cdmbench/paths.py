"""Validation of user-given names and paths, devices and counts, before anything is written.

A *name* (run name, external row name, checkpoint pointer content) becomes one path component under a
folder cdmbench owns: it must be a plain name (letters, digits, ``._-+@=``, not starting with a dot), so it
can never resolve outside its parent. A *path* the user typed explicitly (``--workspace``, ``--out``) is taken
as given, but checked to be a folder that can be written (or created) before any work starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cdmbench.errors import CdmbenchError

_NAME = re.compile(r"[A-Za-z0-9_+@=-][A-Za-z0-9._+@=-]{0,127}")

# Upper bounds on counts a user types: far above any real use, low enough that building the list is cheap
# (an eval of 10^6 images per row, or a 10^4-step sampler, is already a mistake).
MAX_STEPS = 1000  # sampler steps of one row
MAX_SEEDS = 10_000  # seeds per prompt
MAX_LIST = 10_000  # entries of any --steps/--seeds list
MAX_INT = 2**31 - 1  # any single integer value (seeds are mixed into 63-bit generator seeds)
MAX_BATCH = 65_536  # generation / training batch size
MAX_PROMPTS = 1_000_000  # prompts of one eval
MAX_TRAIN_STEPS = 100_000_000  # training iterations


def check_name(value: str, what: str) -> str:
    """``value`` if it is a plain name (one path component that stays inside its parent), else one clear error.

    Args:
        value: the name as the user typed it.
        what: the option it came from, e.g. ``"--run-name"``; named in the error.
    """
    v = str(value)
    if not _NAME.fullmatch(v):
        raise CdmbenchError(
            f"{what}: {value!r} is not a plain name; use letters, digits and . _ - + @ = (no '/', no leading '.', "
            f"at most 128 characters)")
    return v


def inside(parent: str | os.PathLike, name: str, what: str) -> Path:
    """``parent / name`` for a validated plain ``name`` (so it cannot resolve outside ``parent``)."""
    return Path(parent) / check_name(name, what)


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is (or can be created as) a writable folder; one clear error naming ``what`` otherwise.

    Creates nothing: walks up to the nearest existing ancestor and checks that it is a folder we may write.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise CdmbenchError(f"{what}: {p} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise CdmbenchError(f"{what}: folder {p} is not writable")
        return p
    anc = p.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise CdmbenchError(f"{what}: cannot create {p}: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise CdmbenchError(f"{what}: cannot create {p}: folder {anc} is not writable")
    return p


def check_readable_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is an existing folder (or does not exist yet); an existing non-folder is an error."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CdmbenchError(f"{what}: {p} exists and is not a folder")
    return p


def check_device(device: str, what: str = "--device") -> str:
    """``device`` if this torch knows it and it is present here; ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``…

    An unknown or absent device is an error, never a silent fall-back to the CPU.
    """
    import torch

    try:
        d = torch.device(str(device))
    except (RuntimeError, TypeError, ValueError):
        raise CdmbenchError(f"{what}: {device!r} is not a torch device; use cpu, cuda or cuda:N "
                            f"(or another accelerator this torch supports)") from None
    if d.type == "cpu":
        return str(device)
    mod = getattr(torch, d.type, None)
    available = getattr(mod, "is_available", None)
    if available is None or not available():
        raise CdmbenchError(f"{what}: device {device!r} is not available on this machine; use cpu"
                            + (" or cuda" if d.type != "cuda" and torch.cuda.is_available() else ""))
    count = getattr(mod, "device_count", lambda: 1)()
    if d.index is not None and d.index >= count:
        raise CdmbenchError(f"{what}: {device!r}: this machine has {count} {d.type} device(s)")
    return str(device)


def check_count(value: int | None, what: str, *, minimum: int = 1, maximum: int) -> int | None:
    """``value`` if it is None or an integer in [minimum, maximum]; one clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise CdmbenchError(f"{what} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return value


def check_int_tuple(name: str, values, minimum: int) -> None:
    """A non-empty tuple of distinct integers >= ``minimum`` (one line naming ``name`` otherwise)."""
    if not isinstance(values, tuple) or not values:
        raise CdmbenchError(f"{name}: expected a non-empty tuple of integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise CdmbenchError(f"{name}: every value must be an integer >= {minimum}, got {v!r}")
    if len(set(values)) != len(values):
        raise CdmbenchError(f"{name}: duplicate values in {values}")


def check_name_tuple(name: str, values) -> None:
    """A non-empty tuple of distinct, non-blank names (one line naming ``name`` otherwise)."""
    if not isinstance(values, tuple) or not values or any(not str(v).strip() for v in values):
        raise CdmbenchError(f"{name}: expected a non-empty tuple of names, got {values!r}")
    if len(set(values)) != len(values):
        raise CdmbenchError(f"{name}: duplicate names in {values}")
