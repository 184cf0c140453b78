"""CDM — Continuous-Time Distribution Matching (arXiv 2605.06376; spec: shared design/cdm.md).

Each iteration rolls the student out on a random continuous σ schedule (backward simulation), trains
the fake score on the student's x̂0 (with an EMA-from-student merge), and every ``update_ratio``-th
iteration updates the student with L = L_CA + L_DM + L_CDM: CFG augmentation and distribution
matching on the trajectory, plus off-trajectory matching on latents extrapolated along the student's
own velocity. Every option of cdm.md §5.3 is a typed enum, so the paper's ablations are configs.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

import torch

from cdmbench.config import check_enum_fields
from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.methods.base import Batch, Method, OptimSpec, StepOutput, Update
from cdmbench.methods import matching
from cdmbench.methods.losses import euler_step, renoise, to_x0
from cdmbench.methods.matching import Rollout, RolloutMode, X0Source
from cdmbench.methods.schedules import SigmaMethod, random_rollout_nominal


class ScheduleMode(str, enum.Enum):
    RANDOM = "random"  # N ~ U{1..max_rollout_steps}, inner σ ~ U(low, high) sorted (cdm.md §2.1)
    FIXED = "fixed"  # ``fixed_sigmas`` every iteration (the "fixed schedule" ablation)


class StudentXtMode(str, enum.Enum):
    FRESH = "fresh"  # (1−σ')·student_x0_base + σ'·z
    TRAJECTORY_EPS = "trajectory_eps"  # X[i] + (σ' − σ_i)·V[i]  (shipped)
    TRAJECTORY_EPS_LAST = "trajectory_eps_last"  # same with i = N−1
    TRAJECTORY_XT = "trajectory_xt"  # X[i] at σ_i (pure on-trajectory)


class TeacherXtMode(str, enum.Enum):
    SHARE_STUDENT = "share_student"  # teacher/fake at the student's (x_s', σ_s')
    FRESH_SHARED_T = "fresh_shared_t"  # σ_t = σ_s', fresh noise on the teacher base
    FRESH_INDEPENDENT = "fresh_independent"  # σ_t resampled, fresh noise (shipped)


class TeacherX0Base(str, enum.Enum):
    X0_FINAL = "x0_final"
    X0_NEXT = "x0_next"
    STUDENT_PRED = "student_pred"  # sg(x̂0') of the off-trajectory student forward (shipped)


class StudentX0Base(str, enum.Enum):
    X0_FINAL = "x0_final"
    X0_NEXT = "x0_next"


@dataclass(frozen=True)
class CDMConfig:
    """Defaults = the paper's shipped SD3 configuration (cdm.md §6)."""

    guidance: float = 7.0  # CA guidance g: Δ = g·(x0_c − x0_u) (not g − 1; cdm.md §11.10)
    ca_weight: float = 1.0  # weights of the three student terms (0 removes a term: ablations)
    dm_weight: float = 1.0
    cdm_weight: float = 1.0
    norm_clip_min: float = 0.1  # clamp of the per-sample normaliser
    sigma_min: float = 0.02  # every sampled training σ is clamped to [sigma_min, sigma_max]
    sigma_max: float = 0.98
    schedule: ScheduleMode = ScheduleMode.RANDOM
    max_rollout_steps: int = 28  # N ~ U{1..max}
    random_sigma_low: float = 0.25  # inner nominal σ ~ U(low, high), pre-shift
    random_sigma_high: float = 0.95
    fixed_sigmas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # nominal, for schedule=fixed
    rollout: RolloutMode = RolloutMode.ODE
    update_ratio: int = 2  # fake-score updates per student update (student on iterations k·ratio − 1)
    fake_x0_source: X0Source = X0Source.X0_NEXT
    fake_sigma_method: SigmaMethod = SigmaMethod.UNIFORM
    fake_merge: float = 0.999  # φ ← m·φ + (1−m)·θ_student after each fake step (1.0 disables)
    ca_sigma_method: SigmaMethod = SigmaMethod.UNIFORM_CAPPED  # capped by σ_i
    dm_sigma_method: SigmaMethod = SigmaMethod.UNIFORM
    student_xt_mode: StudentXtMode = StudentXtMode.TRAJECTORY_EPS
    student_sigma_method: SigmaMethod = SigmaMethod.UNIFORM
    student_x0_base: StudentX0Base = StudentX0Base.X0_FINAL  # used by student_xt_mode=fresh only
    teacher_xt_mode: TeacherXtMode = TeacherXtMode.FRESH_INDEPENDENT
    teacher_sigma_method: SigmaMethod = SigmaMethod.UNIFORM
    teacher_x0_base: TeacherX0Base = TeacherX0Base.STUDENT_PRED
    share_ca_dm_forward: bool = True  # one student pass for CA and DM (identical inputs, same gradients)
    student_lr: float = 1e-5
    fake_lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup: int = 100  # linear LR warm-up per network (lr = 0 on its first step, as shipped)

    def __post_init__(self):
        check_enum_fields(self)
        if self.update_ratio < 1 or self.max_rollout_steps < 1:
            raise CdmbenchError("update_ratio and max_rollout_steps must be >= 1")
        if not 0 < self.random_sigma_low < self.random_sigma_high < 1:
            raise CdmbenchError("need 0 < random_sigma_low < random_sigma_high < 1")
        if self.teacher_xt_mode is TeacherXtMode.SHARE_STUDENT:
            if self.teacher_x0_base is TeacherX0Base.STUDENT_PRED:
                raise CdmbenchError("teacher_xt_mode=share_student forbids teacher_x0_base=student_pred")
            if self.teacher_x0_base.value != self.student_x0_base.value:
                raise CdmbenchError("teacher_xt_mode=share_student needs teacher_x0_base == student_x0_base")
        if self.student_xt_mode is StudentXtMode.FRESH and self.student_sigma_method is SigmaMethod.UNIFORM_CAPPED:
            raise CdmbenchError("student_xt_mode=fresh has no upper bound: student_sigma_method cannot be uniform_capped")


