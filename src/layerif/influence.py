r"""Influence estimators, per module, in Gram form.

For one module m with per-sample train gradients G [n, d] (row i = g_i) and
validation gradients V [k, d] (k = 1: the gradient of the *sum* of validation
losses; k = n_val with ``--per-val``), every estimator here needs only

* K = G G^T      [n, n]   (train-train dot products; diag K = ||g_i||^2)
* P = G V^T      [n, k]   (train-validation dot products)
* d              the module's parameter count

so the gradients themselves can be discarded once K and P are formed.

Damping (DataInf, per module): lambda = c * mean_i(||g_i||^2 / d).

Influence of train sample i on validation column j, I[i, j] = - g_i . h_j, with

* ``datainf``: h = 1/(n lambda) sum_l (v - (v.g_l)/(lambda + ||g_l||^2) g_l), so
  I = -(1/lambda) (P - K R / n),  R[l, j] = P[l, j] / (lambda + K[l, l]).
* ``exact``: h = (G^T G / n + lambda I)^-1 v, via Woodbury:
  I = -(1/lambda) (P - K (n lambda I + K)^-1 P).
* ``grad-dot``: h = v, I = -P.

Negative influence = up-weighting the sample lowers the validation loss (helpful).
All algebra runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ESTIMATORS = ("datainf", "exact", "grad-dot")


@dataclass
class ModuleStats:
    """Sufficient statistics of one module: K [n, n], P [n, k], parameter count d."""

    K: torch.Tensor
    P: torch.Tensor
    d: int

    @classmethod
    def from_grads(cls, G: torch.Tensor, V: torch.Tensor) -> "ModuleStats":
        """From train gradients G [n, d] and validation gradients V [k, d] (or [d])."""
        if V.dim() == 1:
            V = V[None]
        G64, V64 = G.double(), V.double()
        return cls(K=G64 @ G64.T, P=G64 @ V64.T, d=G.shape[1])


def damping(stats: ModuleStats, scale: float) -> float:
    """lambda_m = scale * mean_i(||g_i||^2 / d_m)."""
    return float(scale * torch.diagonal(stats.K).mean() / stats.d)


def module_influence(stats: ModuleStats, estimator: str, lam: float) -> torch.Tensor:
    """Influence I [n, k] (float64) of each train sample on each validation column for one module."""
    K, P = stats.K.double(), stats.P.double()
    n = K.shape[0]
    if estimator == "grad-dot":
        return -P
    if estimator == "datainf":
        R = P / (lam + torch.diagonal(K))[:, None]
        return -(P - K @ R / n) / lam
    if estimator == "exact":
        A = K + n * lam * torch.eye(n, dtype=K.dtype, device=K.device)
        return -(P - K @ torch.linalg.solve(A, P)) / lam
    raise ValueError(f"unknown estimator {estimator!r}")
