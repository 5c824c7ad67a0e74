"""Layer-wise unstructured pruning: the masks, the pruner registry, pruning a model block by block.

Pruners (every projection inside the decoder blocks: attention and MLP; the
embeddings and the LM head are never pruned) are :class:`Pruner` records in the
registry :data:`PRUNERS`; adding one is one :func:`register` call:

* ``magnitude`` -- the smallest |W| of each matrix (as the Wanda repository's
  magnitude baseline), no calibration data.
* ``wanda`` -- score |W_ij| · ‖X_j‖₂ (X: the module's inputs over every
  calibration token), compared within each output row (Sun et al., 2024).
* ``sparsegpt`` -- the OBS reconstruction of Frantar & Alistarh (2023): H = XᵀX
  damped by 1% of its mean diagonal, Cholesky of H⁻¹, columns processed in blocks
  of 128, the mask chosen per column block by w² / [H⁻¹]²_jj and the pruning error
  propagated to the columns not yet processed.

Calibration is block by block, as in the reference code of both: the
calibration windows are run through block l to collect its inputs' statistics,
block l is pruned, and the outputs of the *pruned* block l are the inputs of
block l + 1.

Sparsity is given per decoder block (a ratio in [0, 1)), optionally overridden
per module. A ratio r zeroes round(r · in) weights in each row (Wanda), round(r ·
size) of each column block (SparseGPT) or round(r · size) of the matrix
(magnitude). ``nm=(N, M)`` instead zeroes the N lowest-scored weights of every
M consecutive inputs of a row, sparsity N/M. This is how the Wanda, SparseGPT
and llm-compressor code read "N:M" (N *pruned* of M): "2:4" is the 2:4 pattern
of sparse tensor cores, while "1:4" prunes one weight in four.

Allocations (:mod:`layerif.allocate`): ``uniform``; ``layerif`` (the linear map of
the LayerIF scores S_l); ``alpha`` (AlphaPruning: the same map of the heavy-tail
exponent α, :mod:`layerif.spectral`); ``owl`` (OWL: outlier ratios of the Wanda
scores, measured with the dense model); ``dlp`` (DLP: the median Wanda score per
block, measured as OWL's ratios); ``atp`` (ATP: sparsity rising with depth, no metric).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import progress
from .errors import UserError
from .models import find_blocks, iter_projections, projections, set_weight_out_in, weight_out_in
from .calibration import InputStats, calibrate

DAMPING = 0.01
BLOCK_SIZE = 128


# ----------------------------------------------------------------------------- structure


def prunable_modules(model: nn.Module) -> dict[str, tuple[int, nn.Module]]:
    """Every projection inside the decoder blocks: fully qualified name -> (block index, module)."""
    return {p.name: (p.block, p.module) for p in iter_projections(model)}


def prunable_params(model: nn.Module) -> np.ndarray:
    """Weights that pruning may zero, per block (the weights of the parameter-weighted mean), int64 [L]."""
    _, blocks = find_blocks(model)
    counts = np.zeros(len(blocks), dtype=np.int64)
    for idx, mod in prunable_modules(model).values():
        counts[idx] += mod.weight.numel()
    return counts


def module_sparsity(model: nn.Module, ratios, module_ratios: dict[str, float] | None = None) -> dict[str, float]:
    """The sparsity of each prunable module: its block's ratio, unless ``module_ratios`` names it."""
    mods = prunable_modules(model)
    r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    n_blocks = len(prunable_params(model))
    if r.size != n_blocks:
        raise UserError(f"{r.size} sparsity ratios for a model with {n_blocks} blocks")
    extra = sorted(set(module_ratios or {}) - set(mods))
    if extra:
        raise UserError(f"not a prunable module: {extra[0]}")
    out = {name: float((module_ratios or {}).get(name, r[idx])) for name, (idx, _) in mods.items()}
    for name, value in out.items():
        if not 0.0 <= value < 1.0:
            raise UserError(f"sparsity {value:g} of {name} is outside [0, 1)")
    return out


def achieved_sparsity(model: nn.Module) -> tuple[np.ndarray, dict[str, float]]:
    """Measured share of exactly-zero weights: per block (over its projections) float64 [L], and per module."""
    _, blocks = find_blocks(model)
    zeros = np.zeros(len(blocks))
    sizes = np.zeros(len(blocks))
    per_module = {}
    for name, (idx, mod) in prunable_modules(model).items():
        z = int((mod.weight == 0).sum())
        per_module[name] = z / mod.weight.numel()
        zeros[idx] += z
        sizes[idx] += mod.weight.numel()
    return zeros / sizes, per_module


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """``"N:M"`` -> (N, M) with 0 < N < M; ``None`` or ``""`` -> ``None``."""
    if not nm:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", nm)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--nm {nm!r} is not N:M with 0 < N < M (e.g. 2:4)")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- masks


