"""LoRA adapters as influence targets (``--target lora``), as DataInf does.

The model gets PEFT LoRA adapters on the chosen projections, trained for
``--finetune-steps`` steps on the train split first
(:func:`layerif.train.train_encoded`): freshly initialised adapters have B = 0,
which makes every gradient of A zero, so scoring fresh adapters is refused
(a model that already carries trained adapters is scored as it is).
"""

from __future__ import annotations

import torch

from . import progress
from .data import Encoded, pad_id
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


def prepare_lora(
    lm: LoadedModel, train: list[Encoded], modules: list[str], rank: int, steps: int, lr: float, batch_size: int, seed: int
) -> LoadedModel:
    """LoRA adapters on ``modules``, trained ``steps`` steps on ``train`` when steps > 0.

    Fresh adapters (the model had none) with ``steps == 0`` are a :class:`UserError`:
    their B = 0 makes every A gradient, and so those modules' scores, zero.
    """
    fresh = not any("lora_A" in name for name, _ in lm.model.named_modules())
    if fresh and steps <= 0:
        raise UserError("--target lora on fresh adapters needs --finetune-steps N (N >= 1; e.g. 50): untrained "
                        "adapters have B = 0, so every gradient of A and its score would be 0")
    lm = add_lora(lm, modules, rank, seed)
    if steps > 0:
        from .train import TrainConfig, train_encoded

        config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=0.1, seed=seed)
        losses = train_encoded(lm.model, pad_id(lm.tokenizer), train, config).losses
        progress.info(f"LoRA fine-tuning: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")
    return lm
