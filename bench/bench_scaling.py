"""How `layerif score` grows with records and model size, and how close `layerif plan` comes (issue: know the cost).

For every model x dtype x engine x n_train of the grid, on this machine:

1. `layerif plan` with the run's options: the planned engine seconds (the passes and the algebra; the CPU
   must be calibrated once with `layerif plan --calibrate`) and the planned peak memory (model + buffers +
   one batch's activations);
2. the same options through `layerif score` in a child process: the engine's seconds (the materialized or
   streaming engine's call, timed around it), the whole command's seconds, and the peak resident memory
   above the process after its imports (the runtime the plan leaves out).

Models: `embedded` (SmolLM2-135M, the default) and random-initialised Llama-shaped models built from
configs (no download; seeded; written once into --work): `llama-360m` (SmolLM2-360M's shape) and `llama-1b`
(hidden 2048, 16 blocks, 8192 MLP, vocabulary 49152: 1.07 B parameters), with the embedded tokenizer.
Prints the plan-against-measured table, the fitted exponents (log-log slope of the engine's seconds in
n_train for each model, and in parameters for each n_train) and writes scaling.json, scaling.md and
scaling.png into --out.

Usage: python bench/bench_scaling.py [--models embedded,llama-360m,llama-1b] [--dtypes float32,bfloat16]
       [--engines materialized,streaming] [--n-train 32,128] [--n-val 8] [--work DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "llama-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                       num_key_value_heads=5),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
}
"""Random Llama-shaped models (vocabulary 49152, tied embeddings, as SmolLM2), by name."""


def model_folder(name: str, work: Path) -> list[str]:
    """The ``--model`` options of ``name``: none for the embedded default, else a folder under ``work`` holding a
    seeded random Llama of :data:`SHAPES` (float32 safetensors) and the embedded tokenizer, written once."""
    if name == "embedded":
        return []
    folder = work / name
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from layerif.models import load_config

        tokenizer = load_config()[1]
        config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                             **SHAPES[name])
        torch.manual_seed(0)
        tmp = work / f".{name}.tmp"
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    return ["--model", str(folder)]


def _rss() -> int:
    """This process's resident memory, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(argv: list[str]) -> None:
    """Run `layerif score ARGV` in this process with the engines timed; print one JSON line."""
    from layerif import engine

    spent = {"engine": 0.0}
    for name in ("module_stats", "streaming_influence"):
        inner = getattr(engine, name)

        def timed(*a, _inner=inner, **k):
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent["engine"] += time.perf_counter() - start

        setattr(engine, name, timed)
    from layerif.cli import main  # after the wrapping: modules bind the engine's names when they import them

    base = _rss()
    start = time.perf_counter()
    code = main(["score", *argv])
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"code": code, "engine_seconds": spent["engine"], "total_seconds": total,
                      "peak_bytes": peak, "base_bytes": base}))


