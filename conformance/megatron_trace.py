"""Run a bridge's Megatron-Core model and record the same stages as the oracle's `Trace`.

Forward hooks on the standard GPTModel modules (embedding, decoder layers, pre-MLP norm,
MoE router, final norm) make this independent of how a bridge built its model, as long as it
is a Megatron-Core GPTModel. Each rank records what its own chunks computed (`record_forward`);
`merge_traces` puts the ranks' records together by global layer number. Megatron works in
[S, B, H] and orders tokens (s, b); everything is turned into the oracle's [B, S, H] and (b, s)
order here, and vocabulary-parallel logits (parallel_output=True) are gathered.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ernie_ref import LayerTrace, RoutingTrace, Trace

from .bridge import BridgeError, bridge_call
from .cpu_patches import causal_mask

__all__ = ["record_forward", "merge_traces", "megatron_trace"]


def _sb_to_bs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().transpose(0, 1).contiguous()  # [S, B, ...] -> [B, S, ...]


def _snapshot(output: Any) -> Any:
    """What a hook saw, copied when it saw it. The trace is read after the forward, and by then a
    pipeline schedule may have freed a chunk's output, which is its last layer's output: with
    Megatron-Core's deallocate_pipeline_outputs (mcore-bridge's and Megatron-Bridge's training
    default) the sent tensor's .data becomes a 1-element tensor. Kept by reference, such a layer
    looked as if it had given hidden states of shape [1]."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(_snapshot(item) for item in output)
    return output


def _check_hidden(index: int, what: str, x: Any, seq: int, batch: int) -> None:
    """A layer of the bridge's model must give [S, B, H] activations: anything else is its
    model's output, not something the trace can compare."""
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
    if shape is None or len(shape) != 3 or shape[:2] != (seq, batch):
        raise BridgeError("forward", "InvalidActivation",
                          f"layer {index} of the bridge's model gave {what} of shape "
                          f"{list(shape) if shape is not None else type(x).__name__}, not [S={seq}, B={batch}, H]", "")


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


def _forward(chunks: list[torch.nn.Module], input_ids: torch.Tensor) -> torch.Tensor | None:
    """Logits [B, S, V] on the last pipeline stage (None elsewhere)."""
    input_ids = input_ids.to(next(chunks[0].parameters()).device)  # the model's device: CPU or a GPU
    B, S = input_ids.shape
    position_ids = torch.arange(S, device=input_ids.device).unsqueeze(0).expand(B, S)
    mask = causal_mask(S).to(input_ids.device)
    if len(chunks) == 1 and _pipeline_size() == 1:
        return chunks[0](input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
    # Several stages: Megatron's own pipeline schedule moves activations between them.
    from megatron.core.pipeline_parallel import get_forward_backward_func

    logits: dict[str, torch.Tensor] = {}

    def forward_step(data_iterator, model):
        output = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)

        def keep_logits(output_tensor, non_loss_data: bool = False):
            logits["value"] = output_tensor.detach()
            zero = output_tensor.float().sum() * 0
            return zero if non_loss_data else (zero, {})

        return output, keep_logits

    # The interleaved (virtual pipeline) schedule wants at least pp micro-batches: feed the
    # same batch that often; every micro-batch computes the same thing.
    microbatches = _pipeline_size() if len(chunks) > 1 else 1
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter([None] * microbatches) for _ in chunks] if len(chunks) > 1 else iter([None]),
        model=chunks,
        num_microbatches=microbatches,
        seq_length=S,
        micro_batch_size=B,
        forward_only=True,
    )
    return logits.get("value")


def _pipeline_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


@torch.no_grad()
def record_forward(chunks: list[torch.nn.Module], input_ids: torch.Tensor) -> dict[str, Any]:
    """What this rank's chunks computed: {"embeddings", "final_norm", "logits": tensor or absent,
    "layers": {global layer index: {"after_attention", "output", "routing"}}}, in [B, S, ...]."""
    B, S = input_ids.shape
    raw: dict[str, Any] = {}
    layers: dict[int, dict[str, Any]] = {}
    hooks = []

    def keep(slot: dict, key: str):
        return lambda module, args, output: slot.__setitem__(key, _snapshot(output))

    for model in chunks:
        model.eval()
        if getattr(model, "pre_process", True) and getattr(model, "embedding", None) is not None:
            hooks.append(model.embedding.register_forward_hook(keep(raw, "embeddings")))
        for layer in model.decoder.layers:
            slot = layers.setdefault(layer.layer_number - 1, {})
            hooks.append(layer.register_forward_hook(keep(slot, "output")))
            hooks.append(layer.pre_mlp_layernorm.register_forward_pre_hook(
                lambda m, args, slot=slot: slot.__setitem__("after_attention", _snapshot(args[0]))))
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                hooks.append(router.register_forward_hook(keep(slot, "router")))
        final_norm = getattr(model.decoder, "final_layernorm", None)
        if final_norm is not None:
            hooks.append(final_norm.register_forward_hook(keep(raw, "final_norm")))
    try:
        logits = bridge_call("forward", _forward, chunks, input_ids)
    finally:
        for h in hooks:
            h.remove()
    if logits is not None and getattr(chunks[-1], "parallel_output", False):
        # A model built for training (GPTModel's default parallel_output=True) gives each
        # tensor-parallel rank its slice of the vocabulary; the whole is their concatenation.
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)

    record: dict[str, Any] = {"layers": {}}
    for key in ("embeddings", "final_norm"):
        if key in raw:
            record[key] = _sb_to_bs(raw[key])
    if logits is not None:
        record["logits"] = logits.detach()  # GPTModel returns [B, S, V] when no labels are given
    for index, slot in layers.items():
        output = slot["output"][0] if isinstance(slot["output"], tuple) else slot["output"]
        _check_hidden(index, "hidden states", output, S, B)
        _check_hidden(index, "input of its pre-MLP norm", slot["after_attention"], S, B)
        entry = {"after_attention": _sb_to_bs(slot["after_attention"]), "output": _sb_to_bs(output), "routing": None}
        if "router" in slot:
            probs, routing_map = slot["router"]
            entry["routing"] = _routing(probs, routing_map, B, S)
        record["layers"][index] = entry
    return record


def merge_traces(records: list[dict[str, Any]]) -> Trace:
    """One Trace from every rank's record: each stage from the first rank that computed it."""

    def first(key: str) -> torch.Tensor:
        for r in records:
            if key in r:
                return r[key]
        raise RuntimeError(f"no rank computed {key}")

    layers: dict[int, dict[str, Any]] = {}
    for r in records:
        for index, entry in r["layers"].items():
            layers.setdefault(index, entry)
    trace = Trace(embeddings=first("embeddings"))
    for index in sorted(layers):
        entry = layers[index]
        trace.layers.append(LayerTrace(after_attention=entry["after_attention"], output=entry["output"], routing=entry["routing"]))
    trace.final_norm = first("final_norm")
    trace.logits = first("logits")
    return trace


def megatron_trace(chunks: list[torch.nn.Module], input_ids: torch.Tensor) -> Trace:
    """The trace of a model held whole by this process (one rank)."""
    return merge_traces([record_forward(chunks, input_ids)])
