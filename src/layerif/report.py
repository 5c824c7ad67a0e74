"""report.md and report.html of a result folder: the document model (:class:`Block`, Markdown, HTML) and the
parts every report shares (what was run, the replayable command line).

:func:`render_report` re-reads the folder's own files -- ``config.json`` (the
command and every argument) and the command's results -- so a report can be re-rendered at any time
(``layerif report DIR``) and never disagrees with the files beside it. Each command renders its own
results: its renderer is part of its registration (:class:`layerif.command_registry.Command` ``report``,
e.g. ``layerif.commands.score``); a command without one (or not imported) gets the generic report, which
lists the folder's ``*.md``, ``*.csv`` and pictures. The Markdown links the
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
from .errors import UserError
from .io import write_text
from .results import read_config

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


def heading(text: str, level: int = 2) -> Block:
    return Block("h", text, level)


def paragraph(text: str) -> Block:
    return Block("p", text)


def code_block(text: str) -> Block:
    return Block("code", text)


def table_block(headers: list[str], rows: list[list]) -> Block:
    return Block("table", headers=headers, rows=[[str(c) for c in r] for r in rows])


def image(name: str, caption: str) -> Block:
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


def run_section(folder: Path, config: dict | None) -> list[Block]:
    if config is None:
        return [heading("What was run"), paragraph("No config.json in this folder: the run cannot be replayed from here.")]
    out = config.get("args", {}).get("out")  # where the result lands (it is rendered in a staging folder)
    where = Path(out) if isinstance(out, str) else folder
    return [
        heading("What was run"),
        code_block(command_line(config)),
        paragraph(f"Replay exactly (same machine, seeded): `layerif {config.get('command', '?')} --config "
           f"{where / 'config.json'}` (with `--out` to write elsewhere). layerif {config.get('version', '?')}."),
        code_block(json.dumps(config.get("args", {}), indent=2)),
    ]


# ----------------------------------------------------------------------------- any other command


def _generic_blocks(folder: Path, config: dict | None) -> tuple[str, list[Block]]:
    title = f"layerif {config.get('command', 'results') if config else 'results'}: {folder.name}"
    blocks = [heading(title, 1), *run_section(folder, config)]
    for md in sorted(folder.glob("*.md")):
        if md.name not in REPORT_FILES:
            blocks += [heading(md.name), Block("raw", md.read_text(encoding="utf-8").strip())]
    for path in sorted(folder.glob("*.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            blocks += [heading(path.name), table_block(rows[0], rows[1:51])]
            if len(rows) > 51:
                blocks.append(paragraph(f"({len(rows) - 51} more rows in `{path.name}`)"))
    for img in sorted(folder.glob("*.png")):
        blocks.append(image(img.name, img.stem.replace("_", " ")))
    return title, blocks


def render_report(out_dir: str | Path) -> tuple[str, str]:
    """(Markdown, HTML) of a result folder, from its files alone."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    config = _read_config(folder / "config.json") if (folder / "config.json").exists() else None
    command = config.get("command") if config else ("score" if (folder / "scores.json").exists() else None)
    if command is None:
        raise UserError(f"{folder} holds no layerif results (no config.json or scores.json)")
    registered = COMMANDS.get(command)
    render = registered.report if registered is not None and registered.report is not None else _generic_blocks
    title, blocks = render(folder, config)
    return to_markdown(blocks), to_html(blocks, folder, title)


def write_report(out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into ``out_dir`` (atomically); returns their paths."""
    md, page = render_report(out_dir)
    folder = Path(out_dir)
    return write_text(folder / "report.md", md), write_text(folder / "report.html", page)
