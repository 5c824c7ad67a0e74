"""``layerif compare-finetune``: which blocks to fine-tune, at equal LoRA budgets, over seeds and random draws.

Every allocation of one budget K trains the same number of parameters (K × rank rank units). The ``random``
reference is pooled over ``--draws`` draws of K blocks: draw d is trained with seed ``seeds[d mod S]``, and a
seed's random reference is the mean, item by item, over the draws trained with it; the paired intervals then
resample seeds and items as for every other arm (:func:`layerif.commands.compare.paired_section`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import progress
from ..allocate import CAPACITY_METRICS, capacity_ranks, parse_capacity
from ..errors import UserError
from ..finetune import ranks_summary, remove_lora
from ..io import label_axes, overwrite_field, pyplot
from ..measure import setting
from ..options import option
from ..train import evaluate_records
from .base import register
from ..lm_eval_io import lm_eval_keys, task_names
from .compare import Comparison, Metric, cell, group, lm_eval_metrics, lm_eval_tables, paired_section, parse_list, stats
from .finetune import FinetuneOptions, fit

FIELDS = ("allocation", "blocks", "seed", "draw", "accuracy", "exact_match", "final_loss", "trainable_params",
          "seconds")
METRICS = (Metric("accuracy", True, 4, "accuracy"), Metric("exact_match", True, 4, "exact match"))
ITEMS = {"accuracy": "accuracy", "exact_match": "exact_match"}
COMPARE = ("top:layerif", "rank:layerif", "random", "bottom:layerif", "last", "uniform", "top:alpha")


@dataclass
class CompareFinetuneArgs(FinetuneOptions):
    """Compare LoRA block allocations (by LayerIF, by the measured gain, baselines) at equal budgets over seeds."""

    allocations: list[str] = option(list(COMPARE), "allocations (RULE or RULE:METRIC; add top:gain with --validation)")
    budgets: list[str] = option(["4", "8"], "budgets K (blocks × --rank), comma-separated")
    seeds: list[str] = option(["0", "1", "2"], "training seeds (at least 3 for mean ± std)")
    draws: int = option(5, "random draws of K blocks, pooled as the random reference (draw d uses seed d mod S)")
    out: str = option("out/compare-finetune", "output folder")
    overwrite: bool = overwrite_field()


def label(a: str, metric: str) -> str:
    """The canonical label of an allocation: ``RULE:METRIC`` for rules with a metric, else ``RULE``."""
    rule, named = parse_capacity(a, metric)
    return f"{rule.name}:{named}" if named else rule.name


def pooled(rows: list[dict]) -> list[dict]:
    """The rows with each (budget, seed)'s random draws replaced by one row: their item-by-item mean."""
    out, done = [], set()
    for r in rows:
        if r["allocation"] != "random":
            out.append(r)
            continue
        key = (r["blocks"], r["seed"])
        if key in done:
            continue
        done.add(key)
        same = [x for x in rows if x["allocation"] == "random" and (x["blocks"], x["seed"]) == key]
        lm = [k for k in r if k.startswith("lm_eval/")]
        mean = {k: float(np.mean([x[k] for x in same])) for k in ("accuracy", "exact_match", "final_loss",
                                                                    "trainable_params", "seconds", *lm)}
        items = {k: np.mean([x["items"][k] for x in same], axis=0).tolist() for k in (*ITEMS.values(), *lm)}
        out.append({**r, **mean, "draw": ",".join(x["draw"] for x in same), "items": items})
    return out


