"""The reference HF <-> Megatron-Core bridge for ERNIE 4.5 MoE."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from megatron.core import parallel_state

from collections.abc import Mapping

from ernie_ref.checkpoint import open_checkpoint, save_checkpoint
from ernie_ref.config import ErnieMoeConfig
from ernie_ref.layout import Layout

from .mapping import MegatronView, megatron_to_hf
from .model import build_chunks, transformer_config
from .router import ErnieRouter

__all__ = ["ReferenceBridge", "UnsupportedConfig"]


class UnsupportedConfig(ValueError):
    """The bridge cannot represent this config exactly, and says so instead of converting."""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class ReferenceBridge:
    """Converts exactly, or refuses through `unsupported`; every tensor is checked on the way in."""

    name = "reference"
    router_class: type = ErnieRouter

    def version(self) -> str:
        try:
            v = version("ernie-conformance")
        except PackageNotFoundError:
            v = "unknown"
        commit = _git_commit()
        return f"{v}+g{commit}" if commit else v

    def unsupported(self, config: ErnieMoeConfig) -> str | None:
        if config.use_bias:
            return ("use_bias: Megatron-Core's add_bias_linear would also put biases on routed experts, "
                    "which ERNIE lacks, and GPTModel has no lm_head bias")
        return None

    def megatron_config(self, cfg: ErnieMoeConfig, layout: Layout):
        """The TransformerConfig of the Megatron model (fp32)."""
        return transformer_config(cfg, layout, dtype=torch.float32)

    # The steps of a conversion, each a method so that a variant (a deliberately broken bridge
    # in the meta-tests, say) can change one of them.
    def read_checkpoint(self, hf_dir: Path) -> tuple[ErnieMoeConfig, Mapping[str, torch.Tensor]]:
        """Config and lazily read tensors; raises naming any missing, extra or misshaped tensor."""
        return open_checkpoint(hf_dir)

    def to_megatron(self, cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The full Megatron tensors, built one at a time as the model's parameters ask for them."""
        return MegatronView(cfg, hf)

    def to_hf(self, cfg: ErnieMoeConfig, mg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return megatron_to_hf(cfg, mg)

    def write_checkpoint(self, out_dir: Path, cfg: ErnieMoeConfig, hf: dict[str, torch.Tensor]) -> None:
        save_checkpoint(out_dir, cfg, hf)

    # ------------------------------------------------------------------ HF -> Megatron
    def load(self, hf_dir: Path, layout: Layout) -> list[torch.nn.Module]:
        cfg, hf = self.read_checkpoint(hf_dir)
        if (reason := self.unsupported(cfg)) is not None:
            raise UnsupportedConfig(f"reference bridge: {reason}")
        full = self.to_megatron(cfg, hf)
        chunks = build_chunks(cfg, self.megatron_config(cfg, layout), layout, self.router_class)
        for chunk in chunks:
            # Every parameter and persistent buffer, one tensor at a time, in place.
            with torch.no_grad():
                for name, target in _own_tensors(chunk).items():
                    target.copy_(_local_shard(full, name, target, chunk))
            chunk.ernie_config = cfg  # export writes this config back
        return chunks

    # ------------------------------------------------------------------ Megatron -> HF
    def export(self, chunks: list[torch.nn.Module], out_dir: Path) -> None:
        if parallel_state.get_tensor_model_parallel_world_size() > 1 or len(chunks) > 1 or (
            parallel_state.get_pipeline_model_parallel_world_size() > 1
            or parallel_state.get_expert_model_parallel_world_size() > 1
        ):
            raise NotImplementedError("reference bridge: export from a parallel layout is not implemented yet")
        chunk = chunks[0]
        cfg: ErnieMoeConfig = chunk.ernie_config
        mg = {name: t.detach() for name, t in _own_tensors(chunk).items()}
        self.write_checkpoint(out_dir, cfg, self.to_hf(cfg, mg))


def _own_tensors(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers; `_extra_state` entries belong to Transformer Engine."""
    return {k: v for k, v in chunk.state_dict().items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _global_name(name: str, chunk: torch.nn.Module) -> str:
    """Local name in this chunk -> name in the full model (pipeline layer offset, expert offset)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = chunk.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if "local_experts" in parts:
            i = parts.index("local_experts") + 1
            experts_per_rank = layer.mlp.num_local_experts
            parts[i] = str(parallel_state.get_expert_model_parallel_rank() * experts_per_rank + int(parts[i]))
    return ".".join(parts)


def _local_shard(full: Mapping[str, torch.Tensor], name: str, local: torch.Tensor, chunk: torch.nn.Module) -> torch.Tensor:
    """The slice of the full Megatron tensor that this rank holds under `name`."""
    global_name = _global_name(name, chunk)
    if global_name not in full:
        raise RuntimeError(f"reference bridge: the model has {name} (global {global_name}), which the mapping lacks")
    tensor = full[global_name]
    if tensor.shape == local.shape:
        return tensor
    # Split along the tensor-parallel dimension; fc1 = [gate; up] is split per half (stride 2).
    param = dict(chunk.named_parameters()).get(name)
    dim = getattr(param, "partition_dim", 0)
    stride = getattr(param, "partition_stride", 1)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    pieces = [part.chunk(tp, dim=dim)[rank] for part in tensor.chunk(stride, dim=dim)]
    shard = torch.cat(pieces, dim=dim)
    if shard.shape != local.shape:
        raise RuntimeError(f"reference bridge: {name} is {list(local.shape)} on this rank, the checkpoint gives {list(shard.shape)}")
    return shard
