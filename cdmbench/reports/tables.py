"""Results file → tidy DataFrame → one pivot per metric (rows = runs incl. the teacher, columns = steps).

A table never mixes protocols: rows are grouped by (arch, metric, protocol). Rows that are not "ok" and
carry no protocol (a metric that does not apply, a skipped step count) join every table of their
(arch, metric), so "not applicable" is shown, never dropped. When a (run, steps, metric, protocol)
appears more than once, the last row in the file wins.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cdmbench.eval.results import read_results

TEACHER_METHOD = "teacher"  # the harness's method name for the teacher; listed first


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """The tidy results (``RESULT_COLUMNS``), de-duplicated, with a ``label`` column naming each row of
    a pivot: the method, or "method (run)" when a method has several runs on one arch."""
    return tidy(read_results(path))


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    df = df.drop_duplicates(subset=["run", "train_step", "steps", "metric", "protocol"], keep="last").copy()
    runs_per_method = df.groupby(["arch", "method"])["run"].transform("nunique")
    df["label"] = np.where(runs_per_method > 1, df["method"] + " (" + df["run"] + ")", df["method"])
    return df.reset_index(drop=True)


@dataclass(frozen=True)
class MetricTable:
    """One metric on one arch under one protocol. The frames share index (labels) and columns (steps)."""

    arch: str
    metric: str
    protocol: str
    higher_is_better: bool | None
    value: pd.DataFrame
    ci_low: pd.DataFrame
    ci_high: pd.DataFrame
    status: pd.DataFrame  # "" where no row exists
    variant: int = 0  # 1, 2, ... when one (arch, metric) has several protocols, else 0
    n_seeds: pd.DataFrame | None = None  # training seeds behind each cell (aggregated tables)
    rank: pd.DataFrame | None = None  # compact rank per cell (students only; NaN for references)

    @property
    def key(self) -> str:
        """A file-name-safe id: arch_metric, plus "-p<variant>" when the metric has several protocols."""
        base = safe_name(f"{self.arch}_{self.metric}")
        return f"{base}-p{self.variant}" if self.variant else base

    @property
    def title(self) -> str:
        return f"{self.metric} [{self.variant}]" if self.variant else self.metric

    def reasons(self) -> list[str]:
        """Distinct not-ok statuses, in table order."""
        seen = []
        for s in self.status.to_numpy().ravel():
            if s and s != "ok" and s not in seen:
                seen.append(s)
        return seen

    @property
    def applies(self) -> bool:
        """False when no cell is "ok" and some cell is "not_applicable": the metric does not apply to the
        backbone (the other cells are step counts a method cannot sample), so the table is hidden."""
        cells = [s for s in self.status.to_numpy().ravel() if s]
        return not cells or "ok" in cells or not any(s.startswith("not_applicable") for s in cells)

    def not_applicable_reason(self) -> str:
        """The first "not_applicable" reason of the table ("" when none)."""
        for s in self.status.to_numpy().ravel():
            if s and s.startswith("not_applicable"):
                return s.split(": ", 1)[1] if ": " in s else ""
        return ""


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def row_order(df: pd.DataFrame) -> list[str]:
    """Labels with the teacher first, then in order of first appearance."""
    labels = list(dict.fromkeys(df["label"]))
    teacher = list(dict.fromkeys(df.loc[df["method"] == TEACHER_METHOD, "label"]))
    return teacher + [lb for lb in labels if lb not in teacher]


def _direction(rows: pd.DataFrame, metric: str) -> bool | None:
    known = rows["higher_is_better"].dropna().unique()
    if len(known) == 1:
        return bool(known[0])
    from cdmbench.eval.metrics import METRICS  # the metric's declared metadata, when rows do not say

    return METRICS.get(metric).higher_is_better if metric in METRICS else None


def metric_tables(df: pd.DataFrame) -> list[MetricTable]:
    """Every (arch, metric, protocol) pivot of a tidy frame, archs and metrics in order of appearance."""
    tables: list[MetricTable] = []
    for (arch, metric), rows in df.groupby(["arch", "metric"], sort=False):
        ok_protocols = list(dict.fromkeys(rows.loc[rows["status"] == "ok", "protocol"]))
        groups = []
        for protocol in ok_protocols or list(dict.fromkeys(rows["protocol"])):
            loose = (rows["status"] != "ok") & ~rows["protocol"].isin([p for p in ok_protocols if p != protocol])
            groups.append((protocol, rows[(rows["protocol"] == protocol) | loose]))
        for i, (protocol, g) in enumerate(groups):
            tables.append(_pivot(arch, metric, protocol, g, _direction(g, metric), i + 1 if len(groups) > 1 else 0))
    return tables


def _pivot(arch: str, metric: str, protocol: str, rows: pd.DataFrame, hib: bool | None, variant: int) -> MetricTable:
    rows = rows.dropna(subset=["steps"]).assign(steps=lambda r: r["steps"].astype("int64"))
    rows = rows.drop_duplicates(subset=["label", "steps"], keep="last")  # a later row supersedes a loose one
    index, columns = row_order(rows), sorted(rows["steps"].unique().tolist())

    def pv(col: str) -> pd.DataFrame:  # (label, steps) is unique within a group after tidy()
        return rows.pivot(index="label", columns="steps", values=col).reindex(index=index, columns=columns)

    status = pv("status").fillna("")
    ok = status == "ok"
    extra = {c: pv(c).astype("float64") for c in ("n_seeds", "rank") if c in rows.columns}
    return MetricTable(
        arch, metric, protocol, hib,
        value=pv("value").astype("float64").where(ok),
        ci_low=pv("ci_low").astype("float64").where(ok),
        ci_high=pv("ci_high").astype("float64").where(ok),
        status=status, variant=variant, **extra,
    )


@dataclass(frozen=True)
class Summary:
    """One arch: rows (label, steps) sorted by steps then row order; one column per metric table."""

    arch: str
    tables: list[MetricTable]
    value: pd.DataFrame  # index (label, steps), columns = table titles
    status: pd.DataFrame
    nfe: pd.Series  # index (label, steps)
    rank: pd.DataFrame | None = None  # compact ranks, like ``value``
    tflops: pd.Series | None = None  # training TFLOPs behind each (label, steps) (mean over its runs)
    n: pd.Series | None = None  # eval items per cell of each (label, steps): "480", or "96–480" when metrics differ


def summary(df: pd.DataFrame, tables: list[MetricTable], arch: str) -> Summary:
    tables = [t for t in tables if t.arch == arch]
    order = {lb: i for i, lb in enumerate(row_order(df[df["arch"] == arch]))}
    present = {(lb, int(st)) for t in tables for lb in t.status.index for st in t.status.columns if t.status.at[lb, st]}
    keys = sorted(present, key=lambda k: (k[1], order.get(k[0], len(order))))
    index = pd.MultiIndex.from_tuples(keys, names=["label", "steps"])

    def stack(frames: dict[str, pd.DataFrame], fill) -> pd.DataFrame:
        cols = {title: f.stack(future_stack=True).reindex(index) for title, f in frames.items()}
        return pd.DataFrame(cols, index=index).fillna(fill) if fill is not None else pd.DataFrame(cols, index=index)

    value = stack({t.title: t.value for t in tables}, None)
    status = stack({t.title: t.status for t in tables}, "")
    rank = stack({t.title: t.rank for t in tables if t.rank is not None}, None) if any(
        t.rank is not None for t in tables) else None
    ok = df[(df["arch"] == arch) & (df["status"] == "ok")].assign(steps=lambda r: r["steps"].astype("int64"))
    nfe = ok.groupby(["label", "steps"])["nfe"].first().reindex(index)
    tflops = ok.groupby(["label", "steps"])["train_tflops"].mean().reindex(index) if "train_tflops" in ok else None
    titles = {t.metric for t in tables}
    shown = ok[ok["metric"].isin(titles)]
    n = shown.groupby(["label", "steps"])["n"].agg(_n_range).reindex(index)
    return Summary(arch, tables, value, status, nfe, rank, tflops, n)


def _n_range(ns: pd.Series) -> str:
    v = sorted(set(int(x) for x in ns.dropna()))
    return "" if not v else str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}"


def write_csvs(tables: list[MetricTable], df: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """``<out_dir>/<arch>_<metric>.csv`` per pivot (values; intervals in ``..._ci_low/high`` columns) and
    ``summary_<arch>.csv`` per arch, written atomically."""
    from cdmbench.io import atomic_path

    out_dir = Path(out_dir)
    written = []
    for t in tables:
        frame = t.value.copy()
        frame.columns = [f"steps={c}" for c in frame.columns]
        for c in t.value.columns:
            frame[f"steps={c}_ci_low"] = t.ci_low[c]
            frame[f"steps={c}_ci_high"] = t.ci_high[c]
        frame.index.name = "method"
        written.append(_write_csv(frame, out_dir / f"{t.key}.csv", atomic_path, index=True))
    for arch in dict.fromkeys(df["arch"]):
        s = summary(df, tables, arch)
        frame = s.value.copy()
        frame.insert(0, "nfe", s.nfe)
        written.append(_write_csv(frame, out_dir / f"summary_{safe_name(arch)}.csv", atomic_path, index=True))
    return written


def _write_csv(frame: pd.DataFrame, path: Path, atomic_path, index: bool) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return path