@METHODS.register("cdm")
class CDM(Method):
    Config = CDMConfig
    paper = "Continuous-Time Distribution Matching, arXiv 2605.06376"
    loss_keys = ("fake_score", "ca", "dm", "cdm", "student")
    presets = {
        "toy": {"student_lr": 3e-5, "fake_lr": 1e-4, "warmup": 10, "guidance": 2.0, "max_rollout_steps": 8,
                "train.steps": 400, "train.checkpoint_every": 100},
        "sd3": {"train.steps": 4001, "train.checkpoint_every": 500},
        "longcat": {"train.steps": 2001, "train.checkpoint_every": 500},
    }

    def __init__(self, backbone, config: CDMConfig, **run):
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
        if name == "fake_score":  # EMA-from-student merge (cdm.md §4 step 5)
            matching.merge_fake_score(self, self.config.fake_merge)

    # ---- backward simulation ---------------------------------------------------------------------
    def rollout_nominal(self, batch: Batch) -> list[float]:
        c = self.config
        if c.schedule is ScheduleMode.FIXED:
            return list(c.fixed_sigmas)
        # N from the rank-shared RNG; inner σ from this process's own RNG (cdm.md §2.1, §11.13)
        return random_rollout_nominal(batch.shared_rng(), c.max_rollout_steps, c.random_sigma_low,
                                      c.random_sigma_high, inner_rng=random)

    # ---- one iteration -----------------------------------------------------------------------------
    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        c, cond, B = self.config, batch.cond, batch.size
        dev = self.backbone.device
        ro = matching.backward_simulation(self, cond, self.rollout_nominal(batch), B, c.rollout)
        N = ro.V.shape[0]
        ar = torch.arange(B, device=dev)
        idx = torch.randint(0, N, (B,), device=dev)  # shared by the fake update and all student terms
        sig_i = ro.sigmas[idx]
        out = StepOutput(logs={"rollout_steps": N, "x0_mean": ro.X[-1].mean().item(), "x0_var": ro.X[-1].var().item()})

        out.losses["fake_score"] = matching.fake_score_step(self, ro, idx, cond, update)
        if "student" not in self.optimizers_for(step):
            return out

        # student: L = L_CA + L_DM + L_CDM, one backward (cdm.md §5)
        x_i = ro.X[idx, ar]
        total = torch.zeros((), device=dev)
        x0_on = None
        if c.ca_weight or c.dm_weight:
            x0_on = to_x0(x_i, sig_i, self.v("student", x_i, sig_i, cond))
        if c.ca_weight:
            l_ca, n_ca = matching.ca_loss(self, x0_on, sig_i, cond)
            total = total + c.ca_weight * l_ca
            out.losses["ca"], out.logs["norm_ca"] = l_ca.detach(), n_ca.mean().item()
        if c.dm_weight:
            x0_dm = x0_on
            if c.ca_weight and not c.share_ca_dm_forward:  # a second, identical forward (cdm.md §11.6)
                x0_dm = to_x0(x_i, sig_i, self.v("student", x_i, sig_i, cond))
            l_dm, n_dm = self.dm_loss(x0_dm, sig_i, cond, c.dm_sigma_method)
            total = total + c.dm_weight * l_dm
            out.losses["dm"], out.logs["norm_dm"] = l_dm.detach(), n_dm.mean().item()
        if c.cdm_weight:
            l_cdm, n_cdm = self.cdm_loss(ro, idx, cond)
            total = total + c.cdm_weight * l_cdm
            out.losses["cdm"], out.logs["norm_cdm"] = l_cdm.detach(), n_cdm.mean().item()
        update("student", total)
        out.losses["student"] = total.detach()
        return out

    # ---- the off-trajectory term -----------------------------------------------------------------
    def dm_loss(self, x0_hat, sig_i, cond, how: SigmaMethod, x0_base=None, s_t=None, x_t=None):
        """L_DM (cdm.md §5.2), also the matching step of L_CDM (``matching.dm_loss``)."""
        return matching.dm_loss(self, x0_hat, sig_i, cond, how, x0_base=x0_base, s_t=s_t, x_t=x_t)

    def cdm_loss(self, ro: Rollout, idx, cond):
        """L_CDM (cdm.md §5.3): matching on student latents off the sampled trajectory."""
        c = self.config
        B, N = idx.shape[0], ro.V.shape[0]
        ar = torch.arange(B, device=idx.device)
        i = torch.full_like(idx, N - 1) if c.student_xt_mode is StudentXtMode.TRAJECTORY_EPS_LAST else idx
        sig_i = ro.sigmas[i]
        if c.student_xt_mode is StudentXtMode.TRAJECTORY_XT:
            s_s, x_s = sig_i, ro.X[i, ar]
        else:
            s_s = matching.draw_sigmas(self, B, c.student_sigma_method, upper_bound=sig_i)
            if c.student_xt_mode is StudentXtMode.FRESH:
                base = ro.X[N] if c.student_x0_base is StudentX0Base.X0_FINAL else ro.X0[i + 1, ar]
                x_s = renoise(base, s_s, torch.randn_like(base))
            else:  # extrapolate along the student's own rollout velocity
                x_s = euler_step(ro.X[i, ar], sig_i, s_s, ro.V[i, ar])
        x0_hat = to_x0(x_s, s_s, self.v("student", x_s, s_s, cond))
        # x0_next is X0[idx+1] at the *shared* index even when the student point uses i = N−1 (official code)
        base = {TeacherX0Base.X0_FINAL: ro.X[N], TeacherX0Base.X0_NEXT: ro.X0[idx + 1, ar],
                TeacherX0Base.STUDENT_PRED: x0_hat.detach()}[c.teacher_x0_base]
        if c.teacher_xt_mode is TeacherXtMode.SHARE_STUDENT:
            return self.dm_loss(x0_hat, sig_i, cond, c.teacher_sigma_method, s_t=s_s, x_t=x_s.detach())
        s_t = s_s if c.teacher_xt_mode is TeacherXtMode.FRESH_SHARED_T else None
        return self.dm_loss(x0_hat, sig_i, cond, c.teacher_sigma_method, x0_base=base, s_t=s_t)
