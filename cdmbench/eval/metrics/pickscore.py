"""PickScore (Kirstain et al., 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation"): a CLIP-H fine-tuned on human preferences; per image the score is the model's
``logit_scale.exp()`` times the cosine of the normalised image and prompt embeddings (≈ 18-23 on real
generations), as in the authors' inference example. The model is ``yuvalkirstain/PickScore_v1``
(transformers ``CLIPModel``), the processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import MetricOptions, PerImageMetric
from cdmbench.eval.metrics.hf_clip import image_embeddings, load_hf_clip, text_embeddings
from cdmbench.types import Evaluators

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MODEL_ENV = "CDMBENCH_PICKSCORE_MODEL"
PICKSCORE_PROCESSOR_ENV = "CDMBENCH_PICKSCORE_PROCESSOR"
_HOW = (f"download {PICKSCORE_MODEL} and {PICKSCORE_PROCESSOR} (huggingface-cli download) and pass pickscore_model= / "
        f"pickscore_processor= (local folders) or set ${PICKSCORE_MODEL_ENV} / ${PICKSCORE_PROCESSOR_ENV}")


@torch.no_grad()
def pickscore(model, processor, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """(B,) float64 logit_scale.exp() · cos(image_i, prompt_i)."""
    img = image_embeddings(model, processor, images)
    txt = text_embeddings(model, processor, prompts)
    return (model.logit_scale.exp().float().cpu() * (img * txt).sum(dim=-1).cpu()).double().numpy()


@METRICS.register("pickscore")
class PickScore(PerImageMetric):
    """PickScore v1: per image logit_scale · cos(image, prompt) of the preference-tuned CLIP-H.

    Args:
        model, processor: a transformers ``CLIPModel`` with the PickScore weights and its ``CLIPProcessor``.
        source: names of the weights (recorded in the protocol).
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(self, model, processor, source: str = f"{PICKSCORE_MODEL}+{PICKSCORE_PROCESSOR}"):
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.protocol = f"pickscore|{source}|score=logit_scale*cos"

    def score_batch(self, images, prompts):
        return pickscore(self.model, self.processor, images, [p.text for p in prompts])

    @classmethod
    def tiny(cls, workdir) -> "PickScore":
        """The PickScore path on a random tiny CLIPModel (``hf_clip.build_tiny_hf_clip``)."""
        from pathlib import Path

        from cdmbench.eval.metrics.hf_clip import build_tiny_hf_clip

        folder = str(build_tiny_hf_clip(Path(workdir) / "tiny-hf-clip"))
        return cls(*load_hf_clip(folder, folder, "cpu", "tiny CLIP", ""), "tiny-random")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "PickScore":
        """Model from ``pickscore_model`` / $CDMBENCH_PICKSCORE_MODEL / the hub cache of PickScore_v1, processor
        from ``pickscore_processor`` / $CDMBENCH_PICKSCORE_PROCESSOR / the hub cache of the LAION CLIP-H."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        model_src = options.env("pickscore_model", PICKSCORE_MODEL_ENV, PICKSCORE_MODEL)
        proc_src = options.env("pickscore_processor", PICKSCORE_PROCESSOR_ENV, PICKSCORE_PROCESSOR)
        model, processor = load_hf_clip(model_src, proc_src, options.device, "PickScore", _HOW)
        return cls(model, processor, f"{model_src}+{proc_src}")
