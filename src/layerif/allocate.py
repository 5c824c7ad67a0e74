"""Per-layer allocation maps: pruning sparsity and LoRA-MoE expert counts.

Pure functions, numpy in, numpy out. Every map of the project lives here so the
pruning and the LoRA-MoE tools share one definition of each.

Sparsity maps (one ratio per decoder block, the share of its prunable weights
set to zero; ``weights`` are the prunable parameter counts per block, so the
contract "the mean sparsity equals the target" is about parameters, not blocks):

* :func:`linear_sparsity` -- AlphaPruning's linear map, used with the heavy-tail
  exponent α (AlphaPruning) or the LayerIF score S_l (LayerIF).
* :func:`uniform_sparsity` -- the same ratio everywhere.
* :func:`owl_sparsity` -- OWL: more outliers, less sparsity.
* :func:`atp_sparsity` -- ATP: sparsity rising with depth as an arithmetic progression (no metric).
* :func:`dlp_sparsity` -- DLP: a larger median Wanda score, a less important block, more sparsity.

Expert maps (an integer number of LoRA experts per block, summing to a budget T):

* :func:`layerif_experts` -- w_l = (S_l − min S)^β, the LayerIF paper's rule (also
  applied to the measured fine-tune gain g_l: the ``gain`` allocation).
* :func:`alpha_experts` -- AlphaLoRA: n_l ∝ α_l^β.
* :func:`uniform_experts`, and :func:`top_k_for` (the router's k per block).

Dispatch (:data:`ALLOCATIONS`, :func:`allocate_sparsity`, :func:`allocate_experts`):
every allocation is one :class:`Allocation` in one registry -- the per-block
metric it maps (LayerIF scores, heavy-tail α, OWL outlier ratios, DLP median Wanda scores, the fine-tune
gain measured by ``layerif validate``, the measured per-block sensitivity or
searched sparsity of :mod:`layerif.search`, or none), its sparsity map and/or expert map, and whether ``reverse`` applies. A label
``NAME-reversed`` (the comparisons) is ``NAME`` with ``reverse``. Adding an
allocation is one :func:`register` call; pruning, the LoRA-MoE adapter and
their comparisons only ask this module.

Bad input (a target outside [0, 1), ε outside [0, 1], T smaller than the number
of blocks, β < 0, non-finite metrics) raises :class:`~layerif.errors.UserError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import UserError

MAX_SPARSITY = 0.99
"""No block is pruned beyond this ratio; the excess goes to the other blocks."""

SMOOTH_WINDOW = 7
SMOOTH_ORDER = 3


# ----------------------------------------------------------------------------- checks


def _metric(values, name: str) -> np.ndarray:
    """A non-empty, finite, 1-D float64 copy of ``values``."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise UserError(f"{name}: no values (need one per block)")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{name}: contains NaN or infinite values")
    return arr


def check_sparsity(target: float) -> float:
    """``target`` as a float; a value outside [0, 1) is a :class:`UserError`."""
    target = float(target)
    if not 0.0 <= target < 1.0:
        raise UserError(f"sparsity {target:g} is outside [0, 1)")
    return target


def check_epsilon(epsilon: float) -> float:
    """``epsilon`` as a float; a value outside [0, 1] is a :class:`UserError`."""
    epsilon = float(epsilon)
    if not 0.0 <= epsilon <= 1.0:
        raise UserError(f"epsilon {epsilon:g} is outside [0, 1]")
    return epsilon


