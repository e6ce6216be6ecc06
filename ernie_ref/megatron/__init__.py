"""The reference HF <-> Megatron-Core bridge: the only part of `ernie_ref` that imports megatron."""

from .bridge import ReferenceBridge, UnsupportedConfig

__all__ = ["ReferenceBridge", "UnsupportedConfig"]
