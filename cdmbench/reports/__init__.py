"""Reports: results file → markdown tables, CSV pivots, metric-vs-steps plots and a sample grid.

``build_report(results_path, out_dir)`` writes, each file atomically::

    out_dir/report.md            title, header, per arch: summary, one table (+ plot) per metric, grid
    out_dir/tables/*.csv         <arch>_<metric>.csv pivots and summary_<arch>.csv
    out_dir/plots/*.png          <arch>_<metric>.png
    out_dir/grid.png             methods × steps samples (grid_<arch>.png when several archs)
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
    max_samples: int = 4,
) -> Path:
    """Build the report for a results file (``cdmbench.eval.results.RESULT_COLUMNS``).

    Args:
        results_path: the tidy results (.csv, .parquet or .jsonl).
        out_dir: where report.md, tables/, plots/ and the grid go (created; existing files replaced).
        images_root: folder with the generation manifest (or the manifest file); None = no grid.
        title: the report's H1.
        header: key → value facts shown under the title (commit, date, machine, ...).
        max_samples: samples per grid cell.

    Returns:
        The path of report.md.
    """
    from cdmbench.eval.results import read_manifest
    from cdmbench.io import write_text
    from cdmbench.reports import grid as grid_mod
    from cdmbench.reports import markdown, plots, tables

    out_dir = Path(out_dir)
    df = tables.load_results(results_path)
    if df.empty:
        raise CdmbenchError(f"results file {results_path} has no rows")
    manifest = None
    if images_root is not None:  # read every input before the first file is written
        manifest_path, root = find_manifest(images_root)
        manifest = read_manifest(manifest_path)
    metric_tables = tables.metric_tables(df)
    tables.write_csvs(metric_tables, df, out_dir / "tables")
    teacher = set(df.loc[df["method"] == tables.TEACHER_METHOD, "label"])
    plot_paths = {}
    for t in metric_tables:
        if t.value.notna().any().any():
            plots.plot_metric(t, out_dir / "plots" / f"{t.key}.png", teacher)
            plot_paths[t.key] = f"plots/{t.key}.png"
    grids = {}
    if manifest is not None:
        archs = [a for a in dict.fromkeys(manifest["arch"])]
        for arch in archs:
            name = "grid.png" if len(archs) == 1 else f"grid_{tables.safe_name(arch)}.png"
            grid_mod.sample_grid(manifest[manifest["arch"] == arch], root, out_dir / name, max_samples)
            grids[arch] = name
    summaries = [tables.summary(df, metric_tables, arch) for arch in dict.fromkeys(df["arch"])]
    text = markdown.render_report(title, header, summaries, metric_tables, plot_paths, grids)
    report = out_dir / "report.md"
    write_text(report, text)
    return report


__all__ = ["build_report", "find_manifest"]
