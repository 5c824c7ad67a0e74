"""``layerif moe``: a LoRA mixture of experts with per-block expert counts from LayerIF scores (or a baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import allocate, progress
from ..allocate import allocate_experts, top_k_for
from ..errors import UserError
from ..io import overwrite_field
from ..models import LoadedModel, find_blocks
from ..moe import (ADAPTER_FILE, MoeConfig, apply_lora_moe, aux_loss, save_adapter, trainable_parameters)
from ..options import ModelOptions, option
from ..results import ALLOCATION_FILE, block_scores, check_save_dir, read_scores
from ..spectral import block_alphas
from ..train import TrainConfig, check_train_config, evaluate_records, train
from .base import register

NEEDS_SCORES = "the layerif allocation needs --scores scores.json (from `layerif score`)"


@dataclass
class MoeOptions(ModelOptions):
    """Options shared by ``layerif moe`` and ``layerif compare-moe``."""

    task: str | None = option(None, "built-in task to train and test on (default: the task of --scores, else capitals)")
    scores: str | None = option(None, "scores.json of `layerif score` (needed by the layerif allocations)")
    total_experts: int | None = option(None, "T, the experts over all blocks (default: 5 × blocks)")
    beta: float = option(2.5, "β, the sharpness of the allocation (layerif, alpha)")
    targets: str = option("qv", "adapted projections: qv, attn, mlp, all, names (q_proj,v_proj) or a regex")
    rank: int = option(8, "LoRA rank r of every expert")
    lora_alpha: float = option(16.0, "LoRA alpha (scale alpha / r)")
    dropout: float = option(0.05, "dropout on the experts' input")
    aux_loss_coef: float = option(0.01, "weight of the load-balancing loss (0: off)")
    n_train: int = option(256, "train items of the task")
    n_test: int = option(100, "test items of the task")
    allow_repeats: bool = option(False, "allow more task items than a built-in split holds (records repeat)")
    data_seed: int = option(0, "seed of the task's item sampling (same items for every training seed)")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "records per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(3e-4, "peak AdamW learning rate")
    warmup: float = option(0.1, "fraction of the steps with linear warm-up (then linear decay to 0)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_length: int | None = option(None, "truncate train records to this many tokens")
    eval_batch_size: int = option(16, "sequences per evaluation batch")
    max_new_tokens: int = option(8, "greedy tokens generated for exact match")

    def moe_config(self) -> MoeConfig:
        return MoeConfig(rank=self.rank, alpha=self.lora_alpha, dropout=self.dropout, targets=self.targets,
                         aux_loss_coef=self.aux_loss_coef)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           warmup=self.warmup, weight_decay=self.weight_decay, max_length=self.max_length, seed=seed)

    def check(self, allocations: Sequence[str]) -> None:
        """Checks that need no model (the budget T and β are checked by the allocation)."""
        rules = [allocate.get(a, "experts", getattr(self, "reverse", False))[0] for a in allocations]
        if any(r.metric == "scores" for r in rules) and self.scores is None:
            raise UserError(NEEDS_SCORES)
        if self.n_train < 1 or self.n_test < 1:
            raise UserError("--n-train and --n-test must be ≥ 1")
        if self.eval_batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--eval-batch-size and --max-new-tokens must be ≥ 1")
        self.moe_config().check()
        check_train_config(self.train_config(0))
        if self.scores:
            read_scores(self.scores)  # so does a bad scores file


def metric_of(s: "Setting", allocation: str) -> np.ndarray | None:
    """The per-block metric an allocation label maps to experts (its rule's ``metric``), measured once per setting."""
    kind = allocate.get(allocation, "experts")[0].metric
    if kind == "scores":
        if s.scores is None:
            raise UserError(NEEDS_SCORES)
        return s.scores
    if kind == "alpha":
        if "alpha" not in s.cache:
            s.cache["alpha"] = block_alphas(s.lm.model)
        return s.cache["alpha"]
    return None


@dataclass
class Setting:
    """What every run of a command shares: the model, the scores, the task's records."""

    lm: LoadedModel
    n_blocks: int
    scores: np.ndarray | None
    scores_doc: dict
    task: str
    train_records: list[dict]
    test_records: list[dict]
    cache: dict = field(default_factory=dict)  # metrics measured on the base model


def setting(args: MoeOptions) -> Setting:
    """The model, the scores and the task's records of a run (an unknown task fails before the model loads)."""
    from ..tasks import get_task  # imported here so tests can stand in a small task module

    if args.task is not None:
        get_task(args.task)  # an unknown task fails before the model loads
    lm = args.load()
    _, blocks = find_blocks(lm.model)
    scores, doc = block_scores(args.scores, len(blocks)) if args.scores else (None, {})
    if doc.get("model") not in (None, lm.name):
        progress.info(f"note: {args.scores} was computed on {doc['model']}, adapting {lm.name}")
    task_name = args.task or doc.get("task") or "capitals"
    task = get_task(task_name)
    return Setting(lm, len(blocks), scores, doc, task_name,
                   task.split("train", args.n_train, args.data_seed, args.allow_repeats),
                   task.split("test", args.n_test, args.data_seed, args.allow_repeats))


def fit(s: Setting, args: MoeOptions, experts: np.ndarray, seed: int) -> dict:
    """Wrap the model with a fresh adapter, train it and evaluate it; the adapter stays on the model.

    Returns the run's numbers: losses, accuracy, exact_match, trainable_params, seconds (training time).
    """
    model, tok = s.lm.model, s.lm.tokenizer
    apply_lora_moe(model, experts.tolist(), top_k_for(experts).tolist(), args.moe_config(), seed=seed)
    result = train(model, tok, s.train_records, args.train_config(seed), extra_loss=lambda: aux_loss(model))
    scores = evaluate_records(model, tok, s.test_records, args.eval_batch_size, args.max_new_tokens)
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

    allocation: str = option("layerif", "experts per block from: layerif, alpha or uniform")
    reverse: bool = option(False, "layerif: more experts where S_l is low")
    seed: int = option(0, "seed of the adapter's initialisation, data order and dropout")
    save: str | None = option(None, "folder for adapter.safetensors and allocation.json")
    overwrite: bool = overwrite_field("--save")


def run(args: MoeArgs) -> str:
    """``layerif moe``: allocate, fine-tune, evaluate, save; returns the terminal summary."""
    args.check([args.allocation])
    if args.save is not None:
        check_save_dir(args.save, "adapter folder", args.overwrite, args.model)
    s = setting(args)
    metric = metric_of(s, args.allocation)
    experts = allocate_experts(args.allocation, metric, s.n_blocks, args.total_experts, args.beta, args.reverse)
    top_k = top_k_for(experts)
    label = {"scores": "S_l", "alpha": "alpha"}.get(allocate.ALLOCATIONS[args.allocation].metric, "")
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
