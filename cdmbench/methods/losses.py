"""Pure loss math for every method: tensors in, tensors out; fp32 throughout.

Conventions (cdm.md §1): x_σ = (1−σ)·x0 + σ·ε, v = ε − x0, x̂0 = x_σ − σ·v̂, ε̂ = x_σ + (1−σ)·v̂.
Per-sample reductions are over every non-batch dimension. ``sg`` = stop-gradient (``detach``).
"""

from __future__ import annotations

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
