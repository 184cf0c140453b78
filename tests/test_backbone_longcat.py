"""The LongCat-Image adapter on a tiny LongCatImagePipeline loaded from a folder (no hub, CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_pipelines import LONGCAT_RES, TEXT_LEN, perturb_, tiny_longcat_dir  # noqa: F401 (fixture)

from cdmbench.backbones import build_backbone
from cdmbench.backbones.base import BackboneOptions
from cdmbench.sampling import Denoiser, sample_euler

PROMPTS = ["a red circle", 'a sign that says "hi"']
TOKENS = (LONGCAT_RES // 4) ** 2  # VAE ×2, then 2×2 packing


@pytest.fixture(scope="module")
def longcat(tiny_longcat_dir):
    return build_backbone("longcat", BackboneOptions(model=str(tiny_longcat_dir), resolution=LONGCAT_RES,
                                                     max_sequence_length=TEXT_LEN))


def test_contract_packed_latents_and_shared_ids(longcat):
    assert longcat.latent_shape == (TOKENS, 64)
    cond = longcat.encode_prompts(PROMPTS)
    assert cond.batched["embeds"].shape == (2, TEXT_LEN, 32)
    assert cond.shared["txt_ids"].shape == (TEXT_LEN, 3) and cond.shared["txt_ids"].dtype == torch.int64
    assert cond.shared["img_ids"].shape == (TOKENS, 3) and cond.shared["img_ids"].dtype == torch.int64
    assert cond.shared["img_ids"][:, 1:].min() == TEXT_LEN  # image positions start after the text
    x = torch.randn(2, *longcat.latent_shape, generator=torch.Generator().manual_seed(0))
    v = longcat.velocity(longcat.teacher, x, torch.tensor([1.0, 0.2]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.equal(v, longcat.velocity(longcat.teacher, x, torch.tensor([1.0, 0.2]), cond))
    images = longcat.decode(x)
    assert images.shape == (2, 3, LONGCAT_RES, LONGCAT_RES) and images.min() >= 0 and images.max() <= 1
    assert longcat.pipe.text_processor is None  # never rewrites prompts
    block_classes = {type(m).__name__ for m in longcat.teacher.modules()}
    assert set(longcat.fsdp_block_classes) <= block_classes


def test_default_text_length_is_512(tiny_longcat_dir):
    bb = build_backbone("longcat", BackboneOptions(model=str(tiny_longcat_dir), resolution=LONGCAT_RES))
    cond = bb.encode_prompts(["a cat"])
    assert cond.batched["embeds"].shape == (1, 512, 32) and cond.shared["txt_ids"].shape == (512, 3)
    assert bb.latent_shape == (TOKENS, 64)


def test_uncond_is_the_encoded_empty_prompt(longcat):
    empty = longcat.encode_prompts([""])
    un = longcat.uncond(2)
    assert torch.equal(un.batched["embeds"][1], empty.batched["embeds"][0])
    assert empty.batched["embeds"].abs().sum() > 0


def test_dynamic_shift_and_sampling_match_the_pipeline(longcat):
    assert longcat.shift_mu is not None  # the tiny scheduler config says use_dynamic_shifting
    recipe = longcat.inference_recipe()
    for steps in (1, 2, 4):
        s = longcat.schedule(steps)
        noise = torch.randn(1, *longcat.latent_shape, generator=torch.Generator().manual_seed(steps))
        ours = sample_euler(Denoiser(longcat, longcat.teacher, longcat.encode_prompts(PROMPTS[:1])), noise, s.sigmas())
        # the stock pipeline, handed the nominal σ, timestep = t/1000, no CFG
        theirs = longcat.pipe(PROMPTS[0], num_inference_steps=steps, sigmas=list(s.nominal), guidance_scale=1.0,
                              latents=noise, output_type="latent", **recipe["call_kwargs"]).images
        torch.testing.assert_close(longcat.pipe.scheduler.sigmas[:-1].cpu(), torch.tensor(s.effective), rtol=0,
                                   atol=1e-6)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert longcat.schedule(2).effective[1] > 0.5


def test_lora_targets_both_block_kinds(tiny_longcat_dir):
    bb = build_backbone("longcat", BackboneOptions(model=str(tiny_longcat_dir), resolution=LONGCAT_RES,
                                                   max_sequence_length=TEXT_LEN, lora_rank=2))
    net = bb.trainable_copy()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("single_transformer_blocks.") for n in trainable)
    state = bb.net_state_dict(perturb_(net, only="lora_B"))
    x, cond, sigma = torch.randn(1, *bb.latent_shape), bb.encode_prompts(PROMPTS[:1]), torch.tensor([0.6])
    torch.testing.assert_close(bb.velocity(bb.load_net(state), x, sigma, cond), bb.velocity(net, x, sigma, cond))
