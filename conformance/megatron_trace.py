"""Run a bridge's Megatron-Core model and record the same stages as the oracle's `Trace`.

Forward hooks on the standard GPTModel modules (embedding, decoder layers, pre-MLP norm,
MoE router, final norm) make this independent of how a bridge built its model, as long as it
is a Megatron-Core GPTModel. Megatron works in [S, B, H] and orders tokens (s, b); everything
is turned into the oracle's [B, S, H] and (b, s) order here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ernie_ref import LayerTrace, RoutingTrace, Trace

from .megatron_runtime import causal_mask

__all__ = ["megatron_trace"]


def _sb_to_bs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().transpose(0, 1).contiguous()  # [S, B, ...] -> [B, S, ...]


def _routing(probs: torch.Tensor, routing_map: torch.Tensor, batch: int, seq: int) -> RoutingTrace:
    """Megatron's router output (probs [T, E] zero outside the chosen experts, routing_map [T, E])."""
    E = routing_map.shape[-1]
    probs = probs.detach().reshape(seq, batch, E).transpose(0, 1).reshape(batch * seq, E)
    chosen = routing_map.detach().reshape(seq, batch, E).transpose(0, 1).reshape(batch * seq, E)
    k = int(chosen.sum(-1).max().item()) if chosen.numel() else 0
    # Chosen experts by descending weight, the oracle's order up to ties; callers compare sets.
    masked = torch.where(chosen, probs.float(), torch.full_like(probs, -math.inf, dtype=torch.float))
    weights, expert_ids = masked.topk(k, dim=-1)
    return RoutingTrace(expert_ids=expert_ids, weights=weights, margin=torch.full((batch * seq,), math.nan))


@torch.no_grad()
def megatron_trace(chunks: list[torch.nn.Module], input_ids: torch.Tensor) -> Trace:
    """Forward of a single-stage model (one chunk holding embedding, all layers and output)."""
    if len(chunks) != 1:
        raise NotImplementedError(f"megatron_trace runs one pipeline stage; got {len(chunks)} chunks")
    model = chunks[0]
    model.eval()
    B, S = input_ids.shape
    record: dict[str, object] = {}
    layer_records: dict[int, dict[str, object]] = {}
    hooks = []

    def keep(key: str, slot: dict) -> Callable:
        def hook(module, args, output):
            slot[key] = output

        return hook

    hooks.append(model.embedding.register_forward_hook(keep("embeddings", record)))
    for layer in model.decoder.layers:
        slot = layer_records.setdefault(layer.layer_number - 1, {})
        hooks.append(layer.register_forward_hook(keep("output", slot)))
        hooks.append(layer.pre_mlp_layernorm.register_forward_pre_hook(lambda m, args, slot=slot: slot.__setitem__("after_attention", args[0])))
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            hooks.append(router.register_forward_hook(keep("router", slot)))
    hooks.append(model.decoder.final_layernorm.register_forward_hook(keep("final_norm", record)))
    try:
        position_ids = torch.arange(S).unsqueeze(0).expand(B, S)
        logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=causal_mask(S))
    finally:
        for h in hooks:
            h.remove()

    trace = Trace(embeddings=_sb_to_bs(record["embeddings"]))
    for index in sorted(layer_records):
        slot = layer_records[index]
        output = slot["output"][0] if isinstance(slot["output"], tuple) else slot["output"]
        routing = None
        if "router" in slot:
            probs, routing_map = slot["router"]
            routing = _routing(probs, routing_map, B, S)
        trace.layers.append(LayerTrace(after_attention=_sb_to_bs(slot["after_attention"]), output=_sb_to_bs(output), routing=routing))
    trace.final_norm = _sb_to_bs(record["final_norm"])
    trace.logits = logits.detach()  # GPTModel returns [B, S, V] when no labels are given
    return trace
