"""sCM / rCM and the backbone JVP (shared design/continuous-cm.md §6): JVP against finite differences in fp64, the
exact rectified-flow rewrite of the TrigFlow tangent (value and gradient), the Gaussian case where the consistency
tangent vanishes, warm-up / normalisation properties, rCM's 1:N schedule, and 2-iteration runs on tiny pipelines."""

import copy
import math
import types

import pytest
import torch

from cdmbench.backbones.base import BackboneOptions
from cdmbench.backbones.jvp import JvpMode, velocity_jvp
from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.methods.base import Batch, RunContext
from cdmbench.methods.losses import (TangentNorm, TangentWarmup, consistency_tangent, normalize_tangent, rho,
                                     scm_loss, scm_tangent, scm_tangent_trig, trig_to_sigma)
from cdmbench.pairs import Processes
from cdmbench.run import resolve_config
from cdmbench.sampling import sample_euler
from cdmbench.train import train
from conftest import tiny_overrides
from tiny_pipelines import TEXT_LEN, tiny_longcat_dir, tiny_sd3_dir  # noqa: F401


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------
# JVP vs finite differences (fp64)

def _fp64_sinusoid(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
    """diffusers' get_timestep_embedding with the sinusoid in fp64 (its own is fp32: the σ-FD floor of note §5)."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


def _fp64_adapter():
    """(x, σ) ↦ net(x, timestep = 1000·σ) with σ kept in fp64 (the real adapters pass fp32 timesteps)."""
    def velocity(net, x, s, cond):
        return net(hidden_states=x, timestep=1000 * s, encoder_hidden_states=cond["embeds"],
                   pooled_projections=cond["pooled"], return_dict=False)[0]
    return types.SimpleNamespace(velocity=velocity)


def _central(f, x, s, dx, ds, h):
    return (f(x + h * dx, s + h * ds) - f(x - h * dx, s - h * ds)) / (2 * h)


def _tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))  # away from diffusers' zero-initialised output layers
    return net.double().eval()


def _check_jvp_against_fd(net, x, s, cond, monkeypatch):
    import diffusers.models.embeddings as emb

    monkeypatch.setattr(emb, "get_timestep_embedding", _fp64_sinusoid)
    ad = _fp64_adapter()
    f = lambda a, b: ad.velocity(net, a, b, cond)  # noqa: E731
    dx = torch.randn_like(x)
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    _, jx = velocity_jvp(ad, net, x, s, cond, dx, 0.0)
    _, js = velocity_jvp(ad, net, x, s, cond, torch.zeros_like(x), 1.0)
    assert jx.dtype == torch.float64
    with torch.no_grad():
        assert rel(jx, _central(f, x, s, dx, zero, 1e-5)) < 1e-8
        assert rel(js, _central(f, x, s, torch.zeros_like(x), one, 1e-7)) < 1e-6
    v, j = velocity_jvp(ad, net, x, s, cond, dx, 1.0)  # linear in the tangent
    torch.testing.assert_close(j, jx + js, rtol=1e-10, atol=1e-10)


def test_jvp_matches_central_differences_in_fp64_on_a_tiny_sd3_transformer(monkeypatch):
    net = _tiny_sd3_transformer()
    x, s = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
    cond = {"embeds": torch.randn(2, 5, 16, dtype=torch.float64), "pooled": torch.randn(2, 16, dtype=torch.float64)}
    _check_jvp_against_fd(net, x, s, cond, monkeypatch)


def test_jvp_matches_central_differences_in_fp64_on_the_toy_teacher(toy, monkeypatch):
    net = copy.deepcopy(toy.teacher).double()
    c = toy.encode_prompts(["a small red circle in the top left", "a large blue square in the bottom right"])
    cond = {k: v.double() for k, v in c.batched.items()}
    x, s = torch.randn(2, *toy.latent_shape, dtype=torch.float64), torch.tensor([0.25, 0.7], dtype=torch.float64)
    _check_jvp_against_fd(net, x, s, cond, monkeypatch)


def test_finite_difference_option_agrees_with_the_exact_jvp_on_the_toy_teacher(toy):
    """The explicit fallback at h = 1e-4 in fp32 along the CFG teacher direction (note §1.9, §6: < 1e-2)."""
    torch.manual_seed(1)
    student = toy.trainable_copy()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    cond = toy.encode_prompts(["a small red circle in the top left", "a large green triangle in the middle"])
    x, s = torch.randn(2, *toy.latent_shape), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        v_u, v_c = toy.velocity(toy.teacher, torch.cat([x, x]), torch.cat([s, s]), toy.uncond(2).cat(cond)).chunk(2)
        v_t = v_u + 2.0 * (v_c - v_u)
    v_e, j_e = toy.velocity_jvp(student, x, s, cond, v_t, 1.0, mode=JvpMode.EXACT)
    v_f, j_f = toy.velocity_jvp(student, x, s, cond, v_t, 1.0, mode="finite_difference", fd_step=1e-4)
    torch.testing.assert_close(v_e, v_f)
    assert rel(j_f, j_e) < 1e-2
    assert rel(toy.velocity_jvp(student, x, s, cond, v_t, 1.0, mode="finite_difference", fd_step=5e-3)[1], j_e) > 0.05
    # one-sided at the ends: σ + h > 1 is not evaluated
    _, j_end = toy.velocity_jvp(student, x, torch.tensor([1.0, 0.0]), cond, v_t, 1.0, mode="finite_difference")
    assert torch.isfinite(j_end).all()
    with pytest.raises(CdmbenchError, match="fd_step"):
        toy.velocity_jvp(student, x, s, cond, v_t, 1.0, mode="finite_difference", fd_step=0.0)
    with pytest.raises(ValueError):
        toy.velocity_jvp(student, x, s, cond, v_t, 1.0, mode="central")


def test_jvp_needs_the_math_attention_kernel_and_keeps_the_time_path_in_fp32(toy):
    """The default CPU SDPA kernel has no forward AD; the helper scopes the math kernel to its call, switches
    autocast off (fp32 timestep and time embedding under bf16 autocast) and restores both after."""
    student = toy.trainable_copy()
    cond = toy.encode_prompts(["a small red circle in the top left"])
    x, s = torch.randn(1, *toy.latent_shape), torch.tensor([0.5])
    f = lambda a, b: toy.velocity(student, a, b, cond)  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(f, (x, s), (torch.randn_like(x), torch.ones(1)))
    seen = []
    h1 = student.time_text_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    h2 = student.time_text_embed.timestep_embedder.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        toy.velocity_jvp(student, x, s, cond, torch.randn_like(x), 1.0)
    h1.remove(), h2.remove()
    assert seen == [torch.float32, torch.float32]
    with pytest.raises(NotImplementedError):  # the math kernel was scoped to the call
        torch.func.jvp(f, (x, s), (torch.randn_like(x), torch.ones(1)))


# ------------------------------------------------------------------------------------------------
# The rectified-flow tangent equals the TrigFlow tangent (value and gradient)

class _SmoothNet(torch.nn.Module):
    """A small smooth velocity field v(x, σ) on (B, 2, 3, 3) tensors, fp64."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.3 * torch.randn(18, 18, generator=g, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.randn(18, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(0.1 * torch.randn(18, generator=g, dtype=torch.float64))

    def forward(self, x, s):
        h = x.flatten(1) @ self.w + torch.sin(3 * s)[:, None] * self.a + self.b
        return (torch.tanh(h) + x.flatten(1) * s[:, None]).reshape(x.shape)


@pytest.mark.parametrize("warmup", list(TangentWarmup))
@pytest.mark.parametrize("r", [0.0, 0.37, 1.0])
def test_rectified_flow_tangent_equals_the_trigflow_tangent_value_and_gradient(warmup, r):
    torch.manual_seed(3)
    student, teacher = _SmoothNet(0), _SmoothNet(1)
    x, s = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.tensor([0.05, 0.3, 0.6, 0.97], dtype=torch.float64)
    b = lambda t: t.reshape(-1, 1, 1, 1)  # noqa: E731
    with torch.no_grad():
        v_t = teacher(x, s)
        v_m, J = torch.func.jvp(lambda a, c: student(a, c), (x, s), (v_t, torch.ones_like(s)))
    g_rf = scm_tangent(v_t, v_m, J, x, s, r, warmup)
    # TrigFlow world (σ_d = 1): τ = atan2(σ, 1−σ), x_τ = x_σ/ρ, F(x_τ, τ) = (1−2σ)x_τ + ρ·v(ρx_τ, σ)
    tau = torch.atan2(s, 1 - s)
    x_tau = x / b(rho(s))

    def F(net, xt, t):
        sig, p = torch.sin(t) / (torch.sin(t) + torch.cos(t)), 1 / (torch.sin(t) + torch.cos(t))
        return (1 - 2 * b(sig)) * xt + b(p) * net(b(p) * xt, sig)

    cs = torch.cos(tau) * torch.sin(tau)
    with torch.no_grad():
        F_t = (1 - 2 * b(s)) * x_tau + b(rho(s)) * v_t
        F_m, t_F = torch.func.jvp(lambda a, t: F(student, a, t), (x_tau, tau), (b(cs) * F_t, cs))
    g_trig = scm_tangent_trig(F_m, F_t, x_tau, t_F, tau, r, warmup)
    assert rel(g_rf, g_trig) < 1e-10
    # x̂0 is the same in both worlds: cos τ·x_τ − sin τ·F = x_σ − σ·v
    torch.testing.assert_close(b(torch.cos(tau)) * x_tau - b(torch.sin(tau)) * F_m, x - b(s) * v_m, rtol=1e-13, atol=1e-13)
    if r == 1.0:  # both forms reduce to (1−σ)ρ·D
        torch.testing.assert_close(g_rf, b((1 - s) * rho(s)) * consistency_tangent(v_t, v_m, J, s), rtol=1e-12, atol=1e-12)
    # gradients: the sources' ‖F_θ − F⁻ − ĝ‖² and the v-space loss, and −2ρ·vjp(v_θ, ĝ)
    g_hat = normalize_tangent(g_rf)
    grads = []
    for loss_fn in (lambda: (F(student, x_tau, tau) - F_m - g_hat).square().sum(),
                    lambda: scm_loss(student(x, s), g_hat, s).sum()):
        student.zero_grad()
        loss_fn().backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    student.zero_grad()
    student(x, s).backward(-2 * b(rho(s)) * g_hat)
    for ga, gb, gc in zip(*grads, [p.grad for p in student.parameters()]):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, gc, rtol=1e-12, atol=1e-12)
    assert torch.allclose(scm_loss(student(x, s), g_hat, s), g_hat.square().flatten(1).sum(1))  # value = Σĝ²


