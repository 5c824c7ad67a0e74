"""Saving a pruned model: the safetensors folder with allocation.json and the llm-compressor recipe."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import yaml
from torch import nn

from .io import staged_folder, write_text
from .prune import BLOCK_SIZE, DAMPING, SETTINGS, PruneSettings, get_pruner
from .results import check_save_dir, write_saved

def llmcompressor_recipe(method: str, ratios, blocks_prefix: str, nm: tuple[int, int] | None = None,
                         damping: float = DAMPING, block_size: int = BLOCK_SIZE) -> str | None:
    """The allocation as an llm-compressor oneshot recipe (YAML), or ``None`` for a pruner without a ``modifier``.

    Format (llm-compressor ≥ 0.5, ``SparsityModifierBase``; checked against 0.14)::

        sparsity_stage:
          sparsity_modifiers:
            SparseGPTModifier:            # or WandaPruningModifier
              sparsity: [0.55, 0.61, ...] # one per module matched by `targets`, in model order
              mask_structure: "0:0"       # "N:M" for semi-structured (N pruned of every M)
              targets: ["re:model\\.layers\\.\\d+$"]   # the decoder blocks
              block_size: 128             # the pruner's settings (SparseGPT)
              dampening_frac: 0.01

    A list-valued ``sparsity`` is indexed by the modules ``targets`` matches, so
    targets name the decoder blocks and every Linear inside block l gets ratio l.
    Run it with ``llmcompressor.oneshot(model=..., dataset=..., recipe="recipe.yaml",
    num_calibration_samples=128, max_seq_length=...)``. llm-compressor has no
    one-shot magnitude modifier, hence ``None`` there.
    """
    pruner = get_pruner(method)
    if pruner.modifier is None:
        return None
    mod: dict = {
        "sparsity": [round(float(r), 6) for r in np.asarray(ratios).reshape(-1)],
        "mask_structure": f"{nm[0]}:{nm[1]}" if nm else "0:0",
        "targets": [f"re:{re.escape(blocks_prefix)}\\.\\d+$"],
    }
    options = PruneSettings(nm, float(damping), int(block_size))
    mod.update({SETTINGS[k]: getattr(options, k) for k in pruner.settings})
    head = (
        "# llm-compressor recipe exported by layerif: one sparsity per decoder block.\n"
        "# from llmcompressor import oneshot\n"
        "# oneshot(model=MODEL, dataset=DATASET, recipe=\"recipe.yaml\", num_calibration_samples=128)\n"
    )
    return head + yaml.safe_dump({"sparsity_stage": {"sparsity_modifiers": {pruner.modifier: mod}}}, sort_keys=False,
                                 default_flow_style=None, width=100)


def save_pruned(model: nn.Module, tokenizer, path: str, allocation: dict, recipe: str | None = None,
                overwrite: bool = False, source: str | None = None) -> Path:
    """Write the pruned model (safetensors), tokenizer, allocation.json and recipe.yaml to ``path``.

    ``path`` follows :func:`layerif.results.check_save_dir` (``overwrite``; never
    the input model ``source``). Built in a temporary sibling folder that then
    replaces ``path`` (a failed save leaves the old folder, or none).
    """
    check = partial(check_save_dir, what="pruned model", overwrite=overwrite, model=source)
    dest = check(path)
    with staged_folder(dest, "--save", check) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            write_text(tmp / "recipe.yaml", recipe)
        write_saved(tmp, allocation, "pruned model")
    return dest
