"""Across-seed intervals, paired verdicts and compact ranks against independent numpy/scipy computations."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from cdmbench.errors import CdmbenchError
from cdmbench.eval.metrics.fid import frechet_distance
from cdmbench.reports.stats import (Bootstrap, CellData, FrechetToReference, compact_ranks, item_draws,
                                    t_interval, verdict)

ITEMS = tuple((f"p{i}", s) for i in range(100) for s in range(4))  # 400 (prompt, seed) items


def cell(name, units, statistic=None, items=ITEMS):
    return CellData(("toy", name, 1, "m"), items, units, statistic)


def test_t_interval_matches_textbook_formula():
    x = np.array([0.61, 0.70, 0.66])
    half = sps.t.ppf(0.975, df=2) * x.std(ddof=1) / math.sqrt(3)  # t_{0.975, k-1} · s / √k
    lo, hi = t_interval(x)
    assert lo == pytest.approx(x.mean() - half, rel=1e-12)
    assert hi == pytest.approx(x.mean() + half, rel=1e-12)
    assert all(math.isnan(v) for v in t_interval([0.5]))


def test_one_seed_interval_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(1)
    v = rng.normal(0.7, 0.2, size=len(ITEMS))
    s = Bootstrap(n_resamples=4000).summarize(cell("a", {0: v}))
    ref = sps.bootstrap((v,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                        random_state=np.random.default_rng(7)).confidence_interval
    half = (ref.high - ref.low) / 2  # independent resampler: agree up to Monte-Carlo error
    assert s.mean == pytest.approx(v.mean())
    assert s.low == pytest.approx(ref.low, abs=0.08 * half)
    assert s.high == pytest.approx(ref.high, abs=0.08 * half)
    assert (s.n_seeds, s.n_items) == (1, len(ITEMS))


def test_hierarchical_spread_matches_the_two_level_variance():
    """k seeds with seed offsets: Var(replicates) ≈ Var_i(ū_i)/n + s²_seeds/k (the √(k/(k−1)) inflation
    makes the seed part unbiased)."""
    rng = np.random.default_rng(2)
    item = rng.normal(0, 1.0, size=len(ITEMS))
    units = {s: 5.0 + off + item + rng.normal(0, 0.5, size=len(ITEMS)) for s, off in enumerate([0.0, 0.3, -0.2, 0.5])}
    c = cell("a", units)
    boot = Bootstrap(n_resamples=6000)
    reps = boot.replicates(c)
    per_seed = np.array([u.mean() for u in units.values()])
    ubar = np.mean(list(units.values()), axis=0)
    expected = ubar.var() / len(ITEMS) + per_seed.var(ddof=1) / len(units)
    assert reps.var() == pytest.approx(expected, rel=0.1)
    s = boot.summarize(c)
    assert s.mean == pytest.approx(per_seed.mean())
    assert (s.t_low, s.t_high) == pytest.approx(t_interval(per_seed))
    assert s.per_seed == pytest.approx(dict(enumerate(per_seed)))


def test_identical_methods_tie_and_a_shifted_one_is_better():
    rng = np.random.default_rng(3)
    units = {s: rng.normal(0.6, 0.2, size=len(ITEMS)) for s in range(3)}
    boot = Bootstrap()
    a, b = cell("a", units), cell("b", {s: u.copy() for s, u in units.items()})
    same = boot.compare(a, b, higher_is_better=True)
    # independent training-seed draws per method: the interval has width, centred on 0
    assert same.diff == 0.0 and same.verdict == "tie" and same.low < 0 < same.high
    up = cell("up", {s: u + 0.1 for s, u in units.items()})
    c = boot.compare(up, a, higher_is_better=True)
    assert c.verdict == "better" and c.low > 0 and c.low <= 0.1 <= c.high
    assert c.diff == pytest.approx(0.1)
    assert boot.compare(up, a, higher_is_better=False).verdict == "worse"
    assert boot.compare(a, up, higher_is_better=True).verdict == "worse"


def test_pairing_separates_what_overlapping_cell_intervals_cannot():
    """Shared item difficulty dominates: the cells' intervals overlap, the paired difference does not."""
    rng = np.random.default_rng(4)
    difficulty = rng.normal(0, 1.0, size=len(ITEMS))
    a = cell("a", {0: difficulty + 0.05 + rng.normal(0, 0.02, len(ITEMS))})
    b = cell("b", {0: difficulty + rng.normal(0, 0.02, len(ITEMS))})
    boot = Bootstrap()
    sa, sb = boot.summarize(a), boot.summarize(b)
    assert sa.low < sb.high  # unpaired: indistinguishable
    assert boot.compare(a, b, higher_is_better=True).verdict == "better"


def test_a_tiny_shift_under_seed_noise_is_a_tie():
    rng = np.random.default_rng(5)
    a = cell("a", {s: rng.normal(0.5 + rng.normal(0, 0.05), 0.1, len(ITEMS)) for s in range(3)})
    b = cell("b", {s: rng.normal(0.5 + rng.normal(0, 0.05), 0.1, len(ITEMS)) for s in range(3)})
    assert Bootstrap().compare(a, b, higher_is_better=True).verdict == "tie"


def test_fid_cells_recompute_the_distance_on_resampled_features():
    rng = np.random.default_rng(6)
    ref_feats = rng.normal(0, 1, size=(2000, 8))
    mu, sigma = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    fid = FrechetToReference(mu, sigma)
    feats = rng.normal(0, 1, size=(len(ITEMS), 8))
    assert fid(feats) == pytest.approx(frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma), rel=1e-9)
    boot = Bootstrap(n_resamples=200)
    near = cell("near", {0: feats, 1: feats + rng.normal(0, 0.05, feats.shape)}, fid)
    twin = cell("twin", {0: feats.copy(), 1: near.units[1].copy()}, fid)
    far = cell("far", {0: feats + 1.0, 1: near.units[1] + 1.0}, fid)
    assert boot.compare(near, twin, higher_is_better=False).verdict == "tie"
    assert boot.compare(near, far, higher_is_better=False).verdict == "better"  # lower FID
    s = boot.summarize(far)
    assert s.low <= s.mean <= s.high and s.high > s.low
    assert s.mean == pytest.approx(np.mean([fid(u) for u in far.units.values()]))


def test_compact_ranks_share_a_rank_when_indistinguishable():
    v = {("a", "b"): "better", ("a", "c"): "better", ("b", "c"): "tie"}
    assert compact_ranks(["a", "b", "c"], v) == {"a": 1, "b": 2, "c": 2}
    chain = {("a", "b"): "tie", ("b", "c"): "tie", ("a", "c"): "better"}
    assert compact_ranks(["a", "b", "c"], chain) == {"a": 1, "b": 1, "c": 2}
    with pytest.raises(CdmbenchError, match="no comparison"):
        compact_ranks(["a", "b"], {})


def test_verdict_direction_and_validation():
    assert verdict(0.1, 0.2, True) == "better" and verdict(0.1, 0.2, False) == "worse"
    assert verdict(-0.2, -0.1, False) == "better" and verdict(-0.1, 0.1, True) == "tie"
    with pytest.raises(CdmbenchError, match="same"):
        Bootstrap().compare(cell("a", {0: np.zeros(len(ITEMS))}), cell("b", {0: np.zeros(4)}, items=ITEMS[:4]), True)
    with pytest.raises(CdmbenchError, match="item rows"):
        cell("a", {0: np.zeros(3)})
    d = item_draws(10, 50)
    assert d.shape == (50, 10) and (item_draws(10, 50) == d).all()
