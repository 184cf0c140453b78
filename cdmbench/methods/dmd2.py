"""DMD2 (Yin et al., NeurIPS 2024, arXiv 2405.14867; spec: shared design/baselines.md A2; recipe: tianweiy/DMD2
experiments/sdxl/*4step*backsim*.sh).

No regression loss; two-time-scale updates (the fake score steps every iteration, the generator every
``update_ratio``-th); a multi-step generator on a fixed 4-step σ grid trained with backward simulation
(k no-grad steps from fresh noise, x̂0 → re-noise with *fresh* noise); the DM gradient uses the
CFG'd real score and the CFG-free fake score; stochastic (re-noising) inference. The GAN head
(``gan_weight > 0``) classifies fake-score features of real vs generated latents, both re-noised at
σ ~ U[0, 1) ("diffusion GAN"); its real latents come from the run's data source (``train.data``; the toy's
procedural shapes), and a backbone without real data fails at start.

SD3/LongCat preset = DMD2's 4-step SDXL recipe: real-score CFG 8, TTUR ratio 5, GAN weights 5e-3
(generator) / 1e-2 (discriminator), gradient clip 10, fake-score σ over the full range (t ~ U{0..999}),
AdamW (0.9, 0.999) wd 0.01, lr 5e-7 full fine-tuning / 5e-5 LoRA, global batch 128 (DMD2: 2 × 64 GPUs;
here 16 × 8). Deviations from DMD2, all deliberate:
* SD3 has no DMD2 recipe; the SDXL one is used unchanged (DMD2 issue #62 reports 4-step SD3 artifacts with it).
* The discriminator head reads the mean-pooled tokens of the fake score's middle transformer block (DMD2:
  a conv head on the UNet bottleneck), a LayerNorm-MLP instead of conv layers.
* Normaliser per sample, no clamp, DM σ in [0.02, 0.98] (as DMD2's min/max_step_percent).
* Toy preset: no GAN (the shapes generator exists, but the SDXL GAN weights are untuned there), ratio 2,
  larger learning rates, clip 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cdmbench.config import check_enum_fields
from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.methods.base import Batch, Method, OptimSpec, StepOutput, Update
from cdmbench.methods.losses import (dmd_loss, flow_matching_loss, gan_discriminator_loss, gan_generator_loss,
                                     renoise, to_x0)
from cdmbench.methods.schedules import SigmaMethod, sample_sigmas
from cdmbench.sampling import make_schedule


@dataclass(frozen=True)
class DMD2Config:
    real_guidance: float = 8.0  # CFG of the real score (standard form; SDXL 8, SD1.5 1.75)
    fixed_sigmas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # generator grid (nominal; 999/749/499/249)
    update_ratio: int = 5  # fake-score updates per generator update (SDXL 5, SD1.5 10)
    sigma_min: float = 0.02  # DM re-noise σ ~ U[min, max] (DMD2 min/max_step_percent 0.02 / 0.98)
    sigma_max: float = 0.98
    fake_sigma_min: float = 0.0  # fake-score training and GAN re-noise σ ~ U[min, max]: the full range
    fake_sigma_max: float = 1.0  # (DMD2: t ~ randint(0, 1000); diffusion_gan_max_timestep 1000)
    gan_weight: float = 5e-3  # generator GAN weight (0 = no GAN head; DMD2 SDXL 5e-3)
    gan_disc_weight: float = 1e-2  # discriminator loss weight inside the fake-score update (DMD2 SDXL 1e-2)
    student_lr: float = 5e-7  # full fine-tuning (DMD2 SDXL)
    fake_lr: float = 5e-7
    student_lr_lora: float = 5e-5  # with backbone.lora_rank > 0 (DMD2 SDXL LoRA)
    fake_lr_lora: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup: int = 0

    def __post_init__(self):
        check_enum_fields(self)
        if self.update_ratio < 1:
            raise CdmbenchError(f"update_ratio must be >= 1, got {self.update_ratio}")
        if self.gan_weight < 0:
            raise CdmbenchError(f"gan_weight must be >= 0, got {self.gan_weight}")


class FakeScoreWithHead(nn.Module):
    """The fake score plus a small classifier on the mean-pooled output of its middle block."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        blocks = getattr(net, "transformer_blocks", None)
        if blocks is None:
            raise CdmbenchError("gan_weight > 0 needs a transformer with `transformer_blocks`")
        width = net.config.num_attention_heads * net.config.attention_head_dim
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self._feat = None
        blocks[len(blocks) // 2].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self._feat = output[-1] if isinstance(output, tuple) else output

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    @property
    def config(self):
        return self.net.config

    def logits(self) -> torch.Tensor:
        return self.head(self._feat.float().mean(1)).squeeze(-1)


@METHODS.register("dmd2")
class DMD2(Method):
    Config = DMD2Config
    paper = "Improved Distribution Matching Distillation (DMD2), arXiv 2405.14867"
    loss_keys = ("fake_score", "gan_d", "dm", "gan_g", "student")
    stochastic_sampling = True
    presets = {
        "toy": {"student_lr": 3e-5, "fake_lr": 1e-4, "real_guidance": 2.0, "update_ratio": 2, "gan_weight": 0.0,
                "train.steps": 400, "train.checkpoint_every": 100},
        "sd3": {"train.grad_clip": 10.0, "train.steps": 4000},
        "longcat": {"train.grad_clip": 10.0, "train.steps": 2000},
    }

    def __init__(self, backbone, config: DMD2Config, **run):
        super().__init__(backbone, config, **run)  # training, data_source, prompt_source (see Method)
        if self.training:
            fake = backbone.trainable_copy()
            self.nets["fake_score"] = FakeScoreWithHead(fake) if config.gan_weight > 0 else fake

    def needs_data(self) -> str | None:
        return "gan_weight > 0" if self.config.gan_weight > 0 else None

    def optim_specs(self):
        c = self.config
        lora = self.backbone.options.lora_rank > 0
        return {"student": OptimSpec(c.student_lr_lora if lora else c.student_lr, c.betas, c.weight_decay, warmup=c.warmup),
                "fake_score": OptimSpec(c.fake_lr_lora if lora else c.fake_lr, c.betas, c.weight_decay, warmup=c.warmup)}

    def optimizers_for(self, step: int) -> tuple[str, ...]:
        return ("student", "fake_score") if step % self.config.update_ratio == 0 else ("fake_score",)

    def generate(self, batch: Batch, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation: k ~ U{0..N−1} (shared across processes) no-grad steps with fresh
        re-noising, then the generator's x̂0 at grid point k. Returns (x̂0, σ_k)."""
        B, dev = batch.size, self.backbone.device
        sig = make_schedule(self.config.fixed_sigmas, self.backbone.shift_sigmas).sigmas(dev)
        k = batch.shared_rng().randrange(len(self.config.fixed_sigmas))
        x = torch.randn(B, *self.backbone.latent_shape, device=dev)
        with torch.no_grad():
            for j in range(k):
                x0 = to_x0(x, sig[j].expand(B), self.v("student", x, sig[j].expand(B), batch.cond))
                x = renoise(x0, sig[j + 1].expand(B), torch.randn_like(x))
        s = sig[k].expand(B)
        with torch.set_grad_enabled(with_grad):
            return to_x0(x, s, self.v("student", x, s, batch.cond)), s

    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        c, cond, B = self.config, batch.cond, batch.size
        out = StepOutput()
        gen_turn = "student" in self.optimizers_for(step)
        x, _ = self.generate(batch, with_grad=gen_turn)
        out.logs.update(x0_mean=x.mean().item(), x0_var=x.var().item())
        if gen_turn:
            s_t = sample_sigmas(B, SigmaMethod.UNIFORM, sigma_min=c.sigma_min, sigma_max=c.sigma_max, device=x.device)
            x_t = renoise(x.detach(), s_t, torch.randn_like(x))
            with torch.no_grad():
                v_u, v_c = self.teacher_cfg(x_t, s_t, cond)
                x0_real = to_x0(x_t, s_t, v_u + c.real_guidance * (v_c - v_u))
                x0_fake = to_x0(x_t, s_t, self.v("fake_score", x_t, s_t, cond))
            l_dm, n = dmd_loss(x, x0_real, x0_fake)
            total = l_dm
            out.losses["dm"], out.logs["norm_dm"] = l_dm.detach(), n.mean().item()
            if c.gan_weight > 0:
                l_g = gan_generator_loss(self._disc_logits(x, cond))
                total = total + c.gan_weight * l_g
                out.losses["gan_g"] = l_g.detach()
            update("student", total)
            out.losses["student"] = total.detach()
        # fake score: denoising loss on detached generator samples, σ over the whole range
        x = x.detach()
        s = self._fake_sigmas(B, x.device)
        z = torch.randn_like(x)
        l_fake = flow_matching_loss(self.v("fake_score", renoise(x, s, z), s, cond), x, z)
        total = l_fake
        if c.gan_weight > 0:
            real = self.data_source.next(B)  # the run's real images (latents) with their captions
            l_d = gan_discriminator_loss(self._disc_logits(real.latents, self.backbone.encode_prompts(real.captions)),
                                         self._disc_logits(x, cond))
            total = total + c.gan_disc_weight * l_d
            out.losses["gan_d"] = l_d.detach()
        update("fake_score", total)
        out.losses["fake_score"] = l_fake.detach()
        return out

    def _fake_sigmas(self, n: int, device) -> torch.Tensor:
        c = self.config
        return sample_sigmas(n, SigmaMethod.UNIFORM, sigma_min=c.fake_sigma_min, sigma_max=c.fake_sigma_max,
                             device=device)

    def _disc_logits(self, x0: torch.Tensor, cond) -> torch.Tensor:
        """Discriminator logits of clean latents re-noised at σ ~ U[0, 1) ("diffusion GAN")."""
        s = self._fake_sigmas(x0.shape[0], x0.device)
        fake = self.nets["fake_score"]
        self.v(fake, renoise(x0, s, torch.randn_like(x0)), s, cond)
        return getattr(fake, "module", fake).logits()
