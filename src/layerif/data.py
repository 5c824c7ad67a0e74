"""Records, tokenization and batching.

A *record* is a dict with either ``text`` (the loss covers every token) or
``prompt`` + ``completion`` (the loss covers the completion's tokens only).
Records come from JSONL / CSV / Parquet files, from a Hugging Face dataset, or
from a built-in task (:mod:`layerif.tasks`).

Per-sample loss contract: for a ``text`` record the loss is exactly
``model(input_ids=ids, labels=ids).loss`` with ``ids = tokenizer(text)["input_ids"]``,
the mean next-token cross-entropy over the sample's own tokens. Batches are
right-padded; padded positions carry label -100 and never change any sample's
loss or gradient.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import JSON_ERRORS, UserError, json_problem
from .io import check_regular_file

IGNORE = -100


@dataclass(frozen=True)
class Fields:
    """Names of the record fields (configurable for users' files)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"


@dataclass
class Encoded:
    """One tokenized record: ``labels[t]`` is ``input_ids[t]`` or -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        """Number of next-token predictions in the loss (labels after the first position)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE)


def n_distinct(items: list[Encoded]) -> int:
    """How many distinct records ``items`` holds (same input ids and labels count once): repeats show as a gap to ``len``."""
    return len({(tuple(e.input_ids), tuple(e.labels)) for e in items})


def encode_pair(tokenizer, prompt: str, completion: str) -> Encoded:
    """Tokenize ``prompt`` (with the tokenizer's default special tokens) followed by ``completion``.

    The completion is tokenized on its own without special tokens and appended,
    so the prompt's ids are the same for every candidate completion (what
    multiple-choice scoring needs). Labels cover the completion only.
    """
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return Encoded(input_ids=list(p) + list(c), labels=[IGNORE] * len(p) + list(c))


def _string_field(record: dict, name: str) -> str | None:
    """``record[name]`` when present and not None; a value that is not a string is a :class:`UserError`."""
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"field '{name}' must be a string, got {type(value).__name__} {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON escape such as "\\ud800" decodes to a lone surrogate
        raise UserError(f"field '{name}' is not valid Unicode text (a lone surrogate {value[exc.start]!r} at "
                        f"character {exc.start})") from None
    return value


