"""``layerif validate``: measure each block's fine-tune gain and pruning sensitivity (:mod:`layerif.validate`)
and test whether the layer scores predict them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import progress
from ..compare import block_influence
from ..data import Fields, pad_id
from ..errors import UserError
from ..io import output_folder, overwrite_field, prepare_out_dir, pyplot, write_figure, write_json, write_text
from ..models import select_targets
from ..options import DataOptions, DataSource, EngineOptions, EstimatorsOptions, GroundTruthOptions, ModelOptions, option
from ..report import (ESTIMATOR_LABEL, TRUTHS, sample_note, spearman_rows, validation_reading, validation_truths,
                      write_report)
from ..results import write_config
from ..engine import memory_budget, module_stats
from ..scores import validate
from ..stability import fmt
from ..validate import Draw, draw_records, ground_truth, load_drawn, records_doc, validation_doc
from .base import register
from .compare_tasks import csv_text, score_args


@dataclass
class ValidateArgs(GroundTruthOptions, EstimatorsOptions, EngineOptions, DataOptions, DataSource, ModelOptions):
    """Measure each block's fine-tune gain and pruning sensitivity and test whether the layer scores predict them."""

    estimators: list[str] = option(["datainf", "exact", "grad-dot"],
                                   "estimators whose S_l are validated, comma-separated (those with a Gram form)")
    out: str = option("out/validate", "output folder")
    overwrite: bool = overwrite_field()


def check_args(args: ValidateArgs) -> tuple[list[str], Draw]:
    """Option checks that need no model; returns the estimators (deduplicated, in order) and the record sets
    (:func:`layerif.validate.draw_records`: too few distinct records is refused here)."""
    validate(score_args(args), "validate")
    names = args.estimator_names()
    if args.target == "lora":
        raise UserError("--target lora is not supported: validate trains and prunes the base projections (use attn, mlp, block or a regex)")
    args.check_ground_truth()
    return names, draw_records(score_args(args), args.gt_n_train, args.gt_n_val)


def compute(args: ValidateArgs, lm=None) -> dict:
    """The validation.json document (the Python API behind ``layerif validate``; no files written)."""
    names, draw = check_args(args)
    sargs = score_args(args)
    lm, train, val, truth_train, truth_val, label, counts = load_drawn(sargs, draw, lm)
    targets = select_targets(lm.model, args.target)
    t0 = time.perf_counter()
    progress.info(f"Gram statistics of {len(targets)} modules: {len(train)} train x {len(val)} validation records")
    stats, _, passes = module_stats(lm.model, targets, train, val, pad_id(lm.tokenizer), False, args.batch_size,
                                    memory_budget(args.max_memory), args.layout)
    influence = {e: block_influence(stats, targets, e, args.damping_scale, args.lissa_iterations, args.lissa_batch,
                                    args.seed) for e in names}
    seconds = time.perf_counter() - t0
    measured = ground_truth(lm, truth_train, truth_val, targets, args, args.seed,
                            (train, val) if args.in_sample else None)
    measured["seconds"] = {"scores": round(seconds, 2), **measured["seconds"]}
    return validation_doc(ground_truth_head(args, lm, label, draw, train, val, passes), influence, measured,
                          args.bootstrap_blocks, args.seed)


def ground_truth_head(args, lm, label: str, draw: Draw, train: list, val: list, passes: int) -> dict:
    """validation.json's head: model, task, target, damping, the record counts and :func:`layerif.validate.records_doc`
    (validate and compare-estimators --validate)."""
    fields = Fields(args.text_field, args.prompt_field, args.completion_field)
    return {"model": lm.name, "task": label, "target": args.target, "damping_scale": args.damping_scale,
            "n_train": len(train), "n_val": len(val), "gt_n_train": len(draw.truth_train.records),
            "gt_n_val": len(draw.truth_val.records), "records": records_doc(draw, args, fields), "passes": passes}


def blockscsv_text(doc: dict) -> str:
    """validation.csv: one row a block, the ground truths (the in-sample ones too when measured) and every
    estimator's S_l."""
    truths = validation_truths(doc)
    names = doc["estimators"]
    shown = [g for g in truths if g in TRUTHS or truths[g] is not None]
    head = ["layer", *shown, *(f"{e}_score" for e in names)]
    rows = [[l, *((truths[g] or [None] * len(doc["layers"]))[i] for g in shown),
             *(doc["scores"][e]["score"][i] for e in names)] for i, l in enumerate(doc["layers"])]
    return csv_text([head] + rows)


