"""What the two calibration benchmarks (calibrate_fp32.py, calibrate_bf16.py) share: their options
for the draws, and the start of a one-rank process that runs the bridge under calibration."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from conformance.bridge import resolve_bridge
from conformance.parallel import start_megatron_process


def calibration_parser(description: str | None, examples: int) -> argparse.ArgumentParser:
    """A parser with the options both calibrations take: examples drawn, bridge, draw seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=examples)
    parser.add_argument("--bridge", default="reference")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed of the draws")
    return parser


def start_calibration(bridge: str) -> Any:
    """This process as one rank of the Megatron side, torch seeded; the bridge named `bridge`."""
    start_megatron_process()
    torch.manual_seed(0)
    return resolve_bridge(bridge)
