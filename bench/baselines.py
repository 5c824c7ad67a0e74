"""The fair baselines of the benchmarks, each runnable as a whole process (imports, model load, work).

* ``plain``: DataInf as a competent user would write it when the per-sample
  gradients fit in memory: one batch-1 forward+backward per record with
  gradients only on the targeted modules' weights (``torch.autograd.grad`` of the
  record's mean next-token loss), every per-sample gradient stored in float32,
  then the algebra as matrix products per module: K = G G^T, P = G V^T,
  lambda = c mean_i ||g_i||^2 / d, I = -(P - K R / n) / lambda with
  R = P / (lambda + diag K) (float64 on the n x n and n x k matrices).
* ``floor``: the least any gradient method must do: load the same weights, one
  batched forward+backward over the same train and validation records with
  gradients only on the targeted weights (no other parameter gradients).

Both read the records the way ``layerif score --task T --n-train N --n-val K`` does.
Usage: python bench/baselines.py plain|floor [--task capitals | --train T --val V] [--n-train 48 --n-val 16 --target attn --per-val
       --batch-size 8 --finetune-steps 0 --device cpu --dtype float32 --out influence.safetensors]
Prints one JSON line: seconds of the work after loading, and the process's seconds so far.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402

from layerif.data import batches, collate, encode_split, load_records, per_sample_loss, stat_dtype  # noqa: E402
from layerif.models import Projection, input_device, load_model, select_targets  # noqa: E402
from layerif.tasks import get_task  # noqa: E402


def task_records(tokenizer, task: str, n_train: int, n_val: int, seed: int = 0, train_file: str | None = None,
                 val_file: str | None = None):
    """The train and validation records of ``layerif score --task task --n-train --n-val --seed``, or of
    ``--train train_file --val val_file`` (records files: text or prompt/completion) when given."""
    if train_file:
        rows = load_records(train_file)[: n_train or None], load_records(val_file)[: n_val or None]
    else:
        t = get_task(task)
        rows = t.split("train", n_train or None, seed)[: n_train or None], t.split("validation", n_val or None, seed)[
            : n_val or None]
    train, _ = encode_split(tokenizer, rows[0], "train")
    val, _ = encode_split(tokenizer, rows[1], "validation")
    return train, val


def grads_only_on(model: torch.nn.Module, targets: list[Projection]) -> list[torch.nn.Parameter]:
    """Switch every parameter's gradient off except the targeted modules' own weights; returns those."""
    model.requires_grad_(False)
    params = [p for t in targets for p in t.module.parameters(recurse=False)]
    for p in params:
        p.requires_grad_(True)
    return params


def floor_pass(model: torch.nn.Module, targets: list[Projection], records, pad_id: int, batch_size: int) -> float:
    """Seconds of one batched forward+backward over ``records``, gradients only on the targets' weights."""
    params = grads_only_on(model, targets)
    t0 = time.perf_counter()
    for chunk in batches(records, batch_size):
        b = collate(chunk, pad_id, input_device(model))
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        torch.autograd.grad(per_sample_loss(out.logits, b["labels"]).sum(), params)
    return time.perf_counter() - t0


def plain_datainf(model: torch.nn.Module, targets: list[Projection], train, val, per_val: bool,
                  c: float = 0.1) -> dict[int, torch.Tensor]:
    """Block influences {block: [k, n_train]} (k = n_val with ``per_val``, else 1), float64; see the module doc."""
    params = grads_only_on(model, targets)
    sizes = [t.numel for t in targets]
    device = input_device(model)

    def stored(records) -> torch.Tensor:
        """[n, sum d_m] float32 (float64 for a float64 model): each record's gradient, batch 1, modules side by side."""
        G = torch.empty(len(records), sum(sizes), dtype=stat_dtype(params[0].dtype), device=device)
        for i, e in enumerate(records):
            ids, labels = torch.tensor([e.input_ids], device=device), torch.tensor([e.labels], device=device)
            loss = per_sample_loss(model(input_ids=ids, use_cache=False).logits, labels)[0]
            G[i] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        return G

    G, V = stored(train), stored(val)
    if not per_val:
        V = V.sum(0, keepdim=True)
    n = G.shape[0]
    out: dict[int, torch.Tensor] = {}
    for t, Gm, Vm in zip(targets, G.split(sizes, dim=1), V.split(sizes, dim=1)):
        K, P = (Gm @ Gm.T).double(), (Gm @ Vm.T).double()
        lam = c * float(torch.diagonal(K).mean()) / t.numel
        R = P / (lam + torch.diagonal(K))[:, None]
        I = -(P - K @ R / n) / lam
        out[t.block] = out.get(t.block, 0) + I.T.cpu()
    return out


# ----------------------------------------------------------------------------- harness of the benchmarks

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> float:
    """Wall seconds of ``cmd`` as a whole process (fails loudly, with its stderr, on a non-zero exit)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def baseline_cmd(method: str, **opts) -> list[str]:
    """The command line of a baseline process (options as keyword arguments, ``per_val=True`` -> ``--per-val``)."""
    cmd = [sys.executable, str(HERE / "baselines.py"), method]
    for k, v in opts.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def layerif_cmd(command: str, **opts) -> list[str]:
    """The command line of a ``layerif COMMAND`` process, options as in :func:`baseline_cmd` (``--overwrite``:
    repeated rounds write the same folder)."""
    return [sys.executable, "-m", "layerif", command, "--quiet", "--overwrite", *baseline_cmd("x", **opts)[3:]]


def score_cmd(**opts) -> list[str]:
    """The command line of a ``layerif score`` process (:func:`layerif_cmd`)."""
    return layerif_cmd("score", **opts)


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """Worst block's largest entry-wise difference (relative to b's largest entry) and relative Frobenius difference."""
    ent = max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()) for k in b)
    fro = max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b)
    return f"entry-wise {ent:.1e}, Frobenius {fro:.1e}"


def _rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """The largest RSS seen while the ``with`` body runs (sampled every millisecond in a thread)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=("plain", "floor"))
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--train", help="train records file (text or prompt/completion); replaces --task")
    ap.add_argument("--val", help="validation records file, with --train")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--target", default="attn")
    ap.add_argument("--per-val", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--finetune-steps", type=int, default=0, help="with --target lora: LoRA fine-tuning steps first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", help="plain: write the block influences here (safetensors, layer.L [k, n_train])")
    a = ap.parse_args()
    lm = load_model(device=a.device, dtype=a.dtype)
    train, val = task_records(lm.tokenizer, a.task, a.n_train, a.n_val, train_file=a.train, val_file=a.val)
    if a.target == "lora":
        from layerif.lora import prepare_lora

        lm = prepare_lora(lm, train, ["q_proj", "v_proj"], 8, a.finetune_steps, 1e-3, a.batch_size, 0)
    targets = select_targets(lm.model, a.target)
    t0 = time.perf_counter()
    if a.method == "floor":
        floor_pass(lm.model, targets, train + val, lm.tokenizer.pad_token_id, a.batch_size)
    else:
        inf = plain_datainf(lm.model, targets, train, val, a.per_val)
        if a.out:
            from safetensors.torch import save_file

            save_file({f"layer.{l}": v.float().contiguous() for l, v in inf.items()}, a.out)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    now = time.perf_counter()
    print(json.dumps({"method": a.method, "work_s": now - t0, "process_s": now - START}))


if __name__ == "__main__":
    main()
