"""Reference implementations for ERNIE 4.5 MoE: the pure-PyTorch oracle, HF checkpoint I/O, and
(under `ernie_ref.megatron`, which alone imports megatron-core) the reference bridge."""

from .checkpoint import (
    CheckpointError,
    CheckpointFormat,
    check_state_dict,
    expected_keys,
    load_checkpoint,
    random_checkpoint,
    random_state_dict,
    save_checkpoint,
)
from .config import ConfigError, ErnieMoeConfig
from .model import ErnieMoeForCausalLM, LayerTrace, RoutingTrace, Trace

__all__ = [
    "CheckpointError",
    "CheckpointFormat",
    "ConfigError",
    "ErnieMoeConfig",
    "ErnieMoeForCausalLM",
    "LayerTrace",
    "RoutingTrace",
    "Trace",
    "check_state_dict",
    "expected_keys",
    "load_checkpoint",
    "random_checkpoint",
    "random_state_dict",
    "save_checkpoint",
]
