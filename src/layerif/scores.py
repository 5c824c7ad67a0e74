"""LayerIF scores: per-block influence of train samples on the validation loss.

This module chooses the engine (:func:`choose_mode`; the engines and their one
forward+backward pass are in :mod:`layerif.engine`) and aggregates module
influences into blocks. The pipeline, for each targeted module m of block l:

1. v_m: gradient of the summed validation loss (or per-validation-sample
   gradients with ``per_val``), from hooks (:mod:`layerif.grads`);
2. per-sample train gradients g_im, reduced at once to the Gram statistics
   K_m = G_m G_m^T and P_m = G_m v_m (:mod:`layerif.influence`). Modules are
   processed in groups whose gradients and Gram matrices fit ``max_memory`` GB
   (:mod:`layerif.budget`); a group costs a validation and a train pass, and is
   reduced to its influences before the next, so no more than one group's
   buffers are ever held;
3. lambda_m, the module influence I_m (n_train x k), and the block influence
   I_l(i) = sum_{m in l} I_m(i).

Layer score (LayerIF's aggregation): S_l = - sum_i min(I_l(i), 0) >= 0, the total
helpful influence in block l. Other aggregations are reported beside it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import progress, stability
from .cache import PassCache, fingerprint
from .data import Encoded, Fields, check_records, encode_split, load_records, n_distinct, pad_id, records_note
from .distributed import world
from .engine import MaterializedPlan, materialized_plan, memory_budget, module_stats, streaming_influence
from .errors import UserError
from .grads import check_pass_memory, record_losses
from .influence import ESTIMATORS, EstimatorOptions, ModuleStats, damping, estimate, get_estimator
from .io import CACHE_DIR, check_out_dir, overwrite_field, sibling
from .models import LoadedModel, Target, check_selector, context_length, find_blocks, select_targets
from .options import DataOptions, DataSource, EngineOptions, ModelOptions, RunOptions, StabilityOptions, option

AGGREGATIONS = ("helpful", "sum", "mean_abs", "helpful_share")


@dataclass
class ScoreArgs(StabilityOptions, RunOptions, EngineOptions, DataOptions, DataSource, ModelOptions):
    """Compute per-layer influence scores (LayerIF) of a causal LM on a task."""

    out: str = option("out/score", "output folder (see README: output folders)")
    overwrite: bool = overwrite_field()
    dry_run: bool = option(False, "plan the run and stop: `layerif plan` with these options (nothing is computed)")

    @property
    def lora_init_seed(self) -> int:
        """Seed of the LoRA adapters' initialisation and fine-tuning (``--lora-seed``, else ``--seed``)."""
        return self.seed if self.lora_seed is None else self.lora_seed

    @property
    def resample_seed(self) -> int:
        """Seed of the bootstrap and the split halves (``--bootstrap-seed``, else ``--seed``)."""
        return self.seed if self.bootstrap_seed is None else self.bootstrap_seed


@dataclass
class ScoreResult:
    """Everything a scoring run produces (the files are renderings of this)."""

    layers: list[int]  # block indices, model order
    influence: dict[int, torch.Tensor]  # block -> I_l, [n_train] or [n_val, n_train] with per_val (float64)
    lambdas: dict[str, float]  # module name -> lambda_m
    train_loss: torch.Tensor  # [n_train]
    seconds: float
    passes: int
    meta: dict = field(default_factory=dict)

    def summed(self, layer: int) -> torch.Tensor:
        """I_l(i) for the summed validation loss, [n_train]."""
        inf = self.influence[layer]
        return inf.sum(dim=0) if inf.dim() == 2 else inf

    def aggregations(self) -> dict[str, list[float]]:
        """Per-block aggregations of I_l: helpful (= S_l), sum, mean_abs, helpful_share."""
        return {name: [aggregate(self.summed(l))[name] for l in self.layers] for name in AGGREGATIONS}

    @property
    def score(self) -> list[float]:
        return self.aggregations()["helpful"]


def aggregate(I: torch.Tensor) -> dict[str, float]:
    """Aggregations of one block's influence vector I [n_train]."""
    return {
        "helpful": float(-torch.clamp(I, max=0).sum()),
        "sum": float(I.sum()),
        "mean_abs": float(I.abs().mean()),
        "helpful_share": float((I < 0).double().mean()),
    }


