"""LongCat-Image through diffusers' ``LongCatImagePipeline`` (Meituan LongCat team, 2025).

A Flux-style MMDiT (``LongCatImageTransformer2DModel``: joint then single-stream blocks, 3-axis RoPE) over
2×2-packed 16-channel VAE latents, conditioned on Qwen2.5-VL hidden states. Differences from SD3 that the
adapter absorbs (cdm.md §1, §7): the network takes ``timestep = σ`` (it multiplies by 1000 itself), there is
no pooled embedding, text and image position ids are shared by the batch, latents are packed
(B, (H/16)(W/16), 64), and the scheduler may use dynamic (resolution-dependent) shifting. Prompt rewriting
and CFG renormalisation (pipeline defaults) are never used: the text processor is not even loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdmbench.backbones import BACKBONES
from cdmbench.backbones.base import BackboneOptions, Cond
from cdmbench.backbones.diffusers import DiffusersBackbone, eval_modules, tiny_byte_chars
from cdmbench.errors import CdmbenchError


@BACKBONES.register("longcat")
class LongCatBackbone(DiffusersBackbone):
    """LongCat-Image teacher: packed latents, Qwen2.5-VL text (512 tokens), timestep = σ."""

    pipeline_class = "LongCatImagePipeline"
    default_model = "meituan-longcat/LongCat-Image"
    default_guidance = 4.5  # diffusers' LongCat default
    default_teacher_steps = 50
    default_max_shift = 1.15  # LongCatImagePipeline's fallback for ``max_shift``
    pipeline_load_kwargs = {"text_processor": None}  # only prompt rewriting needs it
    fsdp_block_classes = ("LongCatImageTransformerBlock", "LongCatImageSingleTransformerBlock")

    def __init__(self, options: BackboneOptions = BackboneOptions()):
        super().__init__(options)
        from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

        if options.max_sequence_length:
            self.pipe.tokenizer_max_length = options.max_sequence_length  # default 512
        side = self.resolution // (2 * self.pipe.vae_scale_factor)  # packed tokens per image side
        start = self.pipe.tokenizer_max_length  # image ids start after the text positions
        self._feed_fp32_timesteps()
        self.img_ids = prepare_pos_ids(modality_id=1, type="image", start=(start, start), height=side,
                                       width=side).to(self.device, torch.int64)

    @staticmethod
    def build_tiny_pipeline(path: Path) -> Path:
        return build_tiny_longcat(path)

    def _resolve_resolution(self, resolution: int | None) -> int:
        f = 2 * self.pipe.vae_scale_factor
        resolution = resolution or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        if resolution % f:
            raise CdmbenchError(f"longcat: resolution must be a multiple of {f} pixels, got {resolution}")
        return resolution

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.image_seq_len, self.pipe.transformer.config.in_channels)

    @property
    def image_seq_len(self) -> int:
        return (self.resolution // (2 * self.pipe.vae_scale_factor)) ** 2

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, txt_ids = self.pipe.encode_prompt(prompts)  # (B, L, D), (L, 3) rows (0, k, k)
        return Cond({"embeds": embeds}, {"txt_ids": txt_ids.to(torch.int64), "img_ids": self.img_ids})

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = next(net.parameters()).dtype
        self._fp32_timestep = 1000 * sigma.float()  # what the time embedding gets (see _feed_fp32_timesteps)
        try:
            return net(
                hidden_states=x.to(dtype), timestep=sigma.to(dtype), guidance=None,
                encoder_hidden_states=cond.batched["embeds"].to(dtype),
                txt_ids=cond.shared["txt_ids"], img_ids=cond.shared["img_ids"], return_dict=False,
            )[0]
        finally:
            self._fp32_timestep = None

    def _feed_fp32_timesteps(self) -> None:
        """Give the time embedding 1000·σ in fp32 whatever the network dtype.

        ``LongCatImageTransformer2DModel.forward`` casts its timestep to the hidden-state dtype before the
        embedding (so does the stock pipeline's ``t.to(latents.dtype)``): in bf16 σ would be rounded to steps
        of 2⁻⁸ (1000·σ to steps of ~4 near σ = 1). A forward pre-hook on the teacher's ``time_embed`` swaps
        the rounded value for the fp32 one that ``velocity`` holds during its call; every network is a copy
        of the teacher, and copies keep the hook. The sinusoids are computed in fp32 and cast after, as in SD3.
        """
        self._fp32_timestep = None

        def swap(module, args):
            return None if self._fp32_timestep is None else (self._fp32_timestep, *args[1:])

        self.pipe.transformer.time_embed.register_forward_pre_hook(swap)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        unpacked = self.pipe._unpack_latents(latents, self.resolution, self.resolution, self.pipe.vae_scale_factor)
        return self._vae_decode(unpacked)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        z = self._vae_encode(images)  # (B, 16, H/8, W/8) → 2×2-packed (B, (H/16)(W/16), 64)
        return self.pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def inference_recipe(self) -> dict[str, dict[str, Any]]:
        recipe = super().inference_recipe()
        recipe["from_pretrained_kwargs"]["text_processor"] = None
        recipe["call_kwargs"].update(enable_prompt_rewrite=False, enable_cfg_renorm=False)
        if self.pipe.tokenizer_max_length != 512:
            recipe["attributes"]["tokenizer_max_length"] = self.pipe.tokenizer_max_length
        return recipe


def build_tiny_longcat(path: Path, *, seed: int = 0) -> Path:
    """A tiny random pipeline of this backbone saved at ``path`` (tests; ``DiffusersBackbone.tiny_pipeline`` caches it; sizes: ``diffusers.TINY_RESOLUTION``)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImagePipeline,
                           LongCatImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    torch.manual_seed(seed)
    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(tiny_byte_chars())}, merges=[], model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32)))
    # in_channels = 16 latent channels × 2×2 packing (hard-coded by the pipeline); sum(axes_dims_rope) = head dim
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, latent_channels=16,
        norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    eval_modules(text, transformer, vae)
    pipe = LongCatImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, text_processor=None,
                                transformer=transformer)
    pipe.save_pretrained(path)
    return path
