"""``layerif compare-moe``: LoRA-MoE expert allocations at equal T over seeds, through the harness."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import allocate, progress
from ..allocate import COMPARE_EXPERTS, allocate_experts, top_k_for
from ..io import overwrite_field, pyplot
from ..moe import remove_lora_moe
from ..options import option
from ..train import evaluate_records
from .base import register
from .compare import Comparison, Metric, cell, group, paired_section, parse_list, single_verdict, stats
from .moe import MoeOptions, fit, metric_of, setting

FIELDS = ("allocation", "seed", "accuracy", "exact_match", "final_loss", "trainable_params", "seconds")
METRICS = (Metric("accuracy", True, 4, "accuracy"), Metric("exact_match", True, 4, "exact match"))
ITEMS = {"accuracy": "accuracy", "exact_match": "exact_match"}


@dataclass
class CompareMoeArgs(MoeOptions):
    """Compare expert allocations (LayerIF both ways, AlphaLoRA, uniform) at equal T over several seeds."""

    allocations: list[str] = option(list(COMPARE_EXPERTS), "allocations to compare")
    seeds: list[str] = option(["0", "1", "2"], "training seeds (at least 3 for mean ± std)")
    out: str = option("out/compare-moe", "output folder")
    overwrite: bool = overwrite_field()


def markdown(rows: list[dict], allocs: dict[str, np.ndarray], meta: dict) -> str:
    """comparison.md: mean ± std over seeds per allocation, best mean in bold, the verdict, the paired
    differences (where the rows keep their per-item results) and the allocations."""
    base = next(r for r in rows if r["allocation"] == "base")
    lines = [f"# LoRA-MoE expert allocations on {meta['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    lines += [f"- base model without adapter: accuracy {base['accuracy']:.4f}, exact match {base['exact_match']:.4f}",
              "", "| allocation | accuracy ↑ | exact match ↑ | final train loss¹ | trainable params | train time (s) | seeds |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    arms = {a: [r for r in rows if r["allocation"] == a] for a in allocs}
    st = stats(arms, ["accuracy", "exact_match", "final_loss", "trainable_params", "seconds"])
    acc, em = METRICS
    for a in arms:
        lines.append(f"| {a} | {cell(st, a, acc)} | {cell(st, a, em)} | {st[a]['final_loss'][0]:.4f} | "
                     f"{int(st[a]['trainable_params'][0]):,} | {st[a]['seconds'][0]:.1f} ± {st[a]['seconds'][1]:.1f} | "
                     f"{len(arms[a])} |")
    lines += ["", "¹ mean training loss over the last 10% of the steps, averaged over seeds."]
    if "layerif" in arms:
        verdict = single_verdict({a: s["accuracy"][0] for a, s in st.items()}, acc)
        lines += ["", f"{verdict} (compare the gaps with the standard deviations over seeds)."]
    known = [a for a in arms if allocate.parse_label(a)[0] in allocate.ALLOCATIONS]
    lines += paired_section(group([r for r in rows if r["allocation"] in arms], lambda r: "all"), METRICS, ITEMS,
                            baselines=[a for a in known if allocate.get(a, "experts")[0].metric != "scores"],
                            subjects=[a for a in known if allocate.get(a, "experts")[0].metric == "scores"],
                            label=lambda k: "test items")
    lines += ["", "## Experts per block", "", "| allocation | experts (block 0 → L−1) |", "|---|---|"]
    lines += [f"| {a} | {' '.join(map(str, e.tolist()))} |" for a, e in allocs.items()]
    return "\n".join(lines) + "\n"


def plot(allocs: dict[str, np.ndarray], title: str):
    """Experts per block, one line per allocation."""
    fig, ax = pyplot().subplots(figsize=(8, 3.4))
    for a, e in allocs.items():
        ax.plot(range(len(e)), e, marker="o", markersize=3, label=a)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("LoRA experts")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def run(args: CompareMoeArgs) -> str:
    """``layerif compare-moe``: every allocation × seed, then the comparison files.

    Writes comparison.csv (one row per run, after every run), comparison.md,
    experts_per_layer.png, allocations.json and config.json into ``args.out``.
    """
    allocations = parse_list(args.allocations, str, "allocations")
    seeds = parse_list(args.seeds, int, "seeds")
    args.check(allocations)
    with Comparison("compare-moe", args, FIELDS, FIELDS[:2]) as cmp:
        return _runs(args, cmp, allocations, seeds)


def _runs(args: CompareMoeArgs, cmp: Comparison, allocations: list[str], seeds: list[int]) -> str:
    """Every allocation × seed into the staging folder, then the comparison files; returns the summary."""
    s = setting(args)
    allocs = {a: allocate_experts(a, metric_of(s, a), s.n_blocks, args.total_experts, args.beta) for a in allocations}
    total = int(next(iter(allocs.values())).sum())
    meta = {"model": s.lm.name,
            "task": f"{s.task} ({len(s.train_records)} train items, {len(s.test_records)} test items)",
            "scores": f"{args.scores} (target {s.scores_doc.get('target')}, estimator {s.scores_doc.get('estimator')})"
            if args.scores else "none",
            "budget": f"T = {total} experts over {s.n_blocks} blocks, β = {args.beta:g}, "
                      "top-2 where a block has > 1 expert",
            "adapter": f"targets {args.targets}, rank {args.rank}, alpha {args.lora_alpha:g}, dropout {args.dropout:g}, "
                       f"load-balancing coefficient {args.aux_loss_coef:g}",
            "training": f"{args.steps} steps × {args.batch_size * args.grad_accum} records, AdamW lr {args.lr:g}, "
                        f"warm-up {args.warmup:g}, then linear decay",
            "seeds": ", ".join(map(str, seeds)),
            "accuracy": "multiple-choice log-likelihood; exact match: greedy completion"}
    cmp.write_config()
    base = evaluate_records(s.lm.model, s.lm.tokenizer, s.test_records, args.eval_batch_size, args.max_new_tokens)
    rows = [{"allocation": "base", "seed": "-", **base, "final_loss": float("nan"), "trainable_params": 0,
             "seconds": 0.0}]
    for seed, a in progress.track([(seed, a) for seed in seeds for a in allocations], desc="compare-moe", unit="run"):
        r = fit(s, args, allocs[a], seed)
        remove_lora_moe(s.lm.model)
        tail = r["losses"][-max(1, len(r["losses"]) // 10):]
        rows.append({"allocation": a, "seed": str(seed), "accuracy": r["accuracy"], "exact_match": r["exact_match"],
                     "final_loss": sum(tail) / len(tail),
                     "trainable_params": r["trainable_params"], "seconds": r["seconds"], "items": r["items"]})
        cmp.save_rows(rows)
    md = markdown(rows, allocs, meta)
    cmp.save_rows(rows)
    files = {"comparison.md": md,
             "allocations.json": {a: {"layers": list(range(s.n_blocks)), "experts": e.tolist(),
                                      "top_k": top_k_for(e).tolist()} for a, e in allocs.items()},
             "experts_per_layer.png": plot(allocs, f"{s.lm.name} · task {s.task} · T={total}")}
    return cmp.finish(files, md)


register("compare-moe", CompareMoeArgs, run,
         "compare LoRA-MoE expert allocations (LayerIF, AlphaLoRA, uniform) over seeds")
