"""Router weights are judged on the compared model's own router input (`properties.router_weights_on`):
the oracle's router, fed that model's residual stream after attention, must give the same experts
the same weights. Rounding upstream is then not read as a router error, and a wrong router still is."""

from __future__ import annotations

import copy

import torch

from conformance.numerics import BF16_RTOL, FP32_RTOL
from conformance.properties import router_weights_on, stage_errors
from ernie_ref import ErnieMoeConfig, ErnieMoeForCausalLM
from ernie_ref.checkpoint import random_state_dict

CFG = ErnieMoeConfig.from_hf(dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=16,
                                  moe_k=4, moe_intermediate_size=8, moe_num_shared_experts=1, moe_layer_start_index=1))


def _oracle_and_ids() -> tuple[ErnieMoeForCausalLM, torch.Tensor]:
    model = ErnieMoeForCausalLM.from_state_dict(CFG, random_state_dict(CFG, seed=5))
    return model, torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))


def _router_weight_errors(actual, expected) -> dict[str, float]:
    return {stage: error for stage, error in stage_errors(actual, expected, CFG) if "router weights" in stage}


def test_on_its_own_input_the_oracle_gives_its_own_weights_and_on_another_input_that_inputs() -> None:
    oracle, ids = _oracle_and_ids()
    own = oracle(ids, trace=True)
    expected = copy.deepcopy(own)
    router_weights_on(oracle, own, expected)
    for i, (a, e) in enumerate(zip(own.layers, expected.layers)):
        if a.routing is not None:
            assert torch.equal(a.routing.weights, e.routing.weights), f"layer {i}: weights recomputed on the same input differ"

    # Another model's stream (here the oracle's, shifted by 1 %): the weights are recomputed on it.
    shifted = copy.deepcopy(own)
    for layer in shifted.layers:
        layer.after_attention = layer.after_attention * 1.01 + 0.01
    on_shifted = copy.deepcopy(own)
    router_weights_on(oracle, shifted, on_shifted)
    moved = max((a.routing.weights - e.routing.weights).abs().max().item()
                for a, e in zip(own.layers, on_shifted.layers) if a.routing is not None)
    assert moved > 0, "the router weights were not recomputed on the other model's router input"


def test_a_wrong_router_still_differs_on_its_own_input() -> None:
    oracle, ids = _oracle_and_ids()
    own = oracle(ids, trace=True)
    wrong = copy.deepcopy(own)
    for layer in wrong.layers:  # a router that forgets to renormalise over the chosen experts
        if layer.routing is not None:
            layer.routing.weights = layer.routing.weights * 0.5
    expected = copy.deepcopy(own)
    router_weights_on(oracle, wrong, expected)
    errors = _router_weight_errors(wrong, expected)
    assert errors and min(errors.values()) > BF16_RTOL, f"a wrong router's weights on its own input: {errors}"
    right = _router_weight_errors(own, expected)
    assert max(right.values()) <= FP32_RTOL, f"the right router's weights on its own input: {right}"
