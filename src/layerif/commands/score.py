"""``layerif score``: per-block influence scores of a model on a task, and their files."""

from __future__ import annotations

import csv
import io
import json
import shlex
from dataclasses import asdict, fields
from pathlib import Path

from .. import progress, stability
from ..stability import CONDITIONAL, fmt, top_k_blocks
from ..distributed import is_main, process_group, world
from ..data import records_note
from ..io import output_folder, prepare_out_dir, pyplot, write_figure, write_safetensors, write_text
from ..models import resolve_device
from ..plan import fit_check, machine
from ..report import (Block, block_ranges, heading, image, paragraph, run_section, stability_word, table_block,
                      write_report)
from ..results import read_scores, scores_document, write_config, write_scores
from ..scores import AGGREGATIONS, ScoreArgs, ScoreResult, file_key, score, validate
from . import plan
from .base import register


def scores_csv(result: ScoreResult) -> str:
    """scores.csv: one row a block (the column ``layer`` holds the block index)."""
    agg = result.aggregations()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", *map(file_key, AGGREGATIONS)])
    for i, l in enumerate(result.layers):
        w.writerow([l, *(repr(agg[a][i]) for a in AGGREGATIONS)])
    return buf.getvalue()


def table(result: ScoreResult, top: int = 5) -> str:
    """A short terminal table: every block's score with a bar, the top blocks marked."""
    s = result.score
    peak = max(max(abs(x) for x in s), 1e-300)  # bars of the positive scores, as shares of the largest |S_l|
    best = sorted(range(len(s)), key=lambda i: -s[i])[:top]
    lines = [f"{'block':>5}  {'S_l':>11}  {'helpful%':>8}"]
    share = result.aggregations()["helpful_share"]
    for i, l in enumerate(result.layers):
        bar = "#" * int(round(24 * (max(s[i], 0.0) / peak)))
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
    config = validate(args)
    with process_group(resolve_device(args.device)):
        check = fit_check(args, machine(args.device, None, world()[1]))
        if not is_main():
            progress.enable(False)
            score(args, check_plan=check, config=config)
            return ""
        with output_folder(args.out, "score", args.overwrite) as tmp:
            result = score(args, check_plan=check, config=config)
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


# ----------------------------------------------------------------------------- the report


