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

from .errors import UserError

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


def encode(tokenizer, record: dict, fields: Fields = Fields()) -> Encoded:
    """Tokenize one record; raises :class:`UserError` if it has neither text nor prompt/completion."""
    if fields.text in record and record[fields.text] is not None:
        ids = list(tokenizer(str(record[fields.text]))["input_ids"])
        return Encoded(input_ids=ids, labels=list(ids))
    if fields.prompt in record and fields.completion in record:
        return encode_pair(tokenizer, str(record[fields.prompt]), str(record[fields.completion]))
    raise UserError(
        f"a record has neither '{fields.text}' nor '{fields.prompt}'+'{fields.completion}' "
        f"(its fields: {', '.join(sorted(record)) or 'none'})"
    )


def truncate(enc: Encoded, max_length: int | None) -> tuple[Encoded, bool]:
    """Keep the first ``max_length`` tokens; returns the record and whether it was cut."""
    if max_length is None or len(enc.input_ids) <= max_length:
        return enc, False
    return Encoded(enc.input_ids[:max_length], enc.labels[:max_length]), True


def encode_split(
    tokenizer, records: list[dict], split: str, fields: Fields = Fields(), max_length: int | None = None
) -> tuple[list[Encoded], int]:
    """Tokenize a split, checking every record has at least one loss token.

    Returns ``(encoded records, number truncated by max_length)``.
    """
    if not records:
        raise UserError(f"the {split} split is empty")
    out, cut = [], 0
    for i, rec in enumerate(records):
        enc, was_cut = truncate(encode(tokenizer, rec, fields), max_length)
        cut += was_cut
        if len(enc.input_ids) < 2 or enc.n_loss_tokens == 0:
            raise UserError(f"{split} record {i} tokenizes to fewer than 2 tokens (no next-token loss)")
        out.append(enc)
    return out, cut


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

    A path that does not exist and does not look like a dataset name is a user error.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists():
        if path.is_dir():
            raise UserError(f"data file {source} is a folder")
        try:
            if suffix in (".jsonl", ".ndjson"):
                with open(path, encoding="utf-8") as f:
                    return [json.loads(line) for line in f if line.strip()]
            if suffix == ".json":
                with open(path, encoding="utf-8") as f:
                    obj = json.load(f)
                return obj if isinstance(obj, list) else obj.get("data", [])
            if suffix == ".csv":
                with open(path, encoding="utf-8", newline="") as f:
                    return list(csv.DictReader(f))
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                return pq.read_table(path).to_pylist()
        except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"cannot read {source}: {exc}") from None
        raise UserError(f"unknown data file type {suffix!r} for {source} (use .jsonl, .json, .csv or .parquet)")
    if suffix in (".jsonl", ".ndjson", ".json", ".csv", ".parquet") or "/" not in source and "." in source:
        raise UserError(f"data file not found: {source}")
    return _load_hf_dataset(source, split)


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
