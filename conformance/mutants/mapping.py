"""Mutants of the weight mapping between HF and Megatron-Core names: q/k/v or gate/up fused in the
wrong order, experts, norms or layers looked up under the wrong name, o_proj transposed, lm_head
taken from the embedding. Most break load alone (`_ViewBridge`: export stays right)."""

from __future__ import annotations

import torch

from ernie_ref.megatron.mapping import MegatronView, fuse_qkv

from .base import Mutant, mutant

__all__ = ["QKVConcatenated", "KeyValueSwapped", "GateUpSwappedOnLoad", "GateUpSwappedOnExport", "ExpertsShifted",
           "LayerIndexReadAsOneDigit", "NormsSwapped", "OutputProjectionTransposed", "LmHeadFromEmbedding"]


class _ViewBridge(Mutant):
    """A mutant whose HF -> Megatron mapping is `view` (export stays right: load is what breaks)."""

    view: type[MegatronView] = MegatronView

    def to_megatron(self, cfg, hf):
        return self.view(cfg, hf)


class _RenamedView(MegatronView):
    """The full Megatron tensors, with some looked up under another Megatron name (or transformed)."""

    def rename(self, mg_name: str) -> str:
        return mg_name

    def transform(self, mg_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __getitem__(self, mg_name: str) -> torch.Tensor:
        return self.transform(mg_name, super().__getitem__(self.rename(mg_name)))


class _QKVConcatenated(MegatronView):
    def __getitem__(self, mg_name):
        if not mg_name.endswith("linear_qkv.weight"):
            return super().__getitem__(mg_name)
        q, k, v = (self.hf[n] for n in self.sources[mg_name])
        return torch.cat([q, k, v], dim=0)


class _KVSwapped(MegatronView):
    def __getitem__(self, mg_name):
        if not mg_name.endswith("linear_qkv.weight"):
            return super().__getitem__(mg_name)
        q, k, v = (self.hf[n] for n in self.sources[mg_name])
        return fuse_qkv(self.cfg, q, v, k)


class _GateUpSwapped(MegatronView):
    def __getitem__(self, mg_name):
        tensor = super().__getitem__(mg_name)
        if not mg_name.endswith("linear_fc1.weight"):
            return tensor
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([up, gate], dim=0)


class _ExpertsShifted(_RenamedView):
    def rename(self, mg_name):
        parts = mg_name.split(".")
        if "local_experts" not in parts:
            return mg_name
        i = parts.index("local_experts") + 1
        parts[i] = str((int(parts[i]) + 1) % self.cfg.moe_num_experts)
        return ".".join(parts)


class _LayerIndexFirstDigit(_RenamedView):
    def rename(self, mg_name):
        parts = mg_name.split(".")
        if parts[:2] != ["decoder", "layers"]:
            return mg_name
        parts[2] = parts[2][0]
        return ".".join(parts)


class _NormsSwapped(_RenamedView):
    def rename(self, mg_name):
        if mg_name.endswith("input_layernorm.weight"):
            return mg_name.replace("input_layernorm", "pre_mlp_layernorm")
        if mg_name.endswith("pre_mlp_layernorm.weight"):
            return mg_name.replace("pre_mlp_layernorm", "input_layernorm")
        return mg_name


class _OutputProjectionTransposed(_RenamedView):
    def transform(self, mg_name, tensor):
        return tensor.t() if mg_name.endswith("linear_proj.weight") else tensor


class _OutputFromEmbedding(_RenamedView):
    def rename(self, mg_name):
        return "embedding.word_embeddings.weight" if mg_name == "output_layer.weight" else mg_name


@mutant
class QKVConcatenated(_ViewBridge):
    """linear_qkv built as [q; k; v] instead of grouped per key/value head (right only for one kv head)."""

    name, part, killed_by = "qkv-concatenated", "mapping", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "attention"}
    view = _QKVConcatenated


@mutant
class KeyValueSwapped(_ViewBridge):
    """k_proj and v_proj trade places inside linear_qkv."""

    name, part, killed_by = "key-value-swapped", "mapping", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "attention"}
    view = _KVSwapped


@mutant
class GateUpSwappedOnLoad(_ViewBridge):
    """linear_fc1 built as [up; gate] instead of [gate; up]."""

    name, part, killed_by = "gate-up-swapped-on-load", "mapping", "equivalence"
    expect = {"kind": "divergence", "stage_kind": ("mlp", "experts")}
    view = _GateUpSwapped


@mutant
class GateUpSwappedOnExport(Mutant):
    """Writes linear_fc1's halves back as up, gate: loads right, exports wrong."""

    name, part, killed_by = "gate-up-swapped-on-export", "mapping", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "value"}

    def to_hf(self, cfg, mg):
        hf = super().to_hf(cfg, mg)
        for name in [n for n in hf if n.endswith("gate_proj.weight")]:
            up = name.replace("gate_proj", "up_proj")
            hf[name], hf[up] = hf[up], hf[name]
        return hf


@mutant
class ExpertsShifted(_ViewBridge):
    """Routed expert e loaded from HF expert e + 1 (an off-by-one in expert numbering); the router is not permuted."""

    name, part, killed_by = "experts-shifted", "mapping", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "experts"}
    view = _ExpertsShifted


@mutant
class LayerIndexReadAsOneDigit(_ViewBridge):
    """A layer's index read as one digit (a pattern `layers\\.(\\d)\\.`): layers 10 and up load the
    weights of the layer named by their first digit. Models of up to 10 layers convert exactly;
    only a deep one (the published structures) shows it."""

    name, part, killed_by = "layer-index-read-as-one-digit", "mapping", "equivalence"
    # Layer 12 takes layer 1's weights: a divergence, or a KeyError where layer 1 is dense and 12 MoE.
    expect = {"kind": ("divergence", "bridge raised")}
    reveals_in_published_structures = True
    view = _LayerIndexFirstDigit


@mutant
class NormsSwapped(_ViewBridge):
    """input_layernorm and post_attention_layernorm trade places."""

    name, part, killed_by = "norms-swapped", "mapping", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "attention"}
    view = _NormsSwapped


@mutant
class OutputProjectionTransposed(_ViewBridge):
    """o_proj loaded transposed (HF Linear weights are [out, in]; the author assumed [in, out])."""

    name, part, killed_by = "output-projection-transposed", "mapping", "import"
    expect = {"kind": "bridge raised", "call": "load"}
    view = _OutputProjectionTransposed


@mutant
class LmHeadFromEmbedding(_ViewBridge):
    """An untied lm_head loaded from embed_tokens, as if every model tied them."""

    name, part, killed_by = "lm-head-from-embedding", "mapping", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "output logits"}
    view = _OutputFromEmbedding
