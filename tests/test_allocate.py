"""Allocation maps: hand-computed examples, invariants over random inputs, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import savgol_filter

from layerif.allocate import (
    MAX_SPARSITY,
    SparsityOptions,
    alpha_experts,
    allocate_experts,
    allocate_sparsity,
    atp_sparsity,
    dlp_sparsity,
    get,
    fit_weighted_mean,
    layerif_experts,
    linear_sparsity,
    owl_sparsity,
    smooth_metric,
    top_k_for,
    uniform_experts,
    uniform_sparsity,
)
from layerif.errors import UserError

# ----------------------------------------------------------------------------- linear map (AlphaPruning / LayerIF)


def test_linear_map_hand_computed():
    # r = 0.8, 1.0, 1.2 (mean 1) scaled by 0.5
    np.testing.assert_allclose(linear_sparsity([0, 1, 2], 0.5, epsilon=0.2), [0.4, 0.5, 0.6])
    # weighted: r = 0.5, 1.5; weighted mean (0.5 + 3 * 1.5) / 4 = 1.25 -> scale 0.4
    np.testing.assert_allclose(linear_sparsity([0, 1], 0.5, epsilon=0.5, weights=[1, 3]), [0.2, 0.6])
    # reverse flips the direction
    np.testing.assert_allclose(linear_sparsity([0, 1, 2], 0.5, epsilon=0.2, reverse=True), [0.6, 0.5, 0.4])
    # only the shape of the metric matters
    np.testing.assert_allclose(linear_sparsity([10, 20, 30], 0.5), linear_sparsity([0, 1, 2], 0.5))


def test_linear_map_clips_and_redistributes():
    # r = 0.5, 1.5 -> 0.4, 1.2 -> the second is held at 0.99, the first takes the excess: 2 * 0.8 - 0.99
    out = linear_sparsity([0, 1], 0.8, epsilon=0.5)
    np.testing.assert_allclose(out, [0.61, 0.99])
    # three blocks, two of them clipped in successive rounds
    out = linear_sparsity([0, 0.9, 1], 0.9, epsilon=1.0, weights=[1, 1, 1])
    assert out.max() <= MAX_SPARSITY + 1e-12
    assert out.mean() == pytest.approx(0.9, abs=1e-12)


def test_linear_map_uniform_cases():
    np.testing.assert_allclose(linear_sparsity([3, 3, 3, 3], 0.6), [0.6] * 4)
    np.testing.assert_allclose(linear_sparsity([0, 5, 1], 0.6, epsilon=0.0), [0.6] * 3)
    np.testing.assert_allclose(linear_sparsity([1, 2, 3], 0.0), [0, 0, 0])
    np.testing.assert_allclose(uniform_sparsity(4, 0.7), [0.7] * 4)


@pytest.mark.parametrize("seed", range(20))
def test_linear_map_invariants(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 40))
    metric = rng.normal(size=L) * rng.uniform(0.1, 100)
    weights = rng.integers(1_000, 100_000, size=L)
    target = float(rng.uniform(0, 0.95))
    eps = float(rng.uniform(0, 1))
    for reverse in (False, True):
        r = linear_sparsity(metric, target, eps, weights, reverse=reverse)
        assert np.average(r, weights=weights) == pytest.approx(target, abs=1e-12)
        assert r.min() >= 0 and r.max() <= MAX_SPARSITY + 1e-12
        order = np.argsort(-metric if reverse else metric, kind="stable")
        assert np.all(np.diff(r[order]) >= -1e-12)  # non-decreasing in the metric (in its direction)
        if r.max() < MAX_SPARSITY and eps > 0:  # unclipped: exactly the AlphaPruning ratios r_l ∝ (1-ε) + 2ε u_l
            m = -metric if reverse else metric
            base = (1 - eps) + 2 * eps * (m - m.min()) / (m.max() - m.min())
            np.testing.assert_allclose(r / r.sum(), base / base.sum(), rtol=1e-10)


def test_smoothing_is_savgol_7_3():
    rng = np.random.default_rng(0)
    m = rng.normal(size=30)
    np.testing.assert_allclose(smooth_metric(m), savgol_filter(m, 7, 3))
    np.testing.assert_allclose(linear_sparsity(m, 0.5, smooth=True), linear_sparsity(savgol_filter(m, 7, 3), 0.5))
    short = rng.normal(size=6)  # window 5, order 3
    np.testing.assert_allclose(smooth_metric(short), savgol_filter(short, 5, 3))
    tiny = rng.normal(size=4)  # a window of 3 would interpolate: unchanged
    np.testing.assert_allclose(smooth_metric(tiny), tiny)
    np.testing.assert_allclose(smooth_metric([2.0]), [2.0])


def test_fit_weighted_mean_all_zero_shape():
    # every unclipped ratio is zero: the remaining mass is spread evenly
    np.testing.assert_allclose(fit_weighted_mean([0, 0], 0.3), [0.3, 0.3])
    out = fit_weighted_mean([0, 5], 0.7)  # 5 -> held at 0.99, the zero block takes 2 * 0.7 - 0.99
    np.testing.assert_allclose(out, [0.41, 0.99])


# ----------------------------------------------------------------------------- OWL


def test_owl_hand_computed():
    # OWL code: densities 2λ·u − mean + (1 − s); sparsity = 1 − density
    np.testing.assert_allclose(owl_sparsity([0, 1, 2], 0.5, lam=0.08), [0.58, 0.5, 0.42])
    # weighted: spread [0, 0.08, 0.16], weighted mean 0.1
    np.testing.assert_allclose(owl_sparsity([0, 1, 2], 0.5, lam=0.08, weights=[1, 1, 2]), [0.6, 0.52, 0.44])
    np.testing.assert_allclose(owl_sparsity([4, 4, 4], 0.6), [0.6] * 3)


@pytest.mark.parametrize("seed", range(10))
def test_owl_invariants(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 30))
    ratios = rng.uniform(0, 0.05, size=L)
    weights = rng.integers(100, 1000, size=L)
    target, lam = float(rng.uniform(0.2, 0.8)), float(rng.uniform(0, 0.1))
    s = owl_sparsity(ratios, target, lam, weights)
    assert np.average(s, weights=weights) == pytest.approx(target, abs=1e-12)
    assert s.max() - s.min() <= 2 * lam + 1e-12
    order = np.argsort(ratios)
    assert np.all(np.diff(s[order]) <= 1e-12)  # more outliers -> less sparsity


def test_owl_clips_at_zero():
    s = owl_sparsity([0, 1], 0.05, lam=0.08)  # raw [0.13, -0.03]
    assert s.min() >= 0
    assert s.mean() == pytest.approx(0.05)


# ----------------------------------------------------------------------------- ATP and DLP


def test_atp_hand_computed():
    # s_l = s_0 + l·β with s_0 = S − β(L − 1)/2 for equal blocks (the ATP code's first term)
    np.testing.assert_allclose(atp_sparsity(4, 0.5, 0.1), [0.35, 0.45, 0.55, 0.65])
    # weighted: mean depth (0 + 1 + 2 + 3·3)/6 = 2, so s_0 = 0.5 − 2·0.1
    np.testing.assert_allclose(atp_sparsity(4, 0.5, 0.1, weights=[1, 1, 1, 3]), [0.3, 0.4, 0.5, 0.6])
    # default step: a spread of 0.2 from the first block to the last
    np.testing.assert_allclose(atp_sparsity(5, 0.5), [0.4, 0.45, 0.5, 0.55, 0.6])
    np.testing.assert_allclose(atp_sparsity(4, 0.5, 0.0), [0.5] * 4)
    np.testing.assert_allclose(atp_sparsity(1, 0.5), [0.5])


def test_atp_clips_keeping_the_mean_and_the_step():
    # [0.6, 0.8, 1.0, 1.2] → the last two held at 0.99, the others shifted by 0.11: 2·0.7 + 2c + 1.98 = 3.6
    np.testing.assert_allclose(atp_sparsity(4, 0.9, 0.2), [0.71, 0.91, 0.99, 0.99])
    # [−0.3, −0.1, 0.1, 0.3] → the first two held at 0; the others already have mean 0.1 over four blocks
    np.testing.assert_allclose(atp_sparsity(4, 0.1, 0.2), [0.0, 0.0, 0.1, 0.3], atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_atp_invariants(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    w, target, step = rng.uniform(1, 5, n), float(rng.uniform(0.05, 0.9)), float(rng.uniform(0, 0.05))
    s = atp_sparsity(n, target, step, w)
    assert np.average(s, weights=w) == pytest.approx(target)
    assert np.all(np.diff(s) >= -1e-12) and s.min() >= 0 and s.max() <= MAX_SPARSITY
    inside = (s > 1e-9) & (s < MAX_SPARSITY - 1e-9)
    np.testing.assert_allclose(np.diff(s)[inside[:-1] & inside[1:]], step, atol=1e-9)


def test_dlp_hand_computed():
    # I = 1 − M/ΣM = [7/8, 7/8, 3/4, 1/2]; (I − min)/(max − min) = [1, 1, 2/3, 0] (mean 2/3);
    # s = 0.5 − 2α·([1, 1, 2/3, 0] − 2/3) with α = 0.1
    np.testing.assert_allclose(dlp_sparsity([1, 1, 2, 4], 0.5, 0.1), [13 / 30, 13 / 30, 0.5, 19 / 30])
    # the same importance as OWL's map of I, weighted
    np.testing.assert_allclose(dlp_sparsity([1, 1, 2, 4], 0.5, 0.1, [1, 2, 3, 4]),
                               owl_sparsity([7 / 8, 7 / 8, 3 / 4, 1 / 2], 0.5, 0.1, [1, 2, 3, 4]))
    np.testing.assert_allclose(dlp_sparsity([3, 3, 3], 0.6), [0.6] * 3)
    assert np.average(dlp_sparsity([1, 5, 2, 9], 0.7, 0.2, [1, 2, 1, 2]), weights=[1, 2, 1, 2]) == pytest.approx(0.7)


def test_atp_and_dlp_are_registered():
    opts = SparsityOptions(atp_step=0.1, dlp_alpha=0.1)
    np.testing.assert_allclose(allocate_sparsity("atp", None, 0.5, [1] * 4, opts), [0.35, 0.45, 0.55, 0.65])
    np.testing.assert_allclose(allocate_sparsity("dlp", [1, 1, 2, 4], 0.5, [1] * 4, opts),
                               [13 / 30, 13 / 30, 0.5, 19 / 30])


def test_smooth_applies_to_every_rule_with_a_metric():
    m = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.8, 0.2])
    w, on = np.ones(m.size), SparsityOptions(smooth=True)
    smoothed = savgol_filter(m, 7, 3)
    np.testing.assert_allclose(allocate_sparsity("owl", m, 0.5, w, on), owl_sparsity(smoothed, 0.5, 0.08, w))
    np.testing.assert_allclose(allocate_sparsity("layerif", m, 0.5, w, on), linear_sparsity(m, 0.5, smooth=True))
    np.testing.assert_allclose(allocate_sparsity("dlp", m, 0.5, w, on), dlp_sparsity(smoothed, 0.5, 0.15, w))
    for name in ("uniform", "atp", "search"):
        with pytest.raises(UserError, match="--smooth applies to the allocations with a per-block metric"):
            get(name, "sparsity", smooth=True)


# ----------------------------------------------------------------------------- experts


def test_layerif_experts_hand_computed():
    np.testing.assert_array_equal(layerif_experts([0, 1, 2], 9, beta=1), [1, 3, 5])
    # β=2: quotas 6·[0, 1, 4]/5 = [0, 1.2, 4.8] -> floors [0, 1, 4], the last unit to 0.8
    np.testing.assert_array_equal(layerif_experts([0, 1, 2], 9, beta=2), [1, 2, 6])
    np.testing.assert_array_equal(layerif_experts([0, 1, 2], 9, beta=1, reverse=True), [5, 3, 1])
    # β=2.5: quotas 16·w/Σw = [0, 2.341, 0.414, 13.245]
    np.testing.assert_array_equal(layerif_experts([0.1, 0.3, 0.2, 0.5], 20), [1, 3, 2, 14])
    # all equal, or β = 0: as uniform as possible
    np.testing.assert_array_equal(layerif_experts([2, 2, 2], 10), [4, 3, 3])
    np.testing.assert_array_equal(layerif_experts([0, 1, 2], 10, beta=0), [4, 3, 3])
    np.testing.assert_array_equal(layerif_experts([5, 1], 2), [1, 1])


def test_alpha_experts_hand_computed():
    np.testing.assert_array_equal(alpha_experts([2, 3, 4], 12, beta=1), [3, 4, 5])
    # round gives [0, 0, 0, 5] -> at least 1 each -> 8 > 6 -> take back from the most over-allocated
    np.testing.assert_array_equal(alpha_experts([1, 1, 1, 10], 6, beta=1), [1, 1, 1, 3])
    # round gives [1, 1, 1] = 3 < 4 -> one more to the block most below its share (ties: first)
    np.testing.assert_array_equal(alpha_experts([1, 1, 1], 4, beta=1), [2, 1, 1])
    np.testing.assert_array_equal(uniform_experts(4, 10), [3, 3, 2, 2])
    np.testing.assert_array_equal(top_k_for([1, 2, 5]), [1, 2, 2])


def test_beta_zero_is_the_uniform_map():
    # 11 over 3 blocks: AlphaLoRA's rounding alone would give [3, 4, 4]; β = 0 (every share equal) is uniform
    for total in (9, 10, 11, 31):
        want = uniform_experts(3, total)
        np.testing.assert_array_equal(alpha_experts([1.5, 3.0, 2.0], total, beta=0), want)
        np.testing.assert_array_equal(alpha_experts([2.0, 2.0, 2.0], total, beta=1), want)
        np.testing.assert_array_equal(layerif_experts([0.1, 2.0, 0.5], total, beta=0), want)
        np.testing.assert_array_equal(allocate_experts("gain", [0.3, -0.1, 0.2], 3, total, beta=0), want)


@pytest.mark.parametrize("seed", range(20))
def test_expert_invariants(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 40))
    total = int(L + rng.integers(0, 6 * L))
    beta = float(rng.uniform(0.1, 4))
    scores = rng.uniform(0, 10, size=L)
    for n in (layerif_experts(scores, total, beta), alpha_experts(1 + scores, total, beta), uniform_experts(L, total)):
        assert n.dtype == np.int64
        assert n.sum() == total and n.min() >= 1
    n = layerif_experts(scores, total, beta)
    order = np.argsort(scores)
    assert np.all(np.diff(n[order]) >= 0)  # monotone in the score
    assert np.all(np.diff(layerif_experts(scores, total, beta, reverse=True)[order]) <= 0)
    a = alpha_experts(1 + scores, total, beta)
    share = total * (1 + scores) ** beta / np.sum((1 + scores) ** beta)
    rounded = np.maximum(1, np.round(share))
    if rounded.sum() == total:  # no fix-up needed: exactly the AlphaLoRA rounding
        np.testing.assert_array_equal(a, rounded)
    np.testing.assert_array_equal(top_k_for(n), np.where(n > 1, 2, 1))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call",
    [
        lambda: linear_sparsity([0, 1], 1.0),
        lambda: linear_sparsity([0, 1], -0.1),
        lambda: linear_sparsity([0, 1], 0.5, epsilon=1.5),
        lambda: linear_sparsity([0, 1], 0.5, epsilon=-0.1),
        lambda: linear_sparsity([0, float("nan")], 0.5),
        lambda: linear_sparsity([], 0.5),
        lambda: linear_sparsity([0, 1], 0.5, weights=[1, 2, 3]),
        lambda: linear_sparsity([0, 1], 0.5, weights=[1, 0]),
        lambda: linear_sparsity([0, 1], 0.995),  # above the 0.99 cap
        lambda: uniform_sparsity(3, 1.2),
        lambda: uniform_sparsity(0, 0.5),
        lambda: owl_sparsity([0, 1], 1.0),
        lambda: owl_sparsity([0, 1], 0.5, lam=0.6),
        lambda: atp_sparsity(4, 0.5, -0.01),
        lambda: atp_sparsity(4, 0.5, float("nan")),
        lambda: atp_sparsity(0, 0.5),
        lambda: atp_sparsity(4, 1.0),
        lambda: atp_sparsity(2, 0.5, 0.1, weights=[1, 0]),
        lambda: dlp_sparsity([1, -1, 2], 0.5),
        lambda: dlp_sparsity([0, 0], 0.5),
        lambda: dlp_sparsity([1, 2], 0.5, alpha=0.5),
        lambda: dlp_sparsity([1, float("inf")], 0.5),
        lambda: layerif_experts([0, 1, 2], 2),
        lambda: layerif_experts([0, 1, 2], 6, beta=-1),
        lambda: layerif_experts([0, 1, 2], 6.5),
        lambda: alpha_experts([2, 3, 4], 2),
        lambda: alpha_experts([2, 3, 4], 6, beta=-0.5),
        lambda: alpha_experts([2, 0, 4], 6),
        lambda: uniform_experts(3, 2),
        lambda: top_k_for([1, 0]),
    ],
)
def test_bad_input(call):
    with pytest.raises(UserError):
        call()
