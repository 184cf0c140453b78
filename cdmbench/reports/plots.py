"""Metric vs steps, one line per method (matplotlib's Agg canvas; no pyplot, no global backend change).

The teacher, usually evaluated at one many-step setting, is drawn as a dashed horizontal reference line.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cdmbench.reports.markdown import arrow
from cdmbench.reports.tables import MetricTable


def plot_metric(t: MetricTable, out_path: str | os.PathLike, teacher_labels: set[str] | None = None) -> Path:
    """PNG of ``t``: x = steps (log2 axis), y = the metric, error bars from the bootstrap interval.
    Rows named in ``teacher_labels`` (method "teacher") become dashed horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cdmbench.io import atomic_path

    teacher_labels = teacher_labels or set()
    fig = Figure(figsize=(6.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [int(c) for c in t.value.columns]
    for label in t.value.index:
        y = t.value.loc[label].to_numpy(dtype=float)
        ok = np.isfinite(y)
        if not ok.any():
            continue
        if label in teacher_labels:
            for s, v in zip(np.array(steps)[ok], y[ok]):
                ax.axhline(v, linestyle="--", color="0.3", linewidth=1.0, label=f"{label} ({s} steps)")
            continue
        lo = t.ci_low.loc[label].to_numpy(dtype=float)
        hi = t.ci_high.loc[label].to_numpy(dtype=float)
        x = np.array(steps, dtype=float)[ok]
        if np.isfinite(lo[ok]).all() and np.isfinite(hi[ok]).all():
            err = np.vstack([y[ok] - lo[ok], hi[ok] - y[ok]])
            ax.errorbar(x, y[ok], yerr=np.clip(err, 0, None), marker="o", capsize=3, label=label)
        else:
            ax.plot(x, y[ok], marker="o", label=label)
    students = [lb for lb in t.value.index if lb not in teacher_labels]
    student_steps = [s for s in steps if any(np.isfinite(t.value.at[lb, s]) for lb in students)]
    if student_steps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(student_steps)
        ax.set_xticklabels([str(s) for s in student_steps])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{t.title} {arrow(t.higher_is_better)}".strip())
    ax.set_title(f"{t.title} — {t.arch}")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    return out_path


def plot_vs_compute(curve, t: MetricTable, out_path: str | os.PathLike) -> Path:
    """PNG: the metric against cumulative training TFLOPs, one panel per student step count, one line
    per method through its evaluated checkpoints (mean over training seeds at each checkpoint); the
    teacher at its most-step setting as a dashed reference.

    Args:
        curve: rows (label, steps, train_step, value, train_tflops) of one (arch, metric)
            (``Aggregate.curves``).
        t: the metric's table (direction, title, teacher values).
        out_path: the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cdmbench.io import atomic_path

    steps = sorted(int(s) for s in curve["steps"].unique())
    fig = Figure(figsize=(4.2 * len(steps), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    teacher = [lb for lb in t.value.index if str(lb) == "teacher"]
    ref = None
    if teacher:
        row = t.value.loc[teacher[0]].dropna()
        if len(row):
            ref = (int(row.index.max()), float(row[row.index.max()]))
    labels = list(dict.fromkeys(curve["label"]))
    colors = {lb: f"C{i % 10}" for i, lb in enumerate(labels)}
    for i, s in enumerate(steps):
        ax = fig.add_subplot(1, len(steps), i + 1)
        block = curve[curve["steps"] == s]
        for lb in labels:
            c = block[block["label"] == lb].sort_values("train_tflops")
            if c.empty:
                continue
            ax.plot(c["train_tflops"], c["value"], marker="o", color=colors[lb], label=lb)
        if ref is not None:
            ax.axhline(ref[1], linestyle="--", color="0.3", linewidth=1.0, label=f"teacher ({ref[0]} steps)")
        ax.set_xscale("log")
        ax.set_xlabel("training TFLOPs (counted)")
        ax.set_title(f"{s} step" + ("s" if s != 1 else ""))
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.set_ylabel(f"{t.title} {arrow(t.higher_is_better)}".strip())
            ax.legend(fontsize=7)
    fig.suptitle(f"{t.title} vs training compute — {t.arch}", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    return out_path
