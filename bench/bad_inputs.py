"""The bad-input suite (tests/test_bad_inputs.py) as a result: how many bad inputs each command
was given, the exit codes they must end with, and how many passed.

    python bench/bad_inputs.py --json bench/bad_inputs.json

Runs the suite with pytest (about a minute on 2 cores; --tiny runs the same) and counts its
outcomes from a JUnit report; the expected exit codes come from the suite's own case table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/test_bad_inputs.py"


def _outcomes(report: Path) -> dict[str, str]:
    """test name -> passed / failed / error / skipped, from a JUnit XML report."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        out[case.get("name")] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                                 else "skipped" if "skipped" in kinds else "passed")
    return out


def summarize(outcomes: dict[str, str], cases: dict) -> dict:
    """Per command: cases, expected exit codes, passed; and the scenario tests apart."""
    per: dict[str, Counter] = {}
    for name, (_build, code, _says) in cases.items():
        command = name.split(":")[0]
        c = per.setdefault(command, Counter())
        c["cases"] += 1
        c[f"exit {code}"] += 1
        c["passed"] += outcomes.get(f"test_bad_input[{name}]") == "passed"
    scenarios = {k: v for k, v in outcomes.items() if not k.startswith("test_bad_input[")}
    return {"cases": len(cases), "passed": sum(c["passed"] for c in per.values()),
            "commands": {k: dict(v) for k, v in per.items()},
            "scenarios": scenarios,
            "scenarios_passed": sum(v == "passed" for v in scenarios.values())}


def report(s: dict) -> str:
    lines = [f"bad inputs: {s['cases']} cases over {len(s['commands'])} commands ({SUITE}), "
             f"{s['passed']} passed, {s['cases'] - s['passed']} not",
             f"  {'command':<10} {'cases':>5} {'exit 2':>7} {'exit 1':>7} {'passed':>7}"]
    for name, c in s["commands"].items():
        lines.append(f"  {name:<10} {c['cases']:>5} {c.get('exit 2', 0):>7} "
                     f"{c.get('exit 1', 0):>7} {c['passed']:>7}")
    lines.append("  each: the exit code, stderr names the problem, no traceback, no file left "
                 "or changed")
    lines.append(f"the file's other tests (fresh start + requeue, bit flip, vocab auto, stop in "
                 f"the final eval, prepare counts...): {s['scenarios_passed']} of "
                 f"{len(s['scenarios'])} passed")
    for name, outcome in s["scenarios"].items():
        lines.append(f"  {outcome:<7} {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--tiny", action="store_true", help="the same run (it is already small)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    from test_bad_inputs import CASES

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               SUITE, f"--junitxml={xml}"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if not xml.is_file():
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            return 1
        s = summarize(_outcomes(xml), CASES)
    print(report(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=2) + "\n")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
