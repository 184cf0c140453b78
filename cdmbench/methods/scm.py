"""sCM — continuous-time consistency distillation from the CFG teacher (Lu & Song, arXiv 2410.11081; spec:
shared design/continuous-cm.md §0, §1, §4, §6; recipes: NVlabs/FastGen sCM.py, SANA-Sprint, rCM's sCM half).

Consistency function f_θ(x_σ, σ) = x_σ − σ·v_θ(x_σ, σ) (boundary f(x, 0) = x by construction); the student starts
at the teacher. Per iteration, on teacher samples x0 with their prompts (note §1.6: cdmbench has no real SD3 data,
so x0 comes from a fixed set of teacher ODE samples made once per run with the same CFG, ``cdmbench.pairs``):

1. σ ~ logit-normal(P_mean, P_std) clamped to [1e-4, 1 − 1e-4]; x_σ = (1−σ)·x0 + σ·ε.
2. no_grad: v_T = v_u + w·(v_c − v_u), the CFG teacher (uncond = the encoded empty prompt).
3. no_grad: (v⁻, J) = JVP of (x, σ) ↦ v_θ at (x_σ, σ) along (v_T, 1) — the live student, detached (never EMA,
   never the teacher), cond only, autocast off, math attention (``Backbone.velocity_jvp``).
4. g = ((1−σ)/ρ)·[(1−r)(1−σ)(v_T − v⁻) + r·ρ²·D], D = (v_T − v⁻) − σ·J, the exact rectified-flow rewrite of the
   paper's TrigFlow tangent −cos²τ·(F⁻ − F_T) − r·cos τ sin τ·(x_τ + dF⁻/dτ) (checked in tests/test_scm_rcm.py),
   r = min(1, k/H) the tangent warm-up (sCM form: r scales the whole second term).
5. ĝ = g/(‖g‖₂ + c) per sample, c = 0.1, in fp64 (``tangent_norm = rms``: FastGen's g/(‖g‖₂/√d + c)).
6. L = mean_b Σ (ρ·(v_θ − sg(v_θ)) − ĝ)², i.e. ‖F_θ − F⁻ − ĝ‖² in TrigFlow units (value = Σĝ², constant; the
   logs carry ‖D‖, ‖g‖ and r instead).

Sampling: multistep consistency sampling (note §2): x̂0 = x − σ_i·v_θ(x, σ_i), re-noised with fresh noise to
σ_{i+1}; σ_0 = ``sample_sigma0`` = 1 (note: "on SD3 use σ_0 = 1"), then the intermediate TrigFlow times
``mid_taus`` = (1.5, 1.4, 1.0)[:n−1] (rCM; σ = 0.9338, 0.8529, 0.6090), so 1–4 steps; the σ list is recorded as
given (effective = nominal: no backbone shift on top). One NFE per step (no CFG).

What was verified and what was not: the RF form of the tangent and the v-space loss were checked numerically
against the TrigFlow forms (tests); the density and warm-up numbers are the note's (sCM paper values are
"verify" there: the paper PDF was not readable here). Deviations from the sources, all deliberate:
* No learned adaptive weighting ℓ(σ) and no 1/tan τ prior (sCM/FastGen/SANA use both; sCM-mnist reports the prior
  unstable; rCM uses neither): the loss is the plain sum, as rCM's sCM half, times ``loss_scale``.
* Teacher samples as data (rCM's choice; sCM and SANA use real images).
* No student EMA of its own: the loop's ``train.ema`` is the evaluation EMA, as for every method.
SD3/LongCat preset: rCM's Wan-1.3B optimiser (AdamW betas (0, 0.999), wd 0.01, lr 2e-6, no clip), σ density
logit-normal(0.9, 1.6) (note §1.5: SANA-Sprint's 1024² density in RF units), warm-up H = 1000 (rCM 1.3B), CFG 6.
Toy preset: larger learning rate, shorter warm-up, CFG 2 (the toy teacher's CDM/DMD2 presets' value).
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
from cdmbench.methods.losses import (TangentNorm, TangentWarmup, consistency_tangent, normalize_tangent, renoise,
                                     scm_loss, scm_tangent, tangent_warmup_ratio, trig_to_sigma)
from cdmbench.methods.schedules import SigmaMethod, sample_sigmas
from cdmbench.sampling import Schedule, make_schedule


@dataclass(frozen=True)
class SCMConfig:
    guidance: float = 6.0  # teacher CFG w, standard form v_u + w·(v_c − v_u) (rCM "5" in cond + 5·(cond − uncond))
    logit_mean: float = 0.9  # σ ~ sigmoid(N(mean, std)) (note §1.5; SANA-Sprint 1024² in RF units; sweep 0.7–1.1)
    logit_std: float = 1.6
    sigma_min: float = 1e-4  # clamp of the training σ (note §1.5)
    sigma_max_train: float = 1 - 1e-4
    tangent_warmup: int = 1000  # H: r = min(1, k/H) (sCM 10k, SANA 4000, rCM Wan-1.3B 1000, 14B 0)
    tangent_norm: TangentNorm = TangentNorm.L2
    norm_c: float = 0.1  # c in ĝ = g/(‖g‖ + c) (paper, SANA, rCM)
    loss_scale: float = 1.0  # multiplies the per-sample sum (rCM uses 100 beside its DMD term)
    jvp: JvpMode = JvpMode.EXACT  # finite_difference only when asked (note §1.9)
    fd_step: float = 1e-4  # h in σ units for jvp=finite_difference (best measured on the toy; never 5e-3)
    num_pairs: int = 10000  # teacher samples (x0, prompt) used as data (note §1.6)
    pair_steps: int = 28  # teacher Euler steps for them
    pair_seed: int = 4321
    sample_sigma0: float = 1.0  # σ_0 of the sampler (SD3: 1; rCM/FastGen EDM: 80/81)
    mid_taus: tuple[float, ...] = (1.5, 1.4, 1.0)  # intermediate TrigFlow times of the sampler (rCM), [:steps−1]
    student_lr: float = 2e-6  # rCM Wan-1.3B
    betas: tuple[float, float] = (0.0, 0.999)  # rCM
    weight_decay: float = 0.01
    warmup: int = 0  # LR warm-up (steps)

    def __post_init__(self):
        check_enum_fields(self)
        if not self.norm_c > 0:
            raise CdmbenchError(f"norm_c must be > 0, got {self.norm_c}")
        if self.tangent_warmup < 0:
            raise CdmbenchError(f"tangent_warmup must be >= 0 steps, got {self.tangent_warmup}")
        if not 0 < self.sigma_min < self.sigma_max_train < 1:
            raise CdmbenchError(f"need 0 < sigma_min < sigma_max_train < 1, got {self.sigma_min}, {self.sigma_max_train}")
        if not 0 < self.sample_sigma0 <= 1:
            raise CdmbenchError(f"sample_sigma0 must be in (0, 1], got {self.sample_sigma0}")
        if any(not 0 < t < math.pi / 2 for t in self.mid_taus):
            raise CdmbenchError(f"mid_taus must lie in (0, π/2), got {self.mid_taus}")
        if self.num_pairs < 1:
            raise CdmbenchError(f"num_pairs must be >= 1, got {self.num_pairs}")


@METHODS.register("scm")
class SCM(Method):
    Config = SCMConfig
    paper = "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models (sCM), arXiv 2410.11081"
    loss_keys = ("scm",)
    stochastic_sampling = True  # multistep consistency sampling: x̂0 → fresh noise
    presets = {
        "toy": {"student_lr": 3e-5, "betas": "0.9,0.999", "guidance": 2.0, "tangent_warmup": 100, "num_pairs": 512,
                "train.steps": 400, "train.checkpoint_every": 100},
        "sd3": {"train.steps": 4000, "train.checkpoint_every": 500},
        "longcat": {"train.steps": 2000, "train.checkpoint_every": 500},
    }

    def __init__(self, backbone, config: SCMConfig, **run):
        super().__init__(backbone, config, **run)  # training, data_source, prompt_source (see Method)
        self.pairs = None  # teacher samples (cdmbench.pairs.PairSet), set by ``prepare``

    @property
    def supported_steps(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.config.mid_taus) + 2))

    def schedule(self, steps: int) -> Schedule:
        """σ_0 = ``sample_sigma0``, then σ(τ) for τ in ``mid_taus[:steps−1]``; already effective (no shift)."""
        self.check_steps(steps)
        c = self.config
        sig = [c.sample_sigma0, *(float(trig_to_sigma(t)) for t in c.mid_taus[:steps - 1])]
        return make_schedule(sig, lambda s: s)

    def optim_specs(self):
        c = self.config
        return {"student": OptimSpec(c.student_lr, c.betas, c.weight_decay, warmup=c.warmup)}

    def optimizers_for(self, step: int) -> tuple[str, ...]:
        return ("student",)

    def prepare(self, run) -> None:
        """The teacher samples used as data: made once into the run folder (sharded), or read back."""
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

    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        c, B, dev = self.config, batch.size, self.backbone.device
        if self.pairs is None:
            raise RuntimeError("scm: prepare(run) makes the teacher samples before the first train_step")
        j = torch.randint(len(self.pairs), (B,)).tolist()
        x0 = self.pairs.samples[j].to(dev).float()
        cond = self.backbone.encode_prompts([self.pairs.prompts[i] for i in j])
        s = sample_sigmas(B, SigmaMethod.LOGIT_NORMAL, logit_mean=c.logit_mean, logit_std=c.logit_std,
                          sigma_min=c.sigma_min, sigma_max=c.sigma_max_train, device=dev)
        x = renoise(x0, s, torch.randn_like(x0))
        with torch.no_grad():
            v_t = self.teacher_velocity(x, s, cond)
            v_minus, jvp = self.backbone.velocity_jvp(self.nets["student"], x, s, cond, v_t, 1.0, mode=c.jvp,
                                                      fd_step=c.fd_step)
            r = tangent_warmup_ratio(step, c.tangent_warmup)
            g = scm_tangent(v_t, v_minus, jvp, x, s, r, TangentWarmup.SCM)
            g_hat = normalize_tangent(g, c.norm_c, c.tangent_norm)
        loss = c.loss_scale * scm_loss(self.v("student", x, s, cond), g_hat, s).mean()
        update("student", loss)
        D = consistency_tangent(v_t, v_minus, jvp, s)
        return StepOutput({"scm": loss.detach()},
                          {"tangent_D_norm": D.flatten(1).norm(dim=1).mean().item(),
                           "tangent_g_norm": g.flatten(1).norm(dim=1).mean().item(), "tangent_warmup_r": r,
                           "jvp_norm": jvp.flatten(1).norm(dim=1).mean().item()})
