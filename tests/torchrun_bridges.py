"""Bridges for the torchrun tests: the reference bridge, wrong or failing only on some ranks.

Importable by every rank of a torchrun world (the tests put tests/ on PYTHONPATH): the ranks
receive the bridge pickled, by class name.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from ernie_ref.megatron import ReferenceBridge


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class CorruptsExportWhenDistributed(ReferenceBridge):
    """round_trip: exports the final norm doubled, but only when torch.distributed has more than
    one rank; right in a single process, so only a multi-rank run can catch it."""

    name = "corrupts-export-when-distributed"

    def to_hf(self, cfg, mg):
        hf = super().to_hf(cfg, mg)
        if _world_size() > 1:
            hf["model.norm.weight"] = hf["model.norm.weight"] * 2
        return hf


class LoadRaisesOnRank1(ReferenceBridge):
    """Every property: load raises on rank 1 only, before any collective; rank 0 loads fine."""

    name = "load-raises-on-rank-1"

    def load(self, hf_dir, layout):
        if _rank() == 1:
            raise ValueError("load refused on rank 1 (deliberately)")
        return super().load(hf_dir, layout)


class ExportRaisesOnRank1(ReferenceBridge):
    """Export raises on rank 1 only, after load, while rank 0 goes on into export's collectives
    and waits there for rank 1 forever: the hang a torchrun world cannot recover from."""

    name = "export-raises-on-rank-1"

    def export(self, chunks: list[torch.nn.Module], out_dir) -> None:
        if _rank() == 1:
            raise ValueError("export refused on rank 1 (deliberately)")
        super().export(chunks, out_dir)


class ExportRaisesOnEveryRank(ReferenceBridge):
    """round_trip and interop: export raises the same error on every rank, before any collective."""

    name = "export-raises-on-every-rank"

    def export(self, chunks: list[torch.nn.Module], out_dir) -> None:
        raise NotImplementedError(f"export is not written yet (world of {_world_size()} ranks)")


class RefusesOnRank1WhileRank0WaitsForIt(ReferenceBridge):
    """refusal on two ranks: rank 1 checks the checkpoint and refuses a corrupt one, while rank 0
    goes on into a collective with it and waits there, as a bridge whose stages hold different
    parts of the model may (a tied embedding's all-reduce between the first and last stage)."""

    name = "refuses-on-rank-1-while-rank-0-waits"

    def load(self, hf_dir, layout):
        chunks = super().load(hf_dir, layout) if _rank() == 1 else None
        dist.all_reduce(torch.zeros(1))
        return chunks if chunks is not None else super().load(hf_dir, layout)


class HangsOnAMissingNorm(ReferenceBridge):
    """refusal on two ranks: without `model.norm.weight`, load waits forever on every rank, and
    no rank refuses."""

    name = "hangs-on-a-missing-norm"

    def load(self, hf_dir, layout):
        from safetensors import safe_open

        with safe_open(str(Path(hf_dir) / "model.safetensors"), "pt") as weights:
            if "model.norm.weight" not in weights.keys():
                time.sleep(3600)
        return super().load(hf_dir, layout)
