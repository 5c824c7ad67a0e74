"""KL to the dense model of each Wanda 0.7 allocation on the search's fitness windows, on its level grid.

The README's check of why the search had not reached the sensitivity allocation. Run from the repository
root after the README's compare-pruning command (it reads out/caps/scores.json, the Wanda level database
in out/cmp-search/levels -- point it at your run's levels folder -- and out/cmp-search-wanda/search.json):

    python bench/search_kl_check.py      # prints and writes out/exp/why.json
"""
import json, torch
from layerif import allocate
from layerif.allocate import SparsityOptions, allocate_sparsity
from layerif.models import load_model
from layerif.prune import _corpus, _windows, allocation_metric, level_database, prunable_params
from layerif.results import block_scores
from layerif.search import KLFitness, LevelGrid, block_sensitivity
lm = load_model(); model = lm.model
calib_text, _ = _corpus(None)
windows = _windows(lm.tokenizer, calib_text, 16, 128, 0)
fit_w = _windows(lm.tokenizer, calib_text, 4, 128, 0)
w = prunable_params(model)
db = level_database("out/cmp-search/levels", model, "wanda", windows, model_name=lm.name)
scores, _ = block_scores("out/caps/scores.json", 30)
out = {}
for target in (0.7,):
    grid = LevelGrid(target, w, low=0.3)
    kl = block_sensitivity(model, db, target, fit_w, 4)
    allocs = {"uniform": allocate_sparsity("uniform", None, target, w),
              "alpha": allocate_sparsity("alpha", allocation_metric("alpha", model), target, w),
              "layerif": allocate_sparsity("layerif", scores, target, w),
              "sensitivity": allocate_sparsity("sensitivity", kl, target, w, SparsityOptions())}
    s = json.load(open("out/cmp-search-wanda/search.json"))
    for k, v in s.items():
        if k.startswith(f"wanda {target:g}"):
            allocs["search " + k.split(" from ")[1]] = v["sparsity"]
    with KLFitness(model, db, grid, fit_w, 4) as f:
        for name, r in allocs.items():
            k = grid.project(r)
            out[f"{target} {name}"] = {"kl": f(k, None), "moved_levels": int(abs(k).sum()), "on_grid_max_err": float(abs(grid.ratios(k) - r).max())}
            print(target, name, out[f"{target} {name}"], flush=True)
import os
os.makedirs("out/exp", exist_ok=True)
json.dump(out, open("out/exp/why.json", "w"), indent=1)
