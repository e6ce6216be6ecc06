"""Mutants of ERNIE routing: each a router that changes one step of `ErnieRouter` (which experts
it chooses, `select`, or how it weighs them, `weigh`), or a bridge that passes the router a wrong
setting (norm_min) or never loads its expert bias."""

from __future__ import annotations

import math

import torch

from ernie_ref.megatron.router import ErnieRouter

from ..numerics import BF16_ROUTING_MARGIN
from .base import Mutant, mutant

__all__ = ["ExpertBiasWeighsExperts", "NoRenormalisation", "ExpertBiasIgnored", "Bfloat16RoutesOneTokenInTwentyElsewhere",
           "SoftmaxOverChosen", "NormMinIgnored", "ExpertBiasNotLoaded"]


# The routers of the routing mutants: ERNIE routing (`ErnieRouter`) with one step overridden.
class _BiasInWeights(ErnieRouter):
    def weigh(self, logits, probs, chosen):
        scores = (probs + self.expert_bias.float()).gather(-1, chosen)  # [T, K]
        return scores / scores.sum(-1, keepdim=True).clamp(min=self.norm_min)


class _NotRenormalised(ErnieRouter):
    def weigh(self, logits, probs, chosen):
        return probs.gather(-1, chosen)  # [T, K]


class _BiasIgnored(ErnieRouter):
    def select(self, probs):
        return torch.topk(probs, k=self.topk, dim=-1).indices  # [T, K]


class _SoftmaxOverChosen(ErnieRouter):
    def weigh(self, logits, probs, chosen):
        return torch.softmax(logits.gather(-1, chosen), dim=-1)  # [T, K]


@mutant
class ExpertBiasWeighsExperts(Mutant):
    """The expert bias enters the mixing weights (p + bias), as in sigmoid routers, not only the selection."""

    name, part, killed_by = "expert-bias-weighs-experts", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}
    router_class = _BiasInWeights


class _OneTokenInTwentyElsewhereInBfloat16(ErnieRouter):
    def select(self, probs):
        chosen = super().select(probs)
        tokens, k = probs.shape[0], self.topk
        if self.config.params_dtype != torch.bfloat16 or k >= probs.shape[-1]:
            return chosen
        ranked = torch.topk(probs + self.expert_bias.float(), k=k + 1, dim=-1)  # values, indices [T, k + 1]
        # The closest calls between the k-th and (k+1)-th expert outside any tie (a margin of at
        # least BF16_ROUTING_MARGIN, so that the example is not set aside for them): sending those
        # tokens to the (k+1)-th moves the output least, so that only the routing comparison can tell.
        margin = ranked.values[:, k - 1] - ranked.values[:, k]  # [T]
        margin = margin.masked_fill(margin < BF16_ROUTING_MARGIN, math.inf)
        moved = margin.argsort()[:max(1, tokens // 20)]
        moved = moved[margin[moved].isfinite()]
        chosen = chosen.clone()
        chosen[moved, k - 1] = ranked.indices[moved, k]
        return chosen


@mutant
class NoRenormalisation(Mutant):
    """The chosen experts are weighted by their softmax probabilities without dividing by their sum."""

    name, part, killed_by = "no-renormalisation", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}
    router_class = _NotRenormalised


@mutant
class ExpertBiasIgnored(Mutant):
    """Experts chosen by probability alone: the expert bias is loaded but never used."""

    name, part, killed_by = "expert-bias-ignored", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router choice"}
    router_class = _BiasIgnored


@mutant
class Bfloat16RoutesOneTokenInTwentyElsewhere(Mutant):
    """In bf16, one token in twenty (one at least) goes to its (k+1)-th expert instead of its k-th,
    outside any tie (the closest call above the bf16 routing margin): in a batch of twenty tokens
    or more the values stay within the bf16 tolerance, so only an exact comparison of routing
    decisions catches it (a tolerance of 10% of tokens routed elsewhere would not)."""

    name, part, killed_by = "bfloat16-routes-one-token-in-twenty-elsewhere", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router choice"}
    reveals_in = "bfloat16"
    router_class = _OneTokenInTwentyElsewhereInBfloat16


@mutant
class SoftmaxOverChosen(Mutant):
    """Weights are a softmax over the chosen experts' logits (Mixtral style): equal to the
    renormalised probabilities except that moe_norm_min never clamps the denominator."""

    name, part, killed_by = "softmax-over-chosen", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}
    router_class = _SoftmaxOverChosen


@mutant
class NormMinIgnored(Mutant):
    """moe_norm_min not passed on: the router clamps the weights' denominator at 1e-12."""

    name, part, killed_by = "norm-min-ignored", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}

    def build(self, cfg, layout, dtype=torch.float32):
        return super().build(cfg.replace(moe_norm_min=1e-12), layout, dtype)


@mutant
class ExpertBiasNotLoaded(Mutant):
    """The expert bias keeps its initial zeros, as when a mapping forgets the buffer (it is not a parameter)."""

    name, part, killed_by = "expert-bias-not-loaded", "routing", "import"
    expect = {"kind": "not loaded", "tensor": "mlp.router.expert_bias"}

    def load(self, hf_dir, layout):
        chunks = super().load(hf_dir, layout)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, ErnieRouter):
                    module.expert_bias.zero_()
        return chunks
