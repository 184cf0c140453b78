"""Pivots → markdown. Arrows come from each metric's ``higher_is_better``; bold marks the methods ranked
first (not distinguishable from the best at 95 %, ``cdmbench.reports.stats``), never a reference row;
intervals are shown as "value ± half-width"; cells that are not "ok" say why, once per arch."""

from __future__ import annotations

import math
import re

import pandas as pd

from cdmbench.reports.tables import MetricTable, Summary

LEGEND = (
    "↑ higher is better, ↓ lower is better. Each cell: the mean over its training seeds (k, in the header; "
    "a cell with fewer says so in brackets) ± half-width of the 95 % hierarchical bootstrap interval "
    "(1000 resamples, seed 0: the (prompt, seed) items are resampled, then the training seeds, and FID is "
    "recomputed on every resampled set). **Bold**: rank 1 in its step count, i.e. no other method is better "
    "at 95 % on the same items (teacher rows are references, never bold). "
    "skipped: not run (reasons listed once per backbone); –: not evaluated; n: eval items ((prompt, seed) "
    "images) per cell. Metrics that do not apply to a backbone are left out of its tables (listed once)."
)
TEACHER_LABEL = "teacher"
REFERENCE_LABELS = ("teacher", "external")  # ``aggregate.REFERENCE_METHODS``: rows that are never bold or ranked
MIN_N = {True: 30, False: 300}  # per-image metrics / set-level metrics (FID): fewer items gets a warning


def arrow(higher_is_better: bool | None) -> str:
    return {True: "↑", False: "↓"}.get(higher_is_better, "")


def decimals(values) -> int:
    """Shared decimals for one table: 1 for |v| >= 100, 2 for >= 1, else 3."""
    finite = [abs(float(v)) for v in values if v is not None and not pd.isna(v) and math.isfinite(float(v))]
    top = max(finite, default=0.0)
    return 1 if top >= 100 else 2 if top >= 1 else 3


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def phrase(text: str) -> str:
    """A reason as a reader reads it: "1 steps" → "1 step"."""
    return re.sub(r"\b1 steps\b", "1 step", str(text))