# ------------------------------------------------------------------------------------------------
# Exact Gaussian data: the consistency tangent vanishes; the sampler reproduces the data law

MU, STD = 0.7, 0.4


def _gauss_scale(s):
    return torch.sqrt((1 - s) ** 2 * STD ** 2 + s ** 2)


def _exact_f(x, s):
    """x0 ~ N(μ, s²I): along the teacher ODE x_σ = (1−σ)μ + √((1−σ)²s² + σ²)·z, so f(x_σ, σ) = μ + s·z."""
    b = lambda t: t.reshape(-1, *[1] * (x.dim() - 1))  # noqa: E731
    return MU + STD * (x - (1 - b(s)) * MU) / b(_gauss_scale(s))


def _exact_v_teacher(x, s):
    b = lambda t: t.reshape(-1, *[1] * (x.dim() - 1))  # noqa: E731
    z = (x - (1 - b(s)) * MU) / b(_gauss_scale(s))
    return -MU + b((s - (1 - s) * STD ** 2) / _gauss_scale(s)) * z


def test_the_consistency_tangent_vanishes_for_the_exact_consistency_function_on_gaussian_data():
    torch.manual_seed(4)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    v_student = lambda a, c: (a - _exact_f(a, c)) / c.reshape(-1, 1, 1, 1)  # noqa: E731  f = x − σ·v
    v_t = _exact_v_teacher(x, s)
    v_m, J = torch.func.jvp(v_student, (x, s), (v_t, torch.ones_like(s)))
    D = consistency_tangent(v_t, v_m, J, s)
    assert D.abs().max() < 1e-12 and v_m.abs().max() > 0.1
    assert scm_tangent(v_t, v_m, J, x, s, 1.0).abs().max() < 1e-12
    # a flipped sign (D = (v_T − v⁻) + σJ) does not vanish: the check has teeth
    assert (v_t - v_m + s.reshape(-1, 1, 1, 1) * J).abs().max() > 0.1


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_sampling_of_the_exact_f_reproduces_the_gaussian(steps, toy):
    method = METHODS.get("scm")(toy, resolve_config("scm", "toy", {}).method_config, training=False)
    sig = method.schedule(steps).sigmas()
    assert sig[0] == 1.0 and sig[-1] == 0.0 and sig.numel() == steps + 1
    gen = torch.Generator().manual_seed(steps)
    rng = types.SimpleNamespace(randn_like=lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype))
    noise = torch.randn(40000, 4, generator=gen, dtype=torch.float64)
    den = lambda x, s: (x - _exact_f(x, s.expand(x.shape[0]).double())) / s  # noqa: E731
    out = sample_euler(den, noise, sig.double(), stochastic=True, rng=rng)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - STD) < 0.01


