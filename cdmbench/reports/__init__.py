"""Reports: results file → markdown tables, CSV pivots, metric-vs-steps plots and a sample grid.

``build_report(results_path, out_dir)`` writes, each file atomically::

    out_dir/report.md            title, header, per arch: summary, verdicts and ranks per step count,
                                 training compute, one table (+ plots) per metric, grid
    out_dir/results.csv          the tidy rows it was built from
    out_dir/tables/*.csv         <arch>_<metric>.csv pivots, summary_<arch>.csv, cells/pairs/ranks/curves.csv
    out_dir/plots/*.png          <arch>_<metric>.png (vs steps), <arch>_<metric>_vs_compute.png
    out_dir/grid.png             (method, steps) rows × (prompt, seed) columns (grid_<arch>.png when several archs)
"""

from __future__ import annotations

import os
from pathlib import Path

from cdmbench.errors import CdmbenchError

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "manifest.parquet")


def find_manifest(images_root: str | os.PathLike) -> tuple[Path, Path]:
    """(manifest file, images root): ``images_root`` is a folder holding manifest.{jsonl,csv,parquet}
    or the manifest file itself (its folder is then the root)."""
    p = Path(images_root)
    if p.is_file():
        return p, p.parent
    for name in MANIFEST_NAMES:
        if (p / name).is_file():
            return p / name, p
    raise CdmbenchError(f"no image manifest in {p}: expected one of {', '.join(MANIFEST_NAMES)}")


def build_report(
    results_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    images_root: str | os.PathLike | None = None,
    title: str = "cdmbench report",
    header: dict | None = None,
    grid_prompts: int = 4,
    grid_seeds: int = 2,
    argv: list[str] | None = None,
) -> Path:
    """Build the report for a results file (``cdmbench.eval.results.RESULT_COLUMNS``).

    Cells are aggregated over training seeds (``cdmbench.reports.aggregate``), with per-item data read
    from the results file's folder (the eval folder, ``cdmbench.eval.items``).

    Args:
        results_path: the tidy results (.csv, .parquet or .jsonl); copied into ``out_dir``.
        out_dir: where report.md, tables/, plots/ and the grid go (created; existing files replaced).
        images_root: folder with the generation manifest (or the manifest file); None = no grid.
        title: the report's H1.
        header: key → value facts shown under the title, after the ones read from the results (command, versions,
            date, n, prompt set, seeds, training seeds, global batch); a callable value is called when the text is
            rendered, after the aggregates, plots and grids.
        grid_prompts, grid_seeds: the grid's columns: this many distinct prompts × seeds.
        argv: the command line for the header (default ``sys.argv``).

    Returns:
        The path of report.md.
    """
    import shutil
    import sys

    import pandas as pd

    from cdmbench.eval.results import read_manifest
    from cdmbench.io import atomic_path, write_text
    from cdmbench.reports import grid as grid_mod
    from cdmbench.reports import markdown, plots, tables
    from cdmbench.reports.aggregate import aggregate

    out_dir = Path(out_dir)
    df = tables.load_results(results_path)
    if df.empty:
        raise CdmbenchError(f"results file {results_path} has no rows")
    manifest = None
    if images_root is not None:  # read every input before the first file is written
        manifest_path, root = find_manifest(images_root)
        manifest = read_manifest(manifest_path)
        manifest = manifest[~manifest["run"].str.contains("@", regex=False)]  # older checkpoints: curves only
    eval_dir = Path(results_path).parent
    agg = aggregate(df, eval_dir)
    all_tables = tables.metric_tables(cells_as_rows(agg))
    metric_tables = [t for t in all_tables if t.applies]
    hidden = [t for t in all_tables if not t.applies]
    frame = cells_as_rows(agg)
    tables.write_csvs(metric_tables, frame, out_dir / "tables")
    _write_frames(out_dir / "tables", {"cells": agg.cells, "pairs": agg.pairs, "ranks": agg.ranks,
                                       "curves": agg.curves}, atomic_path)
    with atomic_path(out_dir / "results.csv") as tmp:  # the tidy rows every number is computed from
        shutil.copyfile(results_path, tmp)
    teacher = set(frame.loc[frame["method"] == tables.TEACHER_METHOD, "label"])
    plot_paths = {}
    for t in metric_tables:
        if t.value.notna().any().any():
            plots.plot_metric(t, out_dir / "plots" / f"{t.key}.png", teacher)
            plot_paths[t.key] = f"plots/{t.key}.png"
    compute_plots = {}
    for t in metric_tables:
        curve = agg.curves[(agg.curves["arch"] == t.arch) & (agg.curves["metric"] == t.metric)]
        if not curve.empty:
            name = f"plots/{t.key}_vs_compute.png"
            plots.plot_vs_compute(curve, t, out_dir / name)
            compute_plots[t.key] = name
    grids = {}
    run_seeds = {r: float(s) for r, s in zip(df["run"], pd.to_numeric(df["train_seed"], errors="coerce"))
                 if not pd.isna(s)}
    if manifest is not None:
        archs = [a for a in dict.fromkeys(manifest["arch"])]
        for arch in archs:
            name = "grid.png" if len(archs) == 1 else f"grid_{tables.safe_name(arch)}.png"
            grid_mod.sample_grid(manifest[manifest["arch"] == arch], root, out_dir / name, grid_prompts,
                                 grid_seeds, run_seeds)
            grids[arch] = name
    summaries = [tables.summary(frame, metric_tables, arch) for arch in dict.fromkeys(frame["arch"])]
    # a callable header value is read now, after the aggregates, plots and grids (e.g. the bench's wall time)
    facts = {**markdown.report_facts(df, eval_dir, sys.argv if argv is None else argv),
             **{k: v() if callable(v) else v for k, v in (header or {}).items()}}
    text = markdown.render_report(title, facts, summaries, metric_tables, plot_paths, grids, agg=agg,
                                  compute_plots=compute_plots, hidden=hidden)
    report = out_dir / "report.md"
    write_text(report, text)
    return report


def cells_as_rows(agg) -> "pd.DataFrame":
    """Aggregated cells in the shape of result rows (``run`` = label), with their compact rank, for the
    pivots of ``cdmbench.reports.tables``."""
    import pandas as pd

    cells = agg.cells.copy()
    if cells.empty:
        return cells
    cells["run"] = cells["label"]
    if not agg.ranks.empty:
        cells = cells.merge(agg.ranks, how="left", on=["arch", "steps", "metric", "protocol", "label"])
    else:
        cells["rank"] = float("nan")
    cells["protocol"] = cells["protocol"].fillna("")
    return cells.reset_index(drop=True).assign(steps=lambda c: pd.to_numeric(c["steps"]).astype("Int64"))


def _write_frames(folder: Path, frames: dict, atomic_path) -> None:
    for name, frame in frames.items():
        with atomic_path(folder / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)


__all__ = ["build_report", "find_manifest"]
