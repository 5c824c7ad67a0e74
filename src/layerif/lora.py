"""LoRA adapters as influence targets (``--target lora``), as DataInf does.

The model gets PEFT LoRA adapters on the chosen projections; optionally they are
trained for a few steps on the train split first, because freshly initialised
adapters have B = 0, which makes every gradient of A zero.
"""

from __future__ import annotations

import torch

from . import progress
from .data import Encoded, collate, per_sample_loss
from .errors import UserError
from .models import LoadedModel


def add_lora(lm: LoadedModel, modules: list[str], rank: int, seed: int = 0) -> LoadedModel:
    """Wrap the model with PEFT LoRA adapters (rank r, alpha 2r, no dropout) on ``modules``.

    A model that already carries LoRA adapters is returned unchanged.
    """
    from peft import LoraConfig, get_peft_model

    if any("lora_A" in name for name, _ in lm.model.named_modules()):
        return lm
    if rank < 1:
        raise UserError(f"--lora-rank must be >= 1 (got {rank})")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(modules))
    try:
        model = get_peft_model(lm.model, config)
    except ValueError as exc:
        raise UserError(f"--lora-modules {','.join(modules)}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return LoadedModel(model=model, tokenizer=lm.tokenizer, name=lm.name)


def finetune(lm: LoadedModel, train: list[Encoded], steps: int, lr: float, batch_size: int, seed: int = 0) -> list[float]:
    """Train the model's trainable parameters for ``steps`` AdamW steps on ``train`` (cycling, shuffled).

    The objective is the mean per-sample loss of a batch. Returns the loss of each step.
    """
    params = [p for p in lm.model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters to fine-tune")
    device = params[0].device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history: list[float] = []
    order: list[int] = []
    lm.model.train()
    try:
        for _ in progress.track(range(steps), desc="fine-tuning LoRA", unit="step"):
            if len(order) < batch_size:
                order += torch.randperm(len(train), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = collate([train[i] for i in idx], lm.tokenizer.pad_token_id, device)
            out = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            loss = per_sample_loss(out.logits, batch["labels"]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    finally:
        lm.model.eval()
        opt.zero_grad(set_to_none=True)
    return history


def prepare_lora(
    lm: LoadedModel, train: list[Encoded], modules: list[str], rank: int, steps: int, lr: float, batch_size: int, seed: int
) -> LoadedModel:
    """LoRA adapters on ``modules``, trained ``steps`` steps on ``train`` when steps > 0."""
    lm = add_lora(lm, modules, rank, seed)
    if steps > 0:
        losses = finetune(lm, train, steps, lr, batch_size, seed)
        progress.info(f"LoRA fine-tuning: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")
    return lm
