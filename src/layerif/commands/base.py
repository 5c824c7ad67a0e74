"""The command registry: every ``layerif`` sub-command is one :class:`Command`.

A command module defines its argument dataclass (composed of the option groups
of :mod:`layerif.options`), its checks, its terminal text and a ``run(args) ->
str`` that calls the library once, and registers itself here with
:func:`register`. :mod:`layerif.cli` builds the parser from :data:`COMMANDS`;
:mod:`layerif.report` reads the defaults from it to spell a run's command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, argument dataclass, ``run(args) -> text to print`` and one-line help."""

    name: str
    args: type
    run: Callable[[Any], str]
    help: str


COMMANDS: dict[str, Command] = {}


def register(name: str, args: type, run: Callable[[Any], str], help: str) -> Command:
    """Add a sub-command (its order of registration is the order of ``layerif --help``)."""
    COMMANDS[name] = command = Command(name, args, run, help)
    return command


def defaults(command: str) -> dict | None:
    """{option field: default} of a command's argument dataclass, ``None`` when the command is unknown."""
    if command not in COMMANDS:
        return None
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            for f in dataclasses.fields(COMMANDS[command].args)}
