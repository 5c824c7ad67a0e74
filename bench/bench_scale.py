"""The scale bar of `layerif score` (issue: exact LayerIF at 7B-70B scale), measured side by side in one run.

a. naive DataInf (batch-1 backward per record, flattened per-sample gradients
   kept in memory, Python loops over train samples for each validation sample,
   the way the original DataInf code works) against `layerif score --per-val`
   on target lora (q_proj, v_proj, rank 8, after a few fine-tuning steps);
   prints the speed-up and the differences of the influence matrices in float32, then
   reruns both methods on the same model in float64 (the exact value, to which each
   float32 result is compared too; --no-float64 skips it).
b. the physical floor: one plain batched forward+backward pass over train +
   validation, against streaming mode on target attn and materialized mode on lora.
c. peak memory of streaming mode on target block (in a child process), against
   model + 4 gradient-sized buffers + one batch of activations.
d. scaling of streaming mode on target attn: wall time for several n_train
   (slope, R^2) and peak memory.

Parts a and b run on --device (auto: CUDA when there is one); c and d measure
host memory (RSS) and run on the CPU.

Usage: python bench/bench_scale.py [--parts abcd] [--n-train 256 --n-val 64] [--sizes 64,128,256,512] [--no-float64]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from layerif.data import IGNORE, batches, collate, encode_split, per_sample_loss
from layerif.lora import prepare_lora
from layerif.models import input_device, load_model, select_targets
from layerif.scores import compute
from layerif.tasks import get_task


def records(lm, task: str, n_train: int, n_val: int):
    t = get_task(task)
    train, _ = encode_split(lm.tokenizer, t.split("train", n_train), "train")
    val, _ = encode_split(lm.tokenizer, t.split("validation", n_val), "validation")
    return train, val


def naive_datainf(lm, train, val, target: str, c: float = 0.1) -> dict[int, torch.Tensor]:
    """The original DataInf recipe: batch-1 gradients kept as flat vectors, loops over samples."""
    model = lm.model
    targets = select_targets(model, target)

    def grad(enc):
        model.zero_grad(set_to_none=True)
        device = input_device(model)
        ids, labels = torch.tensor([enc.input_ids], device=device), torch.tensor([enc.labels], device=device)
        # the record's mean next-token cross-entropy, in the model's dtype (transformers'
        # own ``labels=`` loss casts logits to float32, which would spoil a float64 run)
        logits = model(input_ids=ids).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE).backward()
        # float32 gradients as autograd gives them; the loops below run in float64, so the
        # comparison measures layerif's error, not float32 round-off of a 256-term sum
        return {t.name: torch.cat([p.grad.flatten() for p in t.module.parameters(recurse=False)]).double() for t in targets}

    tr = [grad(e) for e in train]
    va = [grad(e) for e in val]
    out: dict[int, torch.Tensor] = {}
    n = len(tr)
    for t in targets:
        lam = c * sum(float((g[t.name] ** 2).mean()) for g in tr) / n
        if lam == 0:
            continue
        mat = torch.zeros(len(va), n, dtype=torch.float64)
        for j, v in enumerate(va):
            hvp = torch.zeros_like(v[t.name])
            for g in tr:
                gi = g[t.name]
                hvp += (v[t.name] - (v[t.name] @ gi) / (lam + gi @ gi) * gi) / (n * lam)
            for i, g in enumerate(tr):
                mat[j, i] = -(hvp @ g[t.name])
        out[t.block] = out.get(t.block, 0) + mat
    model.zero_grad(set_to_none=True)
    return out


def floor_pass(lm, recs, batch_size: int) -> float:
    """Seconds for one plain batched forward+backward over recs (parameter gradients on)."""
    model = lm.model
    t0 = time.perf_counter()
    for chunk in batches(recs, batch_size):
        b = collate(chunk, lm.tokenizer.pad_token_id, input_device(model))
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        per_sample_loss(out.logits, b["labels"]).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _diff(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> str:
    """Worst block's largest entry-wise difference (of the largest entry of b) and relative Frobenius difference."""
    ent = max(float((a[l] - b[l]).abs().max() / b[l].abs().max()) for l in b)
    fro = max(float((a[l] - b[l]).norm() / b[l].norm()) for l in b)
    return f"entry-wise {ent:.1e}, Frobenius {fro:.1e}"


def part_a(lm, a) -> None:
    train, val = records(lm, a.task, a.n_train, a.n_val)
    lm = prepare_lora(lm, train, ["q_proj", "v_proj"], 8, a.finetune_steps, 1e-3, a.batch_size, 0)
    t0 = time.perf_counter()
    fast = compute(lm, train, val, "lora", "datainf", 0.1, per_val=True, batch_size=a.batch_size).influence
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = naive_datainf(lm, train, val, "lora")
    t_naive = time.perf_counter() - t0
    print(f"a. lora per-val {len(train)}x{len(val)}: layerif {t_fast:.1f} s, naive {t_naive:.1f} s "
          f"-> {t_naive / t_fast:.1f}x faster")
    print(f"   float32 model, layerif vs naive: {_diff(fast, ref)} (worst block)")
    if not a.float64:
        return
    # The same fine-tuned model in float64: both methods' rounding drops to ~1e-16, so what
    # remains is any difference in the mathematics; and each float32 run's own error shows.
    lm.model.double()
    fast64 = compute(lm, train, val, "lora", "datainf", 0.1, per_val=True, batch_size=a.batch_size).influence
    ref64 = naive_datainf(lm, train, val, "lora")
    print(f"   float64 model, layerif vs naive: {_diff(fast64, ref64)}")
    print(f"   float32 against float64: layerif {_diff(fast, ref64)}; naive {_diff(ref, ref64)}")


