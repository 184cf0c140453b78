"""The tidy results file: one row per (run, steps, metric), written by the harness, read by the reports.

Columns (``RESULT_COLUMNS``, exactly these):
    run, method, arch        run id, method name ("teacher" for the teacher), backbone name
    steps, nfe               sampler steps; network evaluations (CFG counts twice)
    metric, value            registry name; the number (NaN unless status is "ok")
    ci_low, ci_high          95 % bootstrap interval of per-image metrics (NaN for set-level ones)
    n                        images scored
    higher_is_better         the metric's direction
    protocol                 the metric's protocol string (extractor, weights, reference, scale)
    sigmas_nominal, sigmas_effective   the σ grid before/after the backbone's shift, JSON lists
    guidance                 CFG scale (1 = none)
    checkpoint, timestamp    the evaluated weights; ISO time of the row
    status                   "ok" | "not_applicable: <reason>" | "skipped: <reason>"
    train_seed, train_step   the run's training seed and the evaluated checkpoint's iteration (empty for the
                             teacher and external pipelines)
    train_tflops             training compute up to that checkpoint, counted by the loop (``cdmbench.compute``)
    train_teacher_fwd        teacher forward passes (samples) up to that checkpoint
    train_minutes            training wall minutes up to that checkpoint (accumulated over resumes)
    global_batch             per-process batch × processes
The file format follows the suffix: .csv, .parquet or .jsonl.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import pandas as pd

from cdmbench.errors import CdmbenchError
from cdmbench.io import atomic_path

RESULT_COLUMNS: tuple[str, ...] = (
    "run", "method", "arch", "steps", "metric", "value", "ci_low", "ci_high", "n", "higher_is_better",
    "protocol", "nfe", "sigmas_nominal", "sigmas_effective", "guidance", "checkpoint", "timestamp", "status",
    "train_seed", "train_step", "train_tflops", "train_teacher_fwd", "train_minutes", "global_batch",
)
TRAIN_COLUMNS: tuple[str, ...] = RESULT_COLUMNS[-6:]
MANIFEST_COLUMNS: tuple[str, ...] = ("run", "method", "arch", "steps", "prompt_id", "prompt", "seed", "path")
STATUS_PREFIXES = ("not_applicable: ", "skipped: ")
SUFFIXES = (".csv", ".parquet", ".jsonl")

_FLOAT = ("value", "ci_low", "ci_high", "guidance", "train_tflops", "train_minutes")
_INT = ("steps", "n", "nfe", "train_seed", "train_step", "train_teacher_fwd", "global_batch")
_TEXT = (
    "run", "method", "arch", "metric", "protocol", "sigmas_nominal", "sigmas_effective", "checkpoint", "timestamp",
    "status",
)


def check_status(status: str) -> None:
    if status != "ok" and not (status.startswith(STATUS_PREFIXES) and len(status) > len("skipped: ")):
        raise CdmbenchError(f"status must be 'ok', 'not_applicable: <reason>' or 'skipped: <reason>', got {status!r}")


def _frame(rows: Iterable[Mapping] | pd.DataFrame) -> pd.DataFrame:
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    for c in TRAIN_COLUMNS:  # results written before training records were kept: empty, not an error
        if c not in df.columns:
            df[c] = pd.NA
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    if missing or extra:
        raise CdmbenchError(f"result rows must have exactly RESULT_COLUMNS; missing {missing}, unexpected {extra}")
    for c in ("sigmas_nominal", "sigmas_effective"):  # lists are stored as JSON text in every format
        df[c] = [json.dumps([float(s) for s in v]) if isinstance(v, (list, tuple)) else v for v in df[c]]
    for s in df["status"]:
        check_status(str(s))
    return normalize(df[list(RESULT_COLUMNS)])


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Column dtypes as documented: floats, nullable ints, nullable bool, text ("" for missing)."""
    df = df.copy()
    for c in _FLOAT:
        df[c] = pd.to_numeric(df[c], errors="raise").astype("float64")
    for c in _INT:
        df[c] = pd.to_numeric(df[c], errors="raise").astype("Int64")
    hib = df["higher_is_better"].map(
        lambda v: v if isinstance(v, bool) else {"true": True, "false": False}.get(str(v).strip().lower(), pd.NA)
    )
    df["higher_is_better"] = hib.astype("boolean")
    for c in _TEXT:
        df[c] = df[c].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA else str(v))
    return df.reset_index(drop=True)


def _suffix(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise CdmbenchError(f"results file {path} must end in one of {', '.join(SUFFIXES)}")
    return path.suffix


def _read_raw(path: Path, text_columns=_TEXT) -> pd.DataFrame:
    suffix = _suffix(path)
    if suffix == ".csv":
        return pd.read_csv(path, dtype={c: str for c in text_columns})
    if suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True, dtype=False)


def _write(df: pd.DataFrame, path: Path) -> None:
    suffix = _suffix(path)
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True)


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """The results file as a DataFrame with exactly ``RESULT_COLUMNS`` (normalised dtypes)."""
    path = Path(path)
    if not path.is_file():
        raise CdmbenchError(f"results file {path} does not exist")
    df = _read_raw(path)
    if df.empty:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    return _frame(df)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write appends from several processes (an advisory lock file beside ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping] | pd.DataFrame) -> pd.DataFrame:
    """Append rows atomically: read the file, concatenate, write a temp file, ``os.replace`` it.

    A reader never sees a half-written file and a killed writer leaves the old file intact. Rows are
    validated first (exact columns, status grammar). Returns the whole table as written.
    """
    path = Path(path)
    new = _frame(rows)
    with _locked(path):
        old = read_results(path) if path.is_file() else None
        df = new if old is None or old.empty else pd.concat([old, new], ignore_index=True)
        _write(df, path)
    return df


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """An image manifest (.jsonl, .csv or .parquet): at least ``MANIFEST_COLUMNS``; ``path`` relative to
    the manifest's images root."""
    path = Path(path)
    if not path.is_file():
        raise CdmbenchError(f"image manifest {path} does not exist")
    df = _read_raw(path, text_columns=("run", "method", "arch", "prompt_id", "prompt", "path"))
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise CdmbenchError(f"image manifest {path} lacks columns {missing}")
    df["steps"] = pd.to_numeric(df["steps"]).astype("Int64")
    for c in ("run", "method", "arch", "prompt_id", "prompt", "path"):
        df[c] = df[c].astype(str)
    return df
