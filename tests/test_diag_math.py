"""Known answers for the diagnostic metrics' math (pure functions, no models)."""

import itertools

import numpy as np
import pytest
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.eval.metrics.detail import detail_ratio_score, high_frequency_share
from cdmbench.eval.metrics.factor_coverage import factor_scales, factor_w1, prompt_coverage
from cdmbench.eval.metrics.prdc import prdc
from cdmbench.eval.metrics.teacher_fd import paired_feature_distance, teacher_frechet
from cdmbench.eval.metrics.vendi import vendi_score

# --------------------------------------------------------------------------------------------------
# Vendi


@pytest.mark.parametrize("n, d", [(6, 16), (40, 8)])
def test_vendi_identical_samples_is_one(n, d):
    x = np.tile(np.random.default_rng(0).normal(size=(1, d)), (n, 1))
    assert vendi_score(x) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_vendi_orthonormal_features_is_n(n):
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))
    assert vendi_score(3.0 * q[:n]) == pytest.approx(n, rel=1e-9)  # scale does not matter (cosine kernel)


def test_vendi_matches_the_definition_and_grows_with_spread():
    rng = np.random.default_rng(2)
    for n, d in [(10, 4), (5, 30)]:
        x = rng.normal(size=(n, d))
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        lam = np.linalg.eigvalsh(xn @ xn.T / n)
        lam = lam[lam > 1e-15]
        assert vendi_score(x) == pytest.approx(np.exp(-(lam * np.log(lam)).sum()), rel=1e-9)
    centre = np.ones(8)
    tight = vendi_score(centre + 0.05 * rng.normal(size=(20, 8)))
    wide = vendi_score(centre + 1.0 * rng.normal(size=(20, 8)))
    assert 1.0 < tight < wide


def test_vendi_rejects_zero_vectors():
    with pytest.raises(CdmbenchError, match="all zeros"):
        vendi_score(np.zeros((3, 4)))


# --------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage


def direct_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """The papers' formulas, written as loops over samples (Kynkäänniemi 2019 eq. 1-2, Naeem 2020 eq. 3-4)."""

    def nnd(u, pool, self_index):
        d = sorted(np.linalg.norm(u - p) for j, p in enumerate(pool) if j != self_index)
        return d[k - 1]

    r_real = [nnd(x, real, i) for i, x in enumerate(real)]
    r_fake = [nnd(y, fake, j) for j, y in enumerate(fake)]
    n, m = len(real), len(fake)
    precision = sum(any(np.linalg.norm(y - real[i]) <= r_real[i] for i in range(n)) for y in fake) / m
    recall = sum(any(np.linalg.norm(x - fake[j]) <= r_fake[j] for j in range(m)) for x in real) / n
    density = sum(np.linalg.norm(y - real[i]) <= r_real[i] for y in fake for i in range(n)) / (k * m)
    coverage = sum(any(np.linalg.norm(fake[j] - real[i]) <= r_real[i] for j in range(m)) for i in range(n)) / n
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def mixture(rng, n, means, scale=0.3):
    which = rng.integers(len(means), size=n)
    return means[which] + scale * rng.normal(size=(n, means.shape[1]))


def test_prdc_matches_a_direct_implementation_on_gaussians():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 3))
    fake = 0.3 + 1.2 * rng.normal(size=(50, 3))
    for k in (1, 3, 5):
        got = prdc(real, fake, k)
        want = direct_prdc(real, fake, k)
        for name, v in want.items():
            assert getattr(got, name) == pytest.approx(v, abs=1e-12), (k, name)


def test_recall_and_coverage_drop_when_half_the_modes_are_missing():
    rng = np.random.default_rng(4)
    means = 6.0 * np.eye(4, 8)  # 4 well-separated modes
    real = mixture(rng, 400, means)
    full = prdc(real, mixture(rng, 400, means))
    half = prdc(real, mixture(rng, 400, means[:2]))
    assert full.precision > 0.9 and half.precision > 0.9  # what it draws is still realistic
    assert full.recall > 0.9 and half.recall < 0.6
    assert full.coverage > 0.9 and half.coverage < 0.6
    assert 0.7 < full.density < 1.3


