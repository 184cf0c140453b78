"""Fixes that a re-derivation against the papers / the official CDM code would catch (issue #12)."""

import pytest
import torch

from cdmbench.methods import METHODS


def _rollout(N: int, B: int, shape):
    """A rollout whose X0[k] is the constant k (so an index reads back from the values)."""
    from cdmbench.methods.cdm import Rollout

    X0 = torch.stack([torch.full((B, *shape), float(k)) for k in range(N + 1)])
    return Rollout(X=torch.randn(N + 1, B, *shape), X0=X0, V=torch.randn(N, B, *shape),
                   sigmas=torch.linspace(1, 0, N + 1))


def test_cdm_trajectory_eps_last_with_x0_next_uses_the_shared_index(toy, monkeypatch):
    """student_xt_mode=trajectory_eps_last fixes the *student* point at i = N−1; the teacher's x0_next base is
    X0[idx+1] at the shared index (byliutao/cdm scripts/train.py, 'Step A2': make_indices(shared_...))."""
    from cdmbench.config import apply_overrides

    M = METHODS.get("cdm")
    cfg = apply_overrides(M.Config(), {"student_xt_mode": "trajectory_eps_last", "teacher_x0_base": "x0_next"})
    m = M(toy, cfg)
    seen = {}

    def spy(x0_hat, sig_i, cond, method, x0_base=None, s_t=None, x_t=None):
        seen["base"], seen["sig_i"] = x0_base, sig_i
        return torch.zeros(())

    monkeypatch.setattr(m, "dm_loss", spy)
    N, idx = 4, torch.tensor([0, 2])
    m.cdm_loss(_rollout(N, 2, toy.latent_shape), idx, toy.encode_prompts(["a red circle", "a blue square"]))
    assert seen["base"][:, 0, 0, 0].tolist() == [1.0, 3.0]  # X0[idx+1], not X0[N] = 4
    torch.testing.assert_close(seen["sig_i"], torch.linspace(1, 0, N + 1)[[N - 1, N - 1]])  # student at N−1
