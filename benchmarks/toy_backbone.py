"""Toy backbone speed: teacher forward time and images/s of toy sampling at 1/2/4/28 steps, and how
long `cdmbench --help` takes. Prints a markdown table.

    python benchmarks/toy_backbone.py [--threads 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cdmbench.cli", "--help"], capture_output=True, check=True)
    help_s = time.perf_counter() - t

    from cdmbench.backbones import build_backbone
    from cdmbench.sampling import Denoiser, sample_euler
    from cdmbench.seeding import StackedGenerator
    from cdmbench.toy.shapes import eval_prompts

    toy = build_backbone("toy")
    prompts = [p.text for p in eval_prompts()][: args.batch]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    cond = toy.encode_prompts(prompts)
    x = torch.randn(args.batch, *toy.latent_shape)
    s = torch.full((args.batch,), 0.5)
    with torch.no_grad():
        for _ in range(3):
            toy.velocity(toy.teacher, x, s, cond)
        n = 20
        t = time.perf_counter()
        for _ in range(n):
            toy.velocity(toy.teacher, x, s, cond)
        fwd_ms = (time.perf_counter() - t) / n * 1000

    rows = [("teacher forward, batch %d" % args.batch, f"{fwd_ms:.1f} ms", "")]
    rng = StackedGenerator.for_samples([(i, 0) for i in range(args.batch)])
    noise = rng.randn(toy.latent_shape)
    for steps, guidance in ((1, 1.0), (2, 1.0), (4, 1.0), (4, toy.default_guidance), (28, toy.default_guidance)):
        den = Denoiser(toy, toy.teacher, cond, toy.uncond(args.batch), guidance)
        t = time.perf_counter()
        sample_euler(den, noise, toy.schedule(steps).sigmas())
        dt = time.perf_counter() - t
        rows.append((f"sampling {steps} steps, CFG {guidance:g} (NFE {den.nfe})",
                     f"{args.batch / dt:.0f} images/s", f"{dt * 1000:.0f} ms / batch"))
    rows.append(("`cdmbench --help` (subprocess)", f"{help_s:.2f} s", ""))
    print(f"torch {torch.__version__}, {args.threads} threads\n")
    print("| measurement | value | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
