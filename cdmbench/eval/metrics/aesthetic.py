"""The LAION improved aesthetic predictor (Schuhmann, "improved-aesthetic-predictor", 2022): a linear MLP
on L2-normalised CLIP ViT-L/14 image embeddings, trained on AVA and LAION-Logos ratings; scores ≈ 1-10
(≈ 5-6 for good text-to-image generations). The CDM code scores it with the transformers
``openai/clip-vit-large-patch14`` CLIP and the MLP weights of ``trl-lib/ddpo-aesthetic-predictor``
(``aesthetic-model.pth``, the released ``sac+logos+ava1-l14-linearMSE`` head).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from cdmbench.errors import CdmbenchError
from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import MetricOptions, PerImageMetric, resolve_weights
from cdmbench.eval.metrics.hf_clip import image_embeddings, load_hf_clip
from cdmbench.types import Evaluators

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_FILE = "aesthetic-model.pth"
AESTHETIC_ENV = "CDMBENCH_AESTHETIC_PATH"
AESTHETIC_CLIP_ENV = "CDMBENCH_AESTHETIC_CLIP"
_HOW = (f"download {AESTHETIC_REPO}/{AESTHETIC_FILE} and {AESTHETIC_CLIP} and pass aesthetic_path= / aesthetic_clip= "
        f"or set ${AESTHETIC_ENV} / ${AESTHETIC_CLIP_ENV}")


class AestheticMLP(nn.Module):
    """The predictor's head: Linear layers 768→1024→128→64→16→1 with dropout and no activations (the
    released checkpoint's layout, ``layers.{0,2,4,6,7}``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_aesthetic_mlp(path, input_size: int = 768) -> AestheticMLP:
    """The head from a torch state-dict file (weights_only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(input_size)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CdmbenchError(f"aesthetic predictor weights {path} do not fit the LAION MLP: {str(e).splitlines()[0]}") from e
    return mlp.eval().requires_grad_(False)


@torch.no_grad()
def aesthetic_scores(model, processor, mlp: AestheticMLP, images: torch.Tensor) -> np.ndarray:
    """(B,) float64 MLP(normalised CLIP image embedding)."""
    emb = image_embeddings(model, processor, images)
    return mlp.to(emb.device)(emb).reshape(-1).double().cpu().numpy()


@METRICS.register("aesthetic")
class Aesthetic(PerImageMetric):
    """LAION improved aesthetic predictor: per image the MLP's rating of the CLIP ViT-L/14 embedding.

    Args:
        model, processor: a transformers ``CLIPModel`` (ViT-L/14) and its ``CLIPProcessor``.
        mlp: the ``AestheticMLP`` head (its input size = the model's projection dim).
        source: names of the weights (recorded in the protocol).
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(self, model, processor, mlp: AestheticMLP, source: str = f"{AESTHETIC_CLIP}+{AESTHETIC_REPO}"):
        super().__init__()
        if mlp.layers[0].in_features != model.config.projection_dim:
            raise CdmbenchError(f"aesthetic MLP takes {mlp.layers[0].in_features}-d embeddings, the CLIP gives "
                                f"{model.config.projection_dim}")
        self.model, self.processor, self.mlp = model.eval(), processor, mlp.eval()
        self.protocol = f"aesthetic|laion-improved-v2|{source}|l2-normalised-embedding"

    def score_batch(self, images, prompts):
        return aesthetic_scores(self.model, self.processor, self.mlp, images)

    @classmethod
    def tiny(cls, workdir) -> "Aesthetic":
        """The aesthetic path on a random tiny CLIPModel and a random head."""
        from pathlib import Path

        from cdmbench.eval.metrics.hf_clip import build_tiny_hf_clip

        folder = str(build_tiny_hf_clip(Path(workdir) / "tiny-hf-clip"))
        model, processor = load_hf_clip(folder, folder, "cpu", "tiny CLIP", "")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mlp = AestheticMLP(model.config.projection_dim).eval()
        return cls(model, processor, mlp, "tiny-random")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "Aesthetic":
        """CLIP from ``aesthetic_clip`` / $CDMBENCH_AESTHETIC_CLIP / the hub cache of openai/clip-vit-large-patch14
        (its own processor); MLP from ``aesthetic_path`` / $CDMBENCH_AESTHETIC_PATH / the hub cache of
        trl-lib/ddpo-aesthetic-predictor."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        clip_src = options.env("aesthetic_clip", AESTHETIC_CLIP_ENV, AESTHETIC_CLIP)
        mlp_path = resolve_weights(options.env("aesthetic_path", AESTHETIC_ENV), AESTHETIC_REPO, AESTHETIC_FILE,
                                   f"aesthetic predictor head {AESTHETIC_FILE}", _HOW)
        model, processor = load_hf_clip(clip_src, clip_src, options.device, "aesthetic CLIP", _HOW)
        mlp = load_aesthetic_mlp(mlp_path, model.config.projection_dim).to(options.device)
        return cls(model, processor, mlp, f"{clip_src}+{mlp_path.name}")
