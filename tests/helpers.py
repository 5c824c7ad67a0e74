"""Reference constructions only the tests use (the library builds these through its engines)."""

from __future__ import annotations

import torch
from torch import nn

from layerif.grads import Factored
from layerif.influence import ESTIMATORS, EstimatorOptions, ModuleStats


def flat_params(module: nn.Module) -> torch.Tensor:
    """The module's own parameters flattened in the gradient contract's order, [d]."""
    return torch.cat([p.detach().flatten() for p in module.parameters(recurse=False)])


def stats_from_grads(G: torch.Tensor, V: torch.Tensor) -> ModuleStats:
    """:class:`ModuleStats` from train gradients G [n, d] and validation gradients V [k, d] (or [d])."""
    if V.dim() == 1:
        V = V[None]
    G64, V64 = G.double(), V.double()
    return ModuleStats(K=G64 @ G64.T, P=G64 @ V64.T, d=G.shape[1])


def factored_from_batches(module: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                          n: int) -> Factored:
    """:class:`Factored` from (x [B, T, in], delta [B, T, out], mask [B, T]) of consecutive batches covering n
    samples."""
    x0 = parts[0][0]
    f = Factored.allocate(module, sum(int(m.sum()) for _, _, m in parts), n, x0.dtype, x0.device)
    at = offset = 0
    for x, delta, mask in parts:
        at = f.fill(at, x, delta, mask, offset)
        offset += x.shape[0]
    return f


def module_influence(stats: ModuleStats, estimator: str, lam: float) -> torch.Tensor:
    """Influence I [n, k] (float64) of each train sample on each validation column for one module, by the
    estimator's Gram form with default options."""
    return ESTIMATORS[estimator].gram(stats, lam, EstimatorOptions())


def compute(lm, train, val, target: str = "attn", estimator: str = "datainf", damping_scale: float = 0.1,
            per_val: bool = False, batch_size: int = 8, max_memory_gb: float | None = None, layout: str = "auto",
            mode: str = "auto", val_chunk: int = 8, cache_dir=None, **options):
    """:func:`layerif.scores.compute` with its configs built from keywords (the tests' one spelling of a run);
    ``options``: :class:`EstimatorOptions` fields."""
    from layerif.engine import EngineConfig
    from layerif.influence import EstimatorConfig
    from layerif.scores import compute as library_compute

    return library_compute(lm, train, val, EstimatorConfig(estimator, damping_scale, EstimatorOptions(**options)),
                           EngineConfig(target, per_val, batch_size, max_memory_gb, layout, mode, val_chunk), cache_dir)
