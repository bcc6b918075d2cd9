"""Checkpoint conversion: one registry of formats (deepspeed, consolidated, hf, reference), each
with a reader and a writer (registry.py), shared by `lamemo convert` and the programs in tools/;
inspection and verification of checkpoints (inspect.py, verify.py); import and export of the
authors' reference state dicts (`from_reference`, `to_reference`)."""

from .reference import from_reference, to_reference

__all__ = ["from_reference", "to_reference"]
