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
from ..options import DataOptions, EngineOptions, LissaOptions, ModelOptions, RunOptions, StabilityOptions, option
from ..io import overwrite_field
from ..scores import ScoreArgs, ScoreConfig, load_checked, score, validate
from ..report import Block, heading, image, paragraph, run_section, table_block
from ..results import read_json
from ..stability import CONDITIONAL, cross_vs_within, fmt
from .base import register
from .compare import Comparison
from .score import write

RESERVED = {"spearman.csv", "task_heatmap.png", "comparison.json", "config.json", "report.md", "report.html"}
"""The comparison's own files in --out: no task label may name its score folder like one of them."""


@dataclass
class CompareTasksArgs(LissaOptions, StabilityOptions, RunOptions, EngineOptions, DataOptions, ModelOptions):
    """Score one model on several tasks and compare the block profiles."""

    tasks: list[str] = option([], "at least two, comma-separated: built-in task names or TRAIN:VAL record files, each "
                                  "optionally prefixed LABEL= (e.g. arith,capitals,mine=a.jsonl:b.jsonl)")
    out: str = option("out/compare-tasks", "output folder (one score subfolder per task)")
    overwrite: bool = overwrite_field()
    split_half: bool = option(True, "score two disjoint halves of every task's train records separately (recomputed) "
                                    "and compare the cross-task Spearman with each task's split-half reliability "
                                    "(--no-split-half: skip)")


def task_args(args: CompareTasksArgs, **changes) -> ScoreArgs:
    """The arguments of one task's ``layerif score`` run (its folder is a score folder, replayable as such):
    the comparison's options, which are all score options, plus ``changes`` (the task's data and folder)."""
    names = {f.name for f in fields(ScoreArgs)}
    return ScoreArgs(**{k: getattr(args, k) for k in names if hasattr(args, k)} | changes)


def task_specs(args: CompareTasksArgs) -> list[tuple[str, ScoreArgs, ScoreConfig]]:
    """(label, per-task ScoreArgs writing into ``out/<label>``, its checked configs) for every ``--tasks`` entry.

    ``NAME`` is a built-in task, ``TRAIN:VAL`` a pair of record files; ``LABEL=``
    names either. Fewer than two tasks, a repeated label, an unknown task or a
    missing file is a :class:`UserError`.
    """
    if len(args.tasks) < 2:
        raise UserError(f"--tasks needs at least two tasks to compare (got {len(args.tasks)}: {','.join(args.tasks)})")
    if args.target == "lora" and args.finetune_steps > 0:
        raise UserError("--target lora with --finetune-steps would fine-tune the same adapters on each task in turn; "
                        "run `layerif score` per task instead")
    out: list[tuple[str, ScoreArgs, ScoreConfig]] = []
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
        if folder.startswith(".") or folder in RESERVED:  # `..` would write outside --out, `.` into it
            raise UserError(f"task label {label!r} cannot name a folder inside --out (it starts with a dot or is one "
                            "of the comparison's own files); name the entry LABEL=... with letters or digits")
        if folder in {f for f, _, _ in out}:
            raise UserError(f"task label {label!r} appears twice in --tasks (name entries LABEL=...)")
        a = task_args(args, out=str(Path(args.out) / folder), **changes)
        out.append((folder, a, validate(a, None)))  # the folder is written inside --out's staging folder (run)
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
        lm, _ = load_checked(*(a for _, a, _ in specs))  # once, for every task; all records checked first
        return _score_tasks(args, specs, lm, cmp)


def _score_tasks(args: CompareTasksArgs, specs: list[tuple[str, ScoreArgs, ScoreConfig]], lm, cmp: Comparison) -> str:
    """Score every task into ``out/<label>``, then the comparison files; returns the summary."""
    scores, meta, stab, halves, layers = {}, {}, {}, {}, []
    for label, a, config in specs:
        progress.info(f"task {label}")
        result = score(a, lm=lm, cache=cmp.state / label, config=config)
        write(result, a, cmp.out / label)
        shutil.rmtree(cmp.state / label, ignore_errors=True)
        scores[label], meta[label], layers = result.score, result.meta, result.layers
        boot = result.meta.get("stability", {}).get("bootstrap")
        stab[label] = boot["rank_stability"] if boot else None
        halves[label] = result.meta.get("stability", {}).get("split_half")
    labels = [label for label, _, _ in specs]
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


# ----------------------------------------------------------------------------- the report


