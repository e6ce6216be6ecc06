"""A catalogue of broken bridges ("mutants"): each a small variant of the reference bridge with
one realistic bug, the kind a bridge author under deadline writes. The suite is worth what it
catches: `tests/test_mutants.py` requires the ci profile to kill every mutant with the property
named here, and `ernie-conformance kill-matrix` measures which properties kill which mutants,
after how many examples and seconds (docs/kill-matrix.md).

Each mutant names the part of the conversion it breaks (`part`), the property expected to kill
it (`killed_by`), what that failure must be (`expect`: its kind and facts, see
`properties.FAILURE_KINDS`, so that a mutant killed for another reason fails its meta-test), and, in its
docstring, the bug it stands for. Mutants that are right on one rank and wrong only when the
model is split also name the one split layout that reveals them (`reveals_under`); mutants that are
right for fp32 checkpoints and wrong for bf16 ones name that dtype (`reveals_in`); mutants right for
every small config say so (`reveals_in_published_structures`).

Use one as any bridge: `pytest --pyargs conformance --bridge conformance.mutants:TopKOffByOne`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors.torch import save_file

from ernie_ref.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, TensorReader, expected_keys, read_config
from ernie_ref.config import ErnieMoeConfig
from ernie_ref.layout import Layout
from ernie_ref.megatron import ReferenceBridge
from ernie_ref.megatron.mapping import MegatronView, fuse_qkv
from ernie_ref.megatron.model import build_chunks
from ernie_ref.megatron.router import ErnieRouter

from .numerics import BF16_ROUTING_MARGIN

__all__ = ["MUTANTS", "PARTS", "Mutant", "mutant_spec"]

# The parts of a conversion, in the order the kill matrix lists them.
PARTS = ("config", "routing", "mapping", "layout", "precision and export", "refusal")


class Mutant(ReferenceBridge):
    """A reference bridge with one bug; subclasses set the class attributes below."""

    part: str = ""
    killed_by: str = ""
    # Facts the killing failure must have: {"kind": ..., fact: value}. A string matches as a
    # substring (of a list fact: of one element); a tuple lists the values allowed.
    expect: dict = {}
    reveals_under: str | None = None  # a layout of several ranks, for bugs only a split shows
    reveals_in: str | None = None  # a checkpoint dtype ("bfloat16"), for bugs only that dtype shows
    reveals_in_published_structures: bool = False  # for bugs only a published structure's size shows

    @classmethod
    def mismatch(cls, failure: dict | None) -> str | None:
        """Why `failure` ({"kind", "facts"} of a recorded failure) is not the one this mutant's bug
        should cause, or None when it is."""
        if not failure:
            return "no failure was recorded"
        seen = {"kind": failure.get("kind"), **failure.get("facts", {})}
        for key, wanted in cls.expect.items():
            actual = seen.get(key)
            values = actual if isinstance(actual, list) else [actual]
            if isinstance(wanted, tuple):
                ok = any(v in wanted for v in values)
            else:
                ok = any(isinstance(v, str) and wanted in v for v in values)
            if not ok:
                return f"{key} is {actual!r}, expected {wanted!r} (failure: {seen})"
        return None

    @classmethod
    def bug(cls) -> str:
        return " ".join((cls.__doc__ or "").split())


MUTANTS: dict[str, type[Mutant]] = {}


def mutant(cls: type[Mutant]) -> type[Mutant]:
    """Register `cls` in the catalogue under its `name`."""
    assert cls.part in PARTS and cls.killed_by and cls.expect.get("kind") and cls.name not in MUTANTS, cls
    MUTANTS[cls.name] = cls
    return cls


def mutant_spec(name: str) -> str:
    """The --bridge value of the mutant called `name`."""
    return f"{__name__}:{MUTANTS[name].__name__}"


def _write_unchecked(out_dir: Path, cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor], config: dict | None = None) -> None:
    """Write a checkpoint as a careless exporter does: whatever tensors it has, no checks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config if config is not None else {**cfg.to_hf(), "dtype": "float32"}))
    save_file({k: v.detach().contiguous().clone() for k, v in hf.items()}, str(out_dir / WEIGHTS_NAME),
              metadata={"format": "pt"})


