"""The reference bridge refuses nothing that transformers loads: use_bias converts exactly, on one
rank and split across tensor-parallel ranks (the suite draws it too; these cases name each place
a bias goes)."""

from __future__ import annotations

import pytest

from conformance.cases import Case, Inputs
from conformance.distributed import set_pool
from conformance.properties import SetAside, run_property
from ernie_ref import ErnieMoeConfig
from ernie_ref.layout import Layout
from ernie_ref.megatron import ReferenceBridge


def biased_config(tie: bool, shared: int, layers: int = 2) -> ErnieMoeConfig:
    """Layer 0 dense (its MLP has biases), layer 1 MoE (shared experts with biases, routed without).
    The widths differ (dense 12, shared 4 x 2, routed 4), so that no module can take another's."""
    return ErnieMoeConfig.from_hf(dict(
        vocab_size=16, hidden_size=16, intermediate_size=12, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=4, moe_num_shared_experts=shared,
        moe_layer_start_index=1, use_bias=True, tie_word_embeddings=tie))


def run_all(case: Case) -> list[str]:
    """Run the four properties that load the checkpoint; returns those set aside (ill-conditioned)."""
    set_aside = []
    for prop in ("import", "round_trip", "equivalence", "interop"):
        try:
            run_property(prop, ReferenceBridge(), case)
        except SetAside:
            set_aside.append(prop)
    return set_aside


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("shared", [0, 2], ids=["no-shared", "two-shared"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_use_bias_converts_exactly_on_one_rank(megatron_runtime, tie: bool, shared: int, dtype: str) -> None:
    cfg = biased_config(tie, shared)
    assert ReferenceBridge().unsupported(cfg) is None
    set_aside = run_all(Case(cfg, weights_seed=3, inputs=Inputs(2, 5, 1), dtype=dtype))
    assert "equivalence" not in set_aside or dtype == "bfloat16", f"{cfg.one_line()}: set aside {set_aside}"


@pytest.mark.parametrize("layout", ["tp2-pp1-ep1-vpp1", "tp1-pp2-ep1-vpp1"])
def test_use_bias_converts_exactly_across_ranks(megatron_runtime, layout: str) -> None:
    """tp 2 splits the fused qkv bias by key/value group, fc1's [gate; up] bias part by part and
    lm_head's bias with the vocabulary; pp 2 puts lm_head's bias on the last stage, tied or not."""
    from conformance.rank_pool import RankPool

    with RankPool(2) as pool:
        set_pool(pool)
        try:
            for tie in (True, False):
                cfg = biased_config(tie, shared=2)
                set_aside = run_all(Case(cfg, weights_seed=5, inputs=Inputs(2, 4, 2), layout=Layout.parse(layout)))
                assert not set_aside, f"{cfg.one_line()} at {layout}: set aside {set_aside}"
        finally:
            set_pool(None)


class VocabParallelOutputBridge(ReferenceBridge):
    """The reference bridge with its output layer left vocabulary-parallel, as GPTModel builds it
    for training (parallel_output=True, mcore-bridge's models among them): each tensor-parallel
    rank's logits are its slice of the vocabulary."""

    def load(self, hf_dir, layout):
        chunks = super().load(hf_dir, layout)
        if getattr(chunks[-1], "output_layer", None) is not None:
            chunks[-1].parallel_output = True
            chunks[-1].output_layer.gather_output = False
        return chunks


def test_vocabulary_parallel_logits_are_gathered(megatron_runtime) -> None:
    """The suite compares the whole vocabulary's logits, whichever way the model gives them."""
    from conformance.rank_pool import RankPool

    with RankPool(2) as pool:
        set_pool(pool)
        try:
            case = Case(biased_config(tie=False, shared=2), weights_seed=5, inputs=Inputs(2, 4, 2),
                        layout=Layout.parse("tp2-pp1-ep1-vpp1"))
            run_property("equivalence", VocabParallelOutputBridge(), case)
        finally:
            set_pool(None)


class DeallocatingPipelineOutputsBridge(ReferenceBridge):
    """The reference bridge with Megatron-Core's deallocate_pipeline_outputs on, as mcore-bridge's
    ModelConfig and Megatron-Bridge's providers set it for training: a pipeline schedule frees each
    chunk's output once it is sent (its .data becomes a 1-element tensor)."""

    def load(self, hf_dir, layout):
        chunks = super().load(hf_dir, layout)
        for chunk in chunks:
            chunk.config.deallocate_pipeline_outputs = True
        return chunks


def test_the_trace_survives_pipeline_outputs_freed_after_sending(megatron_runtime) -> None:
    """The suite records each layer's output when the layer gives it, not after the forward: a
    chunk's last layer output is the tensor the schedule frees, and a freed one is no bridge's
    defect (the suite once reported it as one: "layer 6 gave hidden states of shape [1]")."""
    from conformance.rank_pool import RankPool

    with RankPool(2) as pool:
        set_pool(pool)
        try:
            for layout in ("tp1-pp2-ep1-vpp1", "tp1-pp2-ep1-vpp2"):
                case = Case(biased_config(tie=False, shared=2, layers=4), weights_seed=5, inputs=Inputs(2, 4, 2),
                            layout=Layout.parse(layout))
                run_property("equivalence", DeallocatingPipelineOutputsBridge(), case)
        finally:
            set_pool(None)
