"""Pivots → markdown. Arrows and best-in-bold come from each metric's ``higher_is_better``; intervals are
shown as "value ± half-width" of the 95 % bootstrap interval; cells that are not "ok" say why."""

from __future__ import annotations

import math

import pandas as pd

from cdmbench.reports.tables import MetricTable, Summary

LEGEND = (
    "↑ higher is better, ↓ lower is better. **Bold**: best in its column (among two or more values). "
    "± : half-width of the 95 % bootstrap interval of per-image scores (1000 resamples, seed 0). "
    "n/a: the metric does not apply; skipped: not run (reason below the table); –: not evaluated."
)


def arrow(higher_is_better: bool | None) -> str:
    return {True: "↑", False: "↓"}.get(higher_is_better, "")


def decimals(values) -> int:
    """Shared decimals for one table: 1 for |v| >= 100, 2 for >= 1, else 3."""
    finite = [abs(float(v)) for v in values if v is not None and not pd.isna(v) and math.isfinite(float(v))]
    top = max(finite, default=0.0)
    return 1 if top >= 100 else 2 if top >= 1 else 3


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _steps_label(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def _best(values: pd.Series, higher_is_better: bool | None) -> set:
    """Index labels holding the best value (ties all count); empty with fewer than two values."""
    v = values.dropna()
    if higher_is_better is None or len(v) < 2:
        return set()
    target = v.max() if higher_is_better else v.min()
    return set(v.index[v == target])


def _status_cell(status: str) -> str:
    if not status:
        return "–"
    return "n/a" if status.startswith("not_applicable") else "skipped"


def cell(value: float, low: float, high: float, status: str, digits: int, bold: bool) -> str:
    if status != "ok":
        return _status_cell(status)
    text = f"{value:.{digits}f}"
    if bold:
        text = f"**{text}**"
    if not (pd.isna(low) or pd.isna(high)):
        text += f" ± {(high - low) / 2:.{digits}f}"
    return text


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def metric_table_markdown(t: MetricTable) -> str:
    """The pivot as a markdown table: rows = methods, columns = step counts."""
    digits = decimals(t.value.to_numpy().ravel())
    best = {c: _best(t.value[c], t.higher_is_better) for c in t.value.columns}
    rows = []
    for label in t.value.index:
        row = [_escape(label)]
        for c in t.value.columns:
            at = (label, c)
            bold = label in best[c]
            row.append(cell(t.value.at[at], t.ci_low.at[at], t.ci_high.at[at], t.status.at[at], digits, bold))
        rows.append(row)
    header = ["method", *(_steps_label(c) for c in t.value.columns)]
    return _table(header, [":--", *["--:"] * len(t.value.columns)], rows)


def reasons_markdown(statuses: list[str]) -> str:
    return "\n".join(f"- {_status_cell(s)}: {_escape(s.split(': ', 1)[1])}" for s in statuses)


def metric_section(t: MetricTable, plot: str | None = None) -> str:
    parts = [f"### {t.title} {arrow(t.higher_is_better)} — {_escape(t.arch)}".replace("  ", " ")]
    if t.protocol:
        parts.append(f"protocol: `{t.protocol}`")
    parts.append(metric_table_markdown(t))
    if t.reasons():
        parts.append(reasons_markdown(t.reasons()))
    if plot:
        parts.append(f"![{t.title} vs steps]({plot})")
    return "\n\n".join(parts)


def summary_markdown(s: Summary) -> str:
    """All metrics of one arch: rows = (method, steps), bold = best within the same step count."""
    titles = list(s.value.columns)
    hib = {t.title: t.higher_is_better for t in s.tables}
    digits = {c: decimals(s.value[c].to_numpy()) for c in titles}
    best: dict[str, set] = {c: set() for c in titles}
    for steps, block in s.value.groupby(level="steps"):
        for c in titles:
            best[c] |= _best(block[c], hib[c])
    rows = []
    for key in s.value.index:
        label, steps = key
        nfe = s.nfe.get(key)
        row = [_escape(label), str(steps), "" if nfe is None or pd.isna(nfe) else str(int(nfe))]
        for c in titles:
            nan = float("nan")
            row.append(cell(s.value.at[key, c], nan, nan, s.status.at[key, c], digits[c], key in best[c]))
        rows.append(row)
    header = ["method", "steps", "NFE", *(f"{_escape(c)} {arrow(hib[c])}".strip() for c in titles)]
    return _table(header, [":--", "--:", "--:", *["--:"] * len(titles)], rows)


def header_markdown(header: dict) -> str:
    return _table(["", ""], [":--", ":--"], [[f"**{_escape(k)}**", _escape(v)] for k, v in header.items()])


def render_report(
    title: str,
    header: dict | None,
    summaries: list[Summary],
    tables: list[MetricTable],
    plots: dict[str, str] | None = None,
    grids: dict[str, str] | None = None,
) -> str:
    """The whole report.md: title, header, legend, per arch a summary, metric sections and sample grid."""
    plots, grids = plots or {}, grids or {}
    parts = [f"# {title}"]
    if header:
        parts.append(header_markdown(header))
    parts.append(LEGEND)
    for s in summaries:
        parts.append(f"## {_escape(s.arch)}")
        if not s.value.empty:
            parts.append("### Summary\n\n" + summary_markdown(s))
        for t in (t for t in tables if t.arch == s.arch):
            parts.append(metric_section(t, plots.get(t.key)))
        if s.arch in grids:
            parts.append(
                "### Samples\n\nRows: methods; columns: steps; the same prompts and seeds in every cell.\n\n"
                f"![samples]({grids[s.arch]})"
            )
    return "\n\n".join(parts) + "\n"
