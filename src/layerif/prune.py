"""Layer-wise unstructured pruning: allocations, pruners, saving, and the allocation comparison.

Pruners (every projection inside the decoder blocks: attention and MLP; the
embeddings and the LM head are never pruned):

* ``magnitude`` -- the smallest |W| of each matrix (as the Wanda repository's
  magnitude baseline), no calibration data.
* ``wanda`` -- score |W_ij| · ‖X_j‖₂ (X: the module's inputs over every
  calibration token), compared within each output row (Sun et al., 2024).
* ``sparsegpt`` -- the OBS reconstruction of Frantar & Alistarh (2023): H = XᵀX
  damped by 1% of its mean diagonal, Cholesky of H⁻¹, columns processed in blocks
  of 128, the mask chosen per column block by w² / [H⁻¹]²_jj and the pruning error
  propagated to the columns not yet processed.

Calibration is block by block, as in the reference code of both: the
calibration windows are run through block l to collect its inputs' statistics,
block l is pruned, and the outputs of the *pruned* block l are the inputs of
block l + 1.

Sparsity is given per decoder block (a ratio in [0, 1)), optionally overridden
per module. A ratio r zeroes round(r · in) weights in each row (Wanda), round(r ·
size) of each column block (SparseGPT) or round(r · size) of the matrix
(magnitude). ``nm=(N, M)`` instead zeroes the N lowest-scored weights of every
M consecutive inputs of a row, sparsity N/M. This is how the Wanda, SparseGPT
and llm-compressor code read "N:M" (N *pruned* of M): "2:4" is the 2:4 pattern
of sparse tensor cores, while "1:4" prunes one weight in four.

Allocations (:mod:`layerif.allocate`): ``uniform``; ``layerif`` (the linear map of
the LayerIF scores S_l); ``alpha`` (AlphaPruning: the same map of the heavy-tail
exponent α, :mod:`layerif.spectral`); ``owl`` (OWL: outlier ratios of the Wanda
scores, measured with the dense model).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from . import __version__, progress
from . import allocate
from .allocate import COMPARE_SPARSITY, SparsityOptions, allocate_sparsity, check_epsilon, check_sparsity
from .errors import UserError
from .evaluate import mc_accuracy, perplexity
from .io import CACHE_DIR, output_folder, overwrite_field, prepare_out_dir, staged_folder, write_figure, write_text
from .models import ModelArgs, find_blocks, iter_projections, projections, set_weight_out_in, weight_out_in
from .report import write_report
from .results import (
    block_scores,
    block_sparsity,
    check_save_dir,
    read_config,
    read_json,
    read_scores,
    write_allocation,
    write_config,
)
from .search import LevelDatabase, SearchOptions, run_search, run_sensitivity, windows_hash, write_search
from .spectral import block_alphas
from .stability import mean_std, mean_std_cell
from .tasks import test_records

METHODS = ("magnitude", "wanda", "sparsegpt")
OWL_M = 5.0
OWL_LAMBDA = 0.08
DAMPING = 0.01
BLOCK_SIZE = 128


# ----------------------------------------------------------------------------- structure


def prunable_modules(model: nn.Module) -> dict[str, tuple[int, nn.Module]]:
    """Every projection inside the decoder blocks: fully qualified name -> (block index, module)."""
    return {p.name: (p.block, p.module) for p in iter_projections(model)}


def prunable_params(model: nn.Module) -> np.ndarray:
    """Weights that pruning may zero, per block (the weights of the parameter-weighted mean), int64 [L]."""
    _, blocks = find_blocks(model)
    counts = np.zeros(len(blocks), dtype=np.int64)
    for idx, mod in prunable_modules(model).values():
        counts[idx] += mod.weight.numel()
    return counts


def module_targets(model: nn.Module, ratios, module_ratios: dict[str, float] | None = None) -> dict[str, float]:
    """The sparsity of each prunable module: its block's ratio, unless ``module_ratios`` names it."""
    mods = prunable_modules(model)
    r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    n_blocks = len(prunable_params(model))
    if r.size != n_blocks:
        raise UserError(f"{r.size} sparsity ratios for a model with {n_blocks} blocks")
    extra = sorted(set(module_ratios or {}) - set(mods))
    if extra:
        raise UserError(f"not a prunable module: {extra[0]}")
    out = {name: float((module_ratios or {}).get(name, r[idx])) for name, (idx, _) in mods.items()}
    for name, value in out.items():
        if not 0.0 <= value < 1.0:
            raise UserError(f"sparsity {value:g} of {name} is outside [0, 1)")
    return out


