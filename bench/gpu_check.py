"""GPU check 1 (bench/gpu_check.sh): streaming `attn` on a random-weight 7B-shaped Llama in bfloat16, built on the GPU.

No download: the model is a ``LlamaConfig`` with Llama-2-7B's shapes (hidden 4096, 32 blocks,
32 heads, MLP 11008, vocabulary 32000) and random weights; the records are random token ids.
On --records records (an eighth of them validation), it times

* streaming DataInf on target attn (2.1B targeted weights) under --max-memory GB, and
* one plain batched forward+backward over the same records with gradients only on the attn weights,

and prints one line: the ratio, the engine's tracked buffer peak against the budget, the
GPU's peak allocated memory against model + budget (activations of one batch come on top), and
``layerif plan``'s prediction of the engine's seconds and the peak above the model for the same
run (:func:`layerif.plan.make_plan`, the GPU's stated peak x efficiency), so the first GPU run
checks the plan too.
Usage: python bench/gpu_check.py [--records 256 --length 64 --batch-size 16 --max-memory 24]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from baselines import floor_pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-memory", type=float, default=24.0, help="GB, the engine's budget")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096, help="smaller for a smoke test (MLP 2.6875x, heads of 128)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test of the script")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import transformers as tf

    from layerif.budget import METER
    from layerif.data import Encoded
    from layerif.models import LoadedModel, select_targets
    from layerif.plan import GPU_PEAK_FLOPS, machine, make_plan
    from layerif.engine import EngineConfig
    from layerif.influence import EstimatorConfig
    from layerif.scores import compute

    heads = max(1, a.hidden // 128)
    cfg = tf.LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=a.hidden * 43 // 16, vocab_size=32000,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(a.device):
        torch.set_default_dtype(torch.bfloat16)
        model = tf.LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    sync()
    built = time.perf_counter() - t0
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    gen = torch.Generator().manual_seed(1)
    recs = []
    for _ in range(a.records):
        ids = torch.randint(3, cfg.vocab_size, (a.length,), generator=gen).tolist()
        recs.append(Encoded(input_ids=ids, labels=ids))
    n_val = max(1, a.records // 8)
    train, val = recs[n_val:], recs[:n_val]
    name = torch.cuda.get_device_name() if cuda else ""
    kind = next((g for g in GPU_PEAK_FLOPS if g in name), "H100")
    plan = make_plan(model, train, val, machine("cuda" if cuda else "cpu", gpu=kind),
                     EngineConfig("attn", batch_size=a.batch_size, max_memory_gb=a.max_memory, mode="streaming"))
    planned_s = "-" if plan["seconds"] is None else f"{plan['seconds']:.1f} s"
    planned_gb = (plan["peak_bytes"] - sum(plan["model"]["bytes_by_dtype"].values())) / 1e9
    lm = LoadedModel(model, SimpleNamespace(pad_token_id=0), "random 7B-shaped Llama (bfloat16)")
    targets = select_targets(model, "attn")
    floor_pass(model, targets, train[:a.batch_size], 0, a.batch_size)  # warm-up (kernels, allocator)
    sync()
    floor = floor_pass(model, targets, train + val, 0, a.batch_size)
    sync()
    model.requires_grad_(False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    METER.reset()
    t0 = time.perf_counter()
    res = compute(lm, train, val, EstimatorConfig("datainf", 0.1),
                  EngineConfig("attn", batch_size=a.batch_size, mode="streaming", max_memory_gb=a.max_memory))
    sync()
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else float("nan")
    finite = all(bool(torch.isfinite(v).all()) for v in res.influence.values())
    ok = finite and METER.peak / 1e9 <= a.max_memory
    print(f"check 1 {'PASS' if ok else 'FAIL'}: streaming attn, 7B-shaped bf16 ({model_gb:.1f} GB, built in {built:.0f} s), "
          f"{len(train)}+{len(val)} records x {a.length} tokens: {wall:.1f} s vs one batched fwd+bwd {floor:.1f} s "
          f"= {wall / floor:.2f}x ({res.passes} passes); engine buffers peak {METER.peak / 1e9:.2f} GB <= budget "
          f"{a.max_memory:.0f} GB; GPU peak above the model {peak:.2f} GB (budget + one batch's activations); "
          f"influences finite: {finite}; plan ({kind}): {planned_s}, peak above the model {planned_gb:.2f} GB")


if __name__ == "__main__":
    main()
