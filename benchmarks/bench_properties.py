"""Examples per minute and peak memory of each conformance property, at world size 1.

    python benchmarks/bench_properties.py [--examples N] [--bridge NAME] [--structure NAME] [--dtype D]

Runs each property the way the suite does (Hypothesis, derandomized) for N examples and prints a
table: examples per minute (valid ones; rejected draws count towards the time, not the rate),
peak resident memory of the process after the property, and where the time went. `--structure`
draws every config as that published structure (ernie_ref.published; widths narrowed as the suite
narrows them), `small` as small configs alone; by default the suite's mix.
"""

from __future__ import annotations

import argparse
import sys
import resource
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from functools import wraps
from pathlib import Path

from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

warnings.filterwarnings("ignore")

from conformance import properties  # noqa: E402
from conformance.bridge import resolve_bridge  # noqa: E402
from conformance.parallel import start_megatron_process  # noqa: E402
from conformance.session import SuiteSession  # noqa: E402
from conformance.strategies import ConfigLimits  # noqa: E402
from conformance.suite.drawing import draw_case  # noqa: E402
from ernie_ref.published import PUBLISHED_STRUCTURES  # noqa: E402
from ernie_ref.layout import Layout  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)


def timed(phase: str, fn: Callable) -> Callable:
    @wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[phase] += time.perf_counter() - start

    return wrapper


def instrument(bridge) -> None:
    properties.prepare_checkpoint = timed("write checkpoint", properties.prepare_checkpoint)
    properties.run_on_ranks = timed("megatron side (init, build, load, forward or export)", properties.run_on_ranks)
    properties.oracle_trace = timed("oracle forward", properties.oracle_trace)
    properties.load_transformers_model = timed("transformers load", properties.load_transformers_model)
    properties.diff_checkpoints = timed("compare checkpoints", properties.diff_checkpoints)


def run_property(name: str, suite, examples: int) -> tuple[int, float]:
    counts = {"valid": 0, "failures": 0}

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def body(data):
        case = draw_case(data, suite, name)
        try:
            properties.run_property(name, suite.bridge, case)
        except properties.SetAside:
            reject()
        except properties.PropertyFailure as failure:  # counted and shown, not a reason to stop measuring
            counts["failures"] += 1
            print(f"FAILURE while measuring: {failure}", file=sys.stderr)
        counts["valid"] += 1

    start = time.perf_counter()
    body()
    return counts["valid"], time.perf_counter() - start


def limits_for(structure: str) -> ConfigLimits:
    if structure == "mix":
        return ConfigLimits()
    if structure == "small":
        return ConfigLimits(published_in_ten=0)
    return ConfigLimits(published_in_ten=10, structures=(structure,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--bridge", default="reference")
    parser.add_argument("--structure", choices=["mix", "small", *PUBLISHED_STRUCTURES], default="mix")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    start_megatron_process()
    bridge = resolve_bridge(args.bridge)
    instrument(bridge)
    suite = SuiteSession(bridge=bridge, bridge_spec=args.bridge, bridge_version=bridge.version(),
                         counterexamples=Path("counterexamples"), layouts=[Layout()], checkpoint=None,
                         dtypes=[args.dtype], config_limits=limits_for(args.structure))
    rows = []
    for name in ("import", "round_trip", "equivalence", "interop", "refusal"):
        PHASES.clear()
        valid, seconds = run_property(name, suite, args.examples)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        phases = ", ".join(f"{k} {100 * v / seconds:.0f}%" for k, v in sorted(PHASES.items(), key=lambda kv: -kv[1]))
        rows.append((name, valid, seconds, 60 * valid / seconds, peak_mb, phases))
    print(f"bridge {bridge.name} {bridge.version()}, {args.examples} examples per property, world size 1, "
          f"configs: {args.structure}, {args.dtype}")
    print(f"| property | examples | seconds | examples/min | peak RSS MB | where the time goes |")
    print(f"|---|---:|---:|---:|---:|---|")
    for name, valid, seconds, rate, peak, phases in rows:
        print(f"| {name} | {valid} | {seconds:.1f} | {rate:.0f} | {peak:.0f} | {phases} |")


if __name__ == "__main__":
    main()
