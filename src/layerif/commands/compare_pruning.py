"""``layerif compare-pruning``: allocations × pruners × sparsities over calibration seeds, through the harness."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import allocate, progress
from ..allocate import COMPARE_SPARSITY, check_sparsity, search_start
from ..errors import UserError
from ..evaluate import mc_correct, window_nll
from ..io import overwrite_field, pyplot, write_json
from ..models import BlockTokens, find_blocks
from ..datasets_io import preload
from ..options import ModelOptions, fill_calibration_size, option
from ..measure import PRUNER_MEASURED, Sources
from ..prune import achieved_sparsity, prunable_modules, prunable_params, prune_model
from ..prune_allocation import Measurement, block_sparsity_for
from ..search import write_search
from ..results import block_scores, read_config, read_json, read_scores
from ..tasks import test_records
from .base import register
from ..lm_eval_io import item_lists, lm_eval_keys, summary
from .compare import (Comparison, Metric, cell, count_verdict, group, lm_eval_metrics, lm_eval_tables,
                      paired_section, parse_list, read_rows, stats)
from .prune import PruningOptions, eval_text, fitness_windows, task_records, windows

FIELDS = ("method", "sparsity", "allocation", "seed", "achieved", "perplexity", "accuracy", "seconds",
          "alloc_seconds", "alloc_tokens")
NUMERIC = ("sparsity", "achieved", "perplexity", "accuracy", "seconds", "alloc_seconds", "alloc_tokens")
METRICS = (Metric("accuracy", True, 3, "accuracy"), Metric("perplexity", False, 3, "perplexity"))
ITEMS = {"accuracy": "correct", "perplexity": "nll"}


@dataclass
class CompareArgs(PruningOptions, ModelOptions):
    """Compare allocations (uniform, OWL, AlphaPruning, LayerIF both ways) × pruners × sparsities over seeds."""

    allocations: list[str] = option(list(COMPARE_SPARSITY), "allocations to compare (also sensitivity and search-START, "
                                                            "the search from START: uniform, layerif, owl, alpha)")
    methods: list[str] = option(["wanda", "sparsegpt"], "pruners")
    sparsities: list[str] = option(["0.5", "0.6", "0.7"], "target sparsities")
    seeds: list[str] = option(["0", "1", "2"], "calibration seeds (at least 3 for mean ± std)")
    eval_windows: int = option(64, "held-out perplexity windows (0: all)")
    task: str | None = option(None, "built-in task, lm-eval:NAME or JSONL file of {prompt, options, answer} records "
                                    "for accuracy "
                                    "(default: the task of --scores, else capitals)")
    resume: bool = option(False, "keep the rows of an earlier run with the same options in --out")
    pairs: list[str] = option([], "more paired comparisons for comparison.md, A:B each (A − B, both among "
                                  "--allocations), e.g. layerif:atp; a --resume run may change them")
    out: str = option("out/compare-pruning", "output folder")
    overwrite: bool = overwrite_field()


def markdown(rows: list[dict], meta: dict, asked: Sequence[tuple[str, str]] = ()) -> str:
    """comparison.md: one table per pruner (mean ± std over seeds, best in bold), the summary of best means,
    and the paired differences where the rows keep their per-item results: of the LayerIF allocations, of each
    search and tuned allocation against its references, and the ``asked`` (allocation, reference) pairs."""
    dense = next((r for r in rows if r["allocation"] == "dense"), None)
    lines = [f"# Pruning allocations on {meta['model']}", "",
             "Mean ± standard deviation over calibration seeds; bold: the best allocation at that sparsity.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    if dense:
        lines.append(f"- dense model: perplexity {dense['perplexity']:.3f}, accuracy {dense['accuracy']:.3f}")
    settings = group([r for r in rows if r["allocation"] != "dense"], lambda r: (r["method"], r["sparsity"]))
    acc, ppl = METRICS
    extra = lm_eval_metrics(rows)
    for method in dict.fromkeys(m for m, _ in settings):
        lines += ["", f"## {method}", "", "| sparsity | allocation | achieved | perplexity ↓ | accuracy ↑ | seeds |",
                  "|---:|---|---:|---:|---:|---:|"]
        for sp in sorted(sp for m, sp in settings if m == method):
            arms = settings[(method, sp)]
            st = stats(arms, ["achieved", "perplexity", "accuracy"])
            for a in arms:
                lines.append(f"| {sp:g} | {a} | {st[a]['achieved'][0]:.4f} | {cell(st, a, ppl)} | {cell(st, a, acc)} | "
                             f"{len(arms[a])} |")
    if extra:
        lines += lm_eval_tables(settings, extra, lambda k: f"{k[0]} {k[1]:g}", dense)
    lines += count_verdict(settings, METRICS)
    subjects = [a for a in dict.fromkeys(r["allocation"] for r in rows)
                if a in allocate.ALLOCATIONS or allocate.parse_label(a)[0] in allocate.ALLOCATIONS]
    searched = [a for a in subjects if a.startswith(allocate.SEARCH)]
    # each search against its own start, and every other start against the uniform start (equal evaluations)
    # (and against sensitivity, the measured one-shot allocation a search should beat)
    pairs = [(a, search_start(a)) for a in searched]
    pairs += [(a, allocate.SEARCH + "uniform") for a in searched if a != allocate.SEARCH + "uniform"]
    pairs += [(a, "sensitivity") for a in searched]
    pairs += [(a, untuned(a)) for a in subjects if allocate.get(a, "sparsity")[0].tuned is not None]  # tuned vs default
    pairs += [p for p in asked if p not in pairs]
    lines += paired_section(settings, (*METRICS, *extra), {**ITEMS, **{m.key: m.key for m in extra}},
                            baselines=[a for a in subjects if allocate.get(a, "sparsity")[0].metric != "scores"],
                            subjects=[a for a in subjects if allocate.get(a, "sparsity")[0].metric == "scores"],
                            label=lambda k: f"{k[0]} {k[1]:g}", pairs=pairs)
    lines += cost_table(rows)
    return "\n".join(lines) + "\n"


def cost_table(rows: list[dict]) -> list[str]:
    """The cost section of comparison.md: per allocation, the mean over its runs of the seconds spent choosing
    the per-block sparsity (metric, tuning, search; not the final prune and evaluation) and of the tokens the
    model's blocks processed for it, in whole-model passes (:class:`layerif.models.BlockTokens`)."""
    runs = group([r for r in rows if r["allocation"] != "dense" and "alloc_seconds" in r], lambda r: 0).get(0, {})
    if not runs:
        return []
    lines = ["", "## Cost of each allocation", "",
             "Mean per run of the time spent choosing the per-block sparsity (the metric, a --tune grid, a search "
             "and its level database; not the final prune and evaluation) and of the tokens the decoder blocks "
             "processed for it, in whole-model forward passes. A metric measured once per calibration seed (OWL's "
             "outliers, DLP, a level database) is charged to the first run that needs it.", "",
             "| allocation | seconds | forward tokens (thousands) | runs |", "|---|---:|---:|---:|"]
    for a, rs in runs.items():
        lines.append(f"| {a} | {np.mean([r['alloc_seconds'] for r in rs]):.1f} | "
                     f"{np.mean([r['alloc_tokens'] for r in rs]) / 1e3:.1f} | {len(rs)} |")
    return lines


