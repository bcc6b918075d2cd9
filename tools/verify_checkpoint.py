#!/usr/bin/env python3
"""Verify that a checkpoint or export folder is complete, intact and loadable.

The same program as `lamemo verify` (lamemo_ds/commands/verify.py), for cluster users and scripts
(slurm/*.sbatch) that call a file: `python tools/verify_checkpoint.py --help`. Needs lamemo_ds
importable (`make venv`, `pip install .`, or PYTHONPATH=the repository root).
"""

import sys

try:
    from lamemo_ds.cli import standalone
except ImportError as e:  # the package is not installed in this interpreter
    sys.exit(f"verify_checkpoint.py: cannot import lamemo_ds ({e}); activate the environment "
             "that has it (make venv; source .venv/bin/activate) or set PYTHONPATH to the "
             "repository root")

if __name__ == "__main__":
    sys.exit(standalone("verify", "verify_checkpoint.py"))
