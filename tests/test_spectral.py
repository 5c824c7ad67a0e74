"""The heavy-tail exponent α: against a literal re-implementation of AlphaPruning's loop, known Pareto
exponents, WeightWatcher (when installed), and the block averaging on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from layerif.errors import UserError
from layerif.models import find_blocks, projections, weight_out_in
from layerif.spectral import block_alphas, esd, hill_alpha, matrix_alpha


def reference_alpha(eigs: np.ndarray, skip_last_candidate: bool = False) -> float:
    """AlphaPruning's ``net_esd_estimator(fix_fingers="xmin_peak")`` loop, transcribed one step at a time.

    ``skip_last_candidate`` leaves out the largest xmin of the peak range, as the
    ``powerlaw`` package (WeightWatcher's fitter) does.
    """
    nz = np.sort(eigs)
    nz = nz[nz > 1e-5]
    N = len(nz)
    log_nz = np.log(nz)
    alphas = np.zeros(N - 1)
    Ds = np.ones(N - 1)
    counts, edges = np.histogram(np.log10(nz), bins=100)
    xmin2 = 10 ** edges[np.argmax(counts)]
    xmin_min = np.log10(0.95 * xmin2)
    xmin_max = 1.5 * xmin2
    if skip_last_candidate:
        xmin_max = nz[:-1][nz[:-1] <= xmin_max].max() * (1 - 1e-12)
    for i, xmin in enumerate(nz[:-1]):
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(N - i)
        seq = np.arange(n)
        alpha = 1 + n / (np.sum(log_nz[i:]) - n * log_nz[i])
        alphas[i] = alpha
        if alpha > 1:
            Ds[i] = np.max(np.abs(1 - (nz[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alphas[np.argmin(Ds)])


def heavy_tailed(seed: int, shape=(120, 300), df: float = 3.0) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).standard_t(df, size=shape))


def test_esd_is_the_spectrum_of_wtw():
    W = heavy_tailed(0, (40, 70))
    ev = esd(W)
    ref = np.linalg.eigvalsh((W.T @ W).numpy())[-40:]  # the 40 non-zero eigenvalues
    np.testing.assert_allclose(ev, ref, rtol=1e-8)
    np.testing.assert_allclose(esd(W.T), ev, rtol=1e-10)  # orientation does not matter


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("df", [1.5, 2.5, 4.0])
def test_hill_alpha_equals_alphapruning_loop(seed, df):
    ev = esd(heavy_tailed(seed, (100 + 20 * seed, 260), df))
    assert hill_alpha(ev) == pytest.approx(reference_alpha(ev), rel=1e-10)
    # scale changes the peak rule's log10 lower bound (as in the reference), so compare at another scale too
    assert hill_alpha(ev * 1e-3) == pytest.approx(reference_alpha(ev * 1e-3), rel=1e-10)


@pytest.mark.parametrize("a", [2.0, 2.5, 3.5])
def test_hill_alpha_recovers_a_pareto_exponent(a):
    # density p(λ) ∝ λ^-a for λ ≥ 1: λ = U^(-1/(a-1)); the log-histogram peaks at the smallest values
    rng = np.random.default_rng(int(a * 10))
    lam = rng.uniform(size=4000) ** (-1 / (a - 1))
    assert hill_alpha(lam) == pytest.approx(a, abs=0.15)


def test_hill_alpha_degenerate_spectra():
    assert np.isnan(hill_alpha(np.zeros(10)))
    assert np.isnan(hill_alpha(np.array([0.0, 0.0, 3.0])))


def test_weightwatcher_agrees():
    """WeightWatcher's fit_powerlaw(fix_fingers="xmin_peak") on the same eigenvalues.

    WeightWatcher delegates to the ``powerlaw`` package, which leaves out the
    largest candidate xmin of the peak range; otherwise the fits are the same, so
    α agrees exactly wherever that candidate is not AlphaPruning's choice.
    """
    ww = pytest.importorskip("weightwatcher")
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    watcher = ww.WeightWatcher()
    same = 0
    for seed in range(8):
        ev = esd(heavy_tailed(seed, (150, 300), df=2.0 + 0.5 * (seed % 4)))
        res = watcher.fit_powerlaw(ev, plot=False, fix_fingers="xmin_peak", pl_package="powerlaw")
        if res[0] == -1:
            pytest.skip("weightwatcher's xmin_peak fit fails with this powerlaw version (needs powerlaw<2)")
        assert res[0] == pytest.approx(reference_alpha(ev, skip_last_candidate=True), rel=1e-8)
        if reference_alpha(ev, skip_last_candidate=True) == pytest.approx(reference_alpha(ev), rel=1e-12):
            assert hill_alpha(ev) == pytest.approx(res[0], rel=1e-8)
            same += 1
        else:
            assert hill_alpha(ev) == pytest.approx(res[0], rel=0.05)
    assert same >= 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_alphas_average_the_projections(family):
    model = tiny_model(family, n_layers=3)
    alphas = block_alphas(model)
    _, blocks = find_blocks(model)
    assert alphas.shape == (3,)
    for i, block in enumerate(blocks):
        per = [matrix_alpha(m) for m in projections(block).values()]
        assert alphas[i] == pytest.approx(np.mean(per))
    # Conv1D (GPT-2) is read as [out, in]; the spectrum is the same either way
    mod = next(iter(projections(blocks[0]).values()))
    assert matrix_alpha(mod) == pytest.approx(hill_alpha(esd(weight_out_in(mod).T)))


def test_block_with_no_fit_is_a_user_error():
    model = tiny_model("llama", n_layers=2)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for m in projections(blocks[1]).values():
            m.weight.zero_()
    with pytest.raises(UserError, match="block 1"):
        block_alphas(model)
