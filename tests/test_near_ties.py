"""Near-ties in routing: where the k-th and (k+1)-th selection scores are closer than rounding can
separate, either choice is right, and the oracle decides the tie as the implementation it is
compared with did (`numerics.NearTieFollower`); a choice beyond the margin is never followed."""

from __future__ import annotations

import torch

from conformance.numerics import ROUTING_MARGIN, NearTieFollower, acceptable_choice
from ernie_ref import ErnieMoeConfig, ErnieMoeForCausalLM
from ernie_ref.checkpoint import random_state_dict


def test_acceptable_choice_allows_swaps_within_the_margin_only() -> None:
    selection = torch.tensor([[0.50, 0.30, 0.30 - 5e-5, 0.10],   # 2nd and 3rd within the margin
                              [0.50, 0.30, 0.20, 0.10]])          # no tie
    swapped = torch.tensor([[0, 2], [0, 2]])
    assert acceptable_choice(selection, swapped, ROUTING_MARGIN).tolist() == [True, False]
    assert acceptable_choice(selection, torch.tensor([[0, 1], [0, 1]]), ROUTING_MARGIN).tolist() == [True, True]
    assert acceptable_choice(selection, torch.tensor([[1, 1], [0, 0]]), ROUTING_MARGIN).tolist() == [False, False], \
        "an expert chosen twice is not K experts"
    everything = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3]])
    assert acceptable_choice(selection, everything, ROUTING_MARGIN).tolist() == [True, True]  # K == E


def _many_experts() -> tuple[ErnieMoeForCausalLM, torch.Tensor]:
    cfg = ErnieMoeConfig.from_hf(dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=64,
                                      moe_k=6, moe_intermediate_size=4, moe_num_shared_experts=0,
                                      moe_layer_start_index=0))
    model = ErnieMoeForCausalLM.from_state_dict(cfg, random_state_dict(cfg, seed=11))
    return model, torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(11))


def _swap_kth(ids: torch.Tensor, selection_order: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """`ids` [T, K] with, at `tokens`, the K-th choice replaced by the (K+1)-th of `selection_order`."""
    other = ids.clone()
    other[tokens, k - 1] = selection_order[tokens, k]
    return other


def test_the_oracle_follows_the_other_choice_at_near_ties_and_nowhere_else() -> None:
    model, ids = _many_experts()
    own = model(ids, trace=True)
    routing = own.layers[0].routing
    k = routing.expert_ids.shape[-1]
    near = (routing.margin < ROUTING_MARGIN).nonzero().flatten()
    clear = (routing.margin > 100 * ROUTING_MARGIN).nonzero().flatten()
    assert len(near) > 0 and len(clear) > 0, f"{len(near)} near-ties, {len(clear)} clear calls of {len(routing.margin)}"

    # The oracle's ranking of the experts, recorded by a decider that changes nothing.
    ranking = {}

    def record(selection: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        ranking["order"] = selection.argsort(-1, descending=True)
        return chosen

    model.model.layers[0].mlp.decide_near_ties = record
    model(ids, trace=True)
    other = _swap_kth(routing.expert_ids, ranking["order"], torch.cat([near, clear]), k)

    follower = NearTieFollower({0: other}, ROUTING_MARGIN)
    follower.attach(model)
    followed = model(ids, trace=True).layers[0].routing.expert_ids
    assert follower.followed == len(near), f"followed {follower.followed} tokens, {len(near)} near-ties"
    assert torch.equal(followed[near].sort(-1).values, other[near].sort(-1).values), "near-ties decided the other way"
    assert torch.equal(followed[clear], routing.expert_ids[clear]), "a clear call was changed"
