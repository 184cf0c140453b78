"""Stable Diffusion 3 (Medium) through diffusers.

Esser et al. (2024), "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis": an MMDiT
(``SD3Transformer2DModel``) over 16-channel VAE latents, conditioned on CLIP-L + OpenCLIP-bigG + T5-XXL.
Conventions: cdm.md §1 (timestep = 1000·σ, VAE scaling/shift), §1.1 (scheduler shift), §7 (adapters).
Pipeline loading and the plumbing shared with LongCat live in ``cdmbench.backbones.diffusers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cdmbench.backbones import BACKBONES
from cdmbench.backbones.base import BackboneOptions, Cond
from cdmbench.backbones.diffusers import DiffusersBackbone
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
