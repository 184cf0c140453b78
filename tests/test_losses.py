"""Each loss formula against hand-derived values on small seeded tensors."""

import pytest
import torch

from cdmbench.methods.losses import (dmd_loss, euler_step, flow_matching_loss, normalized_x0_matching_loss,
                                     pseudo_huber_loss, renoise, to_eps, to_x0)
from cdmbench.methods.schedules import SigmaMethod, random_rollout_nominal, sample_sigmas


def test_x0_eps_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    s = torch.tensor([0.1, 0.4, 0.7, 1.0])
    x = renoise(x0, s, eps)
    v = eps - x0
    torch.testing.assert_close(to_x0(x, s, v), x0)
    torch.testing.assert_close(to_eps(x, s, v), eps)


def test_cdm_extrapolated_latent_is_renoised_student_prediction():
    """x_s' = X[i] + (σ' − σ_i)·V[i] equals (1−σ')·x̂0 + σ'·ε̂ (cdm.md §5.3 step 2)."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    s_i, s_p = torch.rand(5, generator=g) * 0.9 + 0.05, torch.rand(5, generator=g)
    expected = renoise(to_x0(x, s_i, v), s_p, to_eps(x, s_i, v))
    torch.testing.assert_close(euler_step(x, s_i, s_p, v), expected, atol=1e-6, rtol=1e-6)


def test_normalized_loss_gradient_and_clamp():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 2, 2, generator=g, requires_grad=True)
    delta = torch.randn(3, 2, 2, 2, generator=g)
    ref = x0.detach() + 0.01 * torch.randn(3, 2, 2, 2, generator=g)  # |r − x̂0| ≈ 0.008 < 0.1
    ref[0] = x0[0].detach() + 2.0  # sample 0: normaliser 2.0, clamp does not bind
    loss, n = normalized_x0_matching_loss(x0, delta, ref, clamp_min=0.1)
    assert n[0].item() == pytest.approx(2.0, rel=1e-6)
    assert n[1].item() == pytest.approx(0.1) and n[2].item() == pytest.approx(0.1)  # the clamp binds at 0.1
    loss.backward()
    D = x0[0].numel()
    expected = -(2.0 / (3 * D)) * delta / n.reshape(-1, 1, 1, 1)  # mean_b mean_D → 1/(B·D)
    torch.testing.assert_close(x0.grad, expected)
    # the value is the squared step size: mean (Δ/n)²
    assert loss.item() == pytest.approx((delta / n.reshape(-1, 1, 1, 1)).square().mean().item(), rel=1e-5)


def test_matching_gradients_vanish_when_real_and_fake_agree():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    real = torch.randn(2, 3, 4, 4, generator=g)
    loss, _ = normalized_x0_matching_loss(x, real - real, real)
    loss.backward()
    assert x.grad.abs().max().item() == 0.0
    x.grad = None
    loss, _ = dmd_loss(x, real, real.clone())
    loss.backward()
    assert x.grad.abs().max().item() == 0.0


def test_dmd_gradient_is_normalised_score_difference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 2, 2, generator=g, requires_grad=True)
    real, fake = torch.randn(2, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    loss, n = dmd_loss(x, real, fake)
    loss.backward()
    n_ref = (x.detach() - real).abs().flatten(1).mean(1)
    torch.testing.assert_close(n, n_ref)
    grad = (fake - real) / n_ref.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x.grad, grad / x.numel())  # 0.5·mean((x − sg(x − g))²)


def test_flow_matching_and_pseudo_huber_values():
    x0, eps = torch.zeros(1, 2), torch.ones(1, 2)
    assert flow_matching_loss(torch.ones(1, 2), x0, eps).item() == 0.0
    assert flow_matching_loss(torch.zeros(1, 2), x0, eps).item() == 1.0
    c = 1e-3
    val = pseudo_huber_loss(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 0.0]), c).item()
    assert val == pytest.approx(((9 + c * c) ** 0.5 - c) / 2, rel=1e-6)


def test_sample_sigmas_clamp_and_cap():
    g = torch.Generator().manual_seed(5)
    s = sample_sigmas(10000, SigmaMethod.UNIFORM, generator=g)
    assert s.min().item() == pytest.approx(0.02) and s.max().item() == pytest.approx(0.98)
    assert 0.015 < (s == 0.02).float().mean().item() < 0.03  # the clamp's point mass
    cap = torch.full((10000,), 0.5)
    s = sample_sigmas(10000, SigmaMethod.UNIFORM_CAPPED, upper_bound=cap, generator=g)
    assert s.max().item() <= 0.5
    s = sample_sigmas(100, SigmaMethod.UNIFORM, upper_bound=cap[:100], generator=g)  # ignored, as shipped
    assert s.max().item() > 0.5
    with pytest.raises(ValueError):
        sample_sigmas(4, SigmaMethod.UNIFORM_CAPPED)


def test_random_rollout_schedule():
    import random

    for seed in range(50):
        nominal = random_rollout_nominal(random.Random(seed), 28, 0.25, 0.95)
        assert 1 <= len(nominal) <= 28 and nominal[0] == 1.0
        assert all(0.25 <= s <= 0.95 for s in nominal[1:])
        assert nominal[1:] == sorted(nominal[1:], reverse=True)
    # the length comes from the shared RNG alone: same on every process whatever the inner RNG
    a = random_rollout_nominal(random.Random(7), inner_rng=random.Random(1))
    b = random_rollout_nominal(random.Random(7), inner_rng=random.Random(2))
    assert len(a) == len(b) and a != b
