"""rCM — sCM plus a DMD reverse-divergence regulariser (Zheng et al., arXiv 2510.08431; spec: shared
design/continuous-cm.md §1, §2, §4; code read: NVlabs/rcm rcm/models/t2v_model_distill_rcm.py).

Players: the student (init teacher), the frozen CFG teacher, a fake score (init teacher, never CFG). Data: teacher
samples (x0, prompt) made once per run with the same CFG (``cdmbench.pairs``; rCM trains on Wan-14B samples).

Schedule at iteration k with warm-up H and ratio N: k < H → student step with the sCM loss only (no DMD term, no
fake-score update); k ≥ H → a student step when (k − H) mod N = 0, otherwise a fake-score step. Both counters are
functions of k (resume-safe).

Student step: L = λ_sCM·mean_b L_sCM + λ_DMD·mean_b L_DMD (per-sample sums; one optimiser step).
* L_sCM: as sCM (σ ~ logit-normal, JVP of the live student along (v_T, 1), ĝ = g/(‖g‖ + 0.1) in fp64,
  Σ(ρ·(v_θ − sg v_θ) − ĝ)²) with rCM's warm-up: g = −cos τ·√(1 − r² sin²τ)·(F⁻ − F_T) − r·cos τ sin τ·x_τ
  − cos τ sin τ·dF⁻/dτ (read in the rCM code), computed exactly in RF units by ``losses.scm_tangent``.
* L_DMD: backward simulation with the student, n = (student-step counter mod ``max_simulation_steps``) + 1 calls:
  the first at σ = 1 from pure noise, later σ's drawn from p_D and forced non-increasing, each x̂0 re-noised with
  fresh noise, gradient only through the last call; then σ_D ~ p_D, x_D = (1−σ_D)·x̂ + σ_D·ε, and under no_grad
  x0_fake (fake score, cond) and x0_real (teacher, CFG); a = max(mean|x̂ − x0_real|, 1e-5), δ = (x0_fake − x0_real)/a,
  L_DMD = Σ(x̂ − sg(x̂ − δ))² in fp64, non-finite samples zeroed (``losses.rcm_dmd_loss``).
Fake-score step: a fresh no-grad backward simulation (its own counter), σ_D ~ p_D, loss ρ²·Σ(v_fake − (ε − x̂))²
(= rCM's ‖x̂ − x0_fake‖²/sin²τ). p_D: shifted uniform σ = αu/(1 + (α−1)u).

Weight balance (note §2): ĝ has norm < 1 per sample while δ is O(1) per element, so ‖∇L_DMD‖ grows as √d
(d = latent elements per sample) and rCM's 100 : 1 was tuned at Wan 480p (d ≈ 2.0e6, √d ≈ 1413). Keeping rCM's
gradient ratio gives λ_sCM = 100·√(d / 2.0e6) with λ_DMD = 1: SD3-Medium and LongCat at 1024² (d = 16·128·128 =
262144) → 36; the toy (8·8·8 = 512) → 1.6. The presets use these; the default (no preset) is rCM's 100.
Samplers and logs as sCM (σ_0 = 1, intermediate τ = (1.5, 1.4, 1.0)[:n−1], fresh noise each step).

Deviations, all deliberate: the teacher CFG is written in the standard form (rCM's code forms
F_c + g·(F_c − F_u), i.e. standard w = 1 + g; the note's w = 5 for Wan is kept as 6 here); p_D's α = 3 on SD3/toy
(SD3's native shift; rCM: 5 on Wan, our adaptation); the sCM forward and the last backward-simulation forward are
two student calls (rCM concatenates them into one batch: same maths); no separate student EMA (the loop's
``train.ema`` is for evaluation, as for every method). Optimisers: AdamW betas (0, 0.999), wd 0.01, student 2e-6,
fake score 4e-7 (rCM Wan-1.3B), no gradient clip; H = 1000, N = 5 (rCM 1.3B). Toy preset: larger learning rates,
H = 100, N = 2 (the DMD2 toy preset's ratio), CFG 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdmbench.backbones.jvp import JvpMode
from cdmbench.config import check_enum_fields
from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.methods.base import Batch, Method, OptimSpec, StepOutput, Update
from cdmbench.methods.losses import (TangentNorm, TangentWarmup, consistency_tangent, normalize_tangent,
                                     rcm_dmd_loss, rcm_fake_score_loss, renoise, scm_loss, scm_tangent,
                                     tangent_warmup_ratio, to_x0, trig_to_sigma)
from cdmbench.methods.schedules import SigmaMethod, sample_sigmas, shifted_uniform_sigmas
from cdmbench.sampling import Schedule, make_schedule


@dataclass(frozen=True)
class RCMConfig:
    guidance: float = 6.0  # teacher CFG w, standard form (rCM code: cond + g·(cond − uncond), g = 5 → w = 6)
    logit_mean: float = 0.9  # p_G: σ ~ sigmoid(N(mean, std)) (rCM Wan-1.3B 0.7, 14B 1.5; SD3 default of the note 0.9)
    logit_std: float = 1.6
    sigma_min: float = 1e-4  # clamp of the sCM σ
    sigma_max_train: float = 1 - 1e-4
    tangent_warmup: int = 1000  # H: tangent warm-up, and DMD / fake score off before it (rCM 1.3B 1000, 14B 0)
    tangent_warmup_form: TangentWarmup = TangentWarmup.RCM
    tangent_norm: TangentNorm = TangentNorm.L2
    norm_c: float = 0.1
    scm_weight: float = 100.0  # λ_sCM (rCM); see the module docstring for the per-backbone balance
    dmd_weight: float = 1.0  # λ_DMD (rCM)
    update_ratio: int = 5  # N: one student step per N iterations after H, the rest fake-score steps (rCM 1.3B 5)
    max_simulation_steps: int = 4  # backward simulation uses (counter mod this) + 1 student calls (rCM 4)
    dmd_shift: float = 3.0  # α of p_D: σ = αu/(1 + (α−1)u) (rCM Wan 5; SD3's own shift 3, our adaptation)
    jvp: JvpMode = JvpMode.EXACT
    fd_step: float = 1e-4
    num_pairs: int = 10000  # teacher samples (x0, prompt) used as data
    pair_steps: int = 28
    pair_seed: int = 4321
    sample_sigma0: float = 1.0  # sampler σ_0
    mid_taus: tuple[float, ...] = (1.5, 1.4, 1.0)  # sampler's intermediate TrigFlow times (rCM), [:steps−1]
    student_lr: float = 2e-6  # rCM Wan-1.3B
    fake_lr: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    warmup: int = 0  # LR warm-up (steps)

    def __post_init__(self):
        check_enum_fields(self)
        if self.update_ratio < 1:
            raise CdmbenchError(f"update_ratio must be >= 1, got {self.update_ratio}")
        if self.max_simulation_steps < 1:
            raise CdmbenchError(f"max_simulation_steps must be >= 1, got {self.max_simulation_steps}")
        if self.tangent_warmup < 0:
            raise CdmbenchError(f"tangent_warmup must be >= 0 steps, got {self.tangent_warmup}")
        if not self.norm_c > 0 or self.dmd_shift <= 0:
            raise CdmbenchError(f"norm_c and dmd_shift must be > 0, got {self.norm_c}, {self.dmd_shift}")
        if self.scm_weight < 0 or self.dmd_weight < 0:
            raise CdmbenchError(f"scm_weight and dmd_weight must be >= 0, got {self.scm_weight}, {self.dmd_weight}")
        if not 0 < self.sigma_min < self.sigma_max_train < 1:
            raise CdmbenchError(f"need 0 < sigma_min < sigma_max_train < 1, got {self.sigma_min}, {self.sigma_max_train}")
        if not 0 < self.sample_sigma0 <= 1:
            raise CdmbenchError(f"sample_sigma0 must be in (0, 1], got {self.sample_sigma0}")
        if any(not 0 < t < math.pi / 2 for t in self.mid_taus):
            raise CdmbenchError(f"mid_taus must lie in (0, π/2), got {self.mid_taus}")
        if self.num_pairs < 1:
            raise CdmbenchError(f"num_pairs must be >= 1, got {self.num_pairs}")


@METHODS.register("rcm")
class RCM(Method):
    Config = RCMConfig
    paper = "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency (rCM), arXiv 2510.08431"
    loss_keys = ("scm", "dmd", "student", "fake_score")
    stochastic_sampling = True  # multistep consistency sampling: x̂0 → fresh noise
    presets = {
        "toy": {"student_lr": 3e-5, "fake_lr": 1e-4, "betas": "0.9,0.999", "guidance": 2.0, "tangent_warmup": 100,
                "update_ratio": 2, "scm_weight": 1.6, "num_pairs": 512,
                "train.steps": 400, "train.checkpoint_every": 100},
        "sd3": {"scm_weight": 36.0, "train.steps": 4000, "train.checkpoint_every": 500},
        "longcat": {"scm_weight": 36.0, "train.steps": 2000, "train.checkpoint_every": 500},
    }

    def __init__(self, backbone, config: RCMConfig, **run):
        super().__init__(backbone, config, **run)  # training, data_source, prompt_source (see Method)
        self.pairs = None  # teacher samples (cdmbench.pairs.PairSet), set by ``prepare``
        if self.training:
            self.nets["fake_score"] = backbone.trainable_copy()

    @property
    def supported_steps(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.config.mid_taus) + 2))

    def schedule(self, steps: int) -> Schedule:
        """σ_0 = ``sample_sigma0``, then σ(τ) for τ in ``mid_taus[:steps−1]``; already effective (no shift)."""
        self.check_steps(steps)
        c = self.config
        return make_schedule([c.sample_sigma0, *(float(trig_to_sigma(t)) for t in c.mid_taus[:steps - 1])], lambda s: s)

    def optim_specs(self):
        c = self.config
        return {"student": OptimSpec(c.student_lr, c.betas, c.weight_decay, warmup=c.warmup),
                "fake_score": OptimSpec(c.fake_lr, c.betas, c.weight_decay, warmup=c.warmup)}

    def optimizers_for(self, step: int) -> tuple[str, ...]:
        c = self.config
        if step < c.tangent_warmup or (step - c.tangent_warmup) % c.update_ratio == 0:
            return ("student",)
        return ("fake_score",)

    def simulation_calls(self, step: int) -> int:
        """Student calls of this iteration's backward simulation: (own counter mod max) + 1 (rCM)."""
        c = self.config
        k = step - c.tangent_warmup
        counter = k // c.update_ratio if "student" in self.optimizers_for(step) else k - k // c.update_ratio - 1
        return counter % c.max_simulation_steps + 1

    def prepare(self, run) -> None:
        from cdmbench.pairs import teacher_pair_set

        c = self.config
        prompts = self.draw_prompts(c.num_pairs, torch.Generator().manual_seed(c.pair_seed))
        self.pairs = teacher_pair_set(self.backbone, prompts, steps=c.pair_steps, guidance=c.guidance,
                                      seed=c.pair_seed, run_dir=run.run_dir, processes=run.processes,
                                      progress=run.progress)

    def teacher_velocity(self, x, s, cond) -> torch.Tensor:
        B = x.shape[0]
        v_u, v_c = self.teacher_cfg(x, s, cond)
        return v_u + self.config.guidance * (v_c - v_u)

    def p_d(self, n: int) -> torch.Tensor:
        return shifted_uniform_sigmas(n, self.config.dmd_shift, device=self.backbone.device)

    def simulate(self, cond, n_calls: int, with_grad: bool) -> torch.Tensor:
        """Backward simulation: σ = 1 from pure noise, then σ ← min(σ, p_D draw) with fresh re-noising; only the
        last student call keeps its graph (if ``with_grad``). Returns x̂0 of that call."""
        B = cond.batch_size
        x = torch.randn(B, *self.backbone.latent_shape, device=self.backbone.device)
        s = torch.ones(B, device=x.device)
        with torch.no_grad():
            for _ in range(n_calls - 1):
                x0 = to_x0(x, s, self.v("student", x, s, cond))
                s = torch.minimum(self.p_d(B), s)
                x = renoise(x0, s, torch.randn_like(x0))
        with torch.set_grad_enabled(with_grad):
            return to_x0(x, s, self.v("student", x, s, cond))

    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        c, B, dev = self.config, batch.size, self.backbone.device
        if self.pairs is None:
            raise RuntimeError("rcm: prepare(run) makes the teacher samples before the first train_step")
        j = torch.randint(len(self.pairs), (B,)).tolist()
        cond = self.backbone.encode_prompts([self.pairs.prompts[i] for i in j])
        out = StepOutput()
        if "fake_score" in self.optimizers_for(step):
            x_hat = self.simulate(cond, self.simulation_calls(step), with_grad=False)
            s_d, eps = self.p_d(B), torch.randn_like(x_hat)
            l_fake = rcm_fake_score_loss(self.v("fake_score", renoise(x_hat, s_d, eps), s_d, cond), x_hat, eps, s_d).mean()
            update("fake_score", l_fake)
            out.losses["fake_score"] = l_fake.detach()
            return out
        # sCM half on teacher samples
        x0 = self.pairs.samples[j].to(dev).float()
        s = sample_sigmas(B, SigmaMethod.LOGIT_NORMAL, logit_mean=c.logit_mean, logit_std=c.logit_std,
                          sigma_min=c.sigma_min, sigma_max=c.sigma_max_train, device=dev)
        x = renoise(x0, s, torch.randn_like(x0))
        with torch.no_grad():
            v_t = self.teacher_velocity(x, s, cond)
            v_minus, jvp = self.backbone.velocity_jvp(self.nets["student"], x, s, cond, v_t, 1.0, mode=c.jvp,
                                                      fd_step=c.fd_step)
            r = tangent_warmup_ratio(step, c.tangent_warmup)
            g = scm_tangent(v_t, v_minus, jvp, x, s, r, c.tangent_warmup_form)
            g_hat = normalize_tangent(g, c.norm_c, c.tangent_norm)
        l_scm = scm_loss(self.v("student", x, s, cond), g_hat, s).mean()
        total = c.scm_weight * l_scm
        out.logs.update(tangent_D_norm=consistency_tangent(v_t, v_minus, jvp, s).flatten(1).norm(dim=1).mean().item(),
                        tangent_g_norm=g.flatten(1).norm(dim=1).mean().item(), tangent_warmup_r=r)
        if step >= c.tangent_warmup:  # the DMD regulariser
            x_hat = self.simulate(cond, self.simulation_calls(step), with_grad=True)
            s_d = self.p_d(B)
            x_d = renoise(x_hat.detach(), s_d, torch.randn_like(x_hat))
            with torch.no_grad():
                x0_real = to_x0(x_d, s_d, self.teacher_velocity(x_d, s_d, cond))
                x0_fake = to_x0(x_d, s_d, self.v("fake_score", x_d, s_d, cond))
            l_dmd, a = rcm_dmd_loss(x_hat, x0_real, x0_fake)
            l_dmd = l_dmd.mean()
            total = total + c.dmd_weight * l_dmd
            out.losses["dmd"] = l_dmd.detach()
            out.logs.update(dmd_norm=a.mean().item(), x0_mean=x_hat.mean().item(), x0_var=x_hat.var().item())
        update("student", total)
        out.losses.update(scm=l_scm.detach(), student=total.detach())
        return out
