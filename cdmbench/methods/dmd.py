"""Vanilla DMD (Yin et al., CVPR 2024, arXiv 2311.18828; spec: shared design/baselines.md A1; no official code).

A one-step generator G(z) = x̂0 of the student at σ = 1, trained with the distribution-matching
gradient (real score with CFG, fake score without) plus a regression loss towards a fixed set of
teacher ODE (noise, sample) pairs; generator and fake score update 1:1. The pairs are generated once per
run before the first iteration, sharded across processes, and stored in the run folder
(``cdmbench.pairs``), not in checkpoints; a resumed run reads them back. One guidance for both losses:
the pairs are made with the real score's CFG unless ``pair_guidance`` says otherwise, so the regression and
DM terms pull toward the same teacher. Regression distance: LPIPS on decoded images resized to
``lpips_resolution`` for image backbones.

Deviations from the paper (its SD1.5 setting): SD3-class backbones run the SD1.5 recipe
(real-score CFG 3, λ_reg 0.25, σ ∈ [0.02, 0.98], pairs from a 28-step Euler ODE, 10k pairs); the pair set's
size and the real-score CFG are *verify* against the paper (baselines.md A1.4); LPIPS is torchmetrics'
VGG LPIPS on images resized to 256 px (DMD's LPIPS network and resolution: *verify*). Toy preset: MSE on
decoded images instead of LPIPS (no pretrained LPIPS network offline; the toy evaluators' features would
leak the metric into training), 512 pairs, CFG 2, larger learning rates.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from cdmbench.config import check_enum_fields
from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.methods import METHODS
from cdmbench.methods.base import Batch, Method, OptimSpec, StepOutput, Update
from cdmbench.methods.losses import dmd_loss, flow_matching_loss, mse_distance, renoise, to_x0
from cdmbench.methods.schedules import SigmaMethod, sample_sigmas


class Distance(str, enum.Enum):
    MSE = "mse"
    LPIPS = "lpips"  # torchmetrics LPIPS (VGG) on decoded images resized to ``lpips_resolution``


@dataclass(frozen=True)
class DMDConfig:
    real_guidance: float = 3.0  # CFG of the real score (standard form)
    regression_weight: float = 0.25  # λ_reg
    regression_distance: Distance = Distance.LPIPS
    lpips_resolution: int = 256  # decoded images are resized to this before LPIPS
    num_pairs: int = 10000  # size of the fixed teacher pair set
    pair_steps: int = 28  # teacher Euler steps for the pairs
    pair_guidance: float | None = None  # teacher CFG for the pairs; None = real_guidance (one teacher)
    pair_seed: int = 1234
    sigma_min: float = 0.02
    sigma_max: float = 0.98
    student_lr: float = 1e-5
    fake_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup: int = 0

    def __post_init__(self):
        check_enum_fields(self)
        if self.num_pairs < 1:
            raise CdmbenchError(f"num_pairs must be >= 1, got {self.num_pairs}")


@METHODS.register("dmd")
class DMD(Method):
    Config = DMDConfig
    paper = "One-step Diffusion with Distribution Matching Distillation, arXiv 2311.18828"
    loss_keys = ("fake_score", "dm", "regression", "student")
    supported_steps = (1,)
    presets = {
        "toy": {"student_lr": 3e-5, "fake_lr": 1e-4, "real_guidance": 2.0,
                "regression_distance": "mse", "num_pairs": 512,
                "train.steps": 400, "train.checkpoint_every": 100},
        "sd3": {"train.steps": 4000},
        "longcat": {"train.steps": 2000},
    }

    def __init__(self, backbone, config: DMDConfig, **run):
        super().__init__(backbone, config, **run)  # training, data_source, prompt_source (see Method)
        self.pairs = None  # a cdmbench.pairs.PairSet, set by ``prepare``
        self._lpips = None
        if self.training:
            self.nets["fake_score"] = backbone.trainable_copy()
            if config.regression_distance is Distance.LPIPS:
                self._lpips = _load_lpips(backbone.device)

    def optim_specs(self):
        c = self.config
        return {"student": OptimSpec(c.student_lr, c.betas, c.weight_decay, warmup=c.warmup),
                "fake_score": OptimSpec(c.fake_lr, c.betas, c.weight_decay, warmup=c.warmup)}

    def optimizers_for(self, step: int) -> tuple[str, ...]:
        return ("student", "fake_score")

    @property
    def pair_guidance(self) -> float:
        c = self.config
        return c.real_guidance if c.pair_guidance is None else c.pair_guidance

    def prepare(self, run) -> None:
        """The fixed pair set: made once (sharded, with a progress bar) into the run folder, or read back."""
        from cdmbench.pairs import teacher_pair_set

        c = self.config
        prompts = self.draw_prompts(c.num_pairs, torch.Generator().manual_seed(c.pair_seed))
        self.pairs = teacher_pair_set(self.backbone, prompts, steps=c.pair_steps, guidance=self.pair_guidance,
                                      seed=c.pair_seed, run_dir=run.run_dir, processes=run.processes,
                                      progress=run.progress)

    def generate(self, noise, cond):
        s = torch.ones(noise.shape[0], device=noise.device)
        return to_x0(noise, s, self.v("student", noise, s, cond))

    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        c, cond, B, dev = self.config, batch.cond, batch.size, self.backbone.device
        if self.pairs is None:
            raise RuntimeError("dmd: prepare(run) makes the teacher pairs before the first train_step")
        out = StepOutput()
        x = self.generate(torch.randn(B, *self.backbone.latent_shape, device=dev), cond)
        s_t = sample_sigmas(B, SigmaMethod.UNIFORM, sigma_min=c.sigma_min, sigma_max=c.sigma_max, device=dev)
        x_t = renoise(x.detach(), s_t, torch.randn_like(x))
        with torch.no_grad():
            v_u, v_c = self.teacher_cfg(x_t, s_t, cond)
            x0_real = to_x0(x_t, s_t, v_u + c.real_guidance * (v_c - v_u))
            x0_fake = to_x0(x_t, s_t, self.v("fake_score", x_t, s_t, cond))
        l_dm, n = dmd_loss(x, x0_real, x0_fake)
        # regression on a separate batch of the fixed teacher pairs
        j = torch.randint(len(self.pairs), (B,)).tolist()
        pz, py = self.pairs.noise(j, dev), self.pairs.samples[j].to(dev).float()
        pcond = self.backbone.encode_prompts([self.pairs.prompts[i] for i in j])
        l_reg = self.regression(self.generate(pz, pcond), py)
        total = l_dm + c.regression_weight * l_reg
        update("student", total)
        x = x.detach()
        s = sample_sigmas(B, SigmaMethod.UNIFORM, sigma_min=c.sigma_min, sigma_max=c.sigma_max, device=dev)
        z = torch.randn_like(x)
        l_fake = flow_matching_loss(self.v("fake_score", renoise(x, s, z), s, cond), x, z)
        update("fake_score", l_fake)
        out.losses.update(dm=l_dm.detach(), regression=l_reg.detach(), student=total.detach(), fake_score=l_fake.detach())
        out.logs.update(norm_dm=n.mean().item(), x0_mean=x.mean().item(), x0_var=x.var().item())
        return out

    def regression(self, pred_latents, target_latents) -> torch.Tensor:
        a, b = self.backbone.decode(pred_latents), self.backbone.decode(target_latents).detach()
        if self.config.regression_distance is Distance.MSE:
            return mse_distance(a, b)
        r = self.config.lpips_resolution
        a = torch.nn.functional.interpolate(a, size=(r, r), mode="bilinear", antialias=True)
        b = torch.nn.functional.interpolate(b, size=(r, r), mode="bilinear", antialias=True)
        return self._lpips(a * 2 - 1, b * 2 - 1)


def _load_lpips(device):
    """torchmetrics LPIPS(VGG); its backbone weights come from torchvision's cache (no download offline)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False).to(device).eval()
    except Exception as e:  # offline and not cached: URLError / OSError from torchvision
        raise MissingWeightsError(
            "LPIPS (VGG16) weights are not available offline: put torchvision's vgg16 weights in "
            "$TORCH_HOME/hub/checkpoints on a connected machine, or use --set regression_distance=mse "
            f"({type(e).__name__})"
        ) from e
