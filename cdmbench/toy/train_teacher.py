"""Train the toy teacher: rectified flow on the latents of the procedural shapes data.

x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0 (cdm.md §1), σ ~ logit-normal(0, 1) as in SD3 training,
caption dropout to the empty prompt so classifier-free guidance works. x0 are toy-VAE latents
(z − shift) · scale of each rendered batch, z a posterior sample (``cdmbench.toy.vae``), as SD3 trains
on its VAE's latents. The text encoder is trained jointly and frozen afterwards. The EMA weights are
shipped together with the VAE in one file (``cdmbench/assets/toy_teacher.safetensors``).

Reproduce the shipped teacher (see the README's toy section for the exact chain and times):
``cdmbench toy train-vae --out vae.safetensors`` then ``cdmbench toy train-teacher --vae vae.safetensors
--out cdmbench/assets/toy_teacher.safetensors --steps N --seed 0 [--init FILE]``. ``--init`` continues
from a teacher file: every tensor whose shape matches is loaded, the rest start fresh (the record lists
them), so a pixel-space teacher can warm-start a latent one.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from cdmbench.io import save_safetensors
from cdmbench.toy.models import ToyArch, arch_dict, build_text_encoder, build_tokenizer, build_transformer, MAX_TOKENS
from cdmbench.toy.shapes import DATA_VERSION, RESOLUTION, ShapesStream

TEACHER_VERSION = "toy-teacher-v3"  # bump when the teacher's protocol (space, VAE, conditioning) changes


def _load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every tensor of ``state`` whose name and shape match ``module``; the names left at their init."""
    own = module.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict({**own, **keep}, strict=True)
    return sorted(k for k in own if k not in keep)


def train_teacher(
    out: str | Path,
    vae: str | Path,  # a toy VAE file (``cdmbench toy train-vae``); embedded into the teacher file
    steps: int = 6000,  # optimizer steps
    batch_size: int = 64,
    lr: float = 1e-3,  # AdamW learning rate (cosine-decayed to 5 % after a 200-step warmup)
    caption_dropout: float = 0.1,  # probability of training on the empty prompt (enables CFG)
    ema_decay: float = 0.999,
    seed: int = 0,
    arch: ToyArch = ToyArch(),
    init: str | Path | None = None,  # warm start from a teacher file (its EMA weights, matching tensors)
    save_every: int = 0,  # also write ``out`` every this many steps (0: only at the end)
    progress: bool = True,
) -> dict:
    """Train and save the toy teacher; returns the training record written into the file metadata."""
    from cdmbench.toy.vae import encode_latents, load_vae_file

    torch.manual_seed(seed)
    autoencoder, vae_record = load_vae_file(vae)
    side = RESOLUTION // (2 ** (len(autoencoder.config.block_out_channels) - 1))
    arch = ToyArch(**{**arch_dict(arch), "in_channels": autoencoder.config.latent_channels, "sample_size": side})
    tok = build_tokenizer()
    text = build_text_encoder(arch).train()
    net = build_transformer(arch).train()
    init_record, fresh = None, []
    if init is not None:
        from cdmbench.backbones.toy import load_toy_weights

        w = load_toy_weights(Path(init))
        init_record = w.record
        fresh = _load_matching(text, w.text_encoder.state_dict()) + _load_matching(net, w.transformer.state_dict())
    params = list(text.parameters()) + list(net.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(k / max(1, steps) * 3.14159)).item()))
    )
    ema_text, ema_net = copy.deepcopy(text).eval(), copy.deepcopy(net).eval()
    for p in list(ema_text.parameters()) + list(ema_net.parameters()):
        p.requires_grad_(False)
    data = ShapesStream(seed=seed, batch_size=batch_size)
    g = torch.Generator().manual_seed(seed + 1)
    g_vae = torch.Generator().manual_seed(seed + 2)
    t0 = time.time()
    from rich.progress import Progress

    losses = []

    def save(done: int) -> dict:
        record = {
            "version": TEACHER_VERSION, "arch": arch_dict(arch), "steps": steps, "steps_done": done,
            "batch_size": batch_size, "lr": lr, "seed": seed, "caption_dropout": caption_dropout,
            "ema_decay": ema_decay, "train_minutes": round((time.time() - t0) / 60, 2),
            "final_loss": round(sum(losses[-200:]) / max(1, len(losses[-200:])), 5), "torch": torch.__version__,
            "data": DATA_VERSION, "vae": vae_record,
            "init": init_record,  # the training record of the file this run started from (None: scratch)
            "init_fresh": fresh,  # tensors of the init file's networks that did not match and started fresh
        }
        tensors = {f"text_encoder.{k}": v for k, v in ema_text.state_dict().items()}
        tensors.update({f"transformer.{k}": v for k, v in ema_net.state_dict().items()})
        tensors.update({f"vae.{k}": v for k, v in autoencoder.state_dict().items()})
        save_safetensors(tensors, out, metadata={"cdmbench": json.dumps(record)})
        return record

    with Progress(disable=not progress) as bar:
        task = bar.add_task("training toy teacher", total=steps)
        for step in range(steps):
            images, caps, _ = next(data)
            caps = ["" if torch.rand((), generator=g) < caption_dropout else c for c in caps]
            ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
            enc = text(input_ids=ids)
            with torch.no_grad():
                x0 = encode_latents(autoencoder, images, g_vae)
            sigma = torch.sigmoid(torch.randn(batch_size, generator=g))
            eps = torch.randn(x0.shape, generator=g)
            s = sigma[:, None, None, None]
            xt = (1 - s) * x0 + s * eps
            v = net(hidden_states=xt, timestep=1000 * sigma, encoder_hidden_states=enc.last_hidden_state,
                    pooled_projections=enc.text_embeds, return_dict=False)[0]
            loss = (v.float() - (eps - x0)).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                d = min(ema_decay, (1 + step) / (10 + step))
                for e, p in zip(list(ema_text.parameters()) + list(ema_net.parameters()), params):
                    e.lerp_(p, 1 - d)
            losses.append(loss.item())
            if step % 50 == 0:
                msg = f"toy teacher loss {sum(losses[-50:]) / len(losses[-50:]):.4f}"
                bar.update(task, completed=step + 1, description=msg)
                if not bar.console.is_terminal:
                    print(f"step {step} {msg} {time.time() - t0:.0f}s", flush=True)
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                save(step + 1)
    return save(steps)