def part_b(lm, a) -> None:
    train, val = records(lm, a.task, a.n_train, a.n_val)
    floor = floor_pass(lm, train + val, a.batch_size)
    t0 = time.perf_counter()
    res = compute(lm, train, val, "attn", "datainf", 0.1, batch_size=a.batch_size, mode="streaming")
    t_stream = time.perf_counter() - t0
    print(f"b. floor (one batched fwd+bwd over {len(train)}+{len(val)} records): {floor:.1f} s; "
          f"streaming attn {t_stream:.1f} s = {t_stream / floor:.2f}x floor ({res.passes} passes)")
    lora = prepare_lora(lm, train, ["q_proj", "v_proj"], 8, a.finetune_steps, 1e-3, a.batch_size, 0)
    floor_l = floor_pass(lora, train + val, a.batch_size)
    t0 = time.perf_counter()
    res = compute(lora, train, val, "lora", "datainf", 0.1, batch_size=a.batch_size, mode="materialized")
    t_mat = time.perf_counter() - t0
    print(f"   floor with LoRA adapters: {floor_l:.1f} s; materialized lora {t_mat:.1f} s = {t_mat / floor_l:.2f}x floor")


def batch_activation_bytes(lm, recs, batch_size: int) -> int:
    """RSS growth of one plain forward+backward of the longest batch (no parameter gradients):
    the "one batch of activations" of the memory budget (run in a process of its own, so that no
    memory freed by another job is reused)."""
    model = lm.model
    longest = sorted(recs, key=lambda e: -len(e.input_ids))[:batch_size]
    b = collate(longest, lm.tokenizer.pad_token_id, input_device(model))
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with PeakRSS() as mem:
            embeds = model.get_input_embeddings()(b["input_ids"]).detach().requires_grad_()
            out = model(inputs_embeds=embeds, attention_mask=b["attention_mask"], use_cache=False)
            per_sample_loss(out.logits, b["labels"]).sum().backward()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return mem.peak - mem.start


def child(spec: dict) -> None:
    """Run one streaming job and print its wall time and memory as JSON (used by parts c and d).

    ``during`` is the RSS growth while scoring, above the process with the model
    loaded: what the streaming statistics themselves cost.
    """
    lm = load_model(device="cpu")
    train, val = records(lm, spec["task"], spec["n_train"], spec["n_val"])
    if spec.get("activations_only"):
        print(json.dumps({"activations": batch_activation_bytes(lm, train, spec["batch_size"])}))
        return
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        compute(lm, train, val, spec["target"], "datainf", 0.1, batch_size=spec["batch_size"], mode="streaming")
    wall = time.perf_counter() - t0
    targets = select_targets(lm.model, spec["target"])
    grad_bytes = sum(t.numel for t in targets) * 4
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    print(json.dumps({"wall": wall, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "after_load": base * 1024, "during": mem.peak - mem.start, "grad_bytes": grad_bytes,
                      "model_bytes": model_bytes}))


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_c(a) -> None:
    spec = {"task": a.task, "n_train": a.n_train, "n_val": a.n_val, "target": "block", "batch_size": a.batch_size}
    r = run_child(spec) | run_child(spec | {"activations_only": True})
    gb = 1e9
    print(f"c. streaming block: scoring grew the process by {r['during'] / gb:.2f} GB above the loaded model "
          f"(model {r['model_bytes'] / gb:.2f} GB; process peak {r['peak'] / gb:.2f} GB, of which loading "
          f"{r['after_load'] / gb:.2f} GB); budget for the statistics: 4 gradient buffers "
          f"{4 * r['grad_bytes'] / gb:.2f} GB + one batch of activations {r['activations'] / gb:.2f} GB "
          f"= {(4 * r['grad_bytes'] + r['activations']) / gb:.2f} GB")


def part_d(a) -> None:
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = [run_child({"task": a.task, "n_train": n, "n_val": a.n_val, "target": "attn", "batch_size": a.batch_size})
            for n in sizes]
    wall = np.array([r["wall"] for r in rows])
    slope, icpt = np.polyfit(sizes, wall, 1)
    r2 = 1 - ((wall - (slope * np.array(sizes) + icpt)) ** 2).sum() / ((wall - wall.mean()) ** 2).sum()
    print("d. streaming attn: " + ", ".join(f"n={n}: {r['wall']:.1f} s, +{r['during'] / 1e9:.2f} GB while scoring"
                                            for n, r in zip(sizes, rows)))
    print(f"   slope {slope:.3f} s/record, intercept {icpt:.1f} s, R^2 {r2:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="abcd")
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--finetune-steps", type=int, default=10)
    ap.add_argument("--sizes", default="64,128,256,512")
    ap.add_argument("--device", default="auto", help="parts a and b: auto, cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="parts a and b: the model's dtype (float32: like for like "
                    "with the naive recipe)")
    ap.add_argument("--no-float64", dest="float64", action="store_false",
                    help="part a: skip the float64 rerun of both methods")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and a.device != "cpu" else ""
    print(f"machine: {platform.machine()}{gpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"task {a.task}, batch size {a.batch_size}, dtype {a.dtype}")
    if "a" in a.parts:
        part_a(load_model(device=a.device, dtype=a.dtype), a)
    if "b" in a.parts:
        part_b(load_model(device=a.device, dtype=a.dtype), a)
    if "c" in a.parts:
        part_c(a)
    if "d" in a.parts:
        part_d(a)


if __name__ == "__main__":
    main()