def row_masks(score: torch.Tensor, ratios: Sequence[float]) -> list[torch.Tensor]:
    """Per ratio, True for the round(ratio · in) lowest scores of each row of an [out, in] score (ties by
    position); the rows are sorted once for every ratio."""
    ks = [int(round(r * score.shape[1])) for r in ratios]
    order = torch.sort(score, dim=1, stable=True).indices if max(ks) else None
    masks = [torch.zeros_like(score, dtype=torch.bool) for _ in ks]
    for mask, k in zip(masks, ks):
        if k:
            mask.scatter_(1, order[:, :k], True)
    return masks


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """True for the round(ratio · in) lowest scores of each row of an [out, in] score; ties by position."""
    return row_masks(score, [ratio])[0]


def lowest_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """True for the round(ratio · size) lowest scores of the whole tensor (ties by position; NaN highest).

    The k-th lowest score is found by selection, not by a sort: every score below it is in, and of the scores
    equal to it the first ones in row-major order (a stable sort's choice).
    """
    k = int(round(ratio * score.numel()))
    flat = score.flatten()
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = torch.kthvalue(flat, k).values
    nan = bool(torch.isnan(kth))
    mask = ~torch.isnan(flat) if nan else flat < kth
    ties = torch.nonzero(torch.isnan(flat) if nan else flat == kth).squeeze(1)[: k - int(mask.sum())]
    mask[ties] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the ``n`` lowest scores in every group of ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise UserError(f"N:M pruning with M={m} needs input sizes divisible by {m} (a module has {cols})")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.view(rows, cols)


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| · ‖X_j‖₂ for an [out, in] weight and Σ_tokens x_j² [in] (float32)."""
    return weight.detach().float().abs() * sq_norm.float().sqrt().unsqueeze(0)


def sparsegpt_weights(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratios: Sequence[float],
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    damping: float = DAMPING,
) -> list[torch.Tensor]:
    """SparseGPT's pruned and reconstructed [out, in] weight (float32) at each of ``ratios``, the reference
    algorithm run for all of them in one sweep.

    ``hessian`` is Σ x xᵀ over the calibration tokens [in, in] (its scale does not
    matter). Inputs that never fire get their column zeroed. The mask of each
    block of ``block_size`` columns takes the round(ratio · size) lowest
    w² / [H⁻¹]_jj² (or N of each M with ``nm``, the ratios then unused), and each
    pruned column's error is propagated to the later columns through the upper
    Cholesky factor of H⁻¹. The factor is computed once; the ratios' transposed
    weights are stacked [len(ratios), in, out] (a column of W a contiguous row)
    and swept column by column together (the per-column updates are elementwise,
    the update of the later columns one matmul per ratio on the reference's
    operands), so every ratio's result is exactly the one it gets alone.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(cols, device=H.device)
    H[diag, diag] += damping * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if nm is not None and block_size % nm[1]:
        raise UserError(f"the SparseGPT block size {block_size} is not a multiple of M={nm[1]}")
    S = W.t().unsqueeze(0).repeat(len(ratios), 1, 1)  # [ratios, in, out]: a column of W is a contiguous row
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = S[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if nm is None:  # scored as [out, size], so ties fall as in the reference
            mask1 = torch.stack([lowest_mask(W1[k].t() ** 2 / d1.reshape(1, -1) ** 2, r).t()
                                 for k, r in enumerate(ratios)])
        else:  # chosen group by group below, on the weights updated so far (as the reference)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                group = W1[:, i : i + nm[1]].transpose(1, 2) ** 2 / d1[i : i + nm[1]] ** 2  # [ratios, out, M]
                mask1[:, i : i + nm[1]] = nm_mask(group.reshape(-1, nm[1]), *nm).view(group.shape).transpose(1, 2)
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i + 1 :] -= Hinv1[i, i + 1 :].unsqueeze(1) * err.unsqueeze(1)
            Err1[:, i] = err
        S[:, i1:i2] = Q1
        for k in range(len(ratios)):
            S[k, i2:] -= Err1[k].t().contiguous().matmul(Hinv[i1:i2, i2:]).t()  # the reference's operands
    return [Wk.t().contiguous() for Wk in S.unbind(0)]


