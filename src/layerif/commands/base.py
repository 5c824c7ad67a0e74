"""The commands' import point of the command registry (:mod:`layerif.command_registry`, a library module so
that :mod:`layerif.report` reads it without importing a command)."""

from __future__ import annotations

from ..command_registry import COMMANDS, Command, Renderer, check_config_args, defaults, field_type, register

__all__ = ["COMMANDS", "Command", "Renderer", "check_config_args", "defaults", "field_type", "register"]
