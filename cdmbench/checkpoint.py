"""Checkpoints: one folder per step, written to a temporary folder and renamed (atomic); weights in
safetensors, optimiser/RNG state loaded with ``weights_only=True``; a ``latest`` pointer file. A checkpoint is
verified before it is trusted (``verify_checkpoint``: recorded file sizes, parseable headers), and resuming
falls back to the newest intact one (``newest_intact_checkpoint``).

Network and optimiser states go through torch's distributed state-dict API
(``torch.distributed.checkpoint.state_dict``), the same calls for a plain module, a DDP-wrapped one and an
FSDP2-sharded one (DTensor parameters): states are *full* (unsharded), on the CPU, keyed by parameter names
(FQNs), so a checkpoint does not depend on the number of processes that wrote it. Taking a state is a
collective under FSDP2: every process calls it; with a process group, only rank 0 gets the tensors (the
other ranks get ``{}``). Loading expects the full state on every process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from cdmbench.errors import CdmbenchError, CorruptStateError
from cdmbench.io import atomic_path, load_safetensors, save_safetensors, write_text

CKPT_DIR = "checkpoints"
META = "meta.json"
TRAINING_STATE = "training_state.pt"
_STEP = re.compile(r"step_\d{7,}")
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_FIX_POINTER = "delete it and run `cdmbench train --resume` to continue from the newest intact checkpoint"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, nets: dict[str, dict], training_state: dict, extra: dict,
                    meta: dict, keep: int = 2) -> Path:
    """Write ``nets`` (name → state dict) as safetensors plus ``training_state.pt`` and ``meta.json``.

    ``meta.json`` is written last and lists every other file with its size (``files``), so
    ``verify_checkpoint`` can tell a complete checkpoint from a truncated or partly deleted one.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, state in nets.items():
        save_safetensors(state, tmp / f"{name}.safetensors")
    if extra:
        save_safetensors(extra, tmp / "method_state.safetensors")
    with atomic_path(tmp / TRAINING_STATE) as t:
        torch.save(training_state, t)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    write_text(tmp / META, json.dumps({"step": step, **meta, "files": files}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text(Path(run_dir) / CKPT_DIR / "latest", final.name + "\n")
    old = sorted(p for p in final.parent.glob("step_*") if p.is_dir() and _STEP.fullmatch(p.name))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names (None when there is none yet).

    The pointer's content must be a checkpoint folder name (``step_NNNNNNN``): anything else (a path, ``..``)
    is a ``CorruptStateError``, never joined into a path.
    """
    ptr = Path(run_dir) / CKPT_DIR / "latest"
    if not ptr.is_file():
        return None
    try:
        name = ptr.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptStateError(f"checkpoint pointer {ptr} is unreadable ({e}); {_FIX_POINTER}") from None
    if not _STEP.fullmatch(name):
        raise CorruptStateError(f"checkpoint pointer {ptr} holds {name[:60]!r}, not a checkpoint folder name "
                                f"(step_NNNNNNN); {_FIX_POINTER}")
    path = ptr.parent / name
    return path if path.is_dir() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """Every complete-looking checkpoint folder of a run (``step_NNNNNNN``), newest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP.fullmatch(p.name)), reverse=True)


def verify_checkpoint(path: Path) -> str:
    """Why checkpoint folder ``path`` cannot be trusted, in words; ``""`` when it is intact.

    Checks without loading the tensors: ``meta.json`` parses and names its step; every file it lists is
    present with the recorded size; every safetensors header parses; ``training_state.pt`` is present.
    Checkpoints written before file sizes were recorded are checked for the files alone.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        int(meta["step"])
    except FileNotFoundError:
        return f"{path / META} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path / META} is unreadable or incomplete ({type(e).__name__})"
    files = meta.get("files")
    if not isinstance(files, dict):
        files = {p.name: None for p in path.iterdir() if p.name != META}
    for required in (TRAINING_STATE, "student.safetensors", "student_ema.safetensors"):
        if required not in files:
            return f"{path} lists no {required}"
    for name, size in files.items():
        f = path / str(name)
        if not _FILE.fullmatch(str(name)) or not f.is_file():
            return f"{f} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} were written (truncated?)"
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:  # safetensors raises its own error types for a bad header
                return f"{f} is corrupt ({type(e).__name__})"
    return ""


def load_checkpoint(path: Path) -> tuple[dict[str, dict], dict, dict, dict]:
    """(nets, training_state, extra, meta) of a checkpoint folder; corruption is a ``CorruptStateError``."""
    path = Path(path)
    bad = verify_checkpoint(path)
    if bad:
        raise CorruptStateError(f"checkpoint {path} cannot be used: {bad}")
    fix = "the checkpoint is corrupt; `cdmbench train --resume` falls back to the previous intact one"
    nets = {p.stem: load_safetensors(p, fix=fix) for p in sorted(path.glob("*.safetensors"))
            if p.stem != "method_state"}
    extra = (load_safetensors(path / "method_state.safetensors", fix=fix)
             if (path / "method_state.safetensors").exists() else {})
    try:
        state = torch.load(path / TRAINING_STATE, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError … for a damaged file
        raise CorruptStateError(f"{path / TRAINING_STATE} is truncated or corrupt ({type(e).__name__}); {fix}") from None
    meta = json.loads((path / META).read_text())
    meta.pop("files", None)
    return nets, state, extra, meta


def load_newest_intact(run_dir: Path, networks: list[str]) -> tuple[Path | None, tuple | None, list[str]]:
    """(checkpoint, ``load_checkpoint`` result, notes) for the newest checkpoint of a run that verifies,
    loads, and holds every network in ``networks`` (plus ``student_ema``); notes say why newer ones did not.

    Tried newest first: the ``latest`` pointer's target and every ``step_*`` folder. (None, None, notes) when
    no checkpoint qualifies.
    """
    notes: list[str] = []
    try:
        pointed = latest_checkpoint(run_dir)
    except CorruptStateError as e:
        notes.append(str(e))
        pointed = None
    order = sorted({*([pointed] if pointed is not None else []), *checkpoints(run_dir)},
                   key=lambda p: p.name, reverse=True)
    for p in order:
        try:
            loaded = load_checkpoint(p)
        except CorruptStateError as e:
            notes.append(str(e))
            continue
        absent = [n for n in [*networks, "student_ema"] if n not in loaded[0]]
        if absent:
            notes.append(f"checkpoint {p} cannot be used: it has no weights for {absent}")
            continue
        return p, loaded, notes
    return None, None, notes


# ------------------------------------------------------------------------------------------------
# Full (unsharded) network and optimiser states, FSDP2-, DDP- and single-process-alike.


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _snapshot(state, live: list[torch.Tensor]):
    """``state`` (nested dicts and lists) with every tensor detached, and copied where it shares memory with
    a tensor of ``live`` (the local shard of a DTensor): a state that later steps do not change."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    ptrs = {(t.to_local() if isinstance(t, DTensor) else t).untyped_storage().data_ptr() for t in live}
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone() if t.untyped_storage().data_ptr() in ptrs
                         else t.detach(), state)


