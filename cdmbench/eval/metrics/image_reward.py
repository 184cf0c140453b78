"""ImageReward v1.0 (Xu et al., 2023): a BLIP reward model of human preference, z-normalised against its
own test set (so ≈ N(0, 1); negative values are fine).

Runs the ``image-reward`` package's own model classes (an optional install, see ``_imagereward_compat``),
batched through ``ImageReward.score_gard``, which is the math of ``ImageReward.score``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from cdmbench.errors import MissingWeightsError
from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import MetricOptions, PerImageMetric, resolve_weights, to_pil
from cdmbench.types import Evaluators

IR_REPO = "THUDM/ImageReward"
IR_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BERT_REPO = "bert-base-uncased"
IR_ENV = "CDMBENCH_IMAGEREWARD_PATH"
MED_CONFIG_ENV = "CDMBENCH_IMAGEREWARD_MED_CONFIG"
BERT_ENV = "CDMBENCH_BERT_TOKENIZER_PATH"


@torch.no_grad()
def imagereward_scores(model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """Per-image rewards, float64 (B,), for (B, 3, H, W) images in [0, 1] and B prompts."""
    from cdmbench.eval.metrics._imagereward_compat import PROMPT_TOKENS

    device = next(model.parameters()).device
    text = model.blip.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt"
    )
    pixels = torch.stack([model.preprocess(im) for im in to_pil(images)]).to(device)
    rewards = model.score_gard(text.input_ids.to(device), text.attention_mask.to(device), pixels)
    return rewards.float().reshape(-1).double().cpu().numpy()


@METRICS.register("imagereward")
class ImageRewardScore(PerImageMetric):
    """ImageReward v1.0: per-image reward, mean over images.

    Args:
        model: an ``ImageReward`` module (``_imagereward_compat.load_imagereward``).
        checkpoint: name of the weights file (recorded in the protocol).
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, checkpoint: str = IR_FILE):
        super().__init__()
        self.model = model.eval()
        self.protocol = f"imagereward-v1.0|blip|ckpt={checkpoint}|score=z-normalised reward"

    def score_batch(self, images, prompts):
        return imagereward_scores(self.model, images, [p.text for p in prompts])

    @classmethod
    def tiny(cls, workdir: Path) -> "ImageRewardScore":
        """A random small ImageReward of the package's own classes (``_imagereward_compat.build_tiny_imagereward``)."""
        from cdmbench.eval.metrics import _imagereward_compat as compat

        return cls(compat.build_tiny_imagereward(Path(workdir) / "imagereward"), "random")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "ImageRewardScore":
        """Weights from ``imagereward_path`` / $CDMBENCH_IMAGEREWARD_PATH, ``imagereward_med_config`` /
        $CDMBENCH_IMAGEREWARD_MED_CONFIG (else ~/.cache/ImageReward, where ``ImageReward.load`` puts them,
        else the hub cache of THUDM/ImageReward), and bert-base-uncased's tokenizer from
        ``bert_tokenizer_path`` / $CDMBENCH_BERT_TOKENIZER_PATH (a folder or vocab.txt; else the hub cache)."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        from cdmbench.eval.metrics import _imagereward_compat as compat

        compat.import_imagereward()  # a missing package is an ImportError naming the install command
        ir_cache = Path.home() / ".cache" / "ImageReward"
        how = f"pass imagereward_path= and imagereward_med_config= or set ${IR_ENV} / ${MED_CONFIG_ENV}"
        ckpt = resolve_weights(
            options.env("imagereward_path", IR_ENV), IR_REPO, IR_FILE, f"ImageReward weights {IR_FILE}", how, ir_cache
        )
        med = resolve_weights(
            options.env("imagereward_med_config", MED_CONFIG_ENV), IR_REPO, MED_CONFIG_FILE,
            f"ImageReward {MED_CONFIG_FILE}", how, ir_cache,
        )
        try:
            json.loads(med.read_text())
        except (OSError, ValueError) as e:
            raise MissingWeightsError(f"ImageReward {MED_CONFIG_FILE} at {med} is not readable JSON ({e})") from e
        tok = resolve_weights(
            options.env("bert_tokenizer_path", BERT_ENV), BERT_REPO, "vocab.txt",
            "bert-base-uncased tokenizer vocab.txt",
            f"pass bert_tokenizer_path= (a folder or vocab.txt) or set ${BERT_ENV}", None,
        )
        return cls(compat.load_imagereward(ckpt, med, tok, options.device), ckpt.name)