def markdown(rows: list[dict], meta: dict, ranks: dict[tuple[str, int], np.ndarray]) -> str:
    """comparison.md: per budget, mean ± std over seeds (random: over seeds of the pooled draws), the
    trainable parameters, the paired differences, and the blocks each allocation adapted."""
    base = next(r for r in rows if r["allocation"] == "base")
    lines = [f"# LoRA block allocations on {meta['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    lines += [f"- base model without adapter: accuracy {base['accuracy']:.4f}, exact match {base['exact_match']:.4f}"]
    runs = [r for r in rows if r["allocation"] != "base"]
    settings = group(pooled(runs), lambda r: r["blocks"])
    for k, arms in settings.items():
        st = stats(arms, ["accuracy", "exact_match", "final_loss", "trainable_params", "seconds"])
        params = [st[a]["trainable_params"][0] for a in arms]
        lines += ["", f"## Budget K = {k} blocks × rank {meta['rank']}", "",
                  f"Trainable parameters: {int(min(params)):,}–{int(max(params)):,} over the allocations.", "",
                  "| allocation | accuracy ↑ | exact match ↑ | final train loss¹ | train time (s) | runs |",
                  "|---|---:|---:|---:|---:|---:|"]
        acc, em = METRICS
        for a, rs in arms.items():
            n = sum(1 for r in runs if r["allocation"] == a and r["blocks"] == k)
            lines.append(f"| {a} | {cell(st, a, acc)} | {cell(st, a, em)} | {st[a]['final_loss'][0]:.4f} | "
                         f"{st[a]['seconds'][0]:.1f} | {n} |")
    lines += ["", "¹ mean training loss over the last 10% of the steps, averaged over runs."]
    extra = lm_eval_metrics(rows)
    if extra:
        lines += lm_eval_tables(settings, extra, lambda k: f"K = {k}", base, "base")
    labels = list(dict.fromkeys(r["allocation"] for r in runs))
    subjects = [a for a in labels if a.endswith(":layerif")]
    baselines = [a for a in labels if a not in subjects and not a.endswith(":gain")]
    pairs = [(s, ref) for s in subjects for ref in ("random", "last", *[a for a in labels if a.endswith(":gain")])]
    lines += paired_section(settings, (*METRICS, *extra), {**ITEMS, **{m.key: m.key for m in extra}},
                            baselines=baselines, subjects=subjects,
                            label=lambda k: f"K = {k}", pairs=pairs)
    lines += ["", "## Adapted blocks", "", "| allocation | K | LoRA |", "|---|---:|---|"]
    lines += [f"| {a} | {k} | {ranks_summary(r)} |" for (a, k), r in ranks.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str):
    """Accuracy against budget, one line per allocation (mean ± std over seeds; random pooled over draws)."""
    fig, ax = pyplot().subplots(figsize=(7, 3.8))
    runs = pooled([r for r in rows if r["allocation"] != "base"])
    for a in dict.fromkeys(r["allocation"] for r in runs):
        ks = sorted({r["blocks"] for r in runs if r["allocation"] == a})
        vals = [[r["accuracy"] for r in runs if r["allocation"] == a and r["blocks"] == k] for k in ks]
        ax.errorbar(ks, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], marker="o", capsize=3, label=a)
    label_axes(ax, "budget K (blocks × rank)", "test accuracy (multiple choice)", title)
    return fig


def run(args: CompareFinetuneArgs) -> str:
    """``layerif compare-finetune``: every budget × allocation × seed (random: × draw), then the comparison files.

    Writes comparison.csv (one row per run, after every run), items.json, comparison.md, accuracy_by_budget.png,
    allocations.json, config.json and the report into ``args.out``.
    """
    allocations = [label(a, args.metric) for a in parse_list(args.allocations, str, "allocations")]
    budgets = parse_list(args.budgets, int, "budgets")
    seeds = parse_list(args.seeds, int, "seeds")
    if args.draws < 1:
        raise UserError(f"--draws must be ≥ 1 (got {args.draws})")
    args.check(allocations, budgets)
    fields = FIELDS + tuple(lm_eval_keys(task_names(args.lm_eval_tasks)))
    with Comparison("compare-finetune", args, fields, ("allocation", "blocks", "seed", "draw")) as cmp:
        return _runs(args, cmp, allocations, budgets, seeds)


