"""Start-up cost of the rank pool, and examples per minute of round_trip and equivalence per layout.

    python benchmarks/bench_layouts.py [--examples N] [--bridge NAME] [--layouts L,...]

Prints two tables.

1. Rank pool start-up: the first start of a `RankPool` of 2 and of 4 ranks in a fresh process
   (including multiprocessing's fork server, which imports torch and megatron-core once), a
   start with the fork server already up, and the restart that follows a failing call (every
   worker killed and replaced). Each size is measured in a process of its own, so that "first"
   really is first.
2. Examples per minute: for each layout, N examples of round_trip and of equivalence drawn the
   suite's way (a config valid for the layout, derandomized), run on a pool of exactly the
   layout's ranks (in this process for one rank), and again on one shared pool as large as the
   largest layout (as the suite runs them: a smaller layout's extra ranks are replicas).
   Valid examples per minute of wall time (rejected draws count towards the time, not the
   rate), and where this process's time goes. The pool's start is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench_properties sits next to this script (sys.path[0]): its drawing loop and phase timers.
import bench_properties

from conformance import distributed
from conformance.bridge import resolve_bridge
from conformance.parallel import start_megatron_process
from conformance.session import SuiteSession
from conformance.rank_pool import RankFailure, RankPool
from ernie_ref.layout import Layout

# One, two and four ranks, each kind of split at least once.
DEFAULT_LAYOUTS = (
    "tp1-pp1-ep1-vpp1",
    "tp2-pp1-ep1-vpp1,tp1-pp2-ep1-vpp1,tp1-pp1-ep2-vpp1",
    "tp2-pp2-ep1-vpp1,tp1-pp2-ep2-vpp2,tp4-pp1-ep1-vpp1,tp2-pp1-ep4-vpp1",
)
PROPERTIES = ("round_trip", "equivalence")


@dataclass(frozen=True)
class StartCost:
    """Seconds to start a pool of `ranks` ranks, and to recover from a failing call."""

    ranks: int
    first_start_s: float  # fork server cold: it imports torch and megatron-core first
    warm_start_s: float  # fork server up, a new pool
    failing_call_s: float  # a call that raises on every rank, until it returns RankFailure
    restart_s: float  # within that call: spawning the replacement workers


@dataclass(frozen=True)
class Rate:
    """How fast one property ran on one layout."""

    layout: Layout
    pool_ranks: int
    prop: str
    valid: int
    seconds: float
    phases: dict[str, float]

    @property
    def per_minute(self) -> float:
        return 60 * self.valid / self.seconds


# ------------------------------------------------------------------------------------------ part 1


def measure_start(ranks: int) -> StartCost:
    """In this (fresh) process: a first start, a warm start and a restart after failure."""
    first = RankPool(ranks)
    first.start()
    first_s = first.start_seconds
    first.close()
    pool = RankPool(ranks)
    pool.start()
    warm_s = pool.start_seconds
    began = time.perf_counter()
    try:
        pool.run(operator.truediv, 1, 0)  # ZeroDivisionError on every rank: a failure, then a restart
    except RankFailure:
        pass
    failing_call_s = time.perf_counter() - began
    restart_s = pool.start_seconds
    pool.close()
    return StartCost(ranks, first_s, warm_s, failing_call_s, restart_s)


def start_cost_in_fresh_process(ranks: int) -> StartCost:
    """`measure_start` in a new interpreter: the fork server is per process, started on first use."""
    out = subprocess.run([sys.executable, __file__, "--measure-start", str(ranks)],
                         capture_output=True, text=True, check=True)
    return StartCost(**json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------------------ part 2


def measure_rates(bridge: Any, layouts: list[Layout], pool_ranks: int | None, examples: int) -> list[Rate]:
    """Each property on each layout; `pool_ranks` None: a pool of each layout's own size."""
    rates = []
    shared = RankPool(pool_ranks) if pool_ranks is not None and pool_ranks > 1 else None
    try:
        for layout in layouts:
            own = None
            if shared is None and layout.world_size > 1:
                own = RankPool(layout.world_size)
            pool = shared or own
            if pool is not None:
                pool.start()  # not timed: the first table has it
            distributed.set_pool(pool)
            suite = SuiteSession(bridge=bridge, bridge_spec="", bridge_version=bridge.version(),
                                 counterexamples=Path("counterexamples"), layouts=[layout], checkpoint=None,
                                 dtypes=["float32"])
            try:
                for prop in PROPERTIES:
                    bench_properties.PHASES.clear()
                    valid, seconds = bench_properties.run_property(prop, suite, examples)
                    rates.append(Rate(layout, pool.world_size if pool is not None else 1, prop, valid, seconds,
                                      dict(bench_properties.PHASES)))
            finally:
                distributed.set_pool(None)
                if own is not None:
                    own.close()
    finally:
        if shared is not None:
            shared.close()
    return rates


# ------------------------------------------------------------------------------------------ output


def print_start_table(costs: list[StartCost]) -> None:
    print("| ranks | first start (cold fork server) s | start (warm fork server) s | failing call s | "
          "restart within it s |")
    print("|---:|---:|---:|---:|---:|")
    for c in costs:
        print(f"| {c.ranks} | {c.first_start_s:.2f} | {c.warm_start_s:.2f} | {c.failing_call_s:.2f} | "
              f"{c.restart_s:.2f} |")


def print_rate_table(rates: list[Rate]) -> None:
    print("| layout | ranks | pool ranks | property | examples | seconds | examples/min | where the time goes |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for r in rates:
        # What no phase timer covers: Hypothesis drawing, rejected draws, the property's own checks.
        other = max(0.0, r.seconds - sum(r.phases.values()))
        shares = sorted([*r.phases.items(), ("other (drawing, rejected draws)", other)], key=lambda kv: -kv[1])
        phases = ", ".join(f"{name} {100 * seconds / r.seconds:.0f}%" for name, seconds in shares)
        print(f"| {r.layout} | {r.layout.world_size} | {r.pool_ranks} | {r.prop} | {r.valid} | {r.seconds:.1f} | "
              f"{r.per_minute:.0f} | {phases} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20, help="examples per property and layout (default 20)")
    parser.add_argument("--bridge", default="reference")
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help="comma-separated layouts")
    parser.add_argument("--measure-start", type=int, default=None, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.measure_start is not None:
        print(json.dumps(measure_start(args.measure_start).__dict__))
        return

    costs = [start_cost_in_fresh_process(ranks) for ranks in (2, 4)]
    start_megatron_process()
    bridge = resolve_bridge(args.bridge)
    bench_properties.instrument(bridge)
    layouts = [Layout.parse(text) for text in args.layouts.split(",") if text.strip()]
    rates = measure_rates(bridge, layouts, None, args.examples)
    # As the suite runs them: every multi-rank layout on one pool as large as the largest layout
    # (one-rank layouts run in this process either way).
    largest = math.lcm(*(layout.world_size for layout in layouts))
    smaller = [layout for layout in layouts if 1 < layout.world_size < largest]
    if smaller:
        rates += measure_rates(bridge, smaller, largest, args.examples)
    print(f"bridge {bridge.name} {bridge.version()}; {args.examples} examples per property and layout")
    print()
    print_start_table(costs)
    print()
    print_rate_table(sorted(rates, key=lambda r: (r.layout.world_size, str(r.layout), r.pool_ranks, r.prop)))


if __name__ == "__main__":
    main()
