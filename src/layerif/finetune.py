"""Plain LoRA fine-tuning with per-block capacity: which blocks get LoRA, and at what rank.

The adapter is standard PEFT LoRA (``peft.LoraConfig``): block l's adapted projections
(``targets``, as :func:`layerif.moe.target_names`) get rank r_l from a capacity rule
(:func:`layerif.allocate.capacity_ranks`; r_l = 0: the block is not adapted), with
``layers_to_transform`` the adapted blocks and ``rank_pattern`` / ``alpha_pattern`` per module, so
every module keeps the scale ``lora_alpha / rank`` whatever its rank. A folder written by
:func:`save` loads with ``PeftModel.from_pretrained(base, folder)`` to the same logits.

Trainable parameters: Σ_l r_l · Σ_{modules m of block l} (d_in,m + d_out,m); with blocks of one
shape, rules with equal Σ r_l train equally many parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import UserError
from .io import staged_folder, write_files
from .models import is_conv1d
from .moe import target_names
from .results import check_save_dir, write_saved

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAVED_KIND = "LoRA adapter"  # allocation.json's "saved": what a later --save --overwrite may replace


def lora_config(model: nn.Module, ranks: Sequence[int], targets: str = "qv", rank: int = 8,
                lora_alpha: float = 16.0, dropout: float = 0.05):
    """The ``peft.LoraConfig`` of per-block ``ranks`` (int [L], 0 = no LoRA) on an unwrapped ``model``.

    ``target_modules`` are the fully qualified names of the adapted projections (blocks with r_l > 0);
    ``rank_pattern`` gives each its block's rank and ``alpha_pattern`` ``lora_alpha · r_l / rank``.
    """
    from peft import LoraConfig

    names = target_names(model, targets)
    if len(ranks) != len(names):
        raise UserError(f"{len(ranks)} block ranks for {len(names)} blocks")
    if any(int(r) != r or r < 0 for r in ranks) or not any(ranks):
        raise UserError("block ranks must be integers ≥ 0, at least one of them > 0")
    adapted = {name: int(r) for r, block in zip(ranks, names) if r > 0 for name in block}
    modules = dict(model.named_modules())
    return LoraConfig(
        r=rank, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=list(adapted),
        layers_to_transform=[l for l, r in enumerate(ranks) if r > 0],
        rank_pattern={re.escape(n): r for n, r in adapted.items()},
        alpha_pattern={re.escape(n): lora_alpha * r / rank for n, r in adapted.items()},
        fan_in_fan_out=any(is_conv1d(modules[n]) for n in adapted),
    )


def apply_lora(model: nn.Module, ranks: Sequence[int], targets: str = "qv", rank: int = 8,
               lora_alpha: float = 16.0, dropout: float = 0.05, seed: int = 0) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter of per-block ``ranks`` (:func:`lora_config`); returns the
    ``PeftModel`` (only the adapter is trainable). ``seed`` fixes the A initialisation (B starts at 0)."""
    from peft import get_peft_model

    config = lora_config(model, ranks, targets, rank, lora_alpha, dropout)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def remove_lora(peft_model: nn.Module) -> nn.Module:
    """The base model of ``peft_model`` with the adapter taken out (not merged): its weights as before."""
    return peft_model.unload()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (of a PEFT model: the adapter's)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save(peft_model: nn.Module, folder: str | Path, allocation: dict, files: dict | None = None,
         overwrite: bool = False, source: str | None = None) -> Path:
    """Write the PEFT adapter (``adapter_config.json``, :data:`ADAPTER_WEIGHTS`), ``files`` (name -> text,
    JSON-ready dict or figure; with a ``config.json`` among them the folder gets report.md / report.html) and,
    last, ``allocation.json`` (``allocation``, which holds ``ranks``, plus ``layers`` and ``version``) into
    ``folder``, built under a temporary name and then renamed over it; returns the folder. ``folder`` follows
    :func:`layerif.results.check_save_dir` (``overwrite``; never the base model ``source``)."""
    check = partial(check_save_dir, what=SAVED_KIND, overwrite=overwrite, model=source)
    dest = check(folder)
    doc = {**allocation, "layers": list(range(len(allocation["ranks"]))), "version": __version__}
    with staged_folder(dest, "--save", check) as tmp:
        peft_model.save_pretrained(tmp)
        write_files(tmp, files or {})
        if "config.json" in (files or {}):
            from .report import write_report  # the report reads the folder's files

            write_report(tmp)
        write_saved(tmp, doc, SAVED_KIND)
    return dest


def ranks_summary(ranks: np.ndarray) -> str:
    """``blocks 3, 7, 12 at rank 8`` or ``every block, ranks 1-3`` (one line)."""
    on = [l for l, r in enumerate(ranks) if r > 0]
    values = sorted({int(r) for r in ranks if r > 0})
    if len(values) == 1 and len(on) < len(ranks):
        return f"blocks {', '.join(map(str, on))} at rank {values[0]}"
    span = f"{values[0]}" if len(values) == 1 else f"{values[0]}–{values[-1]}"
    return f"{'every block' if len(on) == len(ranks) else f'{len(on)} blocks'}, rank {span}"