def _short(value: object, width: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def record_kind(record: object, fields: Fields = Fields()) -> str:
    """``"text"`` or ``"pair"`` (prompt + completion); anything else is a :class:`UserError`.

    A record must be a mapping whose text field, or prompt and completion fields,
    are strings (a field holding None counts as absent). Needs no tokenizer, so
    data files are checked before a model loads.
    """
    if not isinstance(record, dict):
        raise UserError(f"a record must be an object with fields, got {type(record).__name__} {_short(record)}")
    if _string_field(record, fields.text) is not None:
        return "text"
    if _string_field(record, fields.prompt) is not None and _string_field(record, fields.completion) is not None:
        return "pair"
    raise UserError(
        f"a record has neither '{fields.text}' nor '{fields.prompt}'+'{fields.completion}' "
        f"(its fields: {', '.join(sorted(map(str, record))) or 'none'})"
    )


def check_records(records: list, split: str, fields: Fields = Fields()) -> None:
    """:func:`record_kind` of every record; the error names the split and the record index (0-based)."""
    if not records:
        raise UserError(f"the {split} split is empty")
    for i, rec in enumerate(records):
        try:
            record_kind(rec, fields)
        except UserError as exc:
            raise UserError(f"{split} record {i}: {exc}") from None


def encode(tokenizer, record: dict, fields: Fields = Fields()) -> Encoded:
    """Tokenize one record; raises :class:`UserError` unless it has a string text or prompt + completion."""
    if record_kind(record, fields) == "text":
        ids = list(tokenizer(record[fields.text])["input_ids"])
        return Encoded(input_ids=ids, labels=list(ids))
    return encode_pair(tokenizer, record[fields.prompt], record[fields.completion])


def truncate(enc: Encoded, max_length: int | None) -> tuple[Encoded, bool]:
    """Keep the first ``max_length`` tokens; returns the record and whether it was cut."""
    if max_length is None or len(enc.input_ids) <= max_length:
        return enc, False
    return Encoded(enc.input_ids[:max_length], enc.labels[:max_length]), True


def encode_split(
    tokenizer,
    records: list[dict],
    split: str,
    fields: Fields = Fields(),
    max_length: int | None = None,
    context: int | None = None,
) -> tuple[list[Encoded], int]:
    """Tokenize a split, checking every record has at least one loss token.

    Truncation rule: with ``max_length`` a longer record keeps its first
    ``max_length`` tokens (a prompt + completion record whose completion would
    be cut off entirely is refused). Without it, a record longer than
    ``context`` (the model's context length) is refused, naming the record and
    its length. Returns ``(encoded records, number truncated by max_length)``.
    """
    check_records(records, split, fields)
    out, cut = [], 0
    for i, rec in enumerate(records):
        full = encode(tokenizer, rec, fields)
        if max_length is None and context is not None and len(full.input_ids) > context:
            raise UserError(f"{split} record {i} has {len(full.input_ids)} tokens, more than the model's context of "
                            f"{context}; pass --max-length N (N <= {context}) to keep the first N tokens of each record")
        enc, was_cut = truncate(full, max_length)
        cut += was_cut
        if enc.n_loss_tokens == 0 and full.n_loss_tokens > 0:
            prompt = full.labels.index(next(y for y in full.labels if y != IGNORE))
            raise UserError(f"{split} record {i}: --max-length {max_length} cuts off its whole completion "
                            f"(the prompt alone has {prompt} tokens); raise --max-length or shorten the prompt")
        if len(enc.input_ids) < 2 or enc.n_loss_tokens == 0:
            raise UserError(f"{split} record {i} tokenizes to fewer than 2 tokens (no next-token loss)")
        out.append(enc)
    return out, cut


def records_note(counts: dict) -> str:
    """'64 of 200 train, 16 of 16 validation records; 3 truncated to 128 tokens' (for the summary and report)."""
    text = ", ".join(f"{c['used']} of {c['available']} {split}" for split, c in counts.items() if isinstance(c, dict))
    cut = sum(c.get("truncated", 0) for c in counts.values() if isinstance(c, dict))
    return f"{text} records" + (f"; {cut} truncated to {counts['max_length']} tokens" if cut else "")


def pad_id(tokenizer) -> int:
    """The token id used for padding: the tokenizer's pad token, else its EOS token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def collate(batch: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels`` (pads are -100), all [B, T]."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision statistics of a ``dtype`` model are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in :func:`stat_dtype` precision."""
    return x.to(stat_dtype(x.dtype))


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample: logits [B, T, V], labels [B, T] -> [B].

    Computed in float32 (float64 for a float64 model), exactly as
    ``model(..., labels=...).loss`` for one sample.
    """
    shift_logits = upcast(logits[:, :-1, :])
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(shift_labels.shape)
    count = (shift_labels != IGNORE).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / count


def batches(items: list, batch_size: int) -> list[list]:
    """Consecutive chunks of ``batch_size`` items (the last may be shorter)."""
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


# ----------------------------------------------------------------------------- files


def load_records(source: str, split: str | None = None) -> list[dict]:
    """Records from a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or a HF dataset ``name[:split]``.

    Every record must be an object (a dict). A ``.json`` file holds a list of
    objects or an object with a ``data`` list. A path that does not exist and
    does not look like a dataset name, an unreadable file, and a record that is
    not an object are user errors naming the file and the line (JSONL) or the
    index (JSON).
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists():
        if path.is_dir():
            raise UserError(f"data file {source} is a folder")
        check_regular_file(path, "data file")
        try:
            if suffix in (".jsonl", ".ndjson"):
                return _read_jsonl(path)
            if suffix == ".json":
                return _read_json_records(path)
            if suffix == ".csv":
                with open(path, encoding="utf-8", newline="") as f:
                    return list(csv.DictReader(f))
            if suffix == ".parquet":
                return _read_parquet(path)
        except UnicodeDecodeError as exc:
            raise UserError(f"cannot read {source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            raise UserError(f"cannot read {source}: {exc}") from None
        except OSError as exc:
            raise UserError(f"cannot read {source}: {exc.strerror or exc}") from None
        raise UserError(f"unknown data file type {suffix!r} for {source} (use .jsonl, .json, .csv or .parquet)")
    if suffix in (".jsonl", ".ndjson", ".json", ".csv", ".parquet") or "/" not in source and "." in source:
        raise UserError(f"data file not found: {source}")
    return _load_hf_dataset(source, split)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except JSON_ERRORS as exc:
                raise UserError(f"{path} line {lineno}: {json_problem(exc)}") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path} line {lineno}: a record must be a JSON object, got {_json_type(rec)}")
            records.append(rec)
    return records


def _read_json_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except JSON_ERRORS as exc:
            at = f" line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise UserError(f"{path}{at}: {json_problem(exc)}") from None
    if isinstance(obj, dict) and "data" in obj:
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f"{path} must hold a list of record objects (or an object with a 'data' list), "
                        f"got {_json_type(obj)}")
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise UserError(f"{path} record {i}: a record must be a JSON object, got {_json_type(rec)}")
    return obj


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow (or pip install 'layerif[data]')") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, ArrowIOError, OSError ... for a damaged file
        raise UserError(f"cannot read {path}: not a readable Parquet file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _load_hf_dataset(name: str, split: str | None) -> list[dict]:
    """A Hugging Face dataset, ``name`` or ``name:split`` (default split ``train``)."""
    if ":" in name:
        name, split = name.split(":", 1)
    try:
        import datasets
    except ImportError:
        raise UserError(f"data file not found: {name} (install 'datasets' to load hub datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
        raise UserError(f"cannot load dataset {name!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return [dict(r) for r in ds]
