"""`Layout`: how a Megatron-Core model is split over ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ErnieMoeConfig

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Tensor, pipeline, expert and virtual-pipeline parallel sizes.

    Expert tensor parallelism is 1 (each expert whole on one rank), so the smallest world that
    holds the layout has pp * lcm(tp, ep) ranks. `vpp` is the number of model chunks per
    pipeline stage (1: no virtual pipeline).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "vpp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{name}={value!r}: expected a positive integer")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"Layout.vpp={self.vpp} needs pipeline parallelism: pp is 1")

    @property
    def world_size(self) -> int:
        return self.pp * math.lcm(self.tp, self.ep)

    def __str__(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-ep{self.ep}-vpp{self.vpp}"

    def problem(self, cfg: ErnieMoeConfig) -> str | None:
        """Why `cfg` cannot be split this way (naming the field and what was expected), or None."""
        stages = self.pp * self.vpp
        rules = [
            ("num_hidden_layers", cfg.num_hidden_layers, stages, f"pp * vpp = {stages}"),
            ("num_key_value_heads", cfg.num_key_value_heads, self.tp, f"tp = {self.tp}"),
            ("vocab_size", cfg.vocab_size, self.tp, f"tp = {self.tp}"),
            ("intermediate_size", cfg.intermediate_size, self.tp, f"tp = {self.tp}"),
            ("moe_intermediate_size * moe_num_shared_experts", cfg.shared_intermediate_size, self.tp, f"tp = {self.tp}"),
            ("moe_num_experts", cfg.moe_num_experts, self.ep, f"ep = {self.ep}"),
        ]
        for field_name, value, divisor, what in rules:
            if value % divisor:
                return f"layout {self}: config field {field_name}={value} is not divisible by {what}"
        return None

    @classmethod
    def parse(cls, text: str) -> Layout:
        """'tp2-pp1-ep2-vpp1' (as `str` writes it; parts may be left out and default to 1)."""
        sizes = {}
        for part in filter(None, text.strip().split("-")):
            name = part.rstrip("0123456789")
            if name not in ("tp", "pp", "ep", "vpp") or name == part or name in sizes:
                raise ValueError(f"layout {text!r}: expected parts like tp2, pp1, ep2, vpp1 joined by '-'")
            sizes[name] = int(part[len(name):])
        return cls(**sizes)