class _RenamedView(MegatronView):
    """The full Megatron tensors, with some looked up under another Megatron name (or transformed)."""

    def rename(self, mg_name: str) -> str:
        return mg_name

    def transform(self, mg_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __getitem__(self, mg_name: str) -> torch.Tensor:
        return self.transform(mg_name, super().__getitem__(self.rename(mg_name)))


# ------------------------------------------------------------------------------------ config
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


# ------------------------------------------------------------------------------------ routing
class _Router(ErnieRouter):
    """ERNIE routing with one step changed by a subclass (`select`, `weigh`)."""

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.topk(probs + self.expert_bias.float(), k=self.topk, dim=-1).indices

    def weigh(self, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        chosen_probs = probs.gather(-1, chosen)
        return chosen_probs / chosen_probs.sum(-1, keepdim=True).clamp(min=self.norm_min)

    def routing(self, logits, padding_mask=None, **kwargs):
        logits = logits.reshape(-1, self.config.num_moe_experts)
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = self.select(probs)
        dense = torch.zeros_like(probs).scatter(-1, chosen, self.weigh(logits.float(), probs, chosen))
        return dense.to(logits.dtype), torch.zeros_like(probs, dtype=torch.bool).scatter(-1, chosen, True)


class _BiasInWeights(_Router):
    def weigh(self, logits, probs, chosen):
        scores = (probs + self.expert_bias.float()).gather(-1, chosen)
        return scores / scores.sum(-1, keepdim=True).clamp(min=self.norm_min)


class _NotRenormalised(_Router):
    def weigh(self, logits, probs, chosen):
        return probs.gather(-1, chosen)


class _BiasIgnored(_Router):
    def select(self, probs):
        return torch.topk(probs, k=self.topk, dim=-1).indices


class _SoftmaxOverChosen(_Router):
    def weigh(self, logits, probs, chosen):
        return torch.softmax(logits.gather(-1, chosen), dim=-1)


@mutant
class ExpertBiasWeighsExperts(Mutant):
    """The expert bias enters the mixing weights (p + bias), as in sigmoid routers, not only the selection."""

    name, part, killed_by = "expert-bias-weighs-experts", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}
    router_class = _BiasInWeights


class _OneTokenInTwentyElsewhereInBfloat16(_Router):
    def select(self, probs):
        chosen = super().select(probs)
        tokens, k = probs.shape[0], self.topk
        if self.config.params_dtype != torch.bfloat16 or k >= probs.shape[-1]:
            return chosen
        ranked = torch.topk(probs + self.expert_bias.float(), k=k + 1, dim=-1)  # values, indices [T, k + 1]
        # The closest calls between the k-th and (k+1)-th expert outside any tie (a margin of at
        # least BF16_ROUTING_MARGIN, so that the example is not set aside for them): sending those
        # tokens to the (k+1)-th moves the output least, so that only the routing comparison can tell.
        margin = ranked.values[:, k - 1] - ranked.values[:, k]  # [T]
        margin = margin.masked_fill(margin < BF16_ROUTING_MARGIN, math.inf)
        moved = margin.argsort()[:max(1, tokens // 20)]
        moved = moved[margin[moved].isfinite()]
        chosen = chosen.clone()
        chosen[moved, k - 1] = ranked.indices[moved, k]
        return chosen


@mutant
class NoRenormalisation(Mutant):
    """The chosen experts are weighted by their softmax probabilities without dividing by their sum."""

    name, part, killed_by = "no-renormalisation", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}
    router_class = _NotRenormalised


@mutant
class ExpertBiasIgnored(Mutant):
    """Experts chosen by probability alone: the expert bias is loaded but never used."""

    name, part, killed_by = "expert-bias-ignored", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router choice"}
    router_class = _BiasIgnored


@mutant
class Bfloat16RoutesOneTokenInTwentyElsewhere(Mutant):
    """In bf16, one token in twenty (one at least) goes to its (k+1)-th expert instead of its k-th,
    outside any tie (the closest call above the bf16 routing margin): in a batch of twenty tokens
    or more the values stay within the bf16 tolerance, so only an exact comparison of routing
    decisions catches it (a tolerance of 10% of tokens routed elsewhere would not)."""

    name, part, killed_by = "bfloat16-routes-one-token-in-twenty-elsewhere", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router choice"}
    reveals_in = "bfloat16"
    router_class = _OneTokenInTwentyElsewhereInBfloat16


@mutant
class SoftmaxOverChosen(Mutant):
    """Weights are a softmax over the chosen experts' logits (Mixtral style): equal to the
    renormalised probabilities except that moe_norm_min never clamps the denominator."""

    name, part, killed_by = "softmax-over-chosen", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}
    router_class = _SoftmaxOverChosen


@mutant
class NormMinIgnored(Mutant):
    """moe_norm_min not passed on: the router clamps the weights' denominator at 1e-12."""

    name, part, killed_by = "norm-min-ignored", "routing", "equivalence"
    expect = {"kind": "divergence", "stage_kind": "router weights"}

    def build(self, cfg, layout, dtype=torch.float32):
        return super().build(cfg.replace(moe_norm_min=1e-12), layout, dtype)


@mutant
class ExpertBiasNotLoaded(Mutant):
    """The expert bias keeps its initial zeros, as when a mapping forgets the buffer (it is not a parameter)."""

    name, part, killed_by = "expert-bias-not-loaded", "routing", "import"
    expect = {"kind": "not loaded", "tensor": "mlp.router.expert_bias"}

    def load(self, hf_dir, layout):
        chunks = super().load(hf_dir, layout)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, ErnieRouter):
                    module.expert_bias.zero_()
        return chunks


