"""``layerif prune``: per-block sparsity from LayerIF scores or a baseline allocation, pruning, evaluation, export."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__, allocate, progress
from ..allocate import SparsityOptions, check_epsilon, check_sparsity
from ..errors import UserError, require_finite
from ..evaluate import mc_accuracy, perplexity
from ..models import find_blocks
from ..options import (CalibrationData, EvaluationData, LmEvalOptions, ModelOptions, SearchOptions,
                       fill_calibration_size, option)
from ..datasets_io import preload
from ..io import check_not_model_folder, overwrite_field, prepare_out_dir
from ..measure import OWL_LAMBDA, OWL_M, PRUNER_MEASURED, Sources, calibrated
from ..prune import (BLOCK_SIZE, DAMPING, PRUNERS, achieved_sparsity, get_pruner, parse_nm, prunable_params,
                     prune_model)
from ..prune_export import llmcompressor_recipe, save_pruned
from ..prune_allocation import Measurement, block_sparsity_for
from ..results import block_scores, block_sparsity, check_save_dir, read_scores
from ..search import write_search
from ..tasks import test_records
from .base import register


@dataclass
class PruningOptions(LmEvalOptions, SearchOptions, EvaluationData, CalibrationData):
    """Options shared by ``prune`` and ``compare-pruning``: the scores, the maps, calibration, evaluation and the
    search / sensitivity allocations (:class:`layerif.options.SearchOptions`)."""

    CPU_CALIBRATION = (128, 512)  # n_calib × seqlen without --n-calib / --seqlen on a CPU

    scores: str | None = option(None, "scores.json of `layerif score` (needed by the layerif allocations)")
    epsilon: float = option(0.2, "spread of the linear map: ratios in [1-ε, 1+ε] × target (layerif, alpha)")
    smooth: bool = option(False, "Savitzky-Golay smoothing (window 7, order 3) of the metric first")
    owl_m: float = option(OWL_M, "OWL: a weight is an outlier above M × its block's mean Wanda score")
    owl_lambda: float = option(OWL_LAMBDA, "OWL: the block sparsities span 2λ around the target")
    atp_step: float | None = option(None, "ATP: sparsity step β from one block to the next, s_l = s_0 + l·β "
                                          "(default: 0.2 / (blocks − 1))")
    dlp_alpha: float = option(0.15, "DLP: the block sparsities span 2α around the target")
    n_calib: int | None = option(None, "calibration windows (a pruner that calibrates: wanda, sparsegpt; owl; "
                                       "default: 128)")
    seqlen: int | None = option(None, "tokens per calibration / evaluation window (default: 512 on CPU, 2048 on cuda)")
    damping: float = option(DAMPING, "SparseGPT damping, a fraction of the mean Hessian diagonal")
    block_size: int = option(BLOCK_SIZE, "SparseGPT column block size")
    task_items: int = option(200, "test items of a built-in --task (a file: its first N)")
    allow_repeats: bool = option(False, "allow more task items than a built-in split holds (records repeat)")
    batch_size: int = option(4, "windows / records per evaluation batch")
    tune: bool = option(False, "choose the allocation's hyper-parameter (layerif, alpha: ε; owl: λ and M; atp: step; "
                               "dlp: α) from its grid by the KL to the dense model on --search-windows windows of "
                               "--calib apart from the calibration windows, never on test data (compare-pruning: "
                               "adds a NAME-tuned arm beside each such allocation)")

    def sparsity_options(self, smooth: bool | None = None) -> SparsityOptions:
        return SparsityOptions(self.epsilon, self.smooth if smooth is None else smooth, self.owl_lambda,
                               self.atp_step, self.dlp_alpha)

    def check(self, methods: list[str], needs_scores: str = "") -> None:
        """Checks that need no model; ``needs_scores`` names what needs ``--scores`` (empty: nothing)."""
        for m in methods:
            get_pruner(m)
        self.check_calibration_data()
        self.check_evaluation_data()
        if self.n_calib is not None and self.n_calib < 1:
            raise UserError(f"--n-calib must be ≥ 1 (got {self.n_calib})")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(f"--seqlen must be ≥ 2 (got {self.seqlen})")
        if not self.damping > 0:
            raise UserError(f"--damping must be > 0 (got {self.damping:g})")
        if self.block_size < 1:
            raise UserError(f"--block-size must be ≥ 1 (got {self.block_size})")
        check_epsilon(self.epsilon)
        if self.atp_step is not None and not (math.isfinite(self.atp_step) and self.atp_step >= 0):
            raise UserError(f"--atp-step must be ≥ 0 (got {self.atp_step:g})")
        if not 0 <= self.dlp_alpha < 0.5:
            raise UserError(f"--dlp-alpha {self.dlp_alpha:g} is outside [0, 0.5)")
        if self.task_items < 1:
            raise UserError(f"--task-items must be ≥ 1 (got {self.task_items})")
        if needs_scores and self.scores is None:
            raise UserError(f"{needs_scores} --scores scores.json (from `layerif score`)")


def task_records(task: str | None, task_items: int, allow_repeats: bool = False,
                 include: str | None = None) -> list[dict] | None:
    """The multiple-choice records of ``--task`` (None without one; ``include``: local lm-eval task YAMLs)."""
    return None if task is None else test_records(task, task_items, allow_repeats=allow_repeats, include=include)


def windows(tokenizer, args: PruningOptions, n: int, seed: int) -> torch.Tensor:
    """``n`` calibration windows of ``args.seqlen`` tokens of ``--calib``, drawn with ``seed``."""
    from ..datasets_io import calibration_windows

    return calibration_windows(tokenizer, args.calib, n, args.seqlen, seed, args.text_field)


def fitness_windows(tokenizer, args: PruningOptions, seed: int, calib: torch.Tensor | None) -> torch.Tensor:
    """The ``--search-windows`` windows of the KL fitness (search, sensitivity, ``--tune``): ``--calib`` text drawn with
    ``seed``, apart from the calibration windows ``calib`` (drawn here when None)."""
    from ..datasets_io import windows_apart

    calib = windows(tokenizer, args, args.n_calib, seed) if calib is None else calib
    return windows_apart(lambda k: windows(tokenizer, args, k, seed), calib, args.search_windows)


def tune_line(rec: dict) -> str:
    """One line of a ``--tune`` record: the grid's KL values and the choice."""
    kl = ", ".join(f"{'/'.join(f'{v:g}' for v in c.values())}: {f:.4g}" for c, f in zip(rec["grid"], rec["fitness"]))
    return (f"tuned {rec['allocation']} ({', '.join(rec['chosen'])}) by KL to dense on {rec['fitness_windows']['windows']} "
            f"calibration-side windows: {kl} → chose {rec['chosen']} ({rec['seconds']:.0f} s)")


