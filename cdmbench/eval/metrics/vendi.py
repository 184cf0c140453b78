"""Vendi score (Friedman & Dieng, 2023, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning").

VS(x₁…xₙ) = exp(−Σᵢ λᵢ log λᵢ), where λᵢ are the eigenvalues of K / n and K is a positive
semi-definite similarity matrix with Kᵢᵢ = 1 (the paper's definition 3.1, order q = 1). With the cosine
kernel K = X̂ X̂ᵀ of L2-normalised features X̂ (the paper's image experiments, and the reference
package's ``score_X``), the non-zero eigenvalues of K / n equal those of X̂ᵀ X̂ / n, so the smaller of
the two matrices is decomposed. VS is the effective number of distinct samples: n identical samples
give 1, n mutually orthogonal ones give n.
"""

from __future__ import annotations

import numpy as np

from cdmbench.errors import CdmbenchError


def vendi_score(features) -> float:
    """Vendi score (order 1, cosine kernel) of one set of samples.

    Args:
        features: (n, d) array-like, n >= 1; rows are L2-normalised here (a zero row is an error).

    Returns:
        A float in [1, min(n, d)].
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise CdmbenchError(f"vendi_score: features must be (n >= 1, d), got {x.shape}")
    if not np.isfinite(x).all():
        raise CdmbenchError("vendi_score: features are not finite")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise CdmbenchError("vendi_score: a feature vector is all zeros (its cosine similarity is undefined)")
    x = x / norms
    n, d = x.shape
    gram = x @ x.T if n <= d else x.T @ x  # same non-zero spectrum
    lam = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    lam = lam[lam > 0]
    return float(np.exp(-(lam * np.log(lam)).sum()))


# --------------------------------------------------------------------------------------------------
# The registered metric

from typing import ClassVar  # noqa: E402

from cdmbench.eval.metrics import METRICS  # noqa: E402
from cdmbench.eval.metrics.base import MetricOptions, MetricResult  # noqa: E402
from cdmbench.eval.metrics.sets import Extractor, FeatureSet, per_prompt_result  # noqa: E402


@METRICS.register("vendi")
class Vendi(FeatureSet):
    """Vendi score (cosine kernel, order 1) of each prompt's seeds in the FID feature space; mean over prompts.

    Args:
        feature_extractor: (B, 3, H, W) float [0, 1] → (B, F) features.
        protocol: identity of the extractor.
    """

    higher_is_better: ClassVar[bool] = True
    per_image: ClassVar[bool] = True  # one value per prompt: the interval is a bootstrap over prompts

    def __init__(self, feature_extractor: Extractor, protocol: str):
        self.feature_extractor = feature_extractor
        self.protocol = f"vendi|q=1|cosine|{protocol}|per-prompt-mean"
        self.reset()

    def compute(self) -> MetricResult:
        f = self.features()
        groups = self.require_seeds()
        return per_prompt_result([vendi_score(f[ix]) for ix in groups.values()], f.shape[0])

    @classmethod
    def tiny(cls, workdir) -> "Vendi":
        from cdmbench.eval.metrics.fid import RandomFeatures

        return cls(RandomFeatures(), "random-features")

    @classmethod
    def from_options(cls, evaluators, options: MetricOptions | None = None) -> "Vendi":
        """The FID feature space ``evaluators`` declares, else clean-fid Inception (``fid.feature_extractor_for``)."""
        from cdmbench.eval.metrics.fid import feature_extractor_for

        cls._require_applicable(evaluators)
        return cls(*feature_extractor_for(evaluators, options or MetricOptions()))
