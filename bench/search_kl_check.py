"""KL to the dense model of each allocation at one target on the search's fitness windows, on its level grid.

The README's check of why the search had not reached the sensitivity allocation (Wanda 0.7). Run from the
repository root after the README's compare-pruning command with --allocations ...,sensitivity,search-uniform,
search-layerif (its level databases are in OUT/levels, its searches in OUT/search.json) and the score run
it used::

    python bench/search_kl_check.py --scores out/caps/scores.json --levels out/cmp-search/levels \\
        --search out/cmp-search/search.json --out out/exp/why.json

For uniform, alpha, layerif, sensitivity and every search in --search at --method and --target, it
projects the allocation onto the search's level grid and prints the KL to the dense model on the
--fitness-windows windows (the calibration text's windows drawn with --seed apart from the calibration
windows, as compare-pruning draws them), how many levels it moved from the target and its largest distance from the grid; writes them as
JSON to --out. The level database is found (or built) from the same model, pruner and calibration
windows (--n-calib, --seqlen, --seed) as the run's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layerif.allocate import SparsityOptions, allocate_sparsity
from layerif.corpus import load_text, split_text, text_windows
from layerif.datasets_io import windows_apart
from layerif.models import find_blocks, load_model
from layerif.measure import Sources, allocation_metric
from layerif.prune import prunable_params
from layerif.prune_allocation import level_database
from layerif.results import block_scores
from layerif.search import KLFitness, LevelGrid, block_sensitivity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="hub name or local folder (default: embedded SmolLM2-135M)")
    ap.add_argument("--scores", default="out/caps/scores.json", help="scores.json of the layerif allocation")
    ap.add_argument("--levels", default="out/cmp-search/levels", help="folder of the run's level databases")
    ap.add_argument("--search", default="out/cmp-search/search.json", help="the run's search.json (absent: none)")
    ap.add_argument("--out", default="out/exp/why.json", help="JSON file written")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--low", type=float, default=0.3, help="lowest level of the search's grid (--search-low)")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--fitness-windows", type=int, default=4, help="the run's --search-windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    a = ap.parse_args()

    lm = load_model(a.model)
    model = lm.model
    _, blocks = find_blocks(model)
    calib_text, _ = split_text(load_text(None))
    windows = text_windows(lm.tokenizer, calib_text, a.n_calib, a.seqlen, a.seed)
    fitness = windows_apart(lambda k: text_windows(lm.tokenizer, calib_text, k, a.seqlen, a.seed), windows,
                            a.fitness_windows)
    w = prunable_params(model)
    db = level_database(Path(a.levels), model, a.method, windows, model_name=lm.name)
    scores, _ = block_scores(a.scores, len(blocks))
    grid = LevelGrid(a.target, w, low=a.low)
    db.ensure([grid.level_ratios(l) for l in range(len(blocks))])  # the target is level 0 of every block
    kl = block_sensitivity(model, db, a.target, fitness, a.batch_size)
    allocs = {"uniform": allocate_sparsity("uniform", None, a.target, w),
              "alpha": allocate_sparsity("alpha", allocation_metric("alpha", Sources(model)), a.target, w),
              "layerif": allocate_sparsity("layerif", scores, a.target, w),
              "sensitivity": allocate_sparsity("sensitivity", kl, a.target, w, SparsityOptions())}
    searches = json.loads(Path(a.search).read_text()) if Path(a.search).exists() else {}
    for label, rec in searches.items():
        if rec["method"] == a.method and abs(rec["target"] - a.target) < 1e-9:
            allocs[f"search {label}"] = rec["sparsity"]
    out = {}
    with KLFitness(model, db, grid, fitness, a.batch_size) as fit:
        for name, ratios in allocs.items():
            k = grid.project(ratios)
            out[name] = {"kl": fit(k, None), "moved_levels": int(abs(k).sum()),
                         "on_grid_max_err": float(abs(grid.ratios(k) - ratios).max())}
            print(f"{a.method} {a.target:g} {name}: {out[name]}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"method": a.method, "target": a.target, "allocations": out}, indent=1))


if __name__ == "__main__":
    main()
