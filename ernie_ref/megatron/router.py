"""ERNIE's MoE router as a Megatron-Core router module.

Stock megatron-core cannot express ERNIE routing: TransformerConfig (up to 0.20) refuses an
expert bias with softmax scores, and its softmax path would ignore the bias anyway. This module
plugs in through the layer spec (`MoESubmodules.router`), so nothing in megatron is patched.

ERNIE routing, per token, in fp32:
    p       = softmax(h W^T)                           # [T, E]
    chosen  = top-k of (p + expert_bias)               # the bias picks experts ...
    weights = p[chosen] / clamp(sum p[chosen], min=norm_min)   # ... but never weights them

The two steps that differ between routers, choosing the experts (`select`) and weighing them
(`weigh`), are methods of their own, so that a variant (a broken one, say) overrides one step and
keeps the rest of ERNIE routing as it is.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["ErnieRouter"]


class ErnieRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, *, norm_min: float, **kwargs):
        # ERNIE's router has no bias, even under use_bias (where add_bias_linear would give it one).
        config = copy.copy(config)
        config.add_bias_linear = False
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.norm_min = norm_min
        # TopKRouter only creates `expert_bias` for sigmoid scores; ERNIE's is a persistent fp32
        # buffer [E] (HF: moe_statics.e_score_correction_bias [1, E]).
        if getattr(self, "expert_bias", None) is None:
            if hasattr(self, "expert_bias"):
                del self.expert_bias
            self.register_buffer("expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32,
                                                             device=self.weight.device))

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [T, E] fp32 -> the chosen experts [T, K]: the top k of probs + expert_bias."""
        _, chosen = torch.topk(probs + self.expert_bias.float(), k=self.topk, dim=-1)  # [T, K]
        return chosen

    def weigh(self, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """logits [T, E] fp32, probs [T, E] fp32, chosen [T, K] -> the chosen experts' weights [T, K]:
        their probabilities renormalised, the expert bias left out. (ERNIE's weights need no logits;
        a variant's may, Mixtral's softmax over the chosen logits for one.)"""
        chosen_probs = probs.gather(-1, chosen)  # [T, K]
        return chosen_probs / chosen_probs.sum(-1, keepdim=True).clamp(min=self.norm_min)  # [T, K]

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs):
        """logits [T, E] -> (probs [T, E], zero outside the chosen experts; routing_map [T, E] bool)."""
        logits = logits.reshape(-1, self.config.num_moe_experts)
        fp32_logits = logits.float()  # [T, E]
        probs = torch.softmax(fp32_logits, dim=-1)  # [T, E]
        chosen = self.select(probs)  # [T, K]
        weights = self.weigh(fp32_logits, probs, chosen)  # [T, K]
        dense = torch.zeros_like(probs).scatter(-1, chosen, weights)  # [T, E]
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, chosen, True)
        return dense.to(logits.dtype), routing_map
