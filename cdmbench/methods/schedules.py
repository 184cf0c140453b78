"""Training-time σ densities and rollout schedules (pure functions; cdm.md §2.1, §3)."""

from __future__ import annotations

import enum
import random

import torch


class SigmaMethod(str, enum.Enum):
    """How a training σ is drawn (cdm.md §3)."""

    UNIFORM = "uniform"  # U(0,1); an upper bound is accepted but ignored (as shipped)
    UNIFORM_CAPPED = "uniform_capped"  # U(0,1)·upper_bound
    LOGIT_NORMAL = "logit_normal"  # sigmoid(N(mean, std))


def sample_sigmas(
    n: int,
    method: SigmaMethod,
    *,
    sigma_min: float = 0.02,
    sigma_max: float = 0.98,
    upper_bound: torch.Tensor | float | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n,) float32 training σ, always finally clamped to [sigma_min, sigma_max] (cdm.md §3).

    The clamp puts point masses at the bounds (e.g. 2 % at 0.02 and 0.98 for ``uniform``): kept as shipped.
    """
    method = SigmaMethod(method)
    u = torch.rand(n, generator=generator, dtype=torch.float32)
    if method is SigmaMethod.UNIFORM:
        s = u
    elif method is SigmaMethod.UNIFORM_CAPPED:
        if upper_bound is None:
            raise ValueError("sample_sigmas(uniform_capped) needs upper_bound")
        s = u * torch.as_tensor(upper_bound, dtype=torch.float32).cpu()
    else:
        s = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, dtype=torch.float32))
    return s.clamp(sigma_min, sigma_max).to(device)


def random_rollout_nominal(rng: random.Random, max_steps: int = 28, low: float = 0.25, high: float = 0.95,
                           inner_rng: random.Random | None = None) -> list[float]:
    """CDM's random continuous schedule (cdm.md §2.1), nominal (pre-shift) values.

    N ~ UniformInt{1..max_steps} from ``rng`` (must be identical on every process); N−1 inner values
    u ~ U(low, high) from ``inner_rng`` (may differ per process), sorted descending after σ = 1.
    """
    n = rng.randint(1, max_steps)
    inner_rng = inner_rng or rng
    inner = sorted((inner_rng.uniform(low, high) for _ in range(n - 1)), reverse=True)
    return [1.0, *inner]


def shifted_uniform_sigmas(n: int, shift: float, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) float32 σ = α·u/(1 + (α−1)·u), u ~ U(0, 1): rCM's DMD density p_D (continuous-cm.md §2; rCM's
    ``timestep_shift``, α = 5 on Wan), the same map as SD3's static shift (cdm.md §1.1)."""
    u = torch.rand(n, generator=generator, dtype=torch.float32)
    return (shift * u / (1 + (shift - 1) * u)).to(device)
