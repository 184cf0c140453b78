"""Precision and recall (Kynkäänniemi et al., 2019) and density and coverage (Naeem et al., 2020) of a
generated set against a reference set, from k-nearest-neighbour balls in a feature space.

With real features X = {xᵢ} (N of them), generated features Y = {yⱼ} (M), and NND_k(u, S) the distance
from u to its k-th nearest neighbour in S other than itself:

- precision = (1/M) Σⱼ 1[∃ i: ‖yⱼ − xᵢ‖ ≤ NND_k(xᵢ, X)]   (Kynkäänniemi eq. 1-2: generated samples inside
  the real manifold)
- recall    = (1/N) Σᵢ 1[∃ j: ‖xᵢ − yⱼ‖ ≤ NND_k(yⱼ, Y)]   (real samples inside the generated manifold)
- density   = 1/(kM) Σⱼ Σᵢ 1[‖yⱼ − xᵢ‖ ≤ NND_k(xᵢ, X)]   (Naeem eq. 3: how many real balls hold each sample)
- coverage  = (1/N) Σᵢ 1[∃ j: ‖yⱼ − xᵢ‖ ≤ NND_k(xᵢ, X)]   (Naeem eq. 4: real balls that hold any sample)

Naeem et al. recommend k = 5 with equal set sizes; both use Euclidean distance. Distances are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdmbench.errors import CdmbenchError

DEFAULT_K = 5
PRDC_NAMES = ("precision", "recall", "density", "coverage")


@dataclass(frozen=True)
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, b, metric="euclidean")


def kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    """(N,) distance from each row of x to its k-th nearest other row (float64)."""
    d = _pairwise(x, x)
    np.fill_diagonal(d, np.inf)  # a point is not its own neighbour
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real, fake, k: int = DEFAULT_K) -> PRDC:
    """Precision, recall, density and coverage of ``fake`` (M, F) against ``real`` (N, F).

    Args:
        real, fake: feature arrays with the same F; N > k and M > k.
        k: neighbourhood size (Naeem et al.: 5).
    """
    x = np.asarray(real, dtype=np.float64)
    y = np.asarray(fake, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise CdmbenchError(f"prdc: real {x.shape} and fake {y.shape} must be (N, F) and (M, F) with one F")
    if not isinstance(k, int) or k < 1:
        raise CdmbenchError(f"prdc: k must be a positive integer, got {k!r}")
    if x.shape[0] <= k or y.shape[0] <= k:
        raise CdmbenchError(f"prdc: both sets need more than k={k} samples, got {x.shape[0]} real, {y.shape[0]} fake")
    r_real = kth_neighbour_radii(x, k)  # (N,)
    r_fake = kth_neighbour_radii(y, k)  # (M,)
    d = _pairwise(x, y)  # (N, M)
    in_real_ball = d <= r_real[:, None]  # y_j inside the ball of x_i
    in_fake_ball = d <= r_fake[None, :]  # x_i inside the ball of y_j
    return PRDC(
        precision=float(in_real_ball.any(axis=0).mean()),
        recall=float(in_fake_ball.any(axis=1).mean()),
        density=float(in_real_ball.sum() / (k * y.shape[0])),
        coverage=float(in_real_ball.any(axis=1).mean()),
    )


# --------------------------------------------------------------------------------------------------
# The registered metrics: one per number, each against the same reference set

import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, ClassVar  # noqa: E402

import torch  # noqa: E402

from cdmbench.errors import MissingWeightsError  # noqa: E402
from cdmbench.eval.metrics import METRICS  # noqa: E402
from cdmbench.eval.metrics.base import MetricOptions, MetricResult  # noqa: E402
from cdmbench.eval.metrics.sets import Extractor, FeatureSet, ReferenceImages  # noqa: E402
from cdmbench.types import ATTRS, Evaluators, Prompt  # noqa: E402

PRDC_REFERENCE_ENV = "CDMBENCH_PRDC_REF"
# Reference features for the prompts and attrs seen: (prompts, attrs) -> (N, F). A backbone that declares real
# images per prompt (``Evaluators.references``) gives real images of the same captions; otherwise the features
# of a fixed folder of real images.
ReferenceFeatures = Callable[[list[str], list], np.ndarray]
_REFERENCE_CACHE: dict[tuple, tuple] = {}  # (extractor id, protocol, reference, captions, attrs) → (extractor, features)


class _PRDCMetric(FeatureSet):
    """Shared body of the four PRDC metrics; ``which`` picks the number."""

    which: ClassVar[str]
    higher_is_better: ClassVar[bool] = True

    def __init__(self, feature_extractor: Extractor, reference: ReferenceFeatures, protocol: str, k: int = DEFAULT_K):
        self.feature_extractor, self.reference, self.k = feature_extractor, reference, k
        self.protocol = f"{self.which}|prdc-k={k}|{protocol}"
        self.reset()

    def compute(self) -> MetricResult:
        fake = self.features()
        real = np.asarray(self.reference(self.prompts, self.attrs), dtype=np.float64)
        return MetricResult(value=getattr(prdc(real, fake, self.k), self.which), per_image=None, n=fake.shape[0])

    @classmethod
    def tiny(cls, workdir):
        """Random-projection features against those of 32 fixed random images."""
        from cdmbench.eval.metrics.fid import RandomFeatures

        extractor = RandomFeatures()
        with torch.no_grad():
            real = extractor(torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))).double().numpy()
        return cls(extractor, lambda prompts, attrs: real, "random-features|ref=32-random-images")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None):
        """With declared real images per prompt (``evaluators.references``): real images of the same captions, as
        many per caption as it has images. Otherwise the features of the folder ``prdc_reference`` /
        $CDMBENCH_PRDC_REF, else the FID reference when it is a folder."""
        from cdmbench.eval.metrics.fid import feature_extractor_for, folder_features

        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        extractor, protocol = feature_extractor_for(evaluators, options)
        if evaluators.references is not None:
            real: ReferenceImages = evaluators.references(options.device)

            def reference(prompts, attrs):
                # the four PRDC metrics of every image set of an eval ask for the same captions' features
                key = (id(extractor), protocol, real.name, tuple(prompts), tuple(attrs))
                if key not in _REFERENCE_CACHE:
                    _REFERENCE_CACHE.clear()  # one caption list at a time (an eval's sets share it)
                    _REFERENCE_CACHE[key] = (extractor, same_captions(prompts, attrs))  # held: its id stays its own
                return _REFERENCE_CACHE[key][1]

            def same_captions(prompts, attrs):
                counts: dict[tuple, int] = {}
                for p, a in zip(prompts, attrs):
                    counts[(p, a)] = counts.get((p, a), 0) + 1
                items = [(Prompt("", p, {} if a is None else {ATTRS: a}), n) for (p, a), n in counts.items()]
                imgs = torch.cat([real.render(p, max(n, real.per_prompt))[:n] for p, n in items])
                return np.concatenate([extractor(chunk).detach().double().cpu().numpy() for chunk in imgs.split(512)])

            return cls(extractor, reference, f"{protocol}|ref={real.name}-same-captions")
        folder = os.environ.get(PRDC_REFERENCE_ENV) or options.fid_reference or os.environ.get("CDMBENCH_FID_REF")
        if folder is None or not Path(folder).expanduser().is_dir():
            raise MissingWeightsError(f"{cls.which} needs a folder of real reference images: "
                                      f"set ${PRDC_REFERENCE_ENV} (or pass fid_reference= as a folder)")
        cached: list[np.ndarray] = []

        def reference(prompts, attrs):
            if not cached:
                cached.append(folder_features(Path(folder).expanduser(), extractor))
            return cached[0]

        return cls(extractor, reference, f"{protocol}|ref={Path(folder).name}")


@METRICS.register("precision")
class Precision(_PRDCMetric):
    """Precision (Kynkäänniemi 2019, k=5): share of generated images inside the real set's k-NN balls (FID features)."""

    which = "precision"


@METRICS.register("recall")
class Recall(_PRDCMetric):
    """Recall (Kynkäänniemi 2019, k=5): share of real images inside the generated set's k-NN balls (FID features)."""

    which = "recall"


@METRICS.register("density")
class Density(_PRDCMetric):
    """Density (Naeem 2020, k=5): mean count of real k-NN balls holding a generated image, over k (FID features)."""

    which = "density"


@METRICS.register("coverage")
class Coverage(_PRDCMetric):
    """Coverage (Naeem 2020, k=5): share of real k-NN balls that hold a generated image (FID features)."""

    which = "coverage"
