r"""The scoring engines: one forward+backward pass, and two ways of turning passes into module influences.

* :func:`run_pass` -- the one forward+backward loop over records: hooks
  (:func:`layerif.grads.capture`) hand every targeted module's inputs x and
  output gradients delta of each batch to a ``sink``; both engines and
  :func:`per_sample_grads` are built on it.
* **materialized** (:func:`module_stats`): per-sample gradients (dense or token
  factors, :func:`plan_layouts`) reduced at once to the Gram statistics K, P of
  each module, in groups that fit the memory budget (:func:`memory_budget`,
  bytes, computed once per run; :mod:`layerif.budget`). Every estimator with a
  Gram form runs on these statistics.
* **streaming** (:func:`streaming_influence`): no per-sample storage, for the
  estimators that declare a streaming form (:mod:`layerif.influence`).

Streaming DataInf (exact, without per-sample gradient storage). With the validation gradient v_m fixed, DataInf's influence of train sample i is

    I_m(i) = -(1/lambda_m) (g_im . v_m - g_im . w_m / n),   w_m = sum_j r_jm g_jm,
    r_jm = (v_m . g_jm) / (lambda_m + ||g_jm||^2),

so per module one needs only per-sample scalars and one gradient-sized vector:

* pass A: ||g_im||^2 and g_im . v_m for every train sample (-> lambda_m, r_jm);
* pass B: w_m = sum_j r_jm g_jm, the ordinary gradient of the weighted loss
  sum_j r_jm loss_j -- accumulated in the hooks from each batch's activations,
  with each module's own weights, in one backward per batch;
* pass C: g_im . w_m.

Norms and dots come from the activations the hooks see (x_t, delta_t) without
forming g when that is cheaper (:func:`layerif.grads.sq_norms`). Memory: a few
gradient-sized buffers (v, w) per validation column and one batch of
activations. ``grad-dot`` needs pass A only.

With ``per_val`` every validation sample is its own column j (v_mj, w_mj);
columns are processed in chunks of at most ``val_chunk``, each chunk costing one
validation pass and passes A-C over the train records. Under a memory budget
(:mod:`layerif.budget`) targets are taken in groups and the chunk size is
chosen so that one group's buffers fit; each (group, chunk) is one round of passes.

Under ``torch.distributed`` each rank takes a contiguous shard of the records;
per-sample scalars are all-gathered, gradient-sized vectors all-reduced, so
every rank ends with the same full result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import progress
from .budget import METER, chunk_columns, gram_bytes, gram_scratch, plan_groups, streaming_plan, too_small
from .cache import PassCache
from .data import Encoded, batches, collate
from .distributed import all_gather_rows, all_reduce_sum, shard
from .grads import (Factored, NonFinite, capture, dense_from_activations, dots, gram, losses_and_backward, sq_norms,
                    weighted_sum)
from .errors import UserError
from .influence import EstimatorConfig, ModuleStats
from .models import Projection, check_selector, input_device, weight_out_in

Sink = Callable[[Projection, torch.Tensor, torch.Tensor, int, torch.Tensor], None]
"""``sink(target, x, delta, offset, mask)``: what :func:`run_pass` hands each target's activations and gradients to."""


MODES = ("auto", "materialized", "streaming")
LAYOUTS = ("auto", "dense", "factored")


@dataclass(frozen=True)
class EngineConfig:
    """How a scoring run computes, checked once (here): the projections it scores (``selector``, the
    :func:`layerif.models.select_targets` spelling), per-validation-sample columns (``per_val``), records per
    pass, the memory budget (GB, None: :func:`memory_budget`'s default), the per-sample gradients' layout, the
    engine (``mode``: ``auto`` is :func:`layerif.scores.choose_mode`) and streaming's validation columns per chunk."""

    selector: str = "attn"
    per_val: bool = False
    batch_size: int = 8
    max_memory_gb: float | None = None
    layout: str = "auto"
    mode: str = "auto"
    val_chunk: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r} (use auto, materialized or streaming)")
        if self.max_memory_gb is not None and not 0 < self.max_memory_gb < math.inf:
            raise UserError(f"--max-memory must be > 0 GB (got {self.max_memory_gb})")
        if self.val_chunk < 1:
            raise UserError(f"--val-chunk must be >= 1 (got {self.val_chunk})")
        if self.layout not in LAYOUTS:
            raise UserError(f"unknown layout {self.layout!r} (use auto, dense or factored)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1 (got {self.batch_size})")
        check_selector(self.selector)