# ------------------------------------------------------------------------------------------------
# Warm-up and normalisation

def test_warmup_start_is_plain_velocity_regression_and_normalisation_bounds_the_tangent():
    torch.manual_seed(5)
    v, J, x = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    s = torch.tensor([0.2, 0.5, 0.8])
    assert scm_tangent(v, v, J, x, s, 0.0).abs().max() == 0  # student = teacher, r = 0: g = 0 exactly
    g = scm_tangent(v + torch.randn_like(v), v, J, x, s, 0.6)
    gh = normalize_tangent(g)
    assert (gh.flatten(1).norm(dim=1) < 1).all()
    assert rel(normalize_tangent(100 * g), normalize_tangent(10 * g)) < 0.01  # scale-free once ‖g‖ ≫ c
    d = g[0].numel()
    torch.testing.assert_close(normalize_tangent(g, 0.1, TangentNorm.RMS).flatten(1).norm(dim=1),
                               g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) / d ** 0.5 + 0.1))
    with pytest.raises(CdmbenchError, match="tangent_norm: must be one of l2, rms"):
        resolve_config("scm", "toy", {"tangent_norm": "max"})
    assert abs(float(trig_to_sigma(1.0)) - 0.6090) < 1e-4 and abs(float(trig_to_sigma(1.5)) - 0.9338) < 1e-4


