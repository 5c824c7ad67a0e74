"""What a scoring run will cost, before it runs: bytes, passes and an estimate of the time (``layerif plan``).

Nothing is computed: the model is built on the ``meta`` device from its config
(:func:`layerif.models.meta_model`), the records are tokenized for their lengths,
and the engines' own planning code (:func:`layerif.engine.materialized_plan`,
:func:`layerif.budget.streaming_plan`, :func:`layerif.scores.choose_mode`) gives
the engine, the layouts, the groups x chunks and the buffer bytes -- the very
numbers the run would use, so the plan's buffer bytes are the bytes the engines
allocate (``tests/test_plan.py`` holds them to :data:`layerif.budget.METER`).

Time model (an **estimate**): FLOPs per stage divided by a throughput.

* a forward+backward pass over T tokens: 6 x (model parameters) x T FLOPs;
* the Gram products and the streaming dot products: by their shapes;
* throughput: on the CPU, the rates the engine itself reached when
  :func:`calibrate` timed it (``layerif plan --calibrate``, kept in
  ``$LAYERIF_CACHE/calibration.json``): its gradient passes and its Gram
  products on small random Llama-shaped models over a grid of widths and batch
  sizes, interpolated at the planned model's width and batch
  (:func:`interpolate_rates`), so the small, hooked matrix products of a real
  pass are in the rate; on a GPU, :data:`GPU_PEAK_FLOPS` (the vendors' stated
  dense bf16 and FP64 tensor rates) x :data:`GPU_EFFICIENCY`. The passes and
  the streaming products run at the first rate, the Gram products at the second.
* not in the estimate: imports, loading and fingerprinting the weights, writing.

Under ``world_size`` N processes (streaming, records sharded) a pass costs 1/N
of its FLOPs per process. Peak memory per process = the model's bytes + the
engine's buffers (the budget's plan) + one batch's activations (an estimate:
:func:`activation_bytes`).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .budget import chunk_columns, gram_bytes, streaming_bytes, streaming_plan
from .data import Encoded
from .engine import EngineConfig, MaterializedPlan, materialized_plan, memory_budget, ram_bytes
from .grads import gram
from .errors import UserError
from .influence import get_estimator
from .io import write_json
from .models import (Projection, cache_dir, context_length, find_blocks, load_config, meta_model, resolve_dtype,
                     select_targets, weight_out_in)
from .scores import PlanCheck, choose_mode, load_splits, score_config

GPU_PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12)}
"""Stated peak dense (bf16, FP64) tensor-core rates, FLOP/s (vendor datasheets, SXM parts, no sparsity)."""
GPU_EFFICIENCY = 0.4
"""Share of the stated peak a scoring run is assumed to reach (an estimate, not a measurement)."""
CALIBRATION_FILE = "calibration.json"
ALGEBRA_STAGES = ("Gram products",)
"""Stages timed at the second rate of :func:`throughput` (the CPU's calibrated Gram rate; a GPU's FP64 peak: the
Gram products' working copies are float64)."""


# ----------------------------------------------------------------------------- throughput


def calibration_path():
    """Where :func:`calibrate` keeps the CPU's measured rate: ``$LAYERIF_CACHE/calibration.json``."""
    return cache_dir() / CALIBRATION_FILE


CALIBRATION_HIDDEN = (256, 1024, 2048)
"""Hidden sizes of the Llama-shaped models :func:`calibrate` times the engine on (2 blocks, vocabulary 4096)."""
CALIBRATION_TOKENS = (12, 48)
"""Tokens per record of the records :func:`calibrate` times the engine on (24 train, 8 validation, batches of 8)."""


def _engine_rates(hidden: int, tokens: int, seed: int = 0) -> dict:
    """The materialized engine's achieved rates on this CPU, FLOP/s by this module's own FLOP formulas: a random
    2-block Llama-shaped model of width ``hidden`` (float32), 24 train and 8 validation records of ``tokens``
    tokens, the attention projections in the factored layout; ``pass`` = :func:`pass_flops` of the train
    gradient pass over its seconds (one validation pass first warms up), ``algebra`` = :func:`gram_flops` of
    the Gram products K and P over theirs. ``tokens_per_batch`` is the batch's tokens (8 records)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .engine import gradient_pass

    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=(8 * hidden // 3) // 64 * 64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads // 4 if heads % 4 == 0 else heads,
                         vocab_size=4096,
                         max_position_embeddings=max(64, 2 * tokens), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)

    def records(n: int) -> list[Encoded]:
        ids = torch.randint(0, config.vocab_size, (n, tokens), generator=gen).tolist()
        return [Encoded(r, r) for r in ids]

    train, val = records(24), records(8)
    targets = select_targets(model, "attn")
    plan = materialized_plan(targets, train, val, False, "factored", 1e12)
    V, _ = gradient_pass(model, targets, val, 0, 8, "calibration", {t.name: "factored" for t in targets})
    start = time.perf_counter()
    G, _ = gradient_pass(model, targets, train, 0, 8, "calibration", {t.name: "factored" for t in targets})
    pass_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for t in targets:
        gram(G[t.name], G[t.name])
        gram(G[t.name], V[t.name])
    algebra_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    flops = sum(gram_flops(t, plan, len(train), 1, _tokens(train), _tokens(val)) for t in targets)
    return {"hidden": hidden, "tokens_per_batch": 8 * tokens,
            "pass": pass_flops(params, _tokens(train)) / pass_seconds, "algebra": flops / algebra_seconds}


def calibrate(hidden: tuple[int, ...] = CALIBRATION_HIDDEN, tokens: tuple[int, ...] = CALIBRATION_TOKENS) -> dict:
    """Time the engine on this CPU (:func:`_engine_rates` on every ``hidden`` x ``tokens`` shape, at torch's
    current thread count), store the record in :func:`calibration_path` and return it:
    ``{"engine": [{"hidden", "tokens_per_batch", "pass", "algebra"}, ...], "threads", "measured"}``."""
    doc = {"engine": [_engine_rates(h, t) for h in hidden for t in tokens], "threads": torch.get_num_threads(),
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, doc)
    return doc


def cpu_calibration() -> dict | None:
    """The stored :func:`calibrate` record, or None when none was made (or it is unreadable, or of an older kind)."""
    try:
        doc = json.loads(calibration_path().read_text(encoding="utf-8"))
        ok = all(float(p[k]) > 0 for p in doc["engine"] for k in ("hidden", "tokens_per_batch", "pass", "algebra"))
        return doc if ok and doc["engine"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def interpolate_rates(points: list[dict], hidden: float, tokens_per_batch: float) -> tuple[float, float]:
    """(pass, algebra) FLOP/s at a model width and batch size from the calibrated ``points``: inverse-distance
    weighting in (log hidden, log tokens per batch) of the nearest point on each side, clamped to the grid
    (a shape outside it takes the rate of its edge)."""
    def coord(p: dict) -> tuple[float, float]:
        return math.log(p["hidden"]), math.log(p["tokens_per_batch"])

    hs = sorted({p["hidden"] for p in points})
    ts = sorted({p["tokens_per_batch"] for p in points})
    x = math.log(min(max(hidden, hs[0]), hs[-1]))
    y = math.log(min(max(tokens_per_batch, ts[0]), ts[-1]))
    weights = []
    for p in points:
        px, py = coord(p)
        d = math.hypot(x - px, y - py)
        if d < 1e-12:
            return p["pass"], p["algebra"]
        weights.append((1.0 / d**2, p))
    total = sum(w for w, _ in weights)
    # geometric weighted means: rates vary by orders of magnitude with the shape
    return tuple(math.exp(sum(w * math.log(p[k]) for w, p in weights) / total) for k in ("pass", "algebra"))


def throughput(device: str, gpu: str, hidden: int = 1024, tokens_per_batch: float = 128.0
               ) -> tuple[tuple[float, float] | None, str]:
    """((FLOP/s of one process for the passes, for the per-sample algebra: Gram and streaming products), where
    the numbers come from); None when the CPU is not calibrated. On the CPU the rates are the calibrated
    engine's at the model's width ``hidden`` and the run's ``tokens_per_batch`` (:func:`interpolate_rates`)."""
    if device == "cuda":
        if gpu not in GPU_PEAK_FLOPS:
            raise UserError(f"unknown --gpu {gpu!r} (use {', '.join(GPU_PEAK_FLOPS)})")
        low, high = GPU_PEAK_FLOPS[gpu]
        return (low * GPU_EFFICIENCY, high * GPU_EFFICIENCY), (
            f"estimate: {gpu} stated peaks {low / 1e12:.0f} TFLOP/s bf16, {high / 1e12:.1f} FP64, "
            f"x {GPU_EFFICIENCY:.0%} efficiency")
    cal = cpu_calibration()
    if cal is None:
        return None, "CPU not calibrated: run `layerif plan --calibrate` once"
    rates = interpolate_rates(cal["engine"], hidden, tokens_per_batch)
    return rates, (f"estimate: the engine timed on this CPU, {rates[0] / 1e9:.1f} GFLOP/s passes, "
                   f"{rates[1] / 1e9:.1f} algebra at width {hidden}, {tokens_per_batch:.0f} tokens a batch "
                   f"({cal['threads']} threads, {cal['measured']})")


# ----------------------------------------------------------------------------- shapes and bytes


def model_bytes(model: nn.Module) -> dict[str, int]:
    """{dtype name: bytes} of the model's parameters and buffers (works on the ``meta`` device)."""
    out: Counter = Counter()
    for t in (*model.parameters(), *model.buffers()):
        out[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return dict(out)


def activation_bytes(model: nn.Module, batch_size: int, max_tokens: int) -> float:
    """An estimate of one batch's activations kept for the backward pass, bytes: per block 16 hidden-sized
    tensors per token at the model's dtype, and the float32 logits and their gradient."""
    emb = model.get_input_embeddings().weight
    vocab, hidden = emb.shape
    blocks = len(find_blocks(model)[1])
    tokens = batch_size * max_tokens
    return float(tokens * (16 * hidden * blocks * emb.element_size() + 2 * 4 * vocab))


def _tokens(records: list[Encoded]) -> int:
    return sum(len(e.input_ids) for e in records)


def pass_flops(params: int, tokens: int) -> float:
    """A forward+backward pass over ``tokens`` tokens: 6 x params x tokens FLOPs."""
    return 6.0 * params * tokens


def gram_flops(t: Projection, plan: MaterializedPlan, n: int, k: int, tokens_train: int, tokens_val: int) -> float:
    """FLOPs of one module's Gram products K = G G^T and P = G V^T by the layouts of ``plan``."""
    out_f, in_f = weight_out_in(t.module).shape
    in_f += getattr(t.module, "bias", None) is not None
    lt, lv = plan.layout_train[t.name][0], plan.layout_val[t.name][0]
    if lt == "dense":
        return 2.0 * n * (n + k) * t.numel
    K = 2.0 * tokens_train**2 * (in_f + out_f)
    P = 2.0 * tokens_train * tokens_val * (in_f + out_f) if lv == "factored" else 2.0 * tokens_train * in_f * out_f * k
    return K + P


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Machine:
    """The machine a plan is for: ``device`` cpu or cuda, its memory per process (bytes), processes, GPU kind."""

    device: str
    memory_bytes: float
    world_size: int = 1
    gpu: str = "H100"


def materialized_section(targets, train, val, per_val, layout, budget_bytes, params) -> dict:
    """The materialized engine's plan (or why it does not fit), its buffer bytes and FLOPs per stage."""
    try:
        plan = materialized_plan(targets, train, val, per_val, layout, budget_bytes)
    except UserError as exc:
        return {"fits": False, "reason": str(exc)}
    n, k, T_t, T_v = len(train), (len(val) if per_val else 1), _tokens(train), _tokens(val)
    groups = len(plan.groups)
    layouts = Counter(plan.layout_train[t.name][0] for t in targets)
    return {
        "fits": True, "groups": groups, "chunks": 1, "passes": plan.passes, "train_passes": groups,
        "layouts": dict(layouts),
        "buffers": {"per_group_bytes": plan.group_bytes(), "scratch_bytes": plan.scratch,
                    "gram_bytes_per_module": gram_bytes(n, k),
                    "total_allocated_bytes": sum(plan.cost.values())},
        "peak_buffer_bytes": max(plan.group_bytes()) + plan.scratch,
        "flops": {"validation passes": groups * pass_flops(params, T_v),
                  "train passes": groups * pass_flops(params, T_t),
                  "Gram products": sum(gram_flops(t, plan, n, k, T_t, T_v) for t in targets)},
    }


def streaming_section(targets, train, val, per_val, estimator, val_chunk, budget_bytes, params, world_size) -> dict:
    """The streaming engine's plan (or why it does not fit), its buffer bytes and FLOPs per stage."""
    rule = get_estimator(estimator)
    if not rule.streaming:
        return {"fits": False, "reason": f"estimator {estimator} has no streaming form"}
    n, weighted = len(train), rule.stream_weights is not None
    n_columns = len(val) if per_val else 1
    try:
        groups, chunk = streaming_plan(targets, n, n_columns, val_chunk, weighted, budget_bytes)
    except UserError as exc:
        return {"fits": False, "reason": str(exc)}
    ks = chunk_columns(n_columns, chunk)
    per_round = [[sum(streaming_bytes(t, n, k, weighted) for t in g) for k in ks] for g in groups]
    rounds = len(groups) * len(ks)
    train_passes = 3 if weighted else 1
    T_t, T_v = _tokens(train), _tokens(val)
    products = sum(2.0 * (train_passes * T_t + T_v) * t.numel * k for g in groups for t in g for k in ks)
    return {
        "fits": True, "groups": len(groups), "chunks": len(ks), "columns_per_chunk": chunk,
        "passes": rounds * (1 + train_passes), "train_passes": rounds * train_passes,
        "buffers": {"per_round_bytes": [b for row in per_round for b in row],
                    "total_allocated_bytes": sum(b for row in per_round for b in row)},
        "peak_buffer_bytes": max(b for row in per_round for b in row),
        "flops": {"validation passes": rounds * pass_flops(params, T_v) / world_size,
                  "train passes": rounds * train_passes * pass_flops(params, T_t) / world_size,
                  "dot products and weighted sums": products / world_size},
    }


def make_plan(model: nn.Module, train: list[Encoded], val: list[Encoded], machine: Machine,
              engine: EngineConfig = EngineConfig(), estimator: str = "datainf",
              budget_bytes: float | None = None) -> dict:
    """The plan of a scoring run (the plan.json document; bytes, FLOPs, seconds), for a model on any device,
    with the run's ``engine`` settings and ``estimator`` (its registry name).
    It fits when the chosen engine's buffers fit the budget and the model and the buffers fit the machine's
    memory (the activations are an estimate: exceeding it with them is a note, ``notes_memory``).
    ``budget_bytes``: the buffer budget when the caller has it already (a run on this machine), else
    :func:`layerif.engine.memory_budget` of ``engine.max_memory_gb`` on ``machine``.

    Keys: ``model`` (parameters, bytes by dtype, blocks), ``targets`` (modules and their shapes),
    ``records``, ``machine``, ``budget_bytes``, ``engines`` (both engines' plans), ``engine`` (the one
    ``mode`` chooses, or None when nothing fits), ``peak_bytes``, ``fits``, ``reason``, ``stages``
    (FLOPs and seconds per stage of the chosen engine) and ``seconds`` (None without a throughput).
    """
    targets = select_targets(model, engine.selector)
    params = sum(p.numel() for p in model.parameters())
    budget = budget_bytes if budget_bytes is not None else memory_budget(engine.max_memory_gb, machine.device,
                                                                         machine.memory_bytes)
    engines = {"materialized": materialized_section(targets, train, val, engine.per_val, engine.layout, budget, params),
               "streaming": streaming_section(targets, train, val, engine.per_val, estimator, engine.val_chunk, budget,
                                              params, machine.world_size)}
    if machine.world_size > 1:
        engines["materialized"] = {"fits": False, "reason": "the materialized engine runs in one process"}
    m = engines["materialized"]
    chosen = choose_mode(engine.mode, estimator, m["groups"] if m["fits"] else 10**9, machine.world_size)
    section = engines[chosen]
    max_tokens = max(len(e.input_ids) for e in (*train, *val))
    weights = model_bytes(model)
    activations = activation_bytes(model, engine.batch_size, max_tokens)
    hidden = model.get_input_embeddings().weight.shape[1]
    rate, source = throughput(machine.device, machine.gpu, hidden, engine.batch_size * _tokens(train) / len(train))
    doc: dict = {
        "model": {"parameters": params, "bytes_by_dtype": weights, "bytes": sum(weights.values()),
                  "blocks": len(find_blocks(model)[1])},
        "targets": {"selector": engine.selector, "modules": len(targets),
                    "shapes": dict(Counter(_shape(t) for t in targets))},
        "records": {"train": len(train), "validation": len(val), "train_tokens": _tokens(train),
                    "validation_tokens": _tokens(val), "max_tokens": max_tokens},
        "machine": {"device": machine.device, "memory_bytes": machine.memory_bytes, "world_size": machine.world_size,
                    **({"gpu": machine.gpu} if machine.device == "cuda" else {})},
        "budget_bytes": budget, "mode": engine.mode, "engine": chosen, "engines": engines,
        "activation_bytes_estimate": activations,
        "throughput_flops": ({"passes": rate[0], "algebra": rate[1]} if rate else None), "throughput_source": source,
    }
    if not section["fits"]:
        return doc | {"fits": False, "reason": section["reason"], "peak_bytes": None, "stages": {}, "seconds": None}
    held = sum(weights.values()) + section["peak_buffer_bytes"]  # known exactly; the activations are an estimate
    peak = held + activations
    stages = {name: {"flops": f, "seconds": (f / (rate[1] if name in ALGEBRA_STAGES else rate[0]) if rate else None)}
              for name, f in section["flops"].items()}
    fits = held <= machine.memory_bytes
    what = (f"(model {sum(weights.values()) / 1e9:.3g} GB, buffers {section['peak_buffer_bytes'] / 1e9:.3g} GB, "
            f"activations {activations / 1e9:.3g} GB estimated)")
    reason = "" if fits else f"the model and the buffers alone exceed the {machine.memory_bytes / 1e9:.3g} GB {what}"
    if sum(weights.values()) > machine.memory_bytes:
        reason += " (the model alone does not fit: a smaller --dtype, or a machine with more memory)"
    if fits and peak > machine.memory_bytes:
        doc["notes_memory"] = f"the estimated peak {peak / 1e9:.3g} GB {what} exceeds the {machine.device}'s memory"
    return doc | {"fits": fits, "reason": reason, "peak_bytes": peak, "stages": stages,
                  "seconds": (sum(s["seconds"] for s in stages.values()) if rate else None)}


def _shape(t: Projection) -> str:
    out_f, in_f = weight_out_in(t.module).shape
    return f"{t.name.split('.')[-1]} {out_f}x{in_f}"


def machine(device: str = "auto", gpu_memory_gb: float | None = None, world_size: int = 1,
            gpu: str = "H100") -> Machine:
    """The :class:`Machine` of the ``--device``, ``--gpu-memory``, ``--world-size`` and ``--gpu`` options
    (``auto``: this machine's kind; a GPU's memory defaults to this machine's first GPU, a CPU's to its RAM)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        device = "cuda"
    elif device != "cpu":
        raise UserError(f"unknown device {device!r} (use auto, cpu or cuda)")
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1 (got {world_size})")
    if gpu not in GPU_PEAK_FLOPS:  # checked on any device: a misspelt name is never ignored silently
        raise UserError(f"unknown --gpu {gpu!r} (use {', '.join(GPU_PEAK_FLOPS)})")
    if gpu_memory_gb is not None and not 0 < gpu_memory_gb < math.inf:
        raise UserError(f"--gpu-memory must be > 0 GB (got {gpu_memory_gb})")
    if device == "cpu":
        return Machine("cpu", ram_bytes(), world_size, gpu)
    if gpu_memory_gb is None:
        if not torch.cuda.is_available():
            raise UserError("--device cuda on a machine without a GPU: give its memory with --gpu-memory GB")
        return Machine("cuda", float(torch.cuda.get_device_properties(0).total_memory), world_size, gpu)
    return Machine("cuda", gpu_memory_gb * 1e9, world_size, gpu)


def plan_of(args, where: Machine) -> dict:
    """:func:`make_plan` of a scoring command's arguments (``ScoreArgs``' model, data, engine and memory
    options) without any weight: the config (:func:`layerif.models.load_config`), the records tokenized
    for their lengths (a folder without a tokenizer is measured with the embedded default's, and says so
    in ``notes``), the model on the ``meta`` device."""
    config, tokenizer, label = load_config(args.model, args.gguf_file, args.trust_remote_code)
    notes = []
    if tokenizer is None:
        tokenizer = load_config()[1]
        notes.append(f"{label} has no tokenizer: the records were measured with the embedded default's")
    train, val, task, counts = load_splits(args, tokenizer, context_length(config))
    dtype = resolve_dtype(args.dtype, torch.device(where.device))
    model = meta_model(config, dtype, args.trust_remote_code)
    config = score_config(args)
    doc = make_plan(model, train, val, where, config.engine, config.estimator.name)
    if getattr(args, "split_half", False):
        notes.append("--split-half scores each half again (two more runs on half the records; not in the estimate)")
    return {"model_name": label, "dtype": str(dtype).removeprefix("torch."), "task": task} | doc | {"notes": notes}


def refusal(doc: dict) -> str:
    """The one line that stops a run whose plan does not fit, saying what to change."""
    return (f"the run does not fit: {doc['reason']} -- change --max-memory, --mode streaming, --target (fewer "
            f"modules) or --world-size (see `layerif plan`)")


def fit_check(args, where: Machine) -> PlanCheck:
    """A :data:`layerif.scores.PlanCheck` for ``layerif score``: the plan of ``args`` on ``where`` from the
    config and the tokenized records, a :class:`UserError` (:func:`refusal`) when it does not fit."""
    def check(config, train: list[Encoded], val: list[Encoded]) -> None:
        if args.target == "lora" or args.device_map:  # adapters exist only with the weights; a map offloads
            return
        try:
            model = meta_model(config, resolve_dtype(args.dtype, torch.device(where.device)), args.trust_remote_code)
        except UserError:  # a config the meta device cannot build: the run itself will say what is wrong
            return
        config = score_config(args)
        doc = make_plan(model, train, val, where, config.engine, config.estimator.name,
                        budget_bytes=memory_budget(args.max_memory))  # the run's own budget on this machine
        if not doc["fits"]:
            raise UserError(refusal(doc))
    return check
