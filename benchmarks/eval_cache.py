"""How much of an eval a re-run saves: run a toy eval, run it again, print first/re-run seconds and ratio.

The target is ratio <= 0.10: a re-run of a finished eval only reads the manifest and the score cache
(``cdmbench.eval.harness``). Every method is trained for a couple of iterations first (the images do not
need to be good to time the harness). Two modes are timed:

- in-process: ``run_eval`` twice in this Python process, after imports are warm (the harness alone);
- cli (``--cli``): ``cdmbench eval`` twice as fresh processes (adds ~10 s of Python/torch/diffusers imports
  to each run).

Example:
    python benchmarks/eval_cache.py --num-prompts 16 --seeds 0-1 --cli
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_tiny_runs(workspace: Path) -> list[str]:
    from cdmbench.methods import METHODS
    from cdmbench.train import resolve_config, train

    tiny = {"dmd": {"num_pairs": "8", "pair_steps": "2"},
            "cdm": {"max_rollout_steps": "3"}}
    names = []
    for name in METHODS.names():
        run = workspace / "runs" / f"{name}-toy"
        if not (run / "done.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            overrides = {"train.steps": "2", "train.batch_size": "2", "warmup": "0", **tiny.get(name, {})}
            train(resolve_config(name, "toy", overrides), run, progress=False)
        names.append(run.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--seeds", default="0-1")
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--metrics", default=None, help="comma-separated (default: every registered metric)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cli", action="store_true", help="also time `cdmbench eval` as fresh processes")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cdmbench.backbones import build_backbone
    from cdmbench.eval.harness import EvalConfig, run_eval
    from cdmbench.eval.results import read_results
    from cdmbench.seeding import parse_int_list

    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="cdmbench-eval-cache-"))
    train_tiny_runs(workspace)
    build_backbone("toy")  # warm the lazy imports (diffusers, transformers) outside the timed region

    rows = []
    out = workspace / "eval-inprocess"
    shutil.rmtree(out, ignore_errors=True)
    cfg = EvalConfig(workspace=str(workspace), steps=tuple(parse_int_list(args.steps, name="steps")),
                     num_prompts=args.num_prompts, seeds=tuple(parse_int_list(args.seeds, name="seeds")),
                     metrics=tuple(args.metrics.split(",")) if args.metrics else None, out=str(out), progress=False)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        path = run_eval(cfg)
        times.append(time.perf_counter() - t)
    rows.append(("in-process", *times))
    n_rows = len(read_results(path))
    n_images = sum(1 for _ in (out / "images").rglob("*.png"))

    if args.cli:
        out = workspace / "eval-cli"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "cdmbench.cli", "eval", "--workspace", str(workspace), "--out", str(out),
               "--steps", args.steps, "--seeds", args.seeds, "--num-prompts", str(args.num_prompts), "--quiet",
               *(["--metrics", args.metrics] if args.metrics else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        times = []
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
        rows.append(("cli (fresh process)", *times))

    print(f"toy eval: {n_images} images, {n_rows} result rows, workspace {workspace}")
    print(f"| {'mode':<20} | {'first run s':>11} | {'re-run s':>8} | {'ratio':>5} |")
    print(f"|{'-' * 22}|{'-' * 13}|{'-' * 10}|{'-' * 7}|")
    for mode, first, again in rows:
        print(f"| {mode:<20} | {first:11.2f} | {again:8.2f} | {again / first:5.3f} |")


if __name__ == "__main__":
    main()
