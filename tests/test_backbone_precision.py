"""Every backbone in bfloat16: time embeddings get fp32 1000·σ (diffusers pipelines pass fp32 timesteps;
bf16 would round 1000·σ to steps of 4 near σ = 1); and ``encode_images`` gives latents of ``latent_shape``."""

import pytest
import torch

from cdmbench.backbones import BACKBONES, build_backbone
from cdmbench.backbones.base import BackboneOptions
from tiny_pipelines import SD3_RES, LONGCAT_RES, TEXT_LEN, tiny_longcat_dir, tiny_sd3_dir  # noqa: F401


@pytest.fixture(scope="module", params=BACKBONES.names())
def bf16_backbone(request):
    name = request.param
    if name == "toy":
        return build_backbone("toy", BackboneOptions(dtype="bfloat16"))
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    res = {"sd3": SD3_RES, "longcat": LONGCAT_RES}[name]
    return build_backbone(name, BackboneOptions(model=str(folder), resolution=res, max_sequence_length=TEXT_LEN,
                                                dtype="bfloat16"))


def test_time_embeddings_get_fp32_sigma_in_a_bf16_network(bf16_backbone, monkeypatch):
    import diffusers.models.embeddings as emb

    seen = []
    real = emb.get_timestep_embedding

    def record(timesteps, *a, **k):
        seen.append(timesteps.detach().clone())
        return real(timesteps, *a, **k)

    monkeypatch.setattr(emb, "get_timestep_embedding", record)
    b = bf16_backbone
    sigma = torch.tensor([0.9013, 0.5007], dtype=torch.float32)  # not representable in bf16
    cond = b.encode_prompts(["a red circle", "a blue square"])
    for net in (b.teacher, b.trainable_copy().to(torch.bfloat16)):
        seen.clear()
        b.velocity(net, torch.randn(2, *b.latent_shape), sigma, cond)
        assert seen, "no time embedding was computed"
        t = seen[0]
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, 1000 * sigma, rtol=0, atol=1e-4)  # bf16 would be off by ~0.8 and ~2


def test_encode_images_gives_latents(bf16_backbone):
    b = bf16_backbone
    r = b.image_resolution
    z = b.encode_images(torch.rand(2, 3, r, r))
    assert z.shape == (2, *b.latent_shape) and z.dtype == torch.float32 and torch.isfinite(z).all()
    z2 = b.encode_images(torch.rand(2, 3, r, r))
    assert not torch.equal(z, z2)
