"""Across-training-seed statistics: cell means with intervals, paired method comparisons, compact ranks.

A *cell* is one (method, steps, metric) on one arch. Behind it are ``k`` training seeds, each scored on
the same ``n`` eval items (a sample's identity is (prompt id, seed)), as per-item scores (CLIP, accuracy,
...) or per-item features for a set-level metric (FID): ``CellData.units`` maps a training seed to a
``(n,)`` or ``(n, F)`` array whose rows follow ``CellData.items``.

The interval is a **hierarchical percentile bootstrap** (Davison & Hinkley 1997, §3.8; Field & Welsh 2007
for the two-level case). One replicate:

1. draws ``n`` item indices with replacement, the **same** draw for every cell that shares the items
   (common random numbers: this is what makes a comparison paired);
2. recomputes each training seed's statistic on the drawn items (the mean of the drawn scores, or the
   Fréchet distance of the drawn features' mean and covariance: FID is recomputed, not averaged);
3. draws ``k`` training seeds with replacement, independently per cell (different methods' runs are
   independent), and averages their statistics. The deviation of that seed draw from the all-seed mean
   is scaled by √(k/(k−1)), so the seed part of the bootstrap variance is the unbiased s²/k and not the
   plug-in (k−1)/k · s²/k (with k = 3 the plain bootstrap would be 18 % too narrow in width).

With one training seed this is the per-image bootstrap of before; it still ignores seed-to-seed
variation, which is why the seed count ``k`` is reported next to every interval. For small ``k`` the
t-interval over the per-seed values (``CellSummary.t_low/t_high``, scipy's ``t.interval``; item noise
shared by all seeds is not in it) is also kept in the tidy output; the report shows the bootstrap one.

A paired difference ``A − B`` takes the replicates of both cells from the same item draws; its 95 %
percentile interval decides the verdict: "better" / "worse" (in the metric's direction) when the interval
excludes 0, "tie" otherwise. The compact rank of a method is 1 + the number of methods significantly
better than it, so methods nobody beats share rank 1. Reference rows (the teacher) are compared against
but never ranked.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import numpy as np

from cdmbench.errors import CdmbenchError

CONFIDENCE = 0.95
N_RESAMPLES = 1000
SEED = 0
Verdict = Literal["better", "worse", "tie"]
Statistic = Callable[[np.ndarray], float]  # (n, F) features of the drawn items -> the set-level value


# --------------------------------------------------------------------------------------------------
# Statistics of one unit (one training seed's items)


def mean_statistic(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Mean of per-item scores ``values`` (n,) over each row of ``draws`` (B, n) → (B,)."""
    out = np.empty(draws.shape[0], dtype=np.float64)
    chunk = max(1, 4_000_000 // max(1, draws.shape[1]))
    for lo in range(0, draws.shape[0], chunk):
        out[lo:lo + chunk] = values[draws[lo:lo + chunk]].mean(axis=1)
    return out


class FrechetToReference:
    """Fréchet distance of a feature set's Gaussian to fixed reference statistics (FID).

    The same formula as ``cdmbench.eval.metrics.fid.frechet_distance`` (d² = ‖μ−μ_r‖² + Tr Σ + Tr Σ_r −
    2 Tr (Σ_r^½ Σ Σ_r^½)^½), with the reference's square root computed once, because the bootstrap calls
    it thousands of times; a test checks both agree.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.asarray(mu, dtype=np.float64).reshape(-1)
        s = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        if s.shape != (self.mu.size, self.mu.size):
            raise CdmbenchError(f"reference sigma {s.shape} does not match mu ({self.mu.size},)")
        w, v = np.linalg.eigh((s + s.T) / 2.0)
        self.root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        self.trace = float(np.trace(s))

    def __call__(self, features: np.ndarray) -> float:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.mu.size or f.shape[0] < 2:
            raise CdmbenchError(f"features must be (n >= 2, {self.mu.size}), got {f.shape}")
        mu = f.mean(axis=0)
        sigma = np.cov(f, rowvar=False)
        m = self.root @ sigma @ self.root
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum()
        d = mu - self.mu
        return float(d @ d + np.trace(sigma) + self.trace - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class CellData:
    """The scores behind one cell.

    Args:
        key: the cell's identity (e.g. (arch, method, steps, metric)); it also seeds the cell's own
            training-seed draws, so results do not depend on the order cells are processed in.
        items: the eval items' identities ((prompt id, seed) pairs), the rows of every unit.
        units: training seed → per-item scores (n,) or, with ``statistic``, per-item features (n, F).
        statistic: None for per-item metrics (the value is the mean); else the set-level statistic.
    """

    key: tuple
    items: tuple
    units: dict[int, np.ndarray]
    statistic: Statistic | None = None

    def __post_init__(self):
        if not self.units:
            raise CdmbenchError(f"cell {self.key}: no training seeds")
        n = len(self.items)
        for s, u in self.units.items():
            want = 1 if self.statistic is None else 2
            if u.ndim != want or u.shape[0] != n:
                raise CdmbenchError(f"cell {self.key}, training seed {s}: expected {n} item rows "
                                    f"({'scores' if want == 1 else 'features'}), got shape {u.shape}")
            if not np.isfinite(u).all():
                raise CdmbenchError(f"cell {self.key}, training seed {s}: non-finite scores")

    @property
    def seeds(self) -> list[int]:
        return sorted(self.units)

    def point(self, seed: int) -> float:
        """The statistic of one training seed on every item."""
        u = self.units[seed]
        return float(u.mean()) if self.statistic is None else float(self.statistic(u))

    def on_draws(self, seed: int, draws: np.ndarray) -> np.ndarray:
        """The statistic of one training seed on each item draw (B, n) → (B,)."""
        u = self.units[seed]
        if self.statistic is None:
            return mean_statistic(u, draws)
        return np.array([self.statistic(u[d]) for d in draws], dtype=np.float64)


@dataclass(frozen=True)
class CellSummary:
    """Across-training-seed summary of one cell (see the module docstring for the interval)."""

    key: tuple
    mean: float  # mean over training seeds of the per-seed value
    low: float  # hierarchical bootstrap 95 % interval
    high: float
    t_low: float  # t-interval over the per-seed values (nan with one seed)
    t_high: float
    n_seeds: int
    n_items: int
    per_seed: dict[int, float] = field(default_factory=dict)


def item_draws(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(B, n) item indices drawn with replacement; a pure function of (n, B, seed), shared by every cell."""
    return np.random.default_rng([seed, n, n_resamples]).integers(0, n, size=(n_resamples, n))


def _cell_rng(key: tuple, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (scipy); (nan, nan) for fewer than two values."""
    from scipy import stats

    x = np.asarray(list(values), dtype=np.float64)
    if x.size < 2:
        return (math.nan, math.nan)
    sem = x.std(ddof=1) / math.sqrt(x.size)
    if sem == 0:
        return (float(x.mean()), float(x.mean()))
    lo, hi = stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=sem)
    return float(lo), float(hi)


class Bootstrap:
    """Replicates of every cell over one shared set of item draws (per item set), cached per cell.

    Args:
        n_resamples: bootstrap replicates B.
        seed: seed of the item and training-seed draws.
        confidence: interval coverage.
    """

    def __init__(self, n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE):
        if n_resamples < 10:
            raise CdmbenchError(f"n_resamples must be >= 10, got {n_resamples}")
        if not 0.0 < confidence < 1.0:
            raise CdmbenchError(f"confidence must be in (0, 1), got {confidence}")
        self.n_resamples, self.seed, self.confidence = n_resamples, seed, confidence
        self._draws: dict[tuple, np.ndarray] = {}
        self._reps: dict[tuple, np.ndarray] = {}

    def draws(self, items: tuple) -> np.ndarray:
        if items not in self._draws:
            self._draws[items] = item_draws(len(items), self.n_resamples, self.seed)
        return self._draws[items]

    def replicates(self, cell: CellData) -> np.ndarray:
        """(B,) bootstrap replicates of the cell's across-seed mean."""
        if cell.key in self._reps:
            return self._reps[cell.key]
        draws = self.draws(cell.items)
        seeds = cell.seeds
        k = len(seeds)
        per_seed = np.stack([cell.on_draws(s, draws) for s in seeds])  # (k, B)
        all_mean = per_seed.mean(axis=0)
        if k > 1:
            pick = _cell_rng(cell.key, self.seed).integers(0, k, size=(self.n_resamples, k))  # (B, k)
            drawn = per_seed[pick, np.arange(self.n_resamples)[:, None]].mean(axis=1)
            reps = all_mean + math.sqrt(k / (k - 1)) * (drawn - all_mean)
        else:
            reps = all_mean
        self._reps[cell.key] = reps
        return reps

    def interval(self, reps: np.ndarray) -> tuple[float, float]:
        a = (1.0 - self.confidence) / 2.0
        lo, hi = np.quantile(reps, [a, 1.0 - a])
        return float(lo), float(hi)

    def summarize(self, cell: CellData) -> CellSummary:
        per_seed = {s: cell.point(s) for s in cell.seeds}
        lo, hi = self.interval(self.replicates(cell))
        t_lo, t_hi = t_interval(per_seed.values(), self.confidence)
        return CellSummary(cell.key, float(np.mean(list(per_seed.values()))), lo, hi, t_lo, t_hi,
                           len(per_seed), len(cell.items), per_seed)

    def compare(self, a: CellData, b: CellData, higher_is_better: bool) -> "Comparison":
        """Paired comparison A − B on the same items."""
        if a.items != b.items:
            raise CdmbenchError(f"cells {a.key} and {b.key} were not scored on the same (prompt, seed) items")
        diff = self.replicates(a) - self.replicates(b)
        point = float(np.mean([a.point(s) for s in a.seeds]) - np.mean([b.point(s) for s in b.seeds]))
        lo, hi = self.interval(diff)
        return Comparison(a.key, b.key, point, lo, hi, verdict(lo, hi, higher_is_better))


def verdict(low: float, high: float, higher_is_better: bool) -> Verdict:
    """"better"/"worse" for A when the interval of A − B excludes 0 (in the metric's direction), else "tie"."""
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "tie"


@dataclass(frozen=True)
class Comparison:
    """A − B with its paired 95 % interval and A's verdict."""

    a: tuple
    b: tuple
    diff: float
    low: float
    high: float
    verdict: Verdict


def compact_ranks(names: list[str], comparisons: dict[tuple[str, str], Verdict]) -> dict[str, int]:
    """Rank of each name = 1 + how many others are significantly better than it.

    Args:
        names: the ranked methods (no reference rows).
        comparisons: (a, b) → a's verdict against b, for every ordered or unordered pair of ``names``.
    """
    def beats(x: str, y: str) -> bool:
        if (x, y) in comparisons:
            return comparisons[(x, y)] == "better"
        if (y, x) in comparisons:
            return comparisons[(y, x)] == "worse"
        raise CdmbenchError(f"no comparison between {x!r} and {y!r}")

    return {n: 1 + sum(beats(o, n) for o in names if o != n) for n in names}


__all__ = ["Bootstrap", "CellData", "CellSummary", "Comparison", "FrechetToReference", "compact_ranks",
           "item_draws", "mean_statistic", "t_interval", "verdict"]
