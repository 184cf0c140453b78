"""Metric vs steps and metric vs training compute (matplotlib's Agg canvas; no pyplot, no global backend change).

Students are coloured lines with their 95 % intervals. The teacher is one grey line at the students' step
counts (one legend entry), and its reference setting (its most steps, e.g. 28 on the toy) is one dotted
grey horizontal line. The y-range is chosen to show the students: a teacher value far outside it (e.g. its
1-step FID) is clipped to the edge and marked with an arrow and its value, rather than squashing the
student lines (a log axis would keep every point but hide the students' differences on a linear metric).
Legends sit outside the data area.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cdmbench.reports.markdown import arrow
from cdmbench.reports.tables import MetricTable

TEACHER_COLOR = "0.45"
# readable names for the plots' titles and axes (the tables keep the registry keys); unknown keys are shown as-is
DISPLAY = {
    "fid": "FID", "clip": "CLIP score", "attr_acc": "attribute accuracy", "teacher_dist": "distance to teacher",
    "teacher_fd": "Fréchet distance to teacher", "factor_w1": "factor W1 distance", "vendi": "Vendi score",
    "detail": "detail score", "precision": "precision", "recall": "recall", "density": "density",
    "coverage": "coverage", "hps": "HPS v2.1", "imagereward": "ImageReward", "pickscore": "PickScore",
    "aesthetic": "aesthetic score", "intra_lpips": "intra-prompt LPIPS",
}
MAX_GROWTH = 0.5  # a teacher point that would widen the students' y-span by more than this is clipped


def display_name(t: MetricTable) -> str:
    name = DISPLAY.get(t.metric, t.metric)
    return f"{name} [{t.variant}]" if t.variant else name


def arch_title(arch: str) -> str:
    """"toy" → "Toy", "sd3" → "SD3"."""
    return arch.upper() if any(c.isdigit() for c in arch) else arch[:1].upper() + arch[1:]


def direction(higher_is_better: bool | None) -> str:
    return {True: " (higher is better)", False: " (lower is better)"}.get(higher_is_better, "")


def plot_title(t: MetricTable, what: str = "") -> str:
    """"Toy FID (lower is better)", or with ``what``: "Toy FID vs training compute (lower is better)"."""
    return f"{arch_title(t.arch)} {display_name(t)}{what}{direction(t.higher_is_better)}"


def _y_range(student_values, extra_values) -> tuple[float, float] | None:
    """Limits that show every student value (intervals included) and each extra value (teacher points)
    that widens the span by at most ``MAX_GROWTH``."""
    v = np.asarray([x for x in student_values if np.isfinite(x)], dtype=float)
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else (abs(hi) * 0.1 if hi else 1.0)
    for x in extra_values:
        if np.isfinite(x) and max(hi, x) - min(lo, x) <= span * (1 + MAX_GROWTH):
            lo, hi = min(lo, x), max(hi, x)
    pad = 0.08 * (hi - lo if hi > lo else span)
    return lo - pad, hi + pad


def _mark_clipped(ax, x: float, y: float, limits: tuple[float, float], text: str, color: str) -> bool:
    """A point outside ``limits``: an arrow at the edge pointing off-scale, with its value beside it.
    True if clipped."""
    lo, hi = limits
    if lo <= y <= hi:
        return False
    up = y > hi
    ax.annotate("", xy=(x, hi if up else lo), xytext=(0, -26 if up else 26), textcoords="offset points",
                arrowprops={"arrowstyle": "->", "color": color, "lw": 1.4}, annotation_clip=False)
    ax.annotate(f"{text}: {_fmt(y)} (off scale)", xy=(x, hi if up else lo), xytext=(5, -22 if up else 14),
                textcoords="offset points", ha="left", va="center", fontsize=8, color=color,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    return True


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _teacher_split(t: MetricTable, label: str, student_steps: list[int]):
    """(steps, values) of the teacher at the students' step counts, and its reference (steps, value) at
    its most steps when that is beyond the students' (else None)."""
    row = t.value.loc[label]
    at = [(int(s), float(row[s])) for s in row.index if np.isfinite(row[s])]
    top = max(student_steps, default=0)
    line = [(s, v) for s, v in at if s <= top]
    beyond = [(s, v) for s, v in at if s > top]
    return line, (max(beyond) if beyond else None)


def _save(fig, out_path) -> Path:
    from cdmbench.io import atomic_path

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return out_path


