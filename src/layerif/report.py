"""report.md and report.html of a result folder: what was run, the tables, the pictures, a plain reading.

:func:`render_report` re-reads the folder's own files -- ``config.json`` (the
command and every argument) and the command's results (``scores.json``,
``comparison.json``, ``estimators.json``, ``validation.json``; any other command's ``*.md``, ``*.csv``
and pictures) -- so a report can be re-rendered at any time (``layerif report
DIR``) and never disagrees with the files beside it. The Markdown links the
pictures; the HTML embeds them (base64), so it is one self-contained file.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .command_registry import COMMANDS, check_config_args
from .command_registry import defaults as command_defaults
from .data import records_note
from .errors import UserError
from .io import write_text
from .results import read_config, read_json, read_scores
from .stability import CONDITIONAL, fmt, top_k_blocks

REPORT_FILES = ("report.md", "report.html")


# ----------------------------------------------------------------------------- document model


@dataclass
class Block:
    """One piece of a report: ``h`` (level, text), ``p`` (text with `code`), ``code``, ``raw`` (Markdown from
    another file: verbatim in report.md, preformatted in HTML), ``table`` (headers, rows), ``img`` (file, caption)."""

    kind: str
    text: str = ""
    level: int = 2
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: str = ""  # img: the picture's file name inside the folder


def _h(text: str, level: int = 2) -> Block:
    return Block("h", text, level)


def _p(text: str) -> Block:
    return Block("p", text)


def _code(text: str) -> Block:
    return Block("code", text)


def _table(headers: list[str], rows: list[list]) -> Block:
    return Block("table", headers=headers, rows=[[str(c) for c in r] for r in rows])


def _img(name: str, caption: str) -> Block:
    return Block("img", text=caption, path=name)


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h":
            out.append(f"{'#' * b.level} {b.text}")
        elif b.kind in ("p", "raw"):
            out.append(b.text)
        elif b.kind == "code":
            out.append(f"```\n{b.text}\n```")
        elif b.kind == "table":
            cell = lambda s: s.replace("|", "\\|")  # noqa: E731
            out.append("\n".join([f"| {' | '.join(map(cell, b.headers))} |", f"|{'---|' * len(b.headers)}",
                                  *(f"| {' | '.join(map(cell, r))} |" for r in b.rows)]))
        else:
            out.append(f"![{b.text}]({b.path})\n\n*{b.text}*")
    return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;font-size:.9rem}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}"
        "th{background:#f0f0f0}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;white-space:pre-wrap}"
        "img{max-width:100%}figcaption{font-style:italic;font-size:.9rem}")


def _inline(text: str) -> str:
    """HTML of a paragraph: escaped, with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def to_html(blocks: list[Block], folder: Path, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind == "h":
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind in ("code", "raw"):
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            data = base64.b64encode((folder / b.path).read_bytes()).decode("ascii")
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b.text)}'>"
                       f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- helpers


