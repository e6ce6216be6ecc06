"""Measure how much fp32 rounding a drawn example amplifies: the data behind `conformance.numerics`'
conditioning rule (`FP32_CONDITION_SHARE`).

    python benchmarks/calibrate_fp32.py [--examples N] [--bridge NAME] [--max-world 4]

A right fp32 bridge computes the oracle's function with other rounding (other summation orders,
tensor-parallel partial sums, fused kernels). Usually that moves the logits by a few 1e-7 relative,
but a config with a tiny hidden size and eps can amplify it without bound through its norms: then a
right bridge differs from the fp32 oracle by more than `FP32_RTOL`. The oracle run in float64 on the
same weights shows how far the fp32 oracle itself is from the exact function; this script measures
how that *conditioning error* bounds a right bridge's error.

For N fp32 examples drawn the suite's way (layouts of up to `--max-world` ranks, seeded random
draws, small configs and published structures, near-ties decided as the bridge decided them, as the
suite does), printed: quantiles of the conditioning error, of the bridge's error against the fp32
oracle (worst stage, as the equivalence property measures it), and of their ratio, for all
examples and for the published structures alone; and the examples with the largest bridge errors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conformance.cases import Case
from conformance.distributed import run_on_ranks, set_pool
from conformance.megatron_trace import merge_traces
from conformance.numerics import FP32_RTOL, ROUTING_MARGIN, NearTieFollower
from conformance.properties import chosen_experts, conditioning_error, prepare_checkpoint, stage_errors, worst_stage_error
from conformance.rank_pool import RankPool
from conformance.strategies import ConfigLimits, all_layouts, configs, inputs, seeds
from ernie_ref import ErnieMoeForCausalLM
from ernie_ref.published import structure_of

from calibration import calibration_parser, start_calibration  # benchmarks/calibration.py


def measure(bridge, case: Case) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hf = prepare_checkpoint(case, Path(tmp))
        ids = case.inputs.input_ids(case.config.vocab_size)
        actual = merge_traces(run_on_ranks("trace", bridge, case, hf))
        oracle = ErnieMoeForCausalLM.from_pretrained(hf).float()
        NearTieFollower(chosen_experts(actual), ROUTING_MARGIN).attach(oracle)
        expected = oracle(ids, trace=True)
        condition = conditioning_error(oracle, ids, expected, ROUTING_MARGIN)
    return {"condition": condition, "bridge": worst_stage_error(stage_errors(actual, expected, case.config)),
            "published": structure_of(case.config) is not None, "case": case.describe().replace("\n", "")}


def collect(bridge, examples: int, draw_seed: int, max_world: int) -> list[dict]:
    results: list[dict] = []

    @seed(draw_seed)
    @settings(max_examples=examples, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def body(data):
        layout = data.draw(st.sampled_from(all_layouts(max_world)), label="layout")
        cfg = data.draw(configs(ConfigLimits(), layout=layout), label="config")
        if bridge.unsupported(cfg) is not None:
            return
        published = structure_of(cfg) is not None
        case = Case(config=cfg, weights_seed=data.draw(seeds(), label="weights seed"),
                    inputs=data.draw(inputs(max_batch=2, max_seq_len=16, long_in_ten=0) if published else inputs(),
                                     label="inputs"), layout=layout)
        results.append(measure(bridge, case))

    body()
    return results


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"{at(0.5):.2e} | {at(0.9):.2e} | {at(0.99):.2e} | {ordered[-1]:.2e}"


def report(results: list[dict]) -> None:
    published = [r for r in results if r["published"]]
    print(f"\n{len(results)} fp32 examples, {len(published)} of published structures\n")
    print("| measure | median | 90% | 99% | max |")
    print("|---|---|---|---|---|")
    print(f"| conditioning error (fp32 oracle vs float64 oracle) | {quantiles([r['condition'] for r in results])} |")
    print(f"| bridge vs fp32 oracle (worst stage) | {quantiles([r['bridge'] for r in results])} |")
    ratios = [r["bridge"] / max(r["condition"], 1e-12) for r in results]
    print(f"| ratio bridge / conditioning | {quantiles(ratios)} |")
    if published:
        print(f"| published: conditioning error | {quantiles([r['condition'] for r in published])} |")
        print(f"| published: bridge vs fp32 oracle | {quantiles([r['bridge'] for r in published])} |")
    print("\nlargest bridge errors:")
    print("| bridge error | conditioning error | ratio | example |")
    print("|---|---|---|---|")
    for r in sorted(results, key=lambda r: -r["bridge"])[:8]:
        print(f"| {r['bridge']:.2e} | {r['condition']:.2e} | {r['bridge'] / max(r['condition'], 1e-12):.1f} | {r['case']} |")
    print("\n| set aside when conditioning error > | examples set aside | published ones kept | "
          "kept examples over FP32_RTOL | largest bridge error kept | largest ratio kept |")
    print("|---|---:|---:|---:|---:|---:|")
    for share in (1.0, 0.5, 0.3, 0.1, 0.03):
        kept = [r for r in results if r["condition"] <= share * FP32_RTOL]
        kept_published = sum(r["published"] for r in kept)
        over = sum(r["bridge"] > FP32_RTOL for r in kept)
        worst = max((r["bridge"] for r in kept), default=0.0)
        ratio = max((r["bridge"] / max(r["condition"], 1e-12) for r in kept), default=0.0)
        print(f"| {share:g} x {FP32_RTOL:g} | {len(results) - len(kept)} | {kept_published} of {len(published)} | "
              f"{over} | {worst:.2e} | {ratio:.1f} |")


def main() -> None:
    parser = calibration_parser(__doc__, examples=300)
    parser.add_argument("--max-world", type=int, default=4, help="largest layout drawn, in ranks")
    args = parser.parse_args()
    bridge = start_calibration(args.bridge)
    print(f"bridge {bridge.name} {bridge.version()}; {args.examples} drawn fp32 examples, layouts up to "
          f"{args.max_world} ranks, draw seed {args.seed}")
    with RankPool(args.max_world) as pool:
        set_pool(pool)
        report(collect(bridge, args.examples, args.seed, args.max_world))


if __name__ == "__main__":
    main()
