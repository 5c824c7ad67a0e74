"""``layerif report DIR``: re-render report.md and report.html of a result folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..io import folder_lock, signals_deferred, write_text
from ..report import render_report
from .base import register


@dataclass
class ReportArgs:
    """Re-render report.md and report.html of a result folder."""

    dir: str = field(default="out/score", metadata={"help": "result folder (holding config.json)", "positional": True})


def run(args: ReportArgs) -> str:
    """``layerif report DIR``: under the folder's lock (:func:`layerif.io.folder_lock`: not while a run
    replaces it), both files rendered first, then written together (Ctrl-C and SIGTERM wait for both)."""
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    with folder_lock(folder, "report folder"):
        md, page = render_report(folder)
        with signals_deferred():
            written = write_text(folder / "report.md", md), write_text(folder / "report.html", page)
    return f"wrote {written[0]} and {written[1]}"


register("report", ReportArgs, run, "re-render report.md and report.html of a result folder")
