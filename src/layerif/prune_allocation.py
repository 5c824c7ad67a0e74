"""Per-block sparsity for a pruning run: the one path from an allocation label to the ratios the pruner gets.

:func:`block_sparsity_for` serves ``prune`` and ``compare-pruning``: it measures the allocation's metric
(:mod:`layerif.measure`; for ``sensitivity`` and ``search`` with the chosen pruner through the level
database), runs the search from its start's ratios, and maps the metric to per-block sparsity
(:func:`layerif.allocate.allocate_sparsity`). :func:`level_database` is the pruner side of the level database
(:mod:`layerif.levels`): it prunes each (block, level) with the registered pruner and writes the folder the
search then only reads. A ``NAME-tuned`` allocation (``--tune``) first chooses NAME's hyper-parameter from its grid
(:func:`tuned_setting`) by the search's fitness, the KL to the dense model (:func:`layerif.search.kl_to_reference`)
on the fitness windows: calibration-side text apart from the pruners' calibration windows
(:func:`layerif.datasets_io.windows_apart`), never test items or held-out windows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import allocate, progress
from .errors import require_finite
from .allocate import SparsityOptions, allocate_sparsity
from .measure import PRUNER_MEASURED, Sources, allocation_metric
from .calibration import InputStats, calibrate
from .levels import LevelDatabase, ratio_key, windows_hash
from .prune import (BLOCK_SIZE, DAMPING, SETTINGS, PruneSettings, Pruner, get_pruner, prunable_modules, prune_model,
                    pruned_levels)
from .results import block_sparsity
from .search import (SearchConfig, kl_to_reference, reference_logprobs, run_search, run_sensitivity,
                     search_levels)


LEVELS_BYTES = 2**30
"""The float32 bytes of one block's pruned weights the level database builds at a time (levels of a block
pruned together, :meth:`PrunedLevels.ensure`)."""


class PrunedLevels(LevelDatabase):
    """The pruner side of a level database: :meth:`ensure` prunes the missing levels with the registered pruner
    and writes them (the format of :mod:`layerif.levels`); readers take it as the plain :class:`LevelDatabase`."""

    def __init__(self, root: str | Path, model: nn.Module, pruner: Pruner, windows: torch.Tensor | None,
                 options: PruneSettings, model_name: str = ""):
        if pruner.needs_calibration and windows is None:
            raise ValueError(f"{pruner.name} levels need calibration windows")
        settings = {"model": model_name, "method": pruner.name, "calibration": "dense inputs of every block",
                    "windows": windows_hash(windows if pruner.needs_calibration else None),
                    **{k: (getattr(options, k) if k in pruner.settings else None) for k in SETTINGS}}
        super().__init__(root, model, settings)
        self.model, self.pruner, self.windows, self.options = model, pruner, windows, options

    def _blocks(self) -> Iterator[tuple[int, dict[str, InputStats] | None]]:
        """(block index, its projections' calibration statistics on the dense model's inputs, or None)."""
        if not self.pruner.needs_calibration:
            yield from ((idx, None) for idx in range(len(self.modules)))
        else:
            yield from ((idx, stats) for idx, _, stats in calibrate(self.model, self.windows,
                                                                    hessian=self.pruner.needs_hessian, update=False))

    def ensure(self, ratios: list[list[float]]) -> dict:
        """Build every missing level: ``ratios[l]`` are the ratios block l needs. Returns :meth:`info`.

        The blocks are calibrated in order on the dense model's activations (the model is left unchanged) up to
        the last one with a missing level; levels already on disk are skipped. A block's missing levels are
        pruned together (:func:`layerif.prune.pruned_levels`), as many at a time as fit in
        :data:`LEVELS_BYTES` of float32 weights.
        """
        todo = self.missing(ratios)
        if any(todo):
            t0 = time.time()
            progress.info(f"building {sum(map(len, todo))} pruned levels of {self.method} in {self.path}")
            last = max(i for i, t in enumerate(todo) if t)
            for idx, stats in self._blocks():
                mods = self.modules[idx]
                at_once = max(1, LEVELS_BYTES // (4 * sum(m.weight.numel() for m in mods.values())))
                for k in range(0, len(todo[idx]), at_once):
                    group = todo[idx][k : k + at_once]
                    pruned = {rel: pruned_levels(mod, self.pruner, group, None if stats is None else stats[rel],
                                                 self.options) for rel, mod in mods.items()}
                    for j, ratio in enumerate(group):  # the model itself stays dense
                        self.write(idx, ratio, {rel: levels[j] for rel, levels in pruned.items()})
                if idx == last:
                    break
            self.add_build_seconds(time.time() - t0)
        return self.info()


def level_database(root: Path, model: nn.Module, method: str, windows: torch.Tensor | None = None,
                   damping: float = DAMPING, block_size: int = BLOCK_SIZE, model_name: str = "") -> PrunedLevels:
    """The level database of the pruner ``method`` under ``root`` (:class:`PrunedLevels`), calibrated on
    ``windows``: every block on the *dense* model's inputs (:func:`layerif.calibration.calibrate` without update, as
    EvoPress builds its database), so a block's level does not depend on the levels of the blocks before it."""
    return PrunedLevels(root, model, get_pruner(method), windows, PruneSettings(None, float(damping), int(block_size)),
                        model_name)


