"""Eval time of the default toy protocol with and without the diagnostic metrics, side by side in one process.

The protocol is the one ``reports/toy`` uses (``cdmbench bench --arch toy --seeds 0-4``): every method at
steps 1, 2, 4 and the teacher at 1, 2, 4 and its reference 28 steps, 96 prompts × 5 seeds = 480 images per
row. Every method is trained for two iterations first (image quality does not change the cost). Images are
generated once (timed); then the scoring phase runs alternately with today's metrics (``--before``) and with
every registered metric, with the score cache and results file removed before each run and the metrics'
reference caches cleared, ``--repeats`` times. Prints one table: generation, scoring and total minutes and
the ratio total(all metrics) / total(before).

Example:
    python benchmarks/diag_eval_time.py                 # ~15 min on 2 idle cores
    python benchmarks/diag_eval_time.py --num-prompts 24 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

BEFORE = ("attr_acc", "clip", "fid", "hps", "imagereward")  # the metrics registered before the diagnostics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: all 96")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from eval_cache import train_tiny_runs

    from cdmbench.eval.harness import EvalConfig, generate, score
    from cdmbench.eval.metrics import METRICS
    from cdmbench.seeding import parse_int_list
    from cdmbench.toy import factors

    ws = args.workspace or Path(tempfile.mkdtemp(prefix="diag-eval-time-"))
    runs = train_tiny_runs(ws)
    cfg = EvalConfig(workspace=str(ws), steps=(1, 2, 4), runs=tuple(runs), seeds=tuple(parse_int_list(args.seeds)),
                     num_prompts=args.num_prompts, out=str(ws / "eval"), arch="toy", progress=False)
    t0 = time.perf_counter()
    generate(cfg)
    gen = time.perf_counter() - t0
    every = tuple(METRICS.names())
    timings: dict[str, list[float]] = {"before": [], "all": []}
    for _ in range(args.repeats):
        for label, names in (("before", BEFORE), ("all", every)):
            shutil.rmtree(cfg.out_dir / "cache" / "scores", ignore_errors=True)
            (cfg.out_dir / "results.csv").unlink(missing_ok=True)
            factors.reference_renders.cache_clear()
            factors.reference_scales.cache_clear()
            t0 = time.perf_counter()
            score(dataclasses.replace(cfg, metrics=names))
            timings[label].append(time.perf_counter() - t0)
    before, after = min(timings["before"]), min(timings["all"])
    n_rows = len(runs) * 3 + 4
    print(f"toy protocol: {len(runs)} runs × steps 1,2,4 + teacher 1,2,4,28 ({n_rows} rows), "
          f"{cfg.num_prompts or 96} prompts × {len(cfg.seeds)} seeds; min of {args.repeats} scoring runs")
    print("| metrics | generation min | scoring min | total min |")
    print("|---|--:|--:|--:|")
    print(f"| before ({', '.join(BEFORE)}) | {gen / 60:.2f} | {before / 60:.2f} | {(gen + before) / 60:.2f} |")
    print(f"| all {len(every)} registered | {gen / 60:.2f} | {after / 60:.2f} | {(gen + after) / 60:.2f} |")
    print(f"ratio total(all) / total(before) = {(gen + after) / (gen + before):.2f}; "
          f"scoring alone {after / before:.2f}")
    if args.workspace is None:
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
