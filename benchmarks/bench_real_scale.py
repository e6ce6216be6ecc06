"""`certify --checkpoint` on a synthetic checkpoint at the full ERNIE-4.5-21B-A3B structure, written
in the published on-disk layout: time per property and peak memory, to say which checkpoints fit a
machine.

    python benchmarks/bench_real_scale.py [--moe-intermediate 16,32] [--vocab 8192] [--max-examples 2]

For each expert width given, a checkpoint is written with every field of 21B-A3B as published
(28 layers, hidden 2560, 20/4 heads of 128, dense intermediate 12288, 64 experts, top-6, two shared
experts, MoE from layer 1, tied embeddings, rope theta 500000) except the routed experts' width
(`moe_intermediate_size`, published 1536; the shared experts' width follows it) and the vocabulary
(published 103424), narrowed so that it fits this machine. The layout is the published one: bf16
shards with an index (of at most 512 MiB here; the published ones hold about 4 GiB each), the
router weight and expert bias in fp32, the multi-token-prediction tensors, the config keys
transformers ignores, the legacy top-level rope_theta.

Then `ernie-conformance certify --checkpoint DIR` runs the reference bridge on it, one rank, one
pytest process (so that the peak memory is one example's), `--max-examples` examples per property,
and the table gives each property's time per example and the peak resident memory of the whole
run (the largest process: the pytest process, which holds the Megatron-Core model, the oracle and
transformers' model of one example). Peak memory grows linearly with the checkpoint's size; the
line through the measured sizes says how large a checkpoint a machine of a given memory certifies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ernie_ref.checkpoint import CheckpointFormat, random_checkpoint
from ernie_ref.published import published_config

GiB = 1024**3


def write_checkpoint(path: Path, moe_intermediate: int, vocab: int, layers: int) -> tuple[int, int, float]:
    """The synthetic 21B-A3B checkpoint; returns (parameters, bytes on disk, seconds to write)."""
    cfg = dataclasses.replace(published_config("ERNIE-4.5-21B-A3B"), moe_intermediate_size=moe_intermediate,
                              vocab_size=vocab, num_hidden_layers=layers, moe_layer_end_index=layers - 1)
    fmt = CheckpointFormat(legacy_rope_theta=True, published_extra_keys=True, mtp=True)
    start = time.perf_counter()
    state = random_checkpoint(cfg, path, seed=0, dtype=torch.bfloat16, max_shard_bytes=GiB // 2, fmt=fmt)
    seconds = time.perf_counter() - start
    parameters = sum(t.numel() for t in state.values())
    del state
    return parameters, sum(f.stat().st_size for f in path.iterdir()), seconds


def certify(checkpoint: Path, out: Path, max_examples: int) -> tuple[dict[str, tuple[int, float]], dict[str, str], float, float]:
    """Run certify on `checkpoint`; returns ({property: (valid examples, seconds)}, {property: verdict},
    wall seconds, peak RSS of the largest process in GiB)."""
    certify_command = [sys.executable, "-m", "conformance", "certify", "--checkpoint", str(checkpoint), "--out", str(out),
                       "--layouts", "tp1-pp1-ep1-vpp1", "--max-examples", str(max_examples), "--jobs", "1"]
    # Run under a process of its own whose last line is its descendants' peak RSS (ru_maxrss of the
    # children: the largest of every finished descendant, kB on Linux), so each run is measured alone.
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", measure, *certify_command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = int(run.stdout.splitlines()[-1]) * 1024 / GiB
    timings: dict[str, tuple[int, float]] = {}
    for line in run.stdout.splitlines():
        if m := re.search(r"test_(\w+): \w+, (\d+) valid examples in ([\d.]+)s", line):
            timings[m.group(1)] = (int(m.group(2)), float(m.group(3)))
    results = out / "certificate.json"
    if not results.is_file():
        raise SystemExit(f"certify wrote no certificate (exit {run.returncode}):\n{run.stdout}\n{run.stderr}")
    certificate = json.loads(results.read_text())
    verdicts = {name: prop["verdict"] for name, prop in certificate["properties"].items()}
    return timings, verdicts, wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe-intermediate", default="16,32", help="routed experts' widths to measure, comma-separated")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--max-examples", type=int, default=2, help="examples per property")
    parser.add_argument("--memory-gib", type=float, default=24.0, help="the machine to size checkpoints for")
    parser.add_argument("--layers", type=int, default=28, help="layers (28 as published; fewer for a quick run)")
    args = parser.parse_args()
    rows = []
    for width in (int(w) for w in args.moe_intermediate.split(",")):
        with tempfile.TemporaryDirectory(prefix="ernie-real-scale-") as tmp:
            hf = Path(tmp) / "hf"
            parameters, size, write_s = write_checkpoint(hf, width, args.vocab, args.layers)
            shards = len(list(hf.glob("*.safetensors")))
            print(f"moe_intermediate {width}: {parameters / 1e9:.2f} B parameters, {size / GiB:.2f} GiB in {shards} "
                  f"shards, written in {write_s:.0f} s; certifying...", flush=True)
            timings, verdicts, wall, peak = certify(hf, Path(tmp) / "certificate", args.max_examples)
        rows.append((width, parameters, size, write_s, timings, verdicts, wall, peak))

    print(f"\nERNIE-4.5-21B-A3B structure ({args.layers} layers), vocab {args.vocab}, bf16 with fp32 router, MTP tensors, published "
          f"config keys; reference bridge, one rank, one process, {args.max_examples} examples per property\n")
    properties = sorted({p for row in rows for p in row[4]})
    print("| moe_intermediate | parameters | on disk GiB | write s | " + " | ".join(f"{p} s/example" for p in properties)
          + " | certify s | peak RSS GiB | verdicts |")
    print("|---:|---:|---:|---:|" + "---:|" * len(properties) + "---:|---:|---|")
    for width, parameters, size, write_s, timings, verdicts, wall, peak in rows:
        per_example = [f"{timings[p][1] / max(timings[p][0], 1):.0f}" if p in timings else "-" for p in properties]
        print(f"| {width} | {parameters / 1e9:.2f} B | {size / GiB:.2f} | {write_s:.0f} | " + " | ".join(per_example)
              + f" | {wall:.0f} | {peak:.1f} | {', '.join(f'{k} {v}' for k, v in verdicts.items())} |")
    if len(rows) >= 2:
        (_, _, s0, *_, p0), (_, _, s1, *_, p1) = rows[0], rows[-1]
        per_gib = (p1 - p0) / ((s1 - s0) / GiB)
        base = p0 - per_gib * s0 / GiB
        largest = (args.memory_gib - base) / per_gib
        print(f"\npeak RSS = {base:.1f} GiB + {per_gib:.2f} x checkpoint GiB: a {args.memory_gib:g} GiB machine "
              f"certifies checkpoints of up to about {largest:.1f} GiB (bf16) this way")


if __name__ == "__main__":
    main()
