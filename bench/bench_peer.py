"""layerif's estimators against the peer, Kronfluence (EK-FAC and identity), on the same records, model and targets.

Each method runs back to back in a process of its own (the same cached weights,
the same tokenized records, the same target modules, the same per-sample loss
and damping): layerif ``datainf``, ``exact`` and ``grad-dot`` (materialized
engine, one run each), Kronfluence ``ekfac`` (fit the factors, then pairwise
scores) and ``identity``. For each it prints the scoring time (after loading)
and how much the process grew while scoring (peak RSS above the loaded model).
Then the agreement: Kronfluence identity against layerif grad-dot (they compute
the same thing), EK-FAC against exact (same damping, another Hessian
approximation), and the Spearman correlation of every pair's block scores S_l.

Usage: python bench/bench_peer.py [--n-train 64 --n-val 16 --target attn --batch-size 8] (needs `make peer`)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from baselines import PeakRSS, difference, task_records

METHODS = ("datainf", "exact", "grad-dot", "kronfluence-ekfac", "kronfluence-identity")


def child(method: str, a: argparse.Namespace) -> None:
    """Score with one method; save block influences [n_val, n_train] to a.save; print time and memory as JSON."""
    from layerif.models import load_model, select_targets

    lm = load_model(device=a.device)
    train, val = task_records(lm.tokenizer, a.task, a.n_train, a.n_val)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if method.startswith("kronfluence-"):
            from layerif.ekfac import kronfluence_influence

            targets = select_targets(lm.model, a.target)
            inf, _, _ = kronfluence_influence(lm.model, targets, train, val, lm.tokenizer.pad_token_id,
                                           method.split("-", 1)[1], per_val=True, batch_size=a.batch_size)
            blocks: dict[int, torch.Tensor] = {}
            for t in targets:
                blocks[t.block] = blocks.get(t.block, 0) + inf[t.name]
        else:
            from layerif.engine import EngineConfig
            from layerif.influence import EstimatorConfig
            from layerif.scores import compute

            blocks = compute(lm, train, val, EstimatorConfig(method),
                             EngineConfig(a.target, per_val=True, batch_size=a.batch_size, mode="materialized")).influence
    wall = time.perf_counter() - t0
    save_file({f"layer.{l}": v.contiguous() for l, v in blocks.items()}, a.save)
    print(json.dumps({"wall": wall, "grew": mem.peak - mem.start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--target", default="attn")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a)
        return
    from layerif.scores import aggregate
    from layerif.stability import pearson, spearman

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"task {a.task}, {a.n_train} train x {a.n_val} validation, target {a.target}, per validation sample, "
          f"batch size {a.batch_size}, device {a.device}, damping c = 0.1 for all")
    tmp = Path(tempfile.mkdtemp(prefix="bench_peer."))
    got: dict[str, dict[str, torch.Tensor]] = {}
    for m in METHODS:
        save = tmp / f"{m}.safetensors"
        cmd = [sys.executable, __file__, "--child", m, "--save", str(save)] + [
            x for k in ("task", "n_train", "n_val", "target", "batch_size", "device")
            for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{m} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        got[m] = load_file(save)
        print(f"{m:>22}: {r['wall']:7.1f} s scoring, process grew {r['grew'] / 1e9:.2f} GB while scoring")
    print(f"kronfluence-identity vs layerif grad-dot: {difference(got['kronfluence-identity'], got['grad-dot'])}")
    ek, ex = got["kronfluence-ekfac"], got["exact"]
    r = [pearson(ek[k].double().flatten(), ex[k].double().flatten()) for k in ex]
    print(f"kronfluence-ekfac vs layerif exact: Pearson of the influence entries per block, median "
          f"{sorted(r)[len(r) // 2]:.3f} (min {min(r):.3f}); {difference(ek, ex)}")
    score = {m: [aggregate(v[f"layer.{l}"].double().sum(0))["helpful"] for l in range(len(v))] for m, v in got.items()}
    print("Spearman of the block scores S_l:")
    print(" " * 22 + "".join(f"{m[:10]:>11}" for m in METHODS))
    for m in METHODS:
        print(f"{m:>22}" + "".join(f"{spearman(score[m], score[o]):>11.3f}" for o in METHODS))


if __name__ == "__main__":
    main()