def run_pass(model: torch.nn.Module, targets: list[Projection], records: list[Encoded], sink: Sink, pad_id: int,
             batch_size: int = 8, desc: str = "pass", start: int = 0) -> torch.Tensor:
    """One forward+backward pass over ``records`` (right-padded batches of ``batch_size``): the one loop.

    For every target and batch, ``sink(target, x, delta, offset, mask)`` gets the
    module's inputs x [B, T, in] and output gradients delta [B, T, out] (float32,
    float64 for a float64 model; :func:`layerif.grads.capture`), the index of the
    batch's first record in ``records`` and its attention mask [B, T]. ``records``
    are records ``start, start + 1, ...`` of the split ``desc`` starts with (for
    error messages). Returns the per-sample losses [n] (float64, on the CPU).
    """
    device = input_device(model)
    losses = torch.zeros(len(records), dtype=torch.float64)
    state: dict = {"offset": 0, "mask": None}
    with capture(model, targets, lambda t, x, d: sink(t, x, d, state["offset"], state["mask"])):
        for chunk in progress.track(batches(records, batch_size), desc=desc, unit="batch"):
            batch = collate(chunk, pad_id, device)
            state["mask"] = batch["attention_mask"]
            o = state["offset"]
            try:
                losses[o : o + len(chunk)] = losses_and_backward(model, batch).double().cpu()
            except NonFinite as exc:
                raise exc.at(desc.split()[0], start + o) from None
            state["offset"] += len(chunk)
    return losses


def per_sample_grads(
    model: torch.nn.Module, targets: list[Projection], records: list[Encoded], pad_id: int, batch_size: int = 8,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All per-sample gradients of ``targets`` for ``records`` (small problems and tests).

    Returns ({target name: [n, d]}, losses [n]). The engines stream batches
    through :func:`run_pass` instead of holding everything.
    """
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}

    def sink(t, x, d, offset, mask):
        out[t.name].append(dense_from_activations(t.module, x, d).cpu())

    losses = run_pass(model, targets, list(records), sink, pad_id, batch_size, "per-sample gradients")
    return {k: torch.cat(v) for k, v in out.items()}, losses


def ram_bytes() -> float:
    """This machine's physical memory, bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_budget(max_memory_gb: float | None = None, device: str | None = None,
                  device_bytes: float | None = None) -> float:
    """Bytes of buffers a run may hold (computed once per run): ``max_memory_gb`` (GB = 1e9 bytes), else the
    default -- half the GPU memory (``device`` ``cuda``), or a fifth of the RAM (``cpu``).

    ``device`` defaults to this machine's (``cuda`` when available) and ``device_bytes`` to its free GPU
    memory or its RAM; ``layerif plan`` passes both to plan for another machine."""
    if max_memory_gb is not None:
        return max_memory_gb * 1e9
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device_bytes is None:
        device_bytes = float(torch.cuda.mem_get_info()[0]) if device == "cuda" else ram_bytes()
    return device_bytes / 2 if device == "cuda" else device_bytes / 5


# ----------------------------------------------------------------------------- materialized engine


