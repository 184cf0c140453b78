"""The toy backbone's networks: a word-level tokenizer over the shapes grammar, a tiny CLIP text
encoder (transformers) and a micro SD3 MMDiT (diffusers ``SD3Transformer2DModel``) over the latents of
the toy VAE (``cdmbench.toy.vae``; teachers before v3 ran in 32×32 pixel space).

The teacher is a real member of the SD3 family — same transformer class, same conditioning
(per-token embeddings + pooled projection), same ``timestep = 1000·σ`` convention — only tiny.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from cdmbench.toy.shapes import RESOLUTION, VOCAB

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_TOKENS = 12


@dataclass(frozen=True)
class ToyArch:
    """Sizes of the toy teacher (defaults are the latent teacher, v3)."""

    text_width: int = 64  # CLIP text hidden size = SD3 joint_attention_dim = pooled_projection_dim
    text_layers: int = 2
    patch_size: int = 1  # 8x8 latents -> 64 image tokens (the pixel teacher: patch 4 on 32x32)
    heads: int = 4
    head_dim: int = 32  # transformer width = heads * head_dim
    layers: int = 3
    in_channels: int = 4  # latent channels of the toy VAE (3: pixels)
    sample_size: int = 8  # latent side (32: pixels)


# What a teacher file written before v3 (pixel space, no VAE) leaves out of its arch record.
PIXEL_ARCH = {"in_channels": 3, "sample_size": RESOLUTION}


def build_tokenizer():
    """A word-level tokenizer over the grammar's vocabulary, built locally (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in VOCAB:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(arch: ToyArch):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(VOCAB), hidden_size=arch.text_width,
        intermediate_size=2 * arch.text_width, num_hidden_layers=arch.text_layers, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, projection_dim=arch.text_width,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return CLIPTextModelWithProjection(cfg)


def build_transformer(arch: ToyArch):
    from diffusers import SD3Transformer2DModel

    width = arch.heads * arch.head_dim
    return SD3Transformer2DModel(
        sample_size=arch.sample_size, patch_size=arch.patch_size, in_channels=arch.in_channels,
        out_channels=arch.in_channels, num_layers=arch.layers, attention_head_dim=arch.head_dim,
        num_attention_heads=arch.heads, joint_attention_dim=arch.text_width, caption_projection_dim=width,
        pooled_projection_dim=arch.text_width, pos_embed_max_size=arch.sample_size // arch.patch_size,
    )


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token embeddings (B, 12, D), pooled projection (B, D)) like SD3's CLIP branch."""
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    out = text_encoder(input_ids=ids.input_ids.to(text_encoder.device))
    return out.last_hidden_state, out.text_embeds


def arch_dict(arch: ToyArch) -> dict:
    return asdict(arch)


def arch_from_record(record: dict) -> ToyArch:
    return ToyArch(**{**PIXEL_ARCH, **record.get("arch", {})}) if "vae" not in record else ToyArch(**record["arch"])
