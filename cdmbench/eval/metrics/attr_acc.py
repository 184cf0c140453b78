"""Toy attribute accuracy: the fraction of images whose predicted shape, colour, position and size all
match the attributes their prompt names (cdmbench.toy.shapes). Only meaningful on the toy backbone."""

from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import Applicability, MetricOptions, PerImageMetric, backbone_domain

Predictor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float [0, 1] -> (B, 4) int64 labels


def all_attributes_match(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """1.0 where all four predicted labels equal the target labels, else 0.0; float64 (B,)."""
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 4:
        raise CdmbenchError(
            f"attribute predictions {tuple(pred.shape)} and targets {tuple(target.shape)} must both be (B, 4)"
        )
    return (pred.long().cpu() == target.long().cpu()).all(dim=1).double().numpy()


@METRICS.register("attr_acc")
class AttrAccuracy(PerImageMetric):
    """Per image 1 if every attribute is right, else 0; mean over images.

    Args:
        predict: images → (B, 4) predicted (shape, colour, position, size) labels, e.g. the toy
            classifier through ``cdmbench.toy.evaluators.attribute_predictions``.
        protocol: identity of the classifier.
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(self, predict: Predictor, protocol: str = "toy-classifier"):
        super().__init__()
        self.predict = predict
        self.protocol = f"attr_acc|{protocol}|all-4-attributes"

    @classmethod
    def applies_to(cls, backbone_name: str) -> Applicability:
        if backbone_domain(backbone_name) != "shapes":
            return Applicability(False, "attribute labels exist only for the toy shapes prompts")
        return Applicability(True)

    @torch.no_grad()
    def score_batch(self, images, prompts, attrs):
        if attrs is None:
            raise CdmbenchError("attr_acc needs attrs (B, 4): the prompts' attribute labels from the toy prompt set")
        return all_attributes_match(self.predict(images), attrs)

    @classmethod
    def from_options(cls, backbone_name: str, options: MetricOptions | None = None) -> "AttrAccuracy":
        cls._require_applicable(backbone_name)
        options = options or MetricOptions()
        from cdmbench.toy import evaluators

        clf = evaluators.load_toy_classifier().to(options.device).eval()
        return cls(lambda images: evaluators.attribute_predictions(clf, images.to(options.device)))
