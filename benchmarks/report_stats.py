"""CPU seconds of the verdict statistics at the toy protocol's size (``cdmbench.reports.stats``): per cell
summary and every paired comparison, for a per-image metric and for FID (128-d features, recomputed on
each of the bootstrap's resampled sets). Synthetic data; prints a markdown table.

    python benchmarks/report_stats.py [--items 480] [--seeds 3] [--methods 7] [--resamples 1000]

CPU time (``time.process_time``) rather than wall time, so a shared machine's load does not enter.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=480)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", type=int, default=7)  # labels per step count (cd, cdm, ddmd, dmd, dmd2, ...)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--features", type=int, default=128)
    args = ap.parse_args()

    from cdmbench.reports.stats import Bootstrap, CellData, FrechetToReference

    rng = np.random.default_rng(0)
    items = tuple((f"p{i}", 0) for i in range(args.items))
    ref = rng.normal(size=(4800, args.features))
    fid = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    rows = []
    for kind in ("per-image", "fid"):
        boot = Bootstrap(n_resamples=args.resamples)
        cells = []
        for m in range(args.methods):
            if kind == "fid":
                units = {s: rng.normal(0.1 * m, 1, size=(args.items, args.features)) for s in range(args.seeds)}
                cells.append(CellData(("toy", f"m{m}", 1, kind), items, units, fid))
            else:
                units = {s: rng.normal(0.5 + 0.01 * m, 0.2, size=args.items) for s in range(args.seeds)}
                cells.append(CellData(("toy", f"m{m}", 1, kind), items, units))
        t0 = time.process_time()
        for c in cells:
            boot.summarize(c)
        t1 = time.process_time()
        for a, b in itertools.combinations(cells, 2):
            boot.compare(a, b, higher_is_better=kind != "fid")
        t2 = time.process_time()
        rows.append((kind, len(cells), t1 - t0, t2 - t1))
    print(f"items {args.items}, training seeds {args.seeds}, resamples {args.resamples}, features {args.features}\n")
    print("| metric kind | cells | summaries (CPU s) | all pairs (CPU s) | per cell (CPU s) |")
    print("|---|--:|--:|--:|--:|")
    for kind, n, a, b in rows:
        print(f"| {kind} | {n} | {a:.2f} | {b:.2f} | {(a + b) / n:.2f} |")


if __name__ == "__main__":
    main()