def _steps_label(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def _best(values: pd.Series, higher_is_better: bool | None, ranks: pd.Series | None = None,
          references: set | None = None) -> set:
    """Index labels to bold: rank 1 when ranks are known, else the best value (ties all count); never a
    reference; empty with fewer than two candidates."""
    references = references or set()
    v = values.dropna()
    v = v[[lb not in references for lb in v.index]]
    if ranks is not None and ranks.notna().any():
        r = ranks.reindex(v.index)
        return set(r.index[r == 1]) if len(v) >= 2 else set()
    if higher_is_better is None or len(v) < 2:
        return set()
    target = v.max() if higher_is_better else v.min()
    return set(v.index[v == target])


def _status_cell(status: str) -> str:
    if not status:
        return "–"
    return "n/a" if status.startswith("not_applicable") else "skipped"


def cell(value: float, low: float, high: float, status: str, digits: int, bold: bool, seeds=None,
         common_seeds=None) -> str:
    if status != "ok":
        return _status_cell(status)
    text = f"{value:.{digits}f}"
    if bold:
        text = f"**{text}**"
    if not (pd.isna(low) or pd.isna(high)):
        text += f" ± {(high - low) / 2:.{digits}f}"
    if seeds is not None and not pd.isna(seeds) and common_seeds is not None and int(seeds) != common_seeds:
        text += f" (k={int(seeds)})"
    return text


def _references(labels) -> set:
    """Reference rows (the teacher, external checkpoints): labels "teacher" or "teacher (run)"."""
    return {lb for lb in labels if any(str(lb) == r or str(lb).startswith(r + " (") for r in REFERENCE_LABELS)}


def common_seeds(t: MetricTable) -> int | None:
    """The most common training-seed count of a table's student cells."""
    if t.n_seeds is None:
        return None
    refs = _references(t.n_seeds.index)
    v = t.n_seeds.drop(index=[r for r in refs if r in t.n_seeds.index]).to_numpy().ravel()
    v = [int(x) for x in v if not pd.isna(x) and x > 0]
    return max(set(v), key=v.count) if v else None


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def metric_table_markdown(t: MetricTable) -> str:
    """The pivot as a markdown table: rows = methods, columns = step counts."""
    digits = decimals(t.value.to_numpy().ravel())
    refs = _references(t.value.index)
    best = {c: _best(t.value[c], t.higher_is_better, None if t.rank is None else t.rank[c], refs)
            for c in t.value.columns}
    k = common_seeds(t)
    rows = []
    for label in t.value.index:
        row = [_escape(label)]
        for c in t.value.columns:
            at = (label, c)
            bold = label in best[c]
            seeds = None if t.n_seeds is None or label in refs else t.n_seeds.at[at]
            row.append(cell(t.value.at[at], t.ci_low.at[at], t.ci_high.at[at], t.status.at[at], digits, bold,
                            seeds, k))
        rows.append(row)
    header = ["method", *(_steps_label(c) for c in t.value.columns)]
    return _table(header, [":--", *["--:"] * len(t.value.columns)], rows)


def reasons_markdown(statuses: list[str]) -> str:
    return "\n".join(f"- {_status_cell(s)}: {_escape(phrase(s.split(': ', 1)[1]))}" for s in statuses)


def empty_cells_markdown(tables: list[MetricTable]) -> str:
    """Each reason of an empty cell once, with where it applies: "- dmd, 2 steps: skipped — dmd cannot
    sample with 2 steps; supported: 1" (metrics named when the reason covers only some of them)."""
    where: dict[str, dict[tuple, list[str]]] = {}
    for t in tables:
        for label in t.status.index:
            for steps in t.status.columns:
                st = t.status.at[label, steps]
                if st and st != "ok":
                    where.setdefault(st, {}).setdefault((label, int(steps)), []).append(t.title)
    lines = []
    for st, cells in where.items():
        by_label: dict[str, tuple[list[int], set]] = {}
        for (label, steps), metrics in cells.items():
            by_label.setdefault(label, ([], set()))[0].append(steps)
            by_label[label][1].update(metrics)
        places = []
        for label, (steps, metrics) in by_label.items():
            st_text = _steps_list(sorted(steps))
            some = len(metrics) < len(tables)
            places.append(f"{label}, {st_text}" + (f" ({', '.join(sorted(metrics))})" if some else ""))
        reason = st.split(": ", 1)[1] if ": " in st else st
        lines.append(f"- {_escape('; '.join(places))}: {_status_cell(st)} — {_escape(phrase(reason))}")
    return "\n".join(lines)


def _steps_list(steps: list[int]) -> str:
    if len(steps) == 1:
        return _steps_label(steps[0])
    return f"{', '.join(map(str, steps[:-1]))} and {steps[-1]} steps"


def left_out_markdown(hidden: list[MetricTable]) -> str:
    """One line: the metrics hidden because they do not apply to the backbone, with each reason once."""
    by_reason: dict[str, list[str]] = {}
    for t in hidden:
        by_reason.setdefault(t.not_applicable_reason(), []).append(t.title)
    parts = [f"{', '.join(ms)} ({_escape(phrase(r))})" if r else ", ".join(ms) for r, ms in by_reason.items()]
    return "Left out, as they do not apply to this backbone: " + "; ".join(parts) + "."


def metric_section(t: MetricTable, plot: str | None = None, reasons: bool = True,
                   compute_plot: str | None = None) -> str:
    parts = [f"### {t.title} {arrow(t.higher_is_better)} — {_escape(t.arch)}".replace("  ", " ")]
    if t.protocol:
        parts.append(f"protocol: `{t.protocol}`")
    parts.append(metric_table_markdown(t))
    if reasons and t.reasons():
        parts.append(reasons_markdown(t.reasons()))
    if plot:
        parts.append(f"![{t.title} vs steps]({plot})")
    if compute_plot:
        parts.append(f"![{t.title} vs training compute]({compute_plot})")
    return "\n\n".join(parts)


def summary_markdown(s: Summary) -> str:
    """All metrics of one arch: rows = (method, steps), bold = rank 1 within the same step count, and the
    training compute behind each row."""
    titles = list(s.value.columns)
    hib = {t.title: t.higher_is_better for t in s.tables}
    digits = {c: decimals(s.value[c].to_numpy()) for c in titles}
    refs = _references(s.value.index.get_level_values("label"))
    best: dict[str, set] = {c: set() for c in titles}
    for steps, block in s.value.groupby(level="steps"):
        for c in titles:
            r = None if s.rank is None or c not in s.rank else s.rank.loc[block.index, c]
            best[c] |= {(lb, steps) for lb in _best(block[c].droplevel("steps"), hib[c],
                                                    None if r is None else r.droplevel("steps"), refs)}
    with_compute = s.tflops is not None and s.tflops.notna().any()
    rows = []
    for key in s.value.index:
        label, steps = key
        nfe = s.nfe.get(key)
        row = [_escape(label), str(steps), "" if nfe is None or pd.isna(nfe) else str(int(nfe))]
        if s.n is not None:
            n = s.n.get(key)
            row.append("" if n is None or pd.isna(n) else str(n))
        for c in titles:
            nan = float("nan")
            row.append(cell(s.value.at[key, c], nan, nan, s.status.at[key, c], digits[c], key in best[c]))
        if with_compute:
            v = s.tflops.get(key)
            row.append("" if v is None or pd.isna(v) else f"{v:.3g}")
        rows.append(row)
    header = ["method", "steps", "NFE", *(["n"] if s.n is not None else []),
              *(f"{_escape(c)} {arrow(hib[c])}".strip() for c in titles)]
    if with_compute:
        header.append("train TFLOPs")
    return _table(header, [":--", "--:", "--:", *["--:"] * (len(header) - 3)], rows)


def header_markdown(header: dict) -> str:
    return _table(["", ""], [":--", ":--"], [[f"**{_escape(k)}**", _escape(v)] for k, v in header.items()])


def _ranges(values) -> str:
    """Sorted ints as compact ranges: 0-4, 7."""
    v = sorted(set(int(x) for x in values))
    out, i = [], 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[j + 1] == v[j] + 1:
            j += 1
        out.append(str(v[i]) if i == j else f"{v[i]}-{v[j]}")
        i = j + 1
    return ", ".join(out) if out else "–"


def report_facts(df: pd.DataFrame, eval_dir, argv: list[str] | None) -> dict:
    """The header every report carries: command, versions, date, n, prompt set, seeds, training seeds,
    global batch (from the results rows and the eval folder's ``eval_config.json``)."""
    import shlex
    from datetime import datetime, timezone
    from importlib import metadata
    from pathlib import Path

    def version(p):
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return "not installed"

    facts = {
        "command": shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else "(unknown)",
        "versions": ", ".join(f"{p} {version(p)}" for p in ("cdmbench", "torch", "diffusers", "transformers")),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    ok = df[df["status"] == "ok"]
    ns = sorted(set(int(n) for n in ok["n"].dropna()))
    facts["n (eval items per cell)"] = ", ".join(map(str, ns)) if ns else "–"
    cfg_path = Path(eval_dir) / "eval_config.json" if eval_dir is not None else None
    if cfg_path is not None and cfg_path.is_file():
        import json

        cfg = json.loads(cfg_path.read_text())
        used = cfg.get("num_prompts_used") or {}
        counts = ", ".join(f"{n} prompts" + (f" ({a})" if len(used) > 1 else "") for a, n in used.items())
        facts["prompt set"] = f"{cfg.get('prompts')}: {counts}" if counts else str(cfg.get("prompts"))
        facts["seeds per prompt"] = _ranges(cfg.get("seeds", []))
    else:
        facts["prompt set"] = facts["seeds per prompt"] = "unknown (no eval_config.json beside the results file)"
    seeds = ok["train_seed"].dropna()
    facts["training seeds"] = _ranges(seeds) if len(seeds) else "– (no trained runs)"
    gb = sorted(set(int(b) for b in ok["global_batch"].dropna()))
    per_cell = ok[ok["train_seed"].notna()].groupby(["method", "steps", "metric"])["train_seed"].nunique()
    if len(per_cell):
        facts["k (training seeds per cell)"] = ", ".join(map(str, sorted(set(int(k) for k in per_cell))))
    facts["global batch"] = ", ".join(map(str, gb)) if gb else "–"
    wall = bench_wall_minutes(eval_dir)
    if wall is not None:
        minutes, count = wall
        facts["wall minutes"] = f"{minutes:.1f} (all {count} bench invocations into this workspace)"
    warnings = small_n_warnings(df)
    if warnings:
        facts["warning: small n"] = "; ".join(warnings) + " — read these cells as a smoke test, not a result"
    return facts


BENCH_LOG = "bench_log.jsonl"  # one line per ``cdmbench bench`` invocation, in its eval folder


def bench_wall_minutes(eval_dir) -> tuple[float, int] | None:
    """(total wall minutes, invocations) of the bench log in ``eval_dir`` (``cdmbench.bench``), or None."""
    import json
    from pathlib import Path

    if eval_dir is None or not (Path(eval_dir) / BENCH_LOG).is_file():
        return None
    minutes = []
    for line in (Path(eval_dir) / BENCH_LOG).read_text().splitlines():
        if line.strip():
            try:
                minutes.append(float(json.loads(line)["minutes"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: not counted
    return (sum(minutes), len(minutes)) if minutes else None


def small_n_warnings(df: pd.DataFrame) -> list[str]:
    """One line per threshold (``MIN_N``) that some cells miss: the threshold, the n and the metrics."""
    from cdmbench.eval.metrics import METRICS

    groups: dict[tuple[bool, tuple], list[str]] = {}
    ok = df[df["status"] == "ok"]
    for metric, rows in ok.groupby("metric", sort=False):
        per_image = bool(getattr(METRICS.get(metric), "per_image", True)) if metric in METRICS else True
        small = tuple(sorted(set(int(n) for n in rows["n"].dropna() if n < MIN_N[per_image])))
        if small:
            groups.setdefault((per_image, small), []).append(metric)
    out = []
    for (per_image, small), metrics in groups.items():
        what = "a per-image mean" if per_image else "a set-level metric such as FID (biased at small n)"
        out.append(f"{', '.join(metrics)} at n = {', '.join(map(str, small))} < {MIN_N[per_image]}, the least for "
                   f"{what}")
    return out


VERDICT_MARK = {"better": "▲", "worse": "▼", "tie": "="}


def pairwise_markdown(pairs: pd.DataFrame, arch: str, steps: int, titles: dict) -> str:
    """Every pair of methods at one step count: A − B with its paired 95 % interval, per metric."""
    block = pairs[(pairs["arch"] == arch) & (pairs["steps"] == steps)]
    metrics = [m for m in titles if m in set(block["metric"])]
    rows = []
    for (a, b), g in block.groupby(["a", "b"], sort=False):
        row = [f"{_escape(a)} vs {_escape(b)}"]
        for m in metrics:
            r = g[g["metric"] == m]
            if r.empty:
                row.append("–")
                continue
            r = r.iloc[0]
            d = decimals([r["diff"], r["low"], r["high"]])
            row.append(f"{VERDICT_MARK[r['verdict']]} {r['diff']:+.{d}f} [{r['low']:+.{d}f}, {r['high']:+.{d}f}]")
        rows.append(row)
    return _table(["A vs B", *(f"{_escape(m)} {arrow(titles[m])}".strip() for m in metrics)],
                  [":--", *["--:"] * len(metrics)], rows)


def ranking_markdown(cells: pd.DataFrame, ranks: pd.DataFrame, arch: str, steps: int, titles: dict) -> str:
    """Compact ranks at one step count (rank (mean)); reference rows show "ref"."""
    c = cells[(cells["arch"] == arch) & (cells["steps"] == steps) & (cells["status"] == "ok")]
    r = ranks[(ranks["arch"] == arch) & (ranks["steps"] == steps)] if not ranks.empty else ranks
    metrics = [m for m in titles if m in set(c["metric"])]
    labels = list(dict.fromkeys(c.sort_values("method", key=lambda s: s != TEACHER_LABEL)["label"]))
    if not r.empty and metrics:
        first = r[r["metric"] == metrics[0]].set_index("label")["rank"]
        labels.sort(key=lambda lb: (lb not in _references([lb]) and lb in first.index, first.get(lb, 0)))
    digits = {m: decimals(c.loc[c["metric"] == m, "value"]) for m in metrics}
    rows = []
    for lb in labels:
        row = [_escape(lb)]
        for m in metrics:
            v = c[(c["label"] == lb) & (c["metric"] == m)]
            if v.empty:
                row.append("–")
                continue
            rk = r[(r["label"] == lb) & (r["metric"] == m)] if not r.empty else r
            # reference rows: "ref"; a cell without per-item data (no paired comparison): "–"
            tag = "ref" if lb in _references([lb]) else "–" if rk.empty else str(int(rk["rank"].iloc[0]))
            row.append(f"{tag} ({v['value'].iloc[0]:.{digits[m]}f})")
        rows.append(row)
    return _table(["method", *(f"{_escape(m)} {arrow(titles[m])}".strip() for m in metrics)],
                  [":--", *["--:"] * len(metrics)], rows)


def compute_markdown(cells: pd.DataFrame, arch: str) -> str:
    """Training compute per method (its runs' latest evaluated checkpoints, mean over runs)."""
    c = cells[(cells["arch"] == arch) & (cells["status"] == "ok") & cells["train_tflops"].notna()]
    rows = []
    order = {lb: i for i, lb in enumerate(dict.fromkeys(c["label"]))}  # methods as listed, steps ascending
    c = c.assign(_o=c["label"].map(order)).sort_values(["_o", "steps"], kind="stable")
    for (label, steps), g in c.groupby(["label", "steps"], sort=False):
        g = g.iloc[0]
        rows.append([_escape(label), str(int(steps)), _escape(g["runs"]), str(int(g["n_seeds"])),
                     f"{g['train_step']:.0f}", f"{g['train_tflops']:.3g}", f"{g['train_teacher_fwd']:.3g}",
                     f"{g['train_minutes']:.2f}", f"{g['global_batch']:.0f}"])
    return _table(["method", "steps", "runs", "seeds", "iterations", "TFLOPs", "teacher fwd (samples)",
                   "minutes", "global batch"], [":--", "--:", ":--", *["--:"] * 6], rows)


def render_report(
    title: str,
    header: dict | None,
    summaries: list[Summary],
    tables: list[MetricTable],
    plots: dict[str, str] | None = None,
    grids: dict[str, str] | None = None,
    agg=None,
    compute_plots: dict[str, str] | None = None,
    hidden: list[MetricTable] | None = None,
) -> str:
    """The whole report.md: title, header, legend, per arch a summary, empty-cell reasons (once), the
    rankings and pairwise verdicts per step count, training compute, metric sections, sample grid. ``hidden``: tables left out as not applicable (named once per arch)."""
    plots, grids, compute_plots, hidden = plots or {}, grids or {}, compute_plots or {}, hidden or []
    parts = [f"# {title}"]
    if header:
        parts.append(header_markdown(header))
    parts.append(LEGEND)
    for s in summaries:
        parts.append(f"## {_escape(s.arch)}")
        if not s.value.empty:
            parts.append("### Summary\n\n" + summary_markdown(s))
        left_out = [t for t in hidden if t.arch == s.arch]
        if left_out:
            parts.append(left_out_markdown(left_out))
        shown = [t for t in tables if t.arch == s.arch]
        if any(t.reasons() for t in shown):
            parts.append("Empty cells (each reason once):\n\n" + empty_cells_markdown(shown))
        titles = {t.metric: t.higher_is_better for t in tables if t.arch == s.arch}
        if agg is not None and not agg.cells.empty:
            verdicts = _verdicts(agg, s.arch, titles, "###")
            if verdicts:
                parts.append(verdicts)
            if agg.cells["train_tflops"].notna().any():
                parts.append("### Training compute\n\nCounted by the training loop (`cdmbench.compute`): FLOPs "
                             "of the networks' matmuls/convolutions, forward and backward, all processes; teacher "
                             "forward passes in samples.\n\n" + compute_markdown(agg.cells, s.arch))
        for t in (t for t in tables if t.arch == s.arch):
            parts.append(metric_section(t, plots.get(t.key), reasons=False, compute_plot=compute_plots.get(t.key)))
        if s.arch in grids:
            parts.append(
                "### Samples\n\nRows: methods by step count (the teacher's reference setting on top; one training "
                "seed, the lowest); columns: distinct prompts (captions above) × seeds, the same in every row.\n\n"
                f"![samples]({grids[s.arch]})"
            )
    return "\n\n".join(parts) + "\n"


def _verdicts(agg, arch: str, titles: dict, level: str) -> str:
    out = []
    steps_list = sorted(set(int(x) for x in agg.cells.loc[(agg.cells["arch"] == arch)
                                                           & (agg.cells["status"] == "ok"), "steps"]))
    for steps in steps_list:
        if agg.pairs.empty or not ((agg.pairs["arch"] == arch) & (agg.pairs["steps"] == steps)).any():
            continue
        out.append(f"{level} {_steps_label(steps)}: ranking and paired verdicts\n\n"
                   "Rank (mean): 1 + the number of methods better at 95 % on the same items; teacher: reference.\n\n"
                   + ranking_markdown(agg.cells, agg.ranks, arch, steps, titles)
                   + "\n\nA − B with its paired 95 % interval: ▲ A better, ▼ A worse, = not distinguishable.\n\n"
                   + pairwise_markdown(agg.pairs, arch, steps, titles))
    return "\n\n".join(out)
