"""Attribute accuracy (GenEval-like, Ghosh et al. 2023): the fraction of images whose predicted attributes
all match the labels their prompt names (``Prompt.meta[ATTRS]``). It needs the attribute predictor a backbone
declares (``Evaluators.attributes`` → ``AttributeModel``) and does not apply without one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import Applicability, MetricOptions, PerImageMetric
from cdmbench.types import ATTRS, Evaluators

Predictor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float [0, 1] -> (B, K) int64 labels


@dataclass(frozen=True)
class AttributeModel:
    """A backbone's attribute predictor (what ``Evaluators.attributes`` loads).

    Args:
        predict: images → (B, num_attributes) predicted labels, on the device it was loaded for.
        protocol: identity of the predictor (e.g. its weights file).
        num_attributes: labels per image; every prompt's ``meta[ATTRS]`` has this many.
    """

    predict: Predictor
    protocol: str
    num_attributes: int


def all_attributes_match(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """1.0 where every predicted label equals the target label, else 0.0; float64 (B,)."""
    if pred.shape != target.shape or pred.ndim != 2:
        raise CdmbenchError(
            f"attribute predictions {tuple(pred.shape)} and targets {tuple(target.shape)} must both be (B, K)"
        )
    return (pred.long().cpu() == target.long().cpu()).all(dim=1).double().numpy()


@METRICS.register("attr_acc")
class AttrAccuracy(PerImageMetric):
    """Per image 1 if every attribute is right, else 0; mean over images.

    Args:
        predict: images → (B, num_attributes) predicted labels.
        protocol: identity of the predictor.
        num_attributes: labels per image (recorded in the protocol).
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(self, predict: Predictor, protocol: str, num_attributes: int):
        super().__init__()
        self.predict, self.num_attributes = predict, num_attributes
        self.protocol = f"attr_acc|{protocol}|all-{num_attributes}-attributes"

    @classmethod
    def applies_to(cls, evaluators: Evaluators) -> Applicability:
        a = super().applies_to(evaluators)
        if a and evaluators.attributes is None:
            return Applicability(False, "the backbone declares no attribute predictor (Evaluators.attributes)")
        return a

    @torch.no_grad()
    def score_batch(self, images, prompts):
        missing = [p.id or p.text for p in prompts if p.meta.get(ATTRS) is None]
        if missing:
            raise CdmbenchError(f"attr_acc needs attribute labels (Prompt.meta[{ATTRS!r}]) for every prompt; "
                                f"{len(missing)} have none, e.g. {missing[0]!r}")
        target = torch.tensor([list(p.meta[ATTRS]) for p in prompts], dtype=torch.long)
        if target.shape[1] != self.num_attributes:
            raise CdmbenchError(f"attr_acc: prompts name {target.shape[1]} attributes, the predictor "
                                f"{self.num_attributes}")
        return all_attributes_match(self.predict(images), target)

    @classmethod
    def tiny(cls, workdir) -> "AttrAccuracy":
        """A dummy predictor: four labels read off the images' channel means."""
        def predict(images: torch.Tensor) -> torch.Tensor:
            m = images.float().mean(dim=(2, 3))  # (B, 3)
            return torch.stack([(m[:, 0] * 6).long() % 3, (m[:, 1] * 8).long() % 4, (m[:, 2] * 8).long() % 4,
                                (m.mean(1) * 4).long() % 2], dim=1)

        return cls(predict, "channel-means", 4)

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "AttrAccuracy":
        """The declared ``evaluators.attributes`` predictor (there is no default)."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        m: AttributeModel = evaluators.attributes(options.device)
        return cls(m.predict, m.protocol, m.num_attributes)
