"""Time to all findings for bridges with independent planted defects: the search isolates each
failure's trigger and searches again without it, until no new finding appears.

    python benchmarks/bench_findings.py [--profile ci] [--jobs 2] [--bridges conformance.mutants:ThreePlantedDefects]

Runs `ernie-conformance certify` for each bridge (layouts of up to 4 ranks, fp32 and bf16) and prints
a table: wall seconds to the certificate, the findings and how many of the planted defects
(`planted` of the bridge's class) came out as their own finding with their trigger, and per
property the seconds and the examples run to shrink failures and isolate triggers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_BRIDGES = ["conformance.mutants:ThreePlantedDefects"]
PROPERTIES = ("import", "round_trip", "equivalence", "interop", "refusal")


def planted_found(bridge: str, findings: list[dict]) -> tuple[int, int]:
    """(planted defects that are exactly one finding with the planted trigger condition, planted)."""
    module, _, name = bridge.partition(":")
    planted = getattr(getattr(importlib.import_module(module), name), "planted", ())
    found = sum(1 for prop, kind, words in planted
                if len([f for f in findings if f["kind"] == kind and prop in f["properties"]
                        and any(c["words"] == words for c in f["trigger"] or [])]) == 1)
    return found, len(planted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="ci", choices=["dev", "ci", "thorough"])
    parser.add_argument("--bridges", default=",".join(DEFAULT_BRIDGES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--published-in-ten", type=int, default=None, help="as certify's (default 2)")
    parser.add_argument("--layouts", default=None, help="as certify's --layouts (default: every layout of up to 4 ranks)")
    args = parser.parse_args()
    rows = []
    for bridge in args.bridges.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-findings-") as tmp:
            command = [sys.executable, "-m", "conformance", "certify", "--bridge", bridge, "--profile", args.profile,
                       "--out", tmp, "--jobs", str(args.jobs)]
            if args.max_examples:
                command += ["--max-examples", str(args.max_examples)]
            if args.published_in_ten is not None:
                command += ["--published-in-ten", str(args.published_in_ten)]
            if args.layouts:
                command += ["--layouts", args.layouts]
            start = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            file = Path(tmp) / "certificate.json"
            if not file.is_file():
                sys.exit(f"{bridge}: certify wrote no certificate (exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
            certificate = json.loads(file.read_text())
        findings = certificate["findings"]
        found, planted = planted_found(bridge, findings)
        props = certificate["properties"]
        cells = [f"{props[p]['duration_s']:.0f}s ({props[p]['shrink_calls']} + {props[p].get('isolation_calls', 0)})"
                 if p in props else "not run" for p in PROPERTIES]
        rows.append((bridge.split(":")[-1], wall, len(findings), f"{found}/{planted}", cells))
        for f in findings:
            print(f"  {bridge.split(':')[-1]}: {f['id']}: {f['summary']}", file=sys.stderr)
    print(f"profile ernie-{args.profile}, {args.jobs} processes; a property's cell: seconds "
          "(examples run to shrink failures + moved examples run to isolate triggers)")
    print("| bridge | seconds to all findings | findings | planted found | import | round_trip | equivalence "
          "| interop | refusal |")
    print("|---|---:|---:|---:|---|---|---|---|---|")
    for name, wall, n, found, cells in rows:
        print(f"| {name} | {wall:.0f} | {n} | {found} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
