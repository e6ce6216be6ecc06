"""Deliberately broken bridges: each a small variant of the reference bridge with one realistic
bug, and the property that must catch it. The meta-tests run the suite against each."""

from __future__ import annotations

import json

import torch

from ernie_ref.checkpoint import CONFIG_NAME, TensorReader, read_config
from ernie_ref.megatron import ReferenceBridge
from ernie_ref.megatron.router import ErnieRouter


class ExpertBiasNotLoaded(ReferenceBridge):
    """import: the expert bias keeps its initial zeros, as when a mapping forgets the buffer."""

    name = "expert-bias-not-loaded"

    def load(self, hf_dir, layout):
        chunks = super().load(hf_dir, layout)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, ErnieRouter):
                    module.expert_bias.zero_()
        return chunks


class GateUpSwappedOnExport(ReferenceBridge):
    """round_trip: writes fc1's halves back as up, gate."""

    name = "gate-up-swapped-on-export"

    def to_hf(self, cfg, mg):
        hf = super().to_hf(cfg, mg)
        for name in [n for n in hf if n.endswith("gate_proj.weight")]:
            up = name.replace("gate_proj", "up_proj")
            hf[name], hf[up] = hf[up], hf[name]
        return hf


class BiasInRoutingWeights(ErnieRouter):
    """Weights the chosen experts by p + bias, as sigmoid-style routers do."""

    def routing(self, logits, padding_mask=None, **kwargs):
        logits = logits.reshape(-1, self.config.num_moe_experts)
        scores = torch.softmax(logits.float(), dim=-1) + self.expert_bias
        top, chosen = torch.topk(scores, k=self.topk, dim=-1)
        weights = top / top.sum(-1, keepdim=True).clamp(min=self.norm_min)
        dense = torch.zeros_like(scores).scatter(-1, chosen, weights)
        return dense, torch.zeros_like(scores, dtype=torch.bool).scatter(-1, chosen, True)


class ExpertBiasWeighsExperts(ReferenceBridge):
    """equivalence: the expert bias enters the mixing weights, not only the selection."""

    name = "expert-bias-weighs-experts"
    router_class = BiasInRoutingWeights


class ConfigWithoutModelType(ReferenceBridge):
    """interop: config.json without model_type and architectures; our own reader shrugs, transformers cannot."""

    name = "config-without-model-type"

    def write_checkpoint(self, out_dir, cfg, hf):
        super().write_checkpoint(out_dir, cfg, hf)
        path = out_dir / CONFIG_NAME
        d = json.loads(path.read_text())
        for key in ("model_type", "architectures"):
            d.pop(key)
        path.write_text(json.dumps(d))


class LenientLoader(ReferenceBridge):
    """refusal: takes what it finds: skips missing tensors, ignores extras and misshapes."""

    name = "lenient-loader"

    def read_checkpoint(self, hf_dir):
        return read_config(hf_dir), TensorReader(hf_dir)

    def to_megatron(self, cfg, hf):
        from ernie_ref import expected_keys

        shapes = expected_keys(cfg)
        complete = {k: hf.get(k) if k in hf and tuple(hf[k].shape) == v else torch.zeros(v) for k, v in shapes.items()}
        return super().to_megatron(cfg, complete)


class NormScaledAtOneLayer(ReferenceBridge):
    """Localisation: a norm weight of one known layer loaded scaled by 2 (`layer`, `norm` set by tests)."""

    name = "norm-scaled-at-one-layer"
    layer = 1
    norm = "input_layernorm"  # or "pre_mlp_layernorm"

    def to_megatron(self, cfg, hf):
        mg = dict(super().to_megatron(cfg, hf))
        key = f"decoder.layers.{self.layer}.{self.norm}.weight"
        mg[key] = mg[key] * 2
        return mg


# Bridges right on one rank and wrong only when the model is split: caught only by layouts.
class GateUpSplitContiguouslyUnderTP(ReferenceBridge):
    """tp > 1: fc1 = [gate; up] cut into contiguous pieces, so rank 0 gets gate only."""

    name = "gate-up-split-contiguously-under-tp"

    def tp_split(self, name, chunk):
        dim, _ = super().tp_split(name, chunk)
        return dim, 1


class ExpertOffsetIgnoredUnderEP(ReferenceBridge):
    """ep > 1: every expert-parallel rank loads experts 0.. instead of its own slice."""

    name = "expert-offset-ignored-under-ep"

    def global_name(self, name, chunk):
        full = super().global_name(name, chunk)
        if full is None or "local_experts" not in name:
            return full
        parts, local = full.split("."), name.split(".")
        i = local.index("local_experts") + 1
        parts[i] = local[i]
        return ".".join(parts)


class LayerOffsetIgnoredUnderPP(ReferenceBridge):
    """pp > 1: every pipeline stage loads layers 0.. instead of its own (checked by layer type)."""

    name = "layer-offset-ignored-under-pp"

    def global_name(self, name, chunk):
        full = super().global_name(name, chunk)
        if full is None or not name.startswith("decoder.layers."):
            return full
        local_index = name.split(".")[2]
        candidate = full.split(".")
        candidate[2] = local_index
        candidate = ".".join(candidate)
        return candidate if candidate in chunk.full_shapes else full
