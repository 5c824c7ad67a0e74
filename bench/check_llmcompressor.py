"""Apply an exported recipe.yaml with llm-compressor and compare the per-block sparsity with allocation.json.

Runs in llm-compressor's OWN virtual environment (it pins transformers ≤ 5.17,
layerif is on 5.24), so this script imports neither layerif nor anything of the
project: it reads the files ``layerif prune --save DIR`` wrote. Set up once
(torch from the CPU wheel, no CUDA download)::

    python3.11 -m venv .venv-llmcompressor
    .venv-llmcompressor/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0

then, with a dense model folder (the embedded model's de-quantized cache, printed
by ``layerif tasks`` runs as ``~/.cache/layerif/gguf/SmolLM2-135M-Instruct.Q4_1-*``)::

    layerif prune --method wanda --allocation search --sparsity 0.6 --save out/pruned-search ...
    .venv-llmcompressor/bin/python bench/check_llmcompressor.py --pruned out/pruned-search \\
        --model ~/.cache/layerif/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f

Calibration: ``--n-calib`` windows of ``--seqlen`` tokens from the same built-in
corpus layerif uses (the prose of ``pydoc_data.topics``), as a ``datasets``
Dataset of token ids, so nothing is downloaded. Prints one row per block
(layerif's target, layerif's achieved, llm-compressor's achieved) and exits 1
when any block differs from its target by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def corpus_windows(tokenizer, n: int, seqlen: int, seed: int) -> list[list[int]]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = random.Random(seed).sample(range(len(ids) - seqlen + 1), n)
    return [ids[s : s + seqlen] for s in starts]


def block_sparsity(model) -> list[float]:
    """Share of exact zeros over the Linear weights inside each decoder block (model.model.layers)."""
    import torch

    out = []
    for block in model.model.layers:
        zeros = total = 0
        for mod in block.modules():
            if isinstance(mod, torch.nn.Linear):
                zeros += int((mod.weight == 0).sum())
                total += mod.weight.numel()
        out.append(zeros / total)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pruned", required=True, help="folder of `layerif prune --save` (allocation.json, recipe.yaml)")
    ap.add_argument("--model", required=True, help="the dense model folder (safetensors + tokenizer)")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args()

    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import __version__ as llmc_version
    from llmcompressor import oneshot

    pruned = Path(args.pruned)
    alloc = json.loads((pruned / "allocation.json").read_text())
    recipe = pruned / "recipe.yaml"
    if not recipe.exists():
        print(f"{recipe} is missing (magnitude pruning has no llm-compressor recipe)", file=sys.stderr)
        return 2
    print(f"llmcompressor {llmc_version}, transformers {transformers.__version__}, torch {torch.__version__}")
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    windows = corpus_windows(tok, args.n_calib, args.seqlen, args.seed)
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    t0 = time.time()
    oneshot(model=model, dataset=ds, recipe=str(recipe), num_calibration_samples=args.n_calib,
            max_seq_length=args.seqlen, tokenizer=tok)
    seconds = time.time() - t0
    got = block_sparsity(model)
    target, achieved = alloc["sparsity"], alloc.get("achieved", [float("nan")] * len(got))
    if len(got) != len(target):
        print(f"allocation.json has {len(target)} blocks, the model {len(got)}", file=sys.stderr)
        return 2
    print(f"oneshot took {seconds:.1f} s; allocation {alloc.get('allocation')} ({alloc.get('method')}), "
          f"target {alloc.get('target_sparsity')}")
    print(f"{'block':>5}  {'target':>7}  {'layerif':>7}  {'llm-compressor':>14}  {'diff':>7}")
    worst = 0.0
    for l, (t, a, g) in enumerate(zip(target, achieved, got)):
        worst = max(worst, abs(g - t))
        print(f"{l:>5}  {t:>7.4f}  {a:>7.4f}  {g:>14.4f}  {g - t:>+7.4f}")
    print(f"largest |llm-compressor − target| = {worst:.4f} (tolerance {args.tolerance})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
