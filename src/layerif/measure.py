"""The per-block metric an allocation maps, measured once per run, for every command that allocates.

An allocation rule (:class:`layerif.allocate.Allocation`) names its metric kind; :data:`MEASURES` says how each
kind is obtained from a run's :class:`Sources`: ``scores`` (S_l of ``--scores``), ``alpha`` (the heavy-tail
exponent α of the weights, :mod:`layerif.spectral`), ``outliers`` (OWL's outlier ratios) and ``dlp`` (DLP's median
Wanda scores), both on calibration windows with the dense model, and ``gain`` (the fine-tune gain g_l of
``--validation``). A rule with a kind of its own carries its measurement (``Allocation.measure``), so a new
allocation with a new metric is one registration. The kinds measured with the pruner through the level database
(``sensitivity``, ``search``: :data:`PRUNER_MEASURED`) are :mod:`layerif.prune_allocation`'s.

:func:`allocation_metric` is the one function ``prune``, ``compare-pruning``, ``moe``, ``compare-moe``,
``finetune`` and ``compare-finetune`` ask; :class:`Setting` / :func:`setting` are what the adapter commands share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import allocate, progress
from .calibration import calibrate
from .errors import UserError
from .models import LoadedModel, find_blocks, projections, weight_out_in
from .options import NEEDS_VALIDATION
from .prune import wanda_score
from .results import block_gains, block_scores
from .spectral import block_alphas

OWL_M = 5.0
"""OWL: a weight is an outlier above M × its block's mean Wanda score."""
OWL_LAMBDA = 0.08
"""OWL: the block sparsities span 2λ around the target."""
NEEDS_SCORES = "the layerif allocation needs --scores scores.json (from `layerif score`)"
PRUNER_MEASURED = ("sensitivity", "search")
"""Metric kinds measured with the chosen pruner through the level database (:mod:`layerif.prune_allocation`)."""


# ----------------------------------------------------------------------------- the calibrated block statistics


