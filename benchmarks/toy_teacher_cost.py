"""Cost of one toy teacher velocity call: the latent teacher (v3, MMDiT on 8×8×4 toy-VAE latents, patch 1)
next to the pixel teacher it replaced (MMDiT on 32×32×3 pixels, patch 4), measured side by side in one
process, interleaved, at the same batch; plus the VAE decode that a latent sample pays once. Prints a
markdown table.

    python benchmarks/toy_teacher_cost.py [--threads 2] [--batch 64] [--repeats 5] [--model FILE]

Both networks are the diffusers ``SD3Transformer2DModel`` of ``cdmbench.toy.models.build_transformer``;
the pixel one is built from its recorded arch with fresh weights (cost does not depend on the values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time_ms(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--calls", type=int, default=10, help="velocity calls per round")
    ap.add_argument("--model", default=None, help="a toy teacher file (default: the shipped one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cdmbench.backbones import build_backbone
    from cdmbench.backbones.base import BackboneOptions
    from cdmbench.toy.models import PIXEL_ARCH, ToyArch, build_transformer
    from cdmbench.toy.shapes import eval_prompts

    toy = build_backbone("toy", BackboneOptions(model=args.model))
    pixel = build_transformer(ToyArch(patch_size=4, **PIXEL_ARCH)).eval().requires_grad_(False)
    prompts = [p.text for p in eval_prompts()]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    cond = toy.encode_prompts(prompts)
    s = torch.full((args.batch,), 0.5)
    x_lat = torch.randn(args.batch, *toy.latent_shape)
    x_pix = torch.randn(args.batch, PIXEL_ARCH["in_channels"], PIXEL_ARCH["sample_size"], PIXEL_ARCH["sample_size"])
    calls = {
        "latent": lambda: toy.velocity(toy.teacher, x_lat, s, cond),
        "pixel": lambda: toy.velocity(pixel, x_pix, s, cond),
        "decode": lambda: toy.decode(x_lat),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            for _ in range(3):
                fn()
        for _ in range(args.repeats):
            for k, fn in calls.items():
                times[k].append(_time_ms(fn, args.calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    params = {"latent": sum(p.numel() for p in toy.teacher.parameters()),
              "pixel": sum(p.numel() for p in pixel.parameters())}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, median of {args.repeats} "
          f"interleaved rounds of {args.calls} calls\n")
    print("| call | latent shape | parameters | ms / call | ratio to pixel teacher |\n|---|---|---|---|---|")
    print(f"| pixel teacher velocity (v2, patch 4) | {tuple(x_pix.shape[1:])} | {params['pixel']:,} | {med['pixel']:.1f} | 1.00 |")
    print(f"| latent teacher velocity (v3, patch 1) | {tuple(x_lat.shape[1:])} | {params['latent']:,} | {med['latent']:.1f} | "
          f"{med['latent'] / med['pixel']:.2f} |")
    print(f"| VAE decode (once per sample) | {tuple(x_lat.shape[1:])} → (3, 32, 32) | "
          f"{sum(p.numel() for p in toy.vae.decoder.parameters()) if toy.vae is not None else 0:,} | {med['decode']:.1f} | "
          f"{med['decode'] / med['pixel']:.2f} |")


if __name__ == "__main__":
    main()
