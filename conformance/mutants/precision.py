"""Mutants of precision and export: tensors written or read in the wrong dtype (the fp32 router
among them), tensors or config fields lost or added on export, a config.json transformers cannot
read. Several are right for fp32 checkpoints and wrong for bf16 ones (`reveals_in`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ernie_ref.checkpoint import CONFIG_NAME, FP32_TENSOR_SUFFIXES, WEIGHTS_NAME
from ernie_ref.config import ErnieMoeConfig
from ernie_ref.megatron.mapping import MegatronView

from .base import Mutant, mutant

__all__ = ["MtpTensorsDropped", "ExportCastToBfloat16", "RouterExportedInHalf", "RouterInModelDtype", "ExportInFloat32",
           "Bfloat16ReadAsFloat16", "ExpertBiasDroppedOnExport", "LmHeadWrittenWhenTied", "ExportConfigFromDefaults",
           "ConfigWithoutModelType"]


def _write_unchecked(out_dir: Path, cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor], config: dict | None = None) -> None:
    """Write a checkpoint as a careless exporter does: whatever tensors it has, no checks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config if config is not None else {**cfg.to_hf(), "dtype": "float32"}))
    save_file({k: v.detach().contiguous().clone() for k, v in hf.items()}, str(out_dir / WEIGHTS_NAME),
              metadata={"format": "pt"})


@mutant
class MtpTensorsDropped(Mutant):
    """The published checkpoint's multi-token-prediction tensors are dropped on the way: the export
    holds the model's tensors alone."""

    name, part, killed_by = "mtp-tensors-dropped", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "missing", "names": "mtp"}

    def load(self, hf_dir, layout):
        chunks = super().load(hf_dir, layout)
        chunks[0].carried_hf_tensors = {}
        return chunks


@mutant
class ExportCastToBfloat16(Mutant):
    """Export casts every tensor to bfloat16 ("checkpoints are bf16"), the fp32 router included."""

    name, part, killed_by = "export-cast-to-bfloat16", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "dtype"}

    def to_hf(self, cfg, mg):
        return {k: v.to(torch.bfloat16) for k, v in super().to_hf(cfg, mg).items()}


@mutant
class RouterExportedInHalf(Mutant):
    """Export writes the router weight and expert bias in float16, the precision the author
    assumed for every tensor; real ERNIE checkpoints keep the router in fp32."""

    name, part, killed_by = "router-exported-in-half", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "dtype", "names": "mlp.gate.weight"}

    def to_hf(self, cfg, mg):
        hf = super().to_hf(cfg, mg)
        return {k: v.half() if k.endswith(FP32_TENSOR_SUFFIXES) else v for k, v in hf.items()}


class _RouterInModelDtype(MegatronView):
    def __getitem__(self, mg_name: str) -> torch.Tensor:
        tensor = super().__getitem__(mg_name)
        model_dtype = self.hf["model.embed_tokens.weight"].dtype
        return tensor.to(model_dtype) if mg_name.endswith("router.weight") else tensor


@mutant
class RouterInModelDtype(Mutant):
    """The router weight is held in the model's dtype, as Megatron-Core creates it (only its
    expert bias is kept in fp32): a bf16 checkpoint's fp32 router weight is rounded to bf16 on
    load and exported so."""

    name, part, killed_by = "router-in-model-dtype", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "dtype", "names": "mlp.gate.weight"}
    reveals_in = "bfloat16"

    def build(self, cfg, layout, dtype=torch.float32):
        chunks = super().build(cfg, layout, dtype)
        for chunk in chunks:
            for name, tensor in chunk.state_dict(keep_vars=True).items():
                if name.endswith("router.weight"):
                    tensor.data = tensor.data.to(dtype)
        return chunks

    def to_megatron(self, cfg, hf):
        return _RouterInModelDtype(cfg, hf, self.transformer_engine)


@mutant
class ExportInFloat32(Mutant):
    """Export writes every tensor in fp32, the precision of training's master weights, whatever
    the dtype of the checkpoint that was loaded: a bf16 checkpoint comes back twice as large."""

    name, part, killed_by = "export-in-float32", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "dtype"}
    reveals_in = "bfloat16"

    def to_hf(self, cfg, mg):
        return {k: v.float() for k, v in super().to_hf(cfg, mg).items()}


@mutant
class Bfloat16ReadAsFloat16(Mutant):
    """A bf16 checkpoint's bytes read as float16 (a reader that maps every 2-byte dtype to half):
    each value is reinterpreted, not converted, and the model is built in float16."""

    name, part, killed_by = "bfloat16-read-as-float16", "precision and export", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "embedding"}
    reveals_in = "bfloat16"

    def model_dtype(self, cfg, hf):
        dtype = super().model_dtype(cfg, hf)
        return torch.float16 if dtype == torch.bfloat16 else dtype

    def to_megatron(self, cfg, hf):
        return _Reinterpreted(cfg, hf, self.transformer_engine)


class _Reinterpreted(MegatronView):
    def __getitem__(self, mg_name: str) -> torch.Tensor:
        tensor = super().__getitem__(mg_name)
        return tensor.view(torch.float16) if tensor.dtype == torch.bfloat16 else tensor


@mutant
class ExpertBiasDroppedOnExport(Mutant):
    """Export forgets moe_statics.e_score_correction_bias (a buffer, not a parameter)."""

    name, part, killed_by = "expert-bias-dropped-on-export", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "missing", "names": "moe_statics.e_score_correction_bias"}

    def write_checkpoint(self, out_dir, cfg, hf):
        _write_unchecked(out_dir, cfg, {k: v for k, v in hf.items() if not k.endswith("e_score_correction_bias")})


@mutant
class LmHeadWrittenWhenTied(Mutant):
    """Export always writes lm_head.weight, also for tied models (transformers would then untie on save)."""

    name, part, killed_by = "lm-head-written-when-tied", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "extra", "names": "lm_head.weight"}

    def write_checkpoint(self, out_dir, cfg, hf):
        _write_unchecked(out_dir, cfg, {**hf, "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])})


@mutant
class ExportConfigFromDefaults(Mutant):
    """Export writes config.json from a template: rope_theta and moe_norm_min at ERNIE 4.5's published defaults."""

    name, part, killed_by = "export-config-from-defaults", "precision and export", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "config"}

    def write_checkpoint(self, out_dir, cfg, hf):
        super().write_checkpoint(out_dir, cfg.replace(rope_theta=500000.0, moe_norm_min=1e-12), hf)


@mutant
class ConfigWithoutModelType(Mutant):
    """config.json written without model_type and architectures: our own reader shrugs, transformers cannot load it."""

    name, part, killed_by = "config-without-model-type", "precision and export", "interop"
    expect = {"kind": "transformers cannot load"}

    def write_checkpoint(self, out_dir, cfg, hf):
        super().write_checkpoint(out_dir, cfg, hf)
        path = out_dir / CONFIG_NAME
        d = json.loads(path.read_text())
        for key in ("model_type", "architectures"):
            d.pop(key)
        path.write_text(json.dumps(d))
