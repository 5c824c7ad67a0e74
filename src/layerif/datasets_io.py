"""Calibration windows and perplexity text from the data sets the pruning papers use, or local files.

A **source** (``--calib``, ``--eval``) is one of

* ``builtin``: the offline corpus of :mod:`layerif.corpus` (the default);
* ``c4``: ``allenai/c4`` the way the Wanda / SparseGPT code loads it: calibration from the first train shard
  ``en/c4-train.00000-of-01024.json.gz`` (:func:`c4_windows`), perplexity on the first 1100 documents of
  ``en/c4-validation.00000-of-00008.json.gz`` joined with ``' '``, cut to 256 windows;
* ``wikitext2``: ``wikitext`` / ``wikitext-2-raw-v1``: calibration from the train split joined with ``' '``
  (:func:`random_windows`), perplexity on the test split joined with ``"\\n\\n"``, all ``numel // seqlen``
  consecutive windows;
* a local path: a plain text file (read as it is, as :func:`layerif.corpus.load_text`), or a JSONL / JSON,
  Parquet, Arrow or CSV file or a ``save_to_disk`` folder, loaded by ``datasets``' local builders, whose
  ``text_field`` column is joined with ``"\\n\\n"``.

A local text or the built-in corpus serves both uses: calibration draws from its first part and perplexity
reads its last part (:func:`layerif.corpus.split_text`), so the two never overlap. The hub data sets go through
``datasets.load_dataset`` with exactly the arguments above (:data:`HUB`); without a network that fails, and
the failure is a one-line :class:`UserError`. ``datasets`` and ``pyarrow`` are the optional ``data`` extra.
Nothing here prints.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import progress
from .errors import UserError
from .io import check_regular_file

BUILTIN = "builtin"
# (name, use) -> (positional arguments, keyword arguments) of datasets.load_dataset
HUB: dict[tuple[str, str], tuple[tuple, dict]] = {
    ("c4", "calib"): (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                                        "split": "train"}),
    ("c4", "eval"): (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       "split": "validation"}),
    ("wikitext2", "calib"): (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
    ("wikitext2", "eval"): (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
}
HUB_NAMES = ("c4", "wikitext2")
C4_EVAL_DOCUMENTS, C4_EVAL_WINDOWS = 1100, 256
# local files datasets reads with a builder; any other file is plain UTF-8 text
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
# CPU defaults are each command's own; on cuda both default to the papers' 128 windows of 2048 tokens
CUDA_CALIBRATION = (128, 2048)


def datasets_module() -> Any:
    """The ``datasets`` package, its progress bars on only with the library's progress (``--quiet``: off);
    missing, a :class:`UserError` naming the extra to install."""
    try:
        import datasets
    except ImportError:
        raise UserError("this data set needs the `data` extra: pip install 'layerif[data]' (datasets, pyarrow)") \
            from None
    (datasets.enable_progress_bars if progress.enabled() else datasets.disable_progress_bars)()
    return datasets


def needs_datasets(source: str) -> bool:
    """Whether reading ``source`` takes the ``datasets`` package (a hub name, a folder, a JSONL/Parquet/... file)."""
    if source == BUILTIN:
        return False
    if source in HUB_NAMES:
        return True
    path = Path(source)
    return path.is_dir() or path.suffix.lower() in BUILDERS


def check_source(source: str, option: str) -> None:
    """A :class:`UserError` unless ``source`` is ``builtin``, a hub name or an existing path, and unless the
    ``datasets`` package it needs is installed: checks made before a model loads. A local file must be a regular
    one (a pipe would block), and a JSON / JSONL one must parse (:func:`layerif.data.load_records`, whose
    one-line errors name the line: the ``datasets`` reader crashes on some malformed files, e.g. deep nesting)."""
    if source not in (BUILTIN, *HUB_NAMES) and not Path(source).exists():
        raise UserError(f"{option} {source!r} is neither {', '.join((BUILTIN, *HUB_NAMES))} nor an existing file "
                        "or folder")
    if source not in (BUILTIN, *HUB_NAMES):
        check_regular_file(source, option)
        suffix = Path(source).suffix.lower()
        if Path(source).is_file() and suffix in (".jsonl", ".json"):
            from .data import load_records
            from .results import read_json

            if suffix == ".jsonl":
                load_records(source)
            else:
                read_json(source, option)
    if needs_datasets(source):
        datasets_module()


def hub_dataset(name: str, use: str) -> Any:
    """The ``datasets.Dataset`` of hub data set ``name`` (``c4``, ``wikitext2``) for ``use`` (``calib``,
    ``eval``), loaded as :data:`HUB` says; a failed download (no network, no such file) is a one-line
    :class:`UserError`."""
    args, kwargs = HUB[(name, use)]
    try:
        return datasets_module().load_dataset(*args, **kwargs)
    except (OSError, ConnectionError) as exc:  # requests' and huggingface_hub's errors are OSErrors
        raise UserError(f"cannot load {name} ({args[0]}): {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def column(data: Any, text_field: str, where: str) -> list[str]:
    """The ``text_field`` column of a ``datasets.Dataset`` as strings; no such column is a :class:`UserError`."""
    names = list(getattr(data, "column_names", None) or [])
    if text_field not in names:
        raise UserError(f"{where} has no field {text_field!r} (fields: {', '.join(names) or 'none'}); "
                        "choose one with --text-field")
    return [str(t) for t in data[text_field]]


def local_text(path: str, text_field: str = "text") -> str:
    """The text of a local source: a plain text file as it is, else the ``text_field`` of its records joined with
    a blank line. An unreadable or empty source is a :class:`UserError`."""
    from .corpus import load_text  # here, so tests can stand in a small corpus

    p = Path(path)
    if not needs_datasets(path):
        return load_text(path)
    ds = datasets_module()
    try:
        if p.is_dir():
            data = ds.load_from_disk(str(p))
            if isinstance(data, ds.DatasetDict):
                data = data[next(iter(data))]
        else:
            data = ds.load_dataset(BUILDERS[p.suffix.lower()], data_files=str(p), split="train")
    except UserError:
        raise
    except Exception as exc:  # datasets raises many kinds for a malformed file
        raise UserError(f"cannot read {path} as a data set: {first_line(exc)}") from None
    text = "\n\n".join(t for t in column(data, text_field, path) if t.strip())
    if not text.strip():
        raise UserError(f"{path} holds no text in field {text_field!r}")
    return text


def _split_local(source: str, text_field: str) -> tuple[str, str]:
    """(calibration part, evaluation part) of ``builtin`` or a local source."""
    from .corpus import load_text, split_text

    return split_text(load_text(None) if source == BUILTIN else local_text(source, text_field))


def c4_windows(tokenizer, documents: Sequence[str], n: int, seqlen: int, seed: int) -> torch.LongTensor:
    """``n`` calibration windows [n, seqlen], Wanda's C4 rule: for each, draw documents
    (``randint(0, len(documents) - 1)``) until one has more than ``seqlen`` tokens, then a window start
    ``randint(0, len - seqlen - 1)`` inside it. The draws are those of ``random.seed(seed)`` followed by the
    same ``random.randint`` calls (a private ``random.Random(seed)``, so the global state is left alone).
    Documents are tokenized as the model's tokenizer does by default (special tokens included), as in Wanda.
    No document longer than ``seqlen`` within ``100 × len(documents)`` draws is a :class:`UserError`."""
    if n < 1 or seqlen < 1 or not documents:
        raise UserError(f"need n >= 1, seqlen >= 1 and documents (got {n}, {seqlen}, {len(documents)} documents)")
    rng, out, limit = random.Random(seed), [], 100 * len(documents)
    for _ in range(n):
        for _draw in range(limit):
            ids = tokenizer(documents[rng.randint(0, len(documents) - 1)])["input_ids"]
            if len(ids) > seqlen:
                break
        else:
            raise UserError(f"no document with more than {seqlen} tokens in {limit} draws: lower --seqlen")
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[start : start + seqlen])
    return torch.tensor(out, dtype=torch.long)


def random_windows(ids: Sequence[int], n: int, seqlen: int, seed: int) -> torch.LongTensor:
    """``n`` windows [n, seqlen] of the token sequence ``ids``, SparseGPT's WikiText2 rule: each start is
    ``randint(0, len(ids) - seqlen - 1)`` of ``random.Random(seed)`` (with replacement). Too few tokens is a
    :class:`UserError`."""
    if len(ids) <= seqlen:
        raise UserError(f"the text has {len(ids)} tokens: too short for windows of {seqlen} tokens")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n)]
    return torch.tensor([list(ids[s : s + seqlen]) for s in starts], dtype=torch.long)


def calibration_windows(tokenizer, source: str, n: int, seqlen: int, seed: int,
                        text_field: str = "text") -> torch.LongTensor:
    """``n`` calibration windows [n, seqlen] of ``source`` drawn with ``seed`` (see the module text)."""
    if source == "c4":
        return c4_windows(tokenizer, column(hub_dataset("c4", "calib"), "text", "c4"), n, seqlen, seed)
    if source == "wikitext2":
        text = " ".join(column(hub_dataset("wikitext2", "calib"), "text", "wikitext2"))
        return random_windows(tokenizer(text)["input_ids"], n, seqlen, seed)
    from .corpus import text_windows

    return text_windows(tokenizer, _split_local(source, text_field)[0], n, seqlen, seed)


def windows_apart(draw: Callable[[int], torch.Tensor], exclude: torch.Tensor, n: int,
                  doublings: int = 4) -> torch.LongTensor:
    """``n`` windows [n, seqlen] disjoint from ``exclude`` [m, seqlen]: the first ``n`` windows of ``draw(k)`` (the
    same source and seed rule as ``exclude``, k = m + n, doubled up to ``doublings`` times until enough are left)
    whose token tuple is neither a window of ``exclude`` nor an earlier pick. With the C4 and WikiText2 rules (a
    seeded sequence of draws) ``draw(m)`` is ``exclude`` itself, so these are the windows drawn after it. The
    search's and ``--tune``'s KL fitness windows, apart from the pruners' calibration windows. Too few distinct
    windows is a :class:`UserError`."""
    seen = {tuple(w) for w in exclude.tolist()}
    k = exclude.shape[0] + n
    for _ in range(doublings + 1):
        picked, taken = [], set(seen)
        for w in draw(k).tolist():
            if tuple(w) not in taken:
                taken.add(tuple(w))
                picked.append(w)
                if len(picked) == n:
                    return torch.tensor(picked, dtype=torch.long)
        k *= 2
    raise UserError(f"found {len(picked)} windows apart from the {exclude.shape[0]} calibration windows, "
                    f"need {n} (--search-windows): lower it or --n-calib, or use a longer --calib text")


def evaluation_text(source: str, text_field: str = "text") -> tuple[str, int | None]:
    """``(text, most windows)`` for perplexity on ``source``: the text is cut into consecutive ``seqlen`` windows
    by :func:`layerif.evaluate.window_nll`; ``most windows`` is 256 for C4 (its 256 × seqlen tokens), else None."""
    if source == "c4":
        docs = column(hub_dataset("c4", "eval"), "text", "c4")[:C4_EVAL_DOCUMENTS]
        return " ".join(docs), C4_EVAL_WINDOWS
    if source == "wikitext2":
        return "\n\n".join(column(hub_dataset("wikitext2", "eval"), "text", "wikitext2")), None
    return _split_local(source, text_field)[1], None


def preload(source: str, use: str, text_field: str = "text") -> None:
    """Read ``source`` for ``use`` (``calib``, ``eval``) once, so that a download that fails, a local file without
    ``text_field`` or an empty one is a :class:`UserError` before a model loads (``datasets`` keeps what it
    loaded in its cache, so the later read is cheap)."""
    if source in HUB_NAMES:
        hub_dataset(source, use)
    elif source != BUILTIN:
        local_text(source, text_field)


def fewest(*caps: int | None) -> int | None:
    """The smallest of the window caps that are set (None: no cap)."""
    set_ = [c for c in caps if c]
    return min(set_) if set_ else None


def calibration_size(n_calib: int | None, seqlen: int | None, device: str,
                     cpu: tuple[int, int]) -> tuple[int, int, str]:
    """``(n_calib, seqlen, which)``: the given values, else the defaults of the device: ``cpu`` on a CPU,
    :data:`CUDA_CALIBRATION` (128 × 2048) on cuda (``device`` ``auto`` means cuda when one is available).
    ``which`` records where the values came from (``given``, ``cpu default``, ``cuda default``, or mixed)."""
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    defaults = CUDA_CALIBRATION if on_cuda else cpu
    label = "cuda default" if on_cuda else "cpu default"
    n = defaults[0] if n_calib is None else n_calib
    s = defaults[1] if seqlen is None else seqlen
    which = ("given" if n_calib is not None else label, "given" if seqlen is not None else label)
    return n, s, which[0] if which[0] == which[1] else f"n_calib {which[0]}, seqlen {which[1]}"
