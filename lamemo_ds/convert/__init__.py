"""Checkpoint conversion: one registry of formats (deepspeed, consolidated, hf, reference), each
with a reader and a writer (registry.py, with the one format detector `detect_format`), shared by
`lamemo convert` and the programs in tools/; inspection and verification of checkpoints
(inspect.py, verify.py); import and export of the authors' reference state dicts
(`from_reference`, `to_reference`).

Rule: one module per format; hf and reference build on the consolidated format, the registry on
all of them, convert/inspect/verify on the registry (the contract in pyproject.toml). Training
checkpoint files are read through checkpoint/, one layer down.
"""

from .reference import from_reference, to_reference

__all__ = ["from_reference", "to_reference"]
