"""Result rows (one per run, checkpoint, steps, metric) → cells over training seeds, verdicts, ranks.

A cell is (arch, label, steps, metric, protocol). The label is the method, so a method's training-seed
replicates — and a method trained once per step count (``Method.steps_field``, e.g. CD's phases) — form
one row of the tables; when two runs of one method would fill the same cell for the same training seed
(e.g. an ablation beside the default), every run of that method is labelled "method (run)" instead.

Main cells use each run's latest evaluated checkpoint; older checkpoints (``cdmbench eval --checkpoints
all``) feed the learning curves. Each cell's per-item data come from the eval folder
(``cdmbench.eval.items``) and go through ``cdmbench.reports.stats``; a cell without them (an eval folder
from before per-item scores were kept) falls back to its rows: the mean over seeds with a t-interval
(one seed: the row's own per-image interval), and no paired comparison.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cdmbench.reports.stats import Bootstrap, CellData, FrechetToReference, compact_ranks, t_interval

TEACHER = "teacher"
REFERENCE_METHODS = (TEACHER, "external")  # rows that are references, never ranked
INTERVAL_BOOTSTRAP = "hierarchical bootstrap"
INTERVAL_T = "t over seeds"
INTERVAL_ROW = "per-image bootstrap"


def image_set(run: str, train_step, latest_step) -> str:
    """The eval folder's image set of a row: RUN for the latest checkpoint, RUN@STEP for an older one."""
    if pd.isna(train_step) or pd.isna(latest_step) or int(train_step) == int(latest_step):
        return run
    return f"{run}@{int(train_step)}"


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``label``, ``latest`` (the row is its run's latest evaluated checkpoint) and ``image_set``."""
    df = df.copy()
    df["train_step"] = df["train_step"].astype("Int64")
    latest = df.groupby("run")["train_step"].transform("max")
    df["latest"] = df["train_step"].isna() | (df["train_step"] == latest).fillna(False)
    df["image_set"] = [image_set(r, s, m) for r, s, m in zip(df["run"], df["train_step"], latest)]
    seed = df["train_seed"].fillna(-1)
    ok = df[(df["status"] == "ok") & df["latest"]].assign(_seed=seed)
    clash = ok.groupby(["arch", "method", "steps", "metric", "protocol", "_seed"])["run"].nunique()
    clashing = {(a, m) for (a, m, *_), k in clash.items() if k > 1}
    by_run = [(a, m) in clashing for a, m in zip(df["arch"], df["method"])]
    df["label"] = np.where(by_run, df["method"] + " (" + df["run"] + ")", df["method"])
    return df


@dataclass
class Aggregate:
    """``cells``: one row per cell (result-row columns plus ``n_seeds``, ``interval``, ``t_low``/``t_high``
    and training compute means); ``pairs``: every paired comparison; ``ranks``: compact ranks."""

    cells: pd.DataFrame
    pairs: pd.DataFrame
    ranks: pd.DataFrame
    curves: pd.DataFrame  # (arch, label, steps, metric, train_step) → mean value and compute over seeds


TRAIN_MEANS = ("train_tflops", "train_teacher_fwd", "train_minutes", "train_step", "global_batch")


def aggregate(df: pd.DataFrame, eval_dir: str | Path | None, bootstrap: Bootstrap | None = None) -> Aggregate:
    """Cells, pairwise comparisons and ranks of a tidy results frame (``tables.load_results``)."""
    from cdmbench.eval.items import load_items

    boot = bootstrap or Bootstrap()
    df = prepare(df)
    main = df[df["latest"]]
    cells, datas = [], {}
    keys = ["arch", "label", "steps", "metric", "protocol"]
    for key, rows in main[main["status"] == "ok"].groupby(keys, sort=False):
        rows = rows.drop_duplicates(subset=["run", "train_seed"], keep="last")
        data = _cell_data(key, rows, eval_dir, load_items) if eval_dir is not None else None
        first = rows.iloc[0]
        out = {**{k: v for k, v in zip(keys, key)}, "method": first["method"],
               "higher_is_better": first["higher_is_better"], "nfe": first["nfe"], "status": "ok",
               "n": int(rows["n"].max()), "runs": ", ".join(dict.fromkeys(rows["run"]))}
        for c in TRAIN_MEANS:
            v = pd.to_numeric(rows[c], errors="coerce").dropna()
            out[c] = float(v.mean()) if len(v) else np.nan
        if data is not None:
            s = boot.summarize(data)
            out.update(value=s.mean, ci_low=s.low, ci_high=s.high, t_low=s.t_low, t_high=s.t_high,
                       n_seeds=s.n_seeds, interval=INTERVAL_BOOTSTRAP)
            datas[key] = data
        else:
            vals = rows["value"].astype(float).to_numpy()
            lo, hi = t_interval(vals) if len(vals) > 1 else (float(rows["ci_low"].iloc[0]), float(rows["ci_high"].iloc[0]))
            out.update(value=float(vals.mean()), ci_low=lo, ci_high=hi, t_low=lo if len(vals) > 1 else np.nan,
                       t_high=hi if len(vals) > 1 else np.nan, n_seeds=len(vals),
                       interval=INTERVAL_T if len(vals) > 1 else INTERVAL_ROW)
        cells.append(out)
    # cells no ok row fills: the reason of a run that sampled at those steps (a method trained per step
    # count, e.g. CD's phases1/2/4 runs: another run's "cannot sample with N steps" is not this cell's)
    have = {tuple(c[k] for k in ["arch", "label", "steps", "metric"]) for c in cells}
    for _, r in _covering_first(main[main["status"] != "ok"], main).iterrows():
        k = (r["arch"], r["label"], r["steps"], r["metric"])
        if k not in have:
            have.add(k)
            cells.append({**{c: r[c] for c in keys}, "method": r["method"], "higher_is_better": r["higher_is_better"],
                          "nfe": r["nfe"], "status": r["status"], "value": np.nan, "ci_low": np.nan,
                          "ci_high": np.nan, "n": r["n"], "n_seeds": 0})
    cells_df = pd.DataFrame(cells)
    pairs, ranks = _pairs_and_ranks(cells_df, datas, boot)
    return Aggregate(cells_df, pairs, ranks, _curves(df))


def _covering_first(rows: pd.DataFrame, main: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with the rows of runs that have an ok row at the same (arch, label, steps) first: such a
    run was trained for (and sampled at) that step count, so its reason is the cell's."""
    ok = main[main["status"] == "ok"]
    sampled = set(zip(ok["arch"], ok["label"], ok["steps"], ok["run"]))
    covering = [(a, lb, s, r) in sampled for a, lb, s, r in zip(rows["arch"], rows["label"], rows["steps"], rows["run"])]
    return rows.assign(_cov=covering).sort_values("_cov", ascending=False, kind="stable").drop(columns="_cov")


def _cell_data(key, rows: pd.DataFrame, eval_dir, load_items) -> CellData | None:
    units, items, statistic = {}, None, None
    for _, r in rows.iterrows():
        it = load_items(eval_dir, r["image_set"], int(r["steps"]), r["metric"])
        if it is None or it.checkpoint[:12] not in str(r["checkpoint"]) or it.protocol != r["protocol"]:
            return None  # missing or stale: fall back to the rows
        if items is not None and it.items != items:
            return None
        items = it.items
        seed = int(r["train_seed"]) if not pd.isna(r["train_seed"]) else 0
        if seed in units:
            return None
        units[seed] = it.data
        if it.statistic == "frechet" and statistic is None:
            statistic = FrechetToReference(*it.reference)
    return CellData(tuple(key), items, units, statistic)


def _pairs_and_ranks(cells: pd.DataFrame, datas: dict, boot: Bootstrap) -> tuple[pd.DataFrame, pd.DataFrame]:
    pairs, ranks = [], []
    if cells.empty:
        return pd.DataFrame(pairs), pd.DataFrame(ranks)
    ok = cells[(cells["status"] == "ok") & ~cells["method"].isin(REFERENCE_METHODS)]
    for (arch, steps, metric, protocol), block in ok.groupby(["arch", "steps", "metric", "protocol"], sort=False):
        labels = [lb for lb in block["label"] if (arch, lb, steps, metric, protocol) in datas]
        hib = bool(block["higher_is_better"].iloc[0])
        verdicts = {}
        for a, b in itertools.combinations(labels, 2):
            c = boot.compare(datas[(arch, a, steps, metric, protocol)], datas[(arch, b, steps, metric, protocol)], hib)
            verdicts[(a, b)] = c.verdict
            pairs.append({"arch": arch, "steps": steps, "metric": metric, "protocol": protocol, "a": a, "b": b,
                          "diff": c.diff, "low": c.low, "high": c.high, "verdict": c.verdict,
                          "higher_is_better": hib})
        for lb, rank in compact_ranks(labels, verdicts).items():
            ranks.append({"arch": arch, "steps": steps, "metric": metric, "protocol": protocol, "label": lb,
                          "rank": rank})
    return pd.DataFrame(pairs), pd.DataFrame(ranks)


def _curves(df: pd.DataFrame) -> pd.DataFrame:
    """Mean value and compute per (arch, label, steps, metric, checkpoint) over the runs scored at more than one
    checkpoint (``cdmbench bench`` scores its first training seed's; every run when none is), with the training
    seeds they cover (``seeds``)."""
    ok = df[(df["status"] == "ok") & df["train_step"].notna() & df["train_tflops"].notna()]
    checkpoints = ok.groupby("run")["train_step"].nunique()
    if (checkpoints > 1).any():  # a run scored at its latest checkpoint only is no curve
        ok = ok[ok["run"].isin(checkpoints[checkpoints > 1].index)]
    if ok.empty:
        return pd.DataFrame(columns=["arch", "label", "steps", "metric", "train_step", "value", "train_tflops",
                                     "n_seeds", "seeds"])
    g = ok.groupby(["arch", "label", "steps", "metric", "train_step"], sort=True)
    seeds = lambda s: ",".join(str(int(v)) for v in sorted(s.dropna().unique()))  # noqa: E731
    return g.agg(value=("value", "mean"), train_tflops=("train_tflops", "mean"),
                 n_seeds=("train_seed", "nunique"), seeds=("train_seed", seeds)).reset_index()
