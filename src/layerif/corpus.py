"""Real English text available offline, for calibration windows and perplexity.

The default corpus is the prose of the Python standard library's documentation
that ships with every Python, :mod:`pydoc_data.topics` (about 465,000
characters); :func:`load_text` reads any UTF-8 text file instead.
:func:`split_text` cuts a text into a calibration part and an evaluation part
that never overlap, and :func:`text_windows` draws random token windows from
the calibration part, the way Wanda draws its C4 calibration samples.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .errors import UserError


def pydoc_text() -> str:
    """The ``pydoc_data.topics`` documents, in sorted topic order, separated by blank lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module; give a text file instead") from None
    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def load_text(path: str | None = None) -> str:
    """The text of the UTF-8 file ``path``, or :func:`pydoc_text` when ``path`` is None.

    A missing, unreadable or empty file is a :class:`UserError`.
    """
    if path is None:
        return pydoc_text()
    file = Path(path)
    if not file.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read text file {path}: {exc}") from None
    if not text.strip():
        raise UserError(f"text file {path} is empty")
    return text


def split_text(text: str, eval_fraction: float = 0.2) -> tuple[str, str]:
    """``(calibration_text, evaluation_text)``: the text cut once, about ``eval_fraction`` from its end.

    The cut is moved forward to the next paragraph break (a blank line) when
    there is one, so no paragraph is shared. ``calibration + evaluation`` is a
    prefix/suffix partition of ``text`` up to the whitespace at the cut: the
    two parts never overlap. ``eval_fraction`` must be in (0, 1).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be between 0 and 1 (got {eval_fraction})")
    cut = int(len(text) * (1.0 - eval_fraction))
    brk = text.find("\n\n", cut)
    if brk != -1:
        cut = brk
    calibration, evaluation = text[:cut].rstrip(), text[cut:].strip()
    if not calibration or not evaluation:
        raise UserError(f"the text ({len(text)} characters) is too short to split")
    return calibration, evaluation


def text_windows(tokenizer, text: str, n_windows: int, seqlen: int, seed: int = 0) -> torch.LongTensor:
    """``n_windows`` random windows of ``seqlen`` consecutive tokens of ``text``: a LongTensor [n, seqlen].

    The text is tokenized once without special tokens; window starts are drawn
    without replacement (``seed``), so windows are distinct but may overlap.
    A text with fewer than ``n_windows`` possible starts is a :class:`UserError`.
    """
    if n_windows < 1 or seqlen < 1:
        raise UserError(f"need n_windows >= 1 and seqlen >= 1 (got {n_windows}, {seqlen})")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_starts = len(ids) - seqlen + 1
    if n_starts < n_windows:
        raise UserError(f"the text has {len(ids)} tokens: too short for {n_windows} windows of {seqlen} tokens")
    starts = random.Random(seed).sample(range(n_starts), n_windows)
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)