def eval_text(args: PruningOptions, max_windows: int | None) -> tuple[str, int | None]:
    """(text, most windows) of the perplexity on ``--eval``: ``max_windows`` capped by the data set's own rule
    (C4: 256)."""
    from ..datasets_io import evaluation_text, fewest

    text, cap = evaluation_text(args.eval, args.text_field)
    return text, fewest(max_windows, cap)


def block_table(blocks: list[int], target: np.ndarray, achieved: np.ndarray, metric: np.ndarray | None) -> str:
    head = f"{'block':>5}  {'metric':>10}  {'target':>7}  {'achieved':>8}"
    rows = [f"{l:>5}  {'' if metric is None else f'{metric[l]:.4g}':>10}  {target[l]:>7.4f}  {achieved[l]:>8.4f}"
            for l in blocks]
    return "\n".join([head, *rows])


DEFAULT_SPARSITY, DEFAULT_ALLOCATION = 0.5, "layerif"  # without --allocation-file


@dataclass
class PruneArgs(PruningOptions, ModelOptions):
    """Prune a causal LM with per-layer sparsity from LayerIF scores (or a baseline allocation)."""

    sparsity: float | None = option(None, f"target sparsity, the mean over prunable weights, in [0, 1) "
                                          f"({DEFAULT_SPARSITY} unless --allocation-file)")
    method: str = option("wanda", "pruner", choices=PRUNERS)
    allocation: str | None = option(None, f"per-block sparsity map ({DEFAULT_ALLOCATION} unless --allocation-file)",
                                    choices=tuple(allocate.names("sparsity")))
    reverse: bool = option(False, "flip the map's direction: a higher metric gets less sparsity")
    nm: str | None = option(None, "N:M semi-structured pruning, e.g. 2:4 (N pruned of every M; needs --allocation uniform)")
    seed: int = option(0, "seed of the calibration windows")
    eval_windows: int = option(0, "also measure perplexity on this many held-out windows (0: no)")
    task: str | None = option(None, "also measure multiple-choice accuracy on a built-in task, lm-eval:NAME or a "
                                    "JSONL file of {prompt, options, answer} records")
    save: str | None = option(None, "folder for the pruned model, allocation.json and recipe.yaml")
    allocation_file: str | None = option(None, "apply the per-block sparsity of a saved allocation.json (replaces "
                                               "--allocation and --sparsity)")
    search_init: str = option("uniform", "start of --allocation search: uniform, layerif, owl, alpha, atp, dlp, "
                                         "sensitivity, best (the best of them on the fitness) or a saved "
                                         "allocation.json")
    search_dir: str = option("out/search", "folder of the level database and the search trajectory (search, "
                                           "sensitivity)")
    overwrite: bool = overwrite_field("--save")