# ----------------------------------------------------------------------------- engine


def gram_influence(
    stats: dict[str, ModuleStats], targets: list[Target], estimator: str, damping_scale: float,
    options: EstimatorOptions = EstimatorOptions(),
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Module influences {name: I_m [k, n_train]} (float64) and lambdas from Gram statistics."""
    inf: dict[str, torch.Tensor] = {}
    lambdas: dict[str, float] = {}
    for t in targets:
        lambdas[t.name] = lam = damping(stats[t.name], damping_scale)
        inf[t.name] = estimate(stats[t.name], estimator, lam, options).T
    return inf, lambdas


def choose_mode(mode: str, estimator: str, groups: int, world_size: int) -> str:
    """``auto``: streaming under torch.distributed or when the materialized engine would need more
    than 3 groups (streaming costs 3 train passes); materialized for an estimator that needs K otherwise."""
    streams = get_estimator(estimator).streaming
    if mode == "streaming" and not streams:
        able = ", ".join(n for n, e in ESTIMATORS.items() if e.streaming)
        raise UserError(f"--mode streaming supports {able}; {estimator} needs --mode materialized")
    if mode == "materialized" and world_size > 1:
        raise UserError("--mode materialized runs in one process; use --mode streaming under torchrun")
    if mode != "auto":
        return mode
    if world_size > 1:
        if not streams:
            raise UserError(f"estimator {estimator} runs in one process (it needs the full n x n Gram matrix)")
        return "streaming"
    return "materialized" if not streams or groups <= 3 else "streaming"


def planned_materialized(targets: list[Target], train: list[Encoded], val: list[Encoded], per_val: bool,
                         layout: str, budget_bytes: float, mode: str) -> MaterializedPlan | None:
    """The materialized engine's plan (:func:`layerif.engine.materialized_plan`), made once and used both to
    choose the mode and to run it; None when not even one module fits and ``mode`` is not ``materialized``
    (with ``materialized`` that is the :class:`UserError` saying how much memory it needs)."""
    try:
        return materialized_plan(targets, train, val, per_val, layout, budget_bytes)
    except UserError:
        if mode == "materialized":
            raise
        return None


def compute(
    lm: LoadedModel,
    train: list[Encoded],
    val: list[Encoded],
    target: str = "attn",
    estimator: str = "datainf",
    damping_scale: float = 0.1,
    per_val: bool = False,
    batch_size: int = 8,
    max_memory_gb: float | None = None,
    layout: str = "auto",
    mode: str = "auto",
    val_chunk: int = 8,
    cache_dir: str | Path | None = None,
) -> ScoreResult:
    """Score every block of ``lm`` with train records ``train`` against validation records ``val``.

    ``mode``: ``materialized`` (Gram statistics; all estimators), ``streaming``
    (:func:`layerif.engine.streaming_influence`; the estimators with a streaming form, memory of a few gradients),
    or ``auto`` (:func:`choose_mode`). With ``cache_dir`` (single process), every
    completed pass is kept there and a re-run with the same model, data and
    options resumes after the last one; the caller removes it when done.
    """
    if not 0 < damping_scale < math.inf:  # nan fails this too
        raise UserError(f"--damping-scale must be > 0 (got {damping_scale})")
    get_estimator(estimator)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    start = time.perf_counter()
    check_pass_memory(lm.model, {"train": train, "validation": val}, batch_size)
    targets = select_targets(lm.model, target)
    pad = pad_id(lm.tokenizer)
    budget = memory_budget(max_memory_gb)  # bytes, once for the run
    plan = planned_materialized(targets, train, val, per_val, layout, budget, mode)
    chosen = choose_mode(mode, estimator, len(plan.groups) if plan else 10**9, world()[1])
    cache = PassCache(None)
    if cache_dir is not None and world()[1] == 1:
        options = {"target": target, "estimator": estimator, "damping_scale": damping_scale, "per_val": per_val,
                   "mode": chosen, "layout": layout, "budget": budget, "val_chunk": val_chunk}
        cache = PassCache(cache_dir, fingerprint(lm.model, lm.name, train, val, options))
    blocks: dict[int, torch.Tensor] = {}
    lambdas: dict[str, float] = {}

    def add(module_inf: dict[str, torch.Tensor], module_lambdas: dict[str, float]) -> None:
        """Sum module influences [k, n] into their blocks."""
        lambdas.update(module_lambdas)
        for t in targets:
            if t.name in module_inf:
                if not bool(torch.isfinite(module_inf[t.name]).all()):  # the passes found every gradient finite
                    raise FloatingPointError(f"non-finite influence in module {t.name} (block {t.block}) from finite "
                                             f"gradients (lambda {module_lambdas.get(t.name)}): the estimator "
                                             "overflowed; try --dtype float64 or a larger --damping-scale")
                blocks[t.block] = blocks.get(t.block, 0) + module_inf[t.name]

    direct = get_estimator(estimator).direct
    if direct is not None:
        *found, passes = direct(lm.model, targets, train, val, pad, damping_scale, per_val, batch_size)
        add(*found)
        train_loss = record_losses(lm.model, train, pad, batch_size)
        chosen = estimator
    elif chosen == "streaming":
        *found, train_loss, passes = streaming_influence(lm.model, targets, train, val, pad, estimator, damping_scale,
                                                         per_val, batch_size, val_chunk, cache, budget)
        add(*found)
    else:  # each module reduced to its influence as soon as its group is done (module_stats' reduce)
        _, train_loss, passes = module_stats(
            lm.model, targets, train, val, pad, per_val, batch_size, budget, layout, cache,
            reduce=lambda t, s: add(*gram_influence({t.name: s}, [t], estimator, damping_scale)), plan=plan)
    layers = sorted(blocks)
    influence = {l: (blocks[l] if per_val else blocks[l][0]) for l in layers}
    return ScoreResult(layers=layers, influence=influence, lambdas=lambdas, train_loss=train_loss,
                       seconds=time.perf_counter() - start, passes=passes, meta={"mode": chosen})


# ----------------------------------------------------------------------------- data & run


TASK_DEFAULT_N = {"train": 64, "validation": 16}  # records of a built-in task when --n-train / --n-val are not given


def raw_splits(args: ScoreArgs) -> tuple[list[dict], list[dict], str, dict]:
    """Train and validation records (checked: objects with string fields), the task label, and the
    record counts ``{"train": {"used", "available"}, "validation": {...}}``.

    Record caps: ``--n-train`` / ``--n-val`` take the first N records (0 = all);
    without them a ``--train`` / ``--val`` file is used whole and a built-in task
    gives :data:`TASK_DEFAULT_N` records. Needs no model.
    """
    fields = Fields(args.text_field, args.prompt_field, args.completion_field)
    if args.train or args.val:
        if not (args.train and args.val):
            raise UserError("--train and --val go together")
        train_rec, val_rec, label = load_records(args.train), load_records(args.val), Path(args.train).stem
        caps = {"train": args.n_train, "validation": args.n_val}
    else:
        from .tasks import get_task

        task = get_task(args.task)
        caps = {"train": TASK_DEFAULT_N["train"] if args.n_train is None else args.n_train,
                "validation": TASK_DEFAULT_N["validation"] if args.n_val is None else args.n_val}
        train_rec = task.split("train", caps["train"] or None, args.seed, args.allow_repeats)
        val_rec = task.split("validation", caps["validation"] or None, args.seed, args.allow_repeats)
        label = task.name
    counts = {}
    splits = {"train": train_rec, "validation": val_rec}
    for split, recs in splits.items():
        counts[split] = {"available": len(recs)}
        if caps[split]:
            splits[split] = recs[: caps[split]]
        counts[split]["used"] = len(splits[split])
        check_records(splits[split], split, fields)
    return splits["train"], splits["validation"], label, counts


def load_splits(args: ScoreArgs, tokenizer, context: int | None = None, raw: tuple | None = None
                ) -> tuple[list[Encoded], list[Encoded], str, dict]:
    """Tokenized train and validation records, the task label, and the record counts (:func:`raw_splits`, or
    ``raw`` in its form: validate's scoring part) with ``truncated`` per split and the ``max_length`` applied.

    Truncation rule (:func:`layerif.data.encode_split`): with ``--max-length N``
    records keep their first N tokens; without it a record longer than the
    model's ``context`` is refused.
    """
    if args.max_length is not None and context is not None and args.max_length > context:
        raise UserError(f"--max-length {args.max_length} exceeds the model's context of {context} tokens")
    fields = Fields(args.text_field, args.prompt_field, args.completion_field)
    train_rec, val_rec, label, counts = raw or raw_splits(args)
    train, counts["train"]["truncated"] = encode_split(tokenizer, train_rec, "train", fields, args.max_length, context)
    val, counts["validation"]["truncated"] = encode_split(tokenizer, val_rec, "validation", fields, args.max_length,
                                                          context)
    counts["max_length"] = args.max_length
    return train, val, label, counts


def split_half_recompute(
    lm: LoadedModel, train: list[Encoded], val: list[Encoded], top_k: int = 5, seed: int = 0, **compute_kwargs
) -> dict:
    """Split-half (:mod:`layerif.stability`) by scoring each half with :func:`compute` (new gradient passes, any mode).

    ``compute_kwargs`` are compute's options (target, estimator, damping_scale, ...);
    ``per_val`` is dropped: S_l needs only the summed validation loss.
    """
    a, b = stability.split_indices(len(train), seed)
    compute_kwargs = {k: v for k, v in compute_kwargs.items() if k != "per_val"}
    halves = []
    for name, idx in (("A", a), ("B", b)):
        progress.info(f"split-half: scoring half {name} ({len(idx)} train records)")
        halves.append(compute(lm, [train[i] for i in idx], val, **compute_kwargs))
    ra, rb = halves
    return stability.split_half_summary(ra.layers, ra.score, rb.score, top_k, "recomputed", len(a), seed)


def assess_stability(result: ScoreResult, args: ScoreArgs, lm: LoadedModel, train: list[Encoded],
                     val: list[Encoded]) -> dict:
    """The ``stability`` entry of scores.json (empty when none was asked for).

    Split-half reuses the per-sample influences for an estimator whose influence
    of a sample does not depend on the others (grad-dot) and recomputes both
    halves (two more scoring runs on half the records) otherwise.
    """
    out: dict = {}
    if args.bootstrap:
        out["bootstrap"] = stability.bootstrap(result.influence, args.bootstrap, args.top_k, args.resample_seed,
                                               args.bootstrap_val)
    if args.split_half:
        if get_estimator(args.estimator).sample_independent:
            out["split_half"] = stability.split_half_from_influence(result.influence, args.top_k, args.resample_seed)
        else:
            out["split_half"] = split_half_recompute(
                lm, train, val, args.top_k, args.resample_seed, target=args.target, estimator=args.estimator,
                damping_scale=args.damping_scale, batch_size=args.batch_size, max_memory_gb=args.max_memory,
                layout=args.layout, mode=args.mode, val_chunk=args.val_chunk)
    return out


def validate(args: ScoreArgs, command: str | None = "score") -> None:
    """Checks that need no model: option values, the records, and (unless ``command`` is None) the
    output folder for that command (:func:`layerif.io.check_out_dir`)."""
    if not 0 < args.damping_scale < math.inf:  # nan fails this too
        raise UserError(f"--damping-scale must be > 0 (got {args.damping_scale})")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise UserError(f"--bootstrap must be >= 2 resamples, or 0 for none (got {args.bootstrap})")
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.bootstrap_val and not (args.per_val and args.bootstrap):
        raise UserError("--bootstrap-val needs --per-val and --bootstrap B")
    get_estimator(args.estimator)
    if args.mode not in ("auto", "materialized", "streaming"):
        raise UserError(f"unknown mode {args.mode!r} (use auto, materialized or streaming)")
    if args.max_memory is not None and not 0 < args.max_memory < math.inf:
        raise UserError(f"--max-memory must be > 0 GB (got {args.max_memory})")
    if args.val_chunk < 1:
        raise UserError(f"--val-chunk must be >= 1 (got {args.val_chunk})")
    if args.layout not in ("auto", "dense", "factored"):
        raise UserError(f"unknown layout {args.layout!r} (use auto, dense or factored)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if (args.n_train or 0) < 0 or (args.n_val or 0) < 0:
        raise UserError("--n-train and --n-val must be >= 0")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be >= 2 (got {args.max_length})")
    if command is not None:
        check_out_dir(args.out, command, args.overwrite)
    for name in ("train", "val"):
        path = getattr(args, name)
        if path and not Path(path).exists() and Path(path).suffix:
            raise UserError(f"data file not found: {path}")
    raw_splits(args)  # the records themselves, before any model loads
    check_selector(args.target)


def cache_dir(args: ScoreArgs) -> Path:
    """Where a run keeps its completed passes until its outputs are written (in --out's staging folder)."""
    return sibling(Path(args.out), "partial") / CACHE_DIR


PlanCheck = Callable[[object, list[Encoded], list[Encoded]], None]
"""``check(config, train, val)``: raises a :class:`UserError` when the run's plan does not fit (before the weights
load; :mod:`layerif.plan`)."""


def load_checked(args: ScoreArgs, *more: ScoreArgs, check_plan: PlanCheck | None = None) -> tuple[LoadedModel, tuple]:
    """The model of ``args`` and the :func:`load_splits` of ``args``: the records are tokenized and
    checked (lengths, loss tokens) once the tokenizer and config are read, before the weights load.
    The records of ``more`` (other tasks on the same model) are checked there too, and ``check_plan``
    of ``args``'s records."""
    splits: list = []

    def check(tokenizer, config) -> None:
        splits.extend(load_splits(a, tokenizer, context_length(config)) for a in (args, *more))
        if check_plan is not None:
            check_plan(config, splits[0][0], splits[0][1])

    return args.load(check), splits[0]


def prepare(args: ScoreArgs, lm: LoadedModel, splits: tuple | None = None
            ) -> tuple[LoadedModel, list[Encoded], list[Encoded], str, dict]:
    """Tokenized splits, their label and the record counts (``splits`` if :func:`load_checked` made them,
    else :func:`load_splits`); with ``--target lora`` the model comes back with fine-tuned LoRA adapters."""
    train, val, label, counts = splits or load_splits(args, lm.tokenizer, context_length(lm.model.config))
    progress.info(records_note(counts))
    if args.target == "lora":
        from .lora import prepare_lora

        lm = prepare_lora(lm, train, args.lora_modules, args.lora_rank, args.finetune_steps, args.finetune_lr,
                          args.batch_size, args.lora_init_seed)
    return lm, train, val, label, counts


def score(args: ScoreArgs, lm: LoadedModel | None = None, cache: Path | None = None,
          check_plan: PlanCheck | None = None) -> ScoreResult:
    """The Python API behind ``layerif score``: load, tokenize, compute (no files written).

    Completed passes are kept in ``cache`` (default :func:`cache_dir`) with ``--resume``. ``check_plan``
    runs before the weights load (:func:`load_checked`)."""
    validate(args, None)
    lm, train, val, label, counts = prepare(
        args, *((lm, None) if lm is not None else load_checked(args, check_plan=check_plan)))
    progress.info(f"scoring {len(find_blocks(lm.model)[1])} blocks: {len(train)} train x {len(val)} validation records, "
                  f"target {args.target}, estimator {args.estimator}")
    result = compute(lm, train, val, args.target, args.estimator, args.damping_scale, args.per_val,
                     args.batch_size, args.max_memory, args.layout, args.mode, args.val_chunk,
                     (cache or cache_dir(args)) if args.resume else None)
    result.meta |= {"model": lm.name, "task": label, "n_train": len(train), "n_val": len(val), "records": counts,
                    "n_train_distinct": n_distinct(train), "n_val_distinct": n_distinct(val)}
    if args.bootstrap or args.split_half:
        result.meta["stability"] = assess_stability(result, args, lm, train, val)
        if args.top_k > len(result.layers):
            result.meta["notes"] = [f"--top-k {args.top_k} is more than the {len(result.layers)} blocks scored: "
                                    f"k = {len(result.layers)} was used"]
    return result
