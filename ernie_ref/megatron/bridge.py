"""The reference HF <-> Megatron-Core bridge for ERNIE 4.5 MoE."""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from collections.abc import Mapping

from ernie_ref.checkpoint import IGNORED_KEY_FRAGMENT, checkpoint_dtype, expected_keys, open_checkpoint, save_checkpoint
from ernie_ref.config import ErnieMoeConfig
from ernie_ref.layout import Layout

from .mapping import MegatronView, megatron_to_hf
from .model import build_chunks, transformer_config, transformer_engine_available
from .router import ErnieRouter

__all__ = ["ReferenceBridge", "UnsupportedConfig", "global_name", "tensor_parallel_shard", "tp_split"]


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
    """Converts exactly, or refuses through `unsupported`; every tensor is checked on the way in.

    A published checkpoint's multi-token-prediction tensors (names with "mtp", which transformers
    skips) are not converted into Megatron-Core's MTP block: the rank that exports holds them
    beside its model chunks (`carried_hf_tensors` of the first chunk) and export writes them back
    unchanged.
    """

    name = "reference"
    router_class: type = ErnieRouter

    def __init__(self, transformer_engine: bool | None = None):
        # Megatron-Core's Transformer Engine layer spec where TE can run (a GPU with TE
        # installed), else its local spec; the two name some tensors differently (mapping.te_name).
        self.transformer_engine = transformer_engine_available() if transformer_engine is None else transformer_engine

    def version(self) -> str:
        try:
            v = version("ernie-conformance")
        except PackageNotFoundError:
            v = "unknown"
        commit = _git_commit()
        return f"{v}+g{commit}" if commit else v

    def unsupported(self, config: ErnieMoeConfig) -> str | None:
        """Nothing: every config transformers loads converts exactly (use_bias included)."""
        return None

    def megatron_config(self, cfg: ErnieMoeConfig, layout: Layout, dtype: torch.dtype = torch.float32):
        """The TransformerConfig of the Megatron model, whose parameters are in `dtype`."""
        return transformer_config(cfg, layout, dtype=dtype)

    # The steps of a conversion, each a method so that a variant (a deliberately broken bridge
    # in the meta-tests, say) can change one of them.
    def read_checkpoint(self, hf_dir: Path) -> tuple[ErnieMoeConfig, Mapping[str, torch.Tensor]]:
        """Config and lazily read tensors; raises naming any missing, extra or misshaped tensor."""
        return open_checkpoint(hf_dir)

    def model_dtype(self, cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor]) -> torch.dtype:
        """The checkpoint's dtype (fp32 or bf16), which the model is built in; raises on mixed dtypes."""
        dtypes = getattr(hf, "dtypes", None)  # a TensorReader knows them from the file headers
        return checkpoint_dtype(cfg, dtypes if dtypes is not None else {k: v.dtype for k, v in hf.items()})

    def to_megatron(self, cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The full Megatron tensors, built one at a time as the model's parameters ask for them."""
        return MegatronView(cfg, hf, self.transformer_engine)

    def to_hf(self, cfg: ErnieMoeConfig, mg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return megatron_to_hf(cfg, mg, self.transformer_engine)

    def write_checkpoint(self, out_dir: Path, cfg: ErnieMoeConfig, hf: dict[str, torch.Tensor]) -> None:
        save_checkpoint(out_dir, cfg, hf)

    def build(self, cfg: ErnieMoeConfig, layout: Layout, dtype: torch.dtype = torch.float32) -> list[torch.nn.Module]:
        """This rank's model chunks, freshly initialised in `dtype` (the router in fp32), for `cfg` under `layout`."""
        return build_chunks(cfg, self.megatron_config(cfg, layout, dtype), layout, self.router_class,
                            self.transformer_engine)

    def local_tensor(self, full: Mapping[str, torch.Tensor], name: str, target: torch.Tensor,
                     chunk: torch.nn.Module) -> torch.Tensor:
        """What this rank's tensor `name` (now `target`) is loaded with; raises if the mapping lacks it."""
        return _local_shard(self, full, name, target, chunk)

    def global_name(self, name: str, chunk: torch.nn.Module) -> str | None:
        """This chunk's tensor `name` in the full model (pipeline and expert offsets applied)."""
        return global_name(name, chunk, chunk.ernie_config.tie_word_embeddings)

    def tp_split(self, name: str, chunk: torch.nn.Module) -> tuple[int, int]:
        """(dimension, stride) of the tensor-parallel split of parameter `name`."""
        return tp_split(name, chunk)

    # ------------------------------------------------------------------ HF -> Megatron
    def load(self, hf_dir: Path, layout: Layout) -> list[torch.nn.Module]:
        cfg, hf = self.read_checkpoint(hf_dir)
        if (reason := self.unsupported(cfg)) is not None:
            raise UnsupportedConfig(f"reference bridge: {reason}")
        if (problem := layout.problem(cfg)) is not None:
            raise ValueError(f"reference bridge: {problem}")
        dtype = self.model_dtype(cfg, hf)
        full = self.to_megatron(cfg, hf)
        chunks = self.build(cfg, layout, dtype)
        full_shapes = _full_shapes(cfg, self.transformer_engine)
        if not dist.is_initialized() or dist.get_rank() == 0:  # the rank that writes the export
            chunks[0].carried_hf_tensors = {k: hf[k] for k in hf if IGNORED_KEY_FRAGMENT in k}
        for chunk in chunks:
            chunk.ernie_config = cfg  # export writes this config back
            chunk.full_shapes = full_shapes  # tells a tensor-parallel shard from a whole tensor
            # Every parameter and persistent buffer, one tensor at a time, in place.
            with torch.no_grad():
                for name, target in _own_tensors(chunk).items():
                    target.copy_(self.local_tensor(full, name, target, chunk))
        return chunks

    # ------------------------------------------------------------------ Megatron -> HF
    def export(self, chunks: list[torch.nn.Module], out_dir: Path) -> None:
        cfg: ErnieMoeConfig = chunks[0].ernie_config
        # Every rank turns its shards into full tensors under global names; rank 0 collects them
        # all, converts and writes. A stage whose layers are all dense simply has no MoE tensors.
        mine: dict[str, torch.Tensor] = {}
        for chunk in chunks:
            for name, tensor in _own_tensors(chunk).items():
                global_name = self.global_name(name, chunk)
                full = _gather_shards(self, tensor, name, chunk)  # collective over the TP group
                if global_name is not None:
                    mine[global_name] = full
        if not dist.is_initialized() or dist.get_world_size() == 1:
            gathered = [mine]
        else:
            gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(mine, gathered, dst=0)
        try:
            if not dist.is_initialized() or dist.get_rank() == 0:
                mg = {}
                for part in gathered:
                    mg.update(part)
                carried = getattr(chunks[0], "carried_hf_tensors", {})
                self.write_checkpoint(out_dir, cfg, {**self.to_hf(cfg, mg), **carried})
        finally:  # even when rank 0 fails to write, no rank is left waiting for it
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()  # the directory is complete when export returns, on every rank


@functools.lru_cache(maxsize=16)
def _full_shapes(cfg: ErnieMoeConfig, transformer_engine: bool) -> dict[str, tuple[int, ...]]:
    """{Megatron name: full shape} of `cfg`'s model (computed once per config: a published structure
    has thousands of tensors, and every load and export asks)."""
    return {k: tuple(v.shape) for k, v in MegatronView(cfg, _meta_tensors(cfg), transformer_engine).items()}


def _meta_tensors(cfg: ErnieMoeConfig) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for the HF tensors, to compute full Megatron shapes without data."""
    return {k: torch.empty(shape, device="meta") for k, shape in expected_keys(cfg).items()}


def _own_tensors(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers; `_extra_state` entries belong to Transformer Engine."""
    return {k: v for k, v in chunk.state_dict().items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def global_name(name: str, chunk: torch.nn.Module, tied: bool) -> str | None:
    """Local name in this chunk of a Megatron-Core GPTModel -> name in the full model (pipeline
    layer offset from each layer's `layer_number`, expert offset from the expert-parallel rank).

    None for the last stage's copy of tied embeddings (`output_layer.weight` when `tied`): it is
    not a tensor of its own.
    """
    parts = name.split(".")
    if name == "output_layer.weight" and tied:
        return None
    if parts[:2] == ["decoder", "layers"]:
        layer = chunk.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if "local_experts" in parts:
            i = parts.index("local_experts") + 1
            experts_per_rank = layer.mlp.num_local_experts
            parts[i] = str(parallel_state.get_expert_model_parallel_rank() * experts_per_rank + int(parts[i]))
    return ".".join(parts)


def tp_split(name: str, chunk: torch.nn.Module) -> tuple[int, int]:
    """(dimension, stride) of the tensor-parallel split of a parameter; fc1 = [gate; up] has stride 2."""
    param = dict(chunk.named_parameters()).get(name)
    return getattr(param, "partition_dim", 0), getattr(param, "partition_stride", 1)


def _gather_shards(bridge: ReferenceBridge, local: torch.Tensor, name: str, chunk: torch.nn.Module) -> torch.Tensor:
    """The full tensor of which every TP rank holds `local` (itself when it is not split)."""
    expected = chunk.full_shapes.get(bridge.global_name(name, chunk) or "embedding.word_embeddings.weight")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or expected is None or tuple(local.shape) == expected:
        return local.detach().clone()
    dim, stride = bridge.tp_split(name, chunk)
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    # Each shard is [part_0 of rank r; part_1 of rank r; ...]; reassemble part by part.
    parts = [torch.cat([shard.chunk(stride, dim=dim)[k] for shard in shards], dim=dim) for k in range(stride)]
    return torch.cat(parts, dim=dim)


def tensor_parallel_shard(tensor: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full tensor split along `dim`; a fused tensor of
    `stride` parts (fc1 = [gate; up]: stride 2) is split part by part."""
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    pieces = [part.chunk(tp, dim=dim)[rank] for part in tensor.chunk(stride, dim=dim)]
    return torch.cat(pieces, dim=dim)


def _local_shard(
    bridge: ReferenceBridge, full: Mapping[str, torch.Tensor], name: str, local: torch.Tensor, chunk: torch.nn.Module
) -> torch.Tensor:
    """The slice of the full Megatron tensor that this rank holds under `name`."""
    global_name = bridge.global_name(name, chunk) or "embedding.word_embeddings.weight"
    if global_name not in full:
        raise RuntimeError(f"reference bridge: the model has {name} (global {global_name}), which the mapping lacks")
    tensor = full[global_name]
    if tensor.dtype != local.dtype:  # copy_ would cast silently
        raise RuntimeError(f"reference bridge: {name} is {local.dtype} in the model, the checkpoint gives {tensor.dtype}")
    if tensor.shape == local.shape:
        return tensor
    shard = tensor_parallel_shard(tensor, *bridge.tp_split(name, chunk))
    if shard.shape != local.shape:
        raise RuntimeError(f"reference bridge: {name} is {list(local.shape)} on this rank, the checkpoint gives {list(shard.shape)}")
    return shard
