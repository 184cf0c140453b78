"""Value types shared by prompts, backbones and the eval layer; a leaf module (imports nothing of cdmbench).

``Prompt`` is what the harness samples and scores (its identity is the id, style.md principle 8);
``Evaluators`` is what a backbone declares about how its images are scored (principle 16): the models
its metrics use, injected the way torchmetrics' ``FrechetInceptionDistance(feature=...)`` takes one, and
which metrics do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

ATTRS = "attrs"  # ``Prompt.meta`` key: the attribute labels a prompt names (attribute accuracy checks them)


@dataclass(frozen=True)
class Prompt:
    """An evaluation prompt: stable id, caption text and free-form metadata (read-only by convention).

    ``meta`` holds what a backbone attaches to its prompts, e.g. the toy's attribute labels under
    ``meta[ATTRS]``; it is part of the scored image set's identity, so keep it JSON-serialisable.
    """

    id: str
    text: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


Loader = Callable[[str], Any]  # device -> a model, called once when the metric that uses it is built


@dataclass(frozen=True)
class Evaluators:
    """The models a backbone's metrics use, and the metrics that do not apply to its images.

    Each model is a loader ``device -> model`` (declaring costs nothing; weights load when a metric is
    built); None means the metric's real default: clean-fid Inception with a user-given reference for FID,
    OpenAI CLIP ViT-L/14 for the CLIP score. Attribute accuracy has no default: without a predictor it
    does not apply.

    Args:
        fid: device -> ``cdmbench.eval.metrics.fid.FIDFeatures`` (feature extractor, protocol, reference stats).
        clip: device -> ``cdmbench.eval.metrics.clip_score.ClipModel`` (open_clip-style model, preprocess, tokenizer).
        attributes: device -> ``cdmbench.eval.metrics.attr_acc.AttributeModel`` (images -> predicted labels).
        references: device -> ``cdmbench.eval.metrics.sets.ReferenceImages`` (real images of a given prompt), for
            metrics that compare with real images of the same prompt (PRDC, detail, free-factor coverage).
        factors: device -> ``cdmbench.eval.metrics.factor_coverage.FactorModel`` (images -> free factors).
        not_applicable: metric name -> why it does not apply (a "not_applicable: <reason>" result row).
    """

    fid: Loader | None = None
    clip: Loader | None = None
    attributes: Loader | None = None
    references: Loader | None = None
    factors: Loader | None = None
    not_applicable: Mapping[str, str] = field(default_factory=dict)
