"""Subcommands of the `lamemo` CLI that do not belong to one subsystem."""
