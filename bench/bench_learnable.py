"""The learnable task's lift: multiple-choice accuracy on held-out test items before and after LoRA fine-tuning.

    python bench/bench_learnable.py                       # task city-codes, embedded SmolLM2-135M-Instruct
    python bench/bench_learnable.py --steps 150 --seeds 0,1
    python bench/bench_learnable.py --task word-codes --n-test 200   # another task, the first 200 test items

The model gets LoRA adapters (:func:`layerif.lora.add_lora`) and is trained on
the task's train split only (:func:`layerif.train.train`); accuracy
(:func:`layerif.evaluate.mc_accuracy`) is measured on every distinct item of the
test split (or its first ``--n-test``), none of which the training saw (the splits are disjoint by fact).
Prints one line per seed and writes the numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from layerif.evaluate import mc_accuracy
from layerif.lora import add_lora
from layerif.models import load_model
from layerif.tasks import get_task
from layerif.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="city-codes")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modules", default="q_proj,v_proj")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n-test", type=int, default=None, help="test items (default: every distinct test item)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="out/learnable.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    task = get_task(a.task)
    test = task.split("test", a.n_test)
    rows = []
    base = None
    for seed in [int(s) for s in a.seeds.split(",")]:
        lm = load_model()
        if base is None:
            base = mc_accuracy(lm.model, lm.tokenizer, test, a.eval_batch_size)
            print(f"{a.task}: base accuracy {base:.3f} on {len(test)} distinct test items (chance {task.chance:.3f})",
                  flush=True)
        lm = add_lora(lm, a.modules.split(","), a.rank, seed)
        start = time.perf_counter()
        result = train(lm.model, lm.tokenizer, task.split("train", seed=seed),
                       TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=seed))
        tuned = mc_accuracy(lm.model, lm.tokenizer, test, a.eval_batch_size)
        rows.append({"seed": seed, "accuracy": tuned, "train_loss_first": result.losses[0],
                     "train_loss_last": result.losses[-1], "train_seconds": time.perf_counter() - start})
        print(f"seed {seed}: accuracy {tuned:.3f} after {a.steps} steps (loss {result.losses[0]:.3f} -> "
              f"{result.losses[-1]:.3f}, {rows[-1]['train_seconds']:.0f} s)", flush=True)
    doc = {"task": a.task, "chance": task.chance, "test_items": len(test),
           "train_items": task.n_distinct("train"), "base_accuracy": base, "settings": vars(a), "runs": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
