"""The ``layerif`` sub-commands, one module each; :mod:`layerif.commands.base` is their registry.

Importing a command module registers it; :mod:`layerif.cli` imports them all.
"""
