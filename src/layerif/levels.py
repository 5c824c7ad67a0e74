"""The level database: every (block, sparsity level) pruned once, on disk; the contract between pruner and search.

The pruner side (:func:`layerif.prune_allocation.level_database`, any registered pruner) writes it; the search
and the sensitivity measurement (:mod:`layerif.search`) only read it. Like EvoPress's database (one file per
``<layer>/<level>`` and a metadata file), the folder is

``<root>/<method>-<fingerprint>/``
    ``database.json``
        ``{"settings": {...}, "build_seconds": float}``: the pruner, its settings (those it declares,
        :attr:`layerif.prune.Pruner.settings`), the calibration windows' hash (``windows``), the model's name
        (``model``, only recorded) and the seconds spent building so far.
    ``b{block:03d}_s{ratio:.6f}.safetensors``
        one per (block, level): per projection ``rel`` of the block (its name inside the block),
        ``{rel}.mask`` -- the zeros of the pruned [out, in] weight, bit-packed (``numpy.packbits``, little bit
        order, row-major) -- and, for a pruner that changes the surviving weights (``keeps_survivors`` false),
        ``{rel}.values`` -- the surviving weights, float32, in row-major order.

The fingerprint (10 hex digits) hashes the settings without the model's name, every projection's shape and
the model's weights (:func:`layerif.cache.weight_fingerprint`), so other settings or other weights under the
same name never reuse a level, and the same weights under another name reuse them all. Ratios are keyed (and
pruned) at 6 decimals; a level on disk is never rebuilt (a build that stops resumes where it stopped).
Calibration rule of the pruner side: every block is calibrated on the *dense* model's inputs, so a block's
level does not depend on the levels of the blocks before it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cache import weight_fingerprint
from .io import write_json, write_safetensors
from .models import find_blocks, projections, set_weight_out_in, weight_out_in

META = "database.json"


def ratio_key(ratio: float) -> str:
    """A level's key: its ratio at 6 decimals."""
    return f"{ratio:.6f}"


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as little-bit-order packed uint8 bytes (row-major)."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool mask of ``shape`` that :func:`pack` packed."""
    bits = np.unpackbits(packed.numpy(), count=int(np.prod(shape)), bitorder="little")
    return torch.from_numpy(bits.astype(bool)).view(shape)


def windows_hash(windows: torch.Tensor | None) -> str:
    """12 hex digits of the calibration windows' token ids (``"none"`` without windows)."""
    if windows is None:
        return "none"
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]


class LevelDatabase:
    """The level database folder of one pruner setting and one model (the format in the module docstring).

    ``settings``: ``method`` (the pruner), ``model`` (a name, only recorded) and whatever else keys the levels
    (calibration windows' hash, the pruner's settings). Reading: :meth:`file`, :meth:`load`, :meth:`info`;
    writing (the pruner side): :meth:`missing`, :meth:`write`, :meth:`add_build_seconds`.
    """

    def __init__(self, root: str | Path, model: nn.Module, settings: dict):
        self.method = settings["method"]
        _, block_list = find_blocks(model)
        self.modules = [projections(b) for b in block_list]
        shapes = [[rel, list(weight_out_in(m).shape)] for mods in self.modules for rel, m in mods.items()]
        key = {**{k: v for k, v in settings.items() if k != "model"}, "shapes": shapes,
               "weights": weight_fingerprint(model)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        self.path = Path(root) / f"{self.method}-{digest}"
        self.settings = dict(settings)

    def file(self, block: int, ratio: float) -> Path:
        return self.path / f"b{block:03d}_s{ratio_key(ratio)}.safetensors"

    def meta(self) -> dict:
        """``database.json`` (settings and build seconds; the defaults before the first level)."""
        try:
            return json.loads((self.path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"settings": self.settings, "build_seconds": 0.0}

    def missing(self, ratios: list[list[float]]) -> list[list[float]]:
        """Per block, the levels of ``ratios[l]`` (deduplicated at 6 decimals) not on disk yet."""
        if len(ratios) != len(self.modules):
            raise ValueError(f"{len(ratios)} ratio lists for {len(self.modules)} blocks")
        return [[float(k) for k in dict.fromkeys(map(ratio_key, rs)) if not self.file(l, float(k)).exists()]
                for l, rs in enumerate(ratios)]

    def write(self, block: int, ratio: float, pruned: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Store one level: per projection ``rel``, (the zeros of its pruned [out, in] weight (bool), the whole
        pruned [out, in] weight when the pruner changes surviving weights, else ``None``)."""
        tensors = {}
        for rel, (mask, new) in pruned.items():
            tensors[f"{rel}.mask"] = pack(mask)
            if new is not None:
                tensors[f"{rel}.values"] = new[~mask].float().contiguous()
        self.path.mkdir(parents=True, exist_ok=True)
        write_safetensors(self.file(block, ratio), tensors)

    def add_build_seconds(self, seconds: float) -> None:
        """Add ``seconds`` of building to ``database.json``."""
        meta = self.meta()
        meta["build_seconds"] = round(meta.get("build_seconds", 0.0) + seconds, 2)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / META, meta)

    def load(self, block: int, ratio: float, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The [out, in] weights of block ``block`` at ``ratio``, given its dense [out, in] weights by name."""
        from safetensors.torch import load_file

        path = self.file(block, ratio)
        if not path.exists():
            raise ValueError(f"level {ratio:g} of block {block} is not in {self.path}: the pruner side builds it "
                             "(layerif.prune_allocation.level_database(...).ensure)")
        data = load_file(str(path))
        out = {}
        for rel, W in dense.items():
            mask = unpack(data[f"{rel}.mask"], W.shape)
            if f"{rel}.values" in data:
                new = torch.zeros(W.shape, dtype=torch.float32)
                new[~mask] = data[f"{rel}.values"]
                out[rel] = new
            else:
                out[rel] = W.masked_fill(mask.to(W.device), 0)
        return out

    def info(self) -> dict:
        """Path, number of level files, total size in bytes and build seconds so far."""
        files = sorted(self.path.glob("b*_s*.safetensors")) if self.path.exists() else []
        return {"path": str(self.path), "levels": len(files), "bytes": sum(f.stat().st_size for f in files),
                "build_seconds": self.meta().get("build_seconds", 0.0), **self.settings}


class BlockLevels:
    """Puts database levels into a model's blocks in place; :meth:`restore` brings back the dense weights.

    Keeps a copy of the dense projection weights (float, the model's dtype) and
    the ratio each block holds now (``None``: dense); :meth:`set` rewrites only
    the blocks whose ratio changes.
    """

    def __init__(self, model: nn.Module, db: LevelDatabase):
        self.db = db
        _, blocks = find_blocks(model)
        self.modules = [projections(b) for b in blocks]
        self.dense = [{rel: weight_out_in(m).detach().clone().cpu() for rel, m in mods.items()} for mods in self.modules]
        self.current: list[str | None] = [None] * len(blocks)

    def set(self, ratios) -> None:
        """Block l gets its database level ``ratios[l]`` (keyed at 6 decimals), or its dense weights for ``None``."""
        for l, r in enumerate(ratios):
            key = None if r is None else ratio_key(float(r))
            if self.current[l] == key:
                continue
            weights = self.dense[l] if key is None else self.db.load(l, float(key), self.dense[l])
            for rel, w in weights.items():
                set_weight_out_in(self.modules[l][rel], w)
            self.current[l] = key

    def restore(self) -> None:
        """Every block back to its dense weights."""
        self.set([None] * len(self.modules))
