"""Backward simulation and the distribution-matching terms shared by CDM and Decoupled DMD.

Helpers over a method (its ``v``, ``teacher``, ``backbone`` and config fields ``sigma_min``, ``sigma_max``,
``guidance``, ``norm_clip_min``, ``ca_sigma_method``, ``fake_x0_source``, ``fake_sigma_method``), so each of
the two method files reads alone and neither inherits from the other. Spec: shared design/cdm.md §2
(rollout), §4 (fake score), §5.1–5.2 (CA and DM terms); baselines.md A2 (Decoupled DMD uses the same terms).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from cdmbench.methods.losses import euler_step, flow_matching_loss, normalized_x0_matching_loss, renoise, to_x0
from cdmbench.methods.schedules import SigmaMethod, sample_sigmas
from cdmbench.sampling import make_schedule


class RolloutMode(str, enum.Enum):
    ODE = "ode"  # Euler ODE: re-noise with the model's own implied noise (shipped)
    SDE = "sde"  # x̂0 re-noised with fresh noise


class X0Source(str, enum.Enum):
    X0_NEXT = "x0_next"  # X0[i+1]: the student's x̂0 at the sampled step i
    X0_CURRENT = "x0_current"  # X0[i] (pure noise at i = 0; cdm.md §11.9)
    X0_FINAL = "x0_final"  # X[N]: the final rollout sample


@dataclass
class Rollout:
    """Backward simulation record (cdm.md §2): X (N+1,B,...), X0 (N+1,B,...) with X0[0] = X[0],
    V (N,B,...), effective σ (N+1,) ending at 0."""

    X: torch.Tensor
    X0: torch.Tensor
    V: torch.Tensor
    sigmas: torch.Tensor


def draw_sigmas(method, n: int, how: SigmaMethod, upper_bound=None) -> torch.Tensor:
    """n training σ by ``how``, clamped to the config's [sigma_min, sigma_max] (cdm.md §3)."""
    c = method.config
    ub = None if upper_bound is None else upper_bound.detach().float().cpu()
    return sample_sigmas(n, how, sigma_min=c.sigma_min, sigma_max=c.sigma_max, upper_bound=ub,
                         device=method.backbone.device)


@torch.no_grad()
def backward_simulation(method, cond, nominal: list[float], batch_size: int, mode: RolloutMode) -> Rollout:
    """Roll the student out on the backbone-shifted ``nominal`` grid from fresh noise (cdm.md §2), in eval mode."""
    backbone = method.backbone
    sched = make_schedule(nominal, backbone.shift_sigmas)
    sig = sched.sigmas(backbone.device)
    x = torch.randn(batch_size, *backbone.latent_shape, device=backbone.device)
    X, X0, V = [x], [x], []
    student = method.nets["student"]
    was_training = student.training
    student.eval()
    for k in range(sched.steps):
        s = sig[k].expand(batch_size)
        v = method.v("student", x, s, cond)
        x0 = to_x0(x, s, v)
        if mode is RolloutMode.SDE and sig[k + 1] > 0:
            x = renoise(x0, sig[k + 1].expand(batch_size), torch.randn_like(x))
        else:
            x = euler_step(x, s, sig[k + 1].expand(batch_size), v)
        X.append(x), X0.append(x0), V.append(v)
    student.train(was_training)
    return Rollout(torch.stack(X), torch.stack(X0), torch.stack(V), sig)


def fake_score_step(method, ro: Rollout, idx, cond, update) -> torch.Tensor:
    """Fake score φ: denoising loss on the student's x̂0 at the sampled steps, one update (cdm.md §4)."""
    c, B, N = method.config, idx.shape[0], ro.V.shape[0]
    ar = torch.arange(B, device=idx.device)
    x0_ft = {X0Source.X0_NEXT: ro.X0[idx + 1, ar], X0Source.X0_CURRENT: ro.X0[idx, ar],
             X0Source.X0_FINAL: ro.X[N]}[c.fake_x0_source]
    s = draw_sigmas(method, B, c.fake_sigma_method)
    z = torch.randn_like(x0_ft)
    loss = flow_matching_loss(method.v("fake_score", renoise(x0_ft, s, z), s, cond), x0_ft, z)
    update("fake_score", loss)
    return loss.detach()


def merge_fake_score(method, m: float) -> None:
    """φ ← m·φ + (1−m)·θ_student after a fake-score step (cdm.md §4 step 5); m = 1 disables."""
    if m < 1.0:
        with torch.no_grad():
            torch._foreach_lerp_(list(_module(method.nets["fake_score"]).parameters()),
                                 [p.detach() for p in _module(method.nets["student"]).parameters()], 1 - m)


def ca_loss(method, x0_hat, sig_i, cond):
    """L_CA (cdm.md §5.1): Δ = g·(x0_c − x0_u) at σ_t ~ U(0, σ_i), r = x0_c."""
    c, B = method.config, x0_hat.shape[0]
    s_t = draw_sigmas(method, B, c.ca_sigma_method, upper_bound=sig_i)
    x_t = renoise(x0_hat.detach(), s_t, torch.randn_like(x0_hat))
    with torch.no_grad():
        v_u, v_c = method.teacher_cfg(x_t, s_t, cond)
        x0_c, x0_u = to_x0(x_t, s_t, v_c), to_x0(x_t, s_t, v_u)
    return normalized_x0_matching_loss(x0_hat, c.guidance * (x0_c - x0_u), x0_c, c.norm_clip_min)


def dm_loss(method, x0_hat, sig_i, cond, how: SigmaMethod, x0_base=None, s_t=None, x_t=None):
    """L_DM (cdm.md §5.2) / the matching step of L_CDM: Δ = x0_real − x0_fake (no CFG), r = x0_real."""
    B = x0_hat.shape[0]
    base = x0_hat.detach() if x0_base is None else x0_base
    if x_t is None:
        s_t = draw_sigmas(method, B, how, upper_bound=sig_i) if s_t is None else s_t
        x_t = renoise(base, s_t, torch.randn_like(base))
    with torch.no_grad():
        x0_real = to_x0(x_t, s_t, method.v(method.teacher, x_t, s_t, cond))
        x0_fake = to_x0(x_t, s_t, method.v("fake_score", x_t, s_t, cond))
    return normalized_x0_matching_loss(x0_hat, x0_real - x0_fake, x0_real, method.config.norm_clip_min)


def _module(net):
    return getattr(net, "module", net)