def score_reading(doc: dict) -> list[str]:
    """Plain-language paragraphs on one scores.json: where the helpful influence sits, and how sure that is."""
    layers, s = doc["layers"], doc["score"]
    stab = doc.get("stability") or {}
    total = sum(s)
    if total <= 0:
        return ["No block has helpful influence (every S_l is 0): no train sample lowers the validation loss "
                "through these modules, so there is no ranking to act on."]
    boot, half = stab.get("bootstrap"), stab.get("split_half")
    # the stability checks' k; else a quarter of the blocks, at most 5; never all blocks
    k = max(1, min((boot or half or {}).get("top_k", min(5, len(layers) // 4)), len(layers) - 1))
    top = top_k_blocks(layers, s, k)
    share = sum(s[layers.index(l)] for l in top) / total
    held = (f"{100 * share:.0f}% of the total S in {k} of {len(layers)} blocks (an even spread would give "
            f"{100 * k / len(layers):.0f}%); block {top[0]} alone holds {100 * s[layers.index(top[0])] / total:.0f}%.")
    if share > 0.5:
        out = [f"Blocks {block_ranges(top)} carry most helpful influence for task {doc.get('task')}: {held}"]
    else:
        out = [f"Helpful influence for task {doc.get('task')} is spread out; the top blocks, {block_ranges(top)}, "
               f"hold {held}"]
    if boot:
        rho = boot["rank_stability"]
        sure = [l for l, p in zip(boot["layers"], boot["p_top_k"]) if p >= 0.9]
        unsure = [(l, p) for l, p in zip(boot["layers"], boot["p_top_k"]) if 0.1 <= p < 0.9]
        text = (f"The ranking is {stability_word(rho)} ({fmt(rho, 2)}: mean Spearman correlation of {boot['B']} "
                f"bootstrap resamples of the train records with the full-data ranking, {CONDITIONAL}).")
        if sure:
            text += f" Blocks {block_ranges(sure)} are in the top {k} in at least 90% of the resamples."
        if unsure:
            text += " Uncertain top-{} membership: {}.".format(
                k, ", ".join(f"block {l} ({100 * p:.0f}%)" for l, p in sorted(unsure, key=lambda x: -x[1])))
        out.append(text)
    if half:
        out.append(f"Two disjoint halves of the train records ({half['n_half']} each), scored separately, rank the "
                   f"blocks alike at Spearman {fmt(half['spearman'], 2)} (projected to the full size: "
                   f"{fmt(half['spearman_brown'], 2)}, {stability_word(half['spearman_brown'])}); their top {k} blocks "
                   f"share {100 * half['top_k_overlap']:.0f}%.")
    if boot and half:
        out.append("The bootstrap keeps the estimator's damping and Hessian approximation fixed at their full-data "
                   "values; the split-half check re-estimates them, so where the two disagree, trust the split-half.")
    if not (boot or half):
        out.append("No stability check was run: before pruning or allocating by this ranking, rerun with "
                   "`--bootstrap 200 --split-half`.")
    return out


def validate_command(score_args: dict) -> str:
    """The ``layerif validate`` line that checks a score run's profile: its model, data and target.

    ``score_args``: the run's options (config.json ``args``). ``--target lora`` becomes the adapted modules
    (validate trains and prunes the base projections)."""
    a = score_args
    target = a.get("target")
    if target == "lora":
        target = ",".join(a.get("lora_modules") or ["q_proj", "v_proj"])
    parts = ["layerif", "validate"]
    for flag, value in (("--model", a.get("model")), ("--gguf-file", a.get("gguf_file")),
                        ("--task", None if a.get("train") else a.get("task")), ("--train", a.get("train")),
                        ("--val", a.get("val")), ("--target", target)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts + (["--trust-remote-code"] if a.get("trust_remote_code") else []))


def profile_uses(score_args: dict) -> list[str]:
    """What a block profile of ``layerif score`` is evidence for, on the evidence layerif has (``layerif validate``
    on the embedded model), and the command that checks it on the run's own model and task (:func:`validate_command`).

    The one text of report.md / report.html and of the terminal summary of ``layerif score``."""
    return [
        "Supported use: choosing the blocks, and the LoRA capacity per block, to fine-tune (`layerif finetune`, "
        "`layerif moe`). On SmolLM2-135M-Instruct, `layerif validate` found that S_l predicts each block's measured "
        "fine-tune gain on records disjoint from the scoring ones (Spearman ρ 0.50–0.74 for DataInf, exact and "
        "grad-dot on two tasks).",
        "Not supported by evidence: pruning sparsity per block (`layerif prune --allocation layerif`). There S_l did "
        "not predict the cost of pruning a block (loss rise, accuracy change).",
        f"Check both on this model and task: `{validate_command(score_args)}`",
    ]


def _score_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    doc = read_scores(folder)
    stab = doc.get("stability") or {}
    boot, half = stab.get("bootstrap"), stab.get("split_half")
    title = f"layerif score: {doc.get('model')} on {doc.get('task')}"
    run_args = config.get("args", {}) if config else {"task": doc.get("task"), "target": doc.get("target")}
    blocks = [heading(title, 1), heading("Reading"), *map(paragraph, score_reading(doc)),
              heading("What this profile is evidence for"), *map(paragraph, profile_uses(run_args)), *run_section(folder, config)]
    agg = doc.get("aggregations", {})
    headers = ["block", "S_l"]
    if boot:
        headers += [f"{100 * boot['level']:.0f}% interval", "relative width", f"P(top-{boot['top_k']})"]
    headers += ["helpful samples", "sum of I_l"]
    rows = []
    for i, l in enumerate(doc["layers"]):
        row = [l, fmt(doc["score"][i])]
        if boot:
            row += [f"{fmt(boot['ci_low'][i])} – {fmt(boot['ci_high'][i])}", fmt(boot["rel_width"][i], 2),
                    f"{boot['p_top_k'][i]:.2f}"]
        share = agg.get("helpful_share", [None] * len(doc["layers"]))[i]
        row += ["n/a" if share is None else f"{100 * share:.0f}%", fmt(agg.get("sum", [None] * len(doc["layers"]))[i])]
        rows.append(row)
    blocks += [heading("Layer scores"),
               paragraph("S_l = −Σ_i min(I_l(i), 0), the total helpful influence of the train records through block l "
                  "(larger = more important for this task)."),
               table_block(headers, rows)]
    if (folder / "layer_scores.png").exists():
        blocks.append(image("layer_scores.png", "S_l per block" + (" with bootstrap intervals" if boot else "")))
    if boot or half:
        blocks.append(heading("Stability"))
        if boot:
            lo, hi = boot["rank_stability_ci"]
            blocks.append(paragraph(f"Bootstrap: B = {boot['B']} resamples of the train records"
                             f"{' and validation records' if boot['resample_val'] else ''} (seed {boot['seed']}); rank "
                             f"stability {fmt(boot['rank_stability'], 3)} (middle {100 * boot['level']:.0f}% of resamples "
                             f"{fmt(lo, 3)} – {fmt(hi, 3)}; {CONDITIONAL}); full-data top {boot['top_k']}: {boot['top_k_blocks']}."))
        if half:
            blocks += [paragraph(f"Split-half ({half['method']}): halves of {half['n_half']} train records, seed {half['seed']}; "
                          f"Spearman {fmt(half['spearman'], 3)}, Spearman–Brown {fmt(half['spearman_brown'], 3)}, "
                          f"Pearson {fmt(half['pearson'], 3)}, top-{half['top_k']} overlap {half['top_k_overlap']:.2f}."),
                       table_block(["block", "S_l (half A)", "S_l (half B)"],
                              [[l, fmt(a), fmt(b)] for l, a, b in zip(half["layers"], half["score_a"], half["score_b"])])]
        if (folder / "stability.png").exists():
            blocks.append(image("stability.png", "bootstrap top-k probabilities and split-half profiles"))
    lam = list(doc.get("lambda", {}).values())
    facts = [["model", doc.get("model")], ["task", doc.get("task")], ["target", doc.get("target")],
             ["estimator", doc.get("estimator")], ["damping scale c", doc.get("damping_scale")],
             ["records", records_note(doc["records"]) if isinstance(doc.get("records"), dict)
              else f"{doc.get('n_train')} train × {doc.get('n_val')} validation"],
             ["λ over modules", f"{fmt(min(lam))} – {fmt(max(lam))}" if lam else "n/a"],
             ["mode, passes, seconds", f"{doc.get('mode')}, {doc.get('passes')}, {doc.get('seconds')}"]]
    blocks += [heading("Run facts"), table_block(["", ""], facts)]
    return title, blocks


register("score", ScoreArgs, run, "per-layer influence scores of a model on a task", report=_score_blocks)