def plot_metric(t: MetricTable, out_path: str | os.PathLike, teacher_labels: set[str] | None = None) -> Path:
    """PNG of ``t``: x = steps (log2 axis, the students' step counts), y = the metric, error bars from the
    95 % interval; rows named in ``teacher_labels`` are drawn as the teacher (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    teacher_labels = teacher_labels or set()
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    students = [lb for lb in t.value.index if lb not in teacher_labels]
    steps = [int(c) for c in t.value.columns]
    student_steps = [s for s in steps if any(np.isfinite(t.value.at[lb, s]) for lb in students)]
    shown = []
    for label in students:
        i = sorted(map(str, students)).index(str(label))  # a method keeps its colour in every plot
        y = t.value.loc[label].to_numpy(dtype=float)
        ok = np.isfinite(y)
        if not ok.any():
            continue
        lo = t.ci_low.loc[label].to_numpy(dtype=float)
        hi = t.ci_high.loc[label].to_numpy(dtype=float)
        x = np.array(steps, dtype=float)[ok]
        shown += list(y[ok])
        if np.isfinite(lo[ok]).all() and np.isfinite(hi[ok]).all():
            err = np.clip(np.vstack([y[ok] - lo[ok], hi[ok] - y[ok]]), 0, None)
            ax.errorbar(x, y[ok], yerr=err, marker="o", capsize=3, color=f"C{i % 10}", label=label)
            shown += list(lo[ok]) + list(hi[ok])
        else:
            ax.plot(x, y[ok], marker="o", color=f"C{i % 10}", label=label)
    teacher_points, references = [], []
    for label in [lb for lb in t.value.index if lb in teacher_labels]:
        line, ref = _teacher_split(t, label, student_steps)
        teacher_points += line
        if ref is not None:
            references.append((label, ref))
    limits = _y_range(shown, [v for _, v in teacher_points] + [v for _, (_, v) in references])
    for label in [lb for lb in t.value.index if lb in teacher_labels]:
        line, _ = _teacher_split(t, label, student_steps)
        if line:
            xs, ys = zip(*line)
            ax.plot(xs, ys, marker="s", color=TEACHER_COLOR, linewidth=1.4, label=label)
            if limits is not None:
                for s, v in line:
                    _mark_clipped(ax, s, v, limits, f"{label}, {s} step" + ("s" if s != 1 else ""), TEACHER_COLOR)
    for label, (s, v) in references:
        ax.axhline(v, linestyle=":", color=TEACHER_COLOR, linewidth=1.6, label=f"{label}, {s} steps (reference)")
    if limits is not None:
        ax.set_ylim(*limits)
    if student_steps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(student_steps)
        ax.set_xticklabels([str(s) for s in student_steps])
        ax.minorticks_off()
        ax.set_xlim(min(student_steps) / 1.25, max(student_steps) * 1.25)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{display_name(t)} {arrow(t.higher_is_better)}".strip())
    ax.set_title(plot_title(t))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9)
    return _save(fig, out_path)


def plot_vs_compute(curve, t: MetricTable, out_path: str | os.PathLike) -> Path:
    """PNG: the metric against cumulative training TFLOPs, one panel per student step count, one line
    per method through its evaluated checkpoints (the mean over the curve's training seeds, named in the title); the
    teacher at its most-step setting as a dotted reference (marked at the edge when far off the students).

    Args:
        curve: rows (label, steps, train_step, value, train_tflops) of one (arch, metric)
            (``Aggregate.curves``).
        t: the metric's table (direction, title, teacher values).
        out_path: the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    steps = sorted(int(s) for s in curve["steps"].unique())
    fig = Figure(figsize=(3.9 * len(steps) + 1.6, 3.7), dpi=120)
    FigureCanvasAgg(fig)
    teacher = [lb for lb in t.value.index if str(lb) == "teacher"]
    ref = None
    if teacher:
        row = t.value.loc[teacher[0]].dropna()
        if len(row):
            ref = (int(row.index.max()), float(row[row.index.max()]))
    labels = list(dict.fromkeys(curve["label"]))
    colors = {lb: f"C{i % 10}" for i, lb in enumerate(sorted(labels, key=str))}  # as in the steps plots
    x_all = curve["train_tflops"].astype(float)
    log_x = len(x_all) and x_all.min() > 0 and x_all.max() / x_all.min() > 20
    handles = {}
    for i, s in enumerate(steps):
        ax = fig.add_subplot(1, len(steps), i + 1)
        block = curve[curve["steps"] == s]
        for lb in labels:
            c = block[block["label"] == lb].sort_values("train_tflops")
            if c.empty:
                continue
            (h,) = ax.plot(c["train_tflops"], c["value"], marker="o", color=colors[lb], label=lb)
            handles.setdefault(lb, h)
        limits = _y_range(block["value"].astype(float), [ref[1]] if ref else [])
        if limits is not None:
            ax.set_ylim(*limits)
        if ref is not None:
            name = f"teacher, {ref[0]} steps (reference)"
            if limits is None or limits[0] <= ref[1] <= limits[1]:
                handles.setdefault(name, ax.axhline(ref[1], linestyle=":", color=TEACHER_COLOR, linewidth=1.6))
            else:
                xs = block["train_tflops"].astype(float)
                x_mid = float(np.sqrt(xs.min() * xs.max())) if log_x else float((xs.min() + xs.max()) / 2)
                _mark_clipped(ax, x_mid, ref[1], limits, f"teacher, {ref[0]} steps", TEACHER_COLOR)
        if log_x:
            from matplotlib.ticker import LogLocator

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("training compute (TFLOPs, counted)")
        ax.set_title(f"{s} sampling step" + ("s" if s != 1 else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.set_ylabel(f"{display_name(t)} {arrow(t.higher_is_better)}".strip())
    seeds = sorted({v for s in (curve["seeds"].dropna() if "seeds" in curve else ()) for v in str(s).split(",") if v},
                   key=int)
    who = (f"training seed {seeds[0]}" if len(seeds) == 1 else
           f"mean over training seeds {', '.join(seeds)}" if seeds else "mean over training seeds")
    fig.suptitle(plot_title(t, " vs training compute") + f"\n{who} at each kept checkpoint (EMA); no intervals: "
                 "read trends, not single points; a line that starts late spent compute before its first "
                 "iteration (e.g. teacher samples)", fontsize=10)
    fig.legend(list(handles.values()), list(handles.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_path)
