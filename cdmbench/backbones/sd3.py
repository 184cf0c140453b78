"""Stable Diffusion 3 (Medium) through diffusers.

Esser et al. (2024), "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis": an MMDiT
(``SD3Transformer2DModel``) over 16-channel VAE latents, conditioned on CLIP-L + OpenCLIP-bigG + T5-XXL.
Conventions: cdm.md §1 (timestep = 1000·σ, VAE scaling/shift), §1.1 (scheduler shift), §7 (adapters).
Pipeline loading and the plumbing shared with LongCat live in ``cdmbench.backbones.diffusers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdmbench.backbones import BACKBONES
from cdmbench.backbones.base import BackboneOptions, Cond
from cdmbench.backbones.diffusers import TINY_RESOLUTION, DiffusersBackbone, eval_modules, tiny_byte_chars
from cdmbench.errors import CdmbenchError


# ------------------------------------------------------------------------------------------------
# SD3: StableDiffusion3Pipeline (cdm.md §7).

@BACKBONES.register("sd3")
class SD3Backbone(DiffusersBackbone):
    """SD3-Medium teacher: MMDiT on (16, H/8, W/8) latents, three text encoders, static shift 3."""

    pipeline_class = "StableDiffusion3Pipeline"
    default_model = "stabilityai/stable-diffusion-3-medium-diffusers"
    default_guidance = 7.0  # diffusers' SD3 default
    default_teacher_steps = 28
    fsdp_block_classes = ("JointTransformerBlock",)

    def __init__(self, options: BackboneOptions = BackboneOptions()):
        super().__init__(options)
        self.max_sequence_length = options.max_sequence_length or 256

    @staticmethod
    def build_tiny_pipeline(path: Path) -> Path:
        return build_tiny_sd3(path)

    def _resolve_resolution(self, resolution: int | None) -> int:
        cfg, f = self.pipe.transformer.config, self.pipe.vae_scale_factor
        resolution = resolution or cfg.sample_size * f
        if resolution % (f * cfg.patch_size) or resolution // (f * cfg.patch_size) > cfg.pos_embed_max_size:
            raise CdmbenchError(f"sd3: resolution must be a multiple of {f * cfg.patch_size} and at most "
                                f"{f * cfg.patch_size * cfg.pos_embed_max_size} pixels, got {resolution}")
        return resolution

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels, side, side)

    @property
    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // self.pipe.transformer.config.patch_size) ** 2

    def _encode(self, prompts: list[str]) -> Cond:
        # embeds: (B, 77 + L, D_T5) = CLIP-L ‖ bigG per-token (zero-padded to D_T5), then T5; pooled: (B, P)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Cond({"embeds": embeds, "pooled": pooled})

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = next(net.parameters()).dtype
        return net(
            # fp32 timesteps whatever the network dtype, as the SD3 pipeline passes them (bf16 would round 1000·σ
            # to steps of 4); the time embedding computes its sinusoids in fp32 and casts after
            hidden_states=x.to(dtype), timestep=self.pipe.scheduler.config.num_train_timesteps * sigma.float(),
            encoder_hidden_states=cond.batched["embeds"].to(dtype),
            pooled_projections=cond.batched["pooled"].to(dtype), return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae_decode(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._vae_encode(images)

    def inference_recipe(self) -> dict[str, dict[str, Any]]:
        recipe = super().inference_recipe()
        recipe["call_kwargs"]["max_sequence_length"] = self.max_sequence_length
        return recipe


def build_tiny_sd3(path: Path, *, seed: int = 0) -> Path:
    """A tiny random pipeline of this backbone saved at ``path`` (tests; ``DiffusersBackbone.tiny_pipeline`` caches it; sizes: ``diffusers.TINY_RESOLUTION``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    torch.manual_seed(seed)
    chars = tiny_byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)

    def clip(projection_dim: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=projection_dim, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))

    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz0123456789"]
    t5_tok = T5TokenizerFast(vocab=t5_vocab, extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8))
    # joint_attention_dim = T5 d_model ≥ 2 × CLIP hidden; pooled_projection_dim = sum of CLIP projections
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
        norm_num_groups=4, scaling_factor=1.5, shift_factor=0.1)
    te1, te2 = clip(16), clip(16)
    eval_modules(te1, te2, t5, transformer, vae)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(path)
    return path
