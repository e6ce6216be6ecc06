"""Time to all verdicts for bridges that fail everything: shrinking is bounded (--max-shrinks), so
such a bridge gets its certificate in about a minute instead of minutes per property.

    python benchmarks/bench_verdicts.py [--profile ci] [--bridges conformance.mutants:LoadAlwaysRaises,...]

Runs `ernie-conformance certify` for each bridge (one process, layouts of up to 4 ranks) and prints a
table: wall seconds for the whole certification, and per property the verdict, seconds and the
examples spent shrinking.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_BRIDGES = ["conformance.mutants:LoadAlwaysRaises", "conformance.mutants:ExpertBiasWeighsExperts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="ci", choices=["dev", "ci", "thorough"])
    parser.add_argument("--bridges", default=",".join(DEFAULT_BRIDGES))
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--published-in-ten", type=int, default=None, help="as certify's (default 2)")
    args = parser.parse_args()
    rows = []
    for bridge in args.bridges.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-verdicts-") as tmp:
            command = [sys.executable, "-m", "conformance", "certify", "--bridge", bridge, "--profile", args.profile,
                       "--out", tmp, "--jobs", "1"]
            if args.max_examples:
                command += ["--max-examples", str(args.max_examples)]
            if args.published_in_ten is not None:
                command += ["--published-in-ten", str(args.published_in_ten)]
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            certificate = json.loads((Path(tmp) / "certificate.json").read_text())
        cells = [f"{e['verdict']} {e['duration_s']:.0f}s ({e['shrink_calls']})" for e in certificate["properties"].values()]
        rows.append((bridge.split(":")[-1], wall, cells, certificate["profile"]["max_shrinks"]))
    print(f"profile ernie-{args.profile}; a cell: verdict, seconds (examples run to shrink the failure)")
    print("| bridge | all verdicts s | max shrinks | import | round_trip | equivalence | interop | refusal |")
    print("|---|---:|---:|---|---|---|---|---|")
    for name, wall, cells, shrinks in rows:
        print(f"| {name} | {wall:.0f} | {shrinks} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
