"""Layer-wise unstructured pruning: pruners, calibration, the allocation metrics, saving.

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
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from . import allocate, progress
from .errors import UserError
from .io import staged_folder, write_text
from .models import find_blocks, iter_projections, projections, set_weight_out_in, weight_out_in
from .results import check_save_dir, write_saved
from .search import LevelDatabase, SearchOptions, run_search, run_sensitivity, windows_hash
from .spectral import block_alphas

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


def module_sparsity(model: nn.Module, ratios, module_ratios: dict[str, float] | None = None) -> dict[str, float]:
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


def check_method(method: str) -> None:
    """An unknown pruner is a :class:`UserError`."""
    if method not in METHODS:
        raise UserError(f"unknown pruning method {method!r} (use {', '.join(METHODS)})")


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
    check_method(method)
    sparsity = module_sparsity(model, ratios, module_ratios)
    if method == "magnitude":
        for name, (_, mod) in progress.track(prunable_modules(model).items(), desc="magnitude pruning", unit="matrix"):
            prune_module(mod, method, sparsity[name], nm=nm)
        return sparsity
    if windows is None:
        raise ValueError(f"{method} needs calibration windows")
    prefix, _ = find_blocks(model)
    for idx, block, stats in calibrate(model, windows, hessian=(method == "sparsegpt")):
        for rel, mod in projections(block).items():
            prune_module(mod, method, sparsity[f"{prefix}.{idx}.{rel}"], stats[rel], nm, damping, block_size)
    return sparsity


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
    check_method(method)
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