def figure(doc: dict):
    """validation.png: each estimator's S_l (share of its total) per block, and the ground truths per block."""
    layers = doc["layers"]
    ps = doc["prune_sensitivity"]
    fig, axes = pyplot().subplots(3, 1, figsize=(9, 7.5), sharex=True)
    ax = axes[0]
    for i, e in enumerate(doc["estimators"]):
        s = torch.tensor(doc["scores"][e]["score"], dtype=torch.float64)
        ax.plot(layers, (s / s.sum() if s.sum() > 0 else s).numpy(), marker="osd^v"[i % 5],
                ls=("-", "--", "-.", ":")[i % 4], ms=4, label=ESTIMATOR_LABEL.get(e, e))
    ax.set_ylabel("share of S_l")
    ax.legend(fontsize=8)
    ax.set_title(f"{doc['model']} · task {doc['task']} · target {doc['target']} · "
                 f"scoring {doc['n_train']}x{doc['n_val']}, ground truth {doc['gt_n_train']}x{doc['gt_n_val']} "
                 f"(out of sample)", fontsize=10)
    ft = doc["fine_tune"]
    axes[1].bar(layers, doc["fine_tune_gain"], color="#3a6ea5", label="out of sample")
    if doc.get("in_sample"):
        axes[1].plot(layers, doc["in_sample"]["fine_tune_gain"], "k.", ms=6, label="in sample")
        axes[1].legend(fontsize=8)
    axes[1].set_ylabel("fine-tune gain\n(val loss drop)")
    axes[1].set_title(f"train block l alone: {ft['steps']} Adam steps, lr {ft['lr']:g}, {ft['batch_size']} records",
                      fontsize=9)
    pr = doc["pruning"]
    axes[2].bar(layers, ps["loss_rise"], color="#a5473a", label="val loss rise")
    axes[2].set_ylabel("pruning loss rise")
    axes[2].set_title(f"prune block l alone: {pr['method']} at {pr['sparsity']:g}", fontsize=9)
    if ps["accuracy_change"] is not None:
        tw = axes[2].twinx()
        tw.plot(layers, ps["accuracy_change"], "k.-", ms=4, label="accuracy change")
        tw.set_ylabel("accuracy change")
        tw.axhline(0, color="k", lw=0.5)
    axes[2].set_xlabel("decoder block")
    for a in axes:
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def validation_files(doc: dict) -> dict:
    """{file name: text, figure or JSON-ready dict}: validation.csv, spearman.csv, validation.png, validation.json."""
    return {"validation.csv": blockscsv_text(doc),
            "spearman.csv": csv_text([["estimator", "aggregation", "ground_truth", "rho", "ci_low", "ci_high",
                                       "claimed_sign", "verdict"]] + spearman_rows(doc)),
            "validation.png": figure(doc), "validation.json": doc}


def write(doc: dict, args: ValidateArgs, folder: str | Path | None = None) -> Path:
    """The :func:`validation_files`, config.json, report.md / report.html into ``folder`` (default args.out)."""
    out = prepare_out_dir(folder if folder is not None else args.out)
    for name, content in validation_files(doc).items():
        if isinstance(content, str):
            write_text(out / name, content)
        elif isinstance(content, dict):
            write_json(out / name, content)
        else:
            write_figure(out / name, content)
    write_config(out, "validate", args)
    write_report(out)
    return out


def run(args: ValidateArgs) -> str:
    """``layerif validate``: measure, correlate, write the files; returns the terminal summary."""
    check_args(args)
    with output_folder(args.out, "validate", args.overwrite) as tmp:
        doc = compute(args)
        write(doc, args, tmp)
    out = Path(args.out)
    lines = [f"{doc['model']} · task {doc['task']} · target {args.target} · {doc['n_train']} train x {doc['n_val']} "
             f"validation · {len(doc['layers'])} blocks · {sum(doc['seconds'].values()):.0f} s",
             sample_note(doc),
             f"{'estimator':>9} {'agg':>8} {'ground truth':>25} {'rho':>6}  interval        verdict"]
    lines += [f"{e:>9} {a:>8} {g:>25} {fmt(r, 2):>6}  [{fmt(lo, 2)}, {fmt(hi, 2)}]  {v}"
              for e, a, g, r, lo, hi, _, v in spearman_rows(doc) if a == "score"]
    lines += validation_reading(doc)[:1]
    lines.append(f"wrote {out}/validation.json, validation.csv, spearman.csv, validation.png, report.md, report.html")
    return "\n".join(lines)

register("validate", ValidateArgs, run,
         "measure each block's fine-tune gain and pruning sensitivity and test whether the layer scores predict them")
