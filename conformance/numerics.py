"""Tolerances and error measures shared by every numerical comparison of the suite.

fp32 on CPU is tight: a bridge that computes the same function as the oracle differs from it by
accumulated rounding only, a few 1e-7 relative. Anything above `FP32_RTOL` is a bug.
"""

from __future__ import annotations

import math

import torch

from ernie_ref import Trace

__all__ = ["FP32_RTOL", "ROUTING_MARGIN", "relative_error", "min_routing_margin", "is_near_tie"]

# Relative error allowed for fp32 logits and hidden states (see `relative_error`).
FP32_RTOL = 1e-5

# Two implementations may order near-equal selection scores differently: rounding differences of
# ~1e-7 in the hidden state move the scores by ~1e-6. An example in which some token's k-th and
# (k+1)-th selection scores are closer than this is excluded (a tie, not a bug); the threshold is
# two orders of magnitude above that noise, and such examples are rare with random weights.
ROUTING_MARGIN = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error relative to the tensor's scale.

    An element-wise ratio would blow up on entries near zero, which any activation has.
    Shapes must agree; a NaN anywhere gives inf.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def min_routing_margin(trace: Trace) -> float:
    """Smallest gap between the k-th and (k+1)-th selection score over all MoE layers and tokens."""
    margins = [layer.routing.margin.min().item() for layer in trace.layers if layer.routing is not None]
    return min(margins, default=math.inf)


def is_near_tie(trace: Trace) -> bool:
    return min_routing_margin(trace) < ROUTING_MARGIN
