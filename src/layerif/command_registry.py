"""The command registry: every ``layerif`` sub-command is one :class:`Command`.

A command module (:mod:`layerif.commands`) defines its argument dataclass
(composed of the option groups of :mod:`layerif.options`), its checks, its
terminal text and a ``run(args) -> str`` that calls the library once, and
registers itself here with :func:`register` (through
:mod:`layerif.commands.base`). :mod:`layerif.cli` builds the parser from
:data:`COMMANDS`; :mod:`layerif.report` reads the defaults from it to spell a
run's command line, and each command's report renderer. The registry is a library module so that the library never
imports a command: it sees the commands that were imported, and none otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError


Renderer = Callable[[Path, "dict | None"], "tuple[str, list]"]
"""``render(folder, config) -> (title, blocks)``: a command's report of its result folder from the folder's files
(``config``: its config.json, None when there is none; ``blocks``: :class:`layerif.report.Block` s)."""


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, argument dataclass, ``run(args) -> text to print``, one-line help and the
    renderer of its report (:data:`Renderer`; None: :mod:`layerif.report`'s generic one)."""

    name: str
    args: type
    run: Callable[[Any], str]
    help: str
    report: Renderer | None = None


COMMANDS: dict[str, Command] = {}


def register(name: str, args: type, run: Callable[[Any], str], help: str, report: Renderer | None = None) -> Command:
    """Add a sub-command (its order of registration is the order of ``layerif --help``) with its report renderer."""
    COMMANDS[name] = command = Command(name, args, run, help, report)
    return command


def defaults(command: str) -> dict | None:
    """{option field: default} of a command's argument dataclass, ``None`` when the command is unknown."""
    if command not in COMMANDS:
        return None
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            for f in dataclasses.fields(COMMANDS[command].args)}


# ----------------------------------------------------------------------------- argument values


def field_type(tp: object) -> tuple[type, bool]:
    """(the scalar type of a field annotation, whether it is optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return field_type(args[0])[0], True
    if origin in (list, tuple):
        return list, False
    return tp, False  # type: ignore[return-value]


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
               list: "a list of strings"}


def _check_value(name: str, value: Any, tp: object, where: str) -> None:
    """A config value must have its field's type (None only for optional fields); floats must be finite."""
    base, optional = field_type(tp)
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
    for f in fields(cls):
        if f.name in values:
            _check_value(f.name, values[f.name], hints[f.name], where)
