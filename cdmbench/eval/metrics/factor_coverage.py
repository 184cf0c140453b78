"""Mode coverage over the factors a prompt leaves free, measured per prompt with 1-D Wasserstein distances.

For a prompt p and a free factor f (e.g. the exact centre of a shape within the quadrant its caption
names), compare the factor's values over the prompt's generated seeds, ĝ_pf, with its values over
reference images of the same prompt, r̂_pf, both read by the same factor predictor (so the predictor's
own error affects both sides alike):

    d_p = (1/F) Σ_f W₁(ĝ_pf, r̂_pf) / s_f

where W₁ is the 1-D Wasserstein-1 distance (area between the two empirical CDFs) and s_f the standard
deviation of factor f over all reference values (so factors in different units weigh alike). The metric
is the mean of d_p over prompts, lower is better. A generator that draws the same image for every seed
puts a point mass where the reference is spread, and W₁ from a point mass to a distribution is at least
the latter's mean absolute deviation around its median (≈ 0.87 s for a uniform factor). Real images
score a positive floor that shrinks as the number of seeds per prompt grows (finite-sample W₁).
"""

from __future__ import annotations

import numpy as np

from cdmbench.errors import CdmbenchError


def factor_scales(reference) -> np.ndarray:
    """(F,) standard deviation of each factor over every reference value, (m, F) → (F,)."""
    r = np.asarray(reference, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2:
        raise CdmbenchError(f"reference factors must be (m >= 2, F), got {r.shape}")
    s = r.std(axis=0)
    if (s <= 0).any():
        raise CdmbenchError("a reference factor has zero spread; it is not free")
    return s


def factor_w1(generated, reference, scales) -> np.ndarray:
    """(F,) W₁(generated[:, f], reference[:, f]) / scales[f] for one prompt.

    Args:
        generated: (n, F) factor values of the prompt's generated seeds, n >= 1.
        reference: (m, F) factor values of reference images of the same prompt, m >= 1.
        scales: (F,) positive per-factor scales (``factor_scales`` of the whole reference).
    """
    from scipy.stats import wasserstein_distance

    g = np.asarray(generated, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    s = np.asarray(scales, dtype=np.float64).reshape(-1)
    if g.ndim != 2 or r.ndim != 2 or g.shape[1] != r.shape[1] or s.size != g.shape[1]:
        raise CdmbenchError(f"factor_w1: generated {g.shape}, reference {r.shape} and scales {s.shape} disagree")
    if g.shape[0] < 1 or r.shape[0] < 1:
        raise CdmbenchError("factor_w1: both sets need at least one sample")
    return np.array([wasserstein_distance(g[:, f], r[:, f]) for f in range(g.shape[1])]) / s


def prompt_coverage(generated, reference, scales) -> float:
    """d_p: the mean over factors of ``factor_w1`` for one prompt (lower is better)."""
    return float(factor_w1(generated, reference, scales).mean())


# --------------------------------------------------------------------------------------------------
# The registered metric

from dataclasses import dataclass  # noqa: E402
from typing import Callable, ClassVar  # noqa: E402

import torch  # noqa: E402

from cdmbench.eval.metrics import METRICS  # noqa: E402
from cdmbench.eval.metrics.base import Applicability, MetricOptions, MetricResult  # noqa: E402
from cdmbench.eval.metrics.sets import FeatureSet, ReferenceImages, per_prompt_result  # noqa: E402
from cdmbench.types import ATTRS, Evaluators, Prompt  # noqa: E402

FactorPredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, attrs (B, K)) -> (B, F) factors
FactorReference = Callable[[str, tuple], np.ndarray]  # (prompt, attrs) -> (m, F) factors of real images of it


@dataclass(frozen=True)
class FactorModel:
    """A backbone's free-factor predictor (what ``Evaluators.factors`` loads).

    Args:
        predict: images and their prompts' attribute labels (B, K) → (B, F) free factors.
        scales: (F,) spread of each factor over real images.
        protocol: identity of the predictor.
    """

    predict: FactorPredictor
    scales: np.ndarray
    protocol: str


@METRICS.register("factor_w1")
class FactorW1(FeatureSet):
    """Free-factor coverage: per prompt, mean over free factors of W1(seeds, real renders) / spread; mean over prompts.

    Args:
        predict: images and their captions' attrs → (B, F) free factors (the toy's ``FactorRegressor``).
        reference: (prompt, attrs) → (m, F) factors of real images of that prompt, read by the same predictor.
        scales: (F,) spread of each factor.
        protocol: identity of the predictor and reference.
    """

    higher_is_better: ClassVar[bool] = False
    per_image: ClassVar[bool] = True  # one value per prompt

    def __init__(self, predict: FactorPredictor, reference: FactorReference, scales, protocol: str):
        self.predict, self.reference = predict, reference
        self.scales = np.asarray(scales, dtype=np.float64)
        self.protocol = f"factor_w1|{protocol}|per-prompt-mean"
        self.reset()

    @classmethod
    def applies_to(cls, evaluators: Evaluators) -> Applicability:
        a = super().applies_to(evaluators)
        if a and (evaluators.factors is None or evaluators.references is None):
            return Applicability(False, "needs a free-factor predictor and real images of each prompt; the backbone "
                                        "declares none (Evaluators.factors, Evaluators.references)")
        return a

    def extract(self, images, prompts):
        if any(p.meta.get(ATTRS) is None for p in prompts):
            raise CdmbenchError(f"factor_w1 needs attribute labels (Prompt.meta[{ATTRS!r}]) for every prompt")
        attrs = torch.tensor([list(p.meta[ATTRS]) for p in prompts], dtype=torch.long)
        return self.predict(images, attrs).detach().double().cpu().numpy()

    def compute(self) -> MetricResult:
        f = self.features()
        groups = self.require_seeds()
        values = [prompt_coverage(f[ix], self.reference(p, self.attrs[ix[0]]), self.scales) for p, ix in groups.items()]
        return per_prompt_result(values, f.shape[0])

    @classmethod
    def tiny(cls, workdir) -> "FactorW1":
        """Three "factors" read off the channel means, against fixed random reference factors."""
        ref = np.random.default_rng(0).uniform(0.3, 0.7, size=(16, 3))
        return cls(lambda images, attrs: images.double().mean(dim=(2, 3)), lambda prompt, attrs: ref, np.full(3, 0.1),
                   "channel-means|ref=16-random")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "FactorW1":
        """The declared free-factor predictor (``evaluators.factors``), read on ``per_prompt`` declared real images
        per caption (``evaluators.references``) as its reference."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        model: FactorModel = evaluators.factors(options.device)
        real: ReferenceImages = evaluators.references(options.device)
        cache: dict = {}

        def reference(prompt, attrs):
            if (prompt, attrs) not in cache:
                imgs = real.render(Prompt("", prompt, {ATTRS: attrs}), real.per_prompt)
                cache[(prompt, attrs)] = np.asarray(model.predict(imgs, torch.tensor([attrs] * imgs.shape[0])))
            return cache[(prompt, attrs)]

        protocol = f"{model.protocol}|ref={real.per_prompt}-{real.name}-per-caption"
        return cls(model.predict, reference, model.scales, protocol)
