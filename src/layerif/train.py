"""A small, reproducible fine-tuning loop and the test-split evaluation used after it.

:func:`train` trains whatever parameters of a model have ``requires_grad`` (an
adapter's, typically) on prompt/completion records:

* the loss is the next-token cross-entropy of the completion tokens only, the
  mean over every completion token of an optimizer step (so gradient
  accumulation over micro-batches gives the same step as one large batch);
* AdamW; learning rate lr · (s + 1) / W for steps s < W = round(``warmup`` ·
  steps) (linear warm-up), then lr · (steps − s) / (steps − W) (linear decay,
  still > 0 at the last step); gradient clipping at ``max_grad_norm``;
* records are visited in a shuffled order (reshuffled every epoch) drawn from
  ``seed``; ``seed`` also seeds torch's global RNG (dropout), so two runs with
  the same inputs give the same loss history.

:func:`evaluate_records` measures multiple-choice accuracy and greedy exact
match (:mod:`layerif.evaluate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import progress
from .data import IGNORE, Encoded, collate, encode_split, pad_id, per_sample_loss
from .errors import UserError, require_finite
from .evaluate import exact_match_correct, mc_correct

LOG_POINTS = 10  # loss messages per run


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`; one step = ``grad_accum`` micro-batches of ``batch_size`` records."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_length: int | None = None  # truncate records to this many tokens
    seed: int = 0


def check_train_config(c: TrainConfig) -> None:
    """Bad values are a :class:`UserError`."""
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(c, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(c, name)})")
    if not c.lr > 0:
        raise UserError(f"--lr must be > 0 (got {c.lr})")
    if not 0.0 <= c.warmup <= 1.0:
        raise UserError(f"--warmup is a fraction of the steps in [0, 1] (got {c.warmup})")
    if c.weight_decay < 0 or c.max_grad_norm < 0:
        raise UserError("--weight-decay and the gradient clipping norm must be ≥ 0")
    if c.max_length is not None and c.max_length < 2:
        raise UserError(f"--max-length must be ≥ 2 (got {c.max_length})")


@dataclass
class TrainResult:
    """``losses[s]``: the completion-token loss of step s (before its update, without the auxiliary loss)."""

    losses: list[float]
    seconds: float


def train(model: nn.Module, tokenizer, records: list[dict], config: TrainConfig = TrainConfig(),
          extra_loss: Callable[[], torch.Tensor | None] | None = None) -> TrainResult:
    """Fine-tune ``model``'s trainable parameters on ``records`` (``prompt`` + ``completion``, or ``text``).

    ``extra_loss``, called after each micro-batch's forward, may return a scalar
    added to that micro-batch's loss with the micro-batch's share of the step's
    tokens as weight (e.g. :func:`layerif.moe.aux_loss`). The model is left in
    eval mode. A model with nothing to train, or bad records, is a :class:`UserError`;
    a non-finite loss (with ``extra_loss``) stops training before its update with a
    :class:`FloatingPointError` naming the step (:func:`layerif.errors.require_finite`).
    """
    check_train_config(config)
    encoded, _ = encode_split(tokenizer, records, "train", max_length=config.max_length)
    return train_encoded(model, pad_id(tokenizer), encoded, config, extra_loss)


def train_encoded(model: nn.Module, pad: int, encoded: list[Encoded], config: TrainConfig = TrainConfig(),
                  extra_loss: Callable[[], torch.Tensor | None] | None = None) -> TrainResult:
    """:func:`train` on already tokenized records (``pad``: the padding token id)."""
    check_train_config(config)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    device = params[0].device
    torch.manual_seed(config.seed)
    order_rng = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = round(config.warmup * config.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (config.steps - s) / max(1, config.steps - warm))
    )
    per_step = config.batch_size * config.grad_accum
    order: list[int] = []
    losses: list[float] = []
    every = max(1, config.steps // LOG_POINTS)
    start = time.perf_counter()
    model.train()
    try:
        for step in progress.track(range(config.steps), desc="training", unit="step"):
            while len(order) < per_step:
                order += torch.randperm(len(encoded), generator=order_rng).tolist()
            chunk, order = [encoded[i] for i in order[:per_step]], order[per_step:]
            n_tokens = sum(e.n_loss_tokens for e in chunk)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for i in range(0, per_step, config.batch_size):
                micro = chunk[i : i + config.batch_size]
                batch = collate(micro, pad, device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
                loss = (per_sample_loss(logits, batch["labels"]) * counts).sum() / n_tokens
                step_loss += float(loss.detach())
                extra = extra_loss() if extra_loss is not None else None
                if extra is not None:
                    loss = loss + extra * (counts.sum() / n_tokens)
                require_finite(float(loss.detach()), f"the training loss at step {step + 1}")
                loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            losses.append(step_loss)
            if (step + 1) % every == 0 or step + 1 == config.steps:
                recent = losses[-every:]
                progress.info(f"step {step + 1}/{config.steps}  loss {sum(recent) / len(recent):.4f}  lr {lr:.2e}")
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return TrainResult(losses=losses, seconds=time.perf_counter() - start)


def evaluate_records(model: nn.Module, tokenizer, records: list[dict], batch_size: int = 16,
                     max_new_tokens: int = 8) -> dict:
    """``accuracy`` (multiple-choice log-likelihood) and ``exact_match`` (greedy completion) on ``records``.

    Both are fractions in [0, 1]; ``items`` holds the per-record 0/1 results
    (``{"accuracy": [...], "exact_match": [...]}``) they are the means of. The
    model is evaluated in eval mode and left in it.
    """
    model.eval()
    items = {"accuracy": [float(x) for x in mc_correct(model, tokenizer, records, batch_size)],
             "exact_match": [float(x) for x in exact_match_correct(model, tokenizer, records, max_new_tokens,
                                                                      batch_size)]}
    return {k: sum(v) / len(v) for k, v in items.items()} | {"items": items}
