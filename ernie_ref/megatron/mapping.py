"""Weight mapping between HF tensors and the full (unsharded) Megatron-Core GPTModel state dict.

Names are those of the local (non-Transformer-Engine) layer spec with our ERNIE router.
Megatron fuses two pairs that HF keeps apart:
- q, k, v into `linear_qkv`, grouped per query group: for each key/value head g, the query
  heads that read it, then k_g, then v_g (weights, and biases under use_bias);
- gate and up into `fc1` = [gate; up] (dense MLP, each routed expert, the shared experts).
Under use_bias, every linear layer but the routed experts' and the router's has a bias, lm_head's
included (`output_layer.bias`, its own tensor even when the weight is tied).
Everything else is a rename. The conversion is exact: only views, concatenations and copies.

Names are those of Megatron-Core's local layer spec, or with `transformer_engine=True` those of
its Transformer Engine spec, which fuses a layer norm into the linear layer that follows it: the
attention norm becomes `self_attention.linear_qkv.layer_norm_weight` and a dense layer's pre-MLP
norm `mlp.linear_fc1.layer_norm_weight`; an MoE layer keeps its own `pre_mlp_layernorm` (its
input feeds the router, the routed experts and the shared experts alike). Same tensors, same
layouts; only these names differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ernie_ref.config import ErnieMoeConfig

__all__ = ["hf_to_megatron", "megatron_to_hf", "MegatronView", "name_pairs", "fuse_qkv", "split_qkv", "te_name"]


def fuse_qkv(cfg: ErnieMoeConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Nq*D, ...], k and v [Nkv*D, ...] -> linear_qkv [(Nq + 2 Nkv) * D, ...], grouped per kv head."""
    groups, D = cfg.num_key_value_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * D, *rest)
    k = k.reshape(groups, D, *rest)
    v = v.reshape(groups, D, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(cfg: ErnieMoeConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, D = cfg.num_key_value_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * D, *rest)
    q, k, v = grouped.split([per_group * D, D, D], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _params(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def _mlp_pairs(hf_prefix: str, mg_prefix: str, bias: bool) -> list[tuple[list[str], str]]:
    fc1 = [([f"{hf_prefix}.gate_proj.{p}", f"{hf_prefix}.up_proj.{p}"], f"{mg_prefix}.linear_fc1.{p}") for p in _params(bias)]
    fc2 = [([f"{hf_prefix}.down_proj.{p}"], f"{mg_prefix}.linear_fc2.{p}") for p in _params(bias)]
    return fc1 + fc2


def _layer_pairs(cfg: ErnieMoeConfig, i: int) -> list[tuple[list[str], str]]:
    """(HF names, Megatron name) for layer i; a pair with several HF names is a fusion."""
    hf, mg = f"model.layers.{i}", f"decoder.layers.{i}"
    params = _params(cfg.use_bias)
    pairs = [([f"{hf}.input_layernorm.weight"], f"{mg}.input_layernorm.weight")]
    pairs += [([f"{hf}.self_attn.{p}_proj.{param}" for p in "qkv"], f"{mg}.self_attention.linear_qkv.{param}")
              for param in params]
    pairs += [([f"{hf}.self_attn.o_proj.{param}"], f"{mg}.self_attention.linear_proj.{param}") for param in params]
    pairs.append(([f"{hf}.post_attention_layernorm.weight"], f"{mg}.pre_mlp_layernorm.weight"))
    if not cfg.is_moe_layer(i):
        return pairs + _mlp_pairs(f"{hf}.mlp", f"{mg}.mlp", cfg.use_bias)
    pairs += [
        ([f"{hf}.mlp.gate.weight"], f"{mg}.mlp.router.weight"),
        ([f"{hf}.mlp.moe_statics.e_score_correction_bias"], f"{mg}.mlp.router.expert_bias"),
    ]
    for e in range(cfg.moe_num_experts):
        pairs += _mlp_pairs(f"{hf}.mlp.experts.{e}", f"{mg}.mlp.experts.local_experts.{e}", bias=False)
    if cfg.moe_num_shared_experts > 0:
        pairs += _mlp_pairs(f"{hf}.mlp.shared_experts", f"{mg}.mlp.shared_experts", cfg.use_bias)
    return pairs


def te_name(cfg: ErnieMoeConfig, name: str) -> str:
    """The Transformer Engine spec's name of the full model's tensor `name` (local spec)."""
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"] or len(parts) != 5:
        return name
    i, norm = int(parts[2]), ".".join(parts[3:])
    if norm == "input_layernorm.weight":
        return f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight"
    if norm == "pre_mlp_layernorm.weight" and not cfg.is_moe_layer(i):
        return f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"
    return name


def name_pairs(cfg: ErnieMoeConfig, transformer_engine: bool = False) -> list[tuple[list[str], str]]:
    """Every (HF names, Megatron name) of the model, in model order. Tied: no output_layer."""
    pairs = [(["model.embed_tokens.weight"], "embedding.word_embeddings.weight")]
    for i in range(cfg.num_hidden_layers):
        pairs += _layer_pairs(cfg, i)
    pairs.append((["model.norm.weight"], "decoder.final_layernorm.weight"))
    if not cfg.tie_word_embeddings:
        pairs.append((["lm_head.weight"], "output_layer.weight"))
    if cfg.use_bias:  # lm_head's bias is its own tensor, tied or not
        pairs.append((["lm_head.bias"], "output_layer.bias"))
    if transformer_engine:
        pairs = [(hf_names, te_name(cfg, mg_name)) for hf_names, mg_name in pairs]
    return pairs


def megatron_tensor(cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor], hf_names: list[str], mg_name: str) -> torch.Tensor:
    """One full Megatron tensor, from the HF tensors it is made of."""
    tensors = [hf[n] for n in hf_names]
    if mg_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return fuse_qkv(cfg, *tensors)
    if mg_name.endswith("router.expert_bias"):
        return tensors[0].reshape(-1)  # HF [1, E] (one expert group) -> Megatron [E]
    return torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]


class MegatronView(Mapping[str, torch.Tensor]):
    """The full Megatron state dict of an HF checkpoint, each tensor built when looked up: with a
    lazy `hf` (a `TensorReader`), loading holds one tensor at a time, never the whole model twice."""

    def __init__(self, cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor], transformer_engine: bool = False):
        self.cfg, self.hf = cfg, hf
        self.sources = {mg_name: hf_names for hf_names, mg_name in name_pairs(cfg, transformer_engine)}

    def __getitem__(self, mg_name: str) -> torch.Tensor:
        return megatron_tensor(self.cfg, self.hf, self.sources[mg_name], mg_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def hf_to_megatron(cfg: ErnieMoeConfig, hf: Mapping[str, torch.Tensor],
                   transformer_engine: bool = False) -> dict[str, torch.Tensor]:
    """HF tensors (as `load_checkpoint` returns them) -> full Megatron state dict."""
    return dict(MegatronView(cfg, hf, transformer_engine))


def megatron_to_hf(cfg: ErnieMoeConfig, mg: dict[str, torch.Tensor], transformer_engine: bool = False) -> dict[str, torch.Tensor]:
    """Full Megatron state dict -> HF tensors with HF's names and shapes."""
    out = {}
    for hf_names, mg_name in name_pairs(cfg, transformer_engine):
        t = mg[mg_name]
        if mg_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            parts = split_qkv(cfg, t)
        elif mg_name.endswith("router.expert_bias"):
            parts = (t.reshape(1, -1),)
        elif len(hf_names) == 2:  # fc1 = [gate; up], weight or bias
            parts = t.chunk(2, dim=0)
        else:
            parts = (t,)
        out.update({n: p.contiguous() for n, p in zip(hf_names, parts)})
    return out
