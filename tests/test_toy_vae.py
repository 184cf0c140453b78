"""The toy VAE and the latent toy adapter: SD3's latent convention, round trips on real procedural images,
and the training commands' file format (on tiny networks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cdmbench.backbones.diffusers import DiffusersBackbone
from cdmbench.backbones.toy import ToyBackbone, load_toy_weights
from cdmbench.backbones.base import BackboneOptions
from cdmbench.toy import shapes
from cdmbench.toy.models import ToyArch
from cdmbench.toy.vae import ToyVAEArch, load_vae_file, train_vae

# Round-trip bound on real procedural images (mean |decode(encode(x)) − x| over pixels in [0, 1]); the
# shipped VAE measures 0.0157 on these 96 images (99th percentile 0.097: anti-aliased edges and corners).
ROUND_TRIP_BOUND = 0.02


@pytest.fixture(scope="module")
def toy() -> ToyBackbone:
    return ToyBackbone()


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return shapes.real_images_for(shapes.eval_prompts(), [7])  # 96 images, every attribute combination


def test_shipped_teacher_lives_in_the_vae_latent_space(toy):
    assert toy.vae is not None
    c, h, w = toy.latent_shape
    assert (c, h * 4, w * 4) == (toy.vae.config.latent_channels, shapes.RESOLUTION, shapes.RESOLUTION)
    assert toy.describe()["vae"]["scaling_factor"] == toy.vae.config.scaling_factor


def test_decode_is_the_sd3_adapters_vae_decode(toy):
    """The same function body as SD3's: vae.decode(latents / scaling_factor + shift_factor), to [0, 1]."""
    lat = torch.randn(4, *toy.latent_shape, generator=torch.Generator().manual_seed(0))
    sd3_style = DiffusersBackbone._vae_decode(SimpleNamespace(pipe=SimpleNamespace(vae=toy.vae)), lat)
    torch.testing.assert_close(toy.decode(lat), sd3_style)
    by_hand = toy.vae.decode(lat / toy.vae.config.scaling_factor + toy.vae.config.shift_factor).sample
    torch.testing.assert_close(toy.decode(lat), ((by_hand + 1) / 2).clamp(0, 1))


def test_encode_is_the_inverse_convention_with_factors_from_the_data(toy, real):
    cfg = toy.vae.config
    lat = toy.encode_images(real)
    sd3_style = DiffusersBackbone._vae_encode(SimpleNamespace(pipe=SimpleNamespace(vae=toy.vae), device=toy.device), real)
    torch.testing.assert_close(lat, sd3_style)
    z = toy.vae.encode(real * 2 - 1).latent_dist.mean
    torch.testing.assert_close(lat, (z - cfg.shift_factor) * cfg.scaling_factor)
    # the factors were computed from real images: their latents are centred with unit spread
    assert abs(float(lat.mean())) < 0.15 and 0.8 < float(lat.std()) < 1.25, (float(lat.mean()), float(lat.std()))


def test_round_trip_error_on_real_images_is_small(toy, real):
    with torch.no_grad():
        err = (toy.decode(toy.encode_images(real)) - real).abs()
    assert float(err.mean()) < ROUND_TRIP_BOUND, float(err.mean())


def test_decode_passes_gradients_to_the_latents(toy):
    """DMD's regression distance is taken on decoded images and trains the student through them."""
    lat = torch.randn(2, *toy.latent_shape, requires_grad=True)
    toy.decode(lat).sum().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0


def test_real_batch_is_latents_with_matching_captions(toy):
    lat, caps = toy.real_batch(3, torch.Generator().manual_seed(1))
    assert lat.shape == (3, *toy.latent_shape) and len(caps) == 3
    assert all(len(shapes.parse_caption(c)) == 4 for c in caps)


def test_train_vae_then_teacher_write_a_loadable_reproducible_backbone(tmp_path):
    from cdmbench.toy.train_teacher import TEACHER_VERSION, train_teacher

    arch = ToyVAEArch(latent_channels=2, block_out_channels=(4, 8, 8), norm_num_groups=4)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for f in (a, b):
        train_vae(f, steps=2, batch_size=4, arch=arch, factor_images=16, progress=False)
    (va, ra), (vb, rb) = load_vae_file(a), load_vae_file(b)
    assert ra["scaling_factor"] == rb["scaling_factor"] and ra["shift_factor"] == rb["shift_factor"]
    assert va.config.scaling_factor == ra["scaling_factor"] and va.config.shift_factor == ra["shift_factor"]
    for k, v in va.state_dict().items():
        torch.testing.assert_close(v, vb.state_dict()[k], rtol=0, atol=0)

    teacher = tmp_path / "teacher.safetensors"
    record = train_teacher(teacher, a, steps=2, batch_size=4, progress=False,
                           arch=ToyArch(text_width=16, heads=2, head_dim=8, layers=1))
    assert record["version"] == TEACHER_VERSION and record["vae"]["scaling_factor"] == ra["scaling_factor"]
    bb = ToyBackbone(BackboneOptions(model=str(teacher)))
    assert bb.latent_shape == (2, 8, 8)
    x = torch.randn(2, *bb.latent_shape)
    v = bb.velocity(bb.teacher, x, torch.tensor([0.9, 0.1]), bb.encode_prompts(["a red circle", ""]))
    assert v.shape == x.shape and bb.decode(x).shape == (2, 3, 32, 32)
    # a warm start loads every tensor of matching shape and names the rest
    again = train_teacher(tmp_path / "warm.safetensors", a, steps=1, batch_size=4, progress=False, init=teacher,
                          arch=ToyArch(text_width=16, heads=2, head_dim=8, layers=1))
    assert again["init"]["version"] == TEACHER_VERSION and again["init_fresh"] == []
    assert load_toy_weights(tmp_path / "warm.safetensors").vae is not None