@dataclass(frozen=True)
class Measurement:
    """How the allocations measured with the pruner (``sensitivity``, ``search``) are measured.

    Also how a ``NAME-tuned`` allocation's hyper-parameter is chosen (:func:`tuned_setting`).
    ``method``: the pruner; ``fitness_windows``: token ids [n, seqlen] the KL is measured on (calibration-side
    text apart from the pruners' calibration windows, :func:`layerif.datasets_io.windows_apart`); ``db_root``: the
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
                    starts: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """The metric of an allocation measured with the pruner, and its record.

    ``sensitivity``: the KL rise per block pruned alone at ``target`` (kept in ``src.cache``, so a search from it
    and the ``sensitivity`` allocation of one run measure it once); ``search``:
    the per-block sparsity found by the search from the best of ``starts`` (name →
    per-block sparsity, :func:`search_starts`). The level database of ``m.method``
    (calibrated on ``src.windows``) lives in ``m.db_root``. A non-finite weight is a
    :class:`FloatingPointError` naming it, before any level is built.
    """
    for name, param in src.model.named_parameters():  # a non-finite model builds no level (FloatingPointError)
        require_finite(param, f"the weight {name}")
    db = level_database(m.db_root, src.model, m.method, src.windows, m.damping, m.block_size, m.model_name)
    if rule.metric == "sensitivity":  # measured once per database, target and fitness windows (src.cache)
        key = ("sensitivity", str(db.path), ratio_key(target), windows_hash(m.fitness_windows))
        if key not in src.cache:
            db.ensure([[target]] * len(weights))
            src.cache[key] = run_sensitivity(src.model, db, target, m.fitness_windows, m.batch_size)
        kl, record = src.cache[key]
        return kl.copy(), dict(record)
    db.ensure(search_levels(target, weights, m.search))
    return run_search(src.model, db, target, weights, m.fitness_windows, starts, m.search, m.batch_size)


def search_starts(start: str, src: Sources, target: float, weights: np.ndarray, options: SparsityOptions,
                  m: Measurement) -> dict[str, np.ndarray]:
    """The start allocations of a search, name → per-block sparsity float64 [L] at ``target``: ``start`` itself (a
    registered start of :data:`layerif.allocate.SEARCH_STARTS`, or an allocation.json's path), or for
    :data:`layerif.allocate.BEST` every registered start ``src`` can give (the LayerIF-score ones only with
    scores). A measured start (``sensitivity``) is measured with ``m``."""
    if start == allocate.BEST:
        names = [a for a in allocate.SEARCH_STARTS
                 if src.scores is not None or allocate.ALLOCATIONS[a].metric != "scores"]
    elif start in allocate.SEARCH_STARTS:
        names = [start]
    else:
        return {start: block_sparsity(start, len(weights))[0]}
    return {a: block_sparsity_for(a, src, target, weights, options, measurement=m)[0] for a in names}


def fitness_record(fitness: torch.Tensor, calibration: torch.Tensor | None) -> dict:
    """What a result file records of the fitness windows: count, tokens per window, hash, the calibration windows'
    hash and how many fitness windows are also calibration windows (token tuples; 0 when they are apart)."""
    shared = set() if calibration is None else {tuple(w) for w in calibration.tolist()}
    return {"windows": int(fitness.shape[0]), "seqlen": int(fitness.shape[1]), "hash": windows_hash(fitness),
            "calibration_hash": windows_hash(calibration),
            "shared_with_calibration": sum(tuple(w) in shared for w in fitness.tolist())}


def _candidate(values: dict, options: SparsityOptions, src: Sources, caches: dict) -> tuple[SparsityOptions, Sources]:
    """The map options and the metric sources of one grid candidate: its :class:`SparsityOptions` fields replace
    ``options``'; its :class:`Sources` fields (e.g. ``owl_m``) replace ``src``'s, with a metric cache of their own per
    distinct value (``caches``) unless they are ``src``'s."""
    opt = {k: v for k, v in values.items() if k in SparsityOptions.__dataclass_fields__}
    own = {k: v for k, v in values.items() if k not in opt}
    if any(k not in Sources.__dataclass_fields__ for k in own):
        raise ValueError(f"grid candidate {values}: not a SparsityOptions or Sources field")
    if all(getattr(src, k) == v for k, v in own.items()):
        return replace(options, **opt), src
    cache = caches.setdefault(tuple(sorted(own.items())), {})
    return replace(options, **opt), replace(src, **own, cache=cache)


def tuned_setting(label: str, src: Sources, target: float, weights: np.ndarray, options: SparsityOptions,
                  reverse: bool, m: Measurement) -> tuple[SparsityOptions, Sources, dict]:
    """Choose the hyper-parameter of the ``NAME-tuned`` allocation ``label`` from NAME's grid
    (:attr:`layerif.allocate.Allocation.tune`): for each candidate, prune ``src.model`` with ``m.method`` at its
    per-block sparsity (calibrated on ``src.windows``, as the run prunes), measure the search's fitness, the mean
    KL(P_dense ‖ P_pruned) per predicted token on ``m.fitness_windows`` (:func:`layerif.search.kl_to_reference`,
    nats), and restore the dense weights. The least KL wins (ties: the first in the grid).

    Only calibration-side data is read: ``src.windows`` and ``m.fitness_windows``. Returns the chosen candidate's
    options and sources, and the record: ``grid``, ``fitness`` (one per candidate), ``chosen``, ``default`` (the
    untuned values), ``fitness_windows`` (:func:`fitness_record`), ``seconds``.
    """
    rule, _ = allocate.get(label, "sparsity")
    grid = list(allocate.ALLOCATIONS[rule.tuned].tune)
    t0 = time.time()
    model = src.model
    dense = {name: mod.weight.detach().clone() for name, (_, mod) in prunable_modules(model).items()}
    reference = reference_logprobs(model, m.fitness_windows, m.batch_size)
    caches: dict = {}
    settings, fitness = [], []
    for values in progress.track(grid, desc=f"tune {rule.tuned}", unit="candidate"):
        opts, s = _candidate(values, options, src, caches)
        ratios = allocate_sparsity(label, allocation_metric(label, s), target, weights, opts, reverse)
        try:
            prune_model(model, ratios, m.method, src.windows, damping=m.damping, block_size=m.block_size)
            fitness.append(kl_to_reference(model, m.fitness_windows, reference, m.batch_size))
        finally:  # every candidate starts from the dense weights, and so does the run after tuning
            _restore(model, dense)
        settings.append((opts, s))
    best = int(np.argmin(fitness))
    keys = dict.fromkeys(k for values in grid for k in values)
    default = {k: getattr(options if k in SparsityOptions.__dataclass_fields__ else src, k) for k in keys}
    record = {"allocation": rule.tuned, "grid": grid, "fitness": [float(f) for f in fitness], "chosen": grid[best],
              "default": default, "method": m.method, "target": float(target),
              "fitness_windows": fitness_record(m.fitness_windows, src.windows), "seconds": round(time.time() - t0, 2)}
    return *settings[best], record


@torch.no_grad()
def _restore(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Copy the dense weights ``dense`` (name -> weight) back into the model's projections."""
    mods = prunable_modules(model)
    for name, w in dense.items():
        mods[name][1].weight.copy_(w)


def block_sparsity_for(label: str, src: Sources, target: float, weights: np.ndarray,
                       options: SparsityOptions = SparsityOptions(), reverse: bool = False,
                       measurement: Measurement | None = None) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
    """The per-block sparsity float64 [L] of the allocation ``label`` at ``target`` (the ``weights``-weighted mean),
    the metric it mapped (``None`` without one) and, for ``sensitivity`` / ``search``, their record.

    ``options.smooth`` smooths the metric of every rule with one (:attr:`Allocation.smoothable`; a search's start
    included). A search starts from ``search-START``'s START (or ``measurement.search_init``): the start's own
    sparsity, or an allocation.json's; ``search-best`` from the best of them (:func:`search_starts`). A
    ``NAME-tuned`` label maps with the hyper-parameter :func:`tuned_setting` chooses (its record is the third
    value); it needs ``measurement`` (the pruner, the fitness windows).
    """
    rule, _ = allocate.get(label, "sparsity")
    own = replace(options, smooth=options.smooth and rule.smoothable)
    record = None
    if rule.tuned is not None:
        if measurement is None:
            raise ValueError(f"the {label} allocation is tuned with a pruner: give a Measurement")
        own, src, record = tuned_setting(label, src, target, weights, own, reverse, measurement)
    if rule.metric in PRUNER_MEASURED:
        if measurement is None:
            raise ValueError(f"the {label} allocation is measured with a pruner: give a Measurement")
        starts = (search_starts(allocate.search_start(label, measurement.search_init), src, target, weights, options,
                                measurement) if rule.metric == "search" else None)
        metric, record = measured_metric(rule, src, target, weights, measurement, starts)
        record["fitness_windows"] = fitness_record(measurement.fitness_windows, src.windows)
    else:
        metric = allocation_metric(label, src)
    return allocate_sparsity(label, metric, target, weights, own, reverse), metric, record