def _runs(args: CompareFinetuneArgs, cmp: Comparison, allocations: list[str], budgets: list[int],
          seeds: list[int]) -> str:
    s = setting(args, lambda n: [capacity_ranks("first", None, n, k, args.rank) for k in budgets])  # K ≤ L, early
    plan = [(k, a, seed, "-") for k in budgets for seed in seeds for a in allocations if a != "random"]
    if "random" in allocations:
        plan += [(k, "random", seeds[d % len(seeds)], str(d)) for k in budgets for d in range(args.draws)]
    ranks = {(a, k) if a != "random" else (f"random (draw {d})", k):
             args.ranks(s, a, k, int(d) if d != "-" else 0)[0] for k, a, _, d in plan}
    used = {CAPACITY_METRICS[n] for a in allocations if (n := parse_capacity(a, args.metric)[1])}
    meta = {"model": s.lm.name,
            "task": f"{s.task} ({len(s.train_records)} train items, {len(s.test_records)} distinct test items)",
            "scores": f"{args.scores} (target {s.scores_doc.get('target')}, estimator {s.scores_doc.get('estimator')})"
            if "scores" in used else "not used",
            "validation": args.validation if "gain" in used else "not used",
            "rank": args.rank,
            "adapter": f"PEFT LoRA on {args.targets}, rank {args.rank} per adapted block (rank: r_l ∝ metric^β, "
                       f"β = {args.beta:g}), alpha {args.lora_alpha:g} × r_l / {args.rank}, dropout {args.dropout:g}",
            "training": f"{args.steps} steps × {args.batch_size * args.grad_accum} records, AdamW lr {args.lr:g}, "
                        f"warm-up {args.warmup:g}, then linear decay",
            "seeds": ", ".join(map(str, seeds)),
            "random": f"{args.draws} draws of K blocks per budget, draw d trained with seed d mod {len(seeds)}; "
                      "pooled item by item per seed" if "random" in allocations else "not run",
            "accuracy": "multiple-choice log-likelihood; exact match: greedy completion"}
    cmp.write_config()
    base = args.with_lm_eval(evaluate_records(s.lm.model, s.lm.tokenizer, s.test_records, args.eval_batch_size,
                                              args.max_new_tokens), s.lm.model, s.lm.tokenizer)
    base.pop("lm_eval", None)
    rows = [{"allocation": "base", "blocks": 0, "seed": "-", "draw": "-", **base, "final_loss": float("nan"),
             "trainable_params": 0, "seconds": 0.0}]
    for k, a, seed, d in progress.track(plan, desc="compare-finetune", unit="run"):
        ranks_l = ranks[(a, k) if a != "random" else (f"random (draw {d})", k)]
        model, r = fit(s, args, ranks_l, seed)
        remove_lora(model)
        tail = r["losses"][-max(1, len(r["losses"]) // 10):]
        rows.append({"allocation": a, "blocks": k, "seed": str(seed), "draw": d, "accuracy": r["accuracy"],
                     "exact_match": r["exact_match"], "final_loss": sum(tail) / len(tail),
                     "trainable_params": r["trainable_params"], "seconds": r["seconds"], "items": r["items"],
                     **{k: v for k, v in r.items() if k.startswith("lm_eval/")}})
        cmp.save_rows(rows)
    md = markdown(rows, meta, ranks)
    files = {"comparison.md": md,
             "allocations.json": [{"allocation": a, "blocks": k, "layers": list(range(s.n_blocks)),
                                   "ranks": r.tolist()} for (a, k), r in ranks.items()],
             "accuracy_by_budget.png": plot(rows, f"{s.lm.name} · task {s.task} · rank {args.rank}")}
    return cmp.finish(files, md)


register("compare-finetune", CompareFinetuneArgs, run,
         "compare which blocks get LoRA (LayerIF, measured gain, random, depth recipes) at equal budgets over seeds")
