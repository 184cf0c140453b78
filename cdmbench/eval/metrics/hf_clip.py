"""Shared pieces of the scorers built on a transformers ``CLIPModel`` (PickScore, the LAION aesthetic
predictor): loading a model and processor from a local folder or the hub cache with the offline rules,
and projected image / text embeddings that do not depend on the transformers version (transformers 5's
``get_image_features`` returns an output object, 4.x a tensor)."""

from __future__ import annotations

from pathlib import Path

import torch

from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.eval.metrics.base import offline, to_pil


def _from_pretrained(cls, source: str, what: str, how: str, **kwargs):
    local = Path(source).expanduser()
    if local.exists():
        source = str(local)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise MissingWeightsError(f"{what} not found at {local}; {how}")
    try:
        return cls.from_pretrained(source, local_files_only=offline() or local.exists(), **kwargs)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MissingWeightsError(f"{what} ({source}) is not available locally: {first}; {how}") from e


def load_hf_clip(model_source: str, processor_source: str, device: str, what: str, how: str):
    """(CLIPModel in eval mode on ``device``, CLIPProcessor) from hub ids or local folders.

    The tokenizer's vocabulary must match the model's: offline, ``CLIPTokenizer.from_pretrained(hub id)``
    can silently return a tokenizer with only the special tokens (shared notes/deps.md).
    """
    from transformers import CLIPModel, CLIPProcessor

    model = _from_pretrained(CLIPModel, model_source, f"{what} model", how)
    processor = _from_pretrained(CLIPProcessor, processor_source, f"{what} processor", how)
    want, have = model.config.text_config.vocab_size, len(processor.tokenizer)
    if have != want:
        raise MissingWeightsError(
            f"{what} processor {processor_source} has a {have}-token vocabulary but the model expects {want} "
            f"(an incomplete tokenizer download?); {how}"
        )
    return model.to(device).eval().requires_grad_(False), processor


@torch.no_grad()
def image_embeddings(model, processor, images: torch.Tensor) -> torch.Tensor:
    """(B, D) L2-normalised projected image embeddings of images (B, 3, H, W) float [0, 1], which are
    quantised to uint8 PIL images first (as a saved PNG) and preprocessed by ``processor``."""
    device = next(model.parameters()).device
    pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(device)
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return torch.nn.functional.normalize(model.visual_projection(pooled).float(), dim=-1)


@torch.no_grad()
def text_embeddings(model, processor, prompts: list[str]) -> torch.Tensor:
    """(B, D) L2-normalised projected text embeddings (padded, truncated to the model's 77 tokens)."""
    if not prompts:
        raise CdmbenchError("text_embeddings: no prompts")
    device = next(model.parameters()).device
    max_len = model.config.text_config.max_position_embeddings
    tok = processor(text=list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    pooled = model.text_model(input_ids=tok["input_ids"].to(device),
                              attention_mask=tok["attention_mask"].to(device)).pooler_output
    return torch.nn.functional.normalize(model.text_projection(pooled).float(), dim=-1)


def build_tiny_hf_clip(folder, seed: int = 0):
    """A random tiny transformers CLIPModel (projection 16) and a CLIPProcessor with a byte-level tokenizer,
    saved under ``folder`` (tests); returns ``folder``."""
    from pathlib import Path

    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder

