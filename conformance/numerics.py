"""Tolerances and error measures shared by every numerical comparison of the suite.

fp32 on CPU is tight: a bridge that computes the same function as the oracle differs from it by
accumulated rounding only, a few 1e-7 relative. Anything above `FP32_RTOL` is a bug.

bf16: the oracle runs in fp32 on the checkpoint's bf16 weights and the bridge's model in bf16, as
a bf16 conversion is used. The difference is bf16 rounding of every activation (2^-8 relative
per operation); `BF16_RTOL` and `BF16_ROUTING_MARGIN` are set from its measured size
(`benchmarks/calibrate_bf16.py`, results in README "bf16 tolerance").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ernie_ref import ErnieMoeConfig, Trace
from ernie_ref.published import structure_of

__all__ = ["FP32_RTOL", "FP32_CONDITION_SHARE", "ROUTING_MARGIN", "BF16_RTOL", "BF16_ROUTING_MARGIN", "Tolerance", "tolerance",
           "relative_error", "min_routing_margin", "is_near_tie", "acceptable_choice", "NearTieFollower"]

# Relative error allowed for fp32 logits and hidden states (see `relative_error`).
FP32_RTOL = 1e-5

# An example whose fp32 oracle differs from the same weights computed in float64 by more than this
# share of FP32_RTOL (`properties.conditioning_error`) is set aside as ill-conditioned: a norm over
# a tiny hidden size with a tiny eps amplifies rounding without bound, and a right fp32 bridge's
# error then follows the oracle's own. Measured by benchmarks/calibrate_fp32.py (README "Precision"):
# a right bridge's error stayed under 2.2 times the oracle's own, and the published structures' 28
# and 54 layers accumulate an oracle error of 1e-6 to 5e-6 with nothing ill-conditioned about them,
# so half the tolerance keeps most of those and every kept error of a right bridge under 4.7e-6.
FP32_CONDITION_SHARE = 0.5

# Two implementations may order near-equal selection scores differently: rounding differences of
# ~1e-7 in the hidden state move the scores by ~1e-6. Where a token's k-th and (k+1)-th selection
# scores are closer than this, either choice is right (a tie, not a bug): the oracle takes the
# other implementation's choice there if it is one of the right ones (`NearTieFollower`); the
# threshold is two orders of magnitude above that noise.
ROUTING_MARGIN = 1e-4

# bf16 model against the fp32 oracle on the same weights, measured by benchmarks/calibrate_bf16.py
# (hidden size >= BF16_MIN_HIDDEN_SIZE, one rank; results in README "Precision"): over about 12 000
# drawn examples, each example's worst stage errs by 5e-3 (median), 1.1e-2 (90 %), 1.9e-2 (99 %)
# and at most 6.1e-2. BF16_RTOL is 1.6 times that worst case: a right bf16 bridge passes, and a
# bug that moves any stage by a tenth of its scale fails.
BF16_RTOL = 1e-1

# Routing decisions in bf16: bf16 hidden states move the oracle's selection scores, so a bf16
# model may choose other experts where the oracle's call is close. Over the same examples, the
# first routing difference of an example (later ones follow from it) came at an oracle margin of
# at most 2.3e-2. Examples with a closer call are ties and are excluded (about a third of bf16
# examples); the threshold is twice the measured worst case.
BF16_ROUTING_MARGIN = 5e-2


@dataclass(frozen=True)
class Tolerance:
    """How closely a bridge's model must follow the oracle for checkpoints of one dtype."""

    rtol: float  # relative error (`relative_error`) of every stage and of the logits
    routing_margin: float  # examples with a routing decision closer than this are ties
    min_hidden_size: int = 2  # configs with a smaller hidden size are not drawn for this dtype
    min_published_hidden_size: int = 16  # nor published structures (narrowed widths) with a smaller one
    # Examples whose oracle differs from float64 by more than this share of rtol are set aside as
    # ill-conditioned (None: no such rule; a bf16 model's own rounding is far larger, and its
    # tolerance was measured with it).
    condition_share: float | None = None

    def admits(self, cfg: ErnieMoeConfig) -> bool:
        """Whether configs like `cfg` are drawn for this dtype (its hidden size is large enough)."""
        published = structure_of(cfg) is not None
        return cfg.hidden_size >= (self.min_published_hidden_size if published else self.min_hidden_size)