def parse_pairs(values: Sequence[str], allocations: Sequence[str]) -> list[tuple[str, str]]:
    """``--pairs`` as (allocation, reference) tuples; a value that is not ``A:B`` of two different
    ``allocations`` is a :class:`UserError`."""
    pairs = []
    for value in dict.fromkeys(values):
        parts = value.split(":")
        if len(parts) != 2 or parts[0] == parts[1]:
            raise UserError(f"--pairs: {value!r} is not ALLOCATION:REFERENCE of two different allocations")
        missing = [p for p in parts if p not in allocations]
        if missing:
            raise UserError(f"--pairs: {missing[0]!r} is not among --allocations ({', '.join(allocations)})")
        pairs.append((parts[0], parts[1]))
    return pairs


def with_tuned(allocations: list[str]) -> list[str]:
    """``--tune``: each allocation with a hyper-parameter grid followed by its ``NAME-tuned`` arm (once)."""
    out: list[str] = []
    for a in allocations:
        rule = allocate.get(a, "sparsity")[0]
        out += [a] + ([allocate.tuned_label(a)] if rule.tune and rule.tuned is None else [])
    return list(dict.fromkeys(out))


def grid_text(grid: tuple[dict[str, float], ...]) -> str:
    """A hyper-parameter grid as text: ``ε ∈ {0.02, 0.05}`` style per key (a joint grid: each key's values)."""
    keys = dict.fromkeys(k for c in grid for k in c)
    return " × ".join(f"{k} ∈ {{{', '.join(f'{v:g}' for v in dict.fromkeys(c[k] for c in grid))}}}" for k in keys)


