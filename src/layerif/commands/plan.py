"""``layerif plan``: what a ``score`` run will cost (bytes, passes, an estimate of the time), computing nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import output_folder, overwrite_field, write_json
from ..options import (DataOptions, DataSource, EngineOptions, LissaOptions, MachineOptions, ModelOptions, RunOptions,
                       StabilityOptions, option)
from ..plan import calibrate, machine, plan_of, refusal
from ..results import write_config
from ..scores import validate
from .base import register


@dataclass
class PlanArgs(MachineOptions, LissaOptions, StabilityOptions, RunOptions, EngineOptions, DataOptions, DataSource,
               ModelOptions):
    """Plan a scoring run without running it: model bytes, modules, engine, memory plan, peak memory, time."""

    out: str = option("out/plan", "output folder (see README: output folders)")
    overwrite: bool = overwrite_field()


def _gb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e9:.3g} GB"


def _s(sec: float | None) -> str:
    if sec is None:
        return "-"
    return f"{sec:.3g} s" if sec < 120 else f"{sec / 60:.3g} min" if sec < 7200 else f"{sec / 3600:.3g} h"


def text(doc: dict) -> str:
    """The terminal summary of a plan document (:func:`layerif.plan.make_plan`)."""
    m, r, mach = doc["model"], doc["records"], doc["machine"]
    where = f"{mach['device']}" + (f" {mach['gpu']}" if mach["device"] == "cuda" else "")
    lines = [
        f"{doc['model_name']} · {m['parameters'] / 1e6:.1f} M parameters ({doc['dtype']}) · {m['blocks']} blocks · "
        f"weights {', '.join(f'{k} {_gb(v)}' for k, v in m['bytes_by_dtype'].items())}",
        f"targets {doc['targets']['selector']}: {doc['targets']['modules']} modules "
        f"({', '.join(f'{shape} x{count}' for shape, count in doc['targets']['shapes'].items())})",
        f"records: {r['train']} train ({r['train_tokens']} tokens) x {r['validation']} validation "
        f"({r['validation_tokens']} tokens), longest {r['max_tokens']}",
        f"machine: {where}, {_gb(mach['memory_bytes'])}, {mach['world_size']} process(es); budget "
        f"{_gb(doc['budget_bytes'])} of buffers",
    ]
    for name, e in doc["engines"].items():
        mark = "*" if name == doc["engine"] else " "
        if not e["fits"]:
            lines.append(f"{mark} {name:<12} does not fit: {e['reason']}")
            continue
        extra = f", layouts {e['layouts']}" if "layouts" in e else f", {e['columns_per_chunk']} column(s) a chunk"
        lines.append(f"{mark} {name:<12} {e['groups']} group(s) x {e['chunks']} chunk(s), {e['passes']} passes "
                     f"({e['train_passes']} over the train records), buffers at most {_gb(e['peak_buffer_bytes'])}"
                     f"{extra}")
    if doc["fits"]:
        lines.append(f"engine ({doc['mode']}): {doc['engine']} · peak {_gb(doc['peak_bytes'])} (model + buffers + "
                     f"activations {_gb(doc['activation_bytes_estimate'])} estimated)")
        for name, st in doc["stages"].items():
            lines.append(f"  {name:<32} {st['flops']:.3g} FLOPs  {_s(st['seconds'])}")
        lines.append(f"  {'total':<32} {'':>12}  {_s(doc['seconds'])}   ({doc['throughput_source']})")
    lines += [f"note: {n}" for n in (doc["notes"] + ([doc["notes_memory"]] if "notes_memory" in doc else []))]
    return "\n".join(lines)


def run(args: PlanArgs) -> str:
    """``layerif plan`` (and ``score --dry-run``): plan, write plan.json and config.json into --out, return the
    summary; a plan that does not fit is a one-line :class:`UserError` (exit 2)."""
    validate(args, "plan")
    where = machine(args.device, args.gpu_memory, args.world_size, args.gpu)
    head = ""
    if args.calibrate:
        cal = calibrate()
        head = "".join(f"calibrated: width {p['hidden']}, {p['tokens_per_batch']} tokens a batch: passes "
                       f"{p['pass'] / 1e9:.1f} GFLOP/s, Gram products {p['algebra'] / 1e9:.1f}\n"
                       for p in cal["engine"]) + f"(on {cal['threads']} thread(s))\n"
    doc = plan_of(args, where)
    if not doc["fits"]:
        raise UserError(refusal(doc))
    with output_folder(args.out, "plan", args.overwrite) as tmp:
        write_json(tmp / "plan.json", doc)
        write_config(tmp, "plan", args)
    return head + text(doc) + f"\nwrote {Path(args.out)}/plan.json"


register("plan", PlanArgs, run, "plan a scoring run: bytes, passes, engine and a time estimate (nothing computed)")
