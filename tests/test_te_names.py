"""The Transformer Engine spec's tensor names (`ernie_ref.megatron.mapping.te_name`), checked
without a GPU.

Transformer Engine cannot run here, so its modules cannot be built. Megatron-Core states the
names another way: a model of its local spec saves its distributed checkpoint under the names of
the Transformer Engine spec (the local layer spec's `sharded_state_dict_keys_map`), so that the
two specs load each other's checkpoints. The reference mapping's TE names must be those keys.

Two kinds of tensor are outside that statement. Routed experts are saved grouped (one
`experts.experts.linear_fc1.weight` of all experts), a checkpoint format rather than module names;
with one MLP per expert, as the reference bridge builds them, both specs name them
`local_experts.E`. And an MoE layer's pre-MLP norm: the local spec's key map sends every layer's
to `mlp.linear_fc1.layer_norm_weight`, but the Transformer Engine spec builds a separate norm for
MoE layers (`pre_mlp_layernorm=backend.layer_norm() if num_experts else IdentityOp` in
gpt_layer_specs), so the TE name stays `pre_mlp_layernorm.weight` there (as Megatron-Bridge's
ERNIE mapping also names it).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.strategies import configs
from ernie_ref.layout import Layout
from ernie_ref.megatron import ReferenceBridge
from ernie_ref.megatron.mapping import name_pairs
from ernie_ref.megatron.model import build_chunks, transformer_config


def _outside_keys_map(cfg, name: str) -> bool:
    parts = name.split(".")
    return "local_experts" in parts or (
        name.endswith("pre_mlp_layernorm.weight") and cfg.is_moe_layer(int(parts[2])))


@settings(max_examples=15, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_te_names_are_megatron_cores_checkpoint_keys(megatron_runtime, data: st.DataObject) -> None:
    from conformance.parallel import init_model_parallel

    cfg = data.draw(configs(), label="config")
    init_model_parallel(1, 1, 1, None, seed=0)
    model = build_chunks(cfg, transformer_config(cfg, Layout()), Layout())[0]
    keys = {name: getattr(item, "key", None) for name, item in model.sharded_state_dict().items()
            if not name.endswith("_extra_state")}
    local = {tuple(hf): mg for hf, mg in name_pairs(cfg)}
    te = {tuple(hf): mg for hf, mg in name_pairs(cfg, transformer_engine=True)}
    assert set(local.values()) == set(keys), (
        f"the local names are not the model's: {sorted(set(local.values()) ^ set(keys))[:4]}; {cfg.one_line()}")
    compared = renamed = 0
    for hf, name in local.items():
        if _outside_keys_map(cfg, name):
            assert te[hf] == name, f"{name}: the TE spec names it as the local spec does, got {te[hf]}; {cfg.one_line()}"
            continue
        assert te[hf] == keys[name], (
            f"{'+'.join(hf)}: TE name {te[hf]}, Megatron-Core's checkpoint key {keys[name]}; {cfg.one_line()}")
        compared += 1
        renamed += te[hf] != name
    dense = cfg.layer_types.count("dense")
    # Non-vacuous: every attention norm and every dense layer's norm is renamed, and checked.
    assert renamed == cfg.num_hidden_layers + dense, (renamed, cfg.num_hidden_layers, dense, cfg.one_line())
    assert compared >= renamed > 0


def test_te_spec_without_transformer_engine_is_refused(megatron_runtime) -> None:
    from ernie_ref import ErnieMoeConfig

    cfg = ErnieMoeConfig.from_hf({
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "moe_num_experts": 2, "moe_k": 1,
        "moe_intermediate_size": 4, "moe_num_shared_experts": 0, "moe_layer_start_index": 0,
    })
    assert not torch.cuda.is_available(), "this test is about a machine without a GPU"
    assert ReferenceBridge().transformer_engine is False, "without a GPU the reference bridge uses the local spec"
    with pytest.raises(RuntimeError, match="Transformer Engine layer spec needs transformer_engine and a CUDA GPU"):
        ReferenceBridge(transformer_engine=True).build(cfg, Layout())
