"""Decoupled DMD (D-DMD, arXiv 2511.22677; spec: shared design/baselines.md A2, cdm.md §11.21).

The DMD gradient split into a CFG-augmentation term (the "engine", re-noised at σ ~ U(0, σ_i)) and a
distribution-matching term (the "regulariser", σ ~ U(0, 1)), trained with backward simulation on the
fixed 4-step schedule. It is CDM without the continuous schedule and without the off-trajectory term:
the rollout, fake-score step and the two terms are the shared helpers of ``methods/matching.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdmbench.config import check_enum_fields
from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.methods import matching
from cdmbench.methods.base import Batch, Method, OptimSpec, StepOutput, Update
from cdmbench.methods.losses import to_x0
from cdmbench.methods.matching import RolloutMode, X0Source
from cdmbench.methods.schedules import SigmaMethod


@dataclass(frozen=True)
class DDMDConfig:
    guidance: float = 7.0  # CA guidance g (Δ = g·(x0_c − x0_u))
    ca_weight: float = 1.0
    dm_weight: float = 1.0
    norm_clip_min: float = 0.1
    sigma_min: float = 0.02
    sigma_max: float = 0.98
    fixed_sigmas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # nominal rollout grid (shifted by the backbone)
    rollout: RolloutMode = RolloutMode.ODE
    update_ratio: int = 2  # fake-score updates per student update
    fake_x0_source: X0Source = X0Source.X0_NEXT
    fake_sigma_method: SigmaMethod = SigmaMethod.UNIFORM
    fake_merge: float = 0.999  # EMA-from-student merge of the fake score (1.0 disables)
    ca_sigma_method: SigmaMethod = SigmaMethod.UNIFORM_CAPPED
    dm_sigma_method: SigmaMethod = SigmaMethod.UNIFORM
    student_lr: float = 1e-5
    fake_lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup: int = 100

    def __post_init__(self):
        check_enum_fields(self)
        if self.update_ratio < 1:
            raise CdmbenchError(f"update_ratio must be >= 1, got {self.update_ratio}")


@METHODS.register("ddmd")
class DDMD(Method):
    Config = DDMDConfig
    paper = "Decoupled DMD (Z-Image), arXiv 2511.22677"
    loss_keys = ("fake_score", "ca", "dm", "student")
    presets = {
        "toy": {"student_lr": 3e-5, "fake_lr": 1e-4, "warmup": 10, "guidance": 2.0,
                "train.steps": 400, "train.checkpoint_every": 100},
        "sd3": {"train.steps": 4001},
        "longcat": {"train.steps": 2001},
    }

    def __init__(self, backbone, config: DDMDConfig, **run):
        super().__init__(backbone, config, **run)  # training, data_source, prompt_source (see Method)
        if self.training:
            self.nets["fake_score"] = backbone.trainable_copy()

    def optim_specs(self):
        c = self.config
        return {"student": OptimSpec(c.student_lr, c.betas, c.weight_decay, warmup=c.warmup),
                "fake_score": OptimSpec(c.fake_lr, c.betas, c.weight_decay, warmup=c.warmup)}

    def optimizers_for(self, step: int) -> tuple[str, ...]:
        if (step + 1) % self.config.update_ratio == 0:
            return ("fake_score", "student")
        return ("fake_score",)

    def after_update(self, name: str) -> None:
        if name == "fake_score":
            matching.merge_fake_score(self, self.config.fake_merge)

    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        c, cond, B = self.config, batch.cond, batch.size
        ro = matching.backward_simulation(self, cond, list(c.fixed_sigmas), B, c.rollout)
        N, ar = ro.V.shape[0], torch.arange(B, device=self.backbone.device)
        idx = torch.randint(0, N, (B,), device=self.backbone.device)
        out = StepOutput(logs={"x0_mean": ro.X[-1].mean().item(), "x0_var": ro.X[-1].var().item()})
        out.losses["fake_score"] = matching.fake_score_step(self, ro, idx, cond, update)
        if "student" not in self.optimizers_for(step):
            return out
        sig_i, x_i = ro.sigmas[idx], ro.X[idx, ar]
        x0_hat = to_x0(x_i, sig_i, self.v("student", x_i, sig_i, cond))
        l_ca, n_ca = matching.ca_loss(self, x0_hat, sig_i, cond)
        l_dm, n_dm = matching.dm_loss(self, x0_hat, sig_i, cond, c.dm_sigma_method)
        total = c.ca_weight * l_ca + c.dm_weight * l_dm
        update("student", total)
        out.losses.update(ca=l_ca.detach(), dm=l_dm.detach(), student=total.detach())
        out.logs.update(norm_ca=n_ca.mean().item(), norm_dm=n_dm.mean().item())
        return out
