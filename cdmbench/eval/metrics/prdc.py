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
