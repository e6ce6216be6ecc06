"""Bridges for the verdict tests (tests/test_verdicts.py): each is wrong about what a verdict may rest on."""

from __future__ import annotations

from ernie_ref.megatron import ReferenceBridge


class RefusesAlmostEverything(ReferenceBridge):
    """Declares every config unsupported except one-layer, two-expert, top-1 models: whatever it
    passes, it was certified on almost nothing, and not on any published structure."""

    name = "refuses-almost-everything"

    def unsupported(self, config):
        if config.num_hidden_layers == 1 and config.moe_num_experts == 2 and config.moe_k == 1:
            return super().unsupported(config)
        return "only one-layer models with two experts and top-1 routing"
