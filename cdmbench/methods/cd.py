"""Consistency distillation for flow models, PCM-style (Phased Consistency Models, arXiv 2405.18407;
spec: shared design/baselines.md A3; recipe: G-U-N/Phased-Consistency-Model code/text_to_image_sd3).

The shifted σ range is cut into ``phases`` segments by an Euler grid of ``solver_steps`` points. The
student jumps from x_σ straight to its phase's lower edge, f_θ(x_σ) = x_σ + (σ_edge − σ)·v_θ (boundary
condition built in); the target is the online student under no_grad (PCM; or an EMA copy, LCM) applied
after one teacher-CFG Euler step σ_n → σ_{n+1}; loss: pseudo-Huber. Training latents are real images
with their captions from the run's data source (``train.data``; the toy's procedural shapes), re-noised
to σ_n: a backbone without real data fails at start. The student samples with exactly ``phases`` steps.

SD3/LongCat preset = PCM's SD3 recipe (run.sh, train_pcm_lora_sd3.py): 100-point Euler grid, phases
1/2/4 (set ``phases`` to the evaluated step count), teacher CFG w = 3 in PCM's "cond + w·(cond − uncond)"
form (standard 4), online no-grad target, Huber c = 0.001, AdamW wd 1e-3, grad clip 1, LoRA lr 5e-6,
batch 2 per process, 20k steps. Deviations from PCM, all deliberate:
* Full fine-tuning (cdmbench's default) uses lr 1e-6: PCM publishes LoRA recipes only, and 1e-6 is
  diffusers' LCM full-model distillation recipe (train_lcm_distill_sdxl_wds.py README); with
  ``backbone.lora_rank > 0`` the lr is PCM's 5e-6 (PCM's rank is 32: ``--set backbone.lora_rank=32``).
* No adversarial term (PCM's ``_adv`` scripts add one with weight 0.1), no LR warm-up (PCM: 500 steps).
* Latents are the VAE posterior mean normalised with the VAE's shift and scale (PCM's script samples the
  posterior and does not subtract SD3's shift factor).
* Toy preset: larger lr, a 40-point grid.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

import torch

from cdmbench.config import check_enum_fields
from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.methods.base import Batch, Method, OptimSpec, StepOutput, Update
from cdmbench.methods.losses import euler_step, pseudo_huber_loss, renoise
from cdmbench.sampling import Schedule, make_schedule


class Target(str, enum.Enum):
    EMA = "ema"  # LCM: EMA copy of the student (decay ``target_decay``)
    STOPGRAD = "stopgrad"  # PCM: the online student under no_grad


@dataclass(frozen=True)
class CDConfig:
    phases: int = 4  # = the step count the student is sampled with
    solver_steps: int = 100  # Euler grid over the shifted σ range
    guidance: float = 4.0  # teacher CFG in the solver step (standard form; PCM "w=3" = 4)
    target: Target = Target.STOPGRAD  # PCM's SD3 recipe: the online model under no_grad
    target_decay: float = 0.95  # for target=ema (LCM)
    huber_c: float = 1e-3
    student_lr: float = 1e-6  # full fine-tuning (diffusers' LCM full-model recipe; PCM has none)
    student_lr_lora: float = 5e-6  # with backbone.lora_rank > 0 (PCM)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-3  # PCM run.sh
    warmup: int = 0

    def __post_init__(self):
        check_enum_fields(self)
        if self.phases < 1 or self.solver_steps % self.phases:
            raise CdmbenchError(f"solver_steps ({self.solver_steps}) must be a positive multiple of phases ({self.phases})")


@METHODS.register("cd")
class CD(Method):
    Config = CDConfig
    paper = "Phased Consistency Models (PCM), arXiv 2405.18407; LCM, arXiv 2310.04378"
    loss_keys = ("consistency",)
    steps_field = "phases"  # one student per phase count (PCM trains one model per phase count)
    presets = {
        "toy": {"student_lr": 1e-4, "solver_steps": 40,
                "train.steps": 400, "train.checkpoint_every": 100},
        "sd3": {"train.steps": 20000, "train.batch_size": 2},
        "longcat": {"train.steps": 20000, "train.batch_size": 2},
    }

    def __init__(self, backbone, config: CDConfig, **run):
        super().__init__(backbone, config, **run)  # training, data_source, prompt_source (see Method)
        nominal = [1.0 - k / config.solver_steps for k in range(config.solver_steps)]
        self.grid = make_schedule(nominal, backbone.shift_sigmas).sigmas(backbone.device)  # (solver_steps + 1,)
        self.target_net = None
        self._ema_pairs = None  # (target params, student params) for the EMA update
        if self.training and config.target is Target.EMA:
            self.target_net = copy.deepcopy(self.nets["student"]).eval().requires_grad_(False)

    @property
    def supported_steps(self) -> tuple[int, ...]:
        return (self.config.phases,)

    def schedule(self, steps: int) -> Schedule:
        self.check_steps(steps)
        seg = self.config.solver_steps // self.config.phases
        edges = [1.0 - k * seg / self.config.solver_steps for k in range(self.config.phases)]
        return make_schedule(edges, self.backbone.shift_sigmas)

    def needs_data(self) -> str | None:
        return "trains on real image-caption pairs, as PCM"

    def optim_specs(self):
        c = self.config
        lr = c.student_lr_lora if self.backbone.options.lora_rank > 0 else c.student_lr
        return {"student": OptimSpec(lr, c.betas, c.weight_decay, warmup=c.warmup)}

    def optimizers_for(self, step: int) -> tuple[str, ...]:
        return ("student",)

    def after_update(self, name: str) -> None:
        if self.target_net is not None:
            with torch.no_grad():
                if self._ema_pairs is None:  # listed once (module traversal costs more than the lerp)
                    student = getattr(self.nets["student"], "module", self.nets["student"])
                    self._ema_pairs = (list(self.target_net.parameters()), list(student.parameters()))
                target, live = self._ema_pairs
                # the target is a full replica (like the teacher); under FSDP2 the student's parameters
                # are shards (DTensor), gathered here
                full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in live]
                torch._foreach_lerp_(target, full, 1 - self.config.target_decay)

    def extra_state(self):
        if self.target_net is None:
            return {}
        return {f"target.{k}": v for k, v in self.target_net.state_dict().items()}

    def load_extra_state(self, state):
        if self.target_net is not None and any(k.startswith("target.") for k in state):
            self.target_net.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("target.")}, strict=True)

    def jump(self, net, x, s, s_edge, cond):
        """f(x_σ) = x_σ + (σ_edge − σ)·v(x_σ, σ): the Euler jump to the phase edge."""
        return euler_step(x, s, s_edge, self.v(net, x, s, cond))

    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        c, B, dev = self.config, batch.size, self.backbone.device
        real = self.data_source.next(B)  # real latents with their captions
        x0, cond = real.latents, self.backbone.encode_prompts(real.captions)
        seg = c.solver_steps // c.phases
        n = torch.randint(0, c.solver_steps, (B,), device=dev)  # grid index of σ_n (> 0)
        edge = (n // seg + 1) * seg  # grid index of the phase's lower edge
        s_n, s_next, s_edge = self.grid[n], self.grid[n + 1], self.grid[edge]
        x_n = renoise(x0, s_n, torch.randn_like(x0))
        with torch.no_grad():  # one teacher Euler step with CFG
            v_u, v_c = self.teacher_cfg(x_n, s_n, cond)
            x_next = euler_step(x_n, s_n, s_next, v_u + c.guidance * (v_c - v_u))
            target_net = self.target_net if self.target_net is not None else "student"
            target = self.jump(target_net, x_next, s_next, s_edge, cond)
            at_edge = (n + 1 == edge).reshape(-1, *[1] * (x0.dim() - 1))
            target = torch.where(at_edge, x_next, target)
        pred = self.jump("student", x_n, s_n, s_edge, cond)
        loss = pseudo_huber_loss(pred, target, c.huber_c)
        update("student", loss)
        return StepOutput({"consistency": loss.detach()}, {"x0_mean": x0.mean().item()})