def untuned(label: str) -> str:
    """The default arm of a ``NAME-tuned`` (``-reversed``) label: ``NAME`` (``-reversed``)."""
    name, rev = allocate.parse_label(label)
    return allocate.ALLOCATIONS[name].tuned + (allocate.REVERSED if rev else "")


def plot(rows: list[dict], title: str):
    """Perplexity and accuracy against sparsity, one line per allocation (mean ± std), one column per pruner.

    Perplexity is on a log scale when it spans more than a factor 3; the lines
    are shifted slightly along x so their error bars do not hide each other.
    """
    pruned = [r for r in rows if r["allocation"] != "dense"]
    settings = group(pruned, lambda r: (r["method"], r["sparsity"]))
    methods = list(dict.fromkeys(m for m, _ in settings))
    allocs = list(dict.fromkeys(r["allocation"] for r in pruned))
    dense = next((r for r in rows if r["allocation"] == "dense"), None)
    sps_all = sorted({sp for _, sp in settings})
    step = 0.15 * min(np.diff(sps_all), default=0.1) / max(len(allocs) - 1, 1)
    fig, axes = pyplot().subplots(2, len(methods), figsize=(5 * len(methods), 7), squeeze=False)
    for col, method in enumerate(methods):
        for j, alloc in enumerate(allocs):
            sps = sorted(sp for m, sp in settings if m == method and alloc in settings[(m, sp)])
            x = [sp + (j - (len(allocs) - 1) / 2) * step for sp in sps]
            for row, key in enumerate(("perplexity", "accuracy")):
                ms = [stats({alloc: settings[(method, sp)][alloc]}, [key])[alloc][key] for sp in sps]
                axes[row][col].errorbar(x, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                                        label=alloc)
        for row, key in enumerate(("perplexity", "accuracy")):
            ax = axes[row][col]
            if dense:
                ax.axhline(dense[key], color="grey", linestyle="--", label="dense")
            values = [r[key] for r in pruned if r["method"] == method]
            if key == "perplexity" and min(values) > 0 and max(values) / min(values) > 3:
                ax.set_yscale("log")
            ax.set_xticks(sps_all)
            ax.set_xlabel("target sparsity")
            ax.set_ylabel(key)
            ax.set_title(method)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def smooth_note(smooth: bool, allocations: list[str]) -> str:
    """The --smooth line of comparison.md: smoothing applies to every allocation with a per-block metric
    (:attr:`layerif.allocate.Allocation.smoothable`; a search to its start), and which allocations have none."""
    if not smooth:
        return "no (no allocation's metric is smoothed)"
    rules = {a: allocate.get(a, "sparsity")[0] for a in allocations}
    starts = {a: allocate.ALLOCATIONS[search_start(a)] for a, r in rules.items() if r.metric == "search"}
    without = [a for a, r in rules.items() if not starts.get(a, r).smoothable]
    return ("Savitzky-Golay (7, 3) on the metric of every allocation that has a per-block metric (a search: its start)"
            + (f"; {', '.join(without)} have none, so nothing to smooth" if without else ""))


GRID = ("allocations", "methods", "sparsities", "seeds")  # options --resume may change: the runs to add
REPORT = ("pairs",)  # options --resume may change: what comparison.md shows


PATHS = ("out", "model", "scores", "task", "text")  # options that may name a file or folder