def _weights(weights, n: int) -> np.ndarray:
    """Per-block weights (default all 1), checked to be ``n`` positive finite numbers."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n:
        raise UserError(f"{w.size} block weights for {n} blocks")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise UserError("block weights (prunable parameters per block) must be positive")
    return w


def _check_total(total: int, n_layers: int) -> int:
    if int(total) != total:
        raise UserError(f"the expert budget T={total} is not an integer")
    total = int(total)
    if n_layers < 1:
        raise UserError("no blocks to allocate experts to")
    if total < n_layers:
        raise UserError(f"the expert budget T={total} is smaller than the number of blocks ({n_layers}); need T ≥ {n_layers}")
    return total


def check_beta(beta: float) -> float:
    """``beta`` as a float; a negative or non-finite value is a :class:`UserError`."""
    beta = float(beta)
    if not np.isfinite(beta) or beta < 0:
        raise UserError(f"beta {beta:g} must be ≥ 0")
    return beta


# ----------------------------------------------------------------------------- sparsity


def smooth_metric(metric) -> np.ndarray:
    """Savitzky–Golay smoothing (window 7, order 3) of a per-block metric, as the LayerIF code does.

    With fewer than 7 blocks the window is the largest odd number ≤ the block
    count and the order is at most window − 1; a window below 5 leaves the
    metric unchanged (a cubic through ≤ 3 points interpolates them exactly).
    """
    m = _metric(metric, "metric")
    window = min(SMOOTH_WINDOW, m.size if m.size % 2 else m.size - 1)
    if window < 5:
        return m
    from scipy.signal import savgol_filter  # 1-4 s to import: only when smoothing (not on every layerif start)

    return savgol_filter(m, window_length=window, polyorder=min(SMOOTH_ORDER, window - 1))


def fit_weighted_mean(ratios, target: float, weights=None, cap: float = MAX_SPARSITY) -> np.ndarray:
    """Scale ``ratios`` so their ``weights``-weighted mean is ``target``, each within [0, cap].

    Negative ratios are first set to 0. The ratios are multiplied by one common
    factor; a block that would exceed ``cap`` is held at ``cap`` and the excess is
    spread over the others by a larger common factor (repeated until no block
    exceeds it), so the shape of the map is kept wherever it is not clipped. If
    every unclipped ratio is 0 the remaining mass is spread evenly over them.
    Requires ``0 ≤ target ≤ cap``.
    """
    target = check_sparsity(target)
    if target > cap:
        raise UserError(f"sparsity {target:g} is above {cap:g}, the most a block may be pruned")
    r = np.clip(_metric(ratios, "ratios"), 0.0, None)
    w = _weights(weights, r.size)
    mass = target * w.sum()
    held = np.zeros(r.size, dtype=bool)
    while True:
        free = ~held
        rest = mass - cap * w[held].sum()
        denom = (w[free] * r[free]).sum()
        out = np.where(held, cap, 0.0)
        if denom <= 0:
            out[free] = rest / w[free].sum()
            return out
        out[free] = r[free] * (rest / denom)
        over = free & (out > cap)
        if not over.any():
            return out
        held |= over


def linear_sparsity(
    metric, target: float, epsilon: float = 0.2, weights=None, reverse: bool = False, smooth: bool = False
) -> np.ndarray:
    """AlphaPruning's linear map from a per-block metric to per-block sparsity.

    r_l = (1 − ε) + 2ε · (m_l − min m) / (max m − min m), then scaled by one common
    factor so that Σ w_l r_l / Σ w_l = ``target`` exactly, and clipped to
    [0, 0.99] with the excess redistributed (:func:`fit_weighted_mean`).

    Direction: a higher metric gets more sparsity (AlphaPruning: a larger α, a
    less well-trained layer; LayerIF: a larger S_l, a less mature layer);
    ``reverse`` flips it. ``smooth`` applies :func:`smooth_metric` first. A
    constant metric (or ε = 0) gives the uniform allocation. Returns float64 [L].
    """
    target = check_sparsity(target)
    epsilon = check_epsilon(epsilon)
    m = smooth_metric(metric) if smooth else _metric(metric, "metric")
    if reverse:
        m = -m
    span = m.max() - m.min()
    unit = (m - m.min()) / span if span > 0 else np.full(m.size, 0.5)
    return fit_weighted_mean((1 - epsilon) + 2 * epsilon * unit, target, weights)


def uniform_sparsity(n_layers: int, target: float) -> np.ndarray:
    """``target`` in every one of ``n_layers`` blocks (float64 [L])."""
    target = check_sparsity(target)
    if n_layers < 1:
        raise UserError("no blocks to allocate sparsity to")
    return np.full(int(n_layers), target)


def owl_sparsity(outlier_ratios, target: float, lam: float = 0.08, weights=None) -> np.ndarray:
    """OWL (Outlier Weighed Layerwise sparsity): blocks with more outliers keep more weights.

    As in the OWL code: the outlier ratios D_l are mapped linearly onto densities
    spanning 2λ, d_l = 2λ (D_l − min D)/(max D − min D), shifted so the weighted mean
    density is 1 − ``target``; sparsity = 1 − density. Every block's sparsity
    therefore lies within ``target`` ± 2λ (± λ around the middle of the span) and
    the weighted mean is ``target``; values outside [0, 0.99] are clipped with the
    excess redistributed (:func:`fit_weighted_mean`). Constant ratios → uniform.
    """
    target = check_sparsity(target)
    lam = float(lam)
    if not 0.0 <= lam < 0.5:
        raise UserError(f"OWL lambda {lam:g} is outside [0, 0.5)")
    d = _metric(outlier_ratios, "outlier ratios")
    w = _weights(weights, d.size)
    span = d.max() - d.min()
    spread = 2 * lam * (d - d.min()) / span if span > 0 else np.zeros(d.size)
    sparsity = target - (spread - np.average(spread, weights=w))
    return fit_weighted_mean(sparsity, target, w)


ATP_SPAN = 0.2
"""Default ATP spread: the last block's sparsity minus the first's, β = ATP_SPAN / (L − 1)."""


def _shift_to_mean(base: np.ndarray, target: float, w: np.ndarray, cap: float = MAX_SPARSITY) -> np.ndarray:
    """clip(base + c, 0, cap) with the one shift c whose ``w``-weighted mean is ``target`` (bisection).

    The weighted mean of the clipped values rises monotonically and continuously with c from 0 to ``cap``,
    so for a target in [0, cap] such a c exists; the differences between unclipped blocks are kept.
    """
    lo, hi = -base.max() - 1.0, cap - base.min() + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.average(np.clip(base + mid, 0.0, cap), weights=w) < target:
            lo = mid
        else:
            hi = mid
    return np.clip(base + (lo + hi) / 2, 0.0, cap)


def atp_sparsity(n_layers: int, target: float, step: float | None = None, weights=None) -> np.ndarray:
    """ATP (Huang et al., ICML 2025, arXiv 2502.14770): sparsity rising with depth as an arithmetic progression.

    s_l = s_0 + l · β for l = 0..L−1 (the paper's monotonically increasing, arithmetic-progression layer-wise
    sparsity; its code sets s_0 = S − β(L − 1)/2, the unweighted mean). Here s_0 is solved so that the
    ``weights``-weighted mean is ``target`` exactly (equal weights: the code's s_0). The paper searches β on a
    small grid and rejects β > min(2S, 2(1 − S))/(L − 1); here a block that would fall outside [0, 0.99] is
    clipped and the progression shifted by one common amount to keep the mean (:func:`_shift_to_mean`).
    ``step`` None means β = :data:`ATP_SPAN` / (L − 1) (first-to-last spread 0.2, β ≈ 0.0065 for 32 blocks:
    our default, not a value taken from the paper); β = 0 (or one block) gives the uniform map. A negative or
    non-finite β is a :class:`UserError`. Returns float64 [L].
    """
    target = check_sparsity(target)
    if target > MAX_SPARSITY:
        raise UserError(f"sparsity {target:g} is above {MAX_SPARSITY:g}, the most a block may be pruned")
    if n_layers < 1:
        raise UserError("no blocks to allocate sparsity to")
    if step is None:
        step = ATP_SPAN / (n_layers - 1) if n_layers > 1 else 0.0
    step = float(step)
    if not np.isfinite(step) or step < 0:
        raise UserError(f"ATP step β {step:g} must be ≥ 0")
    w = _weights(weights, n_layers)
    depth = step * np.arange(n_layers, dtype=np.float64)
    return _shift_to_mean(depth - np.average(depth, weights=w), target, w)


def dlp_sparsity(medians, target: float, alpha: float = 0.15, weights=None) -> np.ndarray:
    """DLP (Chen et al., ICML 2025, arXiv 2505.23807): per-block sparsity from the median Wanda score M_l.

    Our reading of the paper and its code (``get_dlp_ratios``; the exact constants are our reading): the
    block importance I_l = 1 − M_l / Σ_k M_k (a block whose |W|·‖X‖ scores have a larger median is *less*
    important), min-max scaled onto densities spanning 2α, d_l = 2α (I_l − min I)/(max I − min I), shifted
    so the mean density is 1 − ``target``; s_l = 1 − d_l. This is :func:`owl_sparsity` applied to I with
    λ = α (a ``weights``-weighted mean here, the code's plain mean; equal for equal blocks), so the largest
    median gets the most sparsity and the blocks span 2α. Medians must be ≥ 0 with a positive sum. The
    default α = 0.15 is our choice (OWL's λ scale), not verified against DLP's scripts. Returns float64 [L].
    """
    if not 0.0 <= float(alpha) < 0.5:
        raise UserError(f"DLP alpha {float(alpha):g} is outside [0, 0.5)")
    m = _metric(medians, "DLP medians")
    if np.any(m < 0) or m.sum() <= 0:
        raise UserError("DLP medians (of |W|·‖X‖ scores) must be ≥ 0 with a positive sum")
    return owl_sparsity(1.0 - m / m.sum(), target, alpha, weights)


# ----------------------------------------------------------------------------- experts


def _largest_remainder(quota: np.ndarray, units: int) -> np.ndarray:
    """Integers ⌊quota⌋ plus one unit each to the ``units`` − Σ⌊quota⌋ largest fractional parts.

    Ties go to the lower index. ``quota`` must be ≥ 0 and sum to ``units``.
    """
    base = np.floor(quota + 1e-9).astype(np.int64)
    left = units - int(base.sum())
    order = np.argsort(-(quota - base), kind="stable")
    base[order[:left]] += 1
    return base


def uniform_experts(n_layers: int, total: int) -> np.ndarray:
    """``total`` experts over ``n_layers`` blocks as evenly as possible (extras to the first blocks)."""
    total = _check_total(total, n_layers)
    return _largest_remainder(np.full(n_layers, total / n_layers), total)


def layerif_experts(scores, total: int, beta: float = 2.5, reverse: bool = False) -> np.ndarray:
    """LayerIF expert allocation: more experts where S_l is higher (a less mature layer).

    w_l = (S_l − min S)^β, n_l = 1 + ⌊(T − L) · w_l / Σw⌋, with the units still
    missing to reach T given one each to the largest fractional parts (ties to the
    lower index). Σ n_l = T, n_l ≥ 1, non-decreasing in S_l for β > 0. All-equal
    scores (or β = 0) give :func:`uniform_experts`. ``reverse`` uses −S (more
    experts where S_l is low). Returns int64 [L].
    """
    s = _metric(scores, "scores")
    total = _check_total(total, s.size)
    beta = check_beta(beta)
    if reverse:
        s = -s
    w = (s - s.min()) ** beta
    if w.sum() <= 0:
        return uniform_experts(s.size, total)
    return 1 + _largest_remainder((total - s.size) * w / w.sum(), total - s.size)


def alpha_experts(alphas, total: int, beta: float = 2.5) -> np.ndarray:
    """AlphaLoRA expert allocation: n_l = round(T · α_l^β / Σ α^β), fixed up to sum to T.

    Each n_l is at least 1. The fix-up moves one unit at a time: while the sum
    exceeds T, from the block most above its real-valued share (among blocks with
    n_l > 1); while it falls short, to the block most below it. All-equal α (or
    β = 0) give :func:`uniform_experts`. Heavy-tail exponents must be positive.
    Returns int64 [L].
    """
    a = _metric(alphas, "alphas")
    total = _check_total(total, a.size)
    beta = check_beta(beta)
    if np.any(a <= 0):
        raise UserError("heavy-tail exponents α must be positive")
    if beta == 0 or a.min() == a.max():
        return uniform_experts(a.size, total)  # every share equal: ties as in the uniform map
    share = total * a**beta / np.sum(a**beta)
    n = np.maximum(1, np.round(share)).astype(np.int64)
    while n.sum() > total:
        n[np.argmax(np.where(n > 1, n - share, -np.inf))] -= 1
    while n.sum() < total:
        n[np.argmax(share - n)] += 1
    return n


def top_k_for(experts) -> np.ndarray:
    """The router's top-k per block: 2 where a block has more than one expert, else 1 (int64 [L])."""
    n = np.asarray(experts).reshape(-1)
    if n.size == 0 or np.any(n < 1):
        raise UserError("every block needs at least one expert")
    return np.where(n > 1, 2, 1).astype(np.int64)



# ----------------------------------------------------------------------------- registry and dispatch

REVERSED = "-reversed"
TUNED = "-tuned"
EXPERTS_PER_BLOCK = 5
"""Default expert budget: T = 5 × number of blocks."""


@dataclass(frozen=True)
class SparsityOptions:
    """Options of the sparsity maps (``layerif prune`` / ``compare-pruning``)."""

    epsilon: float = 0.2  # spread of the linear map
    smooth: bool = False  # Savitzky–Golay smoothing of the metric first (allocations with a per-block metric)
    owl_lambda: float = 0.08  # OWL: the block sparsities span 2λ around the target
    atp_step: float | None = None  # ATP: sparsity step β per block of depth (None: ATP_SPAN / (L − 1))
    dlp_alpha: float = 0.15  # DLP: the block sparsities span 2α around the target


@dataclass(frozen=True)
class Allocation:
    """One allocation rule.

    ``metric``: the per-block quantity it maps -- ``"scores"`` (LayerIF S_l from a
    scores.json), ``"alpha"`` (heavy-tail exponent α of the weights), ``"outliers"``
    (OWL's outlier ratios on calibration data), ``"dlp"`` (DLP's median Wanda score per block, on
    calibration data), ``"gain"`` (the measured fine-tune
    gain g_l of a validation.json), ``"sensitivity"`` / ``"search"``
    (:mod:`layerif.search`) or ``None``; how each kind is measured is :data:`layerif.measure.MEASURES`.
    A rule with a kind of its own carries its measurement: ``measure(sources) -> float64 [L]``
    (:class:`layerif.measure.Sources`: the dense model, scores, gains, calibration windows), ``calibrated``
    when it reads the calibration windows.
    ``tune``: the grid ``--tune`` chooses the rule's hyper-parameter from, each candidate a dict of the
    :class:`SparsityOptions` fields (the map) and :class:`layerif.measure.Sources` fields (the measurement, e.g.
    OWL's M) it sets; ``tuned``: on a ``NAME-tuned`` rule (:func:`register_tuned`), NAME, whose grid it searches
    (:func:`layerif.prune_allocation.tuned_setting`: the candidate with the least KL to the dense model on
    calibration-side windows).
    ``sparsity(metric, target, weights, options, reverse) -> float64 [L]`` and
    ``experts(metric, n_blocks, total, beta, reverse) -> int64 [L]``; either may be
    ``None`` when the rule has no such map. ``reversible``: the kinds of map
    (``"sparsity"``, ``"experts"``) where ``reverse`` applies. ``smooth`` applies to every sparsity
    rule with a per-block metric (:attr:`smoothable`): :func:`allocate_sparsity` smooths the metric
    before the rule maps it.
    """

    name: str
    metric: str | None
    sparsity: Callable[..., np.ndarray] | None = None
    experts: Callable[..., np.ndarray] | None = None
    reversible: tuple[str, ...] = ()
    measure: Callable[[Any], np.ndarray] | None = None
    calibrated: bool = False
    tune: tuple[dict[str, float], ...] = ()
    tuned: str | None = None

    @property
    def smoothable(self) -> bool:
        """Whether ``smooth`` has a meaning: the rule maps a measured per-block metric (not none, not a
        searched sparsity, which is already the allocation)."""
        return self.metric not in (None, "search")


ALLOCATIONS: dict[str, Allocation] = {}


def register(allocation: Allocation) -> Allocation:
    """Add (or replace) an allocation rule in :data:`ALLOCATIONS`."""
    ALLOCATIONS[allocation.name] = allocation
    return allocation


# The grids of --tune (ours, stated in the README): ε of the linear map as in the brief of issue 23, OWL's λ × M
# joint grid, ATP's step β per block, DLP's α; each candidate is scored by the KL to the dense model on calibration-side
# windows disjoint from the pruners' (never on test items or held-out windows).
EPSILON_GRID = tuple({"epsilon": e} for e in (0.02, 0.05, 0.1, 0.15, 0.2))
OWL_GRID = tuple({"owl_lambda": lam, "owl_m": m} for lam in (0.02, 0.05, 0.08, 0.1, 0.2) for m in (3.0, 5.0, 7.0, 10.0))
ATP_GRID = tuple({"atp_step": b} for b in (0.0025, 0.005, 0.01, 0.02, 0.03))
DLP_GRID = tuple({"dlp_alpha": a} for a in (0.02, 0.05, 0.1, 0.15, 0.2))

register(Allocation(
    "layerif", "scores",
    sparsity=lambda m, target, w, o, rev: linear_sparsity(m, target, o.epsilon, w, reverse=rev),
    experts=lambda m, n, total, beta, rev: layerif_experts(m, total, beta, rev), reversible=("sparsity", "experts"),
    tune=EPSILON_GRID))
register(Allocation(
    "uniform", None,
    sparsity=lambda m, target, w, o, rev: uniform_sparsity(len(w), target),
    experts=lambda m, n, total, beta, rev: uniform_experts(n, total)))
register(Allocation(
    "owl", "outliers", sparsity=lambda m, target, w, o, rev: owl_sparsity(m, target, o.owl_lambda, w), tune=OWL_GRID))
register(Allocation(
    "alpha", "alpha",
    sparsity=lambda m, target, w, o, rev: linear_sparsity(m, target, o.epsilon, w, reverse=rev),
    experts=lambda m, n, total, beta, rev: alpha_experts(m, total, beta), reversible=("sparsity",), tune=EPSILON_GRID))
# ATP: depth only; DLP: the median Wanda score per block (metric kind "dlp", measured by prune.allocation_metric).
register(Allocation("atp", None, sparsity=lambda m, target, w, o, rev: atp_sparsity(len(w), target, o.atp_step, w),
                    tune=ATP_GRID))
register(Allocation("dlp", "dlp", sparsity=lambda m, target, w, o, rev: dlp_sparsity(m, target, o.dlp_alpha, w),
                    tune=DLP_GRID))
# The measured upper reference of the expert maps: LayerIF's rule applied to the per-block fine-tune gain g_l that
# ``layerif validate`` measured (``--validation``), w_l = (g_l − min g)^β, instead of to the estimate S_l.
register(Allocation(
    "gain", "gain",
    experts=lambda m, n, total, beta, rev: layerif_experts(m, total, beta, rev), reversible=("experts",)))

# Measured allocations: their metric is measured on the model with the chosen pruner by the pruning
# commands (layerif.search), then mapped here. ``sensitivity``: the KL rise of pruning each block alone
# at the target, through LayerIF's linear map reversed (the most sensitive block gets the least
# sparsity). ``search`` / ``search-START``: the metric is the searched per-block sparsity itself, already
# at the target (EvoPress-style search from ``--search-init`` / from START), passed through unchanged.
SEARCH = "search-"
SEARCH_STARTS: list[str] = []
"""The allocations a search may start from (``search-START``, ``--search-init``)."""


BEST = "best"
"""``search-best`` / ``--search-init best``: the search starts from the best on the fitness of every registered start
the run can compute (:data:`SEARCH_STARTS`; those of LayerIF scores only with ``--scores``)."""


def search_start(label: str, default: str = "uniform") -> str:
    """The start of a ``search`` allocation label: ``search-START``'s START, else ``default`` (``--search-init``)."""
    return label.removeprefix(SEARCH) if label.startswith(SEARCH) else default


register(Allocation(
    "sensitivity", "sensitivity",
    sparsity=lambda m, target, w, o, rev: linear_sparsity(m, target, o.epsilon, w, reverse=not rev)))


def _searched(m, target, w, o, rev) -> np.ndarray:
    """A search's allocation: the searched per-block sparsity itself (already at the target), unchanged."""
    return np.asarray(m, dtype=np.float64)


register(Allocation("search", "search", sparsity=_searched))


def register_search_start(name: str) -> Allocation:
    """Let a search start from the sparsity allocation ``name``: registers ``search-NAME``; returns its rule."""
    if name not in SEARCH_STARTS:
        SEARCH_STARTS.append(name)
    return register(Allocation(SEARCH + name, "search", sparsity=_searched))


for _start in ("uniform", "layerif", "owl", "alpha", "atp", "dlp", "sensitivity"):
    register_search_start(_start)
register(Allocation(SEARCH + BEST, "search", sparsity=_searched))


def register_tuned(name: str) -> Allocation:
    """``NAME-tuned``: the sparsity allocation ``name`` with its hyper-parameter chosen from its ``tune`` grid
    (``--tune``; a pruning allocation only, no expert map); returns its rule. A rule without a grid is a
    ``ValueError``."""
    rule = ALLOCATIONS[name]
    if not rule.tune:
        raise ValueError(f"the {name} allocation has no hyper-parameter grid to tune")
    return register(replace(rule, name=name + TUNED, tuned=name, experts=None,
                            reversible=tuple(k for k in rule.reversible if k == "sparsity")))


def tuned_label(label: str) -> str:
    """The ``--tune`` arm of an allocation label: ``NAME`` -> ``NAME-tuned``, ``NAME-reversed`` ->
    ``NAME-tuned-reversed``; a label whose rule has no grid is a :class:`UserError`."""
    name, rev = parse_label(label)
    if name + TUNED not in ALLOCATIONS:
        tunable = ", ".join(a.name for a in ALLOCATIONS.values() if a.tune and a.tuned is None)
        raise UserError(f"--tune: the {name} allocation has no hyper-parameter to tune (tunable: {tunable})")
    return name + TUNED + (REVERSED if rev else "")


for _name in [a.name for a in ALLOCATIONS.values() if a.tune]:
    register_tuned(_name)

COMPARE_SPARSITY = ("uniform", "owl", "alpha", "layerif", "layerif" + REVERSED)
"""The allocations ``compare-pruning`` runs by default."""
COMPARE_EXPERTS = ("layerif", "layerif" + REVERSED, "alpha", "uniform")
"""The allocations ``compare-moe`` runs by default."""


def names(kind: str) -> list[str]:
    """The registered allocations that have a ``kind`` map (``"sparsity"`` or ``"experts"``)."""
    return [a.name for a in ALLOCATIONS.values() if getattr(a, kind) is not None]


def parse_label(label: str) -> tuple[str, bool]:
    """``NAME`` or ``NAME-reversed`` -> (name, reverse)."""
    return (label[: -len(REVERSED)], True) if label.endswith(REVERSED) else (label, False)


def get(label: str, kind: str, reverse: bool = False, smooth: bool = False) -> tuple[Allocation, bool]:
    """The rule of an allocation label for a ``kind`` map, and whether it is reversed.

    An unknown label, ``reverse`` with a rule that has no metric direction, or
    ``smooth`` with a rule that has no per-block metric to smooth
    (:attr:`Allocation.smoothable`), is a :class:`UserError`.
    """
    name, rev = parse_label(label)
    rule = ALLOCATIONS.get(name)
    if rule is None or getattr(rule, kind) is None or (rev and kind not in rule.reversible):
        known = [n + suffix for n in names(kind) for suffix in ("", REVERSED)
                 if not suffix or kind in ALLOCATIONS[n].reversible]
        raise UserError(f"unknown allocation {label!r} (use {', '.join(known)})")
    if reverse and kind not in rule.reversible:
        allowed = " or ".join(n for n in names(kind) if kind in ALLOCATIONS[n].reversible)
        raise UserError(f"--reverse applies to --allocation {allowed}")
    if smooth and (kind != "sparsity" or not rule.smoothable):
        allowed = ", ".join(n for n in names("sparsity") if ALLOCATIONS[n].smoothable)
        raise UserError(f"--smooth applies to the allocations with a per-block metric ({allowed}), "
                        f"not to {name}")
    return rule, rev or reverse


def allocate_sparsity(label: str, metric, target: float, weights, options: SparsityOptions = SparsityOptions(),
                      reverse: bool = False) -> np.ndarray:
    """Per-block sparsity [L] of an allocation label from its metric (``None`` when it has none).

    The ``weights`` (prunable parameters per block) weighted mean is ``target``. With ``options.smooth`` the
    metric is smoothed (:func:`smooth_metric`) before the rule maps it, the same for every rule that has a
    per-block metric; smoothing a rule without one is a :class:`UserError` (:func:`get`).
    """
    rule, rev = get(label, "sparsity", reverse, options.smooth)
    if options.smooth:
        metric = smooth_metric(metric)
    return rule.sparsity(metric, target, np.asarray(weights, dtype=np.float64), options, rev)


def allocate_experts(label: str, metric, n_blocks: int, total: int | None = None, beta: float = 2.5,
                     reverse: bool = False) -> np.ndarray:
    """Experts per block (int64 [L], summing to T) of an allocation label from its metric.

    ``total`` None means T = 5 × blocks.
    """
    rule, rev = get(label, "experts", reverse)
    total = EXPERTS_PER_BLOCK * n_blocks if total is None else total
    return rule.experts(metric, n_blocks, total, beta, rev)


# ----------------------------------------------------------------------------- LoRA capacity (fine-tuning)
#
# Plain LoRA fine-tuning (``layerif finetune``) spends a budget of K blocks × rank r. A capacity rule turns it
# into a LoRA rank per block (int64 [L], 0 = no LoRA on that block) with Σ r_l = K · r exactly, so every rule
# of one comparison trains the same number of parameters (blocks of one model have the same projections).
# Rules that rank blocks by a metric (``top``, ``bottom``, ``rank``) take it from ``--metric``: the LayerIF
# score S_l (``layerif``), AlphaLoRA's heavy-tail α (``alpha``) or the measured per-block fine-tune gain of
# ``layerif validate`` (``gain``, the upper reference among one-shot choices). A label is ``RULE`` or
# ``RULE:METRIC`` (``top:layerif``).

CAPACITY_METRICS = {"layerif": "scores", "alpha": "alpha", "gain": "gain"}
"""Metric name of a capacity label -> the metric kind it reads (as :attr:`Allocation.metric`)."""


def _check_budget(n_blocks: int, blocks: int, rank: int) -> None:
    if rank < 1:
        raise UserError(f"--rank must be ≥ 1 (got {rank})")
    if not 1 <= blocks <= n_blocks:
        raise UserError(f"--blocks {blocks} is outside 1..{n_blocks} (the model has {n_blocks} blocks)")


def _on_blocks(chosen, n_blocks: int, rank: int) -> np.ndarray:
    out = np.zeros(n_blocks, dtype=np.int64)
    out[np.asarray(chosen, dtype=np.int64)] = rank
    return out


def ranked_blocks(metric, k: int, highest: bool = True) -> np.ndarray:
    """The indices of the ``k`` blocks with the highest (or lowest) metric, ties to the lower index (int64 [k])."""
    m = _metric(metric, "metric")
    order = np.argsort(-m if highest else m, kind="stable")
    return np.sort(order[:k])


def spread_ranks(metric, n_blocks: int, blocks: int, rank: int, beta: float) -> np.ndarray:
    """LoRA on every block, rank r_l ∝ (m_l − min m)^β with r_l ≥ 1 and Σ r_l = K · r (:func:`layerif_experts`'
    rule with T = K · r); a constant metric or β = 0 gives the uniform spread. Needs K · r ≥ L."""
    total = blocks * rank
    if total < n_blocks:
        raise UserError(f"--blocks {blocks} × --rank {rank} = {total} rank units cannot give each of the "
                        f"{n_blocks} blocks rank ≥ 1; raise --blocks or --rank")
    if metric is None:
        return uniform_experts(n_blocks, total)
    return layerif_experts(metric, total, beta)


@dataclass(frozen=True)
class Capacity:
    """A LoRA capacity rule: ``ranks(metric, n_blocks, blocks, rank, beta, draw_seed) -> int64 [L]``
    (Σ = blocks · rank); ``uses_metric``: whether it needs ``--metric`` (else it takes none)."""

    name: str
    uses_metric: bool
    ranks: Callable[..., np.ndarray]


CAPACITIES: dict[str, Capacity] = {}


def register_capacity(rule: Capacity) -> Capacity:
    """Add (or replace) a capacity rule in :data:`CAPACITIES`."""
    CAPACITIES[rule.name] = rule
    return rule


register_capacity(Capacity("top", True, lambda m, n, k, r, beta, draw: _on_blocks(ranked_blocks(m, k), n, r)))
register_capacity(Capacity("bottom", True,
                           lambda m, n, k, r, beta, draw: _on_blocks(ranked_blocks(m, k, highest=False), n, r)))
register_capacity(Capacity("rank", True, lambda m, n, k, r, beta, draw: spread_ranks(m, n, k, r, beta)))
register_capacity(Capacity("uniform", False, lambda m, n, k, r, beta, draw: spread_ranks(None, n, k, r, beta)))
register_capacity(Capacity("first", False, lambda m, n, k, r, beta, draw: _on_blocks(np.arange(k), n, r)))
register_capacity(Capacity("last", False, lambda m, n, k, r, beta, draw: _on_blocks(np.arange(n - k, n), n, r)))
register_capacity(Capacity("random", False, lambda m, n, k, r, beta, draw: _on_blocks(
    np.sort(np.random.default_rng(draw).choice(n, size=k, replace=False)), n, r)))


def parse_capacity(label: str, metric: str | None = None) -> tuple[Capacity, str | None]:
    """``RULE`` or ``RULE:METRIC`` (``metric`` is the default metric name) -> (rule, metric name or None).

    An unknown rule or metric, a metric on a rule that takes none, or a ranking rule without one is a
    :class:`UserError`.
    """
    name, _, named = label.partition(":")
    rule = CAPACITIES.get(name)
    if rule is None:
        raise UserError(f"unknown allocation {label!r} (use {', '.join(CAPACITIES)}, e.g. top:layerif)")
    if not rule.uses_metric:
        if named:
            raise UserError(f"allocation {name!r} takes no metric (got {label!r})")
        return rule, None
    chosen = named or metric
    if chosen is None:
        raise UserError(f"allocation {name!r} ranks blocks by a metric: use {name}:METRIC or --metric "
                        f"({', '.join(CAPACITY_METRICS)})")
    if chosen not in CAPACITY_METRICS:
        raise UserError(f"unknown metric {chosen!r} (use {', '.join(CAPACITY_METRICS)})")
    return rule, chosen


def capacity_ranks(label: str, metric, n_blocks: int, blocks: int, rank: int, beta: float = 1.0,
                   draw_seed: int = 0, default_metric: str | None = None) -> np.ndarray:
    """LoRA rank per block (int64 [L], 0 = no LoRA) of a capacity label with budget ``blocks`` × ``rank``.

    ``metric``: the per-block metric values (float [L]) the label's metric names, or None for rules that
    take none; ``draw_seed`` fixes ``random``'s draw. Σ r_l = blocks · rank for every rule.
    """
    rule, named = parse_capacity(label, default_metric)
    _check_budget(n_blocks, blocks, rank)
    if named is not None:
        metric = _metric(metric, named)
        if metric.size != n_blocks:
            raise UserError(f"{metric.size} {named} values for {n_blocks} blocks")
    return rule.ranks(metric, n_blocks, blocks, rank, check_beta(beta), draw_seed)
