"""``layerif validate``: measure each block's fine-tune gain and pruning sensitivity (:mod:`layerif.validate`)
and test whether the layer scores predict them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import progress
from ..data import Fields
from ..errors import UserError
from ..io import output_folder, overwrite_field, prepare_out_dir, pyplot, write_figure, write_json, write_text
from ..options import DataOptions, DataSource, EngineOptions, EstimatorsOptions, GroundTruthOptions, ModelOptions, option
from ..report import Block, heading, image, paragraph, run_section, table_block, write_report
from ..results import read_json, write_config
from ..engine import EngineConfig
from ..influence import EstimatorConfig
from ..scores import check_data, compute_all, engine_config
from ..stability import fmt
from ..validate import Draw, draw_records, ground_truth, load_drawn, records_doc, validation_doc
from .base import register
from .compare_tasks import csv_text


@dataclass
class ValidateArgs(GroundTruthOptions, EstimatorsOptions, EngineOptions, DataOptions, DataSource, ModelOptions):
    """Measure each block's fine-tune gain and pruning sensitivity and test whether the layer scores predict them."""

    estimators: list[str] = option(["datainf", "exact", "grad-dot"],
                                   "estimators whose S_l are validated, comma-separated (those with a Gram form)")
    out: str = option("out/validate", "output folder")
    overwrite: bool = overwrite_field()


def check_args(args: ValidateArgs) -> tuple[list[EstimatorConfig], EngineConfig, Draw]:
    """Option checks that need no model; returns the estimators (deduplicated, in order), the engine and the record
    sets (:func:`layerif.validate.draw_records`: too few distinct records is refused here)."""
    estimators = args.estimator_configs(args.damping_scale, args.seed)
    engine = engine_config(args, mode="materialized")
    check_data(args, "validate", args.out, args.overwrite)
    if args.target == "lora":
        raise UserError("--target lora is not supported: validate trains and prunes the base projections (use attn, mlp, block or a regex)")
    args.check_ground_truth()
    return estimators, engine, draw_records(args, args.gt_n_train, args.gt_n_val)


def compute(args: ValidateArgs, lm=None) -> dict:
    """The validation.json document (the Python API behind ``layerif validate``; no files written)."""
    estimators, engine, draw = check_args(args)
    lm, train, val, truth_train, truth_val, label, counts = load_drawn(args, draw, lm)
    t0 = time.perf_counter()
    progress.info(f"Gram statistics: {len(train)} train x {len(val)} validation records, "
                  f"{len(estimators)} estimators")
    scored = compute_all(lm, train, val, estimators, engine)
    influence = {e: r.influence for e, r in scored.results.items()}
    seconds = time.perf_counter() - t0
    measured = ground_truth(lm, truth_train, truth_val, scored.targets, args, args.seed,
                            (train, val) if args.in_sample else None)
    measured["seconds"] = {"scores": round(seconds, 2), **measured["seconds"]}
    passes = scored.results[estimators[0].name].passes
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

# ----------------------------------------------------------------------------- the report

TRUTHS = ("fine_tune_gain", "prune_loss_rise", "prune_accuracy_change")
IN_SAMPLE_TRUTHS = ("fine_tune_gain_in_sample", "prune_loss_rise_in_sample")  # validate --in-sample
TRUTH_LABEL = {"fine_tune_gain": "fine-tune gain", "prune_loss_rise": "pruning loss rise",
               "prune_accuracy_change": "pruning accuracy change",
               "fine_tune_gain_in_sample": "fine-tune gain (in sample)",
               "prune_loss_rise_in_sample": "pruning loss rise (in sample)"}
ESTIMATOR_LABEL = {"datainf": "DataInf", "exact": "exact", "grad-dot": "grad-dot", "lissa": "LiSSA"}


def validation_truths(doc: dict) -> dict[str, list[float] | None]:
    """The ground truths of a validation.json by name: :data:`TRUTHS` (``prune_accuracy_change`` None without an
    accuracy task), then :data:`IN_SAMPLE_TRUTHS` when the in-sample reading was measured."""
    ps = doc["prune_sensitivity"]
    out = {"fine_tune_gain": doc["fine_tune_gain"], "prune_loss_rise": ps["loss_rise"],
           "prune_accuracy_change": ps["accuracy_change"]}
    inside = doc.get("in_sample")
    if inside:
        out |= dict(zip(IN_SAMPLE_TRUTHS, (inside["fine_tune_gain"], inside["prune_sensitivity"]["loss_rise"])))
    return out