def _layout(t: Projection, n: int, n_tokens: int, prefer: str = "auto") -> tuple[str, float]:
    """How to hold a module's per-sample gradients for n samples of n_tokens real tokens in all.

    ``factored`` (token factors, :class:`~layerif.grads.Factored`) when its Gram
    costs fewer flops than forming dense gradients and their Gram, else
    ``dense``; ``prefer`` forces one. Returns (layout, bytes it needs: the gradients at the module's
    statistics dtype, and a factored layout's int64 sample index per token).
    """
    size = t.stat_dtype.itemsize
    out_f, in_f = weight_out_in(t.module).shape
    in_f += getattr(t.module, "bias", None) is not None
    factored_flops = n_tokens**2 * (in_f + out_f)
    dense_flops = (n_tokens + n * n) * in_f * out_f
    if prefer == "factored" or (prefer == "auto" and factored_flops <= dense_flops):
        return "factored", float(size * n_tokens * (in_f + out_f) + 8 * n_tokens)
    return "dense", float(size * n * t.numel)


def plan_layouts(
    targets: list[Projection], train: list[Encoded], val: list[Encoded], per_val: bool, prefer: str = "auto"
) -> tuple[tuple[dict, dict], dict[str, float]]:
    """Per-module layouts of the train and validation gradients, and the bytes each module holds in the
    materialized engine (:mod:`layerif.budget`): its gradients and its Gram matrices K and P."""
    tokens = lambda recs: sum(len(e.input_ids) for e in recs)  # noqa: E731
    layout_t = {t.name: _layout(t, len(train), tokens(train), prefer) for t in targets}
    layout_v = {t.name: (_layout(t, len(val), tokens(val), prefer) if per_val
                         else ("summed", float(t.stat_dtype.itemsize * t.numel))) for t in targets}
    k = len(val) if per_val else 1
    cost = {t.name: layout_t[t.name][1] + layout_v[t.name][1] + gram_bytes(len(train), k) for t in targets}
    return (layout_t, layout_v), cost


@dataclass(frozen=True)
class MaterializedPlan:
    """The materialized engine's memory plan (bytes), computed once per run (:func:`materialized_plan`)."""

    layout_train: dict[str, tuple[str, float]]  # module -> (layout, bytes of its train gradients)
    layout_val: dict[str, tuple[str, float]]  # module -> (layout or ``summed``, bytes of its validation gradients)
    cost: dict[str, float]  # module -> bytes it holds: both gradients and its Gram matrices K, P
    scratch: float  # bytes kept aside for the Gram products' working copies (:func:`layerif.budget.gram_scratch`)
    groups: list[list[Projection]]  # module groups, each one validation and one train pass

    @property
    def passes(self) -> int:
        return 2 * len(self.groups)

    def group_bytes(self) -> list[float]:
        """Planned buffer bytes of each group (without the scratch)."""
        return [sum(self.cost[t.name] for t in g) for g in self.groups]


def materialized_plan(targets: list[Projection], train: list[Encoded], val: list[Encoded], per_val: bool,
                      layout: str, budget_bytes: float) -> MaterializedPlan:
    """Layouts, bytes per module and module groups that fit ``budget_bytes`` with the scratch aside: the
    pure arithmetic of :func:`module_stats` (needs the records' lengths and the targets' shapes only, so a
    model on the ``meta`` device plans too). A module that alone does not fit is a :class:`UserError`."""
    (layout_t, layout_v), cost = plan_layouts(targets, train, val, per_val, layout)
    scratch = gram_scratch(budget_bytes)
    big = max(targets, key=lambda t: cost[t.name])
    if cost[big.name] > budget_bytes - scratch:
        raise too_small(budget_bytes, cost[big.name] + scratch,
                        f"module {big.name} (its gradients and Gram matrices, and the products' working space)")
    return MaterializedPlan(layout_t, layout_v, cost, scratch, plan_groups(targets, cost, budget_bytes - scratch))


