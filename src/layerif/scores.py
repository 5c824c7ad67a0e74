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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import progress, stability
from .cache import PassCache, fingerprint
from .data import Encoded, Fields, check_records, encode_split, load_records, n_distinct, pad_id, records_note
from .distributed import world
from .engine import (EngineConfig, MaterializedPlan, materialized_plan, memory_budget, module_stats,
                     streaming_influence)
from .errors import UserError
from .grads import check_pass_memory, record_losses
from .influence import ESTIMATORS, EstimatorConfig, ModuleStats, get_estimator, gram_estimators
from .io import CACHE_DIR, check_out_dir, overwrite_field, sibling
from .models import LoadedModel, Projection, context_length, find_blocks, select_targets
from .options import (DataOptions, DataSource, EngineOptions, LissaOptions, ModelOptions, RunOptions, StabilityOptions,
                      option)



@dataclass(frozen=True)
class Aggregation:
    """One per-block aggregation of a block's influence vector I_l [n_train]: ``of(I) -> float``, and its
    ``orientation``: +1 when a larger value means more helpful influence, -1 when a smaller one does."""

    of: Callable[[torch.Tensor], float]
    orientation: int


AGGREGATIONS: dict[str, Aggregation] = {
    "helpful": Aggregation(lambda I: float(-torch.clamp(I, max=0).sum()), 1),  # S_l, LayerIF's score
    "sum": Aggregation(lambda I: float(I.sum()), -1),
    "mean_abs": Aggregation(lambda I: float(I.abs().mean()), 1),
    "helpful_share": Aggregation(lambda I: float((I < 0).double().mean()), 1),
}
"""The one vocabulary of block aggregations (scores.json's ``aggregations``, scores.csv, validation.json)."""
S_L = "helpful"
"""The aggregation that is S_l; the result files name it ``score`` (:func:`file_key`)."""


def file_key(aggregation: str) -> str:
    """An aggregation's name in the result files: ``score`` for S_l (scores.json's ``score``, the ``score`` column
    of scores.csv and validation.csv, validation.json's ``scores``), its own name otherwise."""
    return "score" if aggregation == S_L else aggregation


@dataclass
class ScoreArgs(LissaOptions, StabilityOptions, RunOptions, EngineOptions, DataOptions, DataSource, ModelOptions):
    """Compute per-layer influence scores (LayerIF) of a causal LM on a task."""

    out: str = option("out/score", "output folder (see README: output folders)")
    overwrite: bool = overwrite_field()
    dry_run: bool = option(False, "plan the run and stop: `layerif plan` with these options (nothing is computed)")


@dataclass(frozen=True)
class ScoreConfig:
    """A scoring run's library configs, made (and so checked) once from its arguments (:func:`validate`)."""

    estimator: EstimatorConfig
    engine: EngineConfig


def engine_config(args: EngineOptions, **run) -> EngineConfig:
    """The :class:`EngineConfig` of a command's engine options (checked when made); ``run``: the run options
    (``per_val``, ``mode``, ``val_chunk``) of a command that has them."""
    return EngineConfig(selector=args.target, batch_size=args.batch_size, max_memory_gb=args.max_memory,
                        layout=args.layout, **run)


def score_config(args: ScoreArgs) -> ScoreConfig:
    """The library configs of a score run's arguments (``score``, ``plan``, a ``compare-tasks`` task)."""
    return ScoreConfig(EstimatorConfig(args.estimator, args.damping_scale, args.estimator_options(args.resample_seed)),
                       engine_config(args, per_val=args.per_val, mode=args.mode, val_chunk=args.val_chunk))


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
        """Per-block :data:`AGGREGATIONS` of I_l: helpful (= S_l), sum, mean_abs, helpful_share."""
        return {name: [aggregate(self.summed(l))[name] for l in self.layers] for name in AGGREGATIONS}

    @property
    def score(self) -> list[float]:
        """S_l per block."""
        return self.aggregations()[S_L]


def aggregate(I: torch.Tensor) -> dict[str, float]:
    """Every :data:`AGGREGATIONS` of one block's influence vector I [n_train]."""
    return {name: a.of(I) for name, a in AGGREGATIONS.items()}


# ----------------------------------------------------------------------------- engine