# bf16 with a hidden size under 16: a norm over a few elements amplifies bf16 rounding without
# bound (a token whose few hidden values are all small), and a right bf16 model then differs from
# the oracle by more than any useful tolerance (measured: 1.6 at hidden 2, 0.13 at 4, 0.11 at 10).
BF16_MIN_HIDDEN_SIZE = 16
# The same at the published depths: rounding accumulates over 28 and 54 layers, and at hidden 16 a
# right bf16 model of the 300B structure erred by up to 0.14 (benchmarks/calibrate_bf16.py
# --structure, README "Precision"); from hidden 32 on, the worst of 100 narrowed published examples
# was 0.082, under the tolerance.
BF16_MIN_PUBLISHED_HIDDEN_SIZE = 32

TOLERANCES = {
    "float32": Tolerance(FP32_RTOL, ROUTING_MARGIN, condition_share=FP32_CONDITION_SHARE),
    "bfloat16": Tolerance(BF16_RTOL, BF16_ROUTING_MARGIN, min_hidden_size=BF16_MIN_HIDDEN_SIZE,
                          min_published_hidden_size=BF16_MIN_PUBLISHED_HIDDEN_SIZE),
}


def tolerance(dtype: str) -> Tolerance:
    """The tolerance for a model that runs in `dtype` ("float32" or "bfloat16")."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype!r}: expected one of {', '.join(TOLERANCES)}")
    return TOLERANCES[dtype]


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


def acceptable_choice(selection: torch.Tensor, expert_ids: torch.Tensor, margin: float) -> torch.Tensor:
    """[T] bool: choosing `expert_ids` [T, K] is right up to a near-tie, on the oracle's selection
    scores [T, E]: K distinct experts, and no expert left out scores more than `margin` above a
    chosen one."""
    chosen = torch.zeros_like(selection, dtype=torch.bool).scatter_(-1, expert_ids, True)  # [T, E]
    distinct = chosen.sum(-1) == expert_ids.shape[-1]
    lowest_chosen = selection.masked_fill(~chosen, math.inf).amin(-1)
    highest_left_out = selection.masked_fill(chosen, -math.inf).amax(-1)  # -inf when K == E
    return distinct & (lowest_chosen >= highest_left_out - margin)


class NearTieFollower:
    """Makes the oracle decide each near-tie as another implementation did (a bridge's model, or
    transformers), so that a tie is never read as a divergence and never costs the example.

    `other` holds the other's chosen experts per MoE layer index ([T, K], in the oracle's token
    order). At a token where the other's choice differs from the oracle's, the oracle takes it if it
    is right up to `margin` (`acceptable_choice`); else it keeps its own, and the comparison reports
    the token routed elsewhere. `followed` counts the tokens decided the other's way."""

    def __init__(self, other: dict[int, torch.Tensor], margin: float):
        self.other, self.margin, self.followed = other, margin, 0

    def attach(self, oracle: torch.nn.Module) -> None:
        """Set every MoE layer of `oracle` (an `ernie_ref.ErnieMoeForCausalLM`) to follow."""
        for index, layer in enumerate(oracle.model.layers):
            if hasattr(layer.mlp, "decide_near_ties"):
                layer.mlp.decide_near_ties = self._decider(self.other.get(index))

    def _decider(self, other: torch.Tensor | None):
        def decide(selection: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            if other is None or other.shape != own.shape:
                return own  # nothing to follow: the comparison reports the shapes
            theirs = other.to(own.device)
            differs = (own.sort(-1).values != theirs.sort(-1).values).any(-1)  # [T]
            take = differs & acceptable_choice(selection, theirs, self.margin)  # [T]
            self.followed += int(take.sum())
            # Their experts in the oracle's order, by descending selection score.
            theirs = theirs.gather(-1, selection.gather(-1, theirs).sort(dim=-1, descending=True, stable=True).indices)
            return torch.where(take[:, None], theirs, own)
        return decide