# ------------------------------------------------------------------------------------ mapping
class _ViewBridge(Mutant):
    """A mutant whose HF -> Megatron mapping is `view` (export stays right: load is what breaks)."""

    view: type[MegatronView] = MegatronView

    def to_megatron(self, cfg, hf):
        return self.view(cfg, hf)


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


# ------------------------------------------------------------------------------------ layout
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


# ------------------------------------------------------------------------------------ precision and export
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
        return {k: v.half() if k.endswith(("mlp.gate.weight", "e_score_correction_bias")) else v for k, v in hf.items()}


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


# ------------------------------------------------------------------------------------ refusal
@mutant
class LoadAlwaysRaises(Mutant):
    """load raises on every checkpoint (a dependency it cannot import, say). When any error of
    load counted as refusing a corruption, such a bridge passed the refusal property."""

    name, part, killed_by = "load-always-raises", "refusal", "refusal"
    expect = {"kind": "bridge raised", "call": "load", "exception": "ModuleNotFoundError"}

    def load(self, hf_dir, layout):
        raise ModuleNotFoundError("load-always-raises: No module named 'a_dependency_of_the_bridge'")


@mutant
class LenientLoader(Mutant):
    """Takes what it finds: missing or misshaped tensors become zeros, extra tensors are ignored."""

    name, part, killed_by = "lenient-loader", "refusal", "refusal"
    expect = {"kind": "accepted corruption"}

    def read_checkpoint(self, hf_dir):
        return read_config(hf_dir), TensorReader(hf_dir)

    def to_megatron(self, cfg, hf):
        shapes = expected_keys(cfg)
        complete = {k: hf[k] if k in hf and tuple(hf[k].shape) == v else torch.zeros(v) for k, v in shapes.items()}
        return super().to_megatron(cfg, complete)


@mutant
class ExtraTensorsIgnored(Mutant):
    """Checks that every expected tensor is present and well shaped, but not that nothing else is."""

    name, part, killed_by = "extra-tensors-ignored", "refusal", "refusal"
    expect = {"kind": "accepted corruption", "corruption": "extra"}

    def read_checkpoint(self, hf_dir):
        cfg, reader = read_config(hf_dir), TensorReader(hf_dir)
        for name, shape in expected_keys(cfg).items():
            if name not in reader.shapes or tuple(reader.shapes[name]) != shape:
                raise CheckpointError(f"tensor {name!r}: expected shape {list(shape)}")
        return cfg, reader


@mutant
class BiasesDropped(Mutant):
    """use_bias read as false without saying so: the checkpoint's biases are skipped."""

    name, part, killed_by = "biases-dropped", "refusal", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "config", "names": "use_bias"}

    def read_checkpoint(self, hf_dir):
        cfg, reader = super().read_checkpoint(hf_dir)
        return cfg.replace(use_bias=False), reader


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
