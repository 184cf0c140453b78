"""Tiny SD3 and LongCat-Image diffusers pipelines built from configs, saved with ``save_pretrained``.

Tests load them back through the adapters with ``BackboneOptions(model=<folder>)``, the same
``from_pretrained`` path a hub id takes. Built once per session (< 1 s each, ~1 MB). Recipe and dimension
rules: shared notes/deps.md ("Tiny local pipelines"). Tokenizers are byte-level with an empty merge list,
built locally, so nothing touches the hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

SD3_RES = 32  # pixels: VAE ×2, patch 2 → 8×8 = 64 image tokens
LONGCAT_RES = 32  # pixels: VAE ×2, 2×2 packing → 8×8 = 64 image tokens
TEXT_LEN = 16  # T5 / Qwen tokens used by most tests (the real defaults are 256 / 512)


def _byte_chars() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def _eval(*modules):
    for m in modules:
        m.eval()  # freshly built modules are in train mode (T5 dropout)


def build_tiny_sd3(path: Path, *, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    torch.manual_seed(seed)
    chars = _byte_chars()
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
        sample_size=SD3_RES // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
        norm_num_groups=4, scaling_factor=1.5, shift_factor=0.1)
    te1, te2 = clip(16), clip(16)
    _eval(te1, te2, t5, transformer, vae)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(path)
    return path


def build_tiny_longcat(path: Path, *, seed: int = 0) -> Path:
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImagePipeline,
                           LongCatImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    torch.manual_seed(seed)
    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(_byte_chars())}, merges=[], model_max_length=4096)
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
    _eval(text, transformer, vae)
    pipe = LongCatImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, text_processor=None,
                                transformer=transformer)
    pipe.save_pretrained(path)
    return path


def with_scheduler(src: Path, dst: Path, **overrides) -> Path:
    """A copy of a pipeline folder whose scheduler config has ``overrides``."""
    shutil.copytree(src, dst)
    cfg_path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(overrides)
    cfg_path.write_text(json.dumps(cfg))
    return dst


_BUILT: dict[str, Path] = {}  # one build per session even when several test modules import the fixtures


def _built(name: str, build, tmp_path_factory) -> Path:
    if name not in _BUILT or not _BUILT[name].is_dir():
        _BUILT[name] = build(tmp_path_factory.mktemp("tiny") / name)
    return _BUILT[name]


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    return _built("sd3", build_tiny_sd3, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_longcat_dir(tmp_path_factory) -> Path:
    return _built("longcat", build_tiny_longcat, tmp_path_factory)


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int = 1, only: str | None = None) -> torch.nn.Module:
    """Add seeded noise to the trainable weights (those whose name contains ``only``): a stand-in student."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return net
