"""The published ERNIE 4.5 MoE structures: the models people convert.

Each is the structural part of a published config.json (Baidu's -PT checkpoints; the -Base and
-Thinking variants share their structure). A bridge that declares one of them unsupported cannot
convert the models in use, whatever else it does right.
"""

from __future__ import annotations

import functools
from typing import Any

from .config import ErnieMoeConfig

__all__ = ["PUBLISHED_STRUCTURES", "PUBLISHED_EXTRA_KEYS", "STRUCTURAL_FIELDS", "published_config", "structure_of"]

_COMMON: dict[str, Any] = {
    "vocab_size": 103424,
    "head_dim": 128,  # not in the published config.json: hidden_size // num_attention_heads
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "max_position_embeddings": 131072,
    "moe_layer_interval": 1,
    "use_bias": False,
}

PUBLISHED_STRUCTURES: dict[str, dict[str, Any]] = {
    # ERNIE-4.5-21B-A3B(-Base)-PT and ERNIE-4.5-21B-A3B-Thinking
    "ERNIE-4.5-21B-A3B": {
        **_COMMON,
        "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28,
        "num_attention_heads": 20, "num_key_value_heads": 4,
        "moe_num_experts": 64, "moe_k": 6, "moe_num_shared_experts": 2, "moe_intermediate_size": 1536,
        "moe_layer_start_index": 1, "moe_layer_end_index": 27, "tie_word_embeddings": True,
    },
    # ERNIE-4.5-300B-A47B(-Base)-PT
    "ERNIE-4.5-300B-A47B": {
        **_COMMON,
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 54,
        "num_attention_heads": 64, "num_key_value_heads": 8,
        "moe_num_experts": 64, "moe_k": 8, "moe_num_shared_experts": 0, "moe_intermediate_size": 3584,
        "moe_layer_start_index": 3, "moe_layer_end_index": 53, "tie_word_embeddings": False,
    },
}


def published_config(name: str) -> ErnieMoeConfig:
    """The `ErnieMoeConfig` of the published structure `name` (a key of PUBLISHED_STRUCTURES)."""
    if name not in PUBLISHED_STRUCTURES:
        raise KeyError(f"{name!r}: not a published structure ({', '.join(PUBLISHED_STRUCTURES)})")
    return ErnieMoeConfig.from_hf(PUBLISHED_STRUCTURES[name])


# What makes a model one of the published structures: every field but the widths (hidden,
# intermediate and expert sizes, vocab), which only scale the work. A model with these fields of a
# published structure exercises the same layer and expert indices, head grouping, routing fan-out,
# layer pattern and tying as the published model.
STRUCTURAL_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "moe_num_experts", "moe_k", "moe_num_shared_experts", "moe_layer_start_index",
                     "moe_layer_end_index", "moe_layer_interval", "tie_word_embeddings")


@functools.cache
def _structural_values() -> dict[str, tuple[Any, ...]]:
    """{published name: its STRUCTURAL_FIELDS' values}, computed once."""
    return {name: tuple(getattr(published_config(name), f) for f in STRUCTURAL_FIELDS) for name in PUBLISHED_STRUCTURES}


def structure_of(cfg: ErnieMoeConfig) -> str | None:
    """The published structure whose structural fields `cfg` has (widths may be narrowed), or None."""
    values = tuple(getattr(cfg, f) for f in STRUCTURAL_FIELDS)
    return next((name for name, published in _structural_values().items() if values == published), None)


# Keys of the published config.json files that transformers does not read: Baidu's training
# settings (MoE capacity, gate kind, aux-free balancing), its norm flag, and the mapping to its own
# remote code (transformers has native code for model_type ernie4_5_moe and uses that). Besides
# these they carry `torch_dtype` (the legacy spelling of `dtype`) and, with their multi-token-
# prediction tensors, `num_nextn_predict_layers` (see `checkpoint.CheckpointFormat`).
PUBLISHED_EXTRA_KEYS: dict[str, Any] = {
    "moe_capacity": [64, 64, 64],
    "moe_gate": "topk",
    "moe_use_aux_free": True,
    "use_rmsnorm": True,
    "use_cache": False,
    "auto_map": {
        "AutoConfig": "configuration_ernie4_5_moe.Ernie4_5_MoeConfig",
        "AutoModel": "modeling_ernie4_5_moe.Ernie4_5_Model",
        "AutoModelForCausalLM": "modeling_ernie4_5_moe.Ernie4_5_MoeForCausalLM",
    },
}