# ------------------------------------------------------------------------------------------------
# rCM schedule and players

def test_rcm_phase_sequence_simulation_counts_and_fake_score_isolation(toy, tmp_path):
    cfg = resolve_config("rcm", "toy", tiny_overrides("rcm", tangent_warmup=3, update_ratio=3,
                                                      max_simulation_steps=2)).method_config
    method = METHODS.get("rcm")(toy, cfg)
    phases = [method.optimizers_for(k)[0] for k in range(12)]
    assert phases == ["student"] * 4 + ["fake_score"] * 2 + ["student"] + ["fake_score"] * 2 + ["student"] + ["fake_score"] * 2
    # student counter 0,1,2,... and fake counter 0,1,2,... each → (counter mod 2) + 1 calls
    assert [method.simulation_calls(k) for k in (3, 6, 9)] == [1, 2, 1]
    assert [method.simulation_calls(k) for k in (4, 5, 7, 8)] == [1, 2, 1, 2]
    method.prepare(RunContext(tmp_path, Processes()))
    prompts = toy.train_prompts(2, torch.Generator().manual_seed(0))
    batch = Batch(prompts, toy.encode_prompts(prompts), shared_seed=0)
    for step, want in ((0, {"scm", "student"}), (3, {"scm", "dmd", "student"}), (4, {"fake_score"})):
        for net in method.nets.values():
            net.zero_grad(set_to_none=True)
        out = method.train_step(batch, step, lambda n, loss: loss.backward())
        assert set(out.losses) == want
        stepped = method.optimizers_for(step)[0]
        other = "fake_score" if stepped == "student" else "student"
        assert all(p.grad is None for p in method.nets[other].parameters()), (step, other)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.nets[stepped].parameters())
        assert all(p.grad is None for p in toy.teacher.parameters())


