"""``layerif finetune``: plain LoRA on the blocks (and at the ranks) a capacity rule picks from a per-block metric."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import progress
from ..allocate import CAPACITY_METRICS, capacity_ranks, parse_capacity
from ..errors import UserError
from ..finetune import SAVED_KIND, apply_lora, ranks_summary, remove_lora, save, trainable_parameters
from ..io import overwrite_field, pyplot
from ..lm_eval_io import table as lm_eval_table
from ..measure import NEEDS_SCORES, Setting, block_metric, setting
from ..options import LoraOptions, ModelOptions, TrainingOptions, ValidationSource, option
from ..results import check_save_dir, config_doc
from ..train import evaluate_records, train
from .base import register


@dataclass
class FinetuneOptions(ValidationSource, LoraOptions, TrainingOptions, ModelOptions):
    """Options shared by ``layerif finetune`` and ``layerif compare-finetune``."""

    metric: str = option("layerif", "metric of top / bottom / rank: layerif (S_l of --scores), alpha "
                                    "(heavy-tail α), gain (measured fine-tune gain of --validation)",
                         choices=list(CAPACITY_METRICS))
    rank: int = option(8, "LoRA rank r of an adapted block; the budget is --blocks × r rank units")
    beta: float = option(1.0, "rank allocation: r_l ∝ (m_l − min m)^β, each ≥ 1")

    def check(self, labels: Sequence[str], blocks: Sequence[int]) -> None:
        """Checks that need no model: the labels, their metrics' files, the budgets, the training options."""
        for label in labels:
            _, named = parse_capacity(label, self.metric)
            kind = CAPACITY_METRICS.get(named) if named else None
            if kind == "scores" and self.scores is None:
                raise UserError(NEEDS_SCORES)
        if any(k < 1 for k in blocks):
            raise UserError("--blocks must be ≥ 1")
        if self.rank < 1:
            raise UserError(f"--rank must be ≥ 1 (got {self.rank})")
        if not self.beta >= 0:
            raise UserError(f"--beta must be ≥ 0 (got {self.beta})")
        self.check_validation(any(CAPACITY_METRICS.get(parse_capacity(a, self.metric)[1] or "") == "gain"
                                  for a in labels))
        self.check_training()

    def ranks(self, s: Setting, label: str, blocks: int, draw_seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """(LoRA rank per block int64 [L], the metric it ranked by or None) of ``label`` at ``blocks`` × rank."""
        _, named = parse_capacity(label, self.metric)
        metric = block_metric(s.sources, CAPACITY_METRICS[named]) if named else None
        return capacity_ranks(label, metric, s.n_blocks, blocks, self.rank, self.beta, draw_seed, self.metric), metric


def fit(s: Setting, args: FinetuneOptions, ranks: np.ndarray, seed: int) -> tuple[object, dict]:
    """Wrap the model with a fresh LoRA adapter of per-block ``ranks``, train it and evaluate it on the test split.

    Returns (the PEFT model, still wrapped; the run's numbers: losses, accuracy, exact_match, items,
    trainable_params, seconds of training).
    """
    model = apply_lora(s.lm.model, ranks.tolist(), args.targets, args.rank, args.lora_alpha, args.dropout, seed)
    try:
        result = train(model, s.lm.tokenizer, s.train_records, args.train_config(seed))  # stops on a non-finite loss
    except BaseException:
        remove_lora(model)
        raise
    scores = args.with_lm_eval(evaluate_records(model, s.lm.tokenizer, s.test_records, args.eval_batch_size,
                                                args.max_new_tokens), model, s.lm.tokenizer)
    return model, {"losses": result.losses, **scores, "trainable_params": trainable_parameters(model),
                   "seconds": round(result.seconds, 2)}


def loss_figure(losses: list[float], title: str):
    """The training loss per step."""
    fig, ax = pyplot().subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("completion-token loss (nats)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


@dataclass
class FinetuneArgs(FinetuneOptions):
    """Fine-tune plain LoRA on the blocks (and at the ranks) an allocation picks from a per-block metric."""

    allocation: str = option("top", "top, bottom, rank (by --metric, or RULE:METRIC), random, first, last, uniform")
    blocks: int = option(8, "K: the budget is K blocks × --rank (top/bottom/random/first/last: rank r on K blocks; "
                            "uniform/rank: K × r rank units over every block)")
    draw_seed: int = option(0, "seed of the random allocation's draw of blocks")
    seed: int = option(0, "seed of the adapter's initialisation, data order and dropout")
    save: str | None = option(None, "folder for the PEFT adapter, allocation.json, loss.png, config.json and the report")
    overwrite: bool = overwrite_field("--save")


def run(args: FinetuneArgs) -> str:
    """``layerif finetune``: allocate, fine-tune, evaluate, save; returns the terminal summary."""
    args.check([args.allocation], [args.blocks])
    if args.save is not None:
        check_save_dir(args.save, SAVED_KIND, args.overwrite, args.model)
    s = setting(args, lambda n: capacity_ranks("first", None, n, args.blocks, args.rank))  # K ≤ L, early
    ranks, metric = args.ranks(s, args.allocation, args.blocks, args.draw_seed)
    label = args.allocation if ":" in args.allocation or metric is None else f"{args.allocation}:{args.metric}"
    progress.info(f"{label}: {ranks_summary(ranks)} ({int(ranks.sum())} rank units); training")
    model, r = fit(s, args, ranks, args.seed)
    lines = [
        f"{s.lm.name} · task {s.task} · allocation {label} · budget {args.blocks} blocks × rank {args.rank} · "
        f"{r['trainable_params']:,} trainable parameters",
        f"LoRA: {ranks_summary(ranks)}",
        f"training: {args.steps} steps, loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, {r['seconds']:.1f} s",
        f"test ({len(s.test_records)} items): accuracy {r['accuracy']:.4f} (multiple choice), "
        f"exact match {r['exact_match']:.4f} (greedy)",
    ]
    if "lm_eval" in r:
        lines.append(lm_eval_table(r["lm_eval"]))
    if args.save is not None:
        doc = {"model": s.lm.name, "task": s.task, "allocation": label, "blocks": args.blocks, "rank": args.rank,
               "budget_rank_units": int(ranks.sum()), "ranks": ranks.tolist(),
               "adapted_blocks": [l for l, x in enumerate(ranks) if x > 0],
               "metric": None if metric is None else {"name": label.partition(":")[2],
                                                      "values": [float(m) for m in metric]},
               "trainable_params": r["trainable_params"],
               "result": {k: v for k, v in r.items() if k in ("accuracy", "exact_match", "seconds", "losses")
                          or k.startswith("lm_eval/")},
               "n_train": len(s.train_records), "n_test": len(s.test_records)}
        files = {"config.json": config_doc("finetune", args),
                 "loss.png": loss_figure(r["losses"], f"{s.lm.name} · {s.task} · {label}")}
        dest = save(model, args.save, doc, files, args.overwrite, args.model)
        lines.append(f"wrote {dest}/ (adapter_config.json, adapter_model.safetensors, allocation.json, loss.png, "
                     "config.json, report.md, report.html)")
    remove_lora(model)
    return "\n".join(lines)


register("finetune", FinetuneArgs, run,
         "fine-tune LoRA on the blocks, and at the ranks, chosen from layer scores (or a baseline)")
