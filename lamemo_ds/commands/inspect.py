"""`lamemo inspect` (and tools/inspect_checkpoint.py): what a checkpoint holds, from its files.

    lamemo inspect runs/x                      # the newest complete checkpoint of a run
    lamemo inspect runs/x/checkpoints/step-00001000 --tensors
    lamemo inspect out-hf/ --json

Step, layout (ZeRO stage, world size, pipeline map), training state, the model config, the
tensors (names, shapes, dtypes) and the manifest check; no model is built.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..checkpoint.safe_load import add_trust_argument

    p.add_argument("path", help="a run folder, its checkpoints/, one step-N/ folder, or a "
                   "consolidated / hf / reference folder")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of a named step folder's files (a run folder's "
                   "newest complete checkpoint is verified to be found)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_trust_argument(p)


def run(args) -> int:
    from ..checkpoint.manager import CheckpointError
    from ..convert.inspect import describe, inspect_path

    try:
        report = inspect_path(args.path, check=not args.no_verify,
                              log=lambda msg: print(msg, file=sys.stderr))
    except (CheckpointError, FileNotFoundError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(describe(report, tensors=args.tensors))
    manifest = report.get("manifest") or {}
    return 1 if manifest.get("ok") is False else 0
