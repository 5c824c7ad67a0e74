"""Resumable work: the results of completed passes, kept until the run finishes.

A run killed during a pass resumes from the last completed pass (or module
group, or validation chunk) when re-run with the same arguments. Each entry is
a safetensors file in the cache folder named ``<fingerprint>.<pass>.safetensors``:
the fingerprint (:func:`fingerprint`: model, data and options) is part of every
entry's name, so an entry is only ever read by a run with the same fingerprint.
Entries of other fingerprints are removed when a cache is opened (one run owns
a cache folder at a time: the output folder's lock, :func:`layerif.io.staged_folder`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from .data import Encoded
from .io import write_safetensors


def weight_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's content: its config and a checksum (name, shape, sum, L1 norm) of every parameter.

    Two models with the same weights have the same fingerprint whatever they are
    called; models with other weights (almost surely) differ."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            total, l1 = p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, 1, dtype=torch.float64)
            h.update(f"{name}:{tuple(p.shape)}:{float(total):.17g}:{float(l1):.17g}".encode())
    return h.hexdigest()


def fingerprint(model: torch.nn.Module, model_name: str, train: list[Encoded], val: list[Encoded], options: dict) -> str:
    """sha256 of the model (name, :func:`weight_fingerprint`), the token ids and the options."""
    h = hashlib.sha256()
    h.update(model_name.encode())
    h.update(weight_fingerprint(model).encode())
    for recs in (train, val):
        h.update(json.dumps([[e.input_ids, e.labels] for e in recs]).encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()


class PassCache:
    """Completed-pass results in ``folder`` for one fingerprint; ``folder=None`` disables caching."""

    def __init__(self, folder: str | Path | None, key: str = "") -> None:
        self.folder = Path(folder) if folder is not None else None
        self.key = key
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for entry in self.folder.iterdir():
            if entry.name.startswith(f"{key}."):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def path(self, name: str) -> Path:
        """The entry of pass ``name`` for this cache's fingerprint."""
        assert self.folder is not None
        return self.folder / f"{self.key}.{name}.safetensors"

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``name`` by a run of this fingerprint, or None when that pass has not completed."""
        if self.folder is None or not self.path(name).exists():
            return None
        from safetensors.torch import load_file

        return load_file(self.path(name))

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Record a completed pass (written atomically)."""
        if self.folder is not None:
            write_safetensors(self.path(name), tensors)

    def clear(self) -> None:
        """Remove the cache once the run's outputs are written."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
