r"""Streaming DataInf: exact influence without per-sample gradient storage.

With the validation gradient v_m fixed, DataInf's influence of train sample i is

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

import torch

from . import progress
from .cache import PassCache
from .data import Encoded, batches, collate
from .distributed import all_gather_rows, all_reduce_sum, shard
from .influence import ESTIMATORS, damping_from_norms
from .grads import NonFinite, capture, dots, losses_and_backward, sq_norms, weighted_sum
from .budget import METER, streaming_plan
from .models import Target, input_device


def _pass(model, targets: list[Target], records: list[Encoded], pad_id: int, batch_size: int, desc: str, on_batch,
          start: int = 0) -> torch.Tensor:
    """One forward+backward pass; ``on_batch(target, x, delta, offset)`` per module and batch. Returns losses [n].

    ``records`` are records ``start, start + 1, ...`` of the split ``desc`` starts with (for error messages)."""
    device = input_device(model)
    losses = torch.zeros(len(records), dtype=torch.float64)
    state = {"offset": 0}
    with capture(model, targets, lambda t, x, d: on_batch(t, x, d, state["offset"])):
        for chunk in progress.track(batches(records, batch_size), desc=desc, unit="batch"):
            batch = collate(chunk, pad_id, device)
            try:
                losses[state["offset"] : state["offset"] + len(chunk)] = losses_and_backward(model, batch).double().cpu()
            except NonFinite as exc:
                raise exc.at(desc.split()[0], start + state["offset"]) from None
            state["offset"] += len(chunk)
    return losses


def check_finite(values: torch.Tensor, what: str, module: str, offset: int = 0) -> None:
    """Raise FloatingPointError naming the first sample (offset + row) whose value is inf or nan."""
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        raise FloatingPointError(f"non-finite {what} for train sample {offset + int(bad[0, 0])} in module {module}")


def streaming_influence(
    model: torch.nn.Module,
    targets: list[Target],
    train: list[Encoded],
    val: list[Encoded],
    pad_id: int,
    estimator: str = "datainf",
    damping_scale: float = 0.1,
    per_val: bool = False,
    batch_size: int = 8,
    val_chunk: int = 8,
    cache: PassCache | None = None,
    budget_bytes: float = float("inf"),
) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor, int]:
    """Module influences {name: I_m [k, n_train]} (float64), lambdas, train losses [n], passes run.

    Each completed pass is recorded in ``cache`` (single process) and skipped on a re-run.

    k = 1 (summed validation loss) or n_val with ``per_val``. Supports the
    estimators with a streaming form (``datainf``, ``grad-dot``). The buffers fit
    ``budget_bytes`` (:func:`layerif.budget.streaming_plan`): targets are taken in
    groups and validation columns in chunks, each (group, chunk) one round of passes.
    """
    rule = ESTIMATORS[estimator]
    if not rule.streaming:
        raise ValueError(f"streaming mode does not support {estimator!r} (it needs the n x n Gram matrix)")
    cache = cache or PassCache(None)
    tr, va = shard(train), shard(val)
    n, n_local = len(train), len(train[tr])
    weighted = rule.stream_weights is not None
    groups, chunk = streaming_plan(targets, n, len(val) if per_val else 1, val_chunk, weighted, budget_bytes)
    if per_val:
        columns = [list(range(s, min(s + chunk, len(val)))) for s in range(0, len(val), chunk)]
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

    def run_chunk(gi: int, group: list[Target], ci: int, cols: list[int]) -> torch.Tensor:
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

            def on_batch(t, x, d, off):
                V[t.name] += weighted_sum(t.module, x, d, select[off : off + x.shape[0]].to(device=x.device, dtype=x.dtype))

            _pass(model, group, val[va], pad_id, batch_size, f"validation gradients{tag}", on_batch, va.start)
            return {name: all_reduce_sum(v) for name, v in V.items()}

        V = stage(f"{key}.val", val_pass)

        def pass_a() -> dict[str, torch.Tensor]:
            """||g_i||^2 and g_i . v per module, and the train losses."""
            sq = {t.name: METER.zeros(n_local, dtype=torch.float64) for t in group}
            dot = {t.name: METER.zeros(n_local, k, dtype=torch.float64) for t in group}

            def on_batch(t, x, d, off):
                B = x.shape[0]
                s = sq_norms(t.module, x, d)
                check_finite(s, "squared gradient norm", t.name, tr.start + off)
                sq[t.name][off : off + B] = s.cpu()
                dot[t.name][off : off + B] = dots(t.module, x, d, V[t.name].to(x.device)).cpu()

            losses = _pass(model, group, train[tr], pad_id, batch_size, f"train norms and dots{tag}", on_batch, tr.start)
            out = {"train_loss": all_gather_rows(losses)}
            out |= {f"{name}.sq": all_gather_rows(v) for name, v in sq.items()}
            out |= {f"{name}.P": all_gather_rows(v) for name, v in dot.items()}
            return out

        A = stage(f"{key}.A", pass_a)
        lambdas.update({t.name: damping_from_norms(A[f"{t.name}.sq"], t.numel, damping_scale) for t in group})
        P = {t.name: A[f"{t.name}.P"] for t in group}  # [n, k]
        if not weighted:
            for t in group:
                influence[t.name].append(rule.stream_combine(P[t.name], None, n, lambdas[t.name]).T)
            return A["train_loss"]
        R = {t.name: METER.track(rule.stream_weights(P[t.name], A[f"{t.name}.sq"], lambdas[t.name])) for t in group}

        def pass_b() -> dict[str, torch.Tensor]:
            """w = sum_j r_j g_j per module and column, [k, d]."""
            W = {t.name: METER.zeros(k, t.numel, device=t.device, dtype=t.stat_dtype) for t in group}

            def on_batch(t, x, d, off):
                r = R[t.name][tr.start + off : tr.start + off + x.shape[0]].to(device=x.device, dtype=x.dtype)
                W[t.name] += weighted_sum(t.module, x, d, r)

            _pass(model, group, train[tr], pad_id, batch_size, f"train weighted gradient{tag}", on_batch, tr.start)
            return {name: all_reduce_sum(w) for name, w in W.items()}

        W = stage(f"{key}.B", pass_b)

        def pass_c() -> dict[str, torch.Tensor]:
            """g_i . w per module, [n, k]."""
            dot = {t.name: METER.zeros(n_local, k, dtype=torch.float64) for t in group}

            def on_batch(t, x, d, off):
                dot[t.name][off : off + x.shape[0]] = dots(t.module, x, d, W[t.name].to(x.device)).cpu()

            _pass(model, group, train[tr], pad_id, batch_size, f"train dots with w{tag}", on_batch, tr.start)
            return {name: all_gather_rows(v) for name, v in dot.items()}

        C = stage(f"{key}.C", pass_c)
        for t in group:
            lam = lambdas[t.name]
            if lam == 0.0:  # no train gradient at all: zero influence (as layerif.influence.estimate)
                influence[t.name].append(torch.zeros(k, n, dtype=torch.float64))
            else:
                influence[t.name].append(rule.stream_combine(P[t.name], C[t.name], n, lam).T)
        return A["train_loss"]

    for gi, group in enumerate(groups):
        for ci, cols in enumerate(columns):
            train_loss = run_chunk(gi, group, ci, cols)
    return {name: torch.cat(parts) for name, parts in influence.items()}, lambdas, train_loss, passes
