"""Checkpoints: atomic save/resume, conversion and reference import/export."""

from .reference import from_reference, to_reference

__all__ = ["from_reference", "to_reference"]