def run_case(model: list[str], dtype: str, mode: str, n_train: int, a, tmp: Path) -> dict:
    """One grid point: the plan, then the measured run (a child process)."""
    opts = [*model, "--dtype", dtype, "--mode", mode, "--task", a.task, "--n-train", str(n_train),
            "--n-val", str(a.n_val), "--target", a.target, "--overwrite"]
    plan_dir, score_dir = tmp / "plan", tmp / "score"
    subprocess.run([sys.executable, "-m", "layerif", "plan", *opts, "--out", str(plan_dir)], check=True,
                   capture_output=True, text=True)
    plan = json.loads((plan_dir / "plan.json").read_text())
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([*opts, "--out", str(score_dir)])],
                         check=True, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if got["code"] != 0:
        raise SystemExit(f"layerif score failed: {out.stderr.strip().splitlines()[-1]}")
    return {"planned_seconds": plan["seconds"], "planned_peak_bytes": plan["peak_bytes"],
            "parameters": plan["model"]["parameters"], "engine": plan["engine"],
            "throughput_source": plan["throughput_source"], **got}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """The least-squares slope of log y on log x (None with fewer than two distinct x)."""
    if len(set(xs)) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="embedded,llama-360m,llama-1b")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--engines", default="materialized,streaming")
    ap.add_argument("--n-train", default="32,128", help="comma-separated train record counts")
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--target", default="attn")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "layerif-bench-models"),
                    help="where the random models are written once")
    ap.add_argument("--out", default="out/bench_scaling")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in a.n_train.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scaling.") as tmp:
        for name in a.models.split(","):
            model = model_folder(name, work)
            for dtype in a.dtypes.split(","):
                for mode in a.engines.split(","):
                    for n in counts:
                        r = run_case(model, dtype, mode, n, a, Path(tmp)) | {
                            "model": name, "dtype": dtype, "mode": mode, "n_train": n}
                        rows.append(r)
                        print(f"{name} {dtype} {mode} n={n}: engine {r['engine_seconds']:.1f} s "
                              f"(planned {r['planned_seconds']:.1f}), whole {r['total_seconds']:.1f} s, peak +"
                              f"{(r['peak_bytes'] - r['base_bytes']) / 1e9:.2f} GB (planned "
                              f"{r['planned_peak_bytes'] / 1e9:.2f})", flush=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads default; "
               f"{rows[0]['throughput_source'] if rows else ''}")
    lines = [f"Machine: {machine}. Task {a.task}, {a.n_val} validation records, target {a.target}.", "",
             "| model | dtype | engine | n_train | planned s | engine s | ratio | whole s | planned peak GB "
             "| peak above imports GB | ratio |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in rows:
        above = r["peak_bytes"] - r["base_bytes"]
        lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['n_train']} | {r['planned_seconds']:.1f} | "
                     f"{r['engine_seconds']:.1f} | {r['engine_seconds'] / r['planned_seconds']:.2f} | "
                     f"{r['total_seconds']:.1f} | {r['planned_peak_bytes'] / 1e9:.2f} | {above / 1e9:.2f} | "
                     f"{above / r['planned_peak_bytes']:.2f} |")
    fits = []
    keys = sorted({(r["model"], r["dtype"], r["mode"]) for r in rows})
    for m, d, e in keys:
        sel = [r for r in rows if (r["model"], r["dtype"], r["mode"]) == (m, d, e)]
        s = slope([r["n_train"] for r in sel], [r["engine_seconds"] for r in sel])
        if s is not None:
            fits.append(f"- {m} {d} {e}: engine seconds ∝ n_train^{s:.2f}")
    for n in counts:
        for d in a.dtypes.split(","):
            for e in a.engines.split(","):
                sel = [r for r in rows if (r["n_train"], r["dtype"], r["mode"]) == (n, d, e)]
                s = slope([r["parameters"] for r in sel], [r["engine_seconds"] for r in sel])
                if s is not None:
                    fits.append(f"- n_train {n} {d} {e}: engine seconds ∝ parameters^{s:.2f}")
    text = "\n".join(lines + ["", "Fitted exponents (log-log least squares):", *fits]) + "\n"
    print(text)
    (out / "scaling.md").write_text(text, encoding="utf-8")
    (out / "scaling.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1), encoding="utf-8")
    figure(rows, out / "scaling.png")
    print(f"wrote {out}/scaling.md, scaling.json, scaling.png")


def figure(rows: list[dict], path: Path) -> None:
    """Engine seconds and peak memory above the imports against n_train, one line per model/dtype/engine."""
    from layerif.io import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["model"], r["dtype"], r["mode"]) for r in rows}):
        sel = sorted((r for r in rows if (r["model"], r["dtype"], r["mode"]) == key), key=lambda r: r["n_train"])
        xs = [r["n_train"] for r in sel]
        label = " ".join(key)
        ax1.plot(xs, [r["engine_seconds"] for r in sel], "o-", label=label)
        ax2.plot(xs, [(r["peak_bytes"] - r["base_bytes"]) / 1e9 for r in sel], "o-", label=label)
    for ax, what in ((ax1, "engine seconds"), (ax2, "peak above imports, GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("train records")
        ax.set_ylabel(what)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
