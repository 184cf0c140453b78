"""The SD3 adapter on a tiny StableDiffusion3Pipeline loaded from a folder (no hub, CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys

import pytest
import torch
from tiny_pipelines import SD3_RES, TEXT_LEN, perturb_, tiny_sd3_dir, with_scheduler  # noqa: F401 (fixture)

from cdmbench.backbones import BACKBONES, build_backbone
from cdmbench.backbones.base import BackboneOptions
from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.sampling import Denoiser, sample_euler

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir):
    return build_backbone("sd3", BackboneOptions(model=str(tiny_sd3_dir), max_sequence_length=TEXT_LEN))


@pytest.fixture(scope="module")
def sd3_lora(tiny_sd3_dir):
    return build_backbone("sd3", BackboneOptions(model=str(tiny_sd3_dir), max_sequence_length=TEXT_LEN,
                                                 lora_rank=4, lora_alpha=8))


def test_import_is_lazy():
    code = ("import sys, cdmbench.backbones as b; assert {'sd3', 'longcat'} <= set(b.BACKBONES.names()); "
            "assert 'diffusers' not in sys.modules, 'diffusers imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_contract_shapes_and_frozen_parts(sd3):
    assert sd3.latent_shape == (4, SD3_RES // 2, SD3_RES // 2)
    cond = sd3.encode_prompts(PROMPTS)
    assert cond.batched["embeds"].shape == (2, 77 + TEXT_LEN, 32)
    assert cond.batched["pooled"].shape == (2, 32)
    x = torch.randn(2, *sd3.latent_shape, generator=torch.Generator().manual_seed(0))
    v = sd3.velocity(sd3.teacher, x, torch.tensor([1.0, 0.3]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.equal(v, sd3.velocity(sd3.teacher, x, torch.tensor([1.0, 0.3]), cond))  # deterministic
    images = sd3.decode(x)
    assert images.shape == (2, 3, SD3_RES, SD3_RES) and images.min() >= 0 and images.max() <= 1
    for component in sd3.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training and not any(p.requires_grad for p in component.parameters())
    assert sd3.describe()["model"] == sd3.options.model


def test_default_text_length_is_256(tiny_sd3_dir):
    bb = build_backbone("sd3", BackboneOptions(model=str(tiny_sd3_dir)))
    assert bb.encode_prompts(["a cat"]).batched["embeds"].shape == (1, 77 + 256, 32)


def test_uncond_is_the_encoded_empty_prompt_and_encoding_is_cached(sd3):
    empty = sd3.encode_prompts([""])
    un = sd3.uncond(3)
    assert un.batch_size == 3
    for k in ("embeds", "pooled"):
        assert torch.equal(un.batched[k][2], empty.batched[k][0])
        assert empty.batched[k].abs().sum() > 0  # a real encoding, not zeros
    first = sd3.encode_prompts(PROMPTS)
    assert sd3.encode_prompts(list(PROMPTS)) is first  # cache hit for the same batch
    fresh = sd3._encode(PROMPTS)
    assert torch.equal(fresh.batched["embeds"], first.batched["embeds"])


def test_static_shift_matches_diffusers(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(sd3.pipe.scheduler.config)
    for steps in (1, 2, 4):
        s = sd3.schedule(steps)
        sched.set_timesteps(sigmas=list(s.nominal))
        assert sched.sigmas[-1] == 0
        torch.testing.assert_close(sched.sigmas[:-1], torch.tensor(s.effective), rtol=0, atol=1e-6)
    s = sd3.schedule(4)
    assert s.nominal == (1.0, 0.75, 0.5, 0.25)
    assert s.effective == pytest.approx((1.0, 0.9, 0.75, 0.5))  # cdm.md §1.1, S = 3
    assert sd3.shift == 3.0 and sd3.shift_mu is None


def test_dynamic_shift_matches_the_pipeline(tiny_sd3_dir, tmp_path):
    folder = with_scheduler(tiny_sd3_dir, tmp_path / "dyn", use_dynamic_shifting=True, base_image_seq_len=16,
                            max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    bb = build_backbone("sd3", BackboneOptions(model=str(folder), max_sequence_length=TEXT_LEN))
    assert bb.shift_mu is not None
    s = bb.schedule(4)
    # what the stock pipeline runs when handed the nominal list (it computes μ itself)
    bb.pipe(PROMPTS[0], num_inference_steps=4, sigmas=list(s.nominal), guidance_scale=1.0, output_type="latent",
            **bb.inference_recipe()["call_kwargs"])
    torch.testing.assert_close(bb.pipe.scheduler.sigmas[:-1].cpu(), torch.tensor(s.effective), rtol=0, atol=1e-6)
    assert s.effective[1] > s.nominal[1]  # it does shift


def test_unmodelled_scheduler_options_fail_loudly(tiny_sd3_dir, tmp_path):
    folder = with_scheduler(tiny_sd3_dir, tmp_path / "karras", use_karras_sigmas=True)
    with pytest.raises(CdmbenchError, match="use_karras_sigmas"):
        build_backbone("sd3", BackboneOptions(model=str(folder)))


def test_teacher_sampling_matches_the_pipeline(sd3):
    s = sd3.schedule(2)
    noise = torch.randn(1, *sd3.latent_shape, generator=torch.Generator().manual_seed(3))
    ours = sample_euler(Denoiser(sd3, sd3.teacher, sd3.encode_prompts(PROMPTS[:1])), noise, s.sigmas())
    theirs = sd3.pipe(PROMPTS[0], num_inference_steps=2, sigmas=list(s.nominal), guidance_scale=1.0, latents=noise,
                      output_type="latent", **sd3.inference_recipe()["call_kwargs"]).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_full_finetune_copy(sd3):
    net = sd3.trainable_copy()
    assert net is not sd3.teacher and net.training
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    perturb_(net)
    state = sd3.net_state_dict(net)
    assert set(state) == set(sd3.teacher.state_dict())
    loaded = sd3.load_net(state)
    x, cond = torch.randn(1, *sd3.latent_shape), sd3.encode_prompts(PROMPTS[:1])
    sigma = torch.tensor([0.7])
    torch.testing.assert_close(sd3.velocity(loaded, x, sigma, cond), sd3.velocity(net, x, sigma, cond))
    with pytest.raises(CdmbenchError, match="do not match"):
        sd3.load_net({k: v for k, v in state.items() if "proj_out" not in k})


def test_lora_trains_only_adapters_and_round_trips_strictly(sd3_lora):
    bb = sd3_lora
    net = bb.trainable_copy()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.endswith("attn.add_k_proj.lora_A.default.weight") for n in trainable)
    teacher_before = {k: v.clone() for k, v in bb.teacher.state_dict().items()}
    x, cond, sigma = torch.randn(2, *bb.latent_shape), bb.encode_prompts(PROMPTS), torch.tensor([0.9, 0.4])
    v0 = bb.velocity(bb.teacher, x, sigma, cond)
    torch.testing.assert_close(bb.velocity(net, x, sigma, cond), v0)  # lora_B = 0 at init: student = teacher
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    bb.velocity(net, x, sigma, cond).square().mean().backward()
    opt.step()
    assert all(torch.equal(v, bb.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not torch.allclose(bb.velocity(net, x, sigma, cond), v0)

    state = bb.net_state_dict(net)
    assert state and all("lora_" in k for k in state) and not any(".default." in k for k in state)
    loaded = bb.load_net(state)
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(bb.velocity(loaded, x, sigma, cond), bb.velocity(net, x, sigma, cond))
    with pytest.raises(CdmbenchError, match="missing"):
        bb.load_net({k: v for i, (k, v) in enumerate(state.items()) if i})
    with pytest.raises(CdmbenchError, match="unexpected"):
        bb.load_net({**state, "transformer_blocks.0.attn.to_q.weight": torch.zeros(16, 16)})
    with pytest.raises(CdmbenchError, match="another shape"):
        bb.load_net({k: (v[:2] if "lora_A" in k else v) for k, v in state.items()})


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing(tiny_sd3_dir, lora_rank):
    bb = build_backbone("sd3", BackboneOptions(model=str(tiny_sd3_dir), max_sequence_length=TEXT_LEN,
                                               gradient_checkpointing=True, lora_rank=lora_rank))
    net = perturb_(bb.trainable_copy(), only="lora_B" if lora_rank else None)
    assert net.is_gradient_checkpointing and not bb.teacher.is_gradient_checkpointing
    x, cond = torch.randn(1, *bb.latent_shape), bb.encode_prompts(PROMPTS[:1])
    bb.velocity(net, x, torch.tensor([0.5]), cond).square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    inner = [g for n, g in grads.items() if n.startswith("transformer_blocks.0.")]
    assert inner and all(g is not None and g.abs().sum() > 0 for g in inner)  # grads flow through checkpoints


@pytest.mark.parametrize("arch", ["sd3", "longcat"])
@pytest.mark.parametrize("model", [None, "nobody-cdmbench/does-not-exist", "/nonexistent/cdmbench/model-folder"])
def test_missing_weights_is_one_clear_line(arch, model, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError) as info:
        build_backbone(arch, BackboneOptions(model=model))
    msg = str(info.value)
    assert (model or BACKBONES.get(arch).default_model) in msg and "\n" not in msg and "--model" in msg


def test_folder_without_model_index(tmp_path):
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        build_backbone("sd3", BackboneOptions(model=str(tmp_path)))


def test_folder_of_another_pipeline(tiny_sd3_dir):
    with pytest.raises(MissingWeightsError, match="holds a StableDiffusion3Pipeline, not a LongCatImagePipeline"):
        build_backbone("longcat", BackboneOptions(model=str(tiny_sd3_dir)))