def sample_note(doc: dict) -> str:
    """Which records the ground truth of a validation.json was measured on, in words ('' for a file written before
    the out-of-sample reading, which was in sample)."""
    if "records" not in doc:
        return ""
    return (f"Ground truth out of sample: fine-tuned on {doc['gt_n_train']} train and measured on {doc['gt_n_val']} "
            f"validation records disjoint from the {doc['n_train']} × {doc['n_val']} scoring records"
            + ("; in sample (trained and measured on the scoring records) beside it" if doc.get("in_sample") else "")
            + ".")


def spearman_rows(doc: dict) -> list[list]:
    """Rows estimator, aggregation, ground truth, rho, low, high, claimed sign, verdict."""
    rows = []
    for e, aggs in doc["spearman"].items():
        for a, per in aggs.items():
            for g, r in per.items():
                rows.append([e, a, g, r["rho"], r["ci_low"], r["ci_high"], r["claimed_sign"], r["verdict"]])
    return rows


GAIN_READING = {"as claimed": ("predicts fine-tune gain", ""),
                "opposite": ("predicts the opposite of fine-tune gain", ", the interval on the other side of 0"),
                "inconclusive": ("neither predicts nor contradicts fine-tune gain", ", the interval includes 0"),
                "undefined": ("has no defined correlation with fine-tune gain", "")}
"""How the score/validate reading states each verdict of ρ(S_l, fine-tune gain) (:func:`layerif.validate.verdict`):
(the claim, a note after the interval)."""


def validation_reading(doc: dict) -> list[str]:
    """Plain-language verdicts of a validation.json, for the report and the terminal."""
    sp = doc["spearman"]
    names = doc["estimators"]

    def cell(e: str, g: str, a: str = "score") -> str:
        r = sp[e][a].get(g)
        return "n/a" if r is None else f"ρ = {fmt(r['rho'], 2)} [{fmt(r['ci_low'], 2)}, {fmt(r['ci_high'], 2)}]"

    def gain(e: str) -> str:
        r = sp[e]["score"].get("fine_tune_gain")
        claim, note = GAIN_READING.get(r["verdict"] if r else "undefined", GAIN_READING["inconclusive"])
        return f"{ESTIMATOR_LABEL.get(e, e)}'s S_l {claim} at {cell(e, 'fine_tune_gain')}{note}"

    inside = (" In sample (trained and measured on the scoring records): "
              + "; ".join(f"{ESTIMATOR_LABEL.get(e, e)} {cell(e, 'fine_tune_gain_in_sample')}" for e in names) + "."
              if doc.get("in_sample") else "")
    out = [("On this model and task, out of sample, " if "records" in doc else "On this model and task, ")
           + "; ".join(gain(e) for e in names)
           + f" (Spearman over {len(doc['layers'])} blocks, {100 * doc['bootstrap']['level']:.0f}% bootstrap "
           "interval over blocks; a profile that predicts fine-tune gain has ρ > 0: high S_l, large loss drop)."
           + inside]
    out.append("Pruning sensitivity: LayerIF's sparsity allocation prunes blocks with high S_l more, which assumes "
               "ρ(S_l, loss rise) < 0; measured "
               + "; ".join(f"{ESTIMATOR_LABEL.get(e, e)} {cell(e, 'prune_loss_rise')}" for e in names)
               + (". Accuracy change (claimed ρ > 0): "
                  + "; ".join(f"{ESTIMATOR_LABEL.get(e, e)} {cell(e, 'prune_accuracy_change')}" for e in names)
                  if doc["prune_sensitivity"]["accuracy_change"] is not None else "") + ".")
    verdicts = [(e, a, g, r["verdict"]) for e in names for a, per in sp[e].items() for g, r in per.items()]
    held = [f"{ESTIMATOR_LABEL.get(e, e)} {a} → {TRUTH_LABEL[g]}" for e, a, g, v in verdicts if v == "as claimed"]
    opposite = [f"{ESTIMATOR_LABEL.get(e, e)} {a} → {TRUTH_LABEL[g]}" for e, a, g, v in verdicts if v == "opposite"]
    out.append(("Intervals that exclude 0 on the claimed side: " + ", ".join(held) + "." if held else
                "No correlation's interval excludes 0 on the claimed side.")
               + (" On the opposite side: " + ", ".join(opposite) + "." if opposite else ""))
    out.append("A block profile is a ranking over few blocks: with about 30 blocks a Spearman interval is wide, and "
               "one model, task and record set is one case, not a general result.")
    return out


