"""``layerif moe``: a LoRA mixture of experts with per-block expert counts from LayerIF scores (or a baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .. import allocate, progress
from ..allocate import allocate_experts, top_k_for
from ..errors import UserError
from ..io import overwrite_field
from ..measure import NEEDS_SCORES, Setting, allocation_metric, label_of, setting
from ..moe import (ADAPTER_FILE, MoeConfig, apply_lora_moe, aux_loss, save_adapter, trainable_parameters)
from ..options import LoraOptions, ModelOptions, TrainingOptions, ValidationSource, option
from ..results import ALLOCATION_FILE, check_save_dir
from ..train import evaluate_records, train
from .base import register

@dataclass
class MoeOptions(ValidationSource, LoraOptions, TrainingOptions, ModelOptions):
    """Options shared by ``layerif moe`` and ``layerif compare-moe``."""

    total_experts: int | None = option(None, "T, the experts over all blocks (default: 5 × blocks)")
    beta: float = option(2.5, "β, the sharpness of the allocation (layerif, alpha, gain)")
    rank: int = option(8, "LoRA rank r of every expert")
    aux_loss_coef: float = option(0.01, "weight of the load-balancing loss (0: off)")

    def moe_config(self) -> MoeConfig:
        return MoeConfig(rank=self.rank, alpha=self.lora_alpha, dropout=self.dropout, targets=self.targets,
                         aux_loss_coef=self.aux_loss_coef)

    def check(self, allocations: Sequence[str]) -> None:
        """Checks that need no model (the budget T and β are checked by the allocation)."""
        rules = [allocate.get(a, "experts", getattr(self, "reverse", False))[0] for a in allocations]
        if any(r.metric == "scores" for r in rules) and self.scores is None:
            raise UserError(NEEDS_SCORES)
        self.check_validation(any(r.metric == "gain" for r in rules))
        self.moe_config().check()
        self.check_training()


def fit(s: Setting, args: MoeOptions, experts: np.ndarray, seed: int) -> dict:
    """Wrap the model with a fresh adapter, train it and evaluate it; the adapter stays on the model.

    Returns the run's numbers: losses, accuracy, exact_match, trainable_params, seconds (training time).
    """
    model, tok = s.lm.model, s.lm.tokenizer
    apply_lora_moe(model, experts.tolist(), top_k_for(experts).tolist(), args.moe_config(), seed=seed)
    result = train(model, tok, s.train_records, args.train_config(seed), extra_loss=lambda: aux_loss(model))
    scores = args.with_lm_eval(evaluate_records(model, tok, s.test_records, args.eval_batch_size,
                                                args.max_new_tokens), model, tok)
    return {"losses": result.losses, **scores, "trainable_params": trainable_parameters(model),
            "seconds": round(result.seconds, 2)}


def experts_table(experts: np.ndarray, top_k: np.ndarray, metric: np.ndarray | None, label: str) -> str:
    head = f"{'block':>5}  {label:>10}  {'experts':>7}  {'top-k':>5}"
    rows = [f"{l:>5}  {'' if metric is None else f'{metric[l]:.4g}':>10}  {experts[l]:>7}  {top_k[l]:>5}"
            for l in range(len(experts))]
    return "\n".join([head, *rows])


@dataclass
class MoeArgs(MoeOptions):
    """Fine-tune a LoRA mixture of experts whose per-block expert counts come from LayerIF scores (or a baseline)."""

    allocation: str = option("layerif", "experts per block from: layerif, alpha, gain (the measured fine-tune gain of "
                                         "--validation) or uniform")
    reverse: bool = option(False, "layerif, gain: more experts where the metric is low")
    seed: int = option(0, "seed of the adapter's initialisation, data order and dropout")
    save: str | None = option(None, "folder for adapter.safetensors and allocation.json")
    overwrite: bool = overwrite_field("--save")


def run(args: MoeArgs) -> str:
    """``layerif moe``: allocate, fine-tune, evaluate, save; returns the terminal summary."""
    args.check([args.allocation])
    if args.save is not None:
        check_save_dir(args.save, "adapter folder", args.overwrite, args.model)
    s = setting(args, lambda n: args.total_experts is None or allocate.uniform_experts(n, args.total_experts))
    metric = allocation_metric(args.allocation, s.sources, "experts")
    experts = allocate_experts(args.allocation, metric, s.n_blocks, args.total_experts, args.beta, args.reverse)
    top_k = top_k_for(experts)
    label = label_of(args.allocation, "experts")
    progress.info(f"{args.allocation} allocation of {int(experts.sum())} experts over {s.n_blocks} blocks; training")
    r = fit(s, args, experts, args.seed)
    lines = [
        f"{s.lm.name} · task {s.task} · allocation {args.allocation}{' reversed' if args.reverse else ''} · "
        f"T={int(experts.sum())} · β={args.beta:g} · rank {args.rank} · "
        f"{r['trainable_params']:,} trainable parameters",
        experts_table(experts, top_k, metric, label),
        f"training: {args.steps} steps, loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, {r['seconds']:.1f} s",
        f"test ({len(s.test_records)} items): accuracy {r['accuracy']:.4f} (multiple choice), "
        f"exact match {r['exact_match']:.4f} (greedy)",
    ]
    if args.save is not None:
        record = {
            "model": s.lm.name, "task": s.task, "allocation": args.allocation, "reverse": args.reverse,
            "total_experts": int(experts.sum()), "beta": args.beta,
            "metric": None if metric is None else [float(m) for m in metric],
            "result": {k: r[k] for k in ("accuracy", "exact_match", "trainable_params", "seconds", "losses")},
            "args": asdict(args),
        }
        dest = save_adapter(s.lm.model, args.save, record, args.overwrite, args.model)
        lines.append(f"wrote {dest}/ ({ADAPTER_FILE}, {ALLOCATION_FILE})")
    return "\n".join(lines)


register("moe", MoeArgs, run, "fine-tune a LoRA mixture of experts with per-layer expert counts from LayerIF scores")
