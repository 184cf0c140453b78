"""Typed, frozen configuration: the shared training config, ``--set key=value`` overrides and the
resolved run config that is saved with every run (style.md principle 6; EDM ``training_options.json``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from cdmbench.errors import CdmbenchError


@dataclass(frozen=True)
class TrainConfig:
    """What every method shares: budget, batch, seeds, EMA, checkpoints, precision."""

    steps: int = 400  # training iterations (optimiser steps; ``grad_accum`` ``train_step`` calls each)
    budget_tflops: float = 0.0  # stop once the counted training compute reaches this (0 = iterations only)
    batch_size: int = 16  # prompts per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step: global batch = batch_size × processes × grad_accum
    seed: int = 0  # global seed; process i uses seed + i for its own randomness
    ema_decay: float = 0.999  # student EMA: decay_k = min((1+k)/(10+k), ema_decay), k = student updates
    grad_clip: float = 1.0  # max global grad norm per optimiser step (0 disables)
    checkpoint_every: int = 100  # iterations between checkpoints (the final one is always written)
    # also a checkpoint after the iteration whose counted compute crosses a multiple of this (0 = off): evenly
    # spaced learning-curve points for a run stopped by budget_tflops, whose iteration count is not known ahead
    checkpoint_every_tflops: float = 0.0
    keep_checkpoints: int = 2  # how many recent checkpoints to keep on disk
    log_every: int = 10  # iterations between health-log rows
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate autocast); losses stay fp32
    prompts: str | None = None  # training prompt file (txt/jsonl/json/csv/tsv, read like eval's); None = the backbone's own
    # real image-caption data (cdmbench.data): an image folder with metadata.jsonl/.csv/.parquet, a folder written
    # by datasets' save_to_disk, or webdataset .tar shards; None = the backbone's own source (the toy's shapes)
    data: str | None = None
    data_image_column: str | None = None  # None: the first image column
    data_caption_column: str | None = None  # None: the first of text / caption / txt / prompt
    data_cache: str | None = None  # folder for encoded latents (written once, read back); None = encode each time

    def __post_init__(self):
        from cdmbench.paths import MAX_BATCH, MAX_INT, MAX_TRAIN_STEPS, check_count

        _check_positive(self, ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                               "log_every"))
        check_count(self.steps, "train.steps", maximum=MAX_TRAIN_STEPS)
        check_count(self.batch_size, "train.batch_size", maximum=MAX_BATCH)
        check_count(self.seed, "train.seed", minimum=0, maximum=MAX_INT)
        if not self.grad_clip >= 0:
            raise CdmbenchError(f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.prompts is not None and not str(self.prompts).strip():
            raise CdmbenchError("train.prompts: empty path; pass a prompt file or leave it unset")
        if not (isinstance(self.budget_tflops, (int, float)) and self.budget_tflops >= 0):
            raise CdmbenchError(f"train.budget_tflops must be a number >= 0 (0 = no compute budget), got {self.budget_tflops!r}")
        if not (isinstance(self.checkpoint_every_tflops, (int, float)) and self.checkpoint_every_tflops >= 0):
            raise CdmbenchError("train.checkpoint_every_tflops must be a number >= 0 (0 = iterations only), "
                                f"got {self.checkpoint_every_tflops!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise CdmbenchError(f"train.mixed_precision must be one of no, bf16, fp16; got {self.mixed_precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise CdmbenchError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


def _check_positive(obj, names):
    for n in names:
        if getattr(obj, n) < 1:
            raise CdmbenchError(f"{n} must be >= 1, got {getattr(obj, n)}")


def check_enum_fields(cfg) -> None:
    """Validate ``Enum``-typed fields at construction (accepting their string values)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        t = hints[f.name]
        if isinstance(t, type) and issubclass(t, enum.Enum):
            v = getattr(cfg, f.name)
            if not isinstance(v, t):
                try:
                    object.__setattr__(cfg, f.name, t(v))
                except ValueError:
                    valid = ", ".join(m.value for m in t)
                    raise CdmbenchError(f"{f.name} must be one of {valid}; got {v!r}") from None


def _coerce(value: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        args = typing.get_args(tp)
        parts = [p for p in value.replace(" ", "").split(",") if p]
        if len(args) != 2 or args[1] is not Ellipsis:  # a fixed-length tuple, e.g. betas: tuple[float, float]
            if len(parts) != len(args):
                raise CdmbenchError(f"--set {key}: expected {len(args)} comma-separated values, got {value!r}")
            return tuple(_coerce(p, a, key) for p, a in zip(parts, args))
        return tuple(_coerce(p, args[0], key) for p in parts)
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(value)
        if tp in (int, float, str):
            return tp(value)
    except ValueError:
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            raise CdmbenchError(f"--set {key}: must be one of {', '.join(m.value for m in tp)}; got {value!r}") from None
        raise CdmbenchError(f"--set {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    raise CdmbenchError(f"--set {key}: unsupported field type {tp}")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise CdmbenchError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def apply_overrides(cfg, overrides: dict[str, Any], *, prefix: str = ""):
    """A copy of frozen dataclass ``cfg`` with string or typed overrides; unknown keys fail listing valid ones."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in fields(cfg)]
    changes = {}
    for k, v in overrides.items():
        if k not in names:
            raise CdmbenchError(f"unknown setting {prefix}{k!r}; valid: {', '.join(prefix + n for n in names)}")
        changes[k] = _coerce(v, hints[k], prefix + k) if isinstance(v, str) and hints[k] is not str else v
    return dataclasses.replace(cfg, **changes)


def to_jsonable(cfg) -> dict:
    def conv(v):
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in fields(cfg)}


def from_jsonable(cls, data: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            v = data[f.name]
            if isinstance(v, list):
                v = tuple(v)
            kwargs[f.name] = v
    del hints
    return cls(**kwargs)


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
