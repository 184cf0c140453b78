"""Forward-mode derivatives of a backbone velocity: (v, ∂v along a tangent in (x, σ)) for any network.

Continuous-time consistency methods (sCM, rCM; shared design/continuous-cm.md §1 step 3, §1.8, §1.9, §5) need
J = ∂_x v·ẋ + ∂_σ v·σ̇ of the student velocity v(x, σ) = ``backbone.velocity(net, x, σ, cond)``. The tangent is in σ
units: the adapters feed the network ``timestep = 1000·σ``, so a tangent σ̇ = 1 is a timestep tangent of 1000, and
it flows through the adapter's own arithmetic (no backbone needs code of its own).

Two modes, chosen explicitly (``JvpMode``), never as a silent fallback:

* ``exact``: ``torch.func.jvp`` of the closure (x, σ) ↦ v. Autocast is switched off inside the call, so a network
  with fp32 weights (every trainable copy: students and fake scores keep fp32 master weights) runs its whole time
  path — sinusoid, time MLP, AdaLN modulation — in fp32 even under bf16 mixed-precision training (FastGen's
  ``precision_amp_jvp``; note §1.8). A network stored in bf16/fp16 (a frozen teacher built with
  ``backbone.dtype=bfloat16``) still gets its timestep and sinusoid in fp32 (the adapters pass 1000·σ in fp32),
  but everything after runs in the network dtype: the note measured 2–7 % JVP error there, so JVP a copy in fp32.
  Attention runs on PyTorch's math SDPA kernel inside the call only (``sdpa_kernel([SDPBackend.MATH])``, restored
  on exit): the CPU flash kernel (the default for fp64/fp32/bf16 on the CPU) and, on CUDA, the flash,
  memory-efficient and cuDNN kernels have no forward-AD formula (pytorch#128971, #117629, #154226) and raise
  ``NotImplementedError``. The math kernel works on CPU and GPU but materialises the L×L attention matrix
  (O(L²) memory): fine for SD3 at 1024² with a modest batch, the first thing to run out at video scale, where rCM
  ships a Triton FlashAttention-2 JVP kernel instead (not reproduced here). Wrappers: a DDP/accelerate wrapper is
  unwrapped (``.module``; the JVP is no-grad, so no gradient sync is needed); FSDP2-sharded networks are not
  supported by ``torch.func.jvp`` through their all-gather hooks (untested here: no multi-GPU machine).
* ``finite_difference``: central difference [v(x + h·ẋ, σ + h·σ̇) − v(x − h·ẋ, σ − h·σ̇)]/(2h), one-sided for a
  sample whose σ ± h·σ̇ leaves [0, 1] (note §1.9). The note measured the error on the shipped toy teacher in fp32:
  h = 1e-4 is best (0.16–0.24 %), 1e-3 gives 7–14 %, 5e-3 (FastGen's Wan MeanFlow step) 37–95 %; a bf16 network
  is useless (≥ 19 %). Three network evaluations (v at the point, plus the two sides), all under autocast off.

Both modes return (v, J) with no gradient, in fp32 (fp64 when x is fp64: the tests' reference JVPs).
"""

from __future__ import annotations

import enum
from contextlib import contextmanager

import torch
from torch import nn

from cdmbench.errors import CdmbenchError


class JvpMode(str, enum.Enum):
    EXACT = "exact"  # torch.func.jvp on the math attention kernel
    FINITE_DIFFERENCE = "finite_difference"  # central difference with step ``fd_step`` (note §1.9)


@contextmanager
def forward_ad_attention():
    """Scope attention to PyTorch's math SDPA kernel, the one with a forward-mode AD formula (note §5)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def velocity_jvp(backbone, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond, dx: torch.Tensor,
                 dsigma: torch.Tensor | float, *, mode: JvpMode = JvpMode.EXACT,
                 fd_step: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, J): the velocity of ``net`` at (x, σ) and its directional derivative along (dx, dσ), both fp32.

    Args:
        backbone: the adapter whose ``velocity(net, x, σ, cond)`` defines v.
        net: teacher, student or fake score (a DDP wrapper is unwrapped).
        x: (B, ...) latents x_σ.  sigma: (B,) in [0, 1].  cond: the prompts' ``Cond`` (the JVP never uses uncond).
        dx: tangent in x, shaped like x.  dsigma: tangent in σ, (B,) or a scalar (1 for d/dσ; not 1000).
        mode: ``JvpMode.EXACT`` (default) or ``JvpMode.FINITE_DIFFERENCE``.
        fd_step: h of the finite difference, in σ units (only with ``finite_difference``).
    """
    mode = JvpMode(mode)
    net = getattr(net, "module", net)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64 in, fp64 out (tests); else fp32
    x = x.to(work)
    sigma = torch.as_tensor(sigma, dtype=work, device=x.device).expand(x.shape[0]).contiguous()
    dsigma = torch.as_tensor(dsigma, dtype=work, device=x.device).expand(x.shape[0]).contiguous()
    dx = dx.to(work)

    def v(x_, s_):
        return backbone.velocity(net, x_, s_, cond).to(work)

    with _no_autocast(x.device):
        if mode is JvpMode.EXACT:
            with forward_ad_attention():
                out, tangent = torch.func.jvp(v, (x, sigma), (dx, dsigma))
            return out.detach(), tangent.detach()
        if not fd_step > 0:
            raise CdmbenchError(f"fd_step must be > 0, got {fd_step}")
        h = fd_step
        v0 = v(x, sigma)
        up_ok = (sigma + h * dsigma <= 1) & (sigma + h * dsigma >= 0)
        dn_ok = (sigma - h * dsigma <= 1) & (sigma - h * dsigma >= 0)
        b = (-1,) + (1,) * (x.dim() - 1)
        s_up = torch.where(up_ok, sigma + h * dsigma, sigma)
        s_dn = torch.where(dn_ok, sigma - h * dsigma, sigma)
        x_up = x + torch.where(up_ok.reshape(b), h, 0.0) * dx
        x_dn = x - torch.where(dn_ok.reshape(b), h, 0.0) * dx
        v_up, v_dn = v(x_up, s_up), v(x_dn, s_dn)
        span = (up_ok.float() + dn_ok.float()) * h  # 2h central, h one-sided (0 would mean no valid side)
        if not bool((span > 0).all()):
            raise CdmbenchError(f"fd_step={h} is too large: neither σ ± h·dσ stays in [0, 1] for some sample")
        return v0, (v_up - v_dn) / span.reshape(b)