def gradient_pass(
    model: torch.nn.Module,
    targets: list[Projection],
    records: list[Encoded],
    pad_id: int,
    batch_size: int,
    desc: str,
    layout: dict[str, str],
) -> tuple[dict[str, torch.Tensor | Factored], torch.Tensor]:
    """One :func:`run_pass` that keeps the gradients.

    Returns ({name: gradients}, losses [n]). Per module, by ``layout[name]``:
    ``summed`` -> [1, d] gradient of the summed loss; ``dense`` -> [n, d]
    per-sample gradients; ``factored`` -> :class:`Factored` per-sample gradients.
    """
    n = len(records)
    n_tokens = sum(len(e.input_ids) for e in records)
    grads: dict[str, torch.Tensor | Factored] = {
        t.name: (Factored.allocate(t.module, n_tokens, n, t.stat_dtype, t.device, METER.zeros)
                 if layout[t.name] == "factored" else
                 METER.zeros((1 if layout[t.name] == "summed" else n), t.numel, device=t.device, dtype=t.stat_dtype))
        for t in targets
    }
    filled = {t.name: 0 for t in targets}

    def sink(t: Projection, x: torch.Tensor, delta: torch.Tensor, o: int, mask: torch.Tensor) -> None:
        kind = layout[t.name]
        if kind == "factored":
            filled[t.name] = grads[t.name].fill(filled[t.name], x, delta, mask, o)
        elif kind == "summed":
            grads[t.name][0] += dense_from_activations(t.module, x, delta).sum(dim=0)
        else:
            grads[t.name][o : o + x.shape[0]] = dense_from_activations(t.module, x, delta)

    losses = run_pass(model, targets, records, sink, pad_id, batch_size, desc)
    return grads, losses


def module_stats(
    model: torch.nn.Module,
    targets: list[Projection],
    train: list[Encoded],
    val: list[Encoded],
    pad_id: int,
    config: EngineConfig = EngineConfig(),
    plan: MaterializedPlan | None = None,
    cache: PassCache | None = None,
    reduce: Callable[[Projection, ModuleStats], None] | None = None,
) -> tuple[dict[str, ModuleStats], torch.Tensor, int]:
    """Gram statistics of every target. Returns ({name: stats}, train losses [n], passes run).

    Targets go in groups whose gradients and Gram matrices fit the budget (``plan``, the run's
    :func:`materialized_plan`; made here from ``config`` when not given) (:mod:`layerif.budget`); each group
    costs a validation and a train pass. ``config``: per-validation-sample columns, records per pass. With
    ``reduce``, each module's statistics are handed to it as soon as its group is
    done and not kept (the returned dict is empty), so no more than one group's
    are ever held. Each completed module group is recorded in ``cache`` and skipped on a re-run.
    """
    cache = cache or PassCache(None)
    per_val, batch_size = config.per_val, config.batch_size
    if plan is None:
        plan = materialized_plan(targets, train, val, per_val, config.layout, memory_budget(config.max_memory_gb))
    layout_t, layout_v, scratch, groups = plan.layout_train, plan.layout_val, plan.scratch, plan.groups
    stats: dict[str, ModuleStats] = {}
    passes = 0
    train_loss = torch.zeros(0)
    keep = reduce or (lambda t, s: stats.__setitem__(t.name, s))
    for gi, group in enumerate(groups):
        done = cache.load(f"group{gi}")
        if done is not None:
            for t in group:
                keep(t, ModuleStats(K=done[f"{t.name}.K"], P=done[f"{t.name}.P"], d=t.numel))
            train_loss = done["train_loss"]
            continue
        tag = f" (group {gi + 1}/{len(groups)})" if len(groups) > 1 else ""
        V, _ = gradient_pass(model, group, val, pad_id, batch_size, f"validation gradients{tag}",
                          {t.name: layout_v[t.name][0] for t in group})
        G, train_loss = gradient_pass(model, group, train, pad_id, batch_size, f"train gradients{tag}",
                                   {t.name: layout_t[t.name][0] for t in group})
        passes += 2
        saved = {"train_loss": train_loss}
        for t in group:
            g, v = G.pop(t.name), V.pop(t.name)
            s = ModuleStats(K=METER.track(gram(g, g, scratch, METER.scratch).cpu()),
                            P=METER.track(gram(g, v, scratch, METER.scratch).cpu()), d=t.numel)
            del g, v
            check_finite(torch.diagonal(s.K), "squared gradient norm", t.name)
            saved |= {f"{t.name}.K": s.K, f"{t.name}.P": s.P}
            keep(t, s)
        cache.save(f"group{gi}", saved)
        del saved, s
    return stats, train_loss, passes


