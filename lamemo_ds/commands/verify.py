"""`lamemo verify` (and tools/verify_checkpoint.py): is a checkpoint or export folder complete,
intact and loadable? Prints one line per check; exits 1 if one failed.

    lamemo verify runs/x                       # the newest complete checkpoint of a run
    lamemo verify runs/x/checkpoints/step-00001000
    lamemo verify out-hf/

See convert/verify.py for what is checked.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..checkpoint.safe_load import add_trust_argument

    p.add_argument("path", help="a run folder, its checkpoints/, one step-N/ folder, or a "
                   "consolidated / hf / reference folder")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    add_trust_argument(p)


def run(args) -> int:
    from dataclasses import asdict

    from ..convert.verify import verify_path

    checks = verify_path(args.path, log=lambda msg: print(msg, file=sys.stderr))
    failed = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps({"path": str(args.path), "ok": not failed,
                          "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<15} {c.detail}")
        print(f"{args.path}: " + ("verified" if not failed else
                                  f"{len(failed)} check(s) failed"))
    return 1 if failed else 0
