"""σ schedules and the one few-step sampler every method, the teacher and the harness share.

Conventions (cdm.md §1): x_σ = (1−σ)·x0 + σ·ε, v = ε − x0, x̂0 = x_σ − σ·v̂, σ=1 is noise.
A schedule keeps both the *nominal* σ list (what a user asks for) and the *effective* one (after the
backbone's scheduler shift, cdm.md §1.1), and always ends at σ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from cdmbench.errors import CdmbenchError


def static_shift(sigma: float | torch.Tensor, shift: float):
    """SD3's static shift s(σ) = S·σ / (1 + (S−1)·σ) (cdm.md §1.1)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def nominal_sigmas(steps: int) -> list[float]:
    """The few-step grid 1 − k/steps, k = 0..steps−1: [1], [1, .5], [1, .75, .5, .25] (cdm.md §8)."""
    if not isinstance(steps, int) or steps < 1:
        raise CdmbenchError(f"steps must be a positive integer, got {steps!r}")
    return [1.0 - k / steps for k in range(steps)]


@dataclass(frozen=True)
class Schedule:
    """A σ schedule: nominal and effective (shifted) σ values, both without the terminal 0."""

    nominal: tuple[float, ...]
    effective: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.effective)

    def sigmas(self, device=None) -> torch.Tensor:
        """Effective σ_0..σ_{N−1} followed by the terminal 0, float32."""
        return torch.tensor([*self.effective, 0.0], dtype=torch.float32, device=device)

    def as_dict(self) -> dict:
        return {"nominal": [round(s, 6) for s in self.nominal], "effective": [round(s, 6) for s in self.effective]}


def make_schedule(nominal: Sequence[float], shift_fn: Callable[[list[float]], list[float]]) -> Schedule:
    nominal = [float(s) for s in nominal]
    if not nominal or any(not 0 < s <= 1 for s in nominal) or any(a <= b for a, b in zip(nominal, nominal[1:])):
        raise CdmbenchError(f"a σ schedule must be strictly decreasing values in (0, 1], got {nominal}")
    return Schedule(tuple(nominal), tuple(float(s) for s in shift_fn(nominal)))


class Denoiser:
    """velocity(x, σ) of one network under a backbone, with optional classifier-free guidance.

    CFG uses the standard form v = v_u + w·(v_c − v_u) (w = 1: no guidance) in one batched call on
    [uncond; cond]; the number of function evaluations (NFE) counts such a call as two.
    """

    def __init__(self, backbone, net, cond, uncond=None, guidance: float = 1.0):
        if guidance != 1.0 and uncond is None:
            raise CdmbenchError("guidance != 1 needs the unconditional embedding")
        self.backbone, self.net, self.cond, self.uncond, self.guidance = backbone, net, cond, uncond, guidance
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        if self.guidance == 1.0:
            self.nfe += 1
            return self.backbone.velocity(self.net, x, sigma, self.cond).float()
        self.nfe += 2
        both = self.backbone.velocity(
            self.net, torch.cat([x, x]), torch.cat([sigma, sigma]), self.uncond.cat(self.cond)
        ).float()
        v_u, v_c = both.chunk(2)
        return v_u + self.guidance * (v_c - v_u)


@torch.no_grad()
def sample_euler(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    stochastic: bool = False,
    rng=None,
) -> torch.Tensor:
    """Euler ODE over an explicit σ list (ending at 0); ``stochastic`` re-noises x̂0 with fresh noise.

    ODE step: x_{k+1} = x_k + (σ_{k+1} − σ_k)·v̂_k. Stochastic (LCM/DMD2 style): x_{k+1} =
    (1−σ_{k+1})·x̂0_k + σ_{k+1}·z with z from ``rng`` (a per-sample ``StackedGenerator``), so
    the result depends only on each sample's own seeds.
    """
    if stochastic and rng is None:
        raise CdmbenchError("stochastic sampling needs rng= (a per-sample StackedGenerator)")
    x = noise.float()  # x at σ_0 = 1: pure noise
    for k in range(len(sigmas) - 1):
        s, s_next = sigmas[k], sigmas[k + 1]
        v = denoiser(x, s)
        if stochastic and s_next > 0:
            x0 = x - s * v
            x = (1 - s_next) * x0 + s_next * rng.randn_like(x)
        else:
            x = x + (s_next - s) * v
    return x
