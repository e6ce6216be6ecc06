"""Mutants of the parallel layouts: right on one rank, wrong only when the model is split, each
revealed by one layout (`reveals_under`): a tensor-parallel split along the wrong dimension or in
the wrong pieces, an expert-, pipeline- or virtual-pipeline-parallel rank that takes another
rank's experts or layers."""

from __future__ import annotations

from megatron.core import parallel_state

from .base import Mutant, mutant

__all__ = ["GateUpSplitContiguouslyUnderTP", "RowParallelSplitOnRows", "ExpertOffsetIgnoredUnderEP",
           "LayerOffsetIgnoredUnderPP", "VirtualStageOffsetIgnored"]


@mutant
class GateUpSplitContiguouslyUnderTP(Mutant):
    """tp > 1: linear_fc1 = [gate; up] cut into contiguous pieces, so rank 0 gets gate only."""

    name, part, killed_by = "gate-up-split-contiguously-under-tp", "layout", "equivalence"
    expect = {"kind": "divergence", "stage_kind": ("mlp", "experts")}
    reveals_under = "tp2-pp1-ep1-vpp1"

    def tp_split(self, name, chunk):
        dim, _ = super().tp_split(name, chunk)
        return dim, 1


@mutant
class RowParallelSplitOnRows(Mutant):
    """tp > 1: the row-parallel layers (linear_proj, linear_fc2) split along their output dimension."""

    name, part, killed_by = "row-parallel-split-on-rows", "layout", "import"
    expect = {"kind": "bridge raised", "call": "load"}
    reveals_under = "tp2-pp1-ep1-vpp1"

    def tp_split(self, name, chunk):
        dim, stride = super().tp_split(name, chunk)
        return (0 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else dim), stride


@mutant
class ExpertOffsetIgnoredUnderEP(Mutant):
    """ep > 1: every expert-parallel rank loads experts 0.. instead of its own slice."""

    name, part, killed_by = "expert-offset-ignored-under-ep", "layout", "round_trip"
    expect = {"kind": "bridge raised", "call": "export", "exception": "KeyError"}  # two shards claim one name
    reveals_under = "tp1-pp1-ep2-vpp1"

    def global_name(self, name, chunk):
        full = super().global_name(name, chunk)
        if full is None or "local_experts" not in name:
            return full
        parts, local = full.split("."), name.split(".")
        i = local.index("local_experts") + 1
        parts[i] = local[i]
        return ".".join(parts)


@mutant
class LayerOffsetIgnoredUnderPP(Mutant):
    """pp > 1: every pipeline stage loads layers 0.. instead of its own (where the layer types allow)."""

    name, part, killed_by = "layer-offset-ignored-under-pp", "layout", "round_trip"
    expect = {"kind": "bridge raised", "call": "export", "exception": "KeyError"}  # two shards claim one name
    reveals_under = "tp1-pp2-ep1-vpp1"

    def global_name(self, name, chunk):
        full = super().global_name(name, chunk)
        if full is None or not name.startswith("decoder.layers."):
            return full
        candidate = full.split(".")
        candidate[2] = name.split(".")[2]
        candidate = ".".join(candidate)
        return candidate if candidate in chunk.full_shapes else full


@mutant
class VirtualStageOffsetIgnored(Mutant):
    """vpp > 1: a stage's layer offset computed as pp_rank x layers per chunk, the same for every
    virtual chunk, as if there were one chunk per stage (where the layer types allow)."""

    name, part, killed_by = "virtual-stage-offset-ignored", "layout", "round_trip"
    expect = {"kind": "bridge raised", "call": "export", "exception": "KeyError"}  # two shards claim one name
    reveals_under = "tp1-pp2-ep1-vpp2"

    def global_name(self, name, chunk):
        full = super().global_name(name, chunk)
        if full is None or not name.startswith("decoder.layers."):
            return full
        per_chunk = len(chunk.decoder.layers)
        candidate = full.split(".")
        candidate[2] = str(parallel_state.get_pipeline_model_parallel_rank() * per_chunk + int(name.split(".")[2]))
        candidate = ".".join(candidate)
        return candidate if candidate in chunk.full_shapes else full
