"""Subcommands of the `pyengine` CLI, one module each (see pyengine.cli)."""
