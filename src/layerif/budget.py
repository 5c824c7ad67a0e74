r"""One memory budget for both engines: what their buffers cost in bytes, plans that fit, and a meter.

The rule (``--max-memory`` B bytes): the buffers an engine holds for its
statistics never exceed B at any moment.

* Materialized: a module group's per-sample gradients (dense [n, d], or token
  factors over the records' real tokens) plus its Gram matrices K [n, n] and
  P [n, k] (float64), plus the Gram products' float64 working copies of one
  module at a time (:func:`gram_scratch` of the budget; the products chunk
  their work to fit it). Each group is reduced to its influences before the
  next one starts, so the Gram matrices of earlier groups are not held.
* Streaming: per target, the gradient-sized buffers of one validation chunk of
  k columns -- V [k, d] and, for DataInf, W [k, d], at the statistics dtype --
  plus the per-sample scalars ||g_i||^2, P, R and C ([n] and 3 x [n, k],
  float64). Targets are grouped and k is chosen so that one group fits; a
  larger problem takes more passes (groups x chunks), never more memory.

Outside the rule: the model, one batch's activations inside the forward and
backward pass, and the results (the per-block influences, L x k x n float64).

:data:`METER` counts the bytes of every buffer the engines allocate through it
while they are alive (``peak`` since the last ``reset``), and the bytes
allocated in all by kind (``allocated``: ``buffer`` for the planned buffers,
``scratch`` for the Gram products' working copies); the tests hold the plans
to the budget with it, and ``layerif plan``'s buffer bytes to the engines'.
"""

from __future__ import annotations

import math
import weakref

import torch

from .errors import UserError
from .models import Projection


class Meter:
    """Live and peak bytes of the tensors passed to :meth:`track` (freed when the tensor is collected)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.allocated: dict[str, int] = {}

    def reset(self) -> None:
        """Peak back to the live bytes; the allocation totals back to zero."""
        self.peak = self.live
        self.allocated = {}

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def track(self, t: torch.Tensor, kind: str = "buffer") -> torch.Tensor:
        """Count ``t``'s bytes as live until it is collected, and in ``allocated[kind]``; returns ``t``."""
        nbytes = t.numel() * t.element_size()
        self.allocated[kind] = self.allocated.get(kind, 0) + nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, nbytes)
        return t

    def zeros(self, *shape, **kwargs) -> torch.Tensor:
        return self.track(torch.zeros(*shape, **kwargs))

    def scratch(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`track` of a working copy (kind ``scratch``), outside the planned buffers."""
        return self.track(t, "scratch")


METER = Meter()


def plan_groups(targets: list[Projection], cost: dict[str, float], budget_bytes: float) -> list[list[Projection]]:
    """Split targets (model order) into consecutive groups whose ``cost`` bytes fit the budget
    (a target that alone exceeds it forms its own group; callers check that first)."""
    groups: list[list[Projection]] = [[]]
    used = 0.0
    for t in targets:
        if groups[-1] and used + cost[t.name] > budget_bytes:
            groups.append([])
            used = 0.0
        groups[-1].append(t)
        used += cost[t.name]
    return groups


def gram_scratch(budget_bytes: float) -> float:
    """Bytes the materialized engine keeps aside for the Gram products' working copies
    (:func:`layerif.grads.gram`): an eighth of the budget, at most 256 MiB."""
    return min(budget_bytes / 8, 2.0**28)


def gram_bytes(n: int, k: int) -> float:
    """K [n, n] and P [n, k] in float64."""
    return 8.0 * n * (n + k)


def streaming_bytes(t: Projection, n: int, k: int, weighted: bool) -> float:
    """One target's streaming buffers for a chunk of k validation columns (module docstring), in bytes:
    V (and W when ``weighted``) [k, d]; ||g||^2 [n] and P [n, k] (and R, C [n, k] when ``weighted``), float64."""
    if weighted:
        return 2 * k * t.numel * t.stat_dtype.itemsize + 8.0 * n * (3 * k + 1)
    return k * t.numel * t.stat_dtype.itemsize + 8.0 * n * (k + 1)


def too_small(budget_bytes: float, need: float, what: str) -> UserError:
    return UserError(f"--max-memory {budget_bytes / 1e9:.3g} GB is below the {need / 1e9:.3g} GB that {what} "
                     f"needs at the least; raise it")


def chunk_columns(n_columns: int, chunk: int) -> list[int]:
    """Validation columns of each chunk when ``n_columns`` go in chunks of at most ``chunk``."""
    return [min(chunk, n_columns - s) for s in range(0, n_columns, chunk)]


def streaming_plan(targets: list[Projection], n_train: int, n_columns: int, val_chunk: int, weighted: bool,
                   budget_bytes: float) -> tuple[list[list[Projection]], int]:
    """(target groups, validation columns per chunk) with the fewest passes whose buffers fit the budget.

    ``n_columns``: validation columns (n_val with per-val, else 1); at most
    ``val_chunk`` of them per chunk. Every (group, chunk) costs one round of passes.
    """
    best: tuple[int, list[list[Projection]], int] | None = None
    for k in range(1, max(1, min(val_chunk, n_columns)) + 1):
        cost = {t.name: streaming_bytes(t, n_train, k, weighted) for t in targets}
        if max(cost.values()) > budget_bytes:
            break
        groups = plan_groups(targets, cost, budget_bytes)
        rounds = len(groups) * math.ceil(n_columns / k)
        if best is None or rounds < best[0]:
            best = (rounds, groups, k)
    if best is None:
        big = max(targets, key=lambda t: t.numel)
        raise too_small(budget_bytes, streaming_bytes(big, n_train, 1, weighted), f"streaming module {big.name}")
    return best[1], best[2]