def sparsegpt_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    damping: float = DAMPING,
) -> torch.Tensor:
    """SparseGPT's pruned and reconstructed [out, in] weight (float32) at one ``ratio``
    (:func:`sparsegpt_weights`)."""
    return sparsegpt_weights(weight, hessian, [ratio], nm, block_size, damping)[0]


# ----------------------------------------------------------------------------- the pruner registry


@dataclass(frozen=True)
class PruneSettings:
    """What a pruner is told besides the ratio: ``nm`` -- N:M sparsity (N pruned of every M inputs of a
    row) instead of the ratio; SparseGPT's ``damping`` (a fraction of the mean Hessian diagonal) and column
    ``block_size``."""

    nm: tuple[int, int] | None = None
    damping: float = DAMPING
    block_size: int = BLOCK_SIZE


SETTINGS = {"block_size": "block_size", "damping": "dampening_frac"}
"""The :class:`PruneSettings` a pruner may declare it reads (:attr:`Pruner.settings`) -> llm-compressor's key."""


@dataclass(frozen=True)
class Pruner:
    """A pruner: how it prunes one projection, what it needs, and its llm-compressor name.

    ``prune(weight, ratio, stats, settings)`` gets a projection's detached [out,
    in] weight, the sparsity ``ratio`` in [0, 1) (ignored when ``settings.nm``
    is set), its inputs' calibration statistics (:class:`InputStats`; ``None``
    unless ``needs_calibration``; with the Hessian Σ x xᵀ when ``needs_hessian``)
    and the :class:`PruneSettings`; it must not change ``weight``. It returns
    the bool [out, in] mask of the weights to zero when ``keeps_survivors`` (the
    other weights keep their values), else the whole pruned float32 [out, in]
    weight. ``modifier``: llm-compressor's one-shot modifier of the same
    algorithm (the recipe export), ``None`` when it has none. ``settings``: the
    :class:`PruneSettings` fields besides ``nm`` it reads (keys of
    :data:`SETTINGS`); they enter the level database's fingerprint and the recipe.
    """

    name: str
    prune: Callable[[torch.Tensor, float, InputStats | None, PruneSettings], torch.Tensor]
    needs_calibration: bool
    needs_hessian: bool = False
    keeps_survivors: bool = True
    modifier: str | None = None
    settings: tuple[str, ...] = ()
    prune_levels: Callable[[torch.Tensor, Sequence[float], InputStats | None, PruneSettings],
                           list[torch.Tensor]] | None = None

    def __post_init__(self):
        if self.needs_hessian and not self.needs_calibration:
            raise ValueError(f"pruner {self.name}: a Hessian is a calibration statistic (needs_calibration=True)")
        unknown = sorted(set(self.settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"pruner {self.name}: unknown settings {unknown} (known: {', '.join(SETTINGS)})")


PRUNERS: dict[str, Pruner] = {}
"""Every pruner by name, in registration order."""


def register(pruner: Pruner) -> Pruner:
    """Add ``pruner`` to :data:`PRUNERS` (a name already taken is a ``ValueError``); returns it."""
    if pruner.name in PRUNERS:
        raise ValueError(f"a pruner named {pruner.name!r} is registered already")
    PRUNERS[pruner.name] = pruner
    return pruner


def get_pruner(name: str) -> Pruner:
    """The registered pruner ``name``; an unknown name is a :class:`UserError`."""
    if name not in PRUNERS:
        raise UserError(f"unknown pruning method {name!r} (use {', '.join(PRUNERS)})")
    return PRUNERS[name]


def _magnitude(W: torch.Tensor, ratio: float, stats: None, s: PruneSettings) -> torch.Tensor:
    """The smallest |W| of the matrix (or N of every M inputs of a row)."""
    return nm_mask(W.abs(), *s.nm) if s.nm else lowest_mask(W.abs(), ratio)


def _wanda(W: torch.Tensor, ratio: float, stats: InputStats, s: PruneSettings) -> torch.Tensor:
    """The lowest |W_ij| · ‖X_j‖₂ of each row (or N of every M inputs of a row)."""
    return _wanda_levels(W, [ratio], stats, s)[0]


def _wanda_levels(W: torch.Tensor, ratios: Sequence[float], stats: InputStats, s: PruneSettings
                  ) -> list[torch.Tensor]:
    """Wanda's masks at several ratios from one score and one sort of its rows (:func:`row_masks`)."""
    score = wanda_score(W, stats.sq)
    return [nm_mask(score, *s.nm)] * len(ratios) if s.nm else row_masks(score, ratios)


def _sparsegpt(W: torch.Tensor, ratio: float, stats: InputStats, s: PruneSettings) -> torch.Tensor:
    """SparseGPT's pruned and reconstructed weight (:func:`sparsegpt_weight`)."""
    return sparsegpt_weight(W, stats.hessian, ratio, s.nm, s.block_size, s.damping)


def _sparsegpt_levels(W: torch.Tensor, ratios: Sequence[float], stats: InputStats, s: PruneSettings
                      ) -> list[torch.Tensor]:
    """SparseGPT's weights at several ratios in one sweep (:func:`sparsegpt_weights`)."""
    return sparsegpt_weights(W, stats.hessian, ratios, s.nm, s.block_size, s.damping)


register(Pruner("magnitude", _magnitude, needs_calibration=False))
register(Pruner("wanda", _wanda, needs_calibration=True, modifier="WandaPruningModifier",
                prune_levels=_wanda_levels))
register(Pruner("sparsegpt", _sparsegpt, needs_calibration=True, needs_hessian=True, keeps_survivors=False,
                modifier="SparseGPTModifier", settings=("block_size", "damping"), prune_levels=_sparsegpt_levels))


def pruned_levels(module: nn.Module, pruner: Pruner, ratios: Sequence[float], stats: InputStats | None,
                  settings: PruneSettings) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The projection pruned by ``pruner`` at each of ``ratios``, without changing it: per ratio, (the zeros of
    its pruned [out, in] weight (bool), the whole pruned [out, in] weight in the module's dtype when the pruner
    changes surviving weights, else ``None``). One :attr:`Pruner.prune_levels` call for several ratios when the
    pruner has it."""
    if pruner.needs_calibration and stats is None:
        raise ValueError(f"{pruner.name} needs calibration statistics")
    W = weight_out_in(module).detach()
    stats = stats if pruner.needs_calibration else None
    if pruner.prune_levels is not None and len(ratios) > 1:
        outs = pruner.prune_levels(W, ratios, stats, settings)
    else:
        outs = [pruner.prune(W, ratio, stats, settings) for ratio in ratios]
    if pruner.keeps_survivors:
        zeros = W == 0  # once for every ratio
        return [(out | zeros, None) for out in outs]
    return [(new == 0, new) for new in (out.to(W.dtype) for out in outs)]


def pruned_weight(module: nn.Module, pruner: Pruner, ratio: float, stats: InputStats | None,
                  settings: PruneSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projection pruned by ``pruner`` at one ``ratio`` (:func:`pruned_levels`)."""
    return pruned_levels(module, pruner, [ratio], stats, settings)[0]


def prune_module(
    module: nn.Module,
    method: str,
    ratio: float,
    stats: InputStats | None = None,
    nm: tuple[int, int] | None = None,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> None:
    """Prune one projection in place with the pruner ``method`` at sparsity ``ratio`` (or N:M with ``nm``).

    ``stats``: its inputs' calibration statistics (:class:`InputStats`; with the
    Hessian for a pruner that needs it), unused by a pruner without calibration.
    """
    mask, new = pruned_weight(module, get_pruner(method), ratio, stats, PruneSettings(nm, damping, block_size))
    if new is None:
        with torch.no_grad():
            weight_out_in(module).masked_fill_(mask, 0)
    else:
        set_weight_out_in(module, new)


def prune_model(
    model: nn.Module,
    ratios,
    method: str,
    windows: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    module_ratios: dict[str, float] | None = None,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> dict[str, float]:
    """Prune ``model`` in place; returns the target sparsity of each module.

    ``ratios``: sparsity per decoder block [L]; ``module_ratios`` overrides single
    modules by fully qualified name. ``windows`` (token ids [n, seqlen]) are the
    calibration data of a pruner that needs calibration. With ``nm`` every module gets
    N:M sparsity and the ratios are not used.
    """
    pruner = get_pruner(method)
    sparsity = module_sparsity(model, ratios, module_ratios)
    if not pruner.needs_calibration:
        for name, (_, mod) in progress.track(prunable_modules(model).items(), desc=f"{method} pruning", unit="matrix"):
            prune_module(mod, method, sparsity[name], nm=nm)
        return sparsity
    if windows is None:
        raise ValueError(f"{method} needs calibration windows")
    prefix, _ = find_blocks(model)
    for idx, block, stats in calibrate(model, windows, hessian=pruner.needs_hessian):
        for rel, mod in projections(block).items():
            prune_module(mod, method, sparsity[f"{prefix}.{idx}.{rel}"], stats[rel], nm, damping, block_size)
    return sparsity