def _same_option(name: str, saved: Any, given: Any) -> bool:
    """Whether an option's value of the earlier run equals this run's: paths (:data:`PATHS`) by the file they
    name (``./X`` is ``X``; ``--out`` also when it does not exist yet), everything else as given."""
    if saved == given:
        return True
    if name not in PATHS or not isinstance(saved, str) or not isinstance(given, str):
        return False
    a, b = Path(saved), Path(given)
    return (name == "out" or (a.exists() and b.exists())) and a.resolve() == b.resolve()


def _resumed(args: CompareArgs, dest: Path, state: Path) -> dict:
    """``--resume``: ``{"rows", "searches"}`` of an interrupted run (its cache ``state``) or of the finished
    result at ``dest``, if that run used the same options but for the grid (:data:`GRID`: the grid may
    grow, every earlier row is kept); empty when neither exists. Rows keep their per-item results (items.json)."""
    for folder in (state, dest):
        if not (folder / "comparison.csv").exists():
            continue
        try:
            saved = read_config(folder)["args"]
        except UserError:
            raise UserError(f"--resume: {folder}/config.json is missing or unreadable") from None
        differ = [k for k, v in asdict(args).items()
                  if k not in ("resume", "overwrite", *REPORT, *GRID) and not _same_option(k, saved.get(k), v)]
        if differ:
            raise UserError(f"--resume: the earlier run in {dest} used other options ({', '.join(differ)})")
        rows = read_rows(folder / "comparison.csv", NUMERIC)
        for r in rows:  # the lm-eval columns
            r.update({k: float(v) for k, v in r.items() if k.startswith("lm_eval/")})
        items = read_json(folder / "items.json", "items") if (folder / "items.json").exists() else {}
        for r in rows:
            key = "|".join(str(r[k]) for k in FIELDS[:4])
            if key in items:
                r["items"] = items[key]
        searches = read_json(folder / "search.json", "search") if (folder / "search.json").exists() else {}
        tunings = read_json(folder / "tuning.json", "tuning") if (folder / "tuning.json").exists() else {}
        return {"rows": rows, "searches": searches, "tunings": tunings}
    return {"rows": [], "searches": {}, "tunings": {}}


def run(args: CompareArgs) -> str:
    """``layerif compare-pruning``: every allocation × pruner × sparsity × seed; writes csv, md and a plot."""
    allocations = parse_list(args.allocations, str, "allocations")
    allocations = with_tuned(allocations) if args.tune else allocations
    methods = parse_list(args.methods, str, "methods")
    sparsities = parse_list(args.sparsities, float, "sparsities")
    seeds = parse_list(args.seeds, int, "seeds")
    pairs = parse_pairs(args.pairs, allocations)
    args, size = fill_calibration_size(args, args.CPU_CALIBRATION)  # config.json keeps the values used
    rules = {a: allocate.get(a, "sparsity")[0] for a in allocations}
    for sp in sparsities:
        check_sparsity(sp)
    starts = [search_start(a, a) for a in allocations]  # a search-best tries the LayerIF start only with --scores
    needs_scores = any(s != allocate.BEST and allocate.get(s, "sparsity")[0].metric == "scores" for s in starts)
    args.check(methods, "the layerif allocations need" if needs_scores else "")
    if any(r.metric == "search" for r in rules.values()):
        args.search_config(0, sparsities)  # the level bounds against every target, before the model loads
        if "search" in allocations:
            raise UserError("compare-pruning runs searches as search-START (e.g. search-uniform, search-layerif)")
    records = task_records(args.task, args.task_items, args.allow_repeats, args.lm_eval_include)  # a bad --task
    lm_eval_tasks = args.lm_eval_names()  # fails before any output, as does a bad --lm-eval-tasks
    if args.scores is not None:
        read_scores(args.scores)  # a bad scores file too
    preload(args.calib, "calib", args.text_field)  # a failed download or a file without --text-field too
    held_out = eval_text(args, args.eval_windows or None)
    fields = FIELDS + tuple(lm_eval_keys(lm_eval_tasks))
    with Comparison("compare-pruning", args, fields, FIELDS[:4], args.overwrite or args.resume) as cmp:
        state = cmp.state  # rows, searches and level databases of finished runs, for --resume
        resumed = _resumed(args, cmp.dest, state) if args.resume else {"rows": [], "searches": {}, "tunings": {}}
        rows: list[dict] = resumed["rows"]
        state.mkdir(exist_ok=True)
        if args.resume and (cmp.dest / "levels").is_dir() and not (state / "levels").exists():
            shutil.copytree(cmp.dest / "levels", state / "levels")  # the finished run's level databases
        cmp.write_config(state)
        md, lm, task = _runs(args, cmp, rows, resumed["searches"], resumed["tunings"], records, allocations, methods,
                             sparsities, seeds, held_out, size, lm_eval_tasks, pairs)
        cmp.save_rows(rows)
        return cmp.finish({"comparison.md": md, "comparison.png": plot(rows, f"{lm.name} · task {task}")}, md)


