"""Speed of `layerif score` against a plain one-backward-per-sample implementation of the same formulas.

Both run in this process, on the same model and records, one after the other:

* layerif: batched passes, per-sample gradients from hooks (dense or token
  factors), DataInf in Gram form (:func:`layerif.scores.compute`);
* plain: ``model(input_ids, labels).loss.backward()`` for one record at a time,
  gradients read from ``param.grad``, the DataInf formulas as written:
  pass 1 the norms (lambda needs all of them), pass 2 h_m = 1/(n lambda) sum_j
  (v - (v.g_j)/(lambda + |g_j|^2) g_j), pass 3 I(i) = -sum_m h_m . g_im.
  It never holds more than one sample's gradients, so it needs 3 backward
  passes per train record.

Prints both times, the speed-up ratio, and the largest relative difference of
the block influences. Usage: python bench/bench_score.py [--n-train 128 --n-val 32 --task capitals]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from layerif.data import encode_split
from layerif.models import load_model, select_targets
from layerif.scores import compute
from layerif.tasks import get_task


def plain_datainf(lm, train_records, val_records, target: str, c: float) -> dict[int, torch.Tensor]:
    model = lm.model
    targets = select_targets(model, target)
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        for p in t.module.parameters(recurse=False):
            p.requires_grad_(True)

    def grads(enc) -> dict[str, torch.Tensor]:
        ids = torch.tensor([enc.input_ids])
        labels = torch.tensor([enc.labels])
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        return {t.name: torch.cat([p.grad.flatten() for p in t.module.parameters(recurse=False)]).double() for t in targets}

    v = {t.name: 0 for t in targets}
    for enc in val_records:
        for k, g in grads(enc).items():
            v[k] = v[k] + g
    n = len(train_records)
    norms = {t.name: torch.zeros(n, dtype=torch.float64) for t in targets}
    for i, enc in enumerate(train_records):  # pass 1: norms -> lambda
        for k, g in grads(enc).items():
            norms[k][i] = g @ g
    lam = {t.name: c * float(norms[t.name].mean()) / t.numel for t in targets}
    h = {t.name: torch.zeros(t.numel, dtype=torch.float64) for t in targets}
    for j, enc in enumerate(train_records):  # pass 2: h
        for k, g in grads(enc).items():
            h[k] += v[k] - (v[k] @ g) / (lam[k] + norms[k][j]) * g
    for k in h:
        h[k] /= n * lam[k]
    out: dict[int, torch.Tensor] = {}
    for i, enc in enumerate(train_records):  # pass 3: influence
        g = grads(enc)
        for t in targets:
            out.setdefault(t.block, torch.zeros(n, dtype=torch.float64))[i] -= h[t.name] @ g[t.name]
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--target", default="attn")
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()

    lm = load_model()
    task = get_task(a.task)
    train, _ = encode_split(lm.tokenizer, task.split("train", a.n_train), "train")
    val, _ = encode_split(lm.tokenizer, task.split("validation", a.n_val), "validation")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: {lm.name}; task {a.task}: {len(train)} train x {len(val)} validation; target {a.target}; "
          f"batch size {a.batch_size}")

    t0 = time.perf_counter()
    fast = compute(lm, train, val, a.target, "datainf", 0.1, batch_size=a.batch_size)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = plain_datainf(lm, train, val, a.target, 0.1)
    t_plain = time.perf_counter() - t0

    err = max(float((fast.influence[l] - ref[l]).abs().max() / ref[l].abs().max()) for l in fast.layers)
    print(f"layerif score (datainf): {t_fast:8.1f} s  ({fast.passes} batched passes)")
    print(f"plain one-sample loops : {t_plain:8.1f} s  (3 backward passes per train record)")
    print(f"speed-up: {t_plain / t_fast:.1f}x   max relative difference of block influences: {err:.2e}")


if __name__ == "__main__":
    main()
