"""The ``layerif`` command line: a thin shell over the Python API.

Each sub-command is an argument dataclass plus a function that takes it and
returns the text to print (the library itself never prints). The
options are generated from the dataclass fields (``--damping-scale`` for
``damping_scale``, help text from the field's metadata), so the CLI and the
config saved beside every result are the same thing. A :class:`UserError`
becomes one line on stderr and exit status 2; a detected numeric fault
(:class:`FloatingPointError`) exit status 1; Ctrl-C status 130 and SIGTERM 143,
each with one line.

Every float option must be finite. ``--config FILE`` replays a saved run's
options, checked against the command's fields and types; switches marked
``from_config: False`` (``--trust-remote-code``, ``--overwrite``) are never taken
from a file, only from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from . import __version__, progress
from .errors import Terminated, UserError

# sub-command -> (module, argument dataclass name, run function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "score": ("layerif.scores", "ScoreArgs", "run", "per-layer influence scores of a model on a task"),
    "tasks": ("layerif.tasks", "TasksArgs", "run", "list the built-in tasks with chance level and model accuracy"),
    "prune": ("layerif.prune", "PruneArgs", "run", "prune a model with per-layer sparsity from LayerIF scores or a baseline allocation"),
    "compare-pruning": ("layerif.prune", "CompareArgs", "run_compare", "compare pruning allocations x pruners x sparsities over calibration seeds"),
    "compare-tasks": ("layerif.compare", "CompareTasksArgs", "run_tasks", "score one model on several tasks and compare the block profiles"),
    "compare-estimators": ("layerif.compare", "CompareEstimatorsArgs", "run_estimators", "datainf, exact, grad-dot and LiSSA on the same gradients: agreement of the block rankings"),
    "validate": ("layerif.validate", "ValidateArgs", "run", "measure each block's fine-tune gain and pruning sensitivity and test whether the layer scores predict them"),
    "report": ("layerif.report", "ReportArgs", "run", "re-render report.md and report.html of a result folder"),
    "moe": ("layerif.moe", "MoeArgs", "run", "fine-tune a LoRA mixture of experts with per-layer expert counts from LayerIF scores"),
    "compare-moe": ("layerif.moe", "CompareMoeArgs", "run_compare", "compare LoRA-MoE expert allocations (LayerIF, AlphaLoRA, uniform) over seeds"),
}


def _base_type(tp: object) -> tuple[type, bool]:
    """(the scalar type of a field annotation, whether it is optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    if origin in (list, tuple):
        return list, False
    return tp, False  # type: ignore[return-value]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field; list fields take comma-separated values."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {f.default})")
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{help_} (default: {default})", **kw)
            continue
        if tp is list:
            kw["type"] = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        elif tp is float:
            kw["type"] = finite_float
        elif tp in (int, str):
            kw["type"] = tp
        if "choices" in f.metadata:  # validated by the command itself, for a one-line error
            help_ = f"{help_}; one of {', '.join(f.metadata['choices'])}"
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(flag, help=f"{help_} (default: {shown})", metavar=f.metadata.get("metavar"), **kw)


def finite_float(text: str) -> float:
    """argparse type: a finite float (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
               list: "a list of strings"}


def _check_value(name: str, value: Any, tp: object, where: str) -> None:
    """A config value must have its field's type (None only for optional fields); floats must be finite."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return
    elif base is bool and isinstance(value, bool):
        return
    elif base is int and isinstance(value, int) and not isinstance(value, bool):
        return
    elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return
    elif base is str and isinstance(value, str):
        return
    elif base is list and isinstance(value, list) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                          for x in value):
        return
    shown = json.dumps(value)
    raise UserError(f"{where}: '{name}' must be {_TYPE_NAMES.get(base, str(base))}, got {shown[:40]}")


def check_config_args(values: dict, cls: type, where: str) -> None:
    """Every value of a config's ``args`` that is a field of ``cls`` must have the field's type."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            _check_value(f.name, values[f.name], hints[f.name], where)


def build_args(cls: type, ns: argparse.Namespace) -> object:
    """The dataclass from parsed options; ``--config FILE`` supplies values not given on the line.

    Fields marked ``from_config: False`` (code execution, overwriting) are never read from the file.
    """
    values: dict = {}
    if getattr(ns, "config", None):
        from .results import read_config

        saved = read_config(ns.config)["args"]
        check_config_args(saved, cls, ns.config)
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("from_config", True)}
        values.update({k: v for k, v in saved.items() if k in names})
    values.update({k: v for k, v in vars(ns).items() if k not in ("command", "config", "quiet")})
    return cls(**values)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's bad-input contract: one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layerif", description="Layer-wise influence scores for pretrained LLMs.")
    parser.add_argument("--version", action="version", version=f"layerif {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, cls_name, _, help_) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        p = sub.add_parser(name, help=help_, description=(cls.__doc__ or help_).strip().splitlines()[0])
        add_dataclass_arguments(p, cls)
        p.add_argument("--config", help="a config.json saved by an earlier run; options given here override it")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _quiet_libraries(quiet: bool) -> None:
    """Library warnings go; with --quiet, the libraries' own progress bars go too."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


def _terminate(signum: int, frame: object) -> NoReturn:
    raise Terminated(signum)


def _exit_now(signum: int, frame: object) -> NoReturn:
    """While the libraries import nothing is written yet: stop at once (an exception raised inside a
    half-imported native module would surface as an unrelated ImportError)."""
    sys.stderr.write(f"layerif: {'interrupted' if signum == signal.SIGINT else 'terminated (SIGTERM)'}\n")
    sys.stderr.flush()
    os._exit(130 if signum == signal.SIGINT else 143)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 numeric fault, 2 bad input, 130 Ctrl-C, 143 SIGTERM)."""
    name = "layerif"
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        previous = {s: signal.signal(s, _exit_now) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        parser = make_parser()
        ns, extra = parser.parse_known_args(argv)
        name = f"layerif {ns.command}"
        if extra:
            parser.exit(2, f"{name}: error: unrecognized arguments: {' '.join(extra)} (see {name} --help)\n")
        module, cls_name, fn_name, _ = COMMANDS[ns.command]
        mod = importlib.import_module(module)
        run: Callable = getattr(mod, fn_name)
        if in_main:  # from here on a signal unwinds the run (temporary folders removed, lock released)
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            signal.signal(signal.SIGTERM, _terminate)
        progress.enable(not ns.quiet)
        _quiet_libraries(ns.quiet)
        args = build_args(getattr(mod, cls_name), ns)
        summary = run(args)
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
