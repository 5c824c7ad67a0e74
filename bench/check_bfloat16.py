"""bfloat16 against float32 through both engines, on the CPU (the GPU path's dtype, exercised where there is no GPU).

Runs `layerif score` on the same model, task and records in float32 and in bfloat16, with the materialized
and the streaming engine, and prints, for each engine, how the bfloat16 block scores S_l agree with the
float32 ones: Spearman ρ over blocks, the largest relative difference of S_l, the top-5 blocks of each;
and the two engines against each other in float32. The statistics (Gram matrices, damping, inverse) are
float32 or float64 in both cases; only the model's weights, activations and gradients are bfloat16.

Usage: python bench/check_bfloat16.py [--model PATH] [--task capitals] [--n-train 32] [--n-val 8]
       [--target attn] [--out out/check_bfloat16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from layerif.cli import main as cli


def scores(opts: list[str], dtype: str, mode: str, out: Path) -> np.ndarray:
    """S_l of one `layerif score` run."""
    folder = out / f"{dtype}-{mode}"
    code = cli(["score", *opts, "--dtype", dtype, "--mode", mode, "--out", str(folder), "--overwrite", "--quiet"])
    if code != 0:
        raise SystemExit(f"layerif score --dtype {dtype} --mode {mode} failed (exit {code})")
    return np.asarray(json.loads((folder / "scores.json").read_text())["score"], dtype=np.float64)


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    top = lambda s: sorted(np.argsort(-s)[:5].tolist())  # noqa: E731
    rho = spearmanr(a, b).statistic
    rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    return f"Spearman {rho:.4f}, max |ΔS_l| / max S_l {rel:.2e}, top-5 {top(a)} vs {top(b)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded model)")
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--target", default="attn")
    ap.add_argument("--out", default="out/check_bfloat16")
    a = ap.parse_args()
    opts = ([] if a.model is None else ["--model", a.model]) + [
        "--task", a.task, "--n-train", str(a.n_train), "--n-val", str(a.n_val), "--target", a.target]
    out = Path(a.out)
    got = {(d, m): scores(opts, d, m, out) for d in ("float32", "bfloat16") for m in ("materialized", "streaming")}
    for m in ("materialized", "streaming"):
        print(f"{m}: bfloat16 against float32: {agreement(got['float32', m], got['bfloat16', m])}")
    print(f"float32: streaming against materialized: "
          f"{agreement(got['float32', 'materialized'], got['float32', 'streaming'])}")


if __name__ == "__main__":
    main()
