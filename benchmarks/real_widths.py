"""Equivalence and round trip of the reference bridge at the real ERNIE-4.5-21B-A3B widths, bf16,
long inputs: the GPU part of issue 15, run by `benchmarks/gpu_check.sh`.

    python benchmarks/real_widths.py [--layers 4] [--seq-len 4096] [--device cuda]

The config is 21B-A3B's in every width (hidden 2560, 20/4 heads of 128, dense intermediate 12288,
64 experts of width 1536, top-6, two shared experts, vocab 103424, MoE from layer 1, tied) with
fewer layers (`--layers`, as many as fit the time). A bf16 checkpoint (router in fp32) is written,
and the suite's own equivalence check runs on it: the bridge's Megatron-Core model on `--device`, the
oracle in fp32 on the CPU, near-ties followed, router weights judged on the model's own input, the
bf16 tolerance. Then the round trip, bit-exact. Prints one table row per property: outcome, seconds,
the worst stage error, and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

from conformance.process_setup import hide_gpus

# Every warning, not only megatron-core's (conformance.process_setup.MEGATRON_WARNINGS): the script
# prints a table to paste, which any warning would break up.
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cpu":
        hide_gpus()  # as the suite's --device cpu: the bridge must not see a GPU
    import torch

    from conformance.cases import Case, Inputs
    from conformance.cpu_patches import apply_cpu_patches
    from conformance.numerics import tolerance
    from conformance.parallel import init_process_group_once
    from conformance.properties import PropertyFailure, run_property
    from ernie_ref.megatron import ReferenceBridge
    from ernie_ref.published import published_config

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        torch.cuda.set_device(0)
    apply_cpu_patches()  # a no-op where CUDA is available
    init_process_group_once()
    cfg = published_config("ERNIE-4.5-21B-A3B")
    cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers, moe_layer_end_index=args.layers - 1)
    case = Case(config=cfg, weights_seed=0, inputs=Inputs(batch=1, seq_len=args.seq_len, seed=0), dtype="bfloat16")
    bridge = ReferenceBridge()
    print(f"{cfg.one_line()}\nbf16, inputs 1 x {args.seq_len}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, tolerance {tolerance('bfloat16').rtol:g}\n")
    print("| property | outcome | seconds | worst stage error | peak GPU memory GiB |")
    print("|---|---|---:|---:|---:|")
    failed = False
    for prop in ("equivalence", "round_trip"):
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            observed = run_property(prop, bridge, case)
            outcome = "pass"
            errors = observed.get("stage_errors", [])
        except PropertyFailure as failure:
            outcome, failed = f"fail: {failure.detail.splitlines()[0]}", True
            errors = failure.evidence.get("stage_errors", [])
        seconds = time.perf_counter() - start
        worst = max(errors, key=lambda e: e[1]) if errors else None
        peak = torch.cuda.max_memory_allocated() / 1024**3 if args.device == "cuda" else float("nan")
        print(f"| {prop} | {outcome} | {seconds:.1f} | {f'{worst[1]:.3g} ({worst[0]})' if worst else '-'} | {peak:.1f} |",
              flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