# ------------------------------------------------------------------------------------------------
# Two iterations on tiny real pipelines (the JVP through diffusers' transformers via the adapters)

@pytest.mark.parametrize("name,extra", [("scm", {}), ("scm", {"jvp": "finite_difference"}), ("rcm", {})])
def test_two_iterations_on_a_tiny_sd3_pipeline(name, extra, tiny_sd3_dir, tmp_path):  # noqa: F811
    (tmp_path / "p.txt").write_text("a red apple on a table\na blue car in the rain\n")
    options = BackboneOptions(model=str(tiny_sd3_dir), resolution=32, max_sequence_length=TEXT_LEN)
    cfg = resolve_config(name, "sd3", {**tiny_overrides(name, steps=2, **extra), "train.mixed_precision": "no",
                                       "backbone.gradient_checkpointing": "false", "train.prompts": str(tmp_path / "p.txt")},
                         options)
    ckpt = train(cfg, tmp_path / "run", progress=False)
    assert ckpt.name == "step_0000002"
    import pandas as pd

    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    want = {"loss/scm", "health/tangent_D_norm", "health/tangent_g_norm"} | ({"loss/dmd", "loss/fake_score"} if name == "rcm" else set())
    assert want <= set(log.key), set(log.key)
    assert log[log.key.str.startswith("loss/")].value.map(float).map(math.isfinite).all()
    assert (log[log.key == "health/tangent_D_norm"].value.map(float) > 0).all()


def test_jvp_through_the_tiny_longcat_transformer(tiny_longcat_dir):  # noqa: F811
    """LongCat's adapter (fp32-timestep pre-hook, RoPE ids) under torch.func.jvp, against a central difference."""
    from cdmbench.backbones import build_backbone

    bb = build_backbone("longcat", BackboneOptions(model=str(tiny_longcat_dir), resolution=32,
                                                   max_sequence_length=TEXT_LEN))
    net = bb.trainable_copy()
    cond = bb.encode_prompts(["a red apple", "a blue car"])
    x, s, dx = torch.randn(2, *bb.latent_shape), torch.tensor([0.3, 0.7]), torch.randn(2, *bb.latent_shape)
    v, j = bb.velocity_jvp(net, x, s, cond, dx, 0.0)
    with torch.no_grad():
        fd = (bb.velocity(net, x + 1e-3 * dx, s, cond) - bb.velocity(net, x - 1e-3 * dx, s, cond)) / 2e-3
    assert rel(j, fd) < 1e-3
    _, js = bb.velocity_jvp(net, x, s, cond, torch.zeros_like(x), 1.0)
    assert torch.isfinite(js).all() and js.abs().sum() > 0  # the σ path reaches the time embedding
