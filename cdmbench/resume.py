"""What a run folder's state allows before training starts: a new run, a restart, or a resume.

- A folder without ``config.json`` is new. A folder with a config but no checkpoint is a run that died before
  its first checkpoint: ``train`` and ``train --resume`` both start it afresh (saying so); nothing in it is
  worth keeping.
- A folder with checkpoints is continued only with ``--resume``, and only with the saved configuration:
  the method, backbone and every field of the method, training and backbone configs are compared, and a
  difference is one line listing all of them. ``--force`` accepts the differences that do not change what
  is being trained (``SAFE_TO_CHANGE``: the step or compute budget, logging and checkpoint cadence, the device).
- Nothing here writes: ``check_start`` only decides; ``begin`` (called once training can start) clears a dead
  start's leftovers.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cdmbench.checkpoint import CKPT_DIR, checkpoints, latest_checkpoint
from cdmbench.errors import CdmbenchError, CorruptStateError
from cdmbench.io import read_json

logger = logging.getLogger(__name__)

CONFIG = "config.json"
FINISHED = "done.json"
# Keys ("group.field") whose change on --resume --force keeps the run the same run.
SAFE_TO_CHANGE = frozenset({"train.steps", "train.budget_tflops", "train.log_every", "train.checkpoint_every",
                            "train.checkpoint_every_tflops",
                            "train.keep_checkpoints",
                            "train.data_cache", "backbone.device"})
_NOT_COMPARED = frozenset({"cdmbench_version", "torch", "world_size", "as_run"})  # facts, not settings
_LEFTOVERS = ("metrics.csv", "tensorboard", CKPT_DIR, FINISHED)  # what a dead start may have left


@dataclass
class StartPlan:
    """What ``check_start`` decided.

    Args:
        resume: continue from the newest intact checkpoint.
        restart: the folder holds a run that never reached a checkpoint; its leftovers are cleared by ``begin``.
        notes: lines to tell the user (already logged).
    """

    resume: bool = False
    restart: bool = False
    notes: list[str] = field(default_factory=list)


def config_differences(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every field that differs between two ``RunConfig.to_dict()`` dicts."""
    out = []
    for k in sorted(set(saved) | set(new)):
        if k in _NOT_COMPARED:
            continue
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
            group = "method" if k == "method_config" else k
            out.extend((f"{group}.{f}", a.get(f), b.get(f)) for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f))
        elif a != b:
            out.append((k, a, b))
    return out


def _note(plan: StartPlan, text: str) -> None:
    plan.notes.append(text)
    logger.warning(text)


def check_start(run_dir: str | Path, new_config: dict, *, resume: bool, force: bool = False) -> StartPlan:
    """Decide how training starts in ``run_dir`` (writes nothing); a ``CdmbenchError`` when it cannot.

    Args:
        new_config: ``RunConfig.to_dict()`` of the run about to start.
        resume: ``--resume`` was given.
        force: ``--force`` was given (accept ``SAFE_TO_CHANGE`` differences on resume).
    """
    run_dir = Path(run_dir)
    plan = StartPlan()
    if run_dir.exists() and not run_dir.is_dir():
        raise CdmbenchError(f"run folder {run_dir} exists and is not a folder")
    cfg_path = run_dir / CONFIG
    has_ckpt = bool(checkpoints(run_dir)) or (run_dir / CKPT_DIR / "latest").is_file()
    if not cfg_path.exists():
        if has_ckpt:
            raise CorruptStateError(f"run folder {run_dir} has checkpoints but no {CONFIG}; restore it, or delete "
                                    f"the folder to start again")
        if resume:
            _note(plan, f"--resume: {run_dir} holds no run yet; starting a new one")
        return plan
    if not has_ckpt:
        plan.restart = True
        _note(plan, f"run folder {run_dir} has no checkpoint (an earlier start stopped before its first one); "
                    f"starting it afresh")
        return plan
    if not resume:
        raise CdmbenchError(f"run folder {run_dir} already exists; pass --resume to continue it or choose another "
                            f"--run-name")
    saved = read_json(cfg_path, what="run config",
                      fix="the run cannot be resumed without it; restore it or delete the run folder")
    if not isinstance(saved, dict):
        raise CorruptStateError(f"run config {cfg_path} is not a JSON object; restore it or delete the run folder")
    diffs = config_differences(saved, new_config)
    if diffs:
        unsafe = [d for d in diffs if d[0] not in SAFE_TO_CHANGE]
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
        if unsafe and force:
            raise CdmbenchError(f"--resume --force: these settings differ from {cfg_path} and cannot change within a "
                                f"run: {'; '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in unsafe)} (only "
                                f"{', '.join(sorted(SAFE_TO_CHANGE))} may change)")
        if not force:
            hint = (" (pass --force to apply them)" if not unsafe else
                    f" (start a new --run-name; only {', '.join(sorted(SAFE_TO_CHANGE))} may change, with --force)")
            raise CdmbenchError(f"--resume: the config differs from {cfg_path}: {listed}{hint}")
        _note(plan, f"--resume --force: applying {listed}")
    try:
        latest_checkpoint(run_dir)
    except CorruptStateError as e:  # the fallback in training handles it; say so now
        _note(plan, str(e))
    plan.resume = True
    return plan


def begin(run_dir: str | Path, plan: StartPlan) -> None:
    """Once training can start: clear a dead start's leftovers (``plan.restart``), or the finished marker of a
    resumed run (it is written again when the run ends)."""
    run_dir = Path(run_dir)
    if plan.restart:
        for name in _LEFTOVERS:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif plan.resume:
        (run_dir / FINISHED).unlink(missing_ok=True)
        root = run_dir / CKPT_DIR
        for tmp in root.glob("step_*.tmp") if root.is_dir() else ():  # a write cut short by a kill
            shutil.rmtree(tmp, ignore_errors=True)


def read_run_config(run_dir: str | Path):
    """The ``RunConfig`` saved in ``run_dir/config.json``; a missing, partial or invalid one is one
    ``CorruptStateError`` line naming the file (``cdmbench.run.RunDir.config``)."""
    from cdmbench.run import RunDir

    return RunDir(run_dir).config()
