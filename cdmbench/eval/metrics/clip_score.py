"""CLIP score (Hessel et al., 2021; the torchmetrics convention): 100 · max(cos(image, text), 0) per image.

Computed with open_clip (torchmetrics' ``CLIPScore`` is broken under transformers 5). The real default is
OpenAI ViT-L/14 (open_clip ``ViT-L-14`` / ``openai``), as in baselines.md §C convention 2; a backbone may
declare its own CLIP (``Evaluators.clip`` → ``ClipModel``). ``openclip_cosine`` is also the core of HPS v2.1
(``hps.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import MetricOptions, PerImageMetric, to_pil
from cdmbench.types import Evaluators

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"
CLIP_MODEL_ENV = "CDMBENCH_CLIP_MODEL"
CLIP_PRETRAINED_ENV = "CDMBENCH_CLIP_PRETRAINED"


BatchPreprocess = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float [0, 1] -> model input batch


class PILBatchPreprocess:
    """Batch form of an open_clip inference transform: images are quantised to uint8 PIL images (as a
    saved PNG would be), transformed one by one and stacked."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(im) for im in to_pil(images)])


@dataclass(frozen=True)
class ClipModel:
    """A backbone's CLIP (what ``Evaluators.clip`` loads): an open_clip-style model (``encode_image``,
    ``encode_text``) on its device, its batched preprocess, its tokenizer and an identity for the protocol."""

    model: torch.nn.Module
    preprocess: "BatchPreprocess"
    tokenizer: Callable
    protocol: str


@torch.no_grad()
def openclip_cosine(
    model: torch.nn.Module,
    preprocess: BatchPreprocess,
    tokenizer: Callable,
    images: torch.Tensor,
    prompts: list[str],
    prefix: str = "",
) -> np.ndarray:
    """Cosine similarity of each image with its own prompt, float64 (B,).

    Args:
        model: an open_clip model (``encode_image``, ``encode_text``).
        preprocess: images (B, 3, H, W) float [0, 1] → model input (``PILBatchPreprocess`` for real models;
            a declared CLIP's preprocess may work on tensors directly).
        tokenizer: its tokenizer (list[str] → LongTensor).
        images: (B, 3, H, W) float in [0, 1].
        prompts: B captions; ``prefix`` is put before each.
    """
    device = next(model.parameters()).device
    pixels = preprocess(images).to(device)
    tokens = tokenizer([prefix + p for p in prompts]).to(device)
    img = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
    return (img * txt).sum(dim=-1).double().cpu().numpy()


def load_openclip(model_name: str, pretrained: str | None, device: str, what: str, how: str):
    """(model, batched preprocess, tokenizer) from open_clip. ``pretrained`` is a tag (hub download, or the
    hub cache when offline) or a local checkpoint file; None = random init (tests only)."""
    import open_clip

    if model_name not in open_clip.list_models():
        examples = ", ".join(open_clip.list_models()[:8])
        raise CdmbenchError(f"unknown open_clip model {model_name!r}; open_clip.list_models() has e.g. {examples}, ...")
    if pretrained is not None and not Path(pretrained).expanduser().is_file():
        if any(s in pretrained for s in ("/", "\\")) or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
            raise MissingWeightsError(f"{what} checkpoint not found at {pretrained}; {how}")
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise CdmbenchError(
                f"open_clip has no pretrained tag {pretrained!r} for {model_name}; valid tags: {', '.join(tags)}"
            )
        try:  # the download (or cache lookup) open_clip would do, done first so a failure is one clear line
            open_clip.download_pretrained(cfg)
        except Exception as e:
            raise MissingWeightsError(
                f"{what} weights {model_name}/{pretrained} are not available locally ({type(e).__name__}); {how}"
            ) from e
    elif pretrained is not None:
        pretrained = str(Path(pretrained).expanduser())
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except RuntimeError as e:  # state-dict mismatch: the weights are for another architecture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CdmbenchError(f"{what} weights {pretrained} do not fit open_clip {model_name}: {first[:300]}") from e
    return model.eval(), PILBatchPreprocess(preprocess), open_clip.get_tokenizer(model_name)


TINY_CLIP = "cdmbench-tiny-clip"  # a random open_clip model for tests (``tiny_open_clip``)
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_open_clip(workdir: Path, seed: int = 0):
    """(model, batched preprocess, tokenizer) of a random tiny open_clip CLIP (config written under ``workdir``)."""
    import json

    import open_clip

    folder = Path(workdir) / "open_clip"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, transform = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None)
    return model.eval(), PILBatchPreprocess(transform), open_clip.get_tokenizer(TINY_CLIP)


@METRICS.register("clip")
class CLIPScore(PerImageMetric):
    """CLIP score: per image 100 · max(cos, 0), mean over images.

    Args:
        model, preprocess, tokenizer: an open_clip model, its batched preprocess and tokenizer.
        protocol: identity of the model and weights (e.g. "open_clip:ViT-L-14:openai").
        prefix: text put before every prompt.
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(
        self, model: torch.nn.Module, preprocess: BatchPreprocess, tokenizer: Callable, protocol: str, prefix: str = ""
    ):
        super().__init__()
        self.model, self.preprocess, self.tokenizer, self.prefix = model.eval(), preprocess, tokenizer, prefix
        self.protocol = f"clip|{protocol}|prefix={prefix!r}|score=100*max(cos,0)"

    def score_batch(self, images, prompts):
        cos = openclip_cosine(self.model, self.preprocess, self.tokenizer, images, [p.text for p in prompts],
                              self.prefix)
        return 100.0 * np.maximum(cos, 0.0)

    @classmethod
    def tiny(cls, workdir: Path) -> "CLIPScore":
        return cls(*tiny_open_clip(workdir), f"open_clip:{TINY_CLIP}:random")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "CLIPScore":
        """The declared ``evaluators.clip``, else open_clip ``clip_model`` ($CDMBENCH_CLIP_MODEL, default ViT-L-14)
        with ``clip_pretrained`` ($CDMBENCH_CLIP_PRETRAINED, default the "openai" tag): a tag, loaded from the
        hub cache, or a local checkpoint file. A local copy of the OpenAI weights needs the architecture
        ``ViT-L-14-quickgelu`` (the tag sets QuickGELU by itself; a bare file cannot)."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        if evaluators.clip is not None:
            m: ClipModel = evaluators.clip(options.device)
            return cls(m.model, m.preprocess, m.tokenizer, m.protocol, options.clip_prefix)
        name = options.env("clip_model", CLIP_MODEL_ENV, DEFAULT_CLIP_MODEL)
        pretrained = options.env("clip_pretrained", CLIP_PRETRAINED_ENV, DEFAULT_CLIP_PRETRAINED)
        how = (
            f"pass clip_pretrained= (a local open_clip checkpoint file) and clip_model=, or set "
            f"${CLIP_PRETRAINED_ENV} / ${CLIP_MODEL_ENV}, or fill the HF cache while online"
        )
        model, preprocess, tokenizer = load_openclip(name, pretrained, options.device, "CLIP", how)
        tag = Path(pretrained).name if Path(pretrained).expanduser().is_file() else pretrained
        return cls(model, preprocess, tokenizer, f"open_clip:{name}:{tag}", options.clip_prefix)