def achieved_sparsity(model: nn.Module) -> tuple[np.ndarray, dict[str, float]]:
    """Measured share of exactly-zero weights: per block (over its projections) float64 [L], and per module."""
    _, blocks = find_blocks(model)
    zeros = np.zeros(len(blocks))
    sizes = np.zeros(len(blocks))
    per_module = {}
    for name, (idx, mod) in prunable_modules(model).items():
        z = int((mod.weight == 0).sum())
        per_module[name] = z / mod.weight.numel()
        zeros[idx] += z
        sizes[idx] += mod.weight.numel()
    return zeros / sizes, per_module


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """``"N:M"`` -> (N, M) with 0 < N < M; ``None`` or ``""`` -> ``None``."""
    if not nm:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", nm)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--nm {nm!r} is not N:M with 0 < N < M (e.g. 2:4)")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- masks


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """True for the round(ratio · in) lowest scores of each row of an [out, in] score; ties by position."""
    k = int(round(ratio * score.shape[1]))
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def lowest_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """True for the round(ratio · size) lowest scores of the whole tensor (ties by position)."""
    k = int(round(ratio * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.sort(score.flatten(), stable=True).indices[:k]] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the ``n`` lowest scores in every group of ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise UserError(f"N:M pruning with M={m} needs input sizes divisible by {m} (a module has {cols})")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.view(rows, cols)


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| · ‖X_j‖₂ for an [out, in] weight and Σ_tokens x_j² [in] (float32)."""
    return weight.detach().float().abs() * sq_norm.float().sqrt().unsqueeze(0)


def sparsegpt_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    damping: float = DAMPING,
) -> torch.Tensor:
    """SparseGPT's pruned and reconstructed [out, in] weight (float32), the reference algorithm.

    ``hessian`` is Σ x xᵀ over the calibration tokens [in, in] (its scale does not
    matter). Inputs that never fire get their column zeroed. The mask of each
    block of ``block_size`` columns takes the round(ratio · size) lowest
    w² / [H⁻¹]_jj² (or N of each M with ``nm``), and each pruned column's error
    is propagated to the later columns through the upper Cholesky factor of H⁻¹.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(cols, device=H.device)
    H[diag, diag] += damping * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if nm is not None and block_size % nm[1]:
        raise UserError(f"the SparseGPT block size {block_size} is not a multiple of M={nm[1]}")
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if nm is None:
            mask1 = lowest_mask(W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2, ratio)
        else:  # chosen group by group below, on the weights updated so far (as the reference)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                group = W1[:, i : i + nm[1]] ** 2 / torch.diag(Hinv1)[i : i + nm[1]].reshape(1, -1) ** 2
                mask1[:, i : i + nm[1]] = nm_mask(group, *nm)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _zero(module: nn.Module, mask: torch.Tensor) -> None:
    """Zero the weights where the [out, in] ``mask`` is True."""
    with torch.no_grad():
        weight_out_in(module).masked_fill_(mask, 0)


# ----------------------------------------------------------------------------- calibration


class InputStats:
    """Statistics of a projection's inputs, accumulated by a forward hook over calibration tokens.

    ``sq``: Σ_t x_tj² [in] (Wanda's ‖X_j‖₂²); ``hessian``: Σ_t x_t x_tᵀ [in, in] (SparseGPT),
    only when asked for. float32, on the module's device.
    """

    def __init__(self, module: nn.Module, hessian: bool):
        n_in = weight_out_in(module).shape[1]
        dev = module.weight.device
        self.sq = torch.zeros(n_in, device=dev)
        self.hessian = torch.zeros(n_in, n_in, device=dev) if hessian else None

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.sq += (x * x).sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, the other positional arguments, the other keyword arguments) of a block call."""
    if args:
        return args[0], args[1:], dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def _block_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor) -> tuple[list, list]:
    """Inputs of block 0 for each window, and each block's other call arguments.

    The other arguments (attention mask, position embeddings, ...) depend only on
    the window length, so they are recorded once, from a forward pass on the first
    window, separately for every block (families such as Gemma pass each block its
    own mask).
    """
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []

    def catch(module, args, kwargs):
        hidden.append(_split_call(args, kwargs)[0])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    calls: list = [None] * len(blocks)

    def record(idx):
        def hook(module, args, kwargs):
            calls[idx] = _split_call(args, kwargs)[1:]

        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(input_ids=windows[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


@torch.no_grad()
def calibrate(
    model: nn.Module, windows: torch.Tensor, hessian: bool = False, update: bool = True
) -> Iterator[tuple[int, nn.Module, dict[str, InputStats]]]:
    """Sequential block-by-block calibration, as the Wanda / SparseGPT reference code.

    ``windows``: token ids [n, seqlen], unpadded. Yields ``(block index, block,
    {name relative to the block: InputStats})`` for each block in order, after the
    windows' hidden states have passed through it; the caller may change the
    block's weights before asking for the next one. With ``update`` the block is
    then run again so the next block sees the outputs of the changed block;
    without it (the block was left alone) the outputs of the first run are used.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] tensor, got {tuple(windows.shape)}")
    _, blocks = find_blocks(model)
    hidden, calls = _block_inputs(model, blocks, windows)
    for idx, block in enumerate(progress.track(blocks, desc="calibrating blocks", unit="block")):
        args, kwargs = calls[idx]
        stats = {rel: InputStats(mod, hessian) for rel, mod in projections(block).items()}
        handles = [mod.register_forward_hook(stats[rel].hook) for rel, mod in projections(block).items()]
        outputs = []
        try:
            for h in hidden:
                out = _block_out(block(h, *args, **kwargs))
                if not update:
                    outputs.append(out)
        finally:
            for h in handles:
                h.remove()
        yield idx, block, stats
        hidden = [_block_out(block(h, *args, **kwargs)) for h in hidden] if update else outputs


