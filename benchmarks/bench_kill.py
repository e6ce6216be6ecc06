"""Time to kill and shrink time of every mutant, at the ci profile.

    python benchmarks/bench_kill.py [--mutants a,b] [--profile ci]

For each mutant of `conformance/mutants/`, runs the property that is expected to kill it, the
way the suite runs (a fresh pytest process, layouts drawn from every layout of up to 4 ranks,
shrinking on), and prints a table: the number of the first failing example, the seconds to it
(time to kill), the seconds spent after it (shrinking to a minimal counterexample), and the
process's wall time (which includes pytest, torch and megatron start-up). Ends with the median
and the maximum time to kill. Targets (issue 6): median under 10 s, every mutant under 60 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conformance.kill_matrix import run_mutant  # noqa: E402
from conformance.mutants import MUTANTS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--profile", default="ci")
    args = parser.parse_args()
    names = args.mutants.split(",") if args.mutants else list(MUTANTS)

    rows, kill_times = [], []
    print(f"{'mutant':<38} {'property':<12} {'example':>7} {'to kill s':>9} {'shrink s':>9} {'process s':>9}")
    for name in names:
        prop = MUTANTS[name].killed_by
        start = time.perf_counter()
        run = run_mutant(name, props=(prop,), profile=args.profile, shrink=True)
        wall = time.perf_counter() - start
        kill = run.kills.get(prop)
        if run.error or kill is None or not kill.killed:
            print(f"{name:<38} {prop:<12} {'SURVIVED' if not run.error else 'ERROR':>7} {run.error[-200:]}")
            continue
        shrink = kill.total_seconds - kill.seconds
        kill_times.append(kill.seconds)
        rows.append((name, prop, kill.examples, kill.seconds, shrink, wall))
        print(f"{name:<38} {prop:<12} {kill.examples:>7} {kill.seconds:>9.2f} {shrink:>9.2f} {wall:>9.1f}", flush=True)
    if kill_times:
        shrinks = [r[4] for r in rows]
        print(f"\n{len(kill_times)}/{len(names)} killed; time to kill: median {statistics.median(kill_times):.2f} s, "
              f"max {max(kill_times):.2f} s; shrink: median {statistics.median(shrinks):.2f} s, max {max(shrinks):.2f} s")
    return 0 if len(kill_times) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
