#!/usr/bin/env python3
"""Inspect a checkpoint or model folder without loading it into a model.

The same program as `lamemo inspect` (lamemo_ds/commands/inspect.py), for cluster users and scripts
(slurm/*.sbatch) that call a file: `python tools/inspect_checkpoint.py --help`. Needs lamemo_ds
importable (`make venv`, `pip install .`, or PYTHONPATH=the repository root).
"""

import sys

try:
    from lamemo_ds.cli import standalone
except ImportError as e:  # the package is not installed in this interpreter
    sys.exit(f"inspect_checkpoint.py: cannot import lamemo_ds ({e}); activate the environment "
             "that has it (make venv; source .venv/bin/activate) or set PYTHONPATH to the "
             "repository root")

if __name__ == "__main__":
    sys.exit(standalone("inspect", "inspect_checkpoint.py"))
