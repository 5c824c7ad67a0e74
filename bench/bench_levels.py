"""The level database: a block's levels pruned in one call against one level at a time.

SparseGPT prunes all levels in one stacked sweep, Wanda sorts each row's scores once (``Pruner.prune_levels``).
The baseline is how the database was built before (and how EvoPress's builder calls the pruner): the
single-ratio pruner once per (block, level), sharing the block's calibration statistics. Both run in this process on the
embedded model's first --blocks blocks, calibrated on the dense model's inputs (--n-calib windows of --seqlen
tokens of the built-in corpus), at the search's 19 levels 0.00-0.90, interleaved over --rounds; prints the
median seconds per block, their ratio, and whether every level is bitwise the same.

    python bench/bench_levels.py --blocks 2 --rounds 1 --method sparsegpt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerif.calibration import calibrate
from layerif.datasets_io import calibration_windows
from layerif.models import load_model, projections
from layerif.prune import PruneSettings, get_pruner, pruned_levels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda"], help="the pruner")
    ap.add_argument("--blocks", type=int, default=2, help="first blocks of the embedded model to build")
    ap.add_argument("--rounds", type=int, default=1, help="timed repetitions of both ways")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the grid's setting)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    windows = calibration_windows(loaded.tokenizer, "builtin", args.n_calib, args.seqlen, seed=0)
    pruner, settings = get_pruner(args.method), PruneSettings()
    ratios = [round(0.05 * k, 2) for k in range(19)]
    times: dict[str, list[float]] = {"one level at a time": [], "stacked": []}
    same = True
    for idx, block, stats in calibrate(loaded.model, windows, hessian=pruner.needs_hessian, update=False):
        if idx == args.blocks:
            break
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            single = {rel: [pruned_levels(m, pruner, [r], stats[rel], settings)[0] for r in ratios]
                      for rel, m in projections(block).items()}
            t1 = time.perf_counter()
            stacked = {rel: pruned_levels(m, pruner, ratios, stats[rel], settings)
                       for rel, m in projections(block).items()}
            t2 = time.perf_counter()
            times["one level at a time"].append(t1 - t0)
            times["stacked"].append(t2 - t1)
            same &= all(torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))
                        for rel in single for a, b in zip(single[rel], stacked[rel]))
    base, new = (statistics.median(v) for v in times.values())
    print(f"{args.method}, {len(ratios)} levels per block, {args.blocks} blocks x {args.rounds} rounds, "
          f"{args.threads} thread(s)")
    print(f"one level at a time: {base:.2f} s per block; stacked: {new:.2f} s per block; "
          f"ratio {base / new:.2f}x; every level bitwise equal: {same}")


if __name__ == "__main__":
    main()
