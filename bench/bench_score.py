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

``--grid``: layerif against the floor only, over a grid of record shapes --
short and long records, plain text and prompt/completion, with and without
``--per-val`` -- one line per shape with the ratio and, from ``layerif plan``
on the same records, the FLOPs of layerif's passes and of its algebra (Gram
or streaming products) beside the floor's one forward+backward, and the
planned compute of layerif over the floor's (the plan's calibrated rates): a
shape planned above 1.25 cannot reach the bar whatever the fixed costs.
Usage: python bench/bench_score.py [--n-train 48 --n-val 16 --target attn --batch-size 8 --rounds 3] [--grid]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pydoc_data.topics
import random
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from baselines import baseline_cmd, difference, layerif_cmd, median, score_cmd, timed


def write_shapes(folder: Path, n_train: int, n_val: int) -> dict[str, tuple[str, str]]:
    """Records files of the grid's shapes in ``folder``: name -> (train file, validation file). Short text:
    ``Question: what is A minus B? Answer: C.`` (about 17 tokens); long text: 120-word runs of the offline
    corpus (about 170 tokens); long prompt/completion: 100 words of it, then the next 20. The short
    prompt/completion shape is the built-in ``capitals`` task (no file)."""
    rng = random.Random(0)
    words = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).split()
    n = n_train + n_val
    short = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        short.append({"text": f"Question: what is {a} minus {b}? Answer: {a - b}."})
    runs = [words[i * 120:(i + 1) * 120] for i in range(n)]
    shapes = {"short text": short,
              "long text": [{"text": " ".join(r)} for r in runs],
              "long prompt/completion": [{"prompt": " ".join(r[:100]), "completion": " " + " ".join(r[100:])}
                                         for r in runs]}
    files = {}
    for name, records in shapes.items():
        stem = folder / name.replace(" ", "-").replace("/", "-")
        for split, part in (("train", records[:n_train]), ("val", records[n_train:])):
            Path(f"{stem}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        files[name] = (f"{stem}.train.jsonl", f"{stem}.val.jsonl")
    return files


def plan_costs(opts: dict, folder: Path) -> dict[str, float]:
    """From ``layerif plan`` on the same records and options (its chosen engine), FLOPs and planned seconds of
    layerif's passes (``passes``), of its algebra (``algebra``: Gram or streaming products) and of the floor's
    single forward+backward over the train and the validation records (``floor``): ``{"passes": ..., "algebra":
    ..., "floor": ..., "passes_s": ..., "algebra_s": ..., "floor_s": ...}``."""
    subprocess.run(layerif_cmd("plan", **opts, out=folder), check=True, capture_output=True)
    plan = json.loads((folder / "plan.json").read_text())
    stages, engine = plan["stages"], plan["engines"][plan["engine"]]
    val, train = stages["validation passes"], stages["train passes"]
    shares = (engine["passes"] - engine["train_passes"], engine["train_passes"])  # the floor: one pass of each
    out: dict[str, float] = {}
    for key, pick in (("", "flops"), ("_s", "seconds")):
        out["passes" + key] = val[pick] + train[pick]
        out["algebra" + key] = sum(st[pick] for name, st in stages.items() if not name.endswith("passes"))
        out["floor" + key] = val[pick] / shares[0] + train[pick] / shares[1]
    return out


def grid(a: argparse.Namespace, tmp: Path) -> None:
    """layerif against the floor on every record shape × --per-val (see the module's docstring)."""
    files = write_shapes(tmp, a.n_train, a.n_val)
    shapes = {"short prompt/completion": {"task": "capitals"},
              **{name: {"train": tr, "val": va} for name, (tr, va) in files.items()}}
    print("| records | --per-val | layerif s | floor s | layerif / floor (bar ≤ 1.25) | passes GFLOP | "
          "algebra GFLOP | floor GFLOP | planned compute / floor's |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, source in shapes.items():
        for per_val in (False, True):
            common = dict(**source, n_train=a.n_train, n_val=a.n_val, target=a.target, per_val=per_val,
                          batch_size=a.batch_size, device=a.device)
            cmds = {"layerif": score_cmd(**common, out=tmp / "layerif"), "floor": baseline_cmd("floor", **common)}
            wall: dict[str, list[float]] = {k: [] for k in cmds}
            for r in range(a.rounds):
                for k in (list(cmds) if r % 2 == 0 else list(cmds)[::-1]):
                    wall[k].append(timed(cmds[k]))
            c = plan_costs(common, tmp / "plan")
            lay, flo = median(wall["layerif"]), median(wall["floor"])
            print(f"| {name} | {'yes' if per_val else 'no'} | {lay:.1f} | {flo:.1f} | {lay / flo:.2f} "
                  f"(rounds {', '.join(f'{x / y:.2f}' for x, y in zip(wall['layerif'], wall['floor']))}) | "
                  f"{c['passes'] / 1e9:.1f} | {c['algebra'] / 1e9:.1f} | {c['floor'] / 1e9:.1f} | "
                  f"{(c['passes_s'] + c['algebra_s']) / c['floor_s']:.2f} |", flush=True)


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
    ap.add_argument("--grid", action="store_true", help="layerif against the floor over record shapes × --per-val")
    a = ap.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_score."))
    if a.grid:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
              f"torch {torch.__version__}, {a.threads or torch.get_num_threads()} threads; {a.n_train} train x "
              f"{a.n_val} validation records, target {a.target}, batch size {a.batch_size}; whole processes, "
              f"{a.rounds} round(s), order alternating")
        return grid(a, tmp)
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
