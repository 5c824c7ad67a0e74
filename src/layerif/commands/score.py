"""``layerif score``: per-block influence scores of a model on a task, and their files."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields
from pathlib import Path

from .. import progress, stability
from ..distributed import is_main, process_group, world
from ..data import records_note
from ..io import output_folder, prepare_out_dir, pyplot, write_figure, write_safetensors, write_text
from ..models import resolve_device
from ..plan import fit_check, machine
from ..report import profile_uses, write_report
from ..results import scores_document, write_config, write_scores
from ..scores import AGGREGATIONS, ScoreArgs, ScoreResult, score, validate
from . import plan
from .base import register


def scores_csv(result: ScoreResult) -> str:
    """scores.csv: one row a block (the column ``layer`` holds the block index)."""
    agg = result.aggregations()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "score", *AGGREGATIONS[1:]])
    for i, l in enumerate(result.layers):
        w.writerow([l, repr(agg["helpful"][i]), *(repr(agg[a][i]) for a in AGGREGATIONS[1:])])
    return buf.getvalue()


def table(result: ScoreResult, top: int = 5) -> str:
    """A short terminal table: every block's score with a bar, the top blocks marked."""
    s = result.score
    peak = max(s) or 1.0
    best = sorted(range(len(s)), key=lambda i: -s[i])[:top]
    lines = [f"{'block':>5}  {'S_l':>11}  {'helpful%':>8}"]
    share = result.aggregations()["helpful_share"]
    for i, l in enumerate(result.layers):
        bar = "#" * int(round(24 * s[i] / peak))
        mark = " *" if i in best else ""
        lines.append(f"{l:>5}  {s[i]:>11.4g}  {100 * share[i]:>7.1f}%  {bar}{mark}")
    return "\n".join(lines)


def plot(result: ScoreResult, title: str):
    """layer_scores.png: S_l per block, with the bootstrap intervals when there are any."""
    fig, ax = pyplot().subplots(figsize=(8, 3.2))
    ax.bar(result.layers, result.score, color="#3a6ea5")
    stability.error_bars(ax, result.meta.get("stability"))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("S_l (total helpful influence)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def write(result: ScoreResult, args: ScoreArgs, folder: str | Path | None = None) -> Path:
    """Write scores.json, scores.csv, influence.safetensors, layer_scores.png, config.json into ``folder``
    (default args.out), stability.png with --bootstrap / --split-half, and report.md / report.html
    (:mod:`layerif.report`)."""
    out = prepare_out_dir(folder if folder is not None else args.out)
    doc = scores_document(result, args)
    tensors = {f"layer.{l}": result.influence[l].float() for l in result.layers}
    tensors["train_loss"] = result.train_loss.float()
    write_safetensors(out / "influence.safetensors", tensors,
                      metadata={"scores": json.dumps({k: doc[k] for k in ("model", "task", "target", "estimator")})})
    write_text(out / "scores.csv", scores_csv(result))
    title = (f"{doc['model']} · task {doc['task']} · target {args.target} · {args.estimator} · "
             f"n={doc['n_train']}x{doc['n_val']}")
    write_figure(out / "layer_scores.png", plot(result, title))
    write_config(out, "score", args)
    if result.meta.get("stability"):
        write_figure(out / "stability.png", stability.figure(result.meta["stability"]))
    write_scores(out, doc)
    write_report(out)
    return out


def run(args: ScoreArgs) -> str:
    """``layerif score``: compute, write the files, return the terminal summary.

    Under ``torchrun`` every rank computes its shard and rank 0 writes the files. ``--dry-run`` is
    ``layerif plan`` with these options; a run whose plan does not fit stops before the weights load.
    """
    if args.dry_run:
        names = {f.name for f in fields(plan.PlanArgs)}
        return plan.run(plan.PlanArgs(**{k: v for k, v in asdict(args).items() if k in names}))
    validate(args)
    with process_group(resolve_device(args.device)):
        check = fit_check(args, machine(args.device, None, world()[1]))
        if not is_main():
            progress.enable(False)
            score(args, check_plan=check)
            return ""
        with output_folder(args.out, "score", args.overwrite) as tmp:
            result = score(args, check_plan=check)
            write(result, args, tmp)
        out = Path(args.out)
    m = result.meta
    head = (f"{m['model']} · task {m['task']} · target {args.target} · estimator {args.estimator} · "
            f"{records_note(m['records'])} · {result.passes} pass(es) · {result.seconds:.1f} s")
    stab = stability.summary(m.get("stability"))
    wrote = (f"wrote {out}/scores.json, scores.csv, influence.safetensors, layer_scores.png"
             f"{', stability.png' if stab else ''}, report.md, report.html")
    notes = "\n".join(f"note: {n}" for n in m.get("notes", []))
    uses = "\n".join(u.replace("`", "") for u in profile_uses(asdict(args)))
    return "\n".join(line for line in (head, table(result), stab, notes, uses, wrote) if line)


register("score", ScoreArgs, run, "per-layer influence scores of a model on a task")