def _runs(args: CompareArgs, cmp: Comparison, rows: list[dict], searches: dict, tunings: dict, records,
          allocations: list[str], methods: list[str], sparsities: list[float], seeds: list[int],
          held_out: tuple[str, int | None], size: str, lm_eval_tasks: list[str],
          pairs: list[tuple[str, str]]):
    """Every run not in ``rows`` yet (rows, items, searches and ``--tune`` records saved into the cache after each);
    ``held_out``: the perplexity text and its window cap, ``size``: which calibration size defaults applied;
    ``lm_eval_tasks``: the lm-eval tasks every model is also evaluated on (per-document results kept, like the
    accuracy's); ``pairs``: the ``--pairs`` comparisons.
    Returns (comparison.md, the model, the task)."""
    state = cmp.state
    rules = {a: allocate.get(a, "sparsity")[0] for a in allocations}
    lm = args.load()
    model, tok = lm.model, lm.tokenizer
    _, blocks = find_blocks(model)
    scores, doc = block_scores(args.scores, len(blocks)) if args.scores else (None, {})
    task = args.task or doc.get("task") or "capitals"
    records = records or test_records(task, args.task_items, allow_repeats=args.allow_repeats,
                                      include=args.lm_eval_include)
    eval_text, max_windows = held_out
    meta = {"model": lm.name, "task": f"{task} ({len(records)} test items, multiple choice)",
            "scores": f"{args.scores} (task {doc.get('task')}, target {doc.get('target')})" if args.scores else "none",
            "perplexity": f"{args.eval}, {args.seqlen}-token windows, at most {max_windows or 'all'}",
            "calibration": f"{args.calib}, {args.n_calib} windows of {args.seqlen} tokens per seed ({size})",
            "seeds": "",
            "epsilon": args.epsilon, "smooth": smooth_note(args.smooth, allocations)}
    if lm_eval_tasks:
        meta["lm-eval"] = (f"{', '.join(lm_eval_tasks)} (zero-shot, lm-eval's HFLM on the in-memory model"
                           f"{f', first {args.lm_eval_limit} documents' if args.lm_eval_limit else ''})")
    if any(rules[a].metric in PRUNER_MEASURED or rules[a].tuned for a in allocations):
        meta["fitness"] = (f"KL to the dense model on {args.search_windows} windows of {args.calib} per seed, drawn "
                           "apart from that seed's calibration windows (search, sensitivity, NAME-tuned)")
    tuned = dict.fromkeys(rules[a].tuned for a in allocations if rules[a].tuned)
    if tuned:
        meta["tuning"] = "; ".join(f"{name} {grid_text(allocate.ALLOCATIONS[name].tune)}" for name in tuned) + \
            " (the least KL wins; choices and KL values in tuning.json)"

    def evaluate() -> dict:
        nll = window_nll(model, tok, eval_text, seqlen=args.seqlen, max_windows=max_windows, batch_size=args.batch_size)
        correct = [float(c) for c in mc_correct(model, tok, records, batch_size=args.batch_size)]
        results = args.lm_eval(model, tok, lm_eval_tasks)
        return {"perplexity": math.exp(math.fsum(nll) / len(nll)), "accuracy": sum(correct) / len(correct),
                **(summary(results) if results else {}),
                "items": {"nll": nll, "correct": correct, **(item_lists(results) if results else {})}}

    done = {(r["method"], r["sparsity"], r["allocation"], r["seed"]) for r in rows}
    if ("dense", 0.0, "dense", "-") not in done:
        t0 = time.time()
        rows.append({"method": "dense", "sparsity": 0.0, "allocation": "dense", "seed": "-", "achieved": 0.0,
                     **evaluate(), "seconds": round(time.time() - t0, 2), "alloc_seconds": 0.0, "alloc_tokens": 0.0})
        cmp.save_rows(rows, state)
    mods = prunable_modules(model)
    dense = {name: mod.weight.detach().clone() for name, (_, mod) in mods.items()}
    weights = prunable_params(model)
    metrics: dict = {}  # the metrics measured on the dense model (per seed for the calibrated ones)
    calib: dict[int, torch.Tensor] = {}  # seed -> calibration windows
    fitness: dict[int, torch.Tensor] = {}  # seed -> KL windows of search, sensitivity and --tune
    todo = [(seed, m, sp, a) for seed in seeds for m in methods for sp in sparsities for a in allocations
            if (m, sp, a, str(seed)) not in done]
    for seed, method, sp, label in progress.track(todo, desc="compare-pruning", unit="run"):
        t0 = time.time()
        rule = rules[label]
        if seed not in calib:
            calib[seed] = windows(tok, args, args.n_calib, seed)
        measurement = None
        if rule.metric in PRUNER_MEASURED or rule.tuned is not None:
            if seed not in fitness:
                fitness[seed] = fitness_windows(tok, args, seed, calib[seed])
            measurement = Measurement(method, fitness[seed], state / "levels",
                                      args.search_config(seed) if rule.metric == "search" else None,
                                      damping=args.damping, block_size=args.block_size, batch_size=args.batch_size,
                                      model_name=lm.name)
        src = Sources(model, scores, windows=calib[seed], owl_m=args.owl_m, seed=seed, cache=metrics)
        t1 = time.time()
        with BlockTokens(model) as cost:  # the allocation's own cost: a metric cached for the seed counts once
            ratios, _, rec = block_sparsity_for(label, src, sp, weights, args.sparsity_options(),
                                                measurement=measurement)
        alloc = {"alloc_seconds": round(time.time() - t1, 2), "alloc_tokens": cost.tokens}
        if rule.metric == "search":
            searches[f"{method} {sp:g} seed {seed} from {search_start(label)}"] = rec
            write_search(state, searches, f"{lm.name}: search fitness by evaluations")
        if rule.tuned is not None:
            tunings[f"{method} {sp:g} seed {seed} {label}"] = rec
            write_json(state / "tuning.json", tunings)
        prune_model(model, ratios, method, calib[seed], damping=args.damping, block_size=args.block_size)
        achieved, _ = achieved_sparsity(model)
        rows.append({"method": method, "sparsity": sp, "allocation": label, "seed": str(seed),
                     "achieved": float(np.average(achieved, weights=weights)), **evaluate(),
                     "seconds": round(time.time() - t0, 2), **alloc})
        with torch.no_grad():
            for name, w in dense.items():
                mods[name][1].weight.copy_(w)
        cmp.save_rows(rows, state)
    # every seed of the rows: with --resume they include the earlier runs' seeds
    meta["seeds"] = ", ".join(sorted({str(r["seed"]) for r in rows if r["seed"] != "-"}, key=int))
    if searches:
        write_search(cmp.out, searches, f"{lm.name}: search fitness by evaluations")
    if tunings:
        write_json(cmp.out / "tuning.json", tunings)
    if (state / "levels").exists():  # the level databases belong to the result
        os.replace(state / "levels", cmp.out / "levels")
    return markdown(rows, meta, pairs), lm, task  # also when --resume found nothing left to run: the tables follow the code


register("compare-pruning", CompareArgs, run,
         "compare pruning allocations x pruners x sparsities over calibration seeds")
