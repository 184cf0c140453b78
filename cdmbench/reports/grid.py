"""A sample grid: columns = a few distinct prompts × a few seeds (captions above), rows = methods grouped by
step count, the teacher at the students' step counts beside them and its reference setting (its most
steps) as one row on top. Drawn with matplotlib (readable text); every tile of a column is the same
(prompt_id, seed), so the rows compare on identical noise and prompt.

A method trained once per step count (CD: one run per phase count) is one row per step count, filled by
the run that sampled there; of several training seeds the lowest is shown.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import pandas as pd

from cdmbench.errors import CdmbenchError
from cdmbench.reports.tables import TEACHER_METHOD

TILE_IN = 0.95  # tile side, inches
LABEL_IN = 2.1  # row-label column
HEADER_IN = 0.8  # caption + seed rows above the tiles
GROUP_GAP_IN = 0.18  # gap between step-count groups


def _row_labels(m: pd.DataFrame, run_seeds: dict[str, float]) -> pd.DataFrame:
    """Keep one run per (method, steps): the lowest training seed; label rows by method, or
    "method (run)" when a method has several runs of that seed at one step count (e.g. an ablation)."""
    m = m.assign(_seed=[run_seeds.get(r, math.inf) for r in m["run"]])
    best = m.groupby(["method", "steps"])["_seed"].transform("min")
    m = m[m["_seed"] == best]
    clash = m.groupby(["method", "steps"])["run"].transform("nunique") > 1
    by_run = set(m.loc[clash, "method"])
    label = [f"{me} ({r})" if me in by_run else me for me, r in zip(m["method"], m["run"])]
    return m.assign(label=label).drop(columns="_seed")


def choose_prompts_and_seeds(manifest: pd.DataFrame, num_prompts: int, num_seeds: int) -> tuple[list[str], list[int]]:
    """``num_prompts`` prompt ids with distinct captions, spread over the prompt set (among those sampled
    in the most cells), and the ``num_seeds`` lowest seeds every chosen prompt has."""
    cells = manifest.groupby("prompt_id")[["run", "steps"]].apply(lambda g: len(g.drop_duplicates()))
    full = sorted(p for p in cells.index if cells[p] == cells.max())
    caption = dict(zip(manifest["prompt_id"].astype(str), manifest["prompt"].astype(str)))
    distinct = list({caption[p]: p for p in reversed(full)}.values())[::-1]  # first id per caption
    distinct.sort()
    if len(distinct) > num_prompts:  # evenly spread: a sorted prompt set varies slowly
        step = len(distinct) / num_prompts
        distinct = [distinct[int(i * step)] for i in range(num_prompts)]
    chosen = manifest[manifest["prompt_id"].isin(distinct)]
    per_prompt = chosen.groupby("prompt_id")["seed"].apply(lambda s: set(int(x) for x in s))
    common = set.intersection(*per_prompt.tolist()) if len(per_prompt) else set()
    return distinct, sorted(common)[:num_seeds]


def _rows(m: pd.DataFrame) -> list[tuple[str, int, bool]]:
    """(label, steps, is_reference) top to bottom: the teacher's settings beyond the students' steps, then
    per student step count the teacher and the methods."""
    students = m[m["method"] != TEACHER_METHOD]
    top = int(students["steps"].max()) if len(students) else 0
    teacher = list(dict.fromkeys(m.loc[m["method"] == TEACHER_METHOD, "label"]))
    others = [lb for lb in dict.fromkeys(students["label"])]
    have = set(zip(m["label"], m["steps"]))
    rows = [(lb, s, True) for lb in teacher for s in sorted(m["steps"].unique()) if s > top and (lb, s) in have]
    for s in sorted(students["steps"].unique()):
        rows += [(lb, int(s), False) for lb in teacher + others if (lb, s) in have]
    return rows


def sample_grid(
    manifest: pd.DataFrame,
    images_root: str | os.PathLike,
    out_path: str | os.PathLike,
    num_prompts: int = 4,
    num_seeds: int = 2,
    run_seeds: dict[str, float] | None = None,
) -> Path:
    """Write the grid PNG for one arch's manifest rows (``MANIFEST_COLUMNS``; paths relative to
    ``images_root``). ``run_seeds``: run → training seed (the lowest is shown per method and steps)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from cdmbench.io import atomic_path

    if manifest.empty:
        raise CdmbenchError("the image manifest has no rows for this grid")
    root = Path(images_root)
    m = manifest.assign(steps=manifest["steps"].astype(int), prompt_id=manifest["prompt_id"].astype(str),
                        seed=manifest["seed"].astype(int))
    m = _row_labels(m, run_seeds or {})
    prompts, seeds = choose_prompts_and_seeds(m, num_prompts, num_seeds)
    if not prompts or not seeds:
        raise CdmbenchError("the image manifest has no (prompt, seed) shared by the grid's cells")
    rows = _rows(m)
    lookup = {(r.label, r.steps, r.prompt_id, r.seed): r.path for r in m.itertuples()}
    caption = dict(zip(m["prompt_id"], m["prompt"].astype(str)))
    cols = [(p, s) for p in prompts for s in seeds]

    groups = [(r[1], r[2]) for r in rows]
    gaps = [0.0] + [GROUP_GAP_IN if groups[i] != groups[i - 1] else 0.0 for i in range(1, len(rows))]
    width = LABEL_IN + len(cols) * TILE_IN + 0.1
    height = HEADER_IN + len(rows) * TILE_IN + sum(gaps) + 0.1
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    pad = 0.04  # inches between tiles
    for j, (pid, seed) in enumerate(cols):
        x = LABEL_IN + j * TILE_IN
        if j % len(seeds) == 0:  # one caption over each prompt's seed columns
            cx = (x + len(seeds) * TILE_IN / 2) / width
            text = "\n".join(textwrap.wrap(caption.get(pid, pid), width=int(len(seeds) * TILE_IN * 11)))
            fig.text(cx, 1 - 0.08 / height, text, ha="center", va="top", fontsize=8.5)
        fig.text((x + TILE_IN / 2) / width, 1 - (HEADER_IN - 0.06) / height, f"seed {seed}", ha="center",
                 va="bottom", fontsize=8, color="0.35")
    y = HEADER_IN
    for i, (label, steps, ref) in enumerate(rows):
        y += gaps[i]
        name = f"{label} · {steps} steps\n(reference)" if ref else f"{label} · {steps} step" + ("s" if steps != 1 else "")
        fig.text(0.05 / width, 1 - (y + TILE_IN / 2) / height, name, ha="left", va="center", fontsize=9,
                 fontweight="bold" if ref or label == TEACHER_METHOD else "normal",
                 color="0.3" if label == TEACHER_METHOD else "black")
        for j, (pid, seed) in enumerate(cols):
            x = LABEL_IN + j * TILE_IN
            ax = fig.add_axes(((x + pad) / width, 1 - (y + TILE_IN - pad) / height, (TILE_IN - 2 * pad) / width,
                               (TILE_IN - 2 * pad) / height))
            ax.set_axis_off()
            rel = lookup.get((label, steps, pid, seed))
            if rel is None:
                ax.text(0.5, 0.5, "–", ha="center", va="center", fontsize=10, color="0.5")
                continue
            with Image.open(root / rel) as im:
                ax.imshow(im.convert("RGB"), interpolation="nearest")
        y += TILE_IN
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    return out_path