def _with_defaults(args: PruneArgs) -> PruneArgs:
    """``args`` with the default ``--allocation`` / ``--sparsity`` filled in; with ``--allocation-file`` (which sets
    both) either of them given is a :class:`UserError`, not silently ignored."""
    if args.tune and args.allocation_file is not None:
        raise UserError("--tune chooses an allocation's hyper-parameter; --allocation-file has none")
    if args.allocation_file is not None:
        given = [f"--{name}" for name in ("allocation", "sparsity") if getattr(args, name) is not None]
        if given:
            raise UserError(f"{' and '.join(given)} cannot be combined with --allocation-file, which sets the "
                            "per-block sparsity; drop one of them")
        return args
    allocation = args.allocation or DEFAULT_ALLOCATION
    args = replace(args, allocation=allocate.tuned_label(allocation) if args.tune else allocation,
                   sparsity=DEFAULT_SPARSITY if args.sparsity is None else args.sparsity)
    check_sparsity(args.sparsity)
    return args


def run(args: PruneArgs) -> str:
    """``layerif prune``: allocate, prune, measure, save; returns the terminal summary."""
    args = _with_defaults(args)
    args, calibration_size = fill_calibration_size(args, args.CPU_CALIBRATION)
    nm = parse_nm(args.nm)
    rule, _ = allocate.get(args.allocation or DEFAULT_ALLOCATION, "sparsity", args.reverse, args.smooth)
    allocation, target = ("file", None) if args.allocation_file is not None else (args.allocation, args.sparsity)
    searching = allocation != "file" and rule.metric == "search"
    start = allocate.search_start(allocation, args.search_init) if searching else None
    needs_scores = allocation != "file" and "scores" in (rule.metric, allocate.ALLOCATIONS.get(start, rule).metric)
    args.check([args.method], f"--allocation {args.allocation} needs" if needs_scores else "")
    if searching:
        args.search_config(args.seed, [args.sparsity])
        if start not in (*allocate.SEARCH_STARTS, allocate.BEST) and not Path(start).exists():
            raise UserError(f"--search-init {start!r} is neither {', '.join(allocate.SEARCH_STARTS)}, "
                            f"{allocate.BEST} nor a file")
    if nm is not None:
        if allocation != "uniform":
            raise UserError(f"--nm {args.nm} prunes every block alike; use --allocation uniform")
        if not math.isclose(args.sparsity, nm[0] / nm[1]):
            raise UserError(f"--nm {args.nm} means sparsity {nm[0] / nm[1]:g}; pass --sparsity {nm[0] / nm[1]:g}")
    records = task_records(args.task, args.task_items, args.allow_repeats, args.lm_eval_include)
    lm_eval_tasks = args.lm_eval_names()
    if args.scores is not None:
        read_scores(args.scores)  # a bad scores file fails before the model loads
    if args.save is not None:
        check_save_dir(args.save, "pruned model", args.overwrite, args.model)
    measured = allocation != "file" and rule.metric in PRUNER_MEASURED
    tuned = allocation != "file" and rule.tuned is not None
    if measured:
        check_not_model_folder(args.search_dir, "--search-dir")
    needs_data = (get_pruner(args.method).needs_calibration or measured or tuned
                  or (allocation != "file" and any(calibrated(a) for a in (args.allocation, start) if a)))
    if needs_data:
        preload(args.calib, "calib", args.text_field)
    held_out = eval_text(args, args.eval_windows) if args.eval_windows > 0 else None
    lm = args.load()
    model = lm.model
    prefix, blocks = find_blocks(model)
    scores = None
    if args.scores is not None:
        scores, doc = block_scores(args.scores, len(blocks))
        if doc.get("model") not in (None, lm.name):
            progress.info(f"note: {args.scores} was computed on {doc.get('model')}, pruning {lm.name}")
    calib = windows(lm.tokenizer, args, args.n_calib, args.seed) if needs_data else None
    t0 = time.time()
    weights = prunable_params(model)
    options = args.sparsity_options()
    metric, extra = None, {}
    if allocation == "file":
        ratios, _ = block_sparsity(args.allocation_file, len(blocks))
        target = float(np.average(ratios, weights=weights))
        extra = {"allocation_file": args.allocation_file}
    else:
        measurement = None
        if measured or tuned:
            out = prepare_out_dir(args.search_dir) if measured else Path(args.search_dir)
            measurement = Measurement(args.method, fitness_windows(lm.tokenizer, args, args.seed, calib),
                                      out / "levels", args.search_config(args.seed) if searching else None,
                                      args.search_init, args.damping, args.block_size, args.batch_size, lm.name)
        ratios, metric, rec = block_sparsity_for(allocation, Sources(model, scores, windows=calib, owl_m=args.owl_m),
                                                 target, weights, options, args.reverse, measurement)
        if measured:
            if rule.metric == "search":
                write_search(out, {allocation: rec}, f"{lm.name} · {args.method}")
                rec = {k: v for k, v in rec.items() if k != "trajectory"}
            extra = {rule.metric: rec}
        elif tuned:
            extra = {"tune": rec}
    targets = prune_model(model, ratios, args.method, calib, nm=nm, damping=args.damping, block_size=args.block_size)
    for name, param in model.named_parameters():  # nothing non-finite is measured or saved
        require_finite(param, f"the pruned model's {name}")
    achieved, per_module = achieved_sparsity(model)
    record = {
        "model": lm.name,
        "method": args.method,
        "allocation": allocation,
        "target_sparsity": target,
        "mean_achieved": float(np.average(achieved, weights=weights)),
        "layers": list(range(len(blocks))),
        "sparsity": [float(r) for r in ratios],
        "achieved": [float(a) for a in achieved],
        "metric": None if metric is None else [float(m) for m in metric],
        "prunable_params": [int(w) for w in weights],
        "modules": {name: {"target": targets[name], "achieved": per_module[name]} for name in targets},
        "seconds": round(time.time() - t0, 2),
        "calibration": {"calib": args.calib, "eval": args.eval, "n_calib": args.n_calib, "seqlen": args.seqlen,
                        "size": calibration_size},
        **extra,
        "args": asdict(args),
        "version": __version__,
    }
    lines = [
        f"{lm.name} · {args.method} · allocation {allocation} · target {target:g} · "
        f"achieved {record['mean_achieved']:.4f} · {record['seconds']:.1f} s",
        block_table(record["layers"], ratios, achieved, None if "search" in extra else metric),
    ]
    if "search" in extra:
        s = extra["search"]
        lines.append(f"search from {s['start']}: KL to dense {s['start_fitness']:.4g} → {s['fitness']:.4g} in "
                     f"{s['evaluations']} evaluations ({s['seconds']:.0f} s); level database {s['database']['path']} "
                     f"({s['database']['bytes'] / 1e6:.1f} MB, built in {s['database']['build_seconds']:.0f} s); "
                     f"trajectory in {args.search_dir}/search.png")
    if "tune" in extra:
        lines.append(tune_line(extra["tune"]))
    if held_out is not None:
        text, most = held_out
        record["perplexity"] = require_finite(perplexity(model, lm.tokenizer, text, seqlen=args.seqlen,
                                                         max_windows=most), "the perplexity")
        lines.append(f"perplexity on at most {most} windows of {args.eval}: {record['perplexity']:.3f}")
    if records is not None:
        record["accuracy"] = mc_accuracy(model, lm.tokenizer, records, batch_size=args.batch_size)
        lines.append(f"accuracy on {args.task} ({len(records)} items, multiple choice): {record['accuracy']:.3f}")
    if lm_eval_tasks:
        from ..lm_eval_io import summary, table

        results = args.lm_eval(model, lm.tokenizer, lm_eval_tasks)
        record["lm_eval"] = {**summary(results), "documents": {t: r["n"] for t, r in results.items()}}
        lines.append(table(results))
    if args.save is not None:
        recipe = llmcompressor_recipe(args.method, ratios, prefix, nm, args.damping, args.block_size)
        dest = save_pruned(model, lm.tokenizer, args.save, record, recipe, args.overwrite, args.model)
        lines.append(f"wrote {dest}/ (model.safetensors, tokenizer, allocation.json{', recipe.yaml' if recipe else ''})")
    return "\n".join(lines)


register("prune", PruneArgs, run,
         "prune a model with per-layer sparsity from LayerIF scores or a baseline allocation")
