r"""Does the block profile depend on the task? On the estimator?

``layerif compare-tasks`` scores one loaded model on several tasks (each written
as a full ``layerif score`` folder) and compares the block profiles: a
block x task heatmap of each task's share of S, the pairwise Spearman matrix of
the block rankings, and the blocks whose share differs most.

``layerif compare-estimators`` forms the Gram statistics (K, P) of every target
once (:func:`layerif.scores.module_stats`) and applies each estimator to the
*same* gradients: ``datainf``, ``exact``, ``grad-dot`` (:mod:`layerif.influence`)
and LiSSA (:mod:`layerif.influence`, the estimator registry, with the DataInf
bound beside them).

EK-FAC (kronfluence) is not offered: kronfluence 1.0.1 requires torchvision,
which pulls another torch build (2.14 with CUDA) into this environment, and
EK-FAC needs its own covariance passes rather than the Gram statistics shared here.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__, progress
from .errors import UserError
from .influence import ESTIMATORS, EstimatorOptions, ModuleStats, damping, datainf_bound, lissa_residual
from .io import CACHE_DIR, output_folder, write_figure, write_json, write_safetensors, write_text
from .models import Target, select_targets
from .report import write_report
from .results import write_config
from .scores import (
    ScoreArgs,
    default_max_memory_gb,
    gram_influence,
    load_checked,
    module_stats,
    prepare,
    score,
    validate,
    write,
)
from .stability import (
    bootstrap,
    finite,
    fmt,
    layer_scores,
    pearson,
    spearman,
    split_half_from_stats,
    top_k_blocks,
    top_k_overlap,
)

LISSA = "lissa"
ALL_ESTIMATORS = tuple(n for n, e in ESTIMATORS.items() if e.gram is not None)  # from one set of Gram statistics


def _hidden(default: Any, help_: str = "") -> Any:
    """A ScoreArgs field that a comparison fixes itself: kept in config.json, not offered as an option."""
    return field(default=default, metadata={"cli": False, "help": help_})


def as_score_args(args: ScoreArgs, **changes) -> ScoreArgs:
    """A plain :class:`ScoreArgs` with the fields of ``args`` (a subclass instance) and ``changes``."""
    return replace(ScoreArgs(**{f.name: getattr(args, f.name) for f in fields(ScoreArgs)}), **changes)


def spearman_matrix(profiles: list[list[float]]) -> list[list[float | None]]:
    """Pairwise Spearman correlations of block profiles (None where undefined)."""
    return [[finite(spearman(a, b)) for b in profiles] for a in profiles]


def shares(score: list[float]) -> list[float]:
    """S_l / sum_l S_l (all zeros when nothing is helpful)."""
    total = sum(score)
    return [s / total if total > 0 else 0.0 for s in score]


# ----------------------------------------------------------------------------- compare-tasks


@dataclass
class CompareTasksArgs(ScoreArgs):
    """Score one model on several tasks and compare the block profiles."""

    task: str = _hidden("capitals")
    train: str | None = _hidden(None)
    val: str | None = _hidden(None)
    out: str = field(default="out/compare-tasks", metadata={"help": "output folder (one score subfolder per task)"})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "at least two, comma-separated: built-in task names or TRAIN:VAL record files, each optionally "
                "prefixed LABEL= (e.g. arith,capitals,mine=a.jsonl:b.jsonl)"})


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
        a = as_score_args(args, out=str(Path(args.out) / folder), **changes)
        validate(a, None)  # the folder is written inside --out's staging folder (run_tasks)
        out.append((folder, a))
    return out


def compare_profiles(labels: list[str], layers: list[int], scores: dict[str, list[float]], top_k: int) -> dict:
    """The cross-task part of comparison.json: shares, Spearman matrix, top-k sets and the most differing blocks.

    A block's spread is max - min over tasks of its share of the task's S; the
    ``top_k`` blocks with the largest spread are listed, largest first.
    """
    share = {t: shares(scores[t]) for t in labels}
    spread = []
    for i, l in enumerate(layers):
        by_task = {t: share[t][i] for t in labels}
        hi, lo = max(by_task, key=by_task.get), min(by_task, key=by_task.get)
        spread.append({"block": l, "spread": by_task[hi] - by_task[lo], "max_task": hi, "min_task": lo, "share": by_task})
    k = min(top_k, len(layers))
    return {
        "tasks": labels,
        "layers": layers,
        "score": scores,
        "share": share,
        "spearman": spearman_matrix([scores[t] for t in labels]),
        "top_k": k,
        "top_k_blocks": {t: top_k_blocks(layers, scores[t], k) for t in labels},
        "differing_blocks": sorted(spread, key=lambda d: -d["spread"])[:k],
    }


def heatmap_figure(labels: list[str], layers: list[int], share: dict[str, list[float]]):
    """Block x task heatmap of the share of S (rows: blocks, columns: tasks); the image data is that matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = torch.tensor([share[t] for t in labels], dtype=torch.float64).T.numpy()  # [L, T]
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(labels), 1.2 + 0.22 * len(layers)))
    im = ax.imshow(M, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_ylabel("decoder block")
    fig.colorbar(im, ax=ax, label="share of the task's S")
    ax.set_title("helpful influence per block and task", fontsize=10)
    fig.tight_layout()
    return fig


def _csv(rows: list[list]) -> str:
    """CSV text; floats in full precision (repr), None as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows([["" if x is None else repr(x) if isinstance(x, float) else x for x in r] for r in rows])
    return buf.getvalue()


def _csv_matrix(labels: list[str], M: list[list[float | None]]) -> str:
    return _csv([["task", *labels]] + [[t, *M[i]] for i, t in enumerate(labels)])


def run_tasks(args: CompareTasksArgs) -> str:
    """``layerif compare-tasks``: per-task score folders, comparison.json, spearman.csv, task_heatmap.png, report."""
    specs = task_specs(args)
    with output_folder(args.out, "compare-tasks", args.overwrite) as tmp:
        lm, _ = load_checked(*(a for _, a in specs))  # once, for every task; all records checked first
        doc = _score_tasks(args, specs, lm, tmp)
    out = Path(args.out)
    labels = list(doc["folders"])
    lines = [f"{lm.name} · {len(labels)} tasks · target {args.target} · estimator {args.estimator}",
             "Spearman of the block rankings:", _csv_matrix(labels, [[None if x is None else round(x, 3) for x in r]
                                                                      for r in doc["spearman"]]).strip(),
             "blocks differing most: " + ", ".join(f"{d['block']} ({d['max_task']} > {d['min_task']})"
                                                    for d in doc["differing_blocks"]),
             f"wrote {out}/comparison.json, spearman.csv, task_heatmap.png, report.md, report.html and "
             f"{len(labels)} score folders"]
    return "\n".join(lines)


def _score_tasks(args: CompareTasksArgs, specs: list[tuple[str, ScoreArgs]], lm, out: Path) -> dict:
    """Score every task into ``out/<label>`` and write the comparison files into ``out``; returns comparison.json."""
    scores, meta, stab, layers = {}, {}, {}, []
    for label, a in specs:
        progress.info(f"task {label}")
        result = score(a, lm=lm, cache=out / CACHE_DIR / label)
        write(result, a, out / label)
        shutil.rmtree(out / CACHE_DIR / label, ignore_errors=True)
        scores[label], meta[label], layers = result.score, result.meta, result.layers
        boot = result.meta.get("stability", {}).get("bootstrap")
        stab[label] = boot["rank_stability"] if boot else None
    labels = [label for label, _ in specs]
    doc = {"model": lm.name, "target": args.target, "estimator": args.estimator,
           "sources": dict(zip(labels, args.tasks)), "folders": {t: t for t in labels},
           "task_names": {t: meta[t]["task"] for t in labels}, "n_train": {t: meta[t]["n_train"] for t in labels},
           **compare_profiles(labels, layers, scores, args.top_k), "rank_stability": stab, "version": __version__}
    write_config(out, "compare-tasks", args)
    write_text(out / "spearman.csv", _csv_matrix(labels, doc["spearman"]))
    write_figure(out / "task_heatmap.png", heatmap_figure(labels, layers, doc["share"]))
    write_json(out / "comparison.json", doc)
    write_report(out)
    return doc


# ----------------------------------------------------------------------------- compare-estimators


@dataclass
class CompareEstimatorsArgs(ScoreArgs):
    """Apply several influence estimators to the same gradients and compare their block rankings."""

    estimator: str = _hidden("datainf")
    per_val: bool = _hidden(False)
    mode: str = _hidden("materialized", "the Gram statistics are shared by every estimator")
    val_chunk: int = _hidden(8)
    bootstrap_val: bool = _hidden(False)
    resume: bool = _hidden(False, "one gradient pass pair; nothing to resume")
    out: str = field(default="out/compare-estimators", metadata={"help": "output folder"})
    estimators: list[str] = field(default_factory=lambda: list(ALL_ESTIMATORS), metadata={
        "help": f"at least two of {', '.join(ALL_ESTIMATORS)}, comma-separated"})
    lissa_iterations: int = field(default=100, metadata={"help": "LiSSA recursion steps T"})
    lissa_batch: int = field(default=0, metadata={
        "help": "train records per LiSSA step (0: all, deterministic; k: seeded random mini-batches of k)"})


def block_influence(
    stats: dict[str, ModuleStats], targets: list[Target], estimator: str, damping_scale: float,
    lissa_iterations: int = 100, lissa_batch: int = 0, seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Block influences {block: I_l [n]} (summed validation loss) of one estimator from shared Gram statistics."""
    module_inf, _ = gram_influence(stats, targets, estimator, damping_scale,
                                   EstimatorOptions(lissa_iterations, lissa_batch, seed))
    blocks: dict[int, torch.Tensor] = {}
    for t in targets:
        blocks[t.block] = blocks.get(t.block, 0) + module_inf[t.name][0]
    return {l: blocks[l] for l in sorted(blocks)}


def _per_block_max(targets: list[Target], values: dict[str, float]) -> list[float]:
    """The largest per-module value within each block, blocks in order."""
    out: dict[int, float] = {}
    for t in targets:
        out[t.block] = max(out.get(t.block, values[t.name]), values[t.name])
    return [out[l] for l in sorted(out)]


def agreement(layers: list[int], influence: dict[str, dict[int, torch.Tensor]], top_k: int) -> list[dict]:
    """Pairwise agreement of estimators: Spearman / Pearson of the block scores, top-k overlap, sample-level Spearman."""
    names = list(influence)
    S = {e: layer_scores(influence[e]) for e in names}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            per_block = torch.tensor([spearman(influence[a][l], influence[b][l]) for l in layers])
            per_block = per_block[torch.isfinite(per_block)]
            pairs.append({"a": a, "b": b, "spearman": finite(spearman(S[a], S[b])), "pearson": finite(pearson(S[a], S[b])),
                          "top_k_overlap": top_k_overlap(layers, S[a], S[b], top_k),
                          "sample_spearman": finite(float(per_block.mean())) if per_block.numel() else None})
    return pairs


def validate_estimators(args: CompareEstimatorsArgs) -> list[str]:
    """The estimators to run (deduplicated, in the given order); bad options are a :class:`UserError`."""
    validate(args, "compare-estimators")
    names = list(dict.fromkeys(args.estimators))
    unknown = [e for e in names if e not in ALL_ESTIMATORS]
    if unknown:
        raise UserError(f"unknown estimator {unknown[0]!r} (use {', '.join(ALL_ESTIMATORS)})")
    if len(names) < 2:
        raise UserError(f"--estimators needs at least two estimators to compare (got {','.join(names) or 'none'})")
    if args.lissa_iterations < 1:
        raise UserError(f"--lissa-iterations must be >= 1 (got {args.lissa_iterations})")
    if args.lissa_batch < 0:
        raise UserError(f"--lissa-batch must be >= 0 (got {args.lissa_batch})")
    return names


def estimators_figure(names: list[str], layers: list[int], scores: dict[str, list[float]], pairs: list[dict]):
    """estimators.png: each estimator's normalized block profile, and the Spearman matrix of the rankings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, e in enumerate(names):  # distinct markers and dashes: identical profiles stay visible
        ax.plot(layers, shares(scores[e]), marker="osd^v<>"[i % 7], ls=("-", "--", "-.", ":")[i % 4], ms=4, label=e)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("share of S")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    M = torch.eye(len(names), dtype=torch.float64)
    for p in pairs:
        i, j = names.index(p["a"]), names.index(p["b"])
        M[i, j] = M[j, i] = float("nan") if p["spearman"] is None else p["spearman"]
    im = ax2.imshow(M.numpy(), vmin=-1, vmax=1, cmap="RdBu")
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax2.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax2.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=8,
                     color="white" if abs(M[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax2, label="Spearman")
    fig.tight_layout()
    return fig


def run_estimators(args: CompareEstimatorsArgs) -> str:
    """``layerif compare-estimators``: estimators.json, estimators.csv, agreement.csv, estimators.png,
    influence.safetensors (``{estimator}.layer.{l}``), config.json and the report."""
    names = validate_estimators(args)
    with output_folder(args.out, "compare-estimators", args.overwrite) as out:
        lm, train, val, label, counts = prepare(args, *load_checked(args))
        targets = select_targets(lm.model, args.target)
        progress.info(f"Gram statistics of {len(targets)} modules: {len(train)} train x {len(val)} validation records")
        stats, _, passes = module_stats(lm.model, targets, train, val, lm.tokenizer.pad_token_id, False, args.batch_size,
                                        args.max_memory or default_max_memory_gb(), args.layout)
        opts = dict(damping_scale=args.damping_scale, lissa_iterations=args.lissa_iterations,
                    lissa_batch=args.lissa_batch, seed=args.seed)
        influence = {e: block_influence(stats, targets, e, **opts) for e in names}
        layers = sorted(next(iter(influence.values())))
        scores = {e: layer_scores(influence[e]) for e in names}
        pairs = agreement(layers, influence, args.top_k)
        lam = {t.name: damping(stats[t.name], args.damping_scale) for t in targets}
        doc: dict = {"model": lm.name, "task": label, "target": args.target, "damping_scale": args.damping_scale,
                     "n_train": len(train), "n_val": len(val), "records": counts,
                     "estimators": names, "layers": layers, "score": scores,
                     "top_k": min(args.top_k, len(layers)),
                     "top_k_blocks": {e: top_k_blocks(layers, scores[e], args.top_k) for e in names}, "pairs": pairs,
                     "datainf_bound": _per_block_max(targets, {t.name: datainf_bound(stats[t.name], lam[t.name])
                                                               if lam[t.name] > 0 else 0.0 for t in targets}),
                     "lambda": lam, "passes": passes}
        notes = ["EK-FAC (kronfluence) is not included: kronfluence requires torchvision, which installs another torch "
                 "build, and EK-FAC needs its own covariance passes rather than these shared Gram statistics."]
        if LISSA in names:
            if args.lissa_batch == 0:
                doc["lissa_residual"] = _per_block_max(targets, {t.name: lissa_residual(stats[t.name], lam[t.name],
                                                                                        args.lissa_iterations)
                                                                 if lam[t.name] > 0 else 0.0 for t in targets})
                notes.append(f"LiSSA: {args.lissa_iterations} full-batch steps; the largest remaining Neumann factor "
                             f"(1 − μ/σ)^(T+1) per block is up to {max(doc['lissa_residual']):.3g} (0 = converged to exact).")
            else:
                notes.append(f"LiSSA: {args.lissa_iterations} steps on seeded random mini-batches of {args.lissa_batch} "
                             "train records (stochastic, as in Koh & Liang).")
        if args.bootstrap:
            boots = {e: bootstrap(influence[e], args.bootstrap, args.top_k, args.seed) for e in names}
            doc["bootstrap"] = boots
            doc["rank_stability"] = {e: boots[e]["rank_stability"] for e in names}
        if args.split_half:
            doc["split_half"] = {e: split_half_from_stats(stats, lambda s, e=e: block_influence(s, targets, e, **opts),
                                                          args.top_k, args.seed) for e in names}
        doc |= {"notes": notes, "version": __version__}
        write_safetensors(out / "influence.safetensors",
                          {f"{e}.layer.{l}": influence[e][l].float() for e in names for l in layers})
        write_text(out / "estimators.csv", _csv([["layer", *names]] + [[l, *(scores[e][i] for e in names)]
                                                                        for i, l in enumerate(layers)]))
        keys = ["a", "b", "spearman", "pearson", "top_k_overlap", "sample_spearman"]
        write_text(out / "agreement.csv", _csv([keys] + [[p[k] for k in keys] for p in pairs]))
        write_figure(out / "estimators.png", estimators_figure(names, layers, scores, pairs))
        write_config(out, "compare-estimators", args)
        write_json(out / "estimators.json", doc)
        write_report(out)
    out = Path(args.out)
    lines = [f"{lm.name} · task {label} · target {args.target} · {len(train)} train x {len(val)} validation · "
             f"{passes} pass(es), shared by {len(names)} estimators",
             f"{'a':>9} {'b':>9} {'Spearman':>9} {'Pearson':>8} {'top-k':>6}"]
    lines += [f"{p['a']:>9} {p['b']:>9} {fmt(p['spearman'], 3):>9} {fmt(p['pearson'], 3):>8} {p['top_k_overlap']:>6.2f}"
              for p in pairs]
    lines.append(f"wrote {out}/estimators.json, estimators.csv, agreement.csv, estimators.png, influence.safetensors, "
                 "report.md, report.html")
    return "\n".join(lines)
