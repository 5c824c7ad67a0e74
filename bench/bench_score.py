"""Speed bars of `layerif score`, whole processes side by side: the fair plain baseline and the floor.

Three processes, each started from scratch (imports, loading the same cached
weights, the work, and for layerif writing every output file), run in turn and
repeated; the order rotates every round so that a neighbour's load on a shared
machine falls on each of them alike:

* ``layerif score --per-val`` on the records and target below;
* ``plain``: the DataInf a competent user would write (``bench/baselines.py``:
  batch-1 gradients only on the targeted weights, every per-sample gradient
  stored in float32, the algebra as matrix products);
* ``floor``: load the weights, one batched forward+backward over the same train
  and validation records, gradients only on the targeted weights.

Prints every round, the median of each, the bars (plain / layerif >= 2,
layerif / floor <= 1.25) per round and on the medians, and the difference of
the influence matrices of layerif and plain.
Usage: python bench/bench_score.py [--n-train 48 --n-val 16 --target attn --batch-size 8 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from baselines import baseline_cmd, difference, median, score_cmd, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--target", default="attn")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every process (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_score."))
    common = dict(task=a.task, n_train=a.n_train, n_val=a.n_val, target=a.target, per_val=True,
                  batch_size=a.batch_size, device=a.device)
    cmds = {
        "layerif": score_cmd(**common, out=tmp / "layerif"),
        "plain": baseline_cmd("plain", **common, out=tmp / "plain.safetensors"),
        "floor": baseline_cmd("floor", **common),
    }
    threads = a.threads or torch.get_num_threads()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{threads} torch threads per process, torch {torch.__version__}; "
          f"task {a.task}, {a.n_train} train x {a.n_val} validation, target {a.target}, --per-val, "
          f"batch size {a.batch_size}, device {a.device}; whole processes, {a.rounds} rounds, order rotating")
    for name, cmd in cmds.items():
        print(f"  {name}: {' '.join(str(c) for c in cmd)}")
    names = list(cmds)
    wall: dict[str, list[float]] = {k: [] for k in names}
    for r in range(a.rounds):
        order = names[r % 3:] + names[: r % 3]
        for name in order:
            wall[name].append(timed(cmds[name]))
        print(f"round {r + 1} ({' -> '.join(order)}): " + ", ".join(f"{k} {wall[k][-1]:.1f} s" for k in names)
              + f"; plain/layerif {wall['plain'][-1] / wall['layerif'][-1]:.2f}x, "
                f"layerif/floor {wall['layerif'][-1] / wall['floor'][-1]:.2f}x")
    m = {k: median(v) for k, v in wall.items()}
    print("median: " + ", ".join(f"{k} {m[k]:.1f} s" for k in names))
    print(f"bar plain / layerif >= 2: {m['plain'] / m['layerif']:.2f}x (per round "
          + ", ".join(f"{p / q:.2f}" for p, q in zip(wall["plain"], wall["layerif"])) + ")")
    print(f"bar layerif / floor <= 1.25: {m['layerif'] / m['floor']:.2f}x (per round "
          + ", ".join(f"{p / q:.2f}" for p, q in zip(wall["layerif"], wall["floor"])) + ")")
    mine = {k: v for k, v in load_file(tmp / "layerif" / "influence.safetensors").items() if k.startswith("layer.")}
    print(f"influences, layerif vs plain (float32 both): {difference(mine, load_file(tmp / 'plain.safetensors'))}")


if __name__ == "__main__":
    main()
