"""What a bridge loaded, against what the checkpoint holds: the import property on a user's
checkpoint, where constant tensors are legitimate (a zero expert bias, unit norms) and "nothing
is constant" proves nothing.

Runs on each rank after the bridge's `load`. The expected value of every tensor of a Megatron-Core
`GPTModel` follows from Megatron-Core's own conventions (its parameter names, fused q/k/v per
query group, fc1 = [gate; up], the tensor-parallel split of each parameter), so it is computed
here from the checkpoint, whichever bridge built the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ernie_ref.checkpoint import TensorReader, read_config
from ernie_ref.megatron.bridge import global_name, tensor_parallel_shard, tp_split
from ernie_ref.megatron.mapping import MegatronView

__all__ = ["compare_with_checkpoint"]

# Transformer Engine's spec fuses the attention norm into linear_qkv under this name.
_TE_MARKER = "linear_qkv.layer_norm_weight"


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def compare_with_checkpoint(chunks: list[torch.nn.Module], hf_dir: Path, prefix: str = "") -> dict[str, Any]:
    """{"checked": n, "mismatches": [(name, what differs)], "unmapped": {name: digest},
    "constant_unmapped": [(name, value)]} for this rank's parameters and persistent buffers.

    A tensor whose name Megatron-Core's conventions do not explain (another layer spec, say) is
    unmapped: its digest lets the caller compare two loads under different init seeds, and a
    constant one is reported, as with drawn weights."""
    cfg = read_config(hf_dir)
    names = [k for chunk in chunks for k in chunk.state_dict()]
    full = MegatronView(cfg, TensorReader(hf_dir), transformer_engine=any(_TE_MARKER in k for k in names))
    report: dict[str, Any] = {"checked": 0, "mismatches": [], "unmapped": {}, "constant_unmapped": []}
    for i, chunk in enumerate(chunks):
        for name, local in chunk.state_dict().items():
            if not isinstance(local, torch.Tensor) or name.endswith("_extra_state"):
                continue
            key = f"{prefix}chunk{i}.{name}"
            target = global_name(name, chunk, cfg.tie_word_embeddings) or "embedding.word_embeddings.weight"
            if target not in full.sources:
                report["unmapped"][key] = _digest(local)
                if local.numel() > 1 and local.is_floating_point() and torch.all(local == local.flatten()[0]):
                    report["constant_unmapped"].append((key, local.flatten()[0].item()))
                continue
            expected = full[target]
            if expected.shape != local.shape:
                expected = tensor_parallel_shard(expected, *tp_split(name, chunk))
            report["checked"] += 1
            if expected.shape != local.shape:
                report["mismatches"].append((key, f"shape {list(local.shape)}, the checkpoint's {target} gives "
                                                  f"{list(expected.shape)} on this rank"))
            elif not torch.equal(local.detach().cpu().to(expected.dtype), expected):
                diff = (local.detach().cpu().double() - expected.double()).abs().max().item()
                report["mismatches"].append((key, f"values differ from the checkpoint's {target} (built from "
                                                  f"{', '.join(full.sources[target])}; max abs diff {diff:.3g})"))
    return report
