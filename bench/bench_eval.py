"""Multiple-choice scoring: the shared-prompt cache path of `layerif.evaluate` against whole sequences.

The baseline is what the evaluation did before (and what lm-eval's `hf` model does without its prefix
cache): every (prompt, option) pair as one right-padded sequence, batched, logits over every position.
Both run in this process on the same model and records, interleaved, repeated; prints the median times,
their ratio and the largest difference of the option log-likelihoods.

    python bench/bench_eval.py --tasks capitals,addition --items 300 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerif.data import IGNORE, collate, encode_pair, pad_id
from layerif.evaluate import option_logprobs
from layerif.models import input_device, load_model
from layerif.tasks import test_records


@torch.no_grad()
def whole_sequences(model, tokenizer, records: list[dict], batch_size: int) -> list[list[float]]:
    """The baseline: each (prompt, option) run whole; summed log p of the option tokens."""
    pairs = [encode_pair(tokenizer, r["prompt"], o) for r in records for o in r["options"]]
    device, pad = input_device(model), pad_id(tokenizer)
    flat: list[float] = []
    for i in range(0, len(pairs), batch_size):
        batch = collate(pairs[i : i + batch_size], pad, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        logp = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        flat.extend(torch.where(labels != IGNORE, logp, 0.0).sum(dim=1).tolist())
    out, k = [], 0
    for r in records:
        out.append(flat[k : k + len(r["options"])])
        k += len(r["options"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="capitals,addition")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_model(device="cpu")
    print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, batch size {a.batch_size}")
    for task in a.tasks.split(","):
        records = test_records(task, a.items)
        times: dict[str, list[float]] = {"whole": [], "shared": []}
        results = {}
        for k in range(a.rounds):
            order = [("whole", whole_sequences), ("shared", option_logprobs)]
            for name, fn in order if k % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                results[name] = fn(lm.model, lm.tokenizer, records, a.batch_size)
                times[name].append(time.perf_counter() - t0)
        diff = max(abs(x - y) for rw, rs in zip(results["whole"], results["shared"]) for x, y in zip(rw, rs))
        same = sum(max(range(len(w)), key=w.__getitem__) == max(range(len(s)), key=s.__getitem__)
                   for w, s in zip(results["whole"], results["shared"]))
        w, s = statistics.median(times["whole"]), statistics.median(times["shared"])
        print(f"{task}: {len(records)} items, whole sequences {w:.1f} s, shared prompt {s:.1f} s -> {w / s:.2f}x "
              f"(rounds {', '.join(f'{x / y:.2f}' for x, y in zip(times['whole'], times['shared']))}); "
              f"largest log-likelihood difference {diff:.1e}, same choice on {same}/{len(records)} items")


if __name__ == "__main__":
    main()
