"""The scale bar of `layerif score` (issue: exact LayerIF at 7B-70B scale), measured side by side in one run.

a. whole processes, one after the other: `layerif score --per-val` on target lora
   (q_proj, v_proj, rank 8, after a few fine-tuning steps) against the plain
   vectorised DataInf of bench/baselines.py (batch-1 gradients only on the
   adapters, stored, the algebra as matrix products; the same fine-tuning);
   prints the speed-up and the differences of the influence matrices, then
   reruns both in float64 (the exact value, to which each float32 result is
   compared too; --no-float64 skips it).
b. the floor: one batched forward+backward pass over train + validation with
   gradients only on the targeted weights (what any gradient method must do),
   against streaming mode on target attn and materialized mode on lora.
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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from baselines import PeakRSS, baseline_cmd, difference, floor_pass, score_cmd, task_records, timed
from safetensors.torch import load_file

from layerif.data import collate, per_sample_loss
from layerif.lora import prepare_lora
from layerif.models import input_device, load_model, select_targets
from layerif.engine import EngineConfig
from layerif.influence import EstimatorConfig
from layerif.scores import compute


def part_a(a) -> None:
    """Whole processes: `layerif score --target lora --per-val` against the plain vectorised DataInf."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_a."))
    common = dict(task=a.task, n_train=a.n_train, n_val=a.n_val, target="lora", per_val=True,
                  batch_size=a.batch_size, finetune_steps=a.finetune_steps, device=a.device)

    def both(dtype: str) -> tuple[float, float, dict, dict]:
        mine, plain = tmp / f"layerif-{dtype}", tmp / f"plain-{dtype}.safetensors"
        t_mine = timed(score_cmd(**common, dtype=dtype, out=mine))
        t_plain = timed(baseline_cmd("plain", **common, dtype=dtype, out=plain))
        got = {k: v for k, v in load_file(mine / "influence.safetensors").items() if k.startswith("layer.")}
        return t_mine, t_plain, got, load_file(plain)

    t_mine, t_plain, fast, ref = both(a.dtype)
    print(f"a. lora per-val {a.n_train}x{a.n_val}, whole processes: layerif score {t_mine:.1f} s, plain vectorised "
          f"DataInf {t_plain:.1f} s -> {t_plain / t_mine:.2f}x")
    print(f"   {a.dtype} model, layerif vs plain: {difference(fast, ref)} (worst block)")
    if not a.float64:
        return
    # The same fine-tuned model in float64: both methods' rounding drops to ~1e-16, so what
    # remains is any difference in the mathematics; and each float32 run's own error shows.
    _, _, fast64, ref64 = both("float64")
    print(f"   float64 model, layerif vs plain: {difference(fast64, ref64)}")
    print(f"   {a.dtype} against float64: layerif {difference(fast, ref64)}; plain {difference(ref, ref64)}")


def part_b(lm, a) -> None:
    """In one process: the engine's scoring time against one batched pass with gradients only on the targets."""
    train, val = task_records(lm.tokenizer, a.task, a.n_train, a.n_val)
    pad = lm.tokenizer.pad_token_id
    floor = floor_pass(lm.model, select_targets(lm.model, "attn"), train + val, pad, a.batch_size)
    t0 = time.perf_counter()
    res = compute(lm, train, val, EstimatorConfig("datainf", 0.1), EngineConfig("attn", batch_size=a.batch_size, mode="streaming"))
    t_stream = time.perf_counter() - t0
    print(f"b. floor (one batched fwd+bwd over {len(train)}+{len(val)} records, gradients only on attn): {floor:.1f} s; "
          f"streaming attn {t_stream:.1f} s = {t_stream / floor:.2f}x floor ({res.passes} passes)")
    lora = prepare_lora(lm, train, ["q_proj", "v_proj"], 8, a.finetune_steps, 1e-3, a.batch_size, 0)
    floor_l = floor_pass(lora.model, select_targets(lora.model, "lora"), train + val, pad, a.batch_size)
    t0 = time.perf_counter()
    res = compute(lora, train, val, EstimatorConfig("datainf", 0.1),
                  EngineConfig("lora", batch_size=a.batch_size, mode="materialized"))
    t_mat = time.perf_counter() - t0
    print(f"   floor with gradients only on the LoRA adapters: {floor_l:.1f} s; materialized lora {t_mat:.1f} s "
          f"= {t_mat / floor_l:.2f}x floor")


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
    train, val = task_records(lm.tokenizer, spec["task"], spec["n_train"], spec["n_val"])
    if spec.get("activations_only"):
        print(json.dumps({"activations": batch_activation_bytes(lm, train, spec["batch_size"])}))
        return
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        compute(lm, train, val, EstimatorConfig("datainf", 0.1),
                EngineConfig(spec["target"], batch_size=spec["batch_size"], mode="streaming"))
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
        part_a(a)
    if "b" in a.parts:
        part_b(load_model(device=a.device, dtype=a.dtype), a)
    if "c" in a.parts:
        part_c(a)
    if "d" in a.parts:
        part_d(a)


if __name__ == "__main__":
    main()