def block_ranges(blocks: list[int]) -> str:
    """'3, 7–9 and 12' for blocks [12, 7, 8, 9, 3]."""
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    parts = [f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def stability_word(rho: float | None) -> str:
    """Plain words for a rank correlation used as a stability figure."""
    if rho is None:
        return "undefined (a constant ranking)"
    if rho >= 0.9:
        return "stable"
    if rho >= 0.75:
        return "fairly stable"
    if rho >= 0.5:
        return "only moderately stable"
    return "unstable"


def _read_config(path: Path) -> dict:
    """A result folder's config.json, its options checked against the command's fields (when it is registered)."""
    doc = read_config(path)
    command = COMMANDS.get(doc.get("command"))
    if command is not None:
        check_config_args(doc["args"], command.args, str(path))
    return doc


def command_line(config: dict) -> str:
    """The shell command that reruns a config.json: ``layerif CMD`` plus every option that differs from its default.

    Lists are comma-joined, booleans become ``--flag``/``--no-flag``; arguments the
    command does not offer (an older config) are left out; when the command is
    unknown (its module not imported), every argument is spelled out. ``--config`` replays
    everything, these included.
    """
    command = config.get("command", "?")
    defaults = command_defaults(command)
    parts = ["layerif", command]
    for name, value in config.get("args", {}).items():
        if value is None or (defaults is not None and (name not in defaults or defaults[name] == value)):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _run_section(folder: Path, config: dict | None) -> list[Block]:
    if config is None:
        return [_h("What was run"), _p("No config.json in this folder: the run cannot be replayed from here.")]
    out = config.get("args", {}).get("out")  # where the result lands (it is rendered in a staging folder)
    where = Path(out) if isinstance(out, str) else folder
    return [
        _h("What was run"),
        _code(command_line(config)),
        _p(f"Replay exactly (same machine, seeded): `layerif {config.get('command', '?')} --config "
           f"{where / 'config.json'}` (with `--out` to write elsewhere). layerif {config.get('version', '?')}."),
        _code(json.dumps(config.get("args", {}), indent=2)),
    ]


# ----------------------------------------------------------------------------- layerif score


def score_reading(doc: dict) -> list[str]:
    """Plain-language paragraphs on one scores.json: where the helpful influence sits, and how sure that is."""
    layers, s = doc["layers"], doc["score"]
    stab = doc.get("stability") or {}
    total = sum(s)
    if total <= 0:
        return ["No block has helpful influence (every S_l is 0): no train sample lowers the validation loss "
                "through these modules, so there is no ranking to act on."]
    boot, half = stab.get("bootstrap"), stab.get("split_half")
    # the stability checks' k; else a quarter of the blocks, at most 5; never all blocks
    k = max(1, min((boot or half or {}).get("top_k", min(5, len(layers) // 4)), len(layers) - 1))
    top = top_k_blocks(layers, s, k)
    share = sum(s[layers.index(l)] for l in top) / total
    held = (f"{100 * share:.0f}% of the total S in {k} of {len(layers)} blocks (an even spread would give "
            f"{100 * k / len(layers):.0f}%); block {top[0]} alone holds {100 * s[layers.index(top[0])] / total:.0f}%.")
    if share > 0.5:
        out = [f"Blocks {block_ranges(top)} carry most helpful influence for task {doc.get('task')}: {held}"]
    else:
        out = [f"Helpful influence for task {doc.get('task')} is spread out; the top blocks, {block_ranges(top)}, "
               f"hold {held}"]
    if boot:
        rho = boot["rank_stability"]
        sure = [l for l, p in zip(boot["layers"], boot["p_top_k"]) if p >= 0.9]
        unsure = [(l, p) for l, p in zip(boot["layers"], boot["p_top_k"]) if 0.1 <= p < 0.9]
        text = (f"The ranking is {stability_word(rho)} ({fmt(rho, 2)}: mean Spearman correlation of {boot['B']} "
                f"bootstrap resamples of the train records with the full-data ranking, {CONDITIONAL}).")
        if sure:
            text += f" Blocks {block_ranges(sure)} are in the top {k} in at least 90% of the resamples."
        if unsure:
            text += " Uncertain top-{} membership: {}.".format(
                k, ", ".join(f"block {l} ({100 * p:.0f}%)" for l, p in sorted(unsure, key=lambda x: -x[1])))
        out.append(text)
    if half:
        out.append(f"Two disjoint halves of the train records ({half['n_half']} each), scored separately, rank the "
                   f"blocks alike at Spearman {fmt(half['spearman'], 2)} (projected to the full size: "
                   f"{fmt(half['spearman_brown'], 2)}, {stability_word(half['spearman_brown'])}); their top {k} blocks "
                   f"share {100 * half['top_k_overlap']:.0f}%.")
    if boot and half:
        out.append("The bootstrap keeps the estimator's damping and Hessian approximation fixed at their full-data "
                   "values; the split-half check re-estimates them, so where the two disagree, trust the split-half.")
    if not (boot or half):
        out.append("No stability check was run: before pruning or allocating by this ranking, rerun with "
                   "`--bootstrap 200 --split-half`.")
    return out


def validate_command(score_args: dict) -> str:
    """The ``layerif validate`` line that checks a score run's profile: its model, data and target.

    ``score_args``: the run's options (config.json ``args``). ``--target lora`` becomes the adapted modules
    (validate trains and prunes the base projections)."""
    a = score_args
    target = a.get("target")
    if target == "lora":
        target = ",".join(a.get("lora_modules") or ["q_proj", "v_proj"])
    parts = ["layerif", "validate"]
    for flag, value in (("--model", a.get("model")), ("--gguf-file", a.get("gguf_file")),
                        ("--task", None if a.get("train") else a.get("task")), ("--train", a.get("train")),
                        ("--val", a.get("val")), ("--target", target)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts + (["--trust-remote-code"] if a.get("trust_remote_code") else []))


def profile_uses(score_args: dict) -> list[str]:
    """What a block profile of ``layerif score`` is evidence for, on the evidence layerif has (``layerif validate``
    on the embedded model), and the command that checks it on the run's own model and task (:func:`validate_command`).

    The one text of report.md / report.html and of the terminal summary of ``layerif score``."""
    return [
        "Supported use: choosing the blocks, and the LoRA capacity per block, to fine-tune (`layerif finetune`, "
        "`layerif moe`). On SmolLM2-135M-Instruct, `layerif validate` found that S_l predicts each block's measured "
        "fine-tune gain (Spearman ρ 0.57–0.92 over estimators and two tasks).",
        "Not supported by evidence: pruning sparsity per block (`layerif prune --allocation layerif`). There S_l did "
        "not predict the cost of pruning a block (loss rise, accuracy change).",
        f"Check both on this model and task: `{validate_command(score_args)}`",
    ]


def _score_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    doc = read_scores(folder)
    stab = doc.get("stability") or {}
    boot, half = stab.get("bootstrap"), stab.get("split_half")
    title = f"layerif score: {doc.get('model')} on {doc.get('task')}"
    run_args = config.get("args", {}) if config else {"task": doc.get("task"), "target": doc.get("target")}
    blocks = [_h(title, 1), _h("Reading"), *map(_p, score_reading(doc)),
              _h("What this profile is evidence for"), *map(_p, profile_uses(run_args)), *_run_section(folder, config)]
    agg = doc.get("aggregations", {})
    headers = ["block", "S_l"]
    if boot:
        headers += [f"{100 * boot['level']:.0f}% interval", "relative width", f"P(top-{boot['top_k']})"]
    headers += ["helpful samples", "sum of I_l"]
    rows = []
    for i, l in enumerate(doc["layers"]):
        row = [l, fmt(doc["score"][i])]
        if boot:
            row += [f"{fmt(boot['ci_low'][i])} – {fmt(boot['ci_high'][i])}", fmt(boot["rel_width"][i], 2),
                    f"{boot['p_top_k'][i]:.2f}"]
        share = agg.get("helpful_share", [None] * len(doc["layers"]))[i]
        row += ["n/a" if share is None else f"{100 * share:.0f}%", fmt(agg.get("sum", [None] * len(doc["layers"]))[i])]
        rows.append(row)
    blocks += [_h("Layer scores"),
               _p("S_l = −Σ_i min(I_l(i), 0), the total helpful influence of the train records through block l "
                  "(larger = more important for this task)."),
               _table(headers, rows)]
    if (folder / "layer_scores.png").exists():
        blocks.append(_img("layer_scores.png", "S_l per block" + (" with bootstrap intervals" if boot else "")))
    if boot or half:
        blocks.append(_h("Stability"))
        if boot:
            lo, hi = boot["rank_stability_ci"]
            blocks.append(_p(f"Bootstrap: B = {boot['B']} resamples of the train records"
                             f"{' and validation records' if boot['resample_val'] else ''} (seed {boot['seed']}); rank "
                             f"stability {fmt(boot['rank_stability'], 3)} (middle {100 * boot['level']:.0f}% of resamples "
                             f"{fmt(lo, 3)} – {fmt(hi, 3)}; {CONDITIONAL}); full-data top {boot['top_k']}: {boot['top_k_blocks']}."))
        if half:
            blocks += [_p(f"Split-half ({half['method']}): halves of {half['n_half']} train records, seed {half['seed']}; "
                          f"Spearman {fmt(half['spearman'], 3)}, Spearman–Brown {fmt(half['spearman_brown'], 3)}, "
                          f"Pearson {fmt(half['pearson'], 3)}, top-{half['top_k']} overlap {half['top_k_overlap']:.2f}."),
                       _table(["block", "S_l (half A)", "S_l (half B)"],
                              [[l, fmt(a), fmt(b)] for l, a, b in zip(half["layers"], half["score_a"], half["score_b"])])]
        if (folder / "stability.png").exists():
            blocks.append(_img("stability.png", "bootstrap top-k probabilities and split-half profiles"))
    lam = list(doc.get("lambda", {}).values())
    facts = [["model", doc.get("model")], ["task", doc.get("task")], ["target", doc.get("target")],
             ["estimator", doc.get("estimator")], ["damping scale c", doc.get("damping_scale")],
             ["records", records_note(doc["records"]) if isinstance(doc.get("records"), dict)
              else f"{doc.get('n_train')} train × {doc.get('n_val')} validation"],
             ["λ over modules", f"{fmt(min(lam))} – {fmt(max(lam))}" if lam else "n/a"],
             ["mode, passes, seconds", f"{doc.get('mode')}, {doc.get('passes')}, {doc.get('seconds')}"]]
    blocks += [_h("Run facts"), _table(["", ""], facts)]
    return title, blocks


# ----------------------------------------------------------------------------- compare-tasks


def _compare_tasks_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    doc = read_json(folder / "comparison.json")
    tasks, layers = doc["tasks"], doc["layers"]
    title = f"layerif compare-tasks: {doc.get('model')} on {', '.join(tasks)}"
    rho = doc["spearman"]
    pairs = sorted(((rho[i][j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))),
                   key=lambda x: -(x[0] if x[0] is not None else -2))
    reading = []
    if len(pairs) == 1:
        reading.append(f"Tasks {pairs[0][1]} and {pairs[0][2]} rank the blocks at Spearman {fmt(pairs[0][0], 2)} "
                       "(1: the same order, 0: unrelated, −1: reversed).")
    elif pairs:
        best, worst = pairs[0], pairs[-1]
        reading.append(f"Most alike: {best[1]} and {best[2]} (Spearman {fmt(best[0], 2)}); most different: {worst[1]} "
                       f"and {worst[2]} (Spearman {fmt(worst[0], 2)}).")
    diff = doc.get("differing_blocks", [])
    if diff:
        reading.append("Blocks that differ most between tasks (share of each task's total S): " + "; ".join(
            f"block {d['block']} ({100 * d['share'][d['max_task']]:.0f}% in {d['max_task']} vs "
            f"{100 * d['share'][d['min_task']]:.0f}% in {d['min_task']})" for d in diff[:3]) + ".")
    cvw = [c for c in doc.get("cross_vs_within", []) if c["ceiling"] is not None and c["spearman"] is not None]
    if cvw:
        below = [c for c in cvw if c["spearman"] < c["ceiling"] - 0.1]
        reading.append("Against each task's own noise: two tasks with the same underlying profile would correlate at "
                       "about √(r_a r_b), where r is a task's recomputed split-half Spearman, Spearman–Brown corrected "
                       "to the full size. " + "; ".join(
                           f"{c['a']}–{c['b']} {fmt(c['spearman'], 2)} vs {fmt(c['ceiling'], 2)}" for c in cvw) + ". "
                       + (("Well below (by > 0.1), so a real task difference beyond sampling noise: "
                           + ", ".join(f"{c['a']}–{c['b']}" for c in below) + ".") if below else
                          "No pair is more than 0.1 below its bound: the profiles do not differ beyond sampling noise."))
    else:
        reading.append("No within-task split-half reliability was measured (it is on by default; `--no-split-half` "
                       "turns it off): without it a low cross-task correlation may be sampling noise rather than a "
                       "task difference.")
    stab = {t: s for t, s in doc.get("rank_stability", {}).items() if s is not None}
    if stab:
        reading.append(f"Bootstrap rank stability ({CONDITIONAL}; it resamples only which samples are summed, so it "
                       "is biased toward 1 and is not comparable with the cross-task Spearman): "
                       + ", ".join(f"{t} {s:.2f}" for t, s in stab.items()) + ".")
    blocks = [_h(title, 1), _h("Reading"), *map(_p, reading), *_run_section(folder, config),
              _h("Share of S per block and task"),
              _p("Each task's S_l divided by its sum over blocks, so tasks with different loss scales compare."),
              _table(["block", *tasks], [[l, *(f"{100 * doc['share'][t][i]:.1f}%" for t in tasks)]
                                         for i, l in enumerate(layers)])]
    if (folder / "task_heatmap.png").exists():
        blocks.append(_img("task_heatmap.png", "block × task heatmap of the share of S"))
    blocks += [_h("Pairwise Spearman correlation of the block rankings"),
               _table(["", *tasks], [[t, *(fmt(x, 3) for x in rho[i])] for i, t in enumerate(tasks)])]
    if diff:
        blocks += [_h("Blocks that differ most"),
                   _table(["block", "spread", "highest", "lowest"],
                          [[d["block"], f"{100 * d['spread']:.1f} pts", d["max_task"], d["min_task"]] for d in diff])]
    if cvw:
        blocks += [_h("Cross-task Spearman against within-task reliability"),
                   _p("r: the task's recomputed split-half Spearman (each half scored with its own λ and Hessian "
                      "approximation), Spearman–Brown corrected; bound √(r_a r_b): the correlation two tasks with the "
                      "same profile would show; disattenuated: Spearman / bound."),
                   _table(["task a", "task b", "Spearman", "r_a", "r_b", "bound", "disattenuated"],
                          [[c["a"], c["b"], fmt(c["spearman"], 3), fmt(c["within_a"], 3), fmt(c["within_b"], 3),
                            fmt(c["ceiling"], 3), fmt(c["disattenuated"], 3)] for c in cvw])]
    blocks += [_h("Per-task results"),
               _p(", ".join(f"{t}: `{doc['folders'][t]}/report.md`" for t in tasks))]
    return title, blocks


# ----------------------------------------------------------------------------- compare-estimators


def _compare_estimators_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    doc = read_json(folder / "estimators.json")
    names, layers = doc["estimators"], doc["layers"]
    title = f"layerif compare-estimators: {doc.get('model')} on {doc.get('task')}"
    pairs = doc["pairs"]
    reading = []
    if pairs:
        srt = sorted(pairs, key=lambda p: -(p["spearman"] if p["spearman"] is not None else -2))
        reading.append(f"Closest: {srt[0]['a']} and {srt[0]['b']} rank the blocks at Spearman {fmt(srt[0]['spearman'], 2)}; "
                       f"furthest: {srt[-1]['a']} and {srt[-1]['b']} at {fmt(srt[-1]['spearman'], 2)}. "
                       "Where estimators disagree, the choice of method changes which blocks look important.")
    rho = {frozenset((p["a"], p["b"])): p["spearman"] for p in pairs}
    di_ex, di_gd = rho.get(frozenset(("datainf", "exact"))), rho.get(frozenset(("datainf", "grad-dot")))
    if di_ex is not None and di_gd is not None and di_gd > di_ex:
        reading.append(f"DataInf ranks the blocks more like grad-dot ({fmt(di_gd, 2)}) than like the exact inverse "
                       f"({fmt(di_ex, 2)}): at this damping its curvature correction is small next to its "
                       "gradient-product term, so it behaves mostly as a rescaled grad-dot.")
    bound = doc.get("datainf_bound")
    if bound:
        worst = max(bound)
        reading.append(f"DataInf vs exact, guaranteed: λ‖E − D‖ ≤ β with β up to {fmt(worst, 3)} across blocks "
                       + ("— small, so DataInf must track the exact estimator closely here."
                          if worst < 0.1 else
                          "— the bound gives no guarantee at this size (β ≈ parameter count / damping scale); "
                          "only the measured agreement below tells how close they are."))
    stab = doc.get("rank_stability") or {}
    if any(v is not None for v in stab.values()):
        reading.append(f"Own rank stability (bootstrap, {CONDITIONAL}): " + ", ".join(f"{e} {fmt(v, 2)}" for e, v in stab.items())
                       + ".")
    blocks = [_h(title, 1), _h("Reading"), *map(_p, reading), *_run_section(folder, config),
              _h("Scores per estimator"),
              _table(["block", *names], [[l, *(fmt(doc["score"][e][i]) for e in names)] for i, l in enumerate(layers)])]
    if (folder / "estimators.png").exists():
        blocks.append(_img("estimators.png", "normalized block profiles per estimator and their rank agreement"))
    k = doc["top_k"]
    blocks += [_h("Agreement between estimators"),
               _p(f"Correlations of the block scores S_l across blocks; top-{k} overlap = shared share of the two "
                  f"top-{k} sets; sample-level = mean over blocks of the Spearman correlation of the per-sample "
                  "influences I_l(i)."),
               _table(["estimator", "estimator", "Spearman", "Pearson", f"top-{k} overlap", "sample-level Spearman"],
                      [[p["a"], p["b"], fmt(p["spearman"], 3), fmt(p["pearson"], 3), f"{p['top_k_overlap']:.2f}",
                        fmt(p["sample_spearman"], 3)] for p in pairs])]
    half = doc.get("split_half") or {}
    if stab or half:
        blocks += [_h("Stability per estimator"),
                   _table(["estimator", f"bootstrap rank stability ({CONDITIONAL})", "split-half Spearman", "split-half Spearman–Brown"],
                          [[e, fmt(stab.get(e), 3), fmt((half.get(e) or {}).get("spearman"), 3),
                            fmt((half.get(e) or {}).get("spearman_brown"), 3)] for e in names])]
    if (folder / "validation.json").exists():
        vdoc = read_json(folder / "validation.json")
        blocks += [_h("Ground truth (--validate)"), *map(_p, validation_reading(vdoc)), *_validation_table(folder, vdoc)]
    if doc.get("notes"):
        blocks += [_h("Notes"), *map(_p, doc["notes"])]
    return title, blocks


# ----------------------------------------------------------------------------- any other command


def _generic_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    title = f"layerif {config.get('command', 'results') if config else 'results'}: {folder.name}"
    blocks = [_h(title, 1), *_run_section(folder, config)]
    for md in sorted(folder.glob("*.md")):
        if md.name not in REPORT_FILES:
            blocks += [_h(md.name), Block("raw", md.read_text(encoding="utf-8").strip())]
    for path in sorted(folder.glob("*.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            blocks += [_h(path.name), _table(rows[0], rows[1:51])]
            if len(rows) > 51:
                blocks.append(_p(f"({len(rows) - 51} more rows in `{path.name}`)"))
    for img in sorted(folder.glob("*.png")):
        blocks.append(_img(img.name, img.stem.replace("_", " ")))
    return title, blocks


# ----------------------------------------------------------------------------- validate

TRUTHS = ("fine_tune_gain", "prune_loss_rise", "prune_accuracy_change")
IN_SAMPLE_TRUTHS = ("fine_tune_gain_in_sample", "prune_loss_rise_in_sample")  # validate --in-sample
TRUTH_LABEL = {"fine_tune_gain": "fine-tune gain", "prune_loss_rise": "pruning loss rise",
               "prune_accuracy_change": "pruning accuracy change",
               "fine_tune_gain_in_sample": "fine-tune gain (in sample)",
               "prune_loss_rise_in_sample": "pruning loss rise (in sample)"}
ESTIMATOR_LABEL = {"datainf": "DataInf", "exact": "exact", "grad-dot": "grad-dot", "lissa": "LiSSA"}


def validation_truths(doc: dict) -> dict[str, list[float] | None]:
    """The ground truths of a validation.json by name: :data:`TRUTHS` (``prune_accuracy_change`` None without an
    accuracy task), then :data:`IN_SAMPLE_TRUTHS` when the in-sample reading was measured."""
    ps = doc["prune_sensitivity"]
    out = {"fine_tune_gain": doc["fine_tune_gain"], "prune_loss_rise": ps["loss_rise"],
           "prune_accuracy_change": ps["accuracy_change"]}
    inside = doc.get("in_sample")
    if inside:
        out |= dict(zip(IN_SAMPLE_TRUTHS, (inside["fine_tune_gain"], inside["prune_sensitivity"]["loss_rise"])))
    return out


def sample_note(doc: dict) -> str:
    """Which records the ground truth of a validation.json was measured on, in words ('' for a file written before
    the out-of-sample reading, which was in sample)."""
    if "records" not in doc:
        return ""
    return (f"Ground truth out of sample: fine-tuned on {doc['gt_n_train']} train and measured on {doc['gt_n_val']} "
            f"validation records disjoint from the {doc['n_train']} × {doc['n_val']} scoring records"
            + ("; in sample (trained and measured on the scoring records) beside it" if doc.get("in_sample") else "")
            + ".")


def spearman_rows(doc: dict) -> list[list]:
    """Rows estimator, aggregation, ground truth, rho, low, high, claimed sign, verdict."""
    rows = []
    for e, aggs in doc["spearman"].items():
        for a, per in aggs.items():
            for g, r in per.items():
                rows.append([e, a, g, r["rho"], r["ci_low"], r["ci_high"], r["claimed_sign"], r["verdict"]])
    return rows


GAIN_READING = {"as claimed": ("predicts fine-tune gain", ""),
                "opposite": ("predicts the opposite of fine-tune gain", ", the interval on the other side of 0"),
                "inconclusive": ("neither predicts nor contradicts fine-tune gain", ", the interval includes 0"),
                "undefined": ("has no defined correlation with fine-tune gain", "")}
"""How the score/validate reading states each verdict of ρ(S_l, fine-tune gain) (:func:`layerif.validate.verdict`):
(the claim, a note after the interval)."""


def validation_reading(doc: dict) -> list[str]:
    """Plain-language verdicts of a validation.json, for the report and the terminal."""
    sp = doc["spearman"]
    names = doc["estimators"]

    def cell(e: str, g: str, a: str = "score") -> str:
        r = sp[e][a].get(g)
        return "n/a" if r is None else f"ρ = {fmt(r['rho'], 2)} [{fmt(r['ci_low'], 2)}, {fmt(r['ci_high'], 2)}]"

    def gain(e: str) -> str:
        r = sp[e]["score"].get("fine_tune_gain")
        claim, note = GAIN_READING.get(r["verdict"] if r else "undefined", GAIN_READING["inconclusive"])
        return f"{ESTIMATOR_LABEL.get(e, e)}'s S_l {claim} at {cell(e, 'fine_tune_gain')}{note}"

    inside = (" In sample (trained and measured on the scoring records): "
              + "; ".join(f"{ESTIMATOR_LABEL.get(e, e)} {cell(e, 'fine_tune_gain_in_sample')}" for e in names) + "."
              if doc.get("in_sample") else "")
    out = [("On this model and task, out of sample, " if "records" in doc else "On this model and task, ")
           + "; ".join(gain(e) for e in names)
           + f" (Spearman over {len(doc['layers'])} blocks, {100 * doc['bootstrap']['level']:.0f}% bootstrap "
           "interval over blocks; a profile that predicts fine-tune gain has ρ > 0: high S_l, large loss drop)."
           + inside]
    out.append("Pruning sensitivity: LayerIF's sparsity allocation prunes blocks with high S_l more, which assumes "
               "ρ(S_l, loss rise) < 0; measured "
               + "; ".join(f"{ESTIMATOR_LABEL.get(e, e)} {cell(e, 'prune_loss_rise')}" for e in names)
               + (". Accuracy change (claimed ρ > 0): "
                  + "; ".join(f"{ESTIMATOR_LABEL.get(e, e)} {cell(e, 'prune_accuracy_change')}" for e in names)
                  if doc["prune_sensitivity"]["accuracy_change"] is not None else "") + ".")
    verdicts = [(e, a, g, r["verdict"]) for e in names for a, per in sp[e].items() for g, r in per.items()]
    held = [f"{ESTIMATOR_LABEL.get(e, e)} {a} → {TRUTH_LABEL[g]}" for e, a, g, v in verdicts if v == "as claimed"]
    opposite = [f"{ESTIMATOR_LABEL.get(e, e)} {a} → {TRUTH_LABEL[g]}" for e, a, g, v in verdicts if v == "opposite"]
    out.append(("Intervals that exclude 0 on the claimed side: " + ", ".join(held) + "." if held else
                "No correlation's interval excludes 0 on the claimed side.")
               + (" On the opposite side: " + ", ".join(opposite) + "." if opposite else ""))
    out.append("A block profile is a ranking over few blocks: with about 30 blocks a Spearman interval is wide, and "
               "one model, task and record set is one case, not a general result.")
    return out


def _validation_table(folder: Path, doc: dict) -> list[Block]:
    """The Spearman table of a validation.json and its figure (validate and compare-estimators --validate)."""
    out = [_h("Spearman of scores with ground truth"),
           _table(["estimator", "aggregation", "ground truth", "ρ", "interval", "claimed", "verdict"],
                  [[ESTIMATOR_LABEL.get(e, e), a, TRUTH_LABEL[g], fmt(rho, 3), f"[{fmt(lo, 2)}, {fmt(hi, 2)}]",
                    "+" if c > 0 else "−", v] for e, a, g, rho, lo, hi, c, v in spearman_rows(doc)])]
    if (folder / "validation.png").exists():
        out.append(_img("validation.png", "S_l per estimator and the measured ground truths per block"))
    return out


def _validate_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    """The report of a validate folder: reading, run, Spearman table, figure, per-block table."""
    doc = read_json(folder / "validation.json")
    title = f"layerif validate: {doc.get('model')} on {doc.get('task')}"
    ft, pr, base = doc["fine_tune"], doc["pruning"], doc["base"]
    truths = validation_truths(doc)
    blocks = [_h(title, 1), _h("Reading"), *map(_p, validation_reading(doc)), *_run_section(folder, config),
              _h("What was measured"),
              *([_p(sample_note(doc) + f" {doc['records']['rule']}.")] if "records" in doc else []),
              _p(f"Fine-tune gain: only block l's `{doc['target']}` projections train, {ft['steps']} Adam steps of "
                 f"{ft['batch_size']} of the {doc.get('gt_n_train', doc['n_train'])} train records (seed {ft['seed']}, "
                 f"lr {ft['lr']:g} decaying linearly); gain = validation loss before − after (base "
                 f"{fmt(base['val_loss'])}, mean over {doc.get('gt_n_val', doc['n_val'])} records). Pruning "
                 f"sensitivity: every projection of block l alone pruned with "
                 f"{pr['method']} at {pr['sparsity']:g} (calibration {pr['n_calib']} × {pr['seqlen']} tokens of the "
                 "built-in corpus, dense activations), the rest dense; loss rise = pruned − dense"
                 + (f"; accuracy change on {pr['task_items']} multiple-choice items of {pr['accuracy_task']} (dense "
                    f"{fmt(base['accuracy'], 3)})" if pr["accuracy_task"] else "") + "."),
              _p("Signs: I_l(i) < 0 = up-weighting sample i lowers the validation loss (helpful); S_l = total "
                 "helpful influence. Claimed sign: + for S_l vs fine-tune gain, − for S_l vs pruning loss rise, + "
                 "vs accuracy change; the other way round for `sum` (negative = helpful); `mean_abs` as S_l. "
                 f"Intervals: {100 * doc['bootstrap']['level']:.0f}% percentile bootstrap over blocks "
                 f"(B = {doc['bootstrap']['B']})."),
              *_validation_table(folder, doc)]
    names = doc["estimators"]
    shown = [g for g in truths if g in TRUTHS or truths[g] is not None]
    blocks += [_h("Per block"),
               _table(["block", *(TRUTH_LABEL[g] for g in shown), *(f"S_l {ESTIMATOR_LABEL.get(e, e)}" for e in names)],
                      [[l, *(fmt((truths[g] or [None] * len(doc["layers"]))[i], 3) for g in shown),
                        *(fmt(doc["scores"][e]["score"][i], 3) for e in names)] for i, l in enumerate(doc["layers"])]),
               _p(f"Time: scores {doc['seconds']['scores']:.0f} s, fine-tuning {doc['seconds']['fine_tune']:.0f} s, "
                  f"pruning {doc['seconds']['prune']:.0f} s.")]
    return title, blocks


_RENDERERS = {"score": _score_blocks, "compare-tasks": _compare_tasks_blocks,
              "compare-estimators": _compare_estimators_blocks, "validate": _validate_blocks}


def render_report(out_dir: str | Path) -> tuple[str, str]:
    """(Markdown, HTML) of a result folder, from its files alone."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    config = _read_config(folder / "config.json") if (folder / "config.json").exists() else None
    command = config.get("command") if config else ("score" if (folder / "scores.json").exists() else None)
    if command is None:
        raise UserError(f"{folder} holds no layerif results (no config.json or scores.json)")
    title, blocks = _RENDERERS.get(command, _generic_blocks)(folder, config)
    return to_markdown(blocks), to_html(blocks, folder, title)


def write_report(out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into ``out_dir`` (atomically); returns their paths."""
    md, page = render_report(out_dir)
    folder = Path(out_dir)
    return write_text(folder / "report.md", md), write_text(folder / "report.html", page)
