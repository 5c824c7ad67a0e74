"""AlphaPruning's heavy-tail metric: the power-law exponent α of each weight matrix's spectrum.

For a weight matrix W the empirical spectral density (ESD) is the set of
eigenvalues of WᵀW (the squared singular values of W). Heavy-tailed
self-regularisation theory fits the tail of the ESD with a power law
p(λ) ∝ λ^(−α); a smaller α means a heavier tail, a better-trained layer.
AlphaPruning (Lu et al., NeurIPS 2024) prunes layers with a larger α more.

The fit follows AlphaPruning's ``net_esd_estimator(fix_fingers="xmin_peak")``
(the same rule as WeightWatcher's ``fix_fingers="xmin_peak"``):

1. λ sorted ascending, those ≤ 1e-5 dropped (WeightWatcher's ``EVALS_THRESH``);
2. a 100-bin histogram of log10 λ; its fullest bin's left edge gives the peak p;
3. every eigenvalue x with ``log10(0.95 p) ≤ x ≤ 1.5 p`` is a candidate xmin
   (the lower bound is the reference code's, which compares x with a log10;
   reproduced as is so the values match AlphaPruning and WeightWatcher);
4. for each candidate, the Hill / continuous maximum-likelihood exponent of the
   n eigenvalues λ_i ≥ xmin, α = 1 + n / Σ log(λ_i / xmin), and the
   Kolmogorov–Smirnov distance D = max_i |1 − (λ_i/xmin)^(1−α) − i/n|
   (i = 0 … n−1);
5. α of the candidate with the smallest D.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import progress
from .errors import UserError, require_finite
from .models import find_blocks, iter_projections, weight_out_in

EVALS_THRESH = 1e-5
HIST_BINS = 100


def esd(weight: torch.Tensor) -> np.ndarray:
    """Eigenvalues of WᵀW for a 2-D weight (any orientation), ascending, float64 [min(out, in)]."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    sv = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return np.sort(sv.cpu().numpy() ** 2)


def hill_alpha(eigs: np.ndarray) -> float:
    """The power-law exponent α of a spectrum by the xmin_peak rule (module docstring).

    ``eigs``: eigenvalues ≥ 0 in any order. Returns NaN when fewer than two
    eigenvalues exceed 1e-5 or no candidate xmin gives α > 1.
    """
    lam = np.sort(np.asarray(eigs, dtype=np.float64))
    lam = lam[lam > EVALS_THRESH]
    if lam.size < 2:
        return float("nan")
    counts, edges = np.histogram(np.log10(lam), bins=HIST_BINS)
    peak = 10 ** edges[np.argmax(counts)]
    lo, hi = np.log10(0.95 * peak), 1.5 * peak
    log_lam = np.log(lam)
    # Σ_{j ≥ i} log λ_j for every i, so each candidate's α costs O(1)
    tail_log = np.cumsum(log_lam[::-1])[::-1]
    best_d, best_alpha = np.inf, float("nan")
    for i in np.flatnonzero((lam[:-1] >= lo) & (lam[:-1] <= hi)):
        n = lam.size - i
        denom = tail_log[i] - n * log_lam[i]
        if denom <= 0:
            continue
        alpha = 1.0 + n / denom
        d = np.max(np.abs(1.0 - (lam[i:] / lam[i]) ** (1.0 - alpha) - np.arange(n) / n))
        if d < best_d:
            best_d, best_alpha = d, alpha
    return best_alpha


def matrix_alpha(module: nn.Module) -> float:
    """α of one projection's weight (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    return hill_alpha(esd(weight_out_in(module)))


def module_alphas(model: nn.Module) -> dict[str, float]:
    """α of every projection inside the decoder blocks, by fully qualified module name; a non-finite weight is a
    :class:`FloatingPointError` naming it."""
    named = list(iter_projections(model))
    for p in named:  # an SVD of a non-finite matrix fails to converge: name the weight instead
        require_finite(weight_out_in(p.module), f"the weight of {p.name} (block {p.block})")
    return {p.name: matrix_alpha(p.module) for p in progress.track(named, desc="heavy-tail α", unit="matrix")}


def block_alphas(model: nn.Module) -> np.ndarray:
    """α per decoder block: the mean over the block's projections, as AlphaPruning's block-wise mapping.

    Matrices whose fit fails (NaN) are left out of their block's mean; a block
    with no valid fit is a :class:`UserError`. Returns float64 [L].
    """
    _, blocks = find_blocks(model)
    alphas = module_alphas(model)
    per_block: list[list[float]] = [[] for _ in blocks]
    for p in iter_projections(model):
        if np.isfinite(alphas[p.name]):
            per_block[p.block].append(alphas[p.name])
    out = np.empty(len(blocks))
    for i, vals in enumerate(per_block):
        if not vals:
            raise UserError(f"cannot fit a power law to any weight spectrum of block {i}")
        out[i] = float(np.mean(vals))
    return out
