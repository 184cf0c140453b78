"""HPS v2.1 (Wu et al., 2023, "Human Preference Score v2"): an open_clip ViT-H-14 fine-tuned on human
preferences; the score is the cosine of the normalised image and prompt features.

Scale: this module reports **100 · cos** per image (what ``hpsv2.evaluate`` and the HPS v2.1 README tables
report, ≈ 25-33); ``hpsv2.score`` returns the raw cosine (≈ 0.28). v2.0 and v2.1 are not comparable, so
the version is part of the protocol string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch

from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import MetricOptions, PerImageMetric, resolve_weights
from cdmbench.eval.metrics.clip_score import TINY_CLIP, load_openclip, openclip_cosine, tiny_open_clip
from cdmbench.types import Evaluators

HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_REPO = "xswu/HPSv2"
HPS_ENV = "CDMBENCH_HPS_PATH"
_HOW = f"download {HPS_FILE} from the hub repo {HPS_REPO} and pass hps_path= or set ${HPS_ENV}"


def resolve_hps_checkpoint(path: str | None) -> Path:
    """The local HPS v2.1 checkpoint: ``path`` if given, else the HF cache (downloading when online)."""
    return resolve_weights(path, HPS_REPO, HPS_FILE, f"HPS v2.1 checkpoint {HPS_FILE}", _HOW)


@METRICS.register("hps")
class HPSv21(PerImageMetric):
    """HPS v2.1: per image 100 · cos(image, prompt) from the HPS-tuned open_clip model.

    Args:
        model, preprocess, tokenizer: the open_clip model holding the HPS weights, its batched
            preprocess (``clip_score.PILBatchPreprocess``) and tokenizer.
        checkpoint: name of the weights file (recorded in the protocol).
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable,
        tokenizer: Callable,
        checkpoint: str = HPS_FILE,
        arch: str = "ViT-H-14",
    ):
        super().__init__()
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.protocol = f"hps-v2.1|open_clip:{arch}|ckpt={checkpoint}|score=100*cos"

    def score_batch(self, images, prompts):
        return 100.0 * openclip_cosine(self.model, self.preprocess, self.tokenizer, images, [p.text for p in prompts])

    @classmethod
    def tiny(cls, workdir: Path) -> "HPSv21":
        """The HPS scoring path on a random tiny open_clip model."""
        return cls(*tiny_open_clip(workdir), checkpoint="random", arch=TINY_CLIP)

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "HPSv21":
        """open_clip ``hps_model`` (ViT-H-14) built without pretrained weights, then the HPS checkpoint from
        ``hps_path`` / $CDMBENCH_HPS_PATH / the hub cache of xswu/HPSv2 (a state dict, or {'state_dict': ...})."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        ckpt = resolve_hps_checkpoint(options.env("hps_path", HPS_ENV))
        model, preprocess, tokenizer = load_openclip(options.hps_model, str(ckpt), options.device, "HPS v2.1", _HOW)
        return cls(model, preprocess, tokenizer, ckpt.name, options.hps_model)
