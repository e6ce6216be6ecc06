"""transformers' `Ernie4_5_MoeForCausalLM` as a second opinion: load a directory strictly, run it
with eager attention and eager experts, and capture what each decoder layer produced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TransformersRun", "load_transformers_model", "run_transformers"]


def load_transformers_model(path: str | Path) -> torch.nn.Module:
    """Load with transformers; raises AssertionError naming any missing, unexpected or mismatched key."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the per-tensor load report is noise in a test log
    logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path),
            attn_implementation="eager",
            experts_implementation="eager",
            dtype=torch.float32,
            output_loading_info=True,
        )
    finally:
        logging.set_verbosity(verbosity)
    problems = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"}
    problems.update({"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    assert not problems, f"transformers loaded {path} with problems: {problems}"
    return model.eval()


@dataclass
class TransformersRun:
    logits: torch.Tensor  # [B, S, V]
    layer_outputs: list[torch.Tensor]  # each [B, S, H]
    selected_experts: dict[int, torch.Tensor]  # MoE layer index -> [T, K]


def _expert_ids(router_output: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The chosen experts [T, K] among the router's outputs: the one integer tensor (transformers 5.12
    returns (logits, experts, weights), 5.25 (logits, weights, experts))."""
    [ids] = [t for t in router_output if not t.is_floating_point()]
    return ids


@torch.no_grad()
def run_transformers(model: torch.nn.Module, input_ids: torch.Tensor) -> TransformersRun:
    outputs: list[torch.Tensor] = []
    selected: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)))
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and not isinstance(gate, torch.nn.Linear):  # the MoE router
            hooks.append(gate.register_forward_hook(lambda m, a, out, i=i: selected.__setitem__(i, _expert_ids(out))))
    try:
        logits = model(input_ids).logits
    finally:
        for h in hooks:
            h.remove()
    return TransformersRun(logits=logits, layer_outputs=outputs, selected_experts=selected)
