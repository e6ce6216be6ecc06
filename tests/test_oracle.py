"""The oracle against transformers' Ernie4_5_MoeForCausalLM (eager attention, eager experts).

Both load the same checkpoint, written by `ernie_ref` in the on-disk format; fp32 logits and
every layer's output must agree within FP32_RTOL, and so must the chosen experts.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.hf_transformers import load_transformers_model, run_transformers
from conformance.numerics import FP32_RTOL, ROUTING_MARGIN, is_near_tie, relative_error
from conformance.strategies import checkpoint_formats, configs, inputs, seeds
from ernie_ref import CheckpointFormat, ErnieMoeConfig, ErnieMoeForCausalLM, random_checkpoint
from ernie_ref.checkpoint import omittable_keys

BASE = dict(
    vocab_size=40, hidden_size=24, intermediate_size=20, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=8, moe_num_shared_experts=1,
    moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1, tie_word_embeddings=False,
    use_bias=False, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

# The corners the suite must cover whatever Hypothesis draws.
CORNERS = {
    "moe start > 0, end < last": dict(moe_layer_start_index=1, moe_layer_end_index=2),
    "interval 2": dict(moe_layer_interval=2, moe_layer_start_index=0),
    "k = 1": dict(moe_k=1),
    "k = E": dict(moe_k=4),
    "no shared experts": dict(moe_num_shared_experts=0),
    "two shared experts": dict(moe_num_shared_experts=2),
    "head_dim != hidden / heads": dict(head_dim=10),
    "use_bias": dict(use_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "tied with bias": dict(tie_word_embeddings=True, use_bias=True),
    "MHA": dict(num_key_value_heads=4),
    "MQA": dict(num_key_value_heads=1),
    "theta 500000, eps 1e-3": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-3),
    "norm_min clamps": dict(moe_norm_min=0.9, moe_k=1),
}


def fail_on_near_tie() -> None:
    pytest.fail("this fixed example has a near-tie in routing: choose another seed")


def assert_oracle_matches_transformers(
    cfg: ErnieMoeConfig, weights_seed: int, input_ids: torch.Tensor, on_near_tie=lambda: assume(False),
    fmt: CheckpointFormat = CheckpointFormat(),
) -> None:
    with tempfile.TemporaryDirectory() as d:
        random_checkpoint(cfg, d, seed=weights_seed, fmt=fmt)
        ours = ErnieMoeForCausalLM.from_pretrained(d)
        theirs = load_transformers_model(d)
    trace = ours(input_ids, trace=True)
    if is_near_tie(trace):
        on_near_tie()
    run = run_transformers(theirs, input_ids)
    context = f"config: {cfg.one_line()}; format: {fmt}; weights seed {weights_seed}; input {list(input_ids.shape)}"
    assert len(run.layer_outputs) == cfg.num_hidden_layers, context
    for i, (layer, theirs_out) in enumerate(zip(trace.layers, run.layer_outputs)):
        err = relative_error(layer.output, theirs_out)
        assert err <= FP32_RTOL, f"layer {i} ({cfg.layer_types[i]}) output differs: rel err {err:.3g} > {FP32_RTOL}; {context}"
        if layer.routing is not None:
            ours_sets = layer.routing.expert_ids.sort(-1).values
            theirs_sets = run.selected_experts[i].sort(-1).values
            differ = (ours_sets != theirs_sets).any(-1) & (layer.routing.margin >= ROUTING_MARGIN)
            assert not differ.any(), (
                f"layer {i} routes token {differ.nonzero()[0].item()} to experts "
                f"{ours_sets[differ][0].tolist()}, transformers to {theirs_sets[differ][0].tolist()}; {context}"
            )
    err = relative_error(trace.logits, run.logits)
    assert err <= FP32_RTOL, f"logits differ: rel err {err:.3g} > {FP32_RTOL}; {context}"


@pytest.mark.parametrize("corner", list(CORNERS))
def test_oracle_matches_transformers_at_corners(corner: str) -> None:
    cfg = ErnieMoeConfig.from_hf({**BASE, **CORNERS[corner]})
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    assert_oracle_matches_transformers(cfg, weights_seed=3, input_ids=ids, on_near_tie=fail_on_near_tie)


def test_oracle_matches_transformers_on_the_published_format() -> None:
    """Every config key left to transformers' default (head_dim, moe_layer_end_index, shared experts
    2, tied, ...), the keys it does not read, and MTP tensors, which it skips (load_transformers_model
    fails on any key it reports unexpected); then the legacy top-level rope_theta."""
    cfg = ErnieMoeConfig.from_hf({**BASE, "hidden_size": 16, "num_attention_heads": 4, "moe_num_shared_experts": 2,
                                  "tie_word_embeddings": True, "moe_layer_start_index": 1, "rms_norm_eps": 1e-5,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    omitted = tuple(omittable_keys(cfg))
    assert {"head_dim", "moe_num_shared_experts", "tie_word_embeddings", "rope_theta", "moe_layer_end_index"} <= set(omitted)
    for fmt in (CheckpointFormat(omitted=omitted, published_extra_keys=True, mtp=True),
                CheckpointFormat(legacy_rope_theta=True, published_extra_keys=True, mtp=True)):
        assert_oracle_matches_transformers(cfg, weights_seed=3, input_ids=ids, on_near_tie=fail_on_near_tie, fmt=fmt)


@given(data=st.data())
def test_oracle_matches_transformers(data: st.DataObject) -> None:
    cfg = data.draw(configs(), label="config")
    weights_seed = data.draw(seeds(), label="weights seed")
    batch = data.draw(inputs(), label="inputs")
    fmt = data.draw(checkpoint_formats(cfg), label="checkpoint format")
    assert_oracle_matches_transformers(cfg, weights_seed, batch.input_ids(cfg.vocab_size), fmt=fmt)


def test_random_weights_exercise_the_math() -> None:
    """The expert bias changes winners, norms are away from 1, and eps moves the output."""
    cfg = ErnieMoeConfig.from_hf({**BASE, "num_hidden_layers": 2, "moe_num_experts": 6})
    with tempfile.TemporaryDirectory() as d:
        random_checkpoint(cfg, d, seed=0)
        model = ErnieMoeForCausalLM.from_pretrained(d)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with_bias = model(ids, trace=True).layers[1].routing.expert_ids
    model.model.layers[1].mlp.moe_statics.e_score_correction_bias.zero_()
    without_bias = model(ids, trace=True).layers[1].routing.expert_ids
    changed = (with_bias.sort(-1).values != without_bias.sort(-1).values).any(-1).float().mean().item()
    assert changed > 0.1, f"the expert bias changes the choice of only {changed:.0%} of tokens"
    norm = model.model.layers[0].input_layernorm.weight
    assert (norm - 1).abs().mean() > 0.1, f"norm weights too close to 1: {norm}"
    logits = model(ids)
    for layer in model.model.layers:
        layer.input_layernorm.eps = layer.post_attention_layernorm.eps = 1e-6
    err = relative_error(model(ids), logits)
    assert err > 100 * FP32_RTOL, f"changing eps 1e-5 -> 1e-6 moves logits by only {err:.3g}"
