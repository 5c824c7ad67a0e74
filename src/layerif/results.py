"""The file contracts: what a results folder holds, how it is read, written and checked.

Every tool that reads another tool's output goes through here, never through
the module that computed it (pruning and the LoRA-MoE adapter read
``scores.json`` without importing the scoring engine).

* ``scores.json`` (``layerif score``): ``layers`` -- the **block** indices, in
  model order (the key keeps its historical name) -- and ``score`` (S_l in that
  order) are required; ``model``, ``task``, ``target``, ``estimator``,
  ``aggregations``, ``lambda``, ... describe the run (see the README).
* ``allocation.json`` (``prune --save``, ``moe --save``): ``layers`` (block
  indices) and the per-block allocation (``sparsity`` or ``experts`` + ``top_k``)
  plus the arguments that made it; ``prune --allocation-file`` and
  ``--search-init`` read a pruning one back (:func:`block_sparsity`).
* ``config.json`` (every command that writes a folder): ``command``, ``args``
  (every field of the command's argument dataclass) and ``version``; ``layerif
  CMD --config config.json`` replays it.

Every write is atomic (:mod:`layerif.io`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import JSON_ERRORS, UserError, json_problem
from .io import check_place, check_regular_file, write_json

SCORES_FILE = "scores.json"
ALLOCATION_FILE = "allocation.json"
CONFIG_FILE = "config.json"


def read_json(path: str | Path, what: str = "") -> Any:
    """A JSON file; a missing or malformed one is a :class:`UserError` (``what`` names it in the message)."""
    named = f"{what + ' ' if what else ''}{path}"
    check_regular_file(path, what or "file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{named} not found") from None
    except IsADirectoryError:
        raise UserError(f"cannot read {named}: it is a folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {named}: {exc}") from None
    except JSON_ERRORS as exc:
        raise UserError(f"cannot read {named}: {json_problem(exc)}") from None


# ----------------------------------------------------------------------------- scores.json


def read_scores(path: str | Path) -> dict:
    """Read a scores.json (or the folder holding it); a missing or malformed file is a user error."""
    p = Path(path)
    if p.is_dir():
        p = p / SCORES_FILE
    if not p.exists():
        raise UserError(f"scores file not found: {path}")
    doc = read_json(p, "scores file")
    if not isinstance(doc, dict) or not {"layers", "score"} <= doc.keys() or not isinstance(doc["layers"], list) \
            or not isinstance(doc["score"], list) or len(doc["layers"]) != len(doc["score"]):
        raise UserError(f"{path} is not a layerif scores.json (needs 'layers' and 'score' lists of equal length)")
    for key, ok, what in (("layers", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
                           "block indices (integers >= 0)"),
                          ("score", lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x),
                           "finite numbers")):
        bad = next((i for i, x in enumerate(doc[key]) if not ok(x)), None)
        if bad is not None:
            raise UserError(f"{path}: '{key}' must hold {what}; entry {bad} is {json.dumps(doc[key][bad])[:40]}")
    return doc


def block_scores(path: str | Path, n_blocks: int) -> tuple[np.ndarray, dict]:
    """The scores S_l of a scores.json, validated against a model with ``n_blocks`` decoder blocks.

    Returns (float64 [L] in block order, the whole document). A file for another
    block count, one that does not score every block, or non-finite scores are a
    :class:`UserError`.
    """
    doc = read_scores(path)
    blocks = [int(i) for i in doc["layers"]]
    if len(blocks) != n_blocks:
        raise UserError(f"{path} is a scores file for another model ({len(blocks)} blocks; this model has {n_blocks})")
    if blocks != list(range(n_blocks)):
        raise UserError(f"{path} scores blocks {blocks}, not 0-{n_blocks - 1} in order; score every block of this model")
    s = np.asarray(doc["score"], dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise UserError(f"{path} has NaN or infinite scores")
    return s, doc


VALIDATION_FILE = "validation.json"


def read_validation(path: str | Path) -> dict:
    """A validation.json of ``layerif validate`` (or its folder) with ``layers`` and finite ``fine_tune_gain``
    lists of equal length; anything else is a :class:`UserError`."""
    p = Path(path)
    if p.is_dir():
        p = p / VALIDATION_FILE
    doc = read_json(p, "validation file")
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list) \
            or not isinstance(doc.get("fine_tune_gain"), list) or len(doc["layers"]) != len(doc["fine_tune_gain"]):
        raise UserError(f"{path} is not a layerif validation.json (needs 'layers' and 'fine_tune_gain' lists of "
                        "equal length)")
    if not all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g)
               for g in doc["fine_tune_gain"]):
        raise UserError(f"{path}: 'fine_tune_gain' must hold finite numbers")
    return doc


def block_gains(path: str | Path, n_blocks: int) -> tuple[np.ndarray, dict]:
    """The measured per-block fine-tune gain g_l of a ``layerif validate`` result (validation.json or its folder).

    g_l = L_val(before) − L_val(after) of fine-tuning block l alone (nats per token; > 0: training the
    block helps). Returns (float64 [L] in block order, the whole document). A file that
    :func:`read_validation` refuses, or one that did not measure every block of a model with ``n_blocks``
    blocks in order, is a :class:`UserError`.
    """
    doc = read_validation(path)
    if doc["layers"] != list(range(n_blocks)):
        raise UserError(f"{path} measured blocks {block_list(doc['layers'])}, not 0-{n_blocks - 1} in order "
                        f"(this model has {n_blocks} blocks); validate every block (--target attn, mlp or block)")
    return np.asarray(doc["fine_tune_gain"], dtype=np.float64), doc


def block_list(blocks: list) -> str:
    """At most 8 entries of a block list, for messages."""
    return ", ".join(map(str, blocks[:8])) + (", …" if len(blocks) > 8 else "")


def scores_document(result: Any, args: Any) -> dict:
    """The scores.json document of a :class:`~layerif.scores.ScoreResult` and its ScoreArgs."""
    return {
        "model": result.meta.get("model"),
        "task": result.meta.get("task"),
        "target": args.target,
        "estimator": args.estimator,
        "damping_scale": args.damping_scale,
        "n_train": result.meta.get("n_train"),
        "n_val": result.meta.get("n_val"),
        "n_train_distinct": result.meta.get("n_train_distinct"),
        "n_val_distinct": result.meta.get("n_val_distinct"),
        "records": result.meta.get("records"),
        "layers": result.layers,
        "score": result.score,
        "aggregations": result.aggregations(),
        "lambda": result.lambdas,
        "mode": result.meta.get("mode"),
        "passes": result.passes,
        "seconds": round(result.seconds, 3),
        "version": __version__,
        **({"stability": result.meta["stability"]} if result.meta.get("stability") else {}),
        **({"notes": result.meta["notes"]} if result.meta.get("notes") else {}),
    }


def write_scores(out: Path, doc: dict) -> Path:
    """Write ``doc`` as ``out/scores.json`` (it must satisfy :func:`read_scores`)."""
    if not {"layers", "score"} <= doc.keys() or len(doc["layers"]) != len(doc["score"]):
        raise ValueError("a scores document needs 'layers' and 'score' of equal length")
    return write_json(out / SCORES_FILE, doc)


# ----------------------------------------------------------------------------- allocation.json


def check_save_dir(path: str | Path, what: str, overwrite: bool = False, model: str | None = None) -> Path:
    """Check a ``--save`` folder against the output-folder rule (:func:`layerif.io.check_out_dir`); changes nothing.

    ``what`` is the kind ("pruned model", "adapter folder"). The folder must be
    new, empty, or an earlier ``what`` (its allocation.json says ``"saved": what``,
    :func:`write_saved`), which is replaced only with ``overwrite`` and only when
    it holds nothing but the files that save wrote (allocation.json ``files``,
    :func:`write_saved`). Never the current folder or one holding it, the input
    model ``model``, another model folder, or a folder inside one: a
    :class:`UserError` otherwise.
    """
    p = Path(path)
    if model is not None and Path(model).exists() and p.resolve() == Path(model).resolve():
        raise UserError(f"--save {path} is the input model (--model); layerif never writes into a model folder")
    try:
        doc = json.loads((p / ALLOCATION_FILE).read_text(encoding="utf-8"))
    except (OSError, *JSON_ERRORS):
        doc = None
    own = isinstance(doc, dict) and doc.get("saved") == what
    check_place(p, "--save", own)
    if not p.is_dir() or not any(p.iterdir()):
        return p
    if not own:
        raise UserError(f"--save {path} holds files that are not an earlier {what}; choose a new or empty folder")
    if not overwrite:
        raise UserError(f"--save {path} holds an earlier {what}; pass --overwrite to replace it (it is kept until "
                        "the new one is complete)")
    written = doc.get("files")
    if not isinstance(written, list):
        raise UserError(f"--save {path}: its {ALLOCATION_FILE} does not list the files layerif wrote, so --overwrite "
                        "cannot tell them from others; choose a new folder")
    others = sorted(set(_files(p)) - set(written))
    if others:
        raise UserError(f"--save {path} also holds files layerif did not write ({', '.join(others[:3])}"
                        f"{', …' if len(others) > 3 else ''}); move them or choose a new folder")
    return p


def _files(folder: Path) -> list[str]:
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() or f.is_symlink())


def write_saved(folder: Path, doc: dict, what: str) -> Path:
    """Write allocation.json of a ``--save`` folder of kind ``what``, last: ``doc`` plus ``saved`` (the kind)
    and ``files``, every file the folder holds then (what a later ``--overwrite`` may replace, :func:`check_save_dir`)."""
    return write_allocation(folder, {**doc, "saved": what, "files": sorted({*_files(folder), ALLOCATION_FILE})})


def read_allocation(folder: str | Path, required: set[str], what: str) -> dict:
    """allocation.json of a saved folder, with the ``required`` keys (else a :class:`UserError`)."""
    path = Path(folder) / ALLOCATION_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} is not a {what} folder (no {ALLOCATION_FILE})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except JSON_ERRORS as exc:
        raise UserError(f"cannot read {path}: {json_problem(exc)}") from None
    if not isinstance(doc, dict) or not required <= doc.keys():
        raise UserError(f"{path} is not a {what} allocation (needs {', '.join(sorted(required))})")
    return doc


def block_sparsity(path: str | Path, n_blocks: int) -> tuple[np.ndarray, dict]:
    """The per-block ``sparsity`` of a saved allocation.json (or a folder holding one), for ``n_blocks`` blocks.

    Returns (float64 [L] in block order, the whole document). Its ``layers`` must
    be 0..L−1 in order and every ratio in [0, 1), else a :class:`UserError`.
    """
    p = Path(path)
    doc = read_json(p / ALLOCATION_FILE if p.is_dir() else p, "allocation")
    if not isinstance(doc, dict) or "sparsity" not in doc or "layers" not in doc:
        raise UserError(f"{path} is not a pruning allocation.json (needs 'layers' and 'sparsity')")
    try:
        ratios = np.asarray(doc["sparsity"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'sparsity' is not a list of numbers") from None
    layers = doc["layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise UserError(f"{path}: 'layers' must be a list of block indices (integers), got {json.dumps(layers)[:40]}")
    if layers != list(range(n_blocks)) or ratios.size != n_blocks:
        raise UserError(f"{path} allocates {ratios.size} blocks, the model has {n_blocks}")
    if not np.all(np.isfinite(ratios)) or np.any(ratios < 0) or np.any(ratios >= 1):
        raise UserError(f"{path}: every block's sparsity must be in [0, 1)")
    return ratios, doc


def write_allocation(folder: Path, doc: dict) -> Path:
    """Write ``folder/allocation.json``; ``layers`` (block indices) is required."""
    if "layers" not in doc:
        raise ValueError("an allocation document needs 'layers' (block indices)")
    return write_json(folder / ALLOCATION_FILE, doc)


# ----------------------------------------------------------------------------- config.json


def config_doc(command: str, args: Any) -> dict:
    """The config.json document of a run of ``command`` with the argument dataclass ``args``; a run on an lm-eval
    task (``--task lm-eval:NAME``) also records which lm-eval split fed train / validation / test
    (``lm_eval_splits``)."""
    from .lm_eval_io import split_mapping

    doc = {"command": command, "args": asdict(args), "version": __version__}
    splits = split_mapping(getattr(args, "task", None), getattr(args, "lm_eval_include", None))
    return {**doc, "lm_eval_splits": splits} if splits else doc


def write_config(out: Path, command: str, args: Any) -> Path:
    """Write ``out/config.json`` (the one place a config is written)."""
    return write_json(out / CONFIG_FILE, config_doc(command, args))


def read_config(path: str | Path) -> dict:
    """A config.json (or the folder holding one): ``{"command", "args", "version"}``.

    A bare object of options is read as ``{"args": it}``. A document that is not
    an object, ``args`` that is not an object, or a ``command`` that is not a
    string is a :class:`UserError` naming the file; the option values are
    checked against a command's fields by :func:`layerif.cli.check_config_args`.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    doc = read_json(p, "config")
    if not isinstance(doc, dict):
        raise UserError(f"{p} must hold a JSON object of options, got {type(doc).__name__}")
    if "args" not in doc:
        return {"args": doc}
    if not isinstance(doc["args"], dict):
        raise UserError(f"{p}: 'args' must be an object of options, got {type(doc['args']).__name__}")
    if not isinstance(doc.get("command", ""), str):
        raise UserError(f"{p}: 'command' must be a string")
    return doc
