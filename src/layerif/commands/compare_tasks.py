"""``layerif compare-tasks``: one model scored on several tasks, the block profiles compared."""

from __future__ import annotations

import csv
import io
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from .. import __version__, progress
from ..compare import compare_profiles, heatmap_figure
from ..errors import UserError
from ..options import DataOptions, EngineOptions, ModelOptions, RunOptions, StabilityOptions, option
from ..io import overwrite_field
from ..scores import ScoreArgs, load_checked, score, validate
from ..stability import CONDITIONAL, cross_vs_within, fmt
from .base import register
from .compare import Comparison
from .score import write


@dataclass
class CompareTasksArgs(StabilityOptions, RunOptions, EngineOptions, DataOptions, ModelOptions):
    """Score one model on several tasks and compare the block profiles."""

    tasks: list[str] = option([], "at least two, comma-separated: built-in task names or TRAIN:VAL record files, each "
                                  "optionally prefixed LABEL= (e.g. arith,capitals,mine=a.jsonl:b.jsonl)")
    out: str = option("out/compare-tasks", "output folder (one score subfolder per task)")
    overwrite: bool = overwrite_field()
    split_half: bool = option(True, "score two disjoint halves of every task's train records separately (recomputed) "
                                    "and compare the cross-task Spearman with each task's split-half reliability "
                                    "(--no-split-half: skip)")


def score_args(args, **changes) -> ScoreArgs:
    """The :class:`ScoreArgs` of a comparison's run: its shared option groups plus ``changes``."""
    names = {f.name for f in fields(ScoreArgs)}
    return ScoreArgs(**{k: getattr(args, k) for k in names if hasattr(args, k)} | changes)


def task_specs(args: CompareTasksArgs) -> list[tuple[str, ScoreArgs]]:
    """(label, per-task ScoreArgs writing into ``out/<label>``) for every ``--tasks`` entry, validated.

    ``NAME`` is a built-in task, ``TRAIN:VAL`` a pair of record files; ``LABEL=``
    names either. Fewer than two tasks, a repeated label, an unknown task or a
    missing file is a :class:`UserError`.
    """
    if len(args.tasks) < 2:
        raise UserError(f"--tasks needs at least two tasks to compare (got {len(args.tasks)}: {','.join(args.tasks)})")
    if args.target == "lora" and args.finetune_steps > 0:
        raise UserError("--target lora with --finetune-steps would fine-tune the same adapters on each task in turn; "
                        "run `layerif score` per task instead")
    out: list[tuple[str, ScoreArgs]] = []
    for spec in args.tasks:
        label, sep, source = spec.partition("=")
        if not sep:
            label, source = "", spec
        if ":" in source:
            train, val = source.split(":", 1)
            if not train or not val:
                raise UserError(f"--tasks entry {spec!r}: use TRAIN:VAL with both files")
            changes = {"train": train, "val": val}
            label = label or Path(train).stem
        else:
            changes = {"task": source, "train": None, "val": None}
            label = label or source
        folder = re.sub(r"[^\w.-]+", "_", label)
        if folder in {f for f, _ in out}:
            raise UserError(f"task label {label!r} appears twice in --tasks (name entries LABEL=...)")
        a = score_args(args, out=str(Path(args.out) / folder), **changes)
        validate(a, None)  # the folder is written inside --out's staging folder (run)
        out.append((folder, a))
    return out


def csv_text(rows: list[list]) -> str:
    """CSV text; floats in full precision (repr), None as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows([["" if x is None else repr(x) if isinstance(x, float) else x for x in r] for r in rows])
    return buf.getvalue()


def csv_matrix(labels: list[str], M: list[list[float | None]]) -> str:
    return csv_text([["task", *labels]] + [[t, *M[i]] for i, t in enumerate(labels)])


def run(args: CompareTasksArgs) -> str:
    """``layerif compare-tasks``: per-task score folders, comparison.json, spearman.csv, task_heatmap.png, report."""
    specs = task_specs(args)
    with Comparison("compare-tasks", args, ()) as cmp:
        lm, _ = load_checked(*(a for _, a in specs))  # once, for every task; all records checked first
        return _score_tasks(args, specs, lm, cmp)


def _score_tasks(args: CompareTasksArgs, specs: list[tuple[str, ScoreArgs]], lm, cmp: Comparison) -> str:
    """Score every task into ``out/<label>``, then the comparison files; returns the summary."""
    scores, meta, stab, halves, layers = {}, {}, {}, {}, []
    for label, a in specs:
        progress.info(f"task {label}")
        result = score(a, lm=lm, cache=cmp.state / label)
        write(result, a, cmp.out / label)
        shutil.rmtree(cmp.state / label, ignore_errors=True)
        scores[label], meta[label], layers = result.score, result.meta, result.layers
        boot = result.meta.get("stability", {}).get("bootstrap")
        stab[label] = boot["rank_stability"] if boot else None
        halves[label] = result.meta.get("stability", {}).get("split_half")
    labels = [label for label, _ in specs]
    profiles = compare_profiles(labels, layers, scores, args.top_k)
    within = {t: (halves[t] or {}).get("spearman_brown") for t in labels}
    doc = {"model": lm.name, "target": args.target, "estimator": args.estimator,
           "sources": dict(zip(labels, args.tasks)), "folders": {t: t for t in labels},
           "task_names": {t: meta[t]["task"] for t in labels}, "n_train": {t: meta[t]["n_train"] for t in labels},
           **profiles, "rank_stability": stab, "rank_stability_note": CONDITIONAL,
           "split_half": halves, "cross_vs_within": cross_vs_within(labels, profiles["spearman"], within),
           "version": __version__}
    cmp.write_config()
    summary = "\n".join([
        f"{lm.name} · {len(labels)} tasks · target {args.target} · estimator {args.estimator}",
        "Spearman of the block rankings:",
        csv_matrix(labels, [[None if x is None else round(x, 3) for x in r] for r in doc["spearman"]]).strip(),
        "blocks differing most: " + ", ".join(f"{d['block']} ({d['max_task']} > {d['min_task']})"
                                               for d in doc["differing_blocks"]),
        *([("within-task split-half reliability (Spearman-Brown): "
            + ", ".join(f"{t} {fmt(within[t], 2)}" for t in labels))] if any(within.values()) else [])])
    files = {"spearman.csv": csv_matrix(labels, doc["spearman"]),
             "task_heatmap.png": heatmap_figure(labels, layers, doc["share"]), "comparison.json": doc}
    return cmp.finish(files, summary) + f" and {len(labels)} score folders"


register("compare-tasks", CompareTasksArgs, run, "score one model on several tasks and compare the block profiles")