def gram_influence(stats: dict[str, ModuleStats], targets: list[Projection], estimator: EstimatorConfig
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Module influences {name: I_m [k, n_train]} (float64) and lambdas from Gram statistics."""
    inf: dict[str, torch.Tensor] = {}
    lambdas: dict[str, float] = {}
    for t in targets:
        I, lambdas[t.name] = estimator.gram(stats[t.name])
        inf[t.name] = I.T
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


@dataclass
class Scored:
    """What :func:`compute_all` produces: one :class:`ScoreResult` per estimator, the projections scored and, when
    asked for (``keep_stats``), their Gram statistics {name: :class:`ModuleStats`}."""

    results: dict[str, ScoreResult]
    targets: list[Projection]
    stats: dict[str, ModuleStats]


def compute(lm: LoadedModel, train: list[Encoded], val: list[Encoded], estimator: EstimatorConfig = EstimatorConfig(),
            engine: EngineConfig = EngineConfig(), cache_dir: str | Path | None = None) -> ScoreResult:
    """Score every block of ``lm`` with train records ``train`` against validation records ``val``
    (:func:`compute_all` with one estimator)."""
    return compute_all(lm, train, val, [estimator], engine, cache_dir).results[estimator.name]


def compute_all(lm: LoadedModel, train: list[Encoded], val: list[Encoded], estimators: Sequence[EstimatorConfig],
                engine: EngineConfig = EngineConfig(), cache_dir: str | Path | None = None,
                keep_stats: bool = False) -> Scored:
    """The one scoring entry point (``score``, ``compare-tasks``, ``validate``, ``compare-estimators``): every
    estimator's block influences of ``lm``'s blocks, train records ``train`` against validation records ``val``.

    ``engine.mode``: ``materialized`` (Gram statistics; all estimators), ``streaming``
    (:func:`layerif.engine.streaming_influence`; the estimators with a streaming form, memory of a few gradients),
    or ``auto`` (:func:`choose_mode`). Several estimators share one set of Gram statistics (materialized; each
    needs a Gram form); with ``keep_stats`` those statistics are returned too (held all at once). With
    ``cache_dir`` (single process), every completed pass is kept there and a re-run with the same model, data and
    options resumes after the last one; the caller removes it when done. The configs were checked when made.
    """
    first = estimators[0]
    several = len(estimators) > 1 or keep_stats
    if several and (engine.mode == "streaming" or any(e.rule.gram is None for e in estimators)):
        raise UserError("several estimators share one set of Gram statistics: materialized mode, estimators with a "
                        f"Gram form ({', '.join(gram_estimators())})")
    start = time.perf_counter()
    check_pass_memory(lm.model, {"train": train, "validation": val}, engine.batch_size)
    targets = select_targets(lm.model, engine.selector)
    pad = pad_id(lm.tokenizer)
    budget = memory_budget(engine.max_memory_gb)  # bytes, once for the run
    # the materialized engine's plan, made once: it chooses the mode and is what the engine runs; when not even one
    # module fits, the mode choice looks elsewhere, and a run that needs this engine gets the plan's refusal
    plan: MaterializedPlan | None = None
    refusal: UserError | None = None
    try:
        plan = materialized_plan(targets, train, val, engine.per_val, engine.layout, budget)
    except UserError as exc:
        refusal = exc
    chosen = choose_mode(engine.mode, first.name, len(plan.groups) if plan else 10**9, world()[1])
    if plan is None and chosen == "materialized" and first.rule.direct is None:
        raise refusal
    if several and chosen != "materialized":
        raise UserError("several estimators share one set of Gram statistics: use --mode materialized")
    cache = PassCache(None)
    if cache_dir is not None and world()[1] == 1:
        options = {"target": engine.selector, "estimator": first.name, "damping_scale": first.damping_scale,
                   "per_val": engine.per_val, "mode": chosen, "layout": engine.layout, "budget": budget,
                   "val_chunk": engine.val_chunk}
        cache = PassCache(cache_dir, fingerprint(lm.model, lm.name, train, val, options))
    blocks: dict[str, dict[int, torch.Tensor]] = {e.name: {} for e in estimators}
    lambdas: dict[str, dict[str, float]] = {e.name: {} for e in estimators}
    stats: dict[str, ModuleStats] = {}

    def add(name: str, module_inf: dict[str, torch.Tensor], module_lambdas: dict[str, float]) -> None:
        """Sum module influences [k, n] of estimator ``name`` into their blocks."""
        lambdas[name].update(module_lambdas)
        for t in targets:
            if t.name in module_inf:
                if not bool(torch.isfinite(module_inf[t.name]).all()):  # the passes found every gradient finite
                    raise FloatingPointError(f"non-finite influence in module {t.name} (block {t.block}) from finite "
                                             f"gradients (lambda {module_lambdas.get(t.name)}): the estimator "
                                             "overflowed; try --dtype float64 or a larger --damping-scale")
                blocks[name][t.block] = blocks[name].get(t.block, 0) + module_inf[t.name]

    def reduce(t: Projection, s: ModuleStats) -> None:
        """Each module reduced to its influences as soon as its group is done (module_stats' reduce)."""
        if keep_stats:
            stats[t.name] = s
        for e in estimators:
            add(e.name, *gram_influence({t.name: s}, [t], e))

    direct = first.rule.direct
    if direct is not None:
        *found, passes = direct(lm.model, targets, train, val, pad, first, engine)
        add(first.name, *found)
        train_loss = record_losses(lm.model, train, pad, engine.batch_size)
        chosen = first.name
    elif chosen == "streaming":
        *found, train_loss, passes = streaming_influence(lm.model, targets, train, val, pad, first, engine, budget,
                                                         cache)
        add(first.name, *found)
    else:
        _, train_loss, passes = module_stats(lm.model, targets, train, val, pad, engine, plan, cache, reduce)
    seconds = time.perf_counter() - start
    results = {}
    for e in estimators:
        layers = sorted(blocks[e.name])
        influence = {l: (blocks[e.name][l] if engine.per_val else blocks[e.name][l][0]) for l in layers}
        results[e.name] = ScoreResult(layers=layers, influence=influence, lambdas=lambdas[e.name],
                                      train_loss=train_loss, seconds=seconds, passes=passes, meta={"mode": chosen})
    return Scored(results, targets, stats)


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

        task = get_task(args.task, args.lm_eval_include)
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


def split_half_recompute(lm: LoadedModel, train: list[Encoded], val: list[Encoded], config: ScoreConfig,
                         top_k: int = 5, seed: int = 0) -> dict:
    """Split-half (:mod:`layerif.stability`) by scoring each half with :func:`compute` (new gradient passes, any mode).

    ``per_val`` is dropped: S_l needs only the summed validation loss.
    """
    a, b = stability.split_indices(len(train), seed)
    engine = replace(config.engine, per_val=False)
    halves = []
    for name, idx in (("A", a), ("B", b)):
        progress.info(f"split-half: scoring half {name} ({len(idx)} train records)")
        halves.append(compute(lm, [train[i] for i in idx], val, config.estimator, engine))
    ra, rb = halves
    return stability.split_half_summary(ra.layers, ra.score, rb.score, top_k, "recomputed", len(a), seed)


def assess_stability(result: ScoreResult, args: ScoreArgs, config: ScoreConfig, lm: LoadedModel,
                     train: list[Encoded], val: list[Encoded]) -> dict:
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
        if config.estimator.rule.sample_independent:
            out["split_half"] = stability.split_half_from_influence(result.influence, args.top_k, args.resample_seed)
        else:
            out["split_half"] = split_half_recompute(lm, train, val, config, args.top_k, args.resample_seed)
    return out


def check_data(args: DataSource | DataOptions, command: str | None, out: str | None = None,
               overwrite: bool = False) -> None:
    """Checks of a scoring command's records that need no model: the counts, ``--max-length``, (unless ``command``
    is None) the output folder ``out`` for that command (:func:`layerif.io.check_out_dir`), and the records."""
    if (args.n_train or 0) < 0 or (args.n_val or 0) < 0:
        raise UserError("--n-train and --n-val must be >= 0")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be >= 2 (got {args.max_length})")
    if command is not None:
        check_out_dir(out, command, overwrite)
    for name in ("train", "val"):
        path = getattr(args, name)
        if path and not Path(path).exists() and Path(path).suffix:
            raise UserError(f"data file not found: {path}")
    raw_splits(args)  # the records themselves, before any model loads


def validate(args: ScoreArgs, command: str | None = "score") -> ScoreConfig:
    """Checks that need no model: option values (the library's, by making the run's :class:`ScoreConfig`, which
    is returned), the records, and (unless ``command`` is None) the output folder for that command."""
    config = score_config(args)
    args.check_stability()
    if args.bootstrap_val and not (args.per_val and args.bootstrap):
        raise UserError("--bootstrap-val needs --per-val and --bootstrap B")
    check_data(args, command, args.out, args.overwrite)
    return config


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
          check_plan: PlanCheck | None = None, config: ScoreConfig | None = None) -> ScoreResult:
    """The Python API behind ``layerif score``: load, tokenize, compute (no files written).

    Completed passes are kept in ``cache`` (default :func:`cache_dir`) with ``--resume``. ``check_plan``
    runs before the weights load (:func:`load_checked`). ``config``: what :func:`validate` returned for ``args``
    when the caller checked them already (they are checked here otherwise)."""
    config = config or validate(args, None)
    lm, train, val, label, counts = prepare(
        args, *((lm, None) if lm is not None else load_checked(args, check_plan=check_plan)))
    progress.info(f"scoring {len(find_blocks(lm.model)[1])} blocks: {len(train)} train x {len(val)} validation records, "
                  f"target {args.target}, estimator {args.estimator}")
    result = compute(lm, train, val, config.estimator, config.engine,
                     (cache or cache_dir(args)) if args.resume else None)
    if not any(bool(result.influence[l].any()) for l in result.layers):  # all-zero scores are no ranking
        hint = "; --target lora: the adapters' fine-tuning saturated the model (lower --finetune-lr)" \
            if args.target == "lora" else ""
        raise FloatingPointError(f"every block's influence is exactly zero: the train gradients vanished{hint}")
    result.meta |= {"model": lm.name, "task": label, "n_train": len(train), "n_val": len(val), "records": counts,
                    "n_train_distinct": n_distinct(train), "n_val_distinct": n_distinct(val)}
    if args.bootstrap or args.split_half:
        result.meta["stability"] = assess_stability(result, args, config, lm, train, val)
        if args.top_k > len(result.layers):
            result.meta["notes"] = [f"--top-k {args.top_k} is more than the {len(result.layers)} blocks scored: "
                                    f"k = {len(result.layers)} was used"]
    return result
