"""Resumable work: the results of completed passes, kept until the run finishes.

A run killed during a pass resumes from the last completed pass (or module
group, or validation chunk) when re-run with the same arguments. Each entry is
a safetensors file in the cache folder; the folder's ``fingerprint.json``
names the model, data and options that made them, and a cache whose
fingerprint differs is ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from .data import Encoded
from .io import write_json, write_safetensors


def fingerprint(model: torch.nn.Module, model_name: str, train: list[Encoded], val: list[Encoded], options: dict) -> str:
    """sha256 of the model (name, config, a checksum of every parameter), the token ids and the options."""
    h = hashlib.sha256()
    h.update(model_name.encode())
    config = getattr(model, "config", None)
    h.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.17g}:{float(p.double().abs().sum()):.17g}".encode())
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
        stamp = self.folder / "fingerprint.json"
        if self.folder.exists():
            try:
                same = json.loads(stamp.read_text())["fingerprint"] == key
            except (OSError, ValueError, KeyError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            write_json(stamp, {"fingerprint": key})

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``name``, or None when that pass has not completed."""
        if self.folder is None or not (self.folder / f"{name}.safetensors").exists():
            return None
        from safetensors.torch import load_file

        return load_file(self.folder / f"{name}.safetensors")

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Record a completed pass (written atomically)."""
        if self.folder is not None:
            write_safetensors(self.folder / f"{name}.safetensors", tensors)

    def clear(self) -> None:
        """Remove the cache once the run's outputs are written."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