def _compare_tasks_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    doc = read_json(folder / "comparison.json")
    tasks, layers = doc["tasks"], doc["layers"]
    title = f"layerif compare-tasks: {doc.get('model')} on {', '.join(tasks)}"
    rho = doc["spearman"]
    pairs = sorted(((rho[i][j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))),
                   key=lambda x: -(x[0] if x[0] is not None else -2))
    reading = []
    if len(pairs) == 1:
        reading.append(f"Tasks {pairs[0][1]} and {pairs[0][2]} rank the blocks at Spearman {fmt(pairs[0][0], 2)} "
                       "(1: the same order, 0: unrelated, −1: reversed).")
    elif pairs:
        best, worst = pairs[0], pairs[-1]
        reading.append(f"Most alike: {best[1]} and {best[2]} (Spearman {fmt(best[0], 2)}); most different: {worst[1]} "
                       f"and {worst[2]} (Spearman {fmt(worst[0], 2)}).")
    diff = doc.get("differing_blocks", [])
    if diff:
        reading.append("Blocks that differ most between tasks (share of each task's total S): " + "; ".join(
            f"block {d['block']} ({100 * d['share'][d['max_task']]:.0f}% in {d['max_task']} vs "
            f"{100 * d['share'][d['min_task']]:.0f}% in {d['min_task']})" for d in diff[:3]) + ".")
    cvw = [c for c in doc.get("cross_vs_within", []) if c["ceiling"] is not None and c["spearman"] is not None]
    if cvw:
        below = [c for c in cvw if c["spearman"] < c["ceiling"] - 0.1]
        reading.append("Against each task's own noise: two tasks with the same underlying profile would correlate at "
                       "about √(r_a r_b), where r is a task's recomputed split-half Spearman, Spearman–Brown corrected "
                       "to the full size. " + "; ".join(
                           f"{c['a']}–{c['b']} {fmt(c['spearman'], 2)} vs {fmt(c['ceiling'], 2)}" for c in cvw) + ". "
                       + (("Well below (by > 0.1), so a real task difference beyond sampling noise: "
                           + ", ".join(f"{c['a']}–{c['b']}" for c in below) + ".") if below else
                          "No pair is more than 0.1 below its bound: the profiles do not differ beyond sampling noise."))
    else:
        reading.append("No within-task split-half reliability was measured (it is on by default; `--no-split-half` "
                       "turns it off): without it a low cross-task correlation may be sampling noise rather than a "
                       "task difference.")
    stab = {t: s for t, s in doc.get("rank_stability", {}).items() if s is not None}
    if stab:
        reading.append(f"Bootstrap rank stability ({CONDITIONAL}; it resamples only which samples are summed, so it "
                       "is biased toward 1 and is not comparable with the cross-task Spearman): "
                       + ", ".join(f"{t} {s:.2f}" for t, s in stab.items()) + ".")
    blocks = [heading(title, 1), heading("Reading"), *map(paragraph, reading), *run_section(folder, config),
              heading("Share of S per block and task"),
              paragraph("Each task's S_l divided by its sum over blocks, so tasks with different loss scales compare."),
              table_block(["block", *tasks], [[l, *(f"{100 * doc['share'][t][i]:.1f}%" for t in tasks)]
                                         for i, l in enumerate(layers)])]
    if (folder / "task_heatmap.png").exists():
        blocks.append(image("task_heatmap.png", "block × task heatmap of the share of S"))
    blocks += [heading("Pairwise Spearman correlation of the block rankings"),
               table_block(["", *tasks], [[t, *(fmt(x, 3) for x in rho[i])] for i, t in enumerate(tasks)])]
    if diff:
        blocks += [heading("Blocks that differ most"),
                   table_block(["block", "spread", "highest", "lowest"],
                          [[d["block"], f"{100 * d['spread']:.1f} pts", d["max_task"], d["min_task"]] for d in diff])]
    if cvw:
        blocks += [heading("Cross-task Spearman against within-task reliability"),
                   paragraph("r: the task's recomputed split-half Spearman (each half scored with its own λ and Hessian "
                      "approximation), Spearman–Brown corrected; bound √(r_a r_b): the correlation two tasks with the "
                      "same profile would show; disattenuated: Spearman / bound."),
                   table_block(["task a", "task b", "Spearman", "r_a", "r_b", "bound", "disattenuated"],
                          [[c["a"], c["b"], fmt(c["spearman"], 3), fmt(c["within_a"], 3), fmt(c["within_b"], 3),
                            fmt(c["ceiling"], 3), fmt(c["disattenuated"], 3)] for c in cvw])]
    blocks += [heading("Per-task results"),
               paragraph(", ".join(f"{t}: `{doc['folders'][t]}/report.md`" for t in tasks))]
    return title, blocks


register("compare-tasks", CompareTasksArgs, run, "score one model on several tasks and compare the block profiles",
         report=_compare_tasks_blocks)
