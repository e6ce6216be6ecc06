"""Checkpoint I/O in the real on-disk format, crossing both ways with transformers, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

from conformance.hf_transformers import load_transformers_model, run_transformers
from conformance.numerics import FP32_RTOL, relative_error
from ernie_ref import (
    CheckpointError,
    ConfigError,
    ErnieMoeConfig,
    ErnieMoeForCausalLM,
    expected_keys,
    load_checkpoint,
    random_checkpoint,
    save_checkpoint,
)
from ernie_ref.checkpoint import FP32_TENSOR_SUFFIXES, TensorReader, checkpoint_dtype, read_config

HF = dict(
    vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=6, moe_num_experts=3, moe_k=2, moe_intermediate_size=8,
    moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1,
    tie_word_embeddings=False, use_bias=False,
)


@pytest.fixture
def cfg() -> ErnieMoeConfig:
    return ErnieMoeConfig.from_hf(HF)


def test_expected_keys_use_hf_names(cfg: ErnieMoeConfig) -> None:
    keys = expected_keys(cfg)
    assert keys["model.layers.1.mlp.gate.weight"] == (3, 16)
    assert keys["model.layers.1.mlp.moe_statics.e_score_correction_bias"] == (1, 3)
    assert keys["model.layers.1.mlp.experts.2.gate_proj.weight"] == (8, 16)
    assert keys["model.layers.1.mlp.shared_experts.down_proj.weight"] == (16, 8)
    assert keys["model.layers.0.mlp.up_proj.weight"] == (24, 16)
    assert keys["model.layers.0.self_attn.k_proj.weight"] == (12, 16)
    assert "model.layers.0.mlp.gate.weight" not in keys
    assert "lm_head.weight" in keys
    tied = expected_keys(cfg.replace(tie_word_embeddings=True, use_bias=True))
    assert "lm_head.weight" not in tied and tied["lm_head.bias"] == (48,)
    assert "model.layers.1.mlp.experts.0.gate_proj.bias" not in tied, "routed experts never have biases"
    assert tied["model.layers.1.mlp.shared_experts.gate_proj.bias"] == (8,)


@pytest.mark.parametrize("tie", [False, True])
def test_written_by_ernie_ref_loads_in_transformers(tmp_path: Path, cfg: ErnieMoeConfig, tie: bool) -> None:
    cfg = cfg.replace(tie_word_embeddings=tie)
    state = random_checkpoint(cfg, tmp_path, seed=5)
    theirs = load_transformers_model(tmp_path)  # asserts no missing or unexpected keys
    ours = ErnieMoeForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    err = relative_error(ours(ids), run_transformers(theirs, ids).logits)
    assert err <= FP32_RTOL, f"rel err {err:.3g}"
    # transformers fused the experts; the fused tensor must hold our per-expert tensors in order.
    fused = theirs.model.layers[1].mlp.experts.gate_up_proj  # [E, 2 * I, H]
    for e in range(cfg.moe_num_experts):
        gate = state[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]
        assert torch.equal(fused[e, : cfg.moe_intermediate_size], gate), f"expert {e} gate_proj"


def test_saved_by_transformers_loads_in_ernie_ref(tmp_path: Path, cfg: ErnieMoeConfig) -> None:
    torch.manual_seed(0)
    theirs = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in on_disk, "transformers writes per-expert names"
    loaded_cfg, state = load_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    ours = ErnieMoeForCausalLM.from_state_dict(loaded_cfg, state)
    theirs = load_transformers_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    err = relative_error(ours(ids), run_transformers(theirs, ids).logits)
    assert err <= FP32_RTOL, f"rel err {err:.3g}"


def test_sharded_checkpoint_round_trips_and_loads_in_transformers(tmp_path: Path, cfg: ErnieMoeConfig) -> None:
    state = random_checkpoint(cfg, tmp_path, seed=1, max_shard_bytes=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    loaded_cfg, loaded = load_checkpoint(tmp_path)
    assert loaded_cfg == cfg and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    load_transformers_model(tmp_path)


def _corrupt(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.2.mlp.experts.1.up_proj.weight"),
         r"'model.layers.2.mlp.experts.1.up_proj.weight' is missing: expected shape \[8, 16\]"),
        (lambda t: t.__setitem__("model.layers.0.mlp.experts.0.up_proj.weight", torch.zeros(8, 16)),
         "'model.layers.0.mlp.experts.0.up_proj.weight' is not part of the model"),
        (lambda t: t.__setitem__("model.layers.1.mlp.gate.weight", torch.zeros(16, 3)),
         r"'model.layers.1.mlp.gate.weight' has shape \[16, 3\]: expected \[3, 16\]"),
        (lambda t: t.__setitem__("model.layers.1.mlp.moe_statics.e_score_correction_bias", torch.zeros(3)),
         r"'model.layers.1.mlp.moe_statics.e_score_correction_bias' has shape \[3\]: expected \[1, 3\]"),
    ],
    ids=["missing", "extra", "misshaped router", "misshaped bias"],
)
def test_corrupt_tensors_are_named(tmp_path: Path, cfg: ErnieMoeConfig, edit, message: str) -> None:
    random_checkpoint(cfg, tmp_path, seed=0)
    _corrupt(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        ErnieMoeForCausalLM.from_pretrained(tmp_path)


def test_config_that_contradicts_the_weights_is_named(tmp_path: Path, cfg: ErnieMoeConfig) -> None:
    random_checkpoint(cfg, tmp_path, seed=0)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "moe_intermediate_size": 6}))
    with pytest.raises(CheckpointError, match=r"has shape \[8, 16\]: expected \[6, 16\] \(config.json: .*moe_intermediate_size=6"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "config.json").unlink(), "config.json"),
        (lambda p: (p / "config.json").write_text(json.dumps({**HF, "num_key_value_heads": 3})), "num_key_value_heads"),
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors"),
    ],
    ids=["invalid json", "no config", "impossible field", "no weights"],
)
def test_malformed_directory_is_named(tmp_path: Path, cfg: ErnieMoeConfig, write, message: str) -> None:
    random_checkpoint(cfg, tmp_path, seed=0)
    write(tmp_path)
    with pytest.raises((CheckpointError, ConfigError), match=message):
        load_checkpoint(tmp_path)


def test_save_refuses_a_state_dict_that_does_not_fit_the_config(tmp_path: Path, cfg: ErnieMoeConfig) -> None:
    with pytest.raises(CheckpointError, match="is missing"):
        save_checkpoint(tmp_path, cfg, {})


def test_router_stays_fp32_in_bf16_checkpoints(tmp_path: Path, cfg: ErnieMoeConfig) -> None:
    state = random_checkpoint(cfg, tmp_path, seed=0, dtype=torch.bfloat16)
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert state["model.layers.1.mlp.moe_statics.e_score_correction_bias"].dtype == torch.float32
    assert state["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = load_checkpoint(tmp_path)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in state.items())


def _retyped(path: Path, name: str, dtype: torch.dtype) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_dtype_is_read_from_the_headers(tmp_path: Path, cfg: ErnieMoeConfig, dtype: torch.dtype) -> None:
    random_checkpoint(cfg, tmp_path, seed=0, dtype=dtype)
    assert checkpoint_dtype(cfg, TensorReader(tmp_path).dtypes) == dtype


@pytest.mark.parametrize(
    "name, dtype, message",
    [
        ("model.layers.0.mlp.up_proj.weight", torch.float32,
         "tensor 'model.layers.0.mlp.up_proj.weight' is torch.float32: expected torch.bfloat16"),
        ("model.layers.1.mlp.gate.weight", torch.bfloat16,
         "tensor 'model.layers.1.mlp.gate.weight' is torch.bfloat16: expected torch.float32"),
        ("model.embed_tokens.weight", torch.float16, "' is torch.float16: expected one of torch.float32, torch.bfloat16"),
    ],
)
def test_mixed_or_unsupported_dtypes_are_named(tmp_path: Path, cfg: ErnieMoeConfig, name: str, dtype, message: str) -> None:
    random_checkpoint(cfg, tmp_path, seed=0, dtype=torch.bfloat16)
    _retyped(tmp_path, name, dtype)
    if dtype == torch.float16:  # every model tensor half: one dtype, but not one the bridge converts
        for other in expected_keys(cfg):
            if not other.endswith(FP32_TENSOR_SUFFIXES):
                _retyped(tmp_path, other, dtype)
        (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                          "dtype": "float16"}))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        checkpoint_dtype(cfg, TensorReader(tmp_path).dtypes)


def test_config_dtype_that_contradicts_the_tensors_is_named(tmp_path: Path, cfg: ErnieMoeConfig) -> None:
    random_checkpoint(cfg, tmp_path, seed=0, dtype=torch.bfloat16)
    hf = {**json.loads((tmp_path / "config.json").read_text()), "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="config.json dtype 'float32' contradicts the tensors, which are torch.bfloat16"):
        checkpoint_dtype(read_config(tmp_path), TensorReader(tmp_path).dtypes)
