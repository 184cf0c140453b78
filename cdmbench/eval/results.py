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

import json
import os
from pathlib import Path
from typing import Callable, Hashable, Iterable, Mapping

import pandas as pd

from cdmbench.errors import CdmbenchError, CorruptStateError
from cdmbench.io import atomic_path, locked

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
    """The results file as a DataFrame with exactly ``RESULT_COLUMNS`` (normalised dtypes).

    A file that is empty, unparseable, truncated or holds a non-numeric number is one ``CorruptStateError``
    naming the file and the first bad line (CSV/JSONL lines count from 1, the header is line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise CdmbenchError(f"results file {path} does not exist")
    fix = "fix or delete that line (cdmbench eval writes missing rows again from its score cache)"
    try:
        df = _read_raw(path)
    except pd.errors.EmptyDataError:
        raise CorruptStateError(f"results file {path} is empty (no header line); delete it and run cdmbench eval") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise CorruptStateError(f"results file {path} cannot be parsed ({reason}); {fix}") from None
    if df.empty:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise CorruptStateError(f"results file {path} lacks {len(missing)} of the result columns (e.g. {missing[:3]}); "
                                f"is it a cdmbench results file?")
    offset = 2 if path.suffix == ".csv" else 1  # line of row 0
    unit = "row" if path.suffix == ".parquet" else "line"
    for c in (*_FLOAT, *_INT):
        bad = pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise CorruptStateError(f"results file {path} {unit} {i + offset}: column {c!r} holds "
                                    f"{str(df[c].iloc[i])[:40]!r}, not a number; {fix}")
    for c in ("run", "metric", "status"):
        bad = df[c].isna() | (df[c].astype(str).str.strip() == "")
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise CorruptStateError(f"results file {path} {unit} {i + offset}: column {c!r} is empty "
                                    f"(a truncated line?); {fix}")
    for i, st in enumerate(df["status"]):
        try:
            check_status(str(st))
        except CdmbenchError as e:
            raise CorruptStateError(f"results file {path} {unit} {i + offset}: {e}; {fix}") from None
    try:
        return _frame(df)
    except (CdmbenchError, ValueError, TypeError) as e:
        raise CorruptStateError(f"results file {path}: {e}; {fix}") from None


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping] | pd.DataFrame,
                key: Callable[[dict], Hashable] | None = None) -> pd.DataFrame:
    """Append rows atomically: under a lock, read the file, concatenate, write a temp file, ``os.replace`` it.

    A reader never sees a half-written file, a killed writer leaves the old file intact, and concurrent
    appenders (two evals on one workspace) are serialised. With ``key`` the append is idempotent: a new row
    whose key is already in the file (or earlier in ``rows``) is not written again. Rows are validated first
    (exact columns, status grammar). Returns the whole table as written.
    """
    path = Path(path)
    new = _frame(rows)
    with locked(path):
        old = read_results(path) if path.is_file() else None
        if key is not None:
            seen = set() if old is None else {key(r) for r in old.to_dict("records")}
            keep = []
            for r in new.to_dict("records"):
                k = key(r)
                keep.append(k not in seen)
                seen.add(k)
            new = new[keep].reset_index(drop=True)
            if new.empty and old is not None:
                return old
        df = new if old is None or old.empty else pd.concat([old, new], ignore_index=True)
        _write(df, path)
    return df


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """An image manifest (.jsonl, .csv or .parquet): at least ``MANIFEST_COLUMNS``; ``path`` relative to
    the manifest's images root. Unreadable JSONL lines (torn by a kill) are skipped with a warning, as the
    eval harness does; the last record of an image path wins."""
    path = Path(path)
    if not path.is_file():
        raise CdmbenchError(f"image manifest {path} does not exist")
    if path.suffix == ".jsonl":
        from cdmbench.eval.generate import Manifest

        df = pd.DataFrame(list(Manifest(path).read().values()))
    else:
        try:
            df = _read_raw(path, text_columns=("run", "method", "arch", "prompt_id", "prompt", "path"))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as e:
            raise CorruptStateError(f"image manifest {path} cannot be parsed ({type(e).__name__})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise CorruptStateError(f"image manifest {path} lacks columns {missing}")
    steps = pd.to_numeric(df["steps"], errors="coerce")
    if steps.isna().any():
        raise CorruptStateError(f"image manifest {path}: record {int(steps.isna().to_numpy().nonzero()[0][0]) + 1} "
                                f"has a non-numeric 'steps'")
    df["steps"] = steps.astype("Int64")
    for c in ("run", "method", "arch", "prompt_id", "prompt", "path"):
        df[c] = df[c].astype(str)
    return df
