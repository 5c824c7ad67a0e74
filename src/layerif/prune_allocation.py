"""Per-block sparsity for a pruning run: the one path from an allocation label to the ratios the pruner gets.

:func:`block_sparsity_for` serves ``prune`` and ``compare-pruning``: it measures the allocation's metric
(:mod:`layerif.measure`; for ``sensitivity`` and ``search`` with the chosen pruner through the level
database), runs the search from its start's ratios, and maps the metric to per-block sparsity
(:func:`layerif.allocate.allocate_sparsity`). :func:`level_database` is the pruner side of the level database
(:class:`layerif.search.LevelDatabase`): it prunes each (block, level) with the registered pruner.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import allocate
from .allocate import SparsityOptions, allocate_sparsity
from .measure import PRUNER_MEASURED, Sources, allocation_metric
from .models import find_blocks
from .prune import (BLOCK_SIZE, DAMPING, SETTINGS, InputStats, PruneSettings, calibrate, get_pruner,
                    pruned_weight)
from .results import block_sparsity
from .search import LevelDatabase, SearchConfig, run_search, run_sensitivity, windows_hash


def level_database(root: Path, model: nn.Module, method: str, windows: torch.Tensor | None = None,
                   damping: float = DAMPING, block_size: int = BLOCK_SIZE, model_name: str = "") -> LevelDatabase:
    """The level database (:class:`layerif.search.LevelDatabase`) of ``method`` under ``root``.

    Calibration rule: every block is calibrated on the *dense* model's inputs
    (:func:`layerif.prune.calibrate` without update, as EvoPress builds its database), so a
    block's level does not depend on the levels of the blocks before it.
    A pruner that keeps the surviving weights stores masks; one that changes them
    (SparseGPT) also the pruned weights.
    """
    pruner = get_pruner(method)
    if pruner.needs_calibration and windows is None:
        raise ValueError(f"{method} levels need calibration windows")
    options = PruneSettings(None, float(damping), int(block_size))
    settings = {"model": model_name, "method": method, "calibration": "dense inputs of every block",
                "windows": windows_hash(windows if pruner.needs_calibration else None),
                **{k: (getattr(options, k) if k in pruner.settings else None) for k in SETTINGS}}

    def blocks():
        if not pruner.needs_calibration:
            yield from ((idx, None) for idx in range(len(find_blocks(model)[1])))
        else:
            yield from ((idx, stats) for idx, _, stats in calibrate(model, windows, hessian=pruner.needs_hessian,
                                                                    update=False))

    def prune(module: nn.Module, stats: InputStats | None, ratio: float):
        mask, new = pruned_weight(module, pruner, ratio, stats, options)  # the model itself stays dense
        return mask, (None if new is None else new.float())

    return LevelDatabase(root, model, settings, blocks, prune)


@dataclass(frozen=True)
class Measurement:
    """How the allocations measured with the pruner (``sensitivity``, ``search``) are measured.

    ``method``: the pruner; ``fitness_windows``: token ids [n, seqlen] the KL is measured on; ``db_root``: the
    folder of the level databases; ``search``: the seeded search settings (needed by a search);
    ``search_init``: the start of a plain ``search`` label (a start allocation or an allocation.json);
    SparseGPT's ``damping`` / ``block_size``; ``batch_size`` of the KL passes; ``model_name`` for the
    database's fingerprint.
    """

    method: str
    fitness_windows: torch.Tensor
    db_root: Path
    search: SearchConfig | None = None
    search_init: str = "uniform"
    damping: float = DAMPING
    block_size: int = BLOCK_SIZE
    batch_size: int = 4
    model_name: str = ""


def measured_metric(rule: allocate.Allocation, src: Sources, target: float, weights: np.ndarray, m: Measurement,
                    start_ratios=None, start: str = "uniform") -> tuple[np.ndarray, dict]:
    """The metric of an allocation measured with the pruner, and its record.

    ``sensitivity``: the KL rise per block pruned alone at ``target``; ``search``:
    the per-block sparsity found by the search from ``start_ratios``. The level
    database of ``m.method`` (calibrated on ``src.windows``) lives in ``m.db_root``.
    """
    db = level_database(m.db_root, src.model, m.method, src.windows, m.damping, m.block_size, m.model_name)
    if rule.metric == "sensitivity":
        return run_sensitivity(src.model, db, target, m.fitness_windows, m.batch_size)
    return run_search(src.model, db, target, weights, m.fitness_windows, start_ratios, start, m.search, m.batch_size)


def block_sparsity_for(label: str, src: Sources, target: float, weights: np.ndarray,
                       options: SparsityOptions = SparsityOptions(), reverse: bool = False,
                       measurement: Measurement | None = None) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
    """The per-block sparsity float64 [L] of the allocation ``label`` at ``target`` (the ``weights``-weighted mean),
    the metric it mapped (``None`` without one) and, for ``sensitivity`` / ``search``, their record.

    ``options.smooth`` smooths the metric of every rule with one (:attr:`Allocation.smoothable`; a search's start
    included). A search starts from ``search-START``'s START (or ``measurement.search_init``): the start's own
    sparsity, or an allocation.json's.
    """
    rule, _ = allocate.get(label, "sparsity")
    own = replace(options, smooth=options.smooth and rule.smoothable)
    record = None
    if rule.metric in PRUNER_MEASURED:
        if measurement is None:
            raise ValueError(f"the {label} allocation is measured with a pruner: give a Measurement")
        start, start_ratios = "uniform", None
        if rule.metric == "search":
            start = allocate.search_start(label, measurement.search_init)
            start_ratios = (block_sparsity_for(start, src, target, weights, options)[0]
                            if start in allocate.SEARCH_STARTS else block_sparsity(start, len(weights))[0])
        metric, record = measured_metric(rule, src, target, weights, measurement, start_ratios, start)
    else:
        metric = allocation_metric(label, src)
    return allocate_sparsity(label, metric, target, weights, own, reverse), metric, record
