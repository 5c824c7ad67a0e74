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

* ``lissa``: LiSSA's truncated Neumann series in Gram form (below).

Negative influence = up-weighting the sample lowers the validation loss (helpful).
All algebra runs in float64. A module with lambda = 0 (all its train gradients
are zero, e.g. LoRA A matrices before training) has zero influence
(:func:`estimate` and :class:`EstimatorConfig`, which every engine asks: the one place this rule lives,
as lambda's (:func:`damping_rule`)).

**The registry** (:data:`ESTIMATORS`): every estimator is one :class:`Estimator`
-- its Gram-form influence and, when it can run without per-sample storage
(the streaming engine), the two streaming steps. Mode choice, the streaming
guard and ``compare-estimators`` read the registry; adding an estimator is one
:func:`register` call here (a peer library's, like EK-FAC, in its own module: :mod:`layerif.ekfac`, which
:mod:`layerif.options` imports so that every command sees it).

Streaming form (:mod:`layerif.engine`): with the per-sample squared norms
sq_i = K[i, i] and P, an estimator gives per-sample weights R [n, k]
(``stream_weights``; ``None``: no further pass) whose weighted gradient
w_j = sum_l R[l, j] g_l the engine accumulates, then C = G w = K R, and
``stream_combine(P, C, n, lambda)`` is the influence. DataInf:
R = P / (lambda + sq), I = -(P - C / n) / lambda -- the same two functions
its Gram form calls, so both engines share one formula.

LiSSA approximates h = H^-1 v, H = G^T G / n + lambda I, by the Neumann
recursion h_0 = v, h_t = v + (I - H_t / sigma) h_{t-1}, h ~ h_T / sigma, where
H_t is H (``lissa_batch`` 0: deterministic) or the mini-batch Hessian
G_b^T G_b / |b| + lambda I of a seeded random batch. Every h_t lies in
span{v, rows of G}: h_t = a_t v + G^T c_t with a scalar a_t and c_t [n, k], and
G h_t = a_t P + K c_t, so

    a_t = 1 + (1 - lambda / sigma) a_{t-1},
    c_t = (1 - lambda / sigma) c_{t-1} - M_t (a_{t-1} P + K c_{t-1}) / (|b| sigma),
    I = -(a_T P + K c_T) / sigma,

with M_t the 0/1 row mask of the batch (all rows: |b| = n). The scale sigma must
bound the largest eigenvalue of every H_t: lambda + lambda_max(K) / n for the full
batch, lambda + max_i ||g_i||^2 for mini-batches. The truncation error of
eigen-direction mu of H is (1 - mu / sigma)^(T+1): slow where K has small eigenvalues.

DataInf vs exact, with E = (H)^-1 and D = (1/n) sum_j (g_j g_j^T + lambda I)^-1
(DataInf's h = D v): since (1/n) sum_j (S_j - S) = 0 for S_j = g_j g_j^T, S = G^T G / n,

    E - D = -(1/n) sum_j E (S_j - S) S_j / (lambda (lambda + ||g_j||^2)),

so lambda ||E - D||_2 <= beta = 1/(n lambda) sum_j ||(S_j - S) g_j|| ||g_j|| / (lambda + ||g_j||^2),
with ||(S_j - S) g_j||^2 = K_jj^3 - 2 K_jj (K^2)_jj / n + (K^3)_jj / n^2 -- from K alone
(:func:`datainf_bound`), and |I_datainf(i) - I_exact(i)| <= ||g_i|| ||v|| beta / lambda per module.
Since ||g||^2 / lambda ~ d / c with LayerIF's damping lambda = c mean ||g||^2 / d,
beta grows like d / c: a guarantee only for modules with few parameters or strong damping.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass
class ModuleStats:
    """Sufficient statistics of one module: K [n, n], P [n, k], parameter count d."""

    K: torch.Tensor
    P: torch.Tensor
    d: int


@dataclass(frozen=True)
class EstimatorOptions:
    """Options some estimators take (ignored by the others); checked here, once."""

    lissa_iterations: int = 100  # LiSSA recursion steps T
    lissa_batch: int = 0  # LiSSA: train records per step (0: all, deterministic)
    seed: int = 0  # LiSSA mini-batch sampling

    def __post_init__(self) -> None:
        if self.lissa_iterations < 1:
            raise UserError(f"--lissa-iterations must be >= 1 (got {self.lissa_iterations})")
        if self.lissa_batch < 0:
            raise UserError(f"--lissa-batch must be >= 0 (got {self.lissa_batch})")


def damping_rule(mean_eigenvalue: float | torch.Tensor, scale: float) -> float:
    """lambda_m = scale * mu_m, with mu_m the mean eigenvalue of module m's Fisher: the one damping rule.

    For the empirical Fisher G^T G / n, mu = trace / d = mean_i ||g_i||^2 / d (:func:`damping_from_norms`);
    for EK-FAC (:mod:`layerif.ekfac`) the mean of its corrected eigenvalues."""
    return float(scale * mean_eigenvalue)


def damping_from_norms(sq_norms: torch.Tensor, d: int, scale: float) -> float:
    """lambda_m = scale * mean_i(||g_i||^2) / d_m from the per-sample squared norms [n] (:func:`damping_rule`)."""
    return damping_rule(sq_norms.mean() / d, scale)


def damping(stats: ModuleStats, scale: float) -> float:
    """lambda_m = scale * mean_i(||g_i||^2 / d_m)."""
    return damping_from_norms(torch.diagonal(stats.K), stats.d, scale)


# ----------------------------------------------------------------------------- the estimators


def datainf_weights(P: torch.Tensor, sq: torch.Tensor, lam: float) -> torch.Tensor:
    """DataInf's per-sample weights R = P / (lambda + ||g||^2), [n, k]."""
    return P / (lam + sq)[:, None]


def datainf_combine(P: torch.Tensor, C: torch.Tensor | None, n: int, lam: float) -> torch.Tensor:
    """DataInf's influence -(P - C / n) / lambda from C = K R [n, k]."""
    return -(P - C / n) / lam


def _datainf(stats: ModuleStats, lam: float, opts: EstimatorOptions) -> torch.Tensor:
    K, P = stats.K.double(), stats.P.double()
    return datainf_combine(P, K @ datainf_weights(P, torch.diagonal(K), lam), K.shape[0], lam)


def _exact(stats: ModuleStats, lam: float, opts: EstimatorOptions) -> torch.Tensor:
    K, P = stats.K.double(), stats.P.double()
    A = K + K.shape[0] * lam * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    return -(P - K @ torch.linalg.solve(A, P)) / lam


def _grad_dot(stats: ModuleStats, lam: float, opts: EstimatorOptions) -> torch.Tensor:
    return -stats.P.double()


def lissa_scale(stats: ModuleStats, lam: float, batch: int = 0) -> float:
    """sigma >= the largest eigenvalue of every Hessian the recursion uses (see the module docstring)."""
    K = stats.K.double()
    n = K.shape[0]
    if batch == 0 or batch >= n:
        return lam + float(torch.linalg.eigvalsh(K)[-1]) / n
    return lam + float(torch.diagonal(K).max())


def lissa_influence(stats: ModuleStats, lam: float, iterations: int, batch: int = 0, seed: int = 0) -> torch.Tensor:
    """LiSSA influence I [n, k] (float64) after ``iterations`` steps, in Gram form (module docstring)."""
    K, P = stats.K.double(), stats.P.double()
    n = K.shape[0]
    sigma = lissa_scale(stats, lam, batch)
    full = batch == 0 or batch >= n
    gen = torch.Generator().manual_seed(seed)
    a, c = 1.0, torch.zeros_like(P)
    decay = 1.0 - lam / sigma
    for _ in range(iterations):
        Gh = a * P + K @ c
        if full:
            step = Gh / n
        else:
            step = torch.zeros_like(Gh)
            rows = torch.randperm(n, generator=gen)[:batch]
            step[rows] = Gh[rows] / batch
        c = decay * c - step / sigma
        a = 1.0 + decay * a
    return -(a * P + K @ c) / sigma


def lissa_residual(stats: ModuleStats, lam: float, iterations: int) -> float:
    """Full-batch LiSSA's largest remaining Neumann factor (1 - mu / sigma)^(T+1) over H's eigenvalues mu on span(G)."""
    K = stats.K.double()
    n = K.shape[0]
    ev = torch.linalg.eigvalsh(K)
    ev = ev[ev > ev[-1] * 1e-12] if ev[-1] > 0 else ev[-1:]
    sigma = lissa_scale(stats, lam)
    return float((1.0 - (lam + ev[0] / n) / sigma) ** (iterations + 1))


def datainf_bound(stats: ModuleStats, lam: float) -> float:
    """beta with lambda ||E - D||_2 <= beta: DataInf's guaranteed closeness to the exact inverse (module docstring)."""
    K = stats.K.double()
    n = K.shape[0]
    k = torch.diagonal(K)
    K2 = K @ K
    sq = (k**3 - 2 * k * torch.diagonal(K2) / n + torch.diagonal(K2 @ K) / n**2).clamp_min(0)
    return float((sq.sqrt() * k.sqrt() / (lam + k)).sum() / (n * lam))


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Estimator:
    """One influence estimator.

    ``gram(stats, lambda, options) -> I [n, k]`` (float64) from the Gram
    statistics. With ``stream_combine`` it also runs in the streaming engine
    (module docstring): ``stream_weights(P, sq, lambda)`` gives R [n, k], or is
    ``None`` when the influence needs no weighted pass (then C is ``None``).
    ``sample_independent``: a sample's influence does not depend on the other
    train samples (split-half may then reuse the per-sample influences).
    ``direct`` (instead of ``gram``): an estimator computed by a peer library from
    the model and records themselves, ``direct(model, targets, train, val, pad_id,
    estimator, engine) -> ({name: I_m [k, n_train]}, lambdas, passes)`` (an
    :class:`EstimatorConfig` and a :class:`layerif.engine.EngineConfig`); ``installed()`` says whether that library is there.
    """

    name: str
    gram: Callable[[ModuleStats, float, EstimatorOptions], torch.Tensor] | None
    stream_weights: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    stream_combine: Callable[[torch.Tensor, torch.Tensor | None, int, float], torch.Tensor] | None = None
    sample_independent: bool = False
    direct: Callable[..., tuple[dict[str, torch.Tensor], dict[str, float], int]] | None = None
    installed: Callable[[], bool] = lambda: True

    @property
    def streaming(self) -> bool:
        """Whether the storage-free streaming engine can compute it."""
        return self.stream_combine is not None


ESTIMATORS: dict[str, Estimator] = {}


def register(estimator: Estimator) -> Estimator:
    """Add (or replace) an estimator in :data:`ESTIMATORS`."""
    ESTIMATORS[estimator.name] = estimator
    return estimator


register(Estimator("datainf", _datainf, datainf_weights, datainf_combine))
register(Estimator("exact", _exact))
register(Estimator("grad-dot", _grad_dot, None, lambda P, C, n, lam: -P, sample_independent=True))
register(Estimator("lissa", lambda s, lam, o: lissa_influence(s, lam, o.lissa_iterations, o.lissa_batch, o.seed)))


def peer_estimators() -> list[str]:
    """The registered estimators a peer library computes on the model itself (``direct``) whose library is installed."""
    return [n for n, e in ESTIMATORS.items() if e.direct is not None and e.installed()]


def gram_estimators() -> list[str]:
    """The registered estimators with a Gram form (computable from one set of shared statistics)."""
    return [n for n, e in ESTIMATORS.items() if e.gram is not None]


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``; an unknown one is a :class:`~layerif.errors.UserError`."""
    if name not in ESTIMATORS:
        raise UserError(f"unknown estimator {name!r} (use {', '.join(ESTIMATORS)})")
    return ESTIMATORS[name]


def estimate(stats: ModuleStats, name: str, lam: float, options: EstimatorOptions = EstimatorOptions()) -> torch.Tensor:
    """Influence I [n, k] (float64) of one module; zero when lambda = 0 (no train gradient at all)."""
    if lam == 0.0:
        return torch.zeros_like(stats.P, dtype=torch.float64)
    if ESTIMATORS[name].gram is None:
        raise UserError(f"estimator {name} has no Gram form: it runs on the model itself (layerif score --estimator {name})")
    return ESTIMATORS[name].gram(stats, lam, options)


@dataclass(frozen=True)
class EstimatorConfig:
    """One estimator of a run: its registry name, the damping scale c of lambda_m and its options, checked once
    (here); every engine asks it for lambda and the influence, so the damping rule and "lambda = 0 gives zero
    influence" live in this module only."""

    name: str = "datainf"
    damping_scale: float = 0.1
    options: EstimatorOptions = EstimatorOptions()

    def __post_init__(self) -> None:
        if not 0 < self.damping_scale < math.inf:  # nan fails this too
            raise UserError(f"--damping-scale must be > 0 (got {self.damping_scale})")
        if self.damping_scale < sys.float_info.min:  # a subnormal scale: lambda without precision, 1/lambda beyond range
            raise UserError(f"--damping-scale must be at least {sys.float_info.min:.3g}, the smallest normal float "
                            f"(got {self.damping_scale})")
        get_estimator(self.name)

    @property
    def rule(self) -> Estimator:
        return ESTIMATORS[self.name]

    def damping(self, sq_norms: torch.Tensor, d: int) -> float:
        """lambda_m from a module's per-sample squared gradient norms [n] and its parameter count."""
        return damping_from_norms(sq_norms, d, self.damping_scale)

    def gram(self, stats: ModuleStats) -> tuple[torch.Tensor, float]:
        """(I [n, k] float64, lambda_m) of one module from its Gram statistics (:func:`estimate`)."""
        lam = damping(stats, self.damping_scale)
        return estimate(stats, self.name, lam, self.options), lam

    def stream_weights(self, P: torch.Tensor, sq: torch.Tensor, lam: float) -> torch.Tensor:
        """The streaming weights R [n, k] (module docstring); zero when lambda = 0."""
        if lam == 0.0:
            return torch.zeros_like(P, dtype=torch.float64)
        return self.rule.stream_weights(P, sq, lam)

    def stream_combine(self, P: torch.Tensor, C: torch.Tensor | None, n: int, lam: float) -> torch.Tensor:
        """The streamed influence I [n, k] from P and C = K R; zero when lambda = 0 (as :func:`estimate`)."""
        if lam == 0.0:
            return torch.zeros_like(P, dtype=torch.float64)
        return self.rule.stream_combine(P, C, n, lam)
