r"""How much would the block ranking change with other samples?

Two checks, both on the layer score S_l = -sum_i min(I_l(i), 0):

* **Bootstrap** (:func:`bootstrap`): resample the train records with
  replacement (and, with per-validation influences, optionally the validation
  records) from the already-computed per-sample influences I_l(i) -- no new
  gradients. Gives per-block percentile intervals of S_l, the probability that
  each block is in the top-k, and the *rank stability*: the mean Spearman
  correlation between the resampled and the full-data block ranking. It is
  conditional on the estimator's fixed quantities: DataInf's lambda_m and its
  inverse-Hessian approximation (and exact's) depend on the whole train set and
  are *not* re-estimated per resample, so it measures how much the ranking
  depends on which samples are summed, not the estimator's own variability.
* **Split-half** (:func:`layerif.scores.split_half_recompute`, :func:`split_half_from_stats`,
  :func:`split_half_from_influence`): two disjoint random halves of the train
  records are scored *separately* -- lambda, the Hessian approximation and the
  1/n terms from each half alone -- and their block rankings compared
  (Spearman, and the Spearman-Brown projection 2 rho / (1 + rho) of the
  full-size reliability). Assumption-free, at the cost of half-size data. For
  ``grad-dot`` a sample's influence -g_i . v does not depend on the other
  samples, so the halves come from the per-sample influences directly; other
  estimators need the halves recomputed (from the Gram statistics when they are
  at hand, else by new scoring runs).

The validation records are shared by both halves; the bootstrap resamples them
only with ``resample_val`` (needs ``--per-val``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .errors import UserError
from .io import pyplot
from .influence import ModuleStats

LEVEL = 0.95
# how every bootstrap rank-stability figure is labelled: it resamples the sum, not the estimator's fixed quantities
CONDITIONAL = "conditional on λ and the Hessian"


# ----------------------------------------------------------------------------- statistics


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension (ties get their average rank), float64."""
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(x.detach().double().cpu().numpy(), axis=-1)).double()


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching rows of a and b [..., L]; NaN where a row is constant."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    num = (a * b).sum(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, math.nan))


