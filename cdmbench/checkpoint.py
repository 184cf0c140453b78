"""Checkpoints: one folder per step, written to a temporary folder and renamed (atomic); weights in
safetensors, optimiser/RNG state loaded with ``weights_only=True``; a ``latest`` pointer file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from cdmbench.io import load_safetensors, save_safetensors, write_text

CKPT_DIR = "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, nets: dict[str, dict], training_state: dict, extra: dict,
                    meta: dict, keep: int = 2) -> Path:
    """Write ``nets`` (name → state dict) as safetensors plus ``training_state.pt`` and ``meta.json``."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, state in nets.items():
        save_safetensors(state, tmp / f"{name}.safetensors")
    if extra:
        save_safetensors(extra, tmp / "method_state.safetensors")
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text(Path(run_dir) / CKPT_DIR / "latest", final.name + "\n")
    old = sorted(p for p in final.parent.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    ptr = Path(run_dir) / CKPT_DIR / "latest"
    if not ptr.is_file():
        return None
    path = ptr.parent / ptr.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path) -> tuple[dict[str, dict], dict, dict, dict]:
    """(nets, training_state, extra, meta) of a checkpoint folder."""
    path = Path(path)
    nets = {p.stem: load_safetensors(p) for p in path.glob("*.safetensors") if p.stem != "method_state"}
    extra = load_safetensors(path / "method_state.safetensors") if (path / "method_state.safetensors").exists() else {}
    state = torch.load(path / "training_state.pt", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return nets, state, extra, meta
