"""Pure loss math for every method: tensors in, tensors out; fp32 throughout.

Conventions (cdm.md §1): x_σ = (1−σ)·x0 + σ·ε, v = ε − x0, x̂0 = x_σ − σ·v̂, ε̂ = x_σ + (1−σ)·v̂.
Per-sample reductions are over every non-batch dimension. ``sg`` = stop-gradient (``detach``).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Flow-matching primitives (baselines.md A0)


def _b(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample σ of shape (B,) against a (B, ...) tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    return sigma.reshape(-1, *([1] * (like.dim() - 1)))


def to_x0(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_σ − σ·v̂."""
    return x.float() - _b(sigma, x) * v.float()


def to_eps(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Implied noise ε̂ = x_σ + (1−σ)·v̂."""
    return x.float() + (1 - _b(sigma, x)) * v.float()


def renoise(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_σ = (1−σ)·x0 + σ·ε."""
    s = _b(sigma, x0)
    return (1 - s) * x0.float() + s * eps.float()


def euler_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_{σ'} = x_σ + (σ' − σ)·v̂ (also the extrapolation along the student's velocity, cdm.md §5.3 step 2)."""
    return x.float() + (_b(sigma_next, x) - _b(sigma, x)) * v.float()


def mean_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------
# Denoising score matching for the fake score / teacher (cdm.md §4 step 3; baselines.md A1.2)


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L = mean over all elements of (v̂ − (ε − x0))² (rectified-flow denoising loss)."""
    return (v_pred.float() - (eps.float() - x0.float())).square().mean()


# ------------------------------------------------------------------------------------------------
# CDM / Decoupled-DMD normalised x0-space matching (cdm.md §5 "normalised-target MSE")


def normalized_x0_matching_loss(
    x0_pred: torch.Tensor, delta: torch.Tensor, reference: torch.Tensor, clamp_min: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The x0-space distribution-matching form shared by L_CA, L_DM and L_CDM (cdm.md §5, §5.1–5.3).

    n_b = max(mean_D |r_b − sg(x̂0_b)| + 1e-8, clamp_min);  target = sg(x̂0) + nan_to_num(Δ / n);
    L = mean_b mean_D (x̂0 − target)².  The value is constant in θ; ∂L/∂x̂0 = −(2/D)·Δ/n, so a descent
    step moves x̂0 along +Δ/n.

    Args:
        x0_pred: student x̂0 with gradient, (B, ...).
        delta: update direction Δ (no grad): g·(x0_c − x0_u) for CA, x0_real − x0_fake for DM/CDM.
        reference: r used by the normaliser (x0_c for CA, x0_real for DM/CDM).
        clamp_min: ``norm_clip_min`` (0.1 in the paper's configs).

    Returns:
        (loss, normaliser n of shape (B,)) — n is returned for health logging.
    """
    x0 = x0_pred.float()
    sg = x0.detach()
    n = (mean_per_sample((reference.float() - sg).abs()) + 1e-8).clamp_min(clamp_min)
    target = sg + torch.nan_to_num(delta.float() / _b(n, x0))
    return (x0 - target).square().mean(), n


# ------------------------------------------------------------------------------------------------
# DMD / DMD2 distribution-matching gradient (baselines.md A1.1; DMD eq. 7 in x0 form)


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla DMD / DMD2 generator loss on generator samples ``x`` (with grad).

    g = (x0_fake − x0_real) / mean_D |x − x0_real|   (per sample, no clamp);
    L = 0.5·mean (x − sg(x − g))², so ∂L/∂x = g / D and descent moves x toward x0_real − x0_fake.

    Returns:
        (loss, normaliser of shape (B,)).
    """
    xf = x.float()
    n = mean_per_sample((xf.detach() - x0_real.float()).abs())
    g = torch.nan_to_num((x0_fake.float() - x0_real.float()) / _b(n, xf))
    return 0.5 * F.mse_loss(xf, (xf - g).detach()), n


# ------------------------------------------------------------------------------------------------
# Consistency distillation (baselines.md A3: PCM/LCM-style for flow models)


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """LCM/PCM pseudo-Huber: mean of sqrt((pred − target)² + c²) − c (elementwise)."""
    return (torch.sqrt((pred.float() - target.float()).square() + c * c) - c).mean()


# ------------------------------------------------------------------------------------------------
# GAN terms for the optional DMD2 head (baselines.md A2: non-saturating softplus)


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(−D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """softplus(−D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


# ------------------------------------------------------------------------------------------------
# Regression distance for vanilla DMD's paired loss (baselines.md A1.3)


def mse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error on decoded images; the toy's stand-in for LPIPS (no pretrained VGG offline)."""
    return (a.float() - b.float()).square().mean()


# ------------------------------------------------------------------------------------------------
# Continuous-time consistency distillation: sCM and rCM (shared design/continuous-cm.md; sCM: Lu & Song,
# arXiv 2410.11081; rCM: Zheng et al., arXiv 2510.08431). Written in rectified-flow units; TrigFlow (σ_d = 1)
# only where a source defines a quantity there: tan τ = σ/(1−σ), cos τ = (1−σ)/ρ, sin τ = σ/ρ, x_τ = x_σ/ρ,
# F = ((1−2σ)/ρ)·x_σ + ρ·v (note §0).


class TangentNorm(str, enum.Enum):
    """How the tangent g is normalised per sample (note §1 step 5)."""

    L2 = "l2"  # ĝ = g / (‖g‖₂ + c): sCM paper, rCM, SANA-Sprint
    RMS = "rms"  # ĝ = g / (‖g‖₂/√d + c): FastGen's default (g_norm_spatial_invariance); ‖ĝ‖ ≈ √d


class TangentWarmup(str, enum.Enum):
    """Which term the tangent warm-up ratio r scales (note §1.7, §7)."""

    SCM = "scm"  # sCM Alg. 1 / FastGen / SANA: r multiplies the whole (x_τ + dF⁻/dτ) term
    RCM = "rcm"  # rCM: r multiplies only x_τ; cos τ·√(1 − r² sin²τ) on the first term


def _work(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (reference checks); everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bw(sigma, like: torch.Tensor) -> torch.Tensor:
    """``_b`` in ``like``'s working precision."""
    sigma = torch.as_tensor(sigma, device=like.device).to(_work(like))
    return sigma.reshape(-1, *([1] * (like.dim() - 1)))


def rho(sigma: torch.Tensor) -> torch.Tensor:
    """ρ(σ) = √((1−σ)² + σ²) (note §0)."""
    return torch.sqrt((1 - sigma) ** 2 + sigma ** 2)


def trig_to_sigma(tau: torch.Tensor | float) -> torch.Tensor:
    """σ = sin τ / (sin τ + cos τ), the RF σ of TrigFlow time τ at σ_d = 1 (tan τ = σ/(1−σ), note §0)."""
    tau = torch.as_tensor(tau, dtype=torch.float64)
    return torch.sin(tau) / (torch.sin(tau) + torch.cos(tau))


def tangent_warmup_ratio(step: int, warmup_steps: int) -> float:
    """r = min(1, k/H); H = 0 means no warm-up (r = 1 from the first step; note §1.7)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def consistency_tangent(v_teacher: torch.Tensor, v_minus: torch.Tensor, jvp: torch.Tensor,
                        sigma: torch.Tensor) -> torch.Tensor:
    """D = (v_T − v⁻) − σ·J = d x̂0⁻/dσ along the teacher ODE (note §1 step 3), J = ∂_x v⁻·v_T + ∂_σ v⁻."""
    w = _work(v_minus)
    return v_teacher.to(w) - v_minus.to(w) - _bw(sigma, v_minus) * jvp.to(w)


def scm_tangent(v_teacher: torch.Tensor, v_minus: torch.Tensor, jvp: torch.Tensor, x: torch.Tensor,
                sigma: torch.Tensor, r: float, warmup: TangentWarmup = TangentWarmup.SCM) -> torch.Tensor:
    """The sCM tangent g in TrigFlow units, written exactly in RF quantities (fp32).

    sCM form (note §1 step 4, "exact RF form", our derivation checked against the TrigFlow form in the tests):
        g = ((1−σ)/ρ)·[(1−r)(1−σ)(v_T − v⁻) + r·ρ²·D].
    rCM form (warm-up on x_τ only; TrigFlow form read in NVlabs/rcm t2v_model_distill_rcm.py, RF rewrite ours):
        g = (1−σ)·√(1 − r²·sin²τ)·(v_T − v⁻) − ((1−σ)²/ρ)·(v_T − v⁻) + (1−σ)ρ·D + (1−r)·(1−σ)σ·x_σ/ρ³.
    Both equal (1−σ)ρ·D at r = 1. ``x`` = x_σ is only used by the rCM form.
    """
    w = _work(v_minus)
    s = _bw(sigma, v_minus)
    p = rho(s)
    dv = v_teacher.to(w) - v_minus.to(w)
    D = consistency_tangent(v_teacher, v_minus, jvp, sigma)
    if TangentWarmup(warmup) is TangentWarmup.SCM:
        return ((1 - s) / p) * ((1 - r) * (1 - s) * dv + r * p * p * D)
    sin = s / p
    return ((1 - s) * torch.sqrt(1 - r * r * sin * sin) * dv - ((1 - s) ** 2 / p) * dv + (1 - s) * p * D
            + (1 - r) * (1 - s) * s * x.to(w) / p ** 3)


def scm_tangent_trig(F_minus: torch.Tensor, F_teacher: torch.Tensor, x_tau: torch.Tensor, t_F: torch.Tensor,
                     tau: torch.Tensor, r: float, warmup: TangentWarmup = TangentWarmup.SCM) -> torch.Tensor:
    """The sources' TrigFlow form, for checking ``scm_tangent``. ``t_F`` = cos τ sin τ·dF⁻/dτ, the JVP of F⁻ on
    (x_τ, τ) with tangents (cos τ sin τ·F_T, cos τ sin τ) (sCM §5.1's rearrangement).

    sCM (paper Alg. 1, FastGen, SANA; note §1 step 4): g = −cos²τ·(F⁻ − F_T) − r·(cos τ sin τ·x_τ + t_F).
    rCM (t2v_model_distill_rcm.py, read): g = −cos τ·√(1 − r² sin²τ)·(F⁻ − F_T) − r·cos τ sin τ·x_τ − t_F.
    """
    c, s = torch.cos(_bw(tau, F_minus)), torch.sin(_bw(tau, F_minus))
    if TangentWarmup(warmup) is TangentWarmup.SCM:
        return -c * c * (F_minus - F_teacher) - r * (c * s * x_tau + t_F)
    return -c * torch.sqrt(1 - r * r * s * s) * (F_minus - F_teacher) - r * c * s * x_tau - t_F


def normalize_tangent(g: torch.Tensor, c: float = 0.1, norm: TangentNorm = TangentNorm.L2) -> torch.Tensor:
    """ĝ = g/(‖g‖₂ + c) per sample over every non-batch dim (L2), or g/(‖g‖₂/√d + c) (RMS); computed in fp64
    (as rCM and FastGen), returned in fp32 (note §1 step 5)."""
    g64 = g.double()
    n = g64.flatten(1).norm(dim=1)
    if TangentNorm(norm) is TangentNorm.RMS:
        n = n / g64[0].numel() ** 0.5
    return (g64 / (n.reshape(-1, *([1] * (g.dim() - 1))) + c)).to(_work(g))


def _bad_samples(*ts: torch.Tensor) -> torch.Tensor:
    """(B,) True where any of the tensors has a non-finite element in that sample."""
    return torch.stack([~torch.isfinite(t.detach()).flatten(1).all(1) for t in ts]).any(0)


def scm_loss(v_theta: torch.Tensor, g_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample sCM loss in v-space, (B,): Σ (ρ·(v_θ − sg(v_θ)) − ĝ)² (note §1 step 6).

    Equal in value and θ-gradient to the sources' ‖F_θ − F⁻ − ĝ‖² (F_θ − sg(F_θ) = ρ·(v_θ − sg(v_θ)) at fixed
    x_σ); ∂L/∂θ = −2ρ·(∂v_θ/∂θ)ᵀĝ, so descent moves F_θ toward F⁻ + ĝ. The value is Σĝ² (constant in θ).
    A sample with a non-finite ĝ or v_θ contributes 0 (rCM's NaN guard zeroes g and F of that sample).
    """
    v = v_theta.to(_work(v_theta))
    m = _bad_samples(v, g_hat).reshape(-1, *([1] * (v.dim() - 1)))
    v = torch.where(m, torch.zeros_like(v), v)
    g = torch.where(m, torch.zeros_like(v), g_hat.to(v.dtype))
    return (rho(_bw(sigma, v)) * (v - v.detach()) - g).square().flatten(1).sum(1)


def rcm_dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rCM's DMD regulariser on student samples ``x`` (with grad), per sample (B,), computed in fp64 (note §2 (d)).

    a = max(mean_D |x − x0_real|, 1e-5), δ = (x0_fake − x0_real)/a, L = Σ (x − sg(x − δ))² (∂L/∂x = 2δ); a sample
    with a non-finite term contributes 0. Differs from ``dmd_loss`` (DMD2) by the sum reduction, the 1e-5 clip and
    the factor 2. Returns (loss (B,), a (B,)).
    """
    x64 = x.double()
    a = (x64.detach() - x0_real.double()).abs().flatten(1).mean(1).clamp_min(1e-5)
    delta = (x0_fake.double() - x0_real.double()) / _bw(a, x64)
    per = (x64 - (x64 - delta).detach()).square().flatten(1).sum(1)
    per = torch.where(torch.isfinite(per.detach()), per, torch.zeros_like(per))
    return per.float(), a.float()


def rcm_fake_score_loss(v_fake: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """rCM's fake-score loss ‖x̂ − x0_fake‖²/sin²τ in RF units, per sample (B,): ρ²·Σ (v_fake − (ε − x̂))² (note §2)."""
    v = v_fake.to(_work(v_fake))
    s = torch.as_tensor(sigma, device=v.device).to(v.dtype)
    return rho(s).square() * (v - (eps.to(v.dtype) - x0.to(v.dtype))).square().flatten(1).sum(1)
