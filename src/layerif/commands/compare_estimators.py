"""``layerif compare-estimators``: every registered estimator on the same gradients, rankings compared."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import __version__, progress
from ..compare import agreement, block_influence, estimators_figure, per_block_max
from ..errors import UserError
from ..influence import ESTIMATORS, EstimatorConfig, datainf_bound, lissa_residual, peer_estimators
from ..io import write_safetensors
from ..options import (
    DataOptions,
    DataSource,
    EngineOptions,
    EstimatorsOptions,
    GroundTruthOptions,
    ModelOptions,
    StabilityOptions,
    option,
)
from ..io import overwrite_field
from ..engine import EngineConfig
from ..report import Block, heading, image, paragraph, run_section, table_block
from ..results import read_json
from ..scores import check_data, compute, compute_all, engine_config, load_checked, prepare
from ..validate import draw_records, ground_truth, load_drawn, validation_doc
from ..stability import CONDITIONAL, bootstrap, fmt, layer_scores, split_half_from_stats, top_k_blocks
from .base import register
from .compare import Comparison
from .compare_tasks import csv_text
from .validate import ground_truth_head, validation_files, validation_reading, validation_table


@dataclass
class CompareEstimatorsArgs(GroundTruthOptions, EstimatorsOptions, StabilityOptions, EngineOptions, DataOptions,
                            DataSource, ModelOptions):
    """Apply several influence estimators to the same gradients and compare their block rankings."""

    peers: list[str] = option(peer_estimators(), "estimators a peer library computes on the model itself, beside "
                              "the Gram ones (ekfac: Kronfluence EK-FAC, included when installed; empty: none)")
    validate: bool = option(False, "also measure each block's fine-tune gain and pruning sensitivity and correlate "
                                   "every estimator's scores with them (as `layerif validate`; the ground-truth "
                                   "options apply)")
    out: str = option("out/compare-estimators", "output folder")
    overwrite: bool = overwrite_field()


def validate_estimators(args: CompareEstimatorsArgs) -> tuple[list[EstimatorConfig], list[EstimatorConfig], EngineConfig]:
    """The Gram estimators to run (deduplicated, in the given order), the peers and the engine; bad options (with
    ``--validate``, too few records for the out-of-sample ground truth too) are a :class:`UserError`."""
    estimators = args.estimator_configs(args.damping_scale, args.resample_seed, at_least=2)
    engine = engine_config(args, mode="materialized")
    args.check_stability()
    check_data(args, "compare-estimators", args.out, args.overwrite)
    if args.validate:
        args.check_ground_truth()
        draw_records(args, args.gt_n_train, args.gt_n_val)
    peers = list(dict.fromkeys(p for p in args.peers if p))
    bad = [p for p in peers if p not in ESTIMATORS or ESTIMATORS[p].direct is None]
    if bad:
        raise UserError(f"--peers: {bad[0]!r} is not a peer estimator (use {', '.join(n for n, e in ESTIMATORS.items() if e.direct) or 'none'})")
    if set(peers) & {e.name for e in estimators}:
        raise UserError("an estimator is in both --estimators and --peers")
    return estimators, [EstimatorConfig(p, args.damping_scale) for p in peers], engine


def run(args: CompareEstimatorsArgs) -> str:
    """``layerif compare-estimators``: estimators.json, estimators.csv, agreement.csv, estimators.png,
    influence.safetensors (``{estimator}.layer.{l}``), config.json and the report."""
    estimators, peers, engine = validate_estimators(args)
    with Comparison("compare-estimators", args, ()) as cmp:
        return _estimate(args, estimators, peers, engine, cmp)


def _estimate(args: CompareEstimatorsArgs, estimators: list[EstimatorConfig], peers: list[EstimatorConfig],
              engine: EngineConfig, cmp: Comparison) -> str:
    """The shared Gram statistics, every estimator on them, the agreement files; returns the summary."""
    if args.validate:  # the ground truth's records are drawn apart from the scoring ones (layerif.validate)
        draw = draw_records(args, args.gt_n_train, args.gt_n_val)
        lm, train, val, truth_train, truth_val, label, counts = load_drawn(args, draw)
    else:
        lm, train, val, label, counts = prepare(args, *load_checked(args))
    progress.info(f"Gram statistics: {len(train)} train x {len(val)} validation records, "
                  f"{len(estimators)} estimators")
    scored = compute_all(lm, train, val, estimators, engine, keep_stats=True)
    stats, targets = scored.stats, scored.targets
    first = scored.results[estimators[0].name]
    passes, lam = first.passes, first.lambdas
    influence = {e: r.influence for e, r in scored.results.items()}
    for peer in peers:  # their own passes on the same records, targets, loss and damping
        progress.info(f"{peer.name}: computed by its library on the model")
        influence[peer.name] = compute(lm, train, val, peer, replace(engine, mode="auto")).influence
    names = list(influence)
    gram = [e.name for e in estimators]
    layers = sorted(next(iter(influence.values())))
    scores = {e: layer_scores(influence[e]) for e in names}
    pairs = agreement(layers, influence, args.top_k)
    doc: dict = {"model": lm.name, "task": label, "target": args.target, "damping_scale": args.damping_scale,
                 "n_train": len(train), "n_val": len(val), "records": counts, "estimators": names, "layers": layers, "score": scores,
                 "top_k": min(args.top_k, len(layers)),
                 "top_k_blocks": {e: top_k_blocks(layers, scores[e], args.top_k) for e in names}, "pairs": pairs,
                 "datainf_bound": per_block_max(targets, {t.name: datainf_bound(stats[t.name], lam[t.name])
                                                          if lam[t.name] > 0 else 0.0 for t in targets}),
                 "lambda": lam, "passes": passes}
    notes = [f"{e}: computed by Kronfluence with its own passes (factor fitting, then scores) on the same records, "
             "target modules, per-sample loss and damping; not from the shared Gram statistics" for e in names[len(gram):]]
    if not names[len(gram):]:
        notes.append("EK-FAC is not included: Kronfluence is not installed (make peer).")
    if "lissa" in names:
        if args.lissa_batch == 0:
            doc["lissa_residual"] = per_block_max(targets, {t.name: lissa_residual(stats[t.name], lam[t.name],
                                                                                   args.lissa_iterations)
                                                            if lam[t.name] > 0 else 0.0 for t in targets})
            notes.append(f"LiSSA: {args.lissa_iterations} full-batch steps; the largest remaining Neumann factor "
                         f"(1 − μ/σ)^(T+1) per block is up to {max(doc['lissa_residual']):.3g} (0 = converged to exact).")
        else:
            notes.append(f"LiSSA: {args.lissa_iterations} steps on seeded random mini-batches of {args.lissa_batch} "
                         "train records (stochastic, as in Koh & Liang).")
    if args.bootstrap:
        boots = {e: bootstrap(influence[e], args.bootstrap, args.top_k, args.resample_seed) for e in names}
        doc["bootstrap"] = boots
        doc["rank_stability"] = {e: boots[e]["rank_stability"] for e in names}
    if args.split_half:
        doc["split_half"] = {e.name: split_half_from_stats(stats, lambda s, e=e: block_influence(s, targets, e),
                                                           args.top_k, args.resample_seed) for e in estimators}
    doc |= {"notes": notes, "version": __version__}
    validation = {}
    if args.validate:
        measured = ground_truth(lm, truth_train, truth_val, targets, args, args.seed,
                                (train, val) if args.in_sample else None)
        vdoc = validation_doc(ground_truth_head(args, lm, label, draw, train, val, passes), influence, measured,
                              args.bootstrap_blocks, args.seed)
        validation = validation_files(vdoc)
        doc["validation"] = {e: vdoc["spearman"][e]["score"] for e in names}
    write_safetensors(cmp.out / "influence.safetensors",
                      {f"{e}.layer.{l}": influence[e][l].float() for e in names for l in layers})
    cmp.write_config()
    keys = ["a", "b", "spearman", "pearson", "top_k_overlap", "sample_spearman"]
    files = {"estimators.csv": csv_text([["layer", *names]] + [[l, *(scores[e][i] for e in names)]
                                                                for i, l in enumerate(layers)]),
             "agreement.csv": csv_text([keys] + [[p[k] for k in keys] for p in pairs]),
             "estimators.png": estimators_figure(names, layers, scores, pairs), "estimators.json": doc, **validation}
    lines = [f"{lm.name} · task {label} · target {args.target} · {len(train)} train x {len(val)} validation · "
             f"{passes} pass(es), shared by {len(names)} estimators",
             f"{'a':>9} {'b':>9} {'Spearman':>9} {'Pearson':>8} {'top-k':>6}"]
    lines += [f"{p['a']:>9} {p['b']:>9} {fmt(p['spearman'], 3):>9} {fmt(p['pearson'], 3):>8} {p['top_k_overlap']:>6.2f}"
              for p in pairs]
    if validation:
        lines += validation_reading(validation["validation.json"])[:2]
    return cmp.finish(files, "\n".join(lines)) + ", influence.safetensors"


# ----------------------------------------------------------------------------- the report


def _compare_estimators_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    doc = read_json(folder / "estimators.json")
    names, layers = doc["estimators"], doc["layers"]
    title = f"layerif compare-estimators: {doc.get('model')} on {doc.get('task')}"
    pairs = doc["pairs"]
    reading = []
    if pairs:
        srt = sorted(pairs, key=lambda p: -(p["spearman"] if p["spearman"] is not None else -2))
        reading.append(f"Closest: {srt[0]['a']} and {srt[0]['b']} rank the blocks at Spearman {fmt(srt[0]['spearman'], 2)}; "
                       f"furthest: {srt[-1]['a']} and {srt[-1]['b']} at {fmt(srt[-1]['spearman'], 2)}. "
                       "Where estimators disagree, the choice of method changes which blocks look important.")
    rho = {frozenset((p["a"], p["b"])): p["spearman"] for p in pairs}
    di_ex, di_gd = rho.get(frozenset(("datainf", "exact"))), rho.get(frozenset(("datainf", "grad-dot")))
    if di_ex is not None and di_gd is not None and di_gd > di_ex:
        reading.append(f"DataInf ranks the blocks more like grad-dot ({fmt(di_gd, 2)}) than like the exact inverse "
                       f"({fmt(di_ex, 2)}): at this damping its curvature correction is small next to its "
                       "gradient-product term, so it behaves mostly as a rescaled grad-dot.")
    bound = doc.get("datainf_bound")
    if bound:
        worst = max(bound)
        reading.append(f"DataInf vs exact, guaranteed: λ‖E − D‖ ≤ β with β up to {fmt(worst, 3)} across blocks "
                       + ("— small, so DataInf must track the exact estimator closely here."
                          if worst < 0.1 else
                          "— the bound gives no guarantee at this size (β ≈ parameter count / damping scale); "
                          "only the measured agreement below tells how close they are."))
    stab = doc.get("rank_stability") or {}
    if any(v is not None for v in stab.values()):
        reading.append(f"Own rank stability (bootstrap, {CONDITIONAL}): " + ", ".join(f"{e} {fmt(v, 2)}" for e, v in stab.items())
                       + ".")
    blocks = [heading(title, 1), heading("Reading"), *map(paragraph, reading), *run_section(folder, config),
              heading("Scores per estimator"),
              table_block(["block", *names], [[l, *(fmt(doc["score"][e][i]) for e in names)] for i, l in enumerate(layers)])]
    if (folder / "estimators.png").exists():
        blocks.append(image("estimators.png", "normalized block profiles per estimator and their rank agreement"))
    k = doc["top_k"]
    blocks += [heading("Agreement between estimators"),
               paragraph(f"Correlations of the block scores S_l across blocks; top-{k} overlap = shared share of the two "
                  f"top-{k} sets; sample-level = mean over blocks of the Spearman correlation of the per-sample "
                  "influences I_l(i)."),
               table_block(["estimator", "estimator", "Spearman", "Pearson", f"top-{k} overlap", "sample-level Spearman"],
                      [[p["a"], p["b"], fmt(p["spearman"], 3), fmt(p["pearson"], 3), f"{p['top_k_overlap']:.2f}",
                        fmt(p["sample_spearman"], 3)] for p in pairs])]
    half = doc.get("split_half") or {}
    if stab or half:
        blocks += [heading("Stability per estimator"),
                   table_block(["estimator", f"bootstrap rank stability ({CONDITIONAL})", "split-half Spearman", "split-half Spearman–Brown"],
                          [[e, fmt(stab.get(e), 3), fmt((half.get(e) or {}).get("spearman"), 3),
                            fmt((half.get(e) or {}).get("spearman_brown"), 3)] for e in names])]
    if (folder / "validation.json").exists():
        vdoc = read_json(folder / "validation.json")
        blocks += [heading("Ground truth (--validate)"), *map(paragraph, validation_reading(vdoc)), *validation_table(folder, vdoc)]
    if doc.get("notes"):
        blocks += [heading("Notes"), *map(paragraph, doc["notes"])]
    return title, blocks


register("compare-estimators", CompareEstimatorsArgs, run,
         "every influence estimator on the same gradients: agreement of the block rankings",
         report=_compare_estimators_blocks)
