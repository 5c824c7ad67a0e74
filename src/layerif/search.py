"""Per-block sparsity by search (EvoPress-style) and by measured per-block sensitivity.

The heuristics of :mod:`layerif.allocate` score each block on its own. EvoPress
(Sieberling, Kuznedelev, Kurtic & Alistarh, ICML 2025, arXiv 2410.14649) searches
the per-block levels instead, scoring whole configurations by how far the pruned
model's next-token distribution is from the dense model's. This module builds
the three pieces and the measured baseline:

* :class:`LevelGrid` -- the levels each block may take under an exact budget.
  Level k of block l has sparsity ``target + k · step · n̄ / n_l`` (n_l: the
  block's prunable weights, n̄ their mean), so one level step is the same number
  of weights, ``step · n̄``, in every block (EvoPress's "weights_diff"): a switch
  that raises one block a level and lowers another keeps the number of pruned
  weights, hence the parameter-weighted sparsity, exactly at the target whatever
  the block sizes. With equal blocks (every dense decoder) the levels are the
  plain grid ``target ± k · step``; with ``target`` a multiple of ``step`` and the
  default range they are 0.0, 0.05, ..., 0.9. Levels outside [``low``, ``high``]
  are not used.
* the level database (:mod:`layerif.levels`) -- every (block, level) pruned once by
  the chosen pruner, a documented folder the pruner side writes
  (:func:`layerif.prune_allocation.level_database`) and this module only reads:
  putting a block at a level is a copy from the database (or a masked copy of the
  dense weights), never a re-prune; nothing here calls a pruner.
* :func:`kl_to_reference` -- the fitness: mean over predicted tokens of
  KL(P_dense ‖ P_pruned) of the next-token distributions, in nats.
* :func:`evolve` -- the (1 + λ) search: λ offspring of the parent by level-switch
  mutation (1-3 switches, fewer more likely), put through EvoPress's multi-step
  selection: each stage scores the candidates left on a fresh random subset of
  more fitness windows than the stage before and keeps fewer of them (few tokens
  to screen, more for the survivors); the last survivors are evaluated on all
  fitness windows and the best of them replaces the parent only if it is better
  there (elitist, so the parent's full-set fitness never rises). Several starts
  may be given: the best of them on all windows is the first parent.
* :func:`block_sensitivity` -- the KL rise when one block alone is pruned at the
  target; the ``sensitivity`` allocation of :mod:`layerif.allocate` maps it with
  LayerIF's linear map (more sensitive, less sparsity).

The search returns per-block sparsities (exactly at the target, the grid keeps the
budget), the allocation itself: pruning with it runs the chosen pruner with the usual sequential
calibration (:func:`layerif.prune.prune_model`), so its quality is measured the
same way as the other allocations'.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, progress
from .allocate import MAX_SPARSITY, check_sparsity
from .errors import UserError, require_finite
from .io import pyplot, write_figure, write_json, write_text
from .levels import BlockLevels, LevelDatabase
from .models import find_blocks

STEP = 0.05
LOW = 0.0
HIGH = 0.9
MAX_SWITCHES = 3


# ----------------------------------------------------------------------------- level grid


def check_levels(step: float, low: float, high: float, targets: Sequence[float]) -> None:
    """Raise a :class:`UserError` unless 0 < ``step`` < 1 and 0 ≤ ``low`` ≤ target ≤ ``high`` ≤ MAX_SPARSITY
    for every target sparsity of ``targets``."""
    if not 0 < step < 1:
        raise UserError(f"--search-step {step:g} must be in (0, 1)")
    for target in targets:
        if not 0 <= low <= target <= high <= MAX_SPARSITY:
            raise UserError(f"search levels need 0 ≤ low ({low:g}) ≤ target ({target:g}) ≤ high "
                            f"({high:g}) ≤ {MAX_SPARSITY}")


@dataclass(frozen=True)
class LevelGrid:
    """The sparsity levels of every block around a target, with one weight count per level step.

    ``weights``: prunable weights per block [L]. Level k of block l has ratio
    ``target + k · unit_l`` with ``unit_l = step · mean(weights) / weights_l``;
    block l may take the levels k with ``low ≤ ratio ≤ high`` (``k_min[l] ≤ k ≤
    k_max[l]``, both containing 0). A configuration is an int64 level array
    with Σ k = 0, which is exactly the target parameter-weighted sparsity.
    """

    target: float
    weights: np.ndarray
    step: float = STEP
    low: float = LOW
    high: float = HIGH

    def __post_init__(self):
        check_sparsity(self.target)
        w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if w.size == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
            raise UserError("search: block weights (prunable parameters) must be positive")
        object.__setattr__(self, "weights", w)
        check_levels(self.step, self.low, self.high, [self.target])

    @property
    def unit(self) -> np.ndarray:
        """Sparsity of one level step per block (float64 [L])."""
        return self.step * self.weights.mean() / self.weights

    @property
    def k_min(self) -> np.ndarray:
        return np.ceil((self.low - self.target) / self.unit - 1e-9).astype(np.int64)

    @property
    def k_max(self) -> np.ndarray:
        return np.floor((self.high - self.target) / self.unit + 1e-9).astype(np.int64)

    def ratios(self, levels) -> np.ndarray:
        """Per-block sparsity of a level configuration (float64 [L])."""
        return self.target + np.asarray(levels, dtype=np.float64) * self.unit

    def level_ratios(self, block: int) -> list[float]:
        """Every ratio block ``block`` may take, lowest first."""
        return [float(self.target + k * self.unit[block]) for k in range(self.k_min[block], self.k_max[block] + 1)]

    def project(self, ratios) -> np.ndarray:
        """The level configuration nearest to per-block ``ratios``, with Σ k = 0.

        Each block's ratio is rounded to its nearest level and clipped to its
        range; while Σ k > 0 the block whose level lies furthest above its real
        value (and can go down) goes down one level, while Σ k < 0 the one
        furthest below goes up (ties to the lower index). Returns int64 [L].
        """
        r = np.asarray(ratios, dtype=np.float64).reshape(-1)
        if r.size != self.weights.size or not np.all(np.isfinite(r)):
            raise UserError(f"search start: {r.size} ratios for {self.weights.size} blocks (or non-finite values)")
        real = (r - self.target) / self.unit
        k = np.clip(np.rint(real), self.k_min, self.k_max).astype(np.int64)
        while k.sum() > 0:
            k[np.argmax(np.where(k > self.k_min, k - real, -np.inf))] -= 1
        while k.sum() < 0:
            k[np.argmax(np.where(k < self.k_max, real - k, -np.inf))] += 1
        return k

    def mutate(self, levels, rng: np.random.Generator, max_switches: int = MAX_SWITCHES) -> np.ndarray:
        """A level-switch mutation: 1 to ``max_switches`` times, one block up a level and another down.

        The number of switches is the smaller of two uniform draws in
        [1, ``max_switches``] (fewer switches more likely, as EvoPress). Σ k, and
        so the weighted sparsity, is unchanged. Returns a new int64 [L] array
        (equal to ``levels`` if no block can move).
        """
        k = np.array(levels, dtype=np.int64)
        n = min(int(rng.integers(1, max_switches + 1)), int(rng.integers(1, max_switches + 1)))
        for _ in range(n):
            up = np.flatnonzero(k < self.k_max)
            down = np.flatnonzero(k > self.k_min)
            if up.size == 0 or down.size == 0 or (up.size == 1 and down.size == 1 and up[0] == down[0]):
                break
            while True:
                i, j = int(rng.choice(up)), int(rng.choice(down))
                if i != j:
                    break
            k[i] += 1
            k[j] -= 1
        return k


# ----------------------------------------------------------------------------- fitness


@torch.no_grad()
def _next_token_logprobs(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=windows.to(device), use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).cpu()


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """log P_dense of the next token at every predicted position: float32 [n, seqlen − 1, vocab] on the CPU.

    Memory: n · (seqlen − 1) · vocab · 4 bytes (SmolLM2, 8 windows of 128: 200 MB). A non-finite value (a model
    with NaN weights) is a :class:`FloatingPointError`, as is a non-finite KL in :func:`kl_to_reference`.
    """
    return require_finite(torch.cat([_next_token_logprobs(model, windows[i : i + batch_size])
                                     for i in range(0, windows.shape[0], batch_size)]),
                          "the dense model's next-token log-probabilities on the search windows")


@torch.no_grad()
def kl_to_reference(model: nn.Module, windows: torch.Tensor, reference: torch.Tensor, batch_size: int = 4) -> float:
    """Mean over the n · (seqlen − 1) predicted positions of KL(P_ref ‖ P_model) = Σ_v p (log p − log q), nats.

    ``reference``: :func:`reference_logprobs` of the same ``windows`` (token ids [n, seqlen]).
    """
    total = 0.0
    for i in range(0, windows.shape[0], batch_size):
        q = _next_token_logprobs(model, windows[i : i + batch_size])
        p = reference[i : i + batch_size]
        total += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
    return require_finite(total / (windows.shape[0] * (windows.shape[1] - 1)),
                          "the search fitness (KL of the pruned model to the dense one)")


# ----------------------------------------------------------------------------- search


@dataclass
class SearchConfig:
    """Settings of the evolutionary search (see :func:`evolve`).

    ``survivors`` / ``screen_windows``: the selection stages before the last, one
    entry each: stage i scores the candidates left on ``screen_windows[i]``
    windows drawn at random and keeps the ``survivors[i]`` best. Survivors fall
    and windows grow from stage to stage (EvoPress's ``--survivors_per_selection
    8 2 1 --tokens_per_selection 2048 16384 65536`` is ``offspring=64,
    survivors=(8, 2), screen_windows=(w1, w2)`` with the final stage on all
    windows). A stage with at least as many windows as the fitness set is
    skipped: the final stage covers it.
    """

    evals: int = 200
    offspring: int = 8
    survivors: tuple[int, ...] = (2,)
    screen_windows: tuple[int, ...] = (2,)
    step: float = STEP
    low: float = LOW
    high: float = HIGH
    seed: int = 0

    def __post_init__(self):
        self.survivors, self.screen_windows = tuple(self.survivors), tuple(self.screen_windows)

    def check(self, targets: Sequence[float] = ()) -> None:
        """Raise a :class:`UserError` for a setting out of range, and for level bounds (``low``, ``high``,
        ``step``) that do not fit each target sparsity of ``targets`` (:func:`check_levels`)."""
        check_levels(self.step, self.low, self.high, targets)
        if self.evals < 1:
            raise UserError(f"--search-evals must be ≥ 1 (got {self.evals})")
        if self.offspring < 1:
            raise UserError(f"--search-offspring must be ≥ 1 (got {self.offspring})")
        s, w = self.survivors, self.screen_windows
        if len(s) != len(w):
            raise UserError(f"--search-survivors ({_stages(s)}) and --search-screen-windows ({_stages(w)}) need one "
                            "value per selection stage each")
        if not all(1 <= a <= self.offspring for a in s) or any(a <= b for a, b in zip(s, s[1:])):
            raise UserError(f"--search-survivors ({_stages(s)}) must fall from stage to stage, within [1, offspring="
                            f"{self.offspring}]")
        if not all(a >= 1 for a in w) or any(a >= b for a, b in zip(w, w[1:])):
            raise UserError(f"--search-screen-windows ({_stages(w)}) must be ≥ 1 and grow from stage to stage")

    def stages(self, n_windows: int) -> list[tuple[int, int]]:
        """The screening stages used with ``n_windows`` fitness windows: (windows, survivors), those with fewer
        windows than ``n_windows``."""
        return [(w, s) for w, s in zip(self.screen_windows, self.survivors) if w < n_windows]


def _stages(values: Sequence[int]) -> str:
    return ",".join(map(str, values)) or "none"


@dataclass
class SearchResult:
    """The best configuration found and how the search got there."""

    levels: np.ndarray
    ratios: np.ndarray
    fitness: float
    start_levels: np.ndarray
    start_fitness: float
    evaluations: int
    tokens: int
    grid: LevelGrid
    trajectory: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    start: str = ""
    start_fitnesses: dict[str, float] = field(default_factory=dict)


def generation_cost(config: SearchConfig, n_windows: int) -> tuple[int, int]:
    """(fitness evaluations, windows evaluated) per generation with ``n_windows`` fitness windows: the
    ``offspring`` on the first stage's windows, each stage's survivors on the next stage's, the last survivors on
    all windows."""
    left, evals, windows = config.offspring, 0, 0
    for w, s in config.stages(n_windows):
        evals, windows, left = evals + left, windows + left * w, min(s, left)
    return evals + left, windows + left * n_windows


def evolve(fitness: Callable[[np.ndarray, np.ndarray], float], grid: LevelGrid, starts: dict[str, np.ndarray],
           n_windows: int, seq_tokens: int, config: SearchConfig) -> SearchResult:
    """(1 + λ) evolutionary search over level configurations of ``grid``.

    ``fitness(levels, window_indices)`` is the value to minimise on those
    fitness windows (each of ``seq_tokens`` predicted tokens). ``starts``: name →
    level configuration (each with Σ k = 0); all are evaluated on every window
    and the best (ties: the first) is the first parent. Every generation: λ =
    ``offspring`` distinct level-switch mutants of the parent go through the
    selection stages (:meth:`SearchConfig.stages`): each stage evaluates the
    candidates left on that many windows drawn at random (the same for all of
    them, drawn anew per stage and generation) and keeps its number of
    survivors; the candidates left are evaluated on all windows and the best
    replaces the parent when its fitness is lower than the parent's (on all
    windows). Each start counts one evaluation; the search stops when the next
    generation would exceed ``evals``. The trajectory has one row per generation
    (and one for the start): evaluations and tokens (predicted tokens scored) so
    far, the parent's fitness on all windows. Seeded by ``seed``: the same inputs
    give the same search.
    """
    config.check()
    if not starts:
        raise ValueError("the search needs at least one start")
    rng = np.random.default_rng(config.seed)
    every = np.arange(n_windows)
    t0 = time.time()
    start_fitnesses = {}
    for name, levels in starts.items():
        if np.asarray(levels).sum() != 0:
            raise ValueError(f"the start configuration {name} does not meet the budget (Σ k ≠ 0)")
        start_fitnesses[name] = fitness(np.asarray(levels, dtype=np.int64), every)
    first = min(start_fitnesses, key=start_fitnesses.__getitem__)
    parent, best = np.asarray(starts[first], dtype=np.int64), start_fitnesses[first]
    evals, tokens = len(starts), len(starts) * n_windows * seq_tokens
    trajectory = [{"generation": 0, "evaluations": evals, "tokens": tokens, "fitness": best, "accepted": False,
                   "seconds": round(time.time() - t0, 2)}]
    result = SearchResult(parent.copy(), grid.ratios(parent), best, parent.copy(), best, evals, tokens, grid,
                          trajectory, start=first, start_fitnesses=start_fitnesses)
    stages = config.stages(n_windows)
    cost, _ = generation_cost(config, n_windows)
    generations = max(0, (config.evals - evals) // cost)
    for gen in progress.track(range(1, generations + 1), desc="search", unit="generation"):
        seen = {parent.tobytes()}
        children: list[np.ndarray] = []
        for _ in range(100 * config.offspring):
            child = grid.mutate(parent, rng)
            if child.tobytes() not in seen:
                seen.add(child.tobytes())
                children.append(child)
                if len(children) == config.offspring:
                    break
        if not children:
            break
        for windows, survivors in stages:
            subset = np.sort(rng.choice(n_windows, windows, replace=False))
            scores = [fitness(c, subset) for c in children]
            evals += len(children)
            tokens += len(children) * windows * seq_tokens
            children = [children[i] for i in np.argsort(scores, kind="stable")[:survivors]]
        scores = [fitness(c, every) for c in children]
        evals += len(children)
        tokens += len(children) * n_windows * seq_tokens
        i = int(np.argmin(scores))
        accepted = scores[i] < best
        if accepted:
            parent, best = children[i], scores[i]
        trajectory.append({"generation": gen, "evaluations": evals, "tokens": tokens, "fitness": best,
                           "accepted": bool(accepted), "seconds": round(time.time() - t0, 2)})
    result.levels, result.ratios, result.fitness = parent, grid.ratios(parent), best
    result.evaluations, result.tokens, result.seconds = evals, tokens, round(time.time() - t0, 2)
    return result


class KLFitness:
    """Model-side fitness of a search: level configurations → KL to the dense model on fitness windows.

    Reads the ``grid``'s levels from ``db`` (built beforehand by the pruner side: :func:`search_levels`),
    computes the dense reference once, then evaluates configurations by swapping levels into the model. Call :meth:`close` (or use as a context manager) to restore the
    dense weights.
    """

    def __init__(self, model: nn.Module, db: LevelDatabase, grid: LevelGrid, windows: torch.Tensor,
                 batch_size: int = 4):
        self.model, self.grid, self.windows, self.batch_size = model, grid, windows, batch_size
        self.db_info = db.info()
        self.reference = reference_logprobs(model, windows, batch_size)
        self.levels = BlockLevels(model, db)

    def ratios(self, ratios, window_indices=None) -> float:
        """KL with block l at database level ``ratios[l]``, on the fitness windows ``window_indices`` (default all)."""
        idx = torch.as_tensor(np.arange(self.windows.shape[0]) if window_indices is None else window_indices)
        self.levels.set(ratios)
        return kl_to_reference(self.model, self.windows[idx], self.reference[idx], self.batch_size)

    def __call__(self, levels: np.ndarray, window_indices: np.ndarray) -> float:
        return self.ratios(self.grid.ratios(levels), window_indices)

    def close(self) -> None:
        self.levels.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def search_levels(target: float, weights, config: SearchConfig) -> list[list[float]]:
    """Per block, the sparsity levels a search at ``target`` may visit (what the level database must hold)."""
    grid = LevelGrid(target, weights, config.step, config.low, config.high)
    return [grid.level_ratios(l) for l in range(grid.weights.size)]


def search_allocation(model: nn.Module, db: LevelDatabase, target: float, weights, fitness_windows: torch.Tensor,
                      starts: dict[str, np.ndarray], config: SearchConfig,
                      batch_size: int = 4) -> tuple[SearchResult, dict]:
    """EvoPress-style search for per-block sparsity at ``target`` (the parameter-weighted mean, exact).

    ``weights``: prunable weights per block; ``starts``: name → start allocation
    (per-block sparsity, projected onto the level grid, :meth:`LevelGrid.project`;
    the best on the fitness is the first parent); ``fitness_windows``: token ids
    [n, seqlen] the KL is measured on; ``db`` holds the :func:`search_levels`
    (read only). The model is left dense. Returns the result and the database's
    :meth:`LevelDatabase.info`.
    """
    grid = LevelGrid(target, weights, config.step, config.low, config.high)
    projected = {name: grid.project(ratios) for name, ratios in starts.items()}
    with KLFitness(model, db, grid, fitness_windows, batch_size) as fit:
        result = evolve(fit, grid, projected, fitness_windows.shape[0], fitness_windows.shape[1] - 1, config)
    return result, fit.db_info


def block_sensitivity(model: nn.Module, db: LevelDatabase, target: float, fitness_windows: torch.Tensor,
                      batch_size: int = 4) -> np.ndarray:
    """KL(P_dense ‖ P) on ``fitness_windows`` when block l alone is pruned at ``target`` (float64 [L]).

    The level comes from ``db`` (read only: the pruner side built level ``target`` of every block); the model
    is left dense.
    """
    check_sparsity(target)
    _, blocks = find_blocks(model)
    n = len(blocks)
    reference = reference_logprobs(model, fitness_windows, batch_size)
    levels = BlockLevels(model, db)
    out = np.zeros(n)
    try:
        for l in progress.track(range(n), desc="block sensitivity", unit="block"):
            levels.set([target if i == l else None for i in range(n)])
            out[l] = kl_to_reference(model, fitness_windows, reference, batch_size)
    finally:
        levels.restore()
    return out


# ----------------------------------------------------------------------------- measured allocations


def run_search(model: nn.Module, db: LevelDatabase, target: float, weights, fitness_windows: torch.Tensor,
               starts: dict[str, np.ndarray], config: SearchConfig, batch_size: int = 4) -> tuple[np.ndarray, dict]:
    """:func:`search_allocation` → (the found per-block sparsity, its :func:`search_record`)."""
    result, info = search_allocation(model, db, target, weights, fitness_windows, starts, config, batch_size)
    return result.ratios, search_record(result, config, info, db.method)


def run_sensitivity(model: nn.Module, db: LevelDatabase, target: float, fitness_windows: torch.Tensor,
                    batch_size: int = 4) -> tuple[np.ndarray, dict]:
    """:func:`block_sensitivity` → (the KL rise per block, a record with it, the seconds and the database)."""
    t0 = time.time()
    kl = block_sensitivity(model, db, target, fitness_windows, batch_size)
    return kl, {"kl": [float(x) for x in kl], "seconds": round(time.time() - t0, 2), "database": db.info()}


# ----------------------------------------------------------------------------- outputs


def trajectory_csv(trajectories: dict[str, list[dict]]) -> str:
    """One row per (search label, generation): search, generation, evaluations, tokens, fitness, accepted, seconds."""
    buf = io.StringIO()
    fields = ("search", "generation", "evaluations", "tokens", "fitness", "accepted", "seconds")
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for label, rows in trajectories.items():
        w.writerows({"search": label, **{k: r[k] for k in fields[1:]}} for r in rows)
    return buf.getvalue()


def trajectory_figure(records: list[dict], title: str):
    """Fitness (KL to the dense model, log scale) against evaluations: one panel per (pruner, target), one
    line per start point and seed (:func:`search_record` entries)."""
    panels: dict[str, list[dict]] = {}
    for rec in records:
        panels.setdefault(f"{rec['method']} · sparsity {rec['target']:g}", []).append(rec)
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    for ax, (name, recs) in zip(axes.flat, panels.items()):
        for rec in recs:
            t = rec["trajectory"]
            ax.step([r["evaluations"] for r in t], [r["fitness"] for r in t], where="post", marker=".",
                    label=f"from {rec['start']} (seed {rec['seed']})")
        if min(r["fitness"] for rec in recs for r in rec["trajectory"]) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("fitness evaluations")
        ax.set_ylabel("KL to the dense model (nats / token)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def search_record(result: SearchResult, config: SearchConfig, db_info: dict, method: str) -> dict:
    """The JSON record of one search (an entry of ``search.json``): ``start`` the start it began from (the best of
    ``starts``, start name → KL on all fitness windows), the found sparsity, the trajectory and the settings."""
    grid = result.grid
    return {
        "method": method, "start": result.start, "starts": result.start_fitnesses, "target": grid.target,
        "seed": config.seed,
        "weighted_sparsity": float(np.average(result.ratios, weights=grid.weights)),
        "sparsity": [float(r) for r in result.ratios], "levels": [int(k) for k in result.levels],
        "start_sparsity": [float(r) for r in grid.ratios(result.start_levels)],
        "fitness": result.fitness, "start_fitness": result.start_fitness,
        "evaluations": result.evaluations, "tokens": result.tokens, "seconds": result.seconds,
        "trajectory": result.trajectory, "config": asdict(config),
        "grid": {"step": grid.step, "low": grid.low, "high": grid.high, "unit": [float(u) for u in grid.unit]},
        "database": db_info, "version": __version__,
    }


def write_search(out: str | Path, records: dict[str, dict], title: str) -> list[str]:
    """``search.json`` (label → :func:`search_record`), ``search_trajectory.csv`` and ``search.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "search.json", records)
    write_text(out / "search_trajectory.csv", trajectory_csv({label: rec["trajectory"] for label, rec in records.items()}))
    write_figure(out / "search.png", trajectory_figure(list(records.values()), title))
    return ["search.json", "search_trajectory.csv", "search.png"]
