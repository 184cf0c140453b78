"""The toy VAE: a tiny diffusers ``AutoencoderKL`` (32×32×3 pixels ↔ 8×8×C latents) trained by the project
on the procedural shapes, so the toy teacher lives in a latent space like SD3's.

Training: reconstruction loss (L1 + L2 on pixels in [−1, 1]) plus a light KL term on the posterior, as
the Stable Diffusion VAEs (Rombach et al. 2022, §3 and App. G: "KL-reg." with a small weight), no GAN
or LPIPS term. Afterwards the scaling and shift factors are computed from the data as in SD3's VAE
config: ``shift_factor`` = mean and ``scaling_factor`` = 1 / std of posterior samples z, so the teacher
sees latents = (z − shift) · scale of unit variance, and decoding is ``vae.decode(latents / scale +
shift)`` exactly as the SD3 adapter does (cdm.md §1).

Reproduce the shipped VAE: ``cdmbench toy train-vae --out vae.safetensors --steps 2000 --seed 0``, then
``--init vae.safetensors --decoder-only --steps 600 --lr 1e-3 --seed 1`` (README, toy backbone section);
``cdmbench toy train-teacher --vae FILE …`` embeds a VAE into the teacher file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cdmbench.io import save_safetensors
from cdmbench.toy.shapes import DATA_VERSION, RESOLUTION, ShapesStream


@dataclass(frozen=True)
class ToyVAEArch:
    """Sizes of the toy VAE (defaults are the shipped one): three blocks = two ×2 down/upsamplings."""

    latent_channels: int = 8
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def build_vae(arch: ToyVAEArch, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    from diffusers import AutoencoderKL

    n = len(arch.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(arch.block_out_channels),
        layers_per_block=arch.layers_per_block, latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_num_groups, sample_size=RESOLUTION,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def vae_arch_from_record(record: dict) -> ToyVAEArch:
    a = dict(record["arch"])
    a["block_out_channels"] = tuple(a["block_out_channels"])
    return ToyVAEArch(**a)


def vae_from_tensors(tensors: dict[str, torch.Tensor], record: dict, prefix: str = ""):
    """An ``AutoencoderKL`` with the factors of ``record`` and the weights under ``prefix``, loaded strictly."""
    vae = build_vae(vae_arch_from_record(record), record["scaling_factor"], record["shift_factor"])
    vae.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return vae.eval().requires_grad_(False)


def load_vae_file(path: str | Path):
    """(vae, record) from a file written by ``train_vae``."""
    from safetensors import safe_open

    from cdmbench.errors import MissingWeightsError

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"toy VAE weights not found at {path}; build them with "
                                  f"`cdmbench toy train-vae --out {path}`")
    with safe_open(str(path), "pt") as f:
        record = json.loads((f.metadata() or {}).get("cdmbench_vae", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return vae_from_tensors(tensors, record), record


@torch.no_grad()
def data_factors(vae, seed: int, n: int = 2048, batch_size: int = 256) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of SD3's VAE config from posterior samples of ``n`` real images:
    shift = mean(z), scale = 1 / std(z − shift) over every latent element."""
    data = ShapesStream(seed=seed, batch_size=batch_size)
    g = torch.Generator().manual_seed(seed + 1)
    zs = []
    for _ in range(n // batch_size):
        images, _, _ = next(data)
        dist = vae.encode(images * 2 - 1).latent_dist
        zs.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g))
    z = torch.cat(zs).double()
    shift = float(z.mean())
    return float(1.0 / (z - shift).std()), shift


def encode_latents(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] → teacher latents (z − shift) · scale, z a posterior sample (the mean without a generator)."""
    dist = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist
    z = dist.mean if generator is None else dist.mean + dist.std * torch.randn(
        dist.mean.shape, generator=generator).to(dist.mean)
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Teacher latents → images in [0, 1]: ``vae.decode(latents / scale + shift)``, as the SD3 adapter."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return ((vae.decode(z, return_dict=False)[0].float() + 1) / 2).clamp(0, 1)


def train_vae(
    out: str | Path,
    steps: int = 2000,  # optimizer steps
    batch_size: int = 32,
    lr: float = 2e-3,  # AdamW learning rate (cosine-decayed to 5 % after a 100-step warmup)
    kl_weight: float = 1e-4,  # light KL to N(0, I) (per latent element), keeps the latent bounded
    seed: int = 0,
    arch: ToyVAEArch = ToyVAEArch(),
    init: str | Path | None = None,  # continue from a VAE file instead of starting from scratch
    factor_images: int = 2048,  # real images whose posterior samples set scaling_factor and shift_factor
    decoder_only: bool = False,  # fine-tune the decoder of ``init`` only: latents and factors stay as they are
    progress: bool = True,
) -> dict:
    """Train and save the toy VAE (with its data factors); returns the record written into the file."""
    torch.manual_seed(seed)
    vae, init_record = build_vae(arch).train(), None
    if init is not None:
        vae, init_record = load_vae_file(init)
        vae.train().requires_grad_(True)
        arch = vae_arch_from_record(init_record)
    elif decoder_only:
        raise ValueError("decoder_only needs init (the VAE whose encoder, and so latent space, is kept)")
    if decoder_only:  # keep the latent space (and a teacher trained in it): only the decoder learns
        vae.encoder.requires_grad_(False).eval()
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(k / max(1, steps) * 3.14159)).item()))
    )
    data = ShapesStream(seed=seed + 100, batch_size=batch_size)
    g = torch.Generator().manual_seed(seed + 101)
    t0 = time.time()
    from rich.progress import Progress

    losses = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("training toy VAE", total=steps)
        for step in range(steps):
            images, _, _ = next(data)
            x = images * 2 - 1
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
            rec = vae.decode(z, return_dict=False)[0]
            l1, l2 = (rec - x).abs().mean(), (rec - x).square().mean()
            kl = dist.kl().mean() / z[0].numel()  # KL to N(0, I) per latent element
            loss = l1 + l2 + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(l1.item())
            if step % 50 == 0:
                msg = f"toy VAE L1 {sum(losses[-50:]) / len(losses[-50:]):.4f}"
                bar.update(task, completed=step + 1, description=msg)
                if not bar.console.is_terminal:
                    print(f"step {step} {msg} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    if decoder_only:
        scale, shift = init_record["scaling_factor"], init_record["shift_factor"]
    else:
        scale, shift = data_factors(vae, seed=seed + 200, n=factor_images, batch_size=min(256, factor_images))
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    record = {
        "arch": asdict(arch), "steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight,
        "seed": seed, "decoder_only": decoder_only, "train_minutes": round((time.time() - t0) / 60, 2),
        "final_l1": round(sum(losses[-200:]) / len(losses[-200:]), 5), "scaling_factor": scale,
        "shift_factor": shift, "torch": torch.__version__, "data": DATA_VERSION,
        "init": init_record,  # the record of the file this run continued from (None: scratch)
    }
    save_safetensors(vae.state_dict(), out, metadata={"cdmbench_vae": json.dumps(record)})
    return record
