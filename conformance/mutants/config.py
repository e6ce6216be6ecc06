"""Mutants of the config translation: a config.json field dropped, misread or replaced by a
default on the way to Megatron-Core's TransformerConfig (eps, head_dim, tie, k, rope, the MoE
layer pattern and widths). Also the bridges with several planted bugs, all of them config bugs,
each with its own trigger (`TwoPlantedDefects`, `ThreePlantedDefects`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ernie_ref.checkpoint import CONFIG_NAME

from .base import Mutant, mutant

__all__ = ["EpsDropped", "HeadDimFromHidden", "TieAssumed", "TopKOffByOne", "RopeThetaDefault", "RopeNotInterleaved",
           "MoeLayersByIntervalOnly", "MoeLayersFromStartOnly", "SharedExpertCountIgnored",
           "AbsentSharedExpertsReadAsNone", "MoeWidthFromDense", "TwoPlantedDefects", "ThreePlantedDefects"]


@mutant
class EpsDropped(Mutant):
    """rms_norm_eps is not translated: Megatron's default layernorm_epsilon 1e-5 is used instead."""

    name, part, killed_by = "eps-dropped", "config", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "attention"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        return dataclasses.replace(super().megatron_config(cfg, layout, dtype), layernorm_epsilon=1e-5)


@mutant
class HeadDimFromHidden(Mutant):
    """head_dim assumed to be hidden_size / num_attention_heads, ignoring config.json's head_dim."""

    name, part, killed_by = "head-dim-from-hidden", "config", "import"
    expect = {"kind": "bridge raised", "call": "load"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        return super().megatron_config(cfg.replace(head_dim=cfg.hidden_size // cfg.num_attention_heads), layout, dtype)


@mutant
class TieAssumed(Mutant):
    """tie_word_embeddings ignored: the output layer always shares the embedding (as in ERNIE 4.5
    0.3B), so an untied lm_head is never loaded."""

    name, part, killed_by = "tie-assumed", "config", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "output logits"}

    def build(self, cfg, layout, dtype=torch.float32):
        return super().build(cfg.replace(tie_word_embeddings=True), layout, dtype)

    def to_hf(self, cfg, mg):
        if not cfg.tie_word_embeddings:
            mg = {**mg, "output_layer.weight": mg["embedding.word_embeddings.weight"]}
        return super().to_hf(cfg, mg)


@mutant
class TopKOffByOne(Mutant):
    """moe_k translated off by one (k - 1, or k + 1 when k is 1)."""

    name, part, killed_by = "top-k-off-by-one", "config", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router choice"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        k = cfg.moe_k - 1 if cfg.moe_k > 1 else cfg.moe_k + 1
        return super().megatron_config(cfg.replace(moe_k=min(k, cfg.moe_num_experts)), layout, dtype)


@mutant
class RopeThetaDefault(Mutant):
    """rope_theta not translated: Megatron's default rotary_base 10000 is used."""

    name, part, killed_by = "rope-theta-default", "config", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "attention"}

    def build(self, cfg, layout, dtype=torch.float32):
        return super().build(cfg.replace(rope_theta=10000.0), layout, dtype)


@mutant
class RopeNotInterleaved(Mutant):
    """Rotary embedding applied to halves (GPT-NeoX style) instead of interleaved pairs."""

    name, part, killed_by = "rope-not-interleaved", "config", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "attention"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        return dataclasses.replace(super().megatron_config(cfg, layout, dtype), rotary_interleaved=False)


@mutant
class MoeLayersByIntervalOnly(Mutant):
    """The MoE layer pattern taken from moe_layer_interval alone, ignoring the start and end indices."""

    name, part, killed_by = "moe-layers-by-interval-only", "config", "import"
    expect = {"kind": "bridge raised", "call": "load"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        freq = [1 if (i + 1) % cfg.moe_layer_interval == 0 else 0 for i in range(cfg.num_hidden_layers)]
        return dataclasses.replace(super().megatron_config(cfg, layout, dtype), moe_layer_freq=freq)


@mutant
class MoeLayersFromStartOnly(Mutant):
    """Every layer from moe_layer_start_index on is built as MoE, ignoring the end index and the
    interval; a parameter the checkpoint has no tensor for keeps its initial value with a warning,
    and a checkpoint tensor with no parameter is dropped, so the load goes through."""

    name, part, killed_by = "moe-layers-from-start-only", "config", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "layer kind"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        freq = [1 if i >= cfg.moe_layer_start_index else 0 for i in range(cfg.num_hidden_layers)]
        return dataclasses.replace(super().megatron_config(cfg, layout, dtype), moe_layer_freq=freq)

    def local_tensor(self, full, name, target, chunk):
        known = name == "output_layer.weight" or self.global_name(name, chunk) in full  # tied copies are known
        return super().local_tensor(full, name, target, chunk) if known else target


@mutant
class SharedExpertCountIgnored(Mutant):
    """The shared experts' width taken as moe_intermediate_size, whatever moe_num_shared_experts."""

    name, part, killed_by = "shared-expert-count-ignored", "config", "import"
    expect = {"kind": "bridge raised", "call": "load"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        return dataclasses.replace(super().megatron_config(cfg, layout, dtype),
                                   moe_shared_expert_intermediate_size=cfg.moe_intermediate_size)


@mutant
class AbsentSharedExpertsReadAsNone(Mutant):
    """A config.json without moe_num_shared_experts read as no shared experts (the key's absence
    taken for 0, as `config.get("moe_num_shared_experts", 0)` does), where transformers reads 2."""

    name, part, killed_by = "absent-shared-experts-read-as-none", "config", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "experts"}

    def read_checkpoint(self, hf_dir):
        cfg, reader = super().read_checkpoint(hf_dir)
        if "moe_num_shared_experts" not in json.loads((Path(hf_dir) / CONFIG_NAME).read_text()):
            cfg = cfg.replace(moe_num_shared_experts=0)
        return cfg, reader


@mutant
class MoeWidthFromDense(Mutant):
    """The routed experts' width taken from intermediate_size instead of moe_intermediate_size."""

    name, part, killed_by = "moe-width-from-dense", "config", "import"
    expect = {"kind": "bridge raised", "call": "load"}

    def megatron_config(self, cfg, layout, dtype=torch.float32):
        return dataclasses.replace(super().megatron_config(cfg, layout, dtype), moe_ffn_hidden_size=cfg.intermediate_size)


# ------------------------------------------------------------------------------ planted defects
# Bridges with several independent bugs, each with its own trigger: the suite must report each as
# its own finding (tests/test_findings.py; benchmarks/bench_findings.py). `planted` lists, for each
# bug, a finding it must produce: (property, kind of failure, a condition of its trigger in words).
class TwoPlantedDefects(RopeThetaDefault, SharedExpertCountIgnored):
    """rope-theta-default and shared-expert-count-ignored at once."""

    name = "two-planted-defects"
    planted = (
        ("equivalence", "divergence", "rope_theta != 10000"),
        ("import", "bridge raised", "moe_num_shared_experts != 1"),
    )


class ThreePlantedDefects(RopeThetaDefault, TieAssumed, SharedExpertCountIgnored):
    """rope-theta-default, tie-assumed and shared-expert-count-ignored at once."""

    name = "three-planted-defects"
    planted = (*TwoPlantedDefects.planted,
               ("equivalence", "divergence", "tie_word_embeddings = false"))