def state_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """How ``state`` differs from ``expected`` in keys and (global) shapes, in words; ``""`` when it does not."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    return ", ".join(f"{len(keys)} {what} (e.g. {keys[:2]})" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped)) if keys)


def full_model_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full state dict on the CPU, keyed by parameter names (no ``module.`` prefix of DDP).

    A snapshot: no tensor shares memory with the module (torch returns CPU parameters themselves; those
    are copied), so changing the module afterwards does not change it. A collective under FSDP2; with a
    process group, ranks other than 0 get ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _snapshot(get_model_state_dict(net, options=_full_options()), [*net.parameters(), *net.buffers()])


def load_full_model_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every process passes all of it) into ``net``; strict.

    torch's ``set_model_state_dict`` keeps the current value of a missing key without a word, so keys and
    shapes are checked here first: any missing, unexpected or reshaped key is a ``CdmbenchError``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    mismatch = state_mismatch(get_model_state_dict(net), state)  # local references (DTensors under FSDP2)
    if mismatch:
        raise CdmbenchError(f"weights do not match the network: {mismatch}")
    # a copy: torch adds the module's own tensors to the dict it is given
    set_model_state_dict(net, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser's full state on the CPU, keyed by the names of ``net``'s parameters (FQNs); a snapshot,
    like ``full_model_state``.

    ``opt`` may be accelerate's ``AcceleratedOptimizer``. An optimiser that has not stepped yet has no
    per-parameter state; torch initialises one with a zero-lr step before reading it (for AdamW: step
    count 1, which would change the bias correction of its first real step), so that is undone here and
    the state saved is empty, as it is in memory. A collective under FSDP2; ranks other than 0 get ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opt = getattr(opt, "optimizer", opt)
    unstepped = not opt.state
    state = get_optimizer_state_dict(net, opt, options=_full_options())
    if unstepped:
        opt.state.clear()
        if state:
            state["state"] = {}
    return _snapshot(state, [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)])


def load_full_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from ``full_optimizer_state`` (every process passes all of it) into ``opt``.

    The optimiser ends up with state for exactly the parameters the saved one had state for (torch would
    give the others the state of a zero-lr step); parameter names must match. A state in torch's own
    index-keyed format (checkpoints of cdmbench before FQN keys, from unsharded runs) is read too.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    opt = getattr(opt, "optimizer", opt)
    state = _fqn_keyed(net, opt, state)
    # the parameter names of ``opt`` (local, no collective; torch gives an unstepped optimiser state here)
    names = [g["params"] for g in get_optimizer_state_dict(net, opt)["param_groups"]]
    saved = [g["params"] for g in state["param_groups"]]
    if names != saved:
        differ = sorted(set(sum(saved, [])) ^ set(sum(names, [])))
        raise CdmbenchError(f"optimizer state does not match the network: {len(differ)} parameters in only one of "
                            f"them (e.g. {differ[:2]})" if differ else "optimizer state does not match the "
                            "network: its parameters are in another order or grouping")
    if state["state"]:  # (torch's loader would take an empty state for an index-keyed one)
        set_optimizer_state_dict(net, opt, state, options=StateDictOptions(full_state_dict=True, strict=False))
    stateful = set(state["state"])
    for group, saved_group, fqns in zip(opt.param_groups, state["param_groups"], names):
        group.update({k: v for k, v in saved_group.items() if k != "params"})  # what load_state_dict does
        for p, fqn in zip(group["params"], fqns):
            if fqn not in stateful:
                opt.state.pop(p, None)


def _fqn_keyed(net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> dict:
    """``state`` with parameter names for keys; torch's index-keyed format (an unsharded optimiser's
    ``state_dict()``: indices in the order of its param groups) converted by ``net``'s parameter names."""
    if not all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        return state
    names = {id(p): n for n, p in getattr(net, "module", net).named_parameters()}
    index = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    if len(index) != sum(len(g["params"]) for g in state["param_groups"]):
        raise CdmbenchError("optimizer state does not match the network's trainable parameters")
    return {"state": {index[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in state["param_groups"]]}
