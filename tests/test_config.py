"""ErnieMoeConfig: parsing, defaults, aliases, the layer pattern, and refusals that name the field."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, Ernie4_5_MoeConfig

from conformance.strategies import checkpoint_formats, configs
from ernie_ref import ConfigError, ErnieMoeConfig

# The fields transformers' Ernie4_5_MoeConfig and ErnieMoeConfig share (rope theta is compared apart).
FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "use_bias", "moe_num_experts",
          "moe_k", "moe_num_shared_experts", "moe_intermediate_size", "moe_layer_start_index", "moe_layer_end_index",
          "moe_layer_interval", "moe_norm_min")

MINIMAL = dict(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=8,
)


@given(data=st.data())
def test_to_hf_round_trips_and_transformers_reads_the_same_values(data: st.DataObject) -> None:
    cfg = data.draw(configs(), label="config")
    hf = cfg.to_hf()
    assert ErnieMoeConfig.from_hf(hf) == cfg
    theirs = Ernie4_5_MoeConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    for name in FIELDS:
        assert getattr(theirs, name) == getattr(cfg, name), f"{name}: transformers {getattr(theirs, name)!r} != {getattr(cfg, name)!r}"
    assert theirs.rope_parameters["rope_theta"] == cfg.rope_theta


@settings(max_examples=30)
@given(data=st.data())
def test_every_checkpoint_format_reads_as_transformers_reads_it(data: st.DataObject) -> None:
    """A config.json spelled as published ones may be (keys left to their defaults, a legacy
    top-level rope_theta, keys transformers does not read, num_nextn_predict_layers): transformers'
    AutoConfig reads the values ErnieMoeConfig reads, which are those of the config written."""
    cfg = data.draw(configs(), label="config")
    fmt = data.draw(checkpoint_formats(cfg), label="checkpoint format")
    hf = fmt.config_json(cfg, "bfloat16")
    assert ErnieMoeConfig.from_hf(hf) == cfg, f"{fmt}: {hf}"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(hf))
        theirs = AutoConfig.from_pretrained(d)
    # transformers' modeling code reads a missing head_dim as hidden_size // num_attention_heads.
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert head_dim == cfg.head_dim, (head_dim, cfg.head_dim, fmt)
    for name in (f for f in FIELDS if f != "head_dim"):
        assert getattr(theirs, name) == getattr(cfg, name), (
            f"{name}: transformers {getattr(theirs, name)!r} != {getattr(cfg, name)!r}; format {fmt}; {hf}")
    assert theirs.rope_parameters["rope_theta"] == cfg.rope_theta, (theirs.rope_parameters, fmt)


@given(data=st.data())
def test_layer_pattern_follows_transformers_rule(data: st.DataObject) -> None:
    layers = data.draw(st.integers(1, 12), label="num_hidden_layers")
    start = data.draw(st.integers(0, layers + 1), label="start")
    end = data.draw(st.sampled_from([-1, *range(layers)]), label="end")
    interval = data.draw(st.integers(1, layers + 1), label="interval")
    cfg = ErnieMoeConfig.from_hf({**MINIMAL, "num_hidden_layers": layers, "moe_layer_start_index": start,
                                  "moe_layer_end_index": end, "moe_layer_interval": interval})
    resolved_end = layers - 1 if end == -1 else end
    expected = ["moe" if (i + 1) % interval == 0 and start <= i <= resolved_end else "dense" for i in range(layers)]
    assert cfg.layer_types == expected, f"start={start} end={end} interval={interval}"
    assert cfg.moe_layers == [i for i, t in enumerate(expected) if t == "moe"]


def test_defaults_are_transformers_and_are_recorded() -> None:
    cfg = ErnieMoeConfig.from_hf(MINIMAL)
    theirs = Ernie4_5_MoeConfig(**MINIMAL)
    assert cfg.head_dim == 4 and cfg.moe_layer_end_index == 2
    assert cfg.rope_theta == theirs.rope_parameters["rope_theta"] == 500000.0
    assert (cfg.rms_norm_eps, cfg.moe_norm_min, cfg.moe_num_shared_experts) == (
        theirs.rms_norm_eps, theirs.moe_norm_min, theirs.moe_num_shared_experts)
    assert (cfg.tie_word_embeddings, cfg.use_bias) == (theirs.tie_word_embeddings, theirs.use_bias)
    assert "rope_theta" in cfg.defaulted and "moe_norm_min" in cfg.defaulted and "vocab_size" not in cfg.defaulted


def test_aliases_legacy_rope_theta_and_unknown_keys() -> None:
    d = {k: v for k, v in MINIMAL.items() if k not in ("moe_num_experts", "moe_k")}
    cfg = ErnieMoeConfig.from_hf({**d, "num_experts": 4, "num_experts_per_tok": 3, "rope_theta": 1234.0,
                                  "bos_token_id": 1, "moe_capacity": [64, 64, 64]})
    assert (cfg.moe_num_experts, cfg.moe_k, cfg.rope_theta) == (4, 3, 1234.0)
    hf = cfg.to_hf()
    assert hf["bos_token_id"] == 1 and hf["moe_capacity"] == [64, 64, 64]
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 1234.0} and "rope_theta" not in hf
    assert cfg == cfg.replace(), "extra keys do not take part in equality"
    assert cfg != cfg.replace(rms_norm_eps=1e-6)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(moe_k=5), "moe_k"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(intermediate_size=2.5), "intermediate_size"),
        (dict(num_hidden_layers=True), "num_hidden_layers"),
        (dict(head_dim=5), "head_dim"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(moe_norm_min=-1.0), "moe_norm_min"),
        (dict(moe_layer_end_index=7), "moe_layer_end_index"),
        (dict(moe_layer_interval=0), "moe_layer_interval"),
        (dict(moe_num_shared_experts=-1), "moe_num_shared_experts"),
        (dict(moe_num_experts=[64, 64]), "moe_num_experts"),
        (dict(use_bias="no"), "use_bias"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(rope_theta=10.0, rope_parameters={"rope_type": "default", "rope_theta": 20.0}), "rope_theta"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(model_type="llama"), "model_type"),
        (dict(num_experts=3), "moe_num_experts"),
    ],
)
def test_impossible_values_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        ErnieMoeConfig.from_hf({**MINIMAL, **change})
    value = next(iter(change.values()))
    if not isinstance(value, dict):
        assert repr(value) in str(info.value) or str(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("missing", ["vocab_size", "hidden_size", "moe_num_experts", "moe_k", "num_key_value_heads"])
def test_missing_required_field_is_named(missing: str) -> None:
    with pytest.raises(ConfigError, match=f"'{missing}' is missing"):
        ErnieMoeConfig.from_hf({k: v for k, v in MINIMAL.items() if k != missing})