def prune_module(
    module: nn.Module,
    method: str,
    ratio: float,
    stats: InputStats | None = None,
    nm: tuple[int, int] | None = None,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> None:
    """Prune one projection in place at sparsity ``ratio`` (or N:M with ``nm``).

    ``stats``: its inputs' calibration statistics (:class:`InputStats`; with the
    Hessian for ``sparsegpt``), unused by ``magnitude``.
    """
    W = weight_out_in(module)
    if method == "magnitude":
        score = W.detach().abs()
        _zero(module, nm_mask(score, *nm) if nm else lowest_mask(score, ratio))
    elif stats is None:
        raise ValueError(f"{method} needs calibration statistics")
    elif method == "wanda":
        score = wanda_score(W, stats.sq)
        _zero(module, nm_mask(score, *nm) if nm else row_mask(score, ratio))
    else:
        set_weight_out_in(module, sparsegpt_weight(W, stats.hessian, ratio, nm, block_size, damping))


def prune_model(
    model: nn.Module,
    ratios,
    method: str,
    windows: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    module_ratios: dict[str, float] | None = None,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> dict[str, float]:
    """Prune ``model`` in place; returns the target sparsity of each module.

    ``ratios``: sparsity per decoder block [L]; ``module_ratios`` overrides single
    modules by fully qualified name. ``windows`` (token ids [n, seqlen]) are the
    calibration data of ``wanda`` and ``sparsegpt``. With ``nm`` every module gets
    N:M sparsity and the ratios are not used.
    """
    _check_method(method)
    targets = module_targets(model, ratios, module_ratios)
    if method == "magnitude":
        for name, (_, mod) in progress.track(prunable_modules(model).items(), desc="magnitude pruning", unit="matrix"):
            prune_module(mod, method, targets[name], nm=nm)
        return targets
    if windows is None:
        raise ValueError(f"{method} needs calibration windows")
    prefix, _ = find_blocks(model)
    for idx, block, stats in calibrate(model, windows, hessian=(method == "sparsegpt")):
        for rel, mod in projections(block).items():
            prune_module(mod, method, targets[f"{prefix}.{idx}.{rel}"], stats[rel], nm, damping, block_size)
    return targets


def outlier_ratios(model: nn.Module, windows: torch.Tensor, m: float = OWL_M) -> np.ndarray:
    """OWL's layer-wise outlier ratio: per block, the share of Wanda scores above ``m`` × the block's mean.

    The scores of all the block's projections are pooled; the statistics come
    from the dense model (sequential calibration without pruning). float64 [L].
    """
    out = []
    for _, block, stats in calibrate(model, windows, update=False):
        scores = [wanda_score(weight_out_in(mod), stats[rel].sq) for rel, mod in projections(block).items()]
        mean = sum(float(s.sum()) for s in scores) / sum(s.numel() for s in scores)
        out.append(sum(int((s > m * mean).sum()) for s in scores) / sum(s.numel() for s in scores))
    return np.asarray(out, dtype=np.float64)


# ----------------------------------------------------------------------------- allocation


def allocation_metric(
    allocation: str,
    model: nn.Module,
    scores: np.ndarray | None = None,
    windows: torch.Tensor | None = None,
    owl_m: float = OWL_M,
) -> np.ndarray | None:
    """The per-block metric an allocation label maps to sparsity (float64 [L]; ``None`` when it has none).

    By the rule's ``metric`` (:mod:`layerif.allocate`): ``scores`` -- the scores S_l
    (``scores``); ``alpha`` -- the heavy-tail exponent α of the model's weights;
    ``outliers`` -- OWL's outlier ratios on calibration ``windows``. Measure it on
    the dense model, before pruning.
    """
    rule, _ = allocate.get(allocation, "sparsity")
    if rule.metric is None:
        return None
    if rule.metric == "scores":
        if scores is None:
            raise UserError(f"--allocation {allocation} needs --scores scores.json (from `layerif score`)")
        return np.asarray(scores, dtype=np.float64)
    if rule.metric == "alpha":
        return block_alphas(model)
    if rule.metric in MEASURED:
        raise ValueError(f"the {allocation} allocation is measured with a pruner: use measured_metric")
    if windows is None:
        raise ValueError("the owl allocation needs calibration windows")
    return outlier_ratios(model, windows, owl_m)


def level_database(root: Path, model: nn.Module, method: str, windows: torch.Tensor | None = None,
                   damping: float = DAMPING, block_size: int = BLOCK_SIZE, model_name: str = "") -> LevelDatabase:
    """The level database (:class:`layerif.search.LevelDatabase`) of ``method`` under ``root``.

    Calibration rule: every block is calibrated on the *dense* model's inputs
    (:func:`calibrate` without update, as EvoPress builds its database), so a
    block's level does not depend on the levels of the blocks before it.
    Magnitude and Wanda store masks; SparseGPT also the reconstructed weights.
    """
    _check_method(method)
    if method != "magnitude" and windows is None:
        raise ValueError(f"{method} levels need calibration windows")
    sparsegpt = method == "sparsegpt"
    settings = {"model": model_name, "method": method, "calibration": "dense inputs of every block",
                "windows": windows_hash(None if method == "magnitude" else windows),
                "damping": float(damping) if sparsegpt else None, "block_size": int(block_size) if sparsegpt else None}

    def blocks():
        if method == "magnitude":  # no calibration
            yield from ((idx, None) for idx in range(len(find_blocks(model)[1])))
        else:
            yield from ((idx, stats) for idx, _, stats in calibrate(model, windows, hessian=sparsegpt, update=False))

    def prune(module: nn.Module, stats: InputStats | None, ratio: float):
        pruned = copy.deepcopy(module)  # the model itself stays dense
        prune_module(pruned, method, ratio, stats, None, damping, block_size)
        W = weight_out_in(pruned).detach()
        return W == 0, (W.float() if sparsegpt else None)

    return LevelDatabase(root, model, settings, blocks, prune)


MEASURED = ("sensitivity", "search")
"""Metrics measured with the chosen pruner (:mod:`layerif.search`) rather than read off the dense model."""


def search_start(label: str, search_init: str = "uniform") -> str:
    """The start of a ``search`` allocation label: ``search-START``'s START, else ``search_init``."""
    return label.removeprefix("search-") if label.startswith("search-") else search_init


def measured_metric(rule: allocate.Allocation, model: nn.Module, method: str, target: float, weights: np.ndarray,
                    windows: torch.Tensor | None, fitness_windows: torch.Tensor, options: SearchOptions,
                    db_root: Path, seed: int, start_ratios=None, start: str = "uniform",
                    damping: float = DAMPING, block_size: int = BLOCK_SIZE, batch_size: int = 4,
                    model_name: str = "") -> tuple[np.ndarray, dict]:
    """The metric of a measured allocation rule, and its record.

    ``sensitivity``: the KL rise per block pruned alone at ``target``; ``search``:
    the per-block sparsity found by the search from ``start_ratios``. The level
    database of ``method`` (calibrated on ``windows``) lives in ``db_root``; the
    KL is measured on ``fitness_windows``.
    """
    db = level_database(db_root, model, method, windows, damping, block_size, model_name)
    if rule.metric == "sensitivity":
        return run_sensitivity(model, db, target, fitness_windows, batch_size)
    return run_search(model, db, target, weights, fitness_windows, start_ratios, start, options.search_config(seed),
                      batch_size)


# ----------------------------------------------------------------------------- export


def llmcompressor_recipe(method: str, ratios, blocks_prefix: str, nm: tuple[int, int] | None = None,
                         damping: float = DAMPING, block_size: int = BLOCK_SIZE) -> str | None:
    """The allocation as an llm-compressor oneshot recipe (YAML), or ``None`` for ``magnitude``.

    Format (llm-compressor ≥ 0.5, ``SparsityModifierBase``; checked against 0.14)::

        sparsity_stage:
          sparsity_modifiers:
            SparseGPTModifier:            # or WandaPruningModifier
              sparsity: [0.55, 0.61, ...] # one per module matched by `targets`, in model order
              mask_structure: "0:0"       # "N:M" for semi-structured (N pruned of every M)
              targets: ["re:model\\.layers\\.\\d+$"]   # the decoder blocks
              block_size: 128             # SparseGPT only
              dampening_frac: 0.01        # SparseGPT only

    A list-valued ``sparsity`` is indexed by the modules ``targets`` matches, so
    targets name the decoder blocks and every Linear inside block l gets ratio l.
    Run it with ``llmcompressor.oneshot(model=..., dataset=..., recipe="recipe.yaml",
    num_calibration_samples=128, max_seq_length=...)``. llm-compressor has no
    one-shot magnitude modifier, hence ``None`` there.
    """
    name = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}.get(method)
    if name is None:
        return None
    mod: dict = {
        "sparsity": [round(float(r), 6) for r in np.asarray(ratios).reshape(-1)],
        "mask_structure": f"{nm[0]}:{nm[1]}" if nm else "0:0",
        "targets": [f"re:{re.escape(blocks_prefix)}\\.\\d+$"],
    }
    if method == "sparsegpt":
        mod.update(block_size=int(block_size), dampening_frac=float(damping))
    head = (
        "# llm-compressor recipe exported by layerif: one sparsity per decoder block.\n"
        "# from llmcompressor import oneshot\n"
        "# oneshot(model=MODEL, dataset=DATASET, recipe=\"recipe.yaml\", num_calibration_samples=128)\n"
    )
    return head + yaml.safe_dump({"sparsity_stage": {"sparsity_modifiers": {name: mod}}}, sort_keys=False,
                                 default_flow_style=None, width=100)


def save_pruned(model: nn.Module, tokenizer, path: str, allocation: dict, recipe: str | None = None) -> Path:
    """Write the pruned model (safetensors), tokenizer, allocation.json and recipe.yaml to ``path``.

    Built in a temporary sibling folder that then replaces ``path`` (a failed save
    leaves the old folder, or none).
    """
    dest = check_save_dir(path, "pruned model")
    with staged_folder(dest, "--save", lambda d: check_save_dir(d, "pruned model")) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_allocation(tmp, allocation)
        if recipe is not None:
            write_text(tmp / "recipe.yaml", recipe)
    return dest


# ----------------------------------------------------------------------------- shared CLI pieces


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown pruning method {method!r} (use {', '.join(METHODS)})")


def _check_sizes(n_calib: int, seqlen: int, damping: float, block_size: int) -> None:
    if n_calib < 1:
        raise UserError(f"--n-calib must be ≥ 1 (got {n_calib})")
    if seqlen < 2:
        raise UserError(f"--seqlen must be ≥ 2 (got {seqlen})")
    if not damping > 0:
        raise UserError(f"--damping must be > 0 (got {damping:g})")
    if block_size < 1:
        raise UserError(f"--block-size must be ≥ 1 (got {block_size})")


def _task_records(task: str | None, task_items: int, allow_repeats: bool = False) -> list[dict] | None:
    """The multiple-choice records of ``--task`` (None without one), after checking ``--task-items``."""
    if task_items < 1:
        raise UserError(f"--task-items must be ≥ 1 (got {task_items})")
    return None if task is None else test_records(task, task_items, allow_repeats=allow_repeats)


def _corpus(text: str | None) -> tuple[str, str]:
    """(calibration part, evaluation part) of ``--text`` or the built-in corpus."""
    from .corpus import load_text, split_text

    return split_text(load_text(text))


def _windows(tokenizer, calib_text: str, n: int, seqlen: int, seed: int) -> torch.Tensor:
    from .corpus import text_windows

    return text_windows(tokenizer, calib_text, n, seqlen, seed)


def _block_table(layers: list[int], target: np.ndarray, achieved: np.ndarray, metric: np.ndarray | None) -> str:
    head = f"{'block':>5}  {'metric':>10}  {'target':>7}  {'achieved':>8}"
    rows = [
        f"{l:>5}  {'' if metric is None else f'{metric[l]:.4g}':>10}  {target[l]:>7.4f}  {achieved[l]:>8.4f}"
        for l in layers
    ]
    return "\n".join([head, *rows])


# ----------------------------------------------------------------------------- layerif prune


@dataclass
class PruneArgs(ModelArgs, SearchOptions):
    """Prune a causal LM with per-layer sparsity from LayerIF scores (or a baseline allocation)."""

    scores: str | None = field(default=None, metadata={"help": "scores.json of `layerif score` (needed by --allocation layerif)"})
    sparsity: float = field(default=0.5, metadata={"help": "target sparsity, the mean over prunable weights, in [0, 1)"})
    method: str = field(default="wanda", metadata={"help": "pruner", "choices": METHODS})
    allocation: str = field(default="layerif", metadata={"help": "per-block sparsity map", "choices": tuple(allocate.names("sparsity"))})
    epsilon: float = field(default=0.2, metadata={"help": "spread of the linear map: ratios in [1-ε, 1+ε] × target (layerif, alpha)"})
    reverse: bool = field(default=False, metadata={"help": "flip the map's direction: a higher metric gets less sparsity"})
    smooth: bool = field(default=False, metadata={"help": "Savitzky-Golay smoothing (window 7, order 3) of the metric first"})
    owl_m: float = field(default=OWL_M, metadata={"help": "OWL: a weight is an outlier above M × its block's mean Wanda score"})
    owl_lambda: float = field(default=OWL_LAMBDA, metadata={"help": "OWL: the block sparsities span 2λ around the target"})
    nm: str | None = field(default=None, metadata={"help": "N:M semi-structured pruning, e.g. 2:4 (N pruned of every M; needs --allocation uniform)"})
    n_calib: int = field(default=128, metadata={"help": "calibration windows (wanda, sparsegpt, owl)"})
    seqlen: int = field(default=512, metadata={"help": "tokens per calibration / evaluation window"})
    text: str | None = field(default=None, metadata={"help": "text file for calibration and evaluation (default: built-in English corpus)"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration windows"})
    damping: float = field(default=DAMPING, metadata={"help": "SparseGPT damping, a fraction of the mean Hessian diagonal"})
    block_size: int = field(default=BLOCK_SIZE, metadata={"help": "SparseGPT column block size"})
    eval_windows: int = field(default=0, metadata={"help": "also measure perplexity on this many held-out windows (0: no)"})
    task: str | None = field(default=None, metadata={"help": "also measure multiple-choice accuracy on a built-in task or a JSONL file of {prompt, options, answer} records"})
    task_items: int = field(default=200, metadata={"help": "test items of a built-in --task (a file: its first N)"})
    allow_repeats: bool = field(default=False, metadata={"help": "allow more task items than a built-in split holds (records repeat)"})
    batch_size: int = field(default=4, metadata={"help": "windows / records per evaluation batch"})
    save: str | None = field(default=None, metadata={"help": "folder for the pruned model, allocation.json and recipe.yaml"})
    allocation_file: str | None = field(default=None, metadata={"help": "apply the per-block sparsity of a saved allocation.json (replaces --allocation and --sparsity)"})
    search_init: str = field(default="uniform", metadata={"help": "start of --allocation search: uniform, layerif, owl, alpha or a saved allocation.json"})
    search_dir: str = field(default="out/search", metadata={"help": "folder of the level database and the search trajectory (search, sensitivity)"})


def run(args: PruneArgs) -> str:
    """``layerif prune``: allocate, prune, measure, save; returns the terminal summary."""
    nm = parse_nm(args.nm)
    check_sparsity(args.sparsity)
    check_epsilon(args.epsilon)
    _check_method(args.method)
    _check_sizes(args.n_calib, args.seqlen, args.damping, args.block_size)
    rule, _ = allocate.get(args.allocation, "sparsity", args.reverse, args.smooth)
    allocation, target = ("file", None) if args.allocation_file is not None else (args.allocation, args.sparsity)
    searching = allocation != "file" and rule.metric == "search"
    start = search_start(allocation, args.search_init) if searching else None
    if searching:
        args.search_config(args.seed)
        if start not in allocate.SEARCH_STARTS and not Path(start).exists():
            raise UserError(f"--search-init {start!r} is neither {', '.join(allocate.SEARCH_STARTS)} nor a file")
    if nm is not None:
        if allocation != "uniform":
            raise UserError(f"--nm {args.nm} prunes every block alike; use --allocation uniform")
        if not math.isclose(args.sparsity, nm[0] / nm[1]):
            raise UserError(f"--nm {args.nm} means sparsity {nm[0] / nm[1]:g}; pass --sparsity {nm[0] / nm[1]:g}")
    if allocation != "file" and "scores" in (rule.metric, allocate.ALLOCATIONS.get(start, rule).metric) \
            and args.scores is None:
        raise UserError(f"--allocation {args.allocation} needs --scores scores.json (from `layerif score`)")
    records = _task_records(args.task, args.task_items, args.allow_repeats)
    if args.scores is not None:
        read_scores(args.scores)  # a bad scores file fails before the model loads
    if args.save is not None:
        check_save_dir(args.save, "pruned model")
    lm = args.load()
    model = lm.model
    prefix, blocks = find_blocks(model)
    scores = None
    if args.scores is not None:
        scores, doc = block_scores(args.scores, len(blocks))
        if doc.get("model") not in (None, lm.name):
            progress.info(f"note: {args.scores} was computed on {doc.get('model')}, pruning {lm.name}")
    measured = allocation != "file" and rule.metric in MEASURED
    needs_data = args.method != "magnitude" or measured or "owl" in (allocation, start)
    calib_text, eval_text = _corpus(args.text) if needs_data or args.eval_windows > 0 else ("", "")
    windows = _windows(lm.tokenizer, calib_text, args.n_calib, args.seqlen, args.seed) if needs_data else None
    t0 = time.time()
    weights = prunable_params(model)
    options = SparsityOptions(args.epsilon, args.smooth, args.owl_lambda)
    metric, extra = None, {}
    if allocation == "file":
        ratios, _ = block_sparsity(args.allocation_file, len(blocks))
        target = float(np.average(ratios, weights=weights))
        extra = {"allocation_file": args.allocation_file}
    else:
        if measured:
            start_ratios = None
            if rule.metric == "search":
                start_ratios = (allocate_sparsity(start, allocation_metric(start, model, scores, windows, args.owl_m),
                                                  target, weights, options)
                                if start in allocate.SEARCH_STARTS else block_sparsity(start, len(blocks))[0])
            fitness_windows = _windows(lm.tokenizer, calib_text, args.search_windows, args.seqlen, args.seed)
            out = prepare_out_dir(args.search_dir)
            metric, rec = measured_metric(rule, model, args.method, target, weights, windows, fitness_windows, args,
                                          out / "levels", args.seed, start_ratios, start, args.damping,
                                          args.block_size, args.batch_size, lm.name)
            if rule.metric == "search":
                write_search(out, {allocation: rec}, f"{lm.name} · {args.method}")
                rec = {k: v for k, v in rec.items() if k != "trajectory"}
            extra = {rule.metric: rec}
        else:
            metric = allocation_metric(args.allocation, model, scores, windows, args.owl_m)
        ratios = allocate_sparsity(args.allocation, metric, target, weights, options, args.reverse)
    targets = prune_model(model, ratios, args.method, windows, nm=nm, damping=args.damping, block_size=args.block_size)
    achieved, per_module = achieved_sparsity(model)
    record = {
        "model": lm.name,
        "method": args.method,
        "allocation": allocation,
        "target_sparsity": target,
        "mean_achieved": float(np.average(achieved, weights=weights)),
        "layers": list(range(len(blocks))),
        "sparsity": [float(r) for r in ratios],
        "achieved": [float(a) for a in achieved],
        "metric": None if metric is None else [float(m) for m in metric],
        "prunable_params": [int(w) for w in weights],
        "modules": {name: {"target": targets[name], "achieved": per_module[name]} for name in targets},
        "seconds": round(time.time() - t0, 2),
        **extra,
        "args": asdict(args),
        "version": __version__,
    }
    lines = [
        f"{lm.name} · {args.method} · allocation {allocation} · target {target:g} · "
        f"achieved {record['mean_achieved']:.4f} · {record['seconds']:.1f} s",
        _block_table(record["layers"], ratios, achieved, None if "search" in extra else metric),
    ]
    if "search" in extra:
        s = extra["search"]
        lines.append(f"search from {s['start']}: KL to dense {s['start_fitness']:.4g} → {s['fitness']:.4g} in "
                     f"{s['evaluations']} evaluations ({s['seconds']:.0f} s); level database {s['database']['path']} "
                     f"({s['database']['bytes'] / 1e6:.1f} MB, built in {s['database']['build_seconds']:.0f} s); "
                     f"trajectory in {args.search_dir}/search.png")
    if args.eval_windows > 0:
        record["perplexity"] = perplexity(model, lm.tokenizer, eval_text, seqlen=args.seqlen, max_windows=args.eval_windows)
        lines.append(f"perplexity on {args.eval_windows} held-out windows: {record['perplexity']:.3f}")
    if records is not None:
        record["accuracy"] = mc_accuracy(model, lm.tokenizer, records, batch_size=args.batch_size)
        lines.append(f"accuracy on {args.task} ({len(records)} items, multiple choice): {record['accuracy']:.3f}")
    if args.save is not None:
        recipe = llmcompressor_recipe(args.method, ratios, prefix, nm, args.damping, args.block_size)
        dest = save_pruned(model, lm.tokenizer, args.save, record, recipe)
        lines.append(f"wrote {dest}/ (model.safetensors, tokenizer, allocation.json{', recipe.yaml' if recipe else ''})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- layerif compare-pruning


@dataclass
class CompareArgs(ModelArgs, SearchOptions):
    """Compare allocations (uniform, OWL, AlphaPruning, LayerIF both ways) × pruners × sparsities over seeds."""

    scores: str | None = field(default=None, metadata={"help": "scores.json of `layerif score` (needed by the layerif allocations)"})
    allocations: list[str] = field(default_factory=lambda: list(COMPARE_SPARSITY), metadata={"help": "allocations to compare (also sensitivity and search-START, the search from START: uniform, layerif, owl, alpha)"})
    methods: list[str] = field(default_factory=lambda: ["wanda", "sparsegpt"], metadata={"help": "pruners"})
    sparsities: list[str] = field(default_factory=lambda: ["0.5", "0.6", "0.7"], metadata={"help": "target sparsities"})
    seeds: list[str] = field(default_factory=lambda: ["0", "1", "2"], metadata={"help": "calibration seeds (at least 3 for mean ± std)"})
    epsilon: float = field(default=0.2, metadata={"help": "spread of the linear map (layerif, alpha)"})
    smooth: bool = field(default=False, metadata={"help": "Savitzky-Golay smoothing of the LayerIF scores"})
    owl_m: float = field(default=OWL_M, metadata={"help": "OWL outlier threshold M"})
    owl_lambda: float = field(default=OWL_LAMBDA, metadata={"help": "OWL: the block sparsities span 2λ around the target"})
    n_calib: int = field(default=128, metadata={"help": "calibration windows per seed"})
    seqlen: int = field(default=512, metadata={"help": "tokens per calibration / evaluation window"})
    text: str | None = field(default=None, metadata={"help": "text file for calibration and evaluation (default: built-in English corpus)"})
    eval_windows: int = field(default=64, metadata={"help": "held-out perplexity windows (0: all)"})
    task: str | None = field(default=None, metadata={"help": "built-in task or JSONL file of {prompt, options, answer} records for accuracy (default: the task of --scores, else capitals)"})
    task_items: int = field(default=200, metadata={"help": "test items of a built-in task (a file: its first N)"})
    allow_repeats: bool = field(default=False, metadata={"help": "allow more task items than a built-in split holds (records repeat)"})
    batch_size: int = field(default=4, metadata={"help": "windows / records per evaluation batch"})
    damping: float = field(default=DAMPING, metadata={"help": "SparseGPT damping"})
    block_size: int = field(default=BLOCK_SIZE, metadata={"help": "SparseGPT column block size"})
    resume: bool = field(default=False, metadata={"help": "keep the rows of an earlier run with the same options in --out"})
    out: str = field(default="out/compare-pruning", metadata={"help": "output folder"})
    overwrite: bool = overwrite_field()


CSV_FIELDS = ("method", "sparsity", "allocation", "seed", "achieved", "perplexity", "accuracy", "seconds")


def _parse_list(values: list, kind: type, option: str) -> list:
    try:
        out = [kind(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"--{option}: cannot read {values!r} as {kind.__name__} values") from None
    if not out:
        raise UserError(f"--{option}: no values")
    return out


def _compare_markdown(rows: list[dict], meta: dict) -> str:
    """comparison.md: one table per pruner, mean ± std over seeds, best allocation per sparsity in bold."""
    dense = next((r for r in rows if r["allocation"] == "dense"), None)
    lines = [f"# Pruning allocations on {meta['model']}", "",
             "Mean ± standard deviation over calibration seeds; bold: the best allocation at that sparsity.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    if dense:
        lines.append(f"- dense model: perplexity {dense['perplexity']:.3f}, accuracy {dense['accuracy']:.3f}")
    for method in dict.fromkeys(r["method"] for r in rows if r["allocation"] != "dense"):
        lines += ["", f"## {method}", "", "| sparsity | allocation | achieved | perplexity ↓ | accuracy ↑ | seeds |",
                  "|---:|---|---:|---:|---:|---:|"]
        for sp in sorted({r["sparsity"] for r in rows if r["method"] == method}):
            group: dict[str, list[dict]] = {}
            for r in rows:
                if r["method"] == method and r["sparsity"] == sp:
                    group.setdefault(r["allocation"], []).append(r)
            stats = {a: {k: mean_std([r[k] for r in rs]) for k in ("achieved", "perplexity", "accuracy")}
                     for a, rs in group.items()}
            best_ppl = min(s["perplexity"][0] for s in stats.values())
            best_acc = max(s["accuracy"][0] for s in stats.values())
            for a, s in stats.items():
                ppl, acc = mean_std_cell(s["perplexity"], best_ppl, 3), mean_std_cell(s["accuracy"], best_acc, 3)
                lines.append(f"| {sp:g} | {a} | {s['achieved'][0]:.4f} | {ppl} | {acc} | {len(group[a])} |")
    return "\n".join(lines + _wins(rows)) + "\n"


def _wins(rows: list[dict]) -> list[str]:
    """The summary of comparison.md: per allocation, in how many (pruner, sparsity) settings its mean
    accuracy / perplexity is the best (ties count for each), and a plain verdict on LayerIF."""
    cells: dict[tuple[str, float], dict[str, list[dict]]] = {}
    for r in rows:
        if r["allocation"] != "dense":
            cells.setdefault((r["method"], r["sparsity"]), {}).setdefault(r["allocation"], []).append(r)
    if not cells:
        return []
    allocations = list(dict.fromkeys(a for group in cells.values() for a in group))
    best = {k: dict.fromkeys(allocations, 0) for k in ("accuracy", "perplexity")}
    for group in cells.values():
        means = {a: {k: mean_std([r[k] for r in rs])[0] for k in best} for a, rs in group.items()}
        top_acc = max(m["accuracy"] for m in means.values())
        top_ppl = min(m["perplexity"] for m in means.values())
        for a, m in means.items():
            best["accuracy"][a] += m["accuracy"] == top_acc
            best["perplexity"][a] += m["perplexity"] == top_ppl
    n = len(cells)
    lines = ["", "## Summary", "", f"Settings (pruner × sparsity) in which an allocation has the best mean (of {n}; "
             "ties count for each):", "", "| allocation | best accuracy | best perplexity |", "|---|---:|---:|"]
    lines += [f"| {a} | {best['accuracy'][a]} | {best['perplexity'][a]} |" for a in allocations]
    if "layerif" in allocations:
        top = max(best["accuracy"].values())
        leaders = [a for a in allocations if best["accuracy"][a] == top]
        if leaders == ["layerif"]:
            verdict = f"LayerIF has the best accuracy most often ({top} of {n})."
        elif "layerif" in leaders:
            verdict = f"LayerIF shares the lead in accuracy with {', '.join(a for a in leaders if a != 'layerif')}."
        else:
            verdict = (f"LayerIF does not win: {', '.join(leaders)} {'has' if len(leaders) == 1 else 'have'} the best "
                       f"accuracy most often ({top} of {n}; LayerIF {best['accuracy']['layerif']}).")
        lines += ["", verdict + " Compare the gaps with the standard deviations over seeds above."]
    return lines


def _compare_plot(rows: list[dict], title: str):
    """Perplexity and accuracy against sparsity, one line per allocation (mean ± std), one column per pruner.

    Perplexity is on a log scale when it spans more than a factor 3; the lines
    are shifted slightly along x so their error bars do not hide each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = [r for r in rows if r["allocation"] != "dense"]
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    allocs = list(dict.fromkeys(r["allocation"] for r in pruned))
    dense = next((r for r in rows if r["allocation"] == "dense"), None)
    sps_all = sorted({r["sparsity"] for r in pruned})
    step = 0.15 * min(np.diff(sps_all), default=0.1) / max(len(allocs) - 1, 1)
    fig, axes = plt.subplots(2, len(methods), figsize=(5 * len(methods), 7), squeeze=False)
    for col, method in enumerate(methods):
        for j, alloc in enumerate(allocs):
            sps = sorted({r["sparsity"] for r in pruned if r["method"] == method and r["allocation"] == alloc})
            x = [sp + (j - (len(allocs) - 1) / 2) * step for sp in sps]
            for row, key in enumerate(("perplexity", "accuracy")):
                ms = [mean_std([r[key] for r in pruned if r["method"] == method and r["allocation"] == alloc
                                 and r["sparsity"] == sp]) for sp in sps]
                axes[row][col].errorbar(x, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                                        label=alloc)
        for row, key in enumerate(("perplexity", "accuracy")):
            ax = axes[row][col]
            if dense:
                ax.axhline(dense[key], color="grey", linestyle="--", label="dense")
            values = [r[key] for r in pruned if r["method"] == method]
            if key == "perplexity" and min(values) > 0 and max(values) / min(values) > 3:
                ax.set_yscale("log")
            ax.set_xticks(sps_all)
            ax.set_xlabel("target sparsity")
            ax.set_ylabel(key)
            ax.set_title(method)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["sparsity"] = float(r["sparsity"])
        for k in ("achieved", "perplexity", "accuracy", "seconds"):
            r[k] = float(r[k])
    return rows


def _rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    return buf.getvalue()


def _resumed(args: CompareArgs, dest: Path, state: Path) -> dict:
    """``--resume``: ``{"rows", "searches"}`` of an interrupted run (its cache ``state``) or of the finished
    result at ``dest``, if that run used the same options; empty when neither exists."""
    for folder in (state, dest):
        if not (folder / "comparison.csv").exists():
            continue
        try:
            saved = read_config(folder)["args"]
        except UserError:
            raise UserError(f"--resume: {folder}/config.json is missing or unreadable") from None
        differ = [k for k, v in asdict(args).items() if k not in ("resume", "overwrite") and saved.get(k) != v]
        if differ:
            raise UserError(f"--resume: the earlier run in {dest} used other options ({', '.join(differ)})")
        searches = read_json(folder / "search.json", "search") if (folder / "search.json").exists() else {}
        return {"rows": _read_rows(folder / "comparison.csv"), "searches": searches}
    return {"rows": [], "searches": {}}


def run_compare(args: CompareArgs) -> str:
    """``layerif compare-pruning``: every allocation × pruner × sparsity × seed; writes csv, md and a plot."""
    allocations = _parse_list(args.allocations, str, "allocations")
    methods = _parse_list(args.methods, str, "methods")
    sparsities = _parse_list(args.sparsities, float, "sparsities")
    seeds = _parse_list(args.seeds, int, "seeds")
    for a in allocations:
        allocate.get(a, "sparsity")
    for m in methods:
        _check_method(m)
    for sp in sparsities:
        check_sparsity(sp)
    _check_sizes(args.n_calib, args.seqlen, args.damping, args.block_size)
    check_epsilon(args.epsilon)
    if any(allocate.get(a, "sparsity")[0].metric == "search" for a in allocations):
        args.search_config(0)
        if "search" in allocations:
            raise UserError("compare-pruning runs searches as search-START (e.g. search-uniform, search-layerif)")
    if any(allocate.get(a.removeprefix("search-"), "sparsity")[0].metric == "scores" for a in allocations) \
            and args.scores is None:
        raise UserError("the layerif allocations need --scores scores.json (from `layerif score`)")
    records = _task_records(args.task, args.task_items, args.allow_repeats)  # a bad --task fails before any output
    if args.scores is not None:
        read_scores(args.scores)  # a bad scores file too
    with output_folder(args.out, "compare-pruning", args.overwrite or args.resume) as out:
        state = out / CACHE_DIR  # rows, searches and level databases of finished runs, for --resume
        resumed = _resumed(args, Path(args.out), state) if args.resume else {"rows": [], "searches": {}}
        rows: list[dict] = resumed["rows"]
        state.mkdir(exist_ok=True)
        if args.resume and (Path(args.out) / "levels").is_dir() and not (state / "levels").exists():
            shutil.copytree(Path(args.out) / "levels", state / "levels")  # the finished run's level databases
        write_config(state, "compare-pruning", args)
        write_config(out, "compare-pruning", args)

        lm = args.load()
        model, tok = lm.model, lm.tokenizer
        _, blocks = find_blocks(model)
        scores, doc = block_scores(args.scores, len(blocks)) if args.scores else (None, {})
        task = args.task or doc.get("task") or "capitals"
        records = records or test_records(task, args.task_items, allow_repeats=args.allow_repeats)
        calib_text, eval_text = _corpus(args.text)
        max_windows = args.eval_windows or None
        meta = {"model": lm.name, "task": f"{task} ({len(records)} test items, multiple choice)",
                "scores": f"{args.scores} (task {doc.get('task')}, target {doc.get('target')})" if args.scores else "none",
                "perplexity": f"held-out corpus, {args.seqlen}-token windows, at most {max_windows or 'all'}",
                "calibration": f"{args.n_calib} windows of {args.seqlen} tokens per seed", "seeds": ", ".join(map(str, seeds)),
                "epsilon": args.epsilon, "smooth": args.smooth}

        def evaluate() -> tuple[float, float]:
            return (perplexity(model, tok, eval_text, seqlen=args.seqlen, max_windows=max_windows,
                               batch_size=args.batch_size),
                    mc_accuracy(model, tok, records, batch_size=args.batch_size))

        def save_all() -> str:  # after every run, into the cache a resumed run reads
            md = _compare_markdown(rows, meta)
            write_text(state / "comparison.csv", _rows_csv(rows))
            return md

        done = {(r["method"], r["sparsity"], r["allocation"], r["seed"]) for r in rows}
        if ("dense", 0.0, "dense", "-") not in done:
            t0 = time.time()
            ppl, acc = evaluate()
            rows.append({"method": "dense", "sparsity": 0.0, "allocation": "dense", "seed": "-", "achieved": 0.0,
                         "perplexity": ppl, "accuracy": acc, "seconds": round(time.time() - t0, 2)})
            save_all()
        mods = prunable_modules(model)
        dense = {name: mod.weight.detach().clone() for name, (_, mod) in mods.items()}
        weights = prunable_params(model)
        metrics: dict[tuple[str, int | None], np.ndarray | None] = {}  # (allocation, seed for owl) -> dense-model metric
        calib: dict[int, torch.Tensor] = {}  # seed -> calibration windows
        fitness: dict[int, torch.Tensor] = {}  # seed -> KL windows of search and sensitivity
        searches = resumed["searches"]
        todo = [(seed, m, sp, a) for seed in seeds for m in methods for sp in sparsities for a in allocations
                if (m, sp, a, str(seed)) not in done]
        for seed, method, sp, label in progress.track(todo, desc="compare-pruning", unit="run"):
            t0 = time.time()
            rule, _ = allocate.get(label, "sparsity")
            if seed not in calib:
                calib[seed] = _windows(tok, calib_text, args.n_calib, args.seqlen, seed)
            windows = calib[seed]
            options = SparsityOptions(args.epsilon, args.smooth and rule.metric == "scores", args.owl_lambda)

            def map_metric(name: str):
                key = (name, seed if allocate.ALLOCATIONS[name].metric == "outliers" else None)
                if key not in metrics:
                    metrics[key] = allocation_metric(name, model, scores, windows, args.owl_m)
                return metrics[key]

            if rule.metric in MEASURED:
                start = search_start(label)
                start_ratios = allocate_sparsity(start, map_metric(start), sp, weights, options) \
                    if rule.metric == "search" else None
                if seed not in fitness:
                    fitness[seed] = _windows(tok, calib_text, args.search_windows, args.seqlen, seed)
                metric, rec = measured_metric(rule, model, method, sp, weights, windows, fitness[seed], args,
                                              state / "levels", seed, start_ratios, start, args.damping, args.block_size,
                                              args.batch_size, lm.name)
                if rule.metric == "search":
                    searches[f"{method} {sp:g} seed {seed} from {start}"] = rec
                    write_search(state, searches, f"{lm.name}: search fitness by evaluations")
            else:
                metric = map_metric(rule.name)
            ratios = allocate_sparsity(label, metric, sp, weights, options)
            prune_model(model, ratios, method, windows, damping=args.damping, block_size=args.block_size)
            achieved, _ = achieved_sparsity(model)
            ppl, acc = evaluate()
            rows.append({"method": method, "sparsity": sp, "allocation": label, "seed": str(seed),
                         "achieved": float(np.average(achieved, weights=weights)), "perplexity": ppl, "accuracy": acc,
                         "seconds": round(time.time() - t0, 2)})
            with torch.no_grad():
                for name, w in dense.items():
                    mods[name][1].weight.copy_(w)
            save_all()
        md = save_all()  # also when --resume found nothing left to run: the tables follow the current code
        write_text(out / "comparison.csv", _rows_csv(rows))
        write_text(out / "comparison.md", md)
        if searches:
            write_search(out, searches, f"{lm.name}: search fitness by evaluations")
        if (state / "levels").exists():  # the level databases belong to the result
            os.replace(state / "levels", out / "levels")
        write_figure(out / "comparison.png", _compare_plot(rows, f"{lm.name} · task {task}"))
        write_report(out)
    out = Path(args.out)
    return (md + f"\nwrote {out}/comparison.csv, comparison.md, comparison.png, config.json, report.md, report.html")