# ----------------------------------------------------------------------------- streaming engine


def check_finite(values: torch.Tensor, what: str, module: str, offset: int = 0) -> None:
    """Raise FloatingPointError naming the first sample (offset + row) whose value is inf or nan."""
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        raise FloatingPointError(f"non-finite {what} for train sample {offset + int(bad[0, 0])} in module {module}")


def streaming_influence(
    model: torch.nn.Module,
    targets: list[Projection],
    train: list[Encoded],
    val: list[Encoded],
    pad_id: int,
    estimator: EstimatorConfig = EstimatorConfig(),
    config: EngineConfig = EngineConfig(),
    budget_bytes: float = float("inf"),
    cache: PassCache | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor, int]:
    """Module influences {name: I_m [k, n_train]} (float64), lambdas, train losses [n], passes run.

    Each completed pass is recorded in ``cache`` (single process) and skipped on a re-run.

    k = 1 (summed validation loss) or n_val with ``config.per_val``. Supports the
    estimators with a streaming form (``datainf``, ``grad-dot``); lambda and the influence come from
    ``estimator`` (:class:`layerif.influence.EstimatorConfig`). The buffers fit
    ``budget_bytes`` (:func:`layerif.budget.streaming_plan`): targets are taken in
    groups and validation columns in chunks of at most ``config.val_chunk``, each (group, chunk) one round of passes.
    """
    rule = estimator.rule
    if not rule.streaming:
        raise ValueError(f"streaming mode does not support {estimator.name!r} (it needs the n x n Gram matrix)")
    per_val, batch_size, val_chunk = config.per_val, config.batch_size, config.val_chunk
    cache = cache or PassCache(None)
    tr, va = shard(train), shard(val)
    n, n_local = len(train), len(train[tr])
    weighted = rule.stream_weights is not None
    groups, chunk = streaming_plan(targets, n, len(val) if per_val else 1, val_chunk, weighted, budget_bytes)
    if per_val:
        columns = [list(range(s, s + c)) for s, c in zip(range(0, len(val), chunk), chunk_columns(len(val), chunk))]
    else:
        columns = [list(range(len(val)))]
    influence: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    lambdas: dict[str, float] = {}
    passes = 0

    def stage(name: str, fn) -> dict[str, torch.Tensor]:
        """A pass's (gathered) results: from the cache, or by running fn and recording it."""
        nonlocal passes
        got = cache.load(name)
        if got is None:
            got = fn()
            cache.save(name, got)
            passes += 1
        return got

    def run_chunk(gi: int, group: list[Projection], ci: int, cols: list[int]) -> torch.Tensor:
        """One round of passes for one target group and validation chunk; returns the train losses.
        Its buffers are freed on return, before the next round allocates its own."""
        parts = [f"group {gi + 1}/{len(groups)}"] * (len(groups) > 1) + [f"validation chunk {ci + 1}/{len(columns)}"] * (len(columns) > 1)
        tag = f" ({', '.join(parts)})" if parts else ""
        key = (f"group{gi}." if len(groups) > 1 else "") + f"chunk{ci}"
        k = len(cols) if per_val else 1

        def val_pass() -> dict[str, torch.Tensor]:
            """v [k, d] per module: this chunk's samples as columns, or their sum."""
            V = {t.name: METER.zeros(k, t.numel, device=t.device, dtype=t.stat_dtype) for t in group}
            select = torch.zeros(len(val), k)
            for c, j in enumerate(cols):
                select[j, c if per_val else 0] = 1.0
            select = select[va]

            def on_batch(t, x, d, off, mask):
                V[t.name] += weighted_sum(t.module, x, d, select[off : off + x.shape[0]].to(device=x.device, dtype=x.dtype))

            run_pass(model, group, val[va], on_batch, pad_id, batch_size, f"validation gradients{tag}", va.start)
            return {name: all_reduce_sum(v) for name, v in V.items()}

        V = stage(f"{key}.val", val_pass)

        def pass_a() -> dict[str, torch.Tensor]:
            """||g_i||^2 and g_i . v per module, and the train losses."""
            sq = {t.name: METER.zeros(n_local, dtype=torch.float64) for t in group}
            dot = {t.name: METER.zeros(n_local, k, dtype=torch.float64) for t in group}

            def on_batch(t, x, d, off, mask):
                B = x.shape[0]
                s = sq_norms(t.module, x, d)
                check_finite(s, "squared gradient norm", t.name, tr.start + off)
                sq[t.name][off : off + B] = s.cpu()
                dot[t.name][off : off + B] = dots(t.module, x, d, V[t.name].to(x.device)).cpu()

            losses = run_pass(model, group, train[tr], on_batch, pad_id, batch_size, f"train norms and dots{tag}", tr.start)
            out = {"train_loss": all_gather_rows(losses)}
            out |= {f"{name}.sq": all_gather_rows(v) for name, v in sq.items()}
            out |= {f"{name}.P": all_gather_rows(v) for name, v in dot.items()}
            return out

        A = stage(f"{key}.A", pass_a)
        lambdas.update({t.name: estimator.damping(A[f"{t.name}.sq"], t.numel) for t in group})
        P = {t.name: A[f"{t.name}.P"] for t in group}  # [n, k]
        if not weighted:
            for t in group:
                influence[t.name].append(estimator.stream_combine(P[t.name], None, n, lambdas[t.name]).T)
            return A["train_loss"]
        R = {t.name: METER.track(estimator.stream_weights(P[t.name], A[f"{t.name}.sq"], lambdas[t.name]))
             for t in group}

        def pass_b() -> dict[str, torch.Tensor]:
            """w = sum_j r_j g_j per module and column, [k, d]."""
            W = {t.name: METER.zeros(k, t.numel, device=t.device, dtype=t.stat_dtype) for t in group}

            def on_batch(t, x, d, off, mask):
                r = R[t.name][tr.start + off : tr.start + off + x.shape[0]].to(device=x.device, dtype=x.dtype)
                W[t.name] += weighted_sum(t.module, x, d, r)

            run_pass(model, group, train[tr], on_batch, pad_id, batch_size, f"train weighted gradient{tag}", tr.start)
            return {name: all_reduce_sum(w) for name, w in W.items()}

        W = stage(f"{key}.B", pass_b)

        def pass_c() -> dict[str, torch.Tensor]:
            """g_i . w per module, [n, k]."""
            dot = {t.name: METER.zeros(n_local, k, dtype=torch.float64) for t in group}

            def on_batch(t, x, d, off, mask):
                dot[t.name][off : off + x.shape[0]] = dots(t.module, x, d, W[t.name].to(x.device)).cpu()

            run_pass(model, group, train[tr], on_batch, pad_id, batch_size, f"train dots with w{tag}", tr.start)
            return {name: all_gather_rows(v) for name, v in dot.items()}

        C = stage(f"{key}.C", pass_c)
        for t in group:
            influence[t.name].append(estimator.stream_combine(P[t.name], C[t.name], n, lambdas[t.name]).T)
        return A["train_loss"]

    for gi, group in enumerate(groups):
        for ci, cols in enumerate(columns):
            train_loss = run_chunk(gi, group, ci, cols)
    return {name: torch.cat(parts) for name, parts in influence.items()}, lambdas, train_loss, passes