def _block_wanda_scores(model: nn.Module, windows: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Per block, the Wanda scores |W|·‖X‖ of each of its projections, from the dense model (sequential
    calibration without pruning): the statistics OWL's outlier ratios and DLP's medians share."""
    for _, block, stats in calibrate(model, windows, update=False):
        yield [wanda_score(weight_out_in(mod), stats[rel].sq) for rel, mod in projections(block).items()]


def outlier_ratios(model: nn.Module, windows: torch.Tensor, m: float = OWL_M) -> np.ndarray:
    """OWL's layer-wise outlier ratio: per block, the share of Wanda scores above ``m`` × the block's mean.

    The scores of all the block's projections are pooled; the statistics come
    from the dense model (sequential calibration without pruning). float64 [L].
    """
    out = []
    for scores in _block_wanda_scores(model, windows):
        mean = sum(float(s.sum()) for s in scores) / sum(s.numel() for s in scores)
        out.append(sum(int((s > m * mean).sum()) for s in scores) / sum(s.numel() for s in scores))
    return np.asarray(out, dtype=np.float64)


def dlp_medians(model: nn.Module, windows: torch.Tensor) -> np.ndarray:
    """DLP's layer statistic: per block, the median of the pooled Wanda scores |W|·‖X‖ of all its projections
    (dense model, the calibration of :func:`outlier_ratios`); ``torch.median``, the lower middle value for an
    even count. float64 [L]; :func:`layerif.allocate.dlp_sparsity` maps it to sparsity."""
    return np.asarray([float(torch.cat([s.reshape(-1).float() for s in scores]).median())
                       for scores in _block_wanda_scores(model, windows)], dtype=np.float64)


# ----------------------------------------------------------------------------- metrics


@dataclass
class Sources:
    """What a run measures per-block metrics from. ``model``: the dense model; ``scores``: S_l [L] of --scores;
    ``gains``: g_l [L] of --validation; ``windows``: calibration token ids [n, seqlen] (seed ``seed``) of the
    calibrated kinds; ``owl_m``: OWL's outlier threshold; ``cache``: the metrics measured so far, keyed by
    (kind, seed of a calibrated kind else None), shareable between the sources of several seeds."""

    model: nn.Module
    scores: np.ndarray | None = None
    gains: np.ndarray | None = None
    windows: torch.Tensor | None = None
    owl_m: float = OWL_M
    seed: int | None = None
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Measure:
    """How one metric kind is obtained: ``measure(sources) -> float64 [L]``; ``label``: its column head in the
    commands' tables; ``calibrated``: measured on calibration windows with the dense model (the commands draw
    them when an allocation of this kind runs)."""

    kind: str
    measure: Callable[[Sources], np.ndarray]
    label: str = ""
    calibrated: bool = False


def _scores(s: Sources) -> np.ndarray:
    if s.scores is None:
        raise UserError(NEEDS_SCORES)
    return np.asarray(s.scores, dtype=np.float64)


def _gains(s: Sources) -> np.ndarray:
    if s.gains is None:
        raise UserError(NEEDS_VALIDATION)
    return np.asarray(s.gains, dtype=np.float64)


def _windows(s: Sources, kind: str) -> torch.Tensor:
    if s.windows is None:
        raise ValueError(f"the {kind} metric needs calibration windows")
    return s.windows


MEASURES: dict[str, Measure] = {m.kind: m for m in (
    Measure("scores", _scores, "S_l"),
    Measure("alpha", lambda s: block_alphas(s.model), "alpha"),
    Measure("gain", _gains, "g_l"),
    Measure("outliers", lambda s: outlier_ratios(s.model, _windows(s, "outliers"), s.owl_m), "outliers", True),
    Measure("dlp", lambda s: dlp_medians(s.model, _windows(s, "dlp")), "dlp", True),
)}
"""Metric kind -> its measurement (the kinds of the built-in allocations besides :data:`PRUNER_MEASURED`)."""


def measure_of(rule: allocate.Allocation) -> Measure | None:
    """How ``rule``'s metric is obtained: its own ``measure``, else its kind's in :data:`MEASURES`; ``None`` for a
    rule without a metric. A kind measured with the pruner is a ``ValueError`` (ask
    :func:`layerif.prune_allocation.block_sparsity_for`)."""
    if rule.metric is None:
        return None
    if rule.measure is not None:
        return Measure(rule.metric, rule.measure, rule.metric, rule.calibrated)
    if rule.metric in PRUNER_MEASURED:
        raise ValueError(f"the {rule.name} allocation is measured with a pruner")
    if rule.metric not in MEASURES:
        raise UserError(f"unknown per-block metric {rule.metric!r} of allocation {rule.name}")
    return MEASURES[rule.metric]


def block_metric(s: Sources, measure: Measure | str | None) -> np.ndarray | None:
    """The metric ``measure`` (or the kind of that name in :data:`MEASURES`) obtains, float64 [L], measured once
    per :class:`Sources` cache; ``None`` for none."""
    if measure is None:
        return None
    if isinstance(measure, str):
        if measure not in MEASURES:
            raise UserError(f"unknown per-block metric {measure!r}")
        measure = MEASURES[measure]
    key = (measure.kind, s.seed if measure.calibrated else None)
    if key not in s.cache:
        s.cache[key] = measure.measure(s)
    return s.cache[key]


def allocation_metric(label: str, s: Sources, kind: str = "sparsity") -> np.ndarray | None:
    """The per-block metric the allocation ``label`` maps for a ``kind`` map (``"sparsity"`` or ``"experts"``),
    float64 [L], or ``None`` when its rule has none. Measure it on the dense model, before pruning."""
    return block_metric(s, measure_of(allocate.get(label, kind)[0]))


def label_of(label: str, kind: str) -> str:
    """The column head of the metric the allocation ``label`` maps (empty without one)."""
    rule = allocate.get(label, kind)[0]
    m = None if rule.metric in (None, *PRUNER_MEASURED) else measure_of(rule)
    return "" if m is None else m.label


def calibrated(label: str) -> bool:
    """Whether the sparsity allocation ``label`` (``search-START``: its START) maps a metric measured on
    calibration windows; an unregistered label (a search start file) maps none."""
    rule = allocate.ALLOCATIONS.get(allocate.parse_label(label)[0])
    if rule is not None and rule.metric == "search" and label.startswith(allocate.SEARCH):
        return calibrated(allocate.search_start(label))
    return rule is not None and rule.metric not in (None, *PRUNER_MEASURED) and measure_of(rule).calibrated


# ----------------------------------------------------------------------------- the adapter commands' setting


@dataclass
class Setting:
    """What every run of an adapter command (moe, finetune and their comparisons) shares: the model, the scores,
    the measured gains, the task's records, and the metrics measured on the base model (``sources``)."""

    lm: LoadedModel
    n_blocks: int
    scores: np.ndarray | None
    scores_doc: dict
    task: str
    train_records: list[dict]
    test_records: list[dict]
    gains: np.ndarray | None = None  # the measured fine-tune gain g_l of --validation
    cache: dict = field(default_factory=dict)  # metrics measured on the base model

    @property
    def sources(self) -> Sources:
        """The metric sources of the base model (sharing this setting's cache)."""
        return Sources(self.lm.model, self.scores, self.gains, cache=self.cache)


def setting(args: Any, check_blocks: Callable[[int], object] | None = None) -> Setting:
    """The model, the scores, the measured gains and the task's records of a run. An unknown task fails before the
    model loads; a --scores or --validation file for another block count, and ``check_blocks(L)`` (a budget
    against the block count L), before its weights load (L from the config). ``args``: the adapter
    commands' options (model, ``scores``, ``validation``, ``task``, ``n_train``, ``n_test``, ``data_seed``,
    ``allow_repeats``)."""
    from .tasks import get_task  # imported here so tests can stand in a small task module

    if args.task is not None:
        get_task(args.task, args.lm_eval_include)  # an unknown task fails before the model loads

    def before_weights(tokenizer, config) -> None:
        n = getattr(config, "num_hidden_layers", None)
        if not isinstance(n, int):
            return
        for path, read in ((args.scores, block_scores), (args.validation, block_gains)):
            if path:
                read(path, n)
        if check_blocks is not None:
            check_blocks(n)

    lm = args.load(before_weights)
    _, blocks = find_blocks(lm.model)
    scores, doc = block_scores(args.scores, len(blocks)) if args.scores else (None, {})
    if doc.get("model") not in (None, lm.name):
        progress.info(f"note: {args.scores} was computed on {doc['model']}, adapting {lm.name}")
    gains, vdoc = block_gains(args.validation, len(blocks)) if args.validation else (None, {})
    if vdoc.get("model") not in (None, lm.name):
        progress.info(f"note: {args.validation} was measured on {vdoc['model']}, adapting {lm.name}")
    task_name = args.task or doc.get("task") or "capitals"
    task = get_task(task_name, args.lm_eval_include)
    return Setting(lm, len(blocks), scores, doc, task_name,
                   task.split("train", args.n_train, args.data_seed, args.allow_repeats),
                   task.split("test", args.n_test, args.data_seed, args.allow_repeats), gains)