def pearson(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Pearson correlation of two equally long sequences; NaN when either is constant."""
    return float(_pearson_rows(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation (ties averaged); NaN when either sequence is constant."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(_pearson_rows(_ranks(a), _ranks(b)))


def spearman_interval(
    a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor, B: int = 1000, seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float, float]:
    """Spearman of paired sequences a, b [L] and its percentile bootstrap interval over the pairs.

    Each of the ``B`` resamples draws L pairs (i.e. blocks) with replacement and
    recomputes the rank correlation (ties averaged); resamples where it is
    undefined (a constant side) are skipped. Returns (rho, low, high); NaN where
    undefined.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    rho = spearman(a, b)
    idx = torch.randint(a.numel(), (B, a.numel()), generator=torch.Generator().manual_seed(seed))
    boot = _pearson_rows(_ranks(a[idx]), _ranks(b[idx]))
    boot = boot[torch.isfinite(boot)]
    if not boot.numel():
        return rho, math.nan, math.nan
    lo, hi = torch.quantile(boot, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return rho, lo, hi


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of repeated runs."""
    arr = torch.tensor(list(values), dtype=torch.float64)
    return float(arr.mean()), float(arr.std()) if arr.numel() > 1 else 0.0


def mean_std_cell(ms: tuple[float, float], best: float, digits: int) -> str:
    """A table cell 'mean ± std' with ``digits`` decimals, bold when the mean equals ``best`` (ties all bold)."""
    text = f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"
    return f"**{text}**" if ms[0] == best else text


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for people: ``digits`` significant digits, 'n/a' for None."""
    return "n/a" if x is None else f"{x:.{digits}g}"


def finite(x: float) -> float | None:
    """``x`` for JSON: None when NaN or infinite."""
    return x if math.isfinite(x) else None


def top_k_blocks(layers: Sequence[int], scores: Sequence[float], k: int) -> list[int]:
    """The k blocks with the largest scores, best first (ties: lower block first)."""
    order = sorted(range(len(layers)), key=lambda i: (-scores[i], layers[i]))
    return [layers[i] for i in order[:k]]


def top_k_overlap(layers: Sequence[int], a: Sequence[float], b: Sequence[float], k: int) -> float:
    """|top-k(a) & top-k(b)| / k, with k capped at the number of blocks."""
    k = min(k, len(layers))
    return len(set(top_k_blocks(layers, a, k)) & set(top_k_blocks(layers, b, k))) / k


def _helpful(I: torch.Tensor) -> torch.Tensor:
    """Per-sample contributions -min(I, 0) >= 0 whose sum over samples is S_l."""
    return (-I.double()).clamp_min(0)


def _stack(influence: dict[int, torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """(sorted blocks, their influences stacked as float64 [L, n] or [L, n_val, n] on the CPU)."""
    layers = sorted(influence)
    return layers, torch.stack([influence[l].double().cpu() for l in layers])


def layer_scores(influence: dict[int, torch.Tensor]) -> list[float]:
    """S_l of every block (sorted), summing per-validation influences [n_val, n] first."""
    _, X = _stack(influence)
    if X.dim() == 3:
        X = X.sum(dim=1)
    return _helpful(X).sum(dim=1).tolist()


# ----------------------------------------------------------------------------- bootstrap


def bootstrap(
    influence: dict[int, torch.Tensor],
    B: int,
    top_k: int = 5,
    seed: int = 0,
    resample_val: bool = False,
    level: float = LEVEL,
) -> dict:
    """Bootstrap the layer scores from per-sample block influences (no new gradients).

    ``influence``: block -> I_l, [n_train], or [n_val, n_train] (per-validation
    columns; summed unless ``resample_val``). Each of the ``B`` resamples draws
    n_train train records with replacement (and n_val validation records with
    ``resample_val``) and recomputes S_l of every block.

    Returns a JSON-ready dict: ``layers``, full-data ``score``, percentile
    ``ci_low``/``ci_high`` at ``level``, ``std``, ``rel_width`` ((high - low) / S_l,
    None where S_l = 0), ``p_top_k`` (share of resamples with the block in the
    top-k), ``top_k_blocks`` (full data), ``rank_stability`` (mean Spearman of
    resampled vs full-data scores over the resamples where it is defined) and
    its ``rank_stability_ci``. The fixed estimator quantities caveat is in the
    module docstring.
    """
    if B < 2:
        raise UserError(f"--bootstrap must be >= 2 resamples, or 0 for none (got {B})")
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {top_k})")
    layers, X = _stack(influence)
    if resample_val and X.dim() != 3:
        raise UserError("resampling validation records needs per-validation influences (--per-val)")
    if X.dim() == 3 and not resample_val:
        X = X.sum(dim=1)
    n = X.shape[-1]
    if n < 2:
        raise UserError(f"the bootstrap needs at least 2 train records (got {n})")
    k = min(top_k, len(layers))
    gen = torch.Generator().manual_seed(seed)

    def counts(m: int) -> torch.Tensor:
        """[B, m]: how often each of m records is drawn in each resample of m draws with replacement."""
        ones = torch.ones(B, m, dtype=torch.float64)
        return torch.zeros(B, m, dtype=torch.float64).scatter_add_(1, torch.randint(m, (B, m), generator=gen), ones)

    train_counts = counts(n)
    if X.dim() == 3:
        val_counts = counts(X.shape[1])  # [B, n_val]
        full = _helpful(X.sum(dim=1)).sum(dim=1)
        S = torch.stack([_helpful(torch.einsum("j,ljn->ln", val_counts[b], X)) @ train_counts[b] for b in range(B)])
    else:
        H = _helpful(X)  # [L, n]
        full = H.sum(dim=1)
        S = train_counts @ H.T  # [B, L]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(S, q, dim=0)
    in_top = torch.zeros(B, len(layers), dtype=torch.float64).scatter_(1, torch.topk(S, k, dim=1).indices, 1.0)
    rho = _pearson_rows(_ranks(S), _ranks(full).expand(B, -1))
    rho = rho[torch.isfinite(rho)]
    stab = float(rho.mean()) if rho.numel() else math.nan
    stab_ci = torch.quantile(rho, q).tolist() if rho.numel() else [math.nan, math.nan]
    return {
        "method": "bootstrap",
        "B": B,
        "level": level,
        "seed": seed,
        "resample_val": resample_val,
        "top_k": k,
        "layers": layers,
        "score": full.tolist(),
        "ci_low": lo.tolist(),
        "ci_high": hi.tolist(),
        "std": S.std(dim=0).tolist(),
        "rel_width": [finite(float((h - l) / s)) if s > 0 else None for l, h, s in zip(lo, hi, full)],
        "p_top_k": in_top.mean(dim=0).tolist(),
        "top_k_blocks": top_k_blocks(layers, full.tolist(), k),
        "rank_stability": finite(stab),
        "rank_stability_ci": [finite(float(x)) for x in stab_ci],
    }


# ----------------------------------------------------------------------------- split-half


def split_indices(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint random halves of range(n), each n // 2 long (one record left out when n is odd)."""
    if n < 4:
        raise UserError(f"split-half needs at least 4 train records (got {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    m = n // 2
    return sorted(perm[:m]), sorted(perm[m : 2 * m])


def split_half_summary(
    layers: Sequence[int], score_a: Sequence[float], score_b: Sequence[float], top_k: int, method: str, n_half: int, seed: int
) -> dict:
    """The JSON-ready comparison of two halves' layer scores.

    ``spearman`` is the halves' rank correlation, ``spearman_brown`` = 2 rho / (1 + rho)
    its projection to the full size, ``top_k_overlap`` the shared share of the halves' top-k.
    """
    rho = spearman(score_a, score_b)
    k = min(top_k, len(layers))
    return {
        "method": method,
        "n_half": n_half,
        "seed": seed,
        "top_k": k,
        "layers": list(layers),
        "score_a": list(map(float, score_a)),
        "score_b": list(map(float, score_b)),
        "spearman": finite(rho),
        "spearman_brown": finite(2 * rho / (1 + rho)) if rho > -1 else None,
        "pearson": finite(pearson(score_a, score_b)),
        "top_k_overlap": top_k_overlap(layers, score_a, score_b, k),
    }


def cross_vs_within(labels: Sequence[str], cross: Sequence[Sequence[float | None]],
                    within: dict[str, float | None]) -> list[dict]:
    """Cross-task rank correlations against what each task's own noise allows.

    ``cross[i][j]``: Spearman of tasks i and j's full-data block profiles;
    ``within[t]``: task t's recomputed split-half Spearman, Spearman-Brown
    corrected to the full size (:func:`split_half_summary`), i.e. the
    correlation of two independent full-size replications of t's profile.
    Two tasks with the *same* underlying profile would correlate at about
    ``ceiling`` = sqrt(r_a r_b) (the attenuation bound); ``disattenuated`` =
    rho / ceiling. One dict per pair a < b: ``a``, ``b``, ``spearman``,
    ``within_a``, ``within_b``, ``ceiling`` and ``disattenuated`` (None where a
    reliability is missing or <= 0), and ``below_ceiling`` (rho < ceiling).
    """
    out = []
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            b, rho = labels[j], cross[i][j]
            ra, rb = within.get(a), within.get(b)
            ceiling = math.sqrt(ra * rb) if ra is not None and rb is not None and ra > 0 and rb > 0 else None
            out.append({"a": a, "b": b, "spearman": rho, "within_a": ra, "within_b": rb, "ceiling": ceiling,
                        "disattenuated": rho / ceiling if ceiling and rho is not None else None,
                        "below_ceiling": (rho < ceiling) if ceiling and rho is not None else None})
    return out


def split_half_from_influence(influence: dict[int, torch.Tensor], top_k: int = 5, seed: int = 0) -> dict:
    """Split-half from per-sample influences; valid only when I(i) does not depend on the other samples (grad-dot)."""
    layers, X = _stack(influence)
    if X.dim() == 3:
        X = X.sum(dim=1)
    a, b = split_indices(X.shape[-1], seed)
    H = _helpful(X)
    return split_half_summary(layers, H[:, a].sum(1).tolist(), H[:, b].sum(1).tolist(), top_k,
                              "per-sample influences", len(a), seed)


def _sub_stats(stats: dict[str, ModuleStats], idx: list[int]) -> dict[str, ModuleStats]:
    """The Gram statistics of the train records ``idx`` alone."""
    t = torch.tensor(idx)
    return {name: ModuleStats(K=s.K[t][:, t], P=s.P[t], d=s.d) for name, s in stats.items()}


def split_half_from_stats(
    stats: dict[str, ModuleStats],
    block_influence: Callable[[dict[str, ModuleStats]], dict[int, torch.Tensor]],
    top_k: int = 5,
    seed: int = 0,
) -> dict:
    """Split-half by rescoring each half from its own Gram statistics (K[A, A], P[A]): exact, no new gradients.

    ``block_influence`` maps Gram statistics to block influences (an estimator with
    its damping); each half gets its own lambda and Hessian approximation.
    """
    n = next(iter(stats.values())).K.shape[0]
    a, b = split_indices(n, seed)
    inf_a, inf_b = (block_influence(_sub_stats(stats, idx)) for idx in (a, b))
    return split_half_summary(sorted(inf_a), layer_scores(inf_a), layer_scores(inf_b), top_k,
                              "recomputed from Gram statistics", len(a), seed)


# ----------------------------------------------------------------------------- text


def summary(stab: dict | None) -> str:
    """One or two terminal lines on the stability of a ranking ('' when none was measured)."""
    lines = []
    if stab and "bootstrap" in stab:
        b = stab["bootstrap"]
        lo, hi = b["rank_stability_ci"]
        lines.append(f"rank stability (bootstrap, B={b['B']}): {fmt(b['rank_stability'], 2)} "
                     f"[{fmt(lo, 2)}, {fmt(hi, 2)}] ({CONDITIONAL}); top-{b['top_k']} blocks {b['top_k_blocks']} with P(top-{b['top_k']}) "
                     + ", ".join(f"{p:.2f}" for p in _p_of(b, b["top_k_blocks"])))
    if stab and "split_half" in stab:
        s = stab["split_half"]
        lines.append(f"split-half ({s['n_half']} + {s['n_half']} train records, {s['method']}): Spearman "
                     f"{fmt(s['spearman'], 2)}, Spearman-Brown {fmt(s['spearman_brown'], 2)}, "
                     f"top-{s['top_k']} overlap {s['top_k_overlap']:.2f}")
    return "\n".join(lines)


def _p_of(b: dict, blocks: list[int]) -> list[float]:
    return [b["p_top_k"][b["layers"].index(l)] for l in blocks]


# ----------------------------------------------------------------------------- pictures


def error_bars(ax, stab: dict | None) -> None:
    """Draw the bootstrap intervals of S_l on a bar chart of the scores (nothing without a bootstrap)."""
    if not stab or "bootstrap" not in stab:
        return
    b = stab["bootstrap"]
    s = torch.tensor(b["score"])
    lo, hi = torch.tensor(b["ci_low"]), torch.tensor(b["ci_high"])
    yerr = torch.stack([(s - lo).clamp_min(0), (hi - s).clamp_min(0)]).numpy()
    ax.errorbar(b["layers"], s.numpy(), yerr=yerr, fmt="none", ecolor="#222222", elinewidth=1, capsize=2,
                label=f"{100 * b['level']:.0f}% bootstrap interval (B={b['B']})")
    ax.legend(fontsize=8, loc="best")


def figure(stab: dict):
    """stability.png: P(top-k) per block (bootstrap) and the two halves' normalized profiles (split-half)."""
    panels = [p for p in ("bootstrap", "split_half") if p in stab]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 3.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        s = stab[name]
        if name == "bootstrap":
            ax.bar(s["layers"], s["p_top_k"], color="#3a6ea5")
            ax.set_ylim(0, 1.02)
            ax.set_ylabel(f"P(block in top-{s['top_k']})")
            ax.set_title(f"bootstrap B={s['B']}: rank stability {fmt(s['rank_stability'], 2)}\n({CONDITIONAL})", fontsize=10)
        else:
            for key, label, style in (("score_a", "half A", "-o"), ("score_b", "half B", "-s")):
                v = torch.tensor(s[key])
                ax.plot(s["layers"], (v / v.sum() if v.sum() > 0 else v).numpy(), style, ms=3, label=label)
            ax.set_ylabel("share of S (sum of blocks = 1)")
            ax.set_title(f"split-half ({s['n_half']} + {s['n_half']}): Spearman {fmt(s['spearman'], 2)}", fontsize=10)
            ax.legend(fontsize=8)
        ax.set_xlabel("decoder block")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
