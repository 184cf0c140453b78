"""Train the toy teacher from scratch: rectified flow on the procedural shapes data.

x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0 (cdm.md §1), σ ~ logit-normal(0, 1) as in SD3 training,
caption dropout to the empty prompt so classifier-free guidance works. The text encoder is trained
jointly and frozen afterwards. The EMA weights are shipped (``cdmbench/assets/toy_teacher.safetensors``).

Reproduce the shipped teacher: ``cdmbench toy train-teacher --out cdmbench/assets/toy_teacher.safetensors
--steps 8000 --seed 0`` (``--init FILE`` continues from a teacher file instead of starting from scratch).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from cdmbench.io import save_safetensors
from cdmbench.toy.models import ToyArch, arch_dict, build_text_encoder, build_tokenizer, build_transformer, MAX_TOKENS
from cdmbench.toy.shapes import DATA_VERSION, ShapesStream


def train_teacher(
    out: str | Path,
    steps: int = 6000,  # optimizer steps
    batch_size: int = 64,
    lr: float = 1e-3,  # AdamW learning rate (cosine-decayed to 5 % after a 200-step warmup)
    caption_dropout: float = 0.1,  # probability of training on the empty prompt (enables CFG)
    ema_decay: float = 0.999,
    seed: int = 0,
    arch: ToyArch = ToyArch(),
    init: str | Path | None = None,  # continue from a teacher file (its EMA weights) instead of scratch
    progress: bool = True,
) -> dict:
    """Train and save the toy teacher; returns the training record written into the file metadata."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    text = build_text_encoder(arch).train()
    net = build_transformer(arch).train()
    init_record = None
    if init is not None:
        from cdmbench.backbones.toy import load_toy_weights

        _, text, net, init_record = load_toy_weights(Path(init))
        text.train(), net.train()
        arch = ToyArch(**init_record["arch"])
    params = list(text.parameters()) + list(net.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(k / steps * 3.14159)).item()))
    )
    ema_text, ema_net = copy.deepcopy(text).eval(), copy.deepcopy(net).eval()
    for p in list(ema_text.parameters()) + list(ema_net.parameters()):
        p.requires_grad_(False)
    data = ShapesStream(seed=seed, batch_size=batch_size)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    from rich.progress import Progress

    losses = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("training toy teacher", total=steps)
        for step in range(steps):
            images, caps, _ = next(data)
            caps = ["" if torch.rand((), generator=g) < caption_dropout else c for c in caps]
            ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
            enc = text(input_ids=ids)
            x0 = images * 2 - 1
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
                bar.update(task, completed=step + 1, description=f"toy teacher loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    minutes = (time.time() - t0) / 60
    record = {
        "arch": arch_dict(arch), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "caption_dropout": caption_dropout, "ema_decay": ema_decay, "train_minutes": round(minutes, 2),
        "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 5), "torch": torch.__version__,
        "data": DATA_VERSION,
        "init": init_record,  # the training record of the file this run continued from (None: scratch)
    }
    tensors = {f"text_encoder.{k}": v for k, v in ema_text.state_dict().items()}
    tensors.update({f"transformer.{k}": v for k, v in ema_net.state_dict().items()})
    save_safetensors(tensors, out, metadata={"cdmbench": json.dumps(record)})
    return record