def test_prdc_needs_more_than_k_samples():
    with pytest.raises(CdmbenchError, match="more than k=5"):
        prdc(np.zeros((5, 2)), np.zeros((10, 2)), 5)


# --------------------------------------------------------------------------------------------------
# Fidelity to the teacher


def test_teacher_frechet_of_other_seeds_is_near_its_floor():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(2000, 6))  # "teacher seeds 0..": features of one distribution
    b = rng.normal(size=(2000, 6))  # "teacher, other seeds"
    floor = teacher_frechet(a, b)
    assert teacher_frechet(a, a) == pytest.approx(0.0, abs=1e-9)
    assert floor < 0.05  # finite-sample bias only: ~ 2·d/n·... for unit covariances
    assert teacher_frechet(a, b + 0.5) > 10 * floor  # a student that drifted
    assert teacher_frechet(a, 0.6 * b) > 10 * floor  # a student that lost spread


def test_paired_distance_is_zero_for_the_same_items_and_grows_with_offset():
    rng = np.random.default_rng(6)
    t = rng.normal(size=(10, 4))
    np.testing.assert_allclose(paired_feature_distance(t, t), 0.0)
    d = paired_feature_distance(t + np.array([3.0, 4.0, 0, 0]), t)
    np.testing.assert_allclose(d, 5.0)
    with pytest.raises(CdmbenchError, match="row-aligned"):
        paired_feature_distance(t, t[:5])


# --------------------------------------------------------------------------------------------------
# Free-factor coverage (1-D Wasserstein per factor)


def test_factor_w1_known_values():
    ref = np.linspace(0, 1, 1001)[:, None]
    scales = np.array([1.0])
    assert factor_w1(np.array([[0.5]]), ref, scales)[0] == pytest.approx(0.25, abs=1e-3)  # point mass at the median
    assert factor_w1(ref + 0.1, ref, scales)[0] == pytest.approx(0.1, abs=1e-9)  # a shift


def test_collapsed_generator_covers_worse_than_samples_of_the_reference():
    rng = np.random.default_rng(7)
    ref = rng.uniform(size=(64, 3))
    scales = factor_scales(rng.uniform(size=(4096, 3)))
    real = [prompt_coverage(rng.uniform(size=(5, 3)), ref, scales) for _ in range(200)]
    collapsed = [prompt_coverage(np.tile(rng.uniform(size=(1, 3)), (5, 1)), ref, scales) for _ in range(200)]
    assert np.mean(collapsed) > 2 * np.mean(real)
    assert np.mean(collapsed) > 0.85  # >= the mean absolute deviation around the median (0.25 / 0.289)


# --------------------------------------------------------------------------------------------------
# Fine detail (high-frequency share)


def test_high_frequency_share_known_answers():
    h = w = 32
    xx = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    low = torch.cos(2 * torch.pi * 2 * xx / w).expand(1, 3, h, w)  # 1/16 cycles per pixel
    high = torch.cos(2 * torch.pi * 12 * xx / w).expand(1, 3, h, w)  # 3/8 cycles per pixel
    assert high_frequency_share(low)[0] == pytest.approx(0.0, abs=1e-12)
    assert high_frequency_share(high)[0] == pytest.approx(1.0, abs=1e-12)
    mix = (low + high) / 2
    assert high_frequency_share(mix)[0] == pytest.approx(0.5, abs=1e-12)
    assert high_frequency_share(torch.full((2, 3, 8, 8), 0.3))[0] == 0.0  # flat


def test_detail_ratio_is_one_at_the_reference_and_symmetric():
    np.testing.assert_allclose(detail_ratio_score([0.2, 0.1, 0.4], 0.2), [1.0, 0.5, 0.5])
    with pytest.raises(CdmbenchError, match="no high-frequency"):
        detail_ratio_score([0.2], 0.0)
