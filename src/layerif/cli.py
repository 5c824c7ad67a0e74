"""The ``layerif`` command line: a thin shell over the Python API.

Each sub-command is an argument dataclass plus a function that takes it and
returns the text to print (the library itself never prints). The
options are generated from the dataclass fields (``--damping-scale`` for
``damping_scale``, help text from the field's metadata), so the CLI and the
config saved beside every result are the same thing. A :class:`UserError`
becomes one line on stderr and exit status 2; a detected numeric fault
(:class:`FloatingPointError`) and running out of memory exit status 1; Ctrl-C
status 130 and SIGTERM 143, each with one line. Any other exception is a bug and
keeps its traceback (exit status 1).

Every float option must be finite. ``--config FILE`` replays a saved run's
options, checked against the command's fields and types; switches marked
``from_config: False`` (``--trust-remote-code``, ``--overwrite``) are never taken
from a file, only from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
import typing
from typing import NoReturn

from . import __version__, progress
from .commands.base import COMMANDS, check_config_args, field_type
from .errors import Terminated, UserError, is_out_of_memory



def load_commands() -> None:
    """Import every command module; each registers itself in :data:`COMMANDS`, in the order of ``--help``.

    Done on demand (by :func:`make_parser`), not at import: the command modules
    import torch and transformers, and :func:`main` sets its signal handlers first.
    """
    from .commands import (  # noqa: F401
        score,
        plan,
        tasks,
        prune,
        compare_pruning,
        compare_tasks,
        compare_estimators,
        validate,
        report,
        moe,
        compare_moe,
        finetune,
        compare_finetune,
    )


def with_default(help_: str, default: object) -> str:
    """``help_`` followed by ``(default: …)``, once: a help text that already states its default in its own words
    (it says "default", or "X unless Y") is kept as it is, so no option reads ``(default: X) (default: None)``."""
    if "default" in help_.lower() or " unless " in help_:
        return help_
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f"{help_} (default: {shown})"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field; list fields take comma-separated values; each default is shown once
    (:func:`with_default`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS,
                                help=with_default(f.metadata.get("help", ""), f.default))
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = field_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=with_default(help_, default), **kw)
            continue
        if tp is list:
            kw["type"] = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        elif tp is float:
            kw["type"] = finite_float
        elif tp is int:
            kw["type"] = int64
        elif tp is str:
            kw["type"] = str
        if "choices" in f.metadata:  # validated by the command itself, for a one-line error
            help_ = f"{help_}; one of {', '.join(f.metadata['choices'])}"
        parser.add_argument(flag, help=with_default(help_, default), metavar=f.metadata.get("metavar"), **kw)


def finite_float(text: str) -> float:
    """argparse type: a finite float (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def int64(text: str) -> int:
    """argparse type: an integer that fits 64 bits (a seed or count beyond it would overflow in torch / numpy)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -2 ** 63 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must fit 64 bits (got {text})")
    return value


def build_args(cls: type, ns: argparse.Namespace) -> object:
    """The dataclass from parsed options; ``--config FILE`` supplies values not given on the line.

    Fields marked ``from_config: False`` (code execution, overwriting) are never read from the file.
    """
    values: dict = {}
    if getattr(ns, "config", None):
        from .results import read_config  # here: cli imports nothing heavy before main() sets its signal handlers

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
    load_commands()
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help,
                           description=(command.args.__doc__ or command.help).strip().splitlines()[0])
        add_dataclass_arguments(p, command.args)
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
        command = COMMANDS[ns.command]
        if in_main:  # from here on a signal unwinds the run (temporary folders removed, lock released)
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            signal.signal(signal.SIGTERM, _terminate)
        progress.enable(not ns.quiet)
        _quiet_libraries(ns.quiet)
        summary = command.run(build_args(command.args, ns))
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise  # a bug: its traceback, exit status 1
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{name}: error: out of memory ({first[:200]}); lower the need with --max-memory, --mode streaming or "
              "a narrower --target, or share it with --world-size (see `layerif plan`)", file=sys.stderr)
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
