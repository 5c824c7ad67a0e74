"""``layerif compare-moe``: LoRA-MoE expert allocations at equal T over seeds (and β), through the harness.

An *arm* is an allocation at one β. With one β (``--beta``, or one value of
``--betas``) an arm is labelled by its allocation alone (``layerif``); with a β
sweep every allocation that maps a metric runs at each β and is labelled
``NAME@β=B`` (``layerif@β=2.5``; β = 0 is the uniform map), while ``uniform``
runs once. Every arm has the same budget T. Arms whose expert counts coincide
(β = 0 and ``uniform``) share their runs: same adapter, data and seeds, so one run stands for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import allocate, progress
from ..allocate import COMPARE_EXPERTS, allocate_experts, check_beta, top_k_for, uniform_experts
from ..io import label_axes, overwrite_field, pyplot
from ..lm_eval_io import lm_eval_keys, task_names
from ..measure import allocation_metric, setting
from ..moe import remove_lora_moe
from ..options import option
from ..train import evaluate_records
from .base import register
from .compare import (Comparison, Metric, cell, group, lm_eval_metrics, lm_eval_tables, paired_section, parse_list,
                      single_verdict, stats)
from .moe import MoeOptions, fit

FIELDS = ("allocation", "beta", "seed", "accuracy", "exact_match", "final_loss", "trainable_params", "seconds")
KEY_FIELDS = ("allocation", "seed")  # an arm's label holds its β
AT_BETA = "@β="
METRICS = (Metric("accuracy", True, 4, "accuracy"), Metric("exact_match", True, 4, "exact match"))
ITEMS = {"accuracy": "accuracy", "exact_match": "exact_match"}


@dataclass
class CompareMoeArgs(MoeOptions):
    """Compare expert allocations (LayerIF both ways, AlphaLoRA, the measured gain, uniform) at equal T over
    several seeds and, with --betas, several β."""

    allocations: list[str] = option(list(COMPARE_EXPERTS), "allocations to compare (gain needs --validation)")
    betas: list[str] = option([], "β values to sweep, e.g. 0,1,2.5: each allocation with a metric runs at each "
                                  "(β = 0 is uniform; default: --beta alone)")
    seeds: list[str] = option(["0", "1", "2"], "training seeds (at least 3 for mean ± std)")
    out: str = option("out/compare-moe", "output folder")
    overwrite: bool = overwrite_field()


def number(beta: float) -> str:
    """β as written in an arm label: the shortest form that reads back as the same float (1, 2.5, 0.125)."""
    short = f"{beta:g}"
    return short if float(short) == beta else repr(beta)


def arms_of(allocations: list[str], betas: list[float]) -> dict[str, tuple[str, float | None]]:
    """Arm label -> (allocation, β): every allocation that maps a metric at each β (labelled ``NAME@β=B`` when
    there is more than one β, else ``NAME``); an allocation without a metric (``uniform``) once, with β None."""
    out: dict[str, tuple[str, float | None]] = {}
    for a in allocations:
        if allocate.get(a, "experts")[0].metric is None:
            out[a] = (a, None)
        else:
            out.update({a if len(betas) == 1 else f"{a}{AT_BETA}{number(b)}": (a, b) for b in betas})
    return out


def allocation_of(arm: str) -> str:
    """The allocation label of an arm label (``layerif-reversed@β=1`` -> ``layerif-reversed``)."""
    return arm.split(AT_BETA)[0]


def _metric_kinds(arms) -> dict[str, str | None]:
    """Arm label -> the metric its allocation maps, for the arms of registered allocations."""
    return {a: allocate.get(allocation_of(a), "experts")[0].metric for a in arms
            if allocate.parse_label(allocation_of(a))[0] in allocate.ALLOCATIONS}


def markdown(rows: list[dict], allocs: dict[str, np.ndarray], meta: dict) -> str:
    """comparison.md: mean ± std over seeds per arm, best mean in bold, the verdict on each LayerIF arm, the paired
    differences (where the rows keep their per-item results) and the allocations.

    Paired: the LayerIF arms against ``uniform`` and the best baseline (an arm mapping no metric or α), and against
    the measured ``gain`` arm at the same β; every other arm against ``uniform``."""
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
    extra = lm_eval_metrics(rows)
    if extra:
        lines += lm_eval_tables({"all": arms}, extra, lambda k: "test items", base, "base")
    means = {a: s["accuracy"][0] for a, s in st.items()}
    verdicts = dict.fromkeys(single_verdict(means, acc, subject=a, name="LayerIF" + a[len("layerif"):])
                             for a in arms if allocation_of(a) == "layerif")  # "no allocation wins" once
    if verdicts:
        lines += ["", *(f"{v} (compare the gaps with the standard deviations over seeds)." for v in verdicts)]
    kinds = _metric_kinds(arms)
    subjects = [a for a, k in kinds.items() if k == "scores"]
    suffix = {a: a[len(allocation_of(a)):] for a in kinds}
    pairs = [(a, "uniform") for a, k in kinds.items() if k not in (None, "scores")]
    pairs += [(a, g) for a in subjects for g, k in kinds.items() if k == "gain" and suffix[g] == suffix[a]]
    lines += paired_section(group([r for r in rows if r["allocation"] in arms], lambda r: "all"), (*METRICS, *extra),
                            {**ITEMS, **{m.key: m.key for m in extra}},
                            baselines=[a for a, k in kinds.items() if k not in ("scores", "gain")],
                            subjects=subjects, label=lambda k: "test items", pairs=pairs)
    lines += ["", "## Experts per block", "", "| allocation | experts (block 0 → L−1) |", "|---|---|"]
    lines += [f"| {a} | {' '.join(map(str, e.tolist()))} |" for a, e in allocs.items()]
    return "\n".join(lines) + "\n"


def plot(allocs: dict[str, np.ndarray], title: str):
    """Experts per block, one line per allocation."""
    fig, ax = pyplot().subplots(figsize=(8, 3.4))
    for a, e in allocs.items():
        ax.plot(range(len(e)), e, marker="o", markersize=3, label=a)
    label_axes(ax, "decoder block", "LoRA experts", title)
    return fig


def run(args: CompareMoeArgs) -> str:
    """``layerif compare-moe``: every arm (allocation at a β) × seed, then the comparison files.

    Writes comparison.csv (one row per arm and seed, after every run), comparison.md,
    experts_per_layer.png, allocations.json and config.json into ``args.out``.
    """
    allocations = parse_list(args.allocations, str, "allocations")
    seeds = parse_list(args.seeds, int, "seeds")
    betas = [check_beta(b) for b in parse_list(args.betas or [args.beta], float, "betas")]
    args.check(allocations)
    fields = FIELDS + tuple(lm_eval_keys(task_names(args.lm_eval_tasks)))
    with Comparison("compare-moe", args, fields, KEY_FIELDS) as cmp:
        return _runs(args, cmp, arms_of(allocations, betas), betas, seeds)


def _runs(args: CompareMoeArgs, cmp: Comparison, arms: dict[str, tuple[str, float | None]], betas: list[float],
          seeds: list[int]) -> str:
    """Every arm × seed into the staging folder, then the comparison files; returns the summary."""
    s = setting(args, lambda n: args.total_experts is None or uniform_experts(n, args.total_experts))  # T, early
    allocs = {arm: allocate_experts(a, allocation_metric(a, s.sources, "experts"), s.n_blocks, args.total_experts,
                                    args.beta if b is None else b)
              for arm, (a, b) in arms.items()}
    total = int(next(iter(allocs.values())).sum())
    first: dict[tuple, str] = {}
    source = {arm: first.setdefault(tuple(allocs[arm].tolist()), arm)  # an arm without a metric is the one that runs
              for arm in sorted(allocs, key=lambda a: arms[a][1] is not None)}
    shared = {arm: src for arm, src in source.items() if arm != src}
    meta = {"model": s.lm.name,
            "task": f"{s.task} ({len(s.train_records)} train items, {len(s.test_records)} test items)",
            "scores": f"{args.scores} (target {s.scores_doc.get('target')}, estimator {s.scores_doc.get('estimator')})"
            if args.scores else "none",
            **({"measured gain": f"{args.validation} (fine-tune gain per block of `layerif validate`)"}
               if s.gains is not None else {}),
            "budget": f"T = {total} experts over {s.n_blocks} blocks, β = {', '.join(map(number, betas))}, "
                      "top-2 where a block has > 1 expert",
            "adapter": f"targets {args.targets}, rank {args.rank}, alpha {args.lora_alpha:g}, dropout {args.dropout:g}, "
                       f"load-balancing coefficient {args.aux_loss_coef:g}",
            "training": f"{args.steps} steps × {args.batch_size * args.grad_accum} records, AdamW lr {args.lr:g}, "
                        f"warm-up {args.warmup:g}, then linear decay",
            "seeds": ", ".join(map(str, seeds)),
            **({"shared runs": "; ".join(f"{a} has the expert counts of {src} (its runs are {src}'s)"
                                         for a, src in shared.items())} if shared else {}),
            "accuracy": "multiple-choice log-likelihood; exact match: greedy completion"}
    cmp.write_config()
    base = args.with_lm_eval(evaluate_records(s.lm.model, s.lm.tokenizer, s.test_records, args.eval_batch_size,
                                              args.max_new_tokens), s.lm.model, s.lm.tokenizer)
    base.pop("lm_eval", None)
    rows = [{"allocation": "base", "beta": "-", "seed": "-", **base, "final_loss": float("nan"), "trainable_params": 0,
             "seconds": 0.0}]
    done: dict[tuple[str, int], dict] = {}

    def arm_rows() -> list[dict]:
        return rows + [{"allocation": arm, "beta": "-" if b is None else number(b), "seed": str(seed),
                        **done[source[arm], seed]}
                       for seed in seeds for arm, (_, b) in arms.items() if (source[arm], seed) in done]

    runs = [(seed, arm) for seed in seeds for arm in arms if source[arm] == arm]
    for seed, arm in progress.track(runs, desc="compare-moe", unit="run"):
        r = fit(s, args, allocs[arm], seed)
        remove_lora_moe(s.lm.model)
        tail = r["losses"][-max(1, len(r["losses"]) // 10):]
        done[arm, seed] = {"accuracy": r["accuracy"], "exact_match": r["exact_match"],
                           "final_loss": sum(tail) / len(tail), "trainable_params": r["trainable_params"],
                           "seconds": r["seconds"], "items": r["items"],
                           **{k: v for k, v in r.items() if k.startswith("lm_eval/")}}
        cmp.save_rows(arm_rows())
    rows = arm_rows()
    md = markdown(rows, allocs, meta)
    cmp.save_rows(rows)
    files = {"comparison.md": md,
             "allocations.json": {a: {"layers": list(range(s.n_blocks)), "experts": e.tolist(),
                                      "top_k": top_k_for(e).tolist(), "beta": arms[a][1]} for a, e in allocs.items()},
             "experts_per_layer.png": plot(allocs, f"{s.lm.name} · task {s.task} · T={total}")}
    return cmp.finish(files, md)


register("compare-moe", CompareMoeArgs, run,
         "compare LoRA-MoE expert allocations (LayerIF, AlphaLoRA, measured gain, uniform) over seeds and β")