def validation_table(folder: Path, doc: dict) -> list[Block]:
    """The Spearman table of a validation.json and its figure (validate and compare-estimators --validate)."""
    out = [heading("Spearman of scores with ground truth"),
           table_block(["estimator", "aggregation", "ground truth", "ρ", "interval", "claimed", "verdict"],
                  [[ESTIMATOR_LABEL.get(e, e), a, TRUTH_LABEL[g], fmt(rho, 3), f"[{fmt(lo, 2)}, {fmt(hi, 2)}]",
                    "+" if c > 0 else "−", v] for e, a, g, rho, lo, hi, c, v in spearman_rows(doc)])]
    if (folder / "validation.png").exists():
        out.append(image("validation.png", "S_l per estimator and the measured ground truths per block"))
    return out


def _validate_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    """The report of a validate folder: reading, run, Spearman table, figure, per-block table."""
    doc = read_json(folder / "validation.json")
    title = f"layerif validate: {doc.get('model')} on {doc.get('task')}"
    ft, pr, base = doc["fine_tune"], doc["pruning"], doc["base"]
    truths = validation_truths(doc)
    blocks = [heading(title, 1), heading("Reading"), *map(paragraph, validation_reading(doc)), *run_section(folder, config),
              heading("What was measured"),
              *([paragraph(sample_note(doc) + f" {doc['records']['rule']}.")] if "records" in doc else []),
              paragraph(f"Fine-tune gain: only block l's `{doc['target']}` projections train, {ft['steps']} Adam steps of "
                 f"{ft['batch_size']} of the {doc.get('gt_n_train', doc['n_train'])} train records (seed {ft['seed']}, "
                 f"lr {ft['lr']:g} decaying linearly); gain = validation loss before − after (base "
                 f"{fmt(base['val_loss'])}, mean over {doc.get('gt_n_val', doc['n_val'])} records). Pruning "
                 f"sensitivity: every projection of block l alone pruned with "
                 f"{pr['method']} at {pr['sparsity']:g} (calibration {pr['n_calib']} × {pr['seqlen']} tokens of the "
                 "built-in corpus, dense activations), the rest dense; loss rise = pruned − dense"
                 + (f"; accuracy change on {pr['task_items']} multiple-choice items of {pr['accuracy_task']} (dense "
                    f"{fmt(base['accuracy'], 3)})" if pr["accuracy_task"] else "") + "."),
              paragraph("Signs: I_l(i) < 0 = up-weighting sample i lowers the validation loss (helpful); S_l = total "
                 "helpful influence. Claimed sign: + for S_l vs fine-tune gain, − for S_l vs pruning loss rise, + "
                 "vs accuracy change; the other way round for `sum` (negative = helpful); `mean_abs` as S_l. "
                 f"Intervals: {100 * doc['bootstrap']['level']:.0f}% percentile bootstrap over blocks "
                 f"(B = {doc['bootstrap']['B']})."),
              *validation_table(folder, doc)]
    names = doc["estimators"]
    shown = [g for g in truths if g in TRUTHS or truths[g] is not None]
    blocks += [heading("Per block"),
               table_block(["block", *(TRUTH_LABEL[g] for g in shown), *(f"S_l {ESTIMATOR_LABEL.get(e, e)}" for e in names)],
                      [[l, *(fmt((truths[g] or [None] * len(doc["layers"]))[i], 3) for g in shown),
                        *(fmt(doc["scores"][e]["score"][i], 3) for e in names)] for i, l in enumerate(doc["layers"])]),
               paragraph(f"Time: scores {doc['seconds']['scores']:.0f} s, fine-tuning {doc['seconds']['fine_tune']:.0f} s, "
                  f"pruning {doc['seconds']['prune']:.0f} s.")]
    return title, blocks


register("validate", ValidateArgs, run,
         "measure each block's fine-tune gain and pruning sensitivity and test whether the layer scores predict them",
         report=_validate_blocks)
