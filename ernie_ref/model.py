"""ERNIE 4.5 MoE in plain PyTorch: the oracle that every bridge is measured against.

One file, the math written out. Module and parameter names are HuggingFace's, so a
`model.safetensors` of `Ernie4_5_MoeForCausalLM` loads with `load_state_dict(strict=True)`.

Shapes: B batch, S sequence, H hidden, D head_dim, Nq query heads, Nkv key/value heads,
E routed experts, K experts per token, T = B*S tokens, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ErnieMoeConfig

__all__ = ["ErnieMoeForCausalLM", "Trace", "LayerTrace", "RoutingTrace"]


@dataclass
class RoutingTrace:
    """What one MoE layer's router decided, per token (T = B*S, in row-major token order)."""

    expert_ids: torch.Tensor  # [T, K] chosen experts, in descending order of selection score
    weights: torch.Tensor  # [T, K] their mixing weights (probabilities, renormalised)
    margin: torch.Tensor  # [T] selection score of the K-th choice minus the (K+1)-th; inf when K == E


@dataclass
class LayerTrace:
    after_attention: torch.Tensor  # [B, S, H] residual stream after the attention block
    output: torch.Tensor  # [B, S, H] the layer's output hidden state
    routing: RoutingTrace | None  # None for a dense layer


@dataclass
class Trace:
    """Everything a conformance check compares, in forward order."""

    embeddings: torch.Tensor  # [B, S, H]
    layers: list[LayerTrace] = field(default_factory=list)
    final_norm: torch.Tensor | None = None  # [B, S, H]
    logits: torch.Tensor | None = None  # [B, S, V]


def fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, where transformers computes in fp32; float64 stays float64, so that a float64
    oracle measures how much fp32 rounding an example amplifies (`conformance.numerics`)."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back to the input dtype, and only then scale by the weight.
        x32 = fp32_or_wider(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, D] for interleaved RoPE: the pair (2i, 2i+1) turns by pos * theta^(-2i/D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [D/2]
    angles = torch.arange(seq_len, dtype=torch.float)[:, None] * inv_freq[None, :]  # [S, D/2]
    # Each angle serves both members of its pair, so repeat it in place: a0 a0 a1 a1 ...
    return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, S, D]; rotates each pair (x[2i], x[2i+1]) in fp32."""
    x32 = fp32_or_wider(x)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    rotated = torch.stack((-odd, even), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0), pair by pair
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ErnieMoeConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.use_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Nq, S, D]
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Nkv, S, D]
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Nkv, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: query head h reads key/value head h // (Nq / Nkv).
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # [B, Nq, S, D]
        v = v.repeat_interleave(group, dim=1)  # [B, Nq, S, D]
        scores = (q @ k.transpose(2, 3)) * self.head_dim**-0.5  # [B, Nq, S, S]
        future = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        attn = F.softmax(fp32_or_wider(scores), dim=-1).to(q.dtype)
        out = (attn @ v).transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # [B, S, Nq*D]
        return self.o_proj(out)  # [B, S, H]


class MLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x)). Dense layers, routed and shared experts."""

    def __init__(self, hidden_size: int, width: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoeStatics(nn.Module):
    """Holds the expert-selection bias; the name matches HF's `mlp.moe_statics.e_score_correction_bias`."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("e_score_correction_bias", torch.zeros(1, num_experts, dtype=torch.float32))


class SparseMoe(nn.Module):
    def __init__(self, cfg: ErnieMoeConfig):
        super().__init__()
        self.k, self.norm_min = cfg.moe_k, cfg.moe_norm_min
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe_num_experts, bias=False)  # weight [E, H], kept fp32
        self.moe_statics = MoeStatics(cfg.moe_num_experts)
        # Routed experts never carry biases, even with use_bias (transformers' fused expert tensors have none).
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size, bias=False) for _ in range(cfg.moe_num_experts)
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.shared_intermediate_size, bias=cfg.use_bias)
            if cfg.moe_num_shared_experts > 0
            else None
        )
        # Where two experts' selection scores are closer than rounding can separate, either choice
        # is right. A comparison with another implementation sets this to take that one's choice
        # there: (selection [T, E], own choice [T, K]) -> choice [T, K], by descending score.
        self.decide_near_ties: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def route(self, x: torch.Tensor) -> RoutingTrace:
        """x [T, H] -> which K experts each token goes to, and with what weight."""
        probs = F.softmax(F.linear(fp32_or_wider(x), fp32_or_wider(self.gate.weight)), dim=-1)  # [T, E], fp32
        # The bias decides WHICH experts win (load balancing) but never how much they count.
        selection = probs + fp32_or_wider(self.moe_statics.e_score_correction_bias)[0]  # [T, E]
        ranked, order = selection.sort(dim=-1, descending=True, stable=True)  # [T, E]
        expert_ids = order[:, : self.k]  # [T, K]
        if self.decide_near_ties is not None:
            expert_ids = self.decide_near_ties(selection, expert_ids)  # [T, K]
        chosen = probs.gather(-1, expert_ids)  # [T, K]
        weights = chosen / chosen.sum(-1, keepdim=True).clamp(min=self.norm_min)  # [T, K]
        if self.k < ranked.shape[-1]:
            margin = ranked[:, self.k - 1] - ranked[:, self.k]  # [T]
        else:
            margin = torch.full((x.shape[0],), math.inf)
        return RoutingTrace(expert_ids=expert_ids, weights=weights.to(x.dtype), margin=margin)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingTrace]:
        B, S, H = x.shape
        tokens = x.reshape(B * S, H)  # [T, H]
        routing = self.route(tokens)
        out = torch.zeros_like(tokens)  # [T, H]
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(routing.expert_ids == e)  # tokens that chose e, and in which slot
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(tokens[token_idx]) * routing.weights[token_idx, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.reshape(B, S, H), routing


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ErnieMoeConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoe(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.use_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> LayerTrace:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)  # [B, S, H]
        routing = None
        if isinstance(self.mlp, SparseMoe):
            mlp_out, routing = self.mlp(self.post_attention_layernorm(h))
        else:
            mlp_out = self.mlp(self.post_attention_layernorm(h))
        return LayerTrace(after_attention=h, output=h + mlp_out, routing=routing)


class ErnieBody(nn.Module):
    """HF's `model.` prefix: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ErnieMoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ErnieMoeForCausalLM(nn.Module):
    def __init__(self, cfg: ErnieMoeConfig):
        super().__init__()
        self.config = cfg
        self.model = ErnieBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.use_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, stored once (as the embedding)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ErnieMoeForCausalLM:
        """Load an HF checkpoint directory; every tensor must be present with its expected shape."""
        from .checkpoint import load_checkpoint

        cfg, state = load_checkpoint(path)
        return cls.from_state_dict(cfg, state)

    @classmethod
    def from_state_dict(cls, cfg: ErnieMoeConfig, state: dict[str, torch.Tensor]) -> ErnieMoeForCausalLM:
        with torch.device("meta"):
            model = cls(cfg)
        model.load_hf_state_dict(state)
        return model.eval()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take every tensor as it is (dtype included); names are checked by `checkpoint.expected_keys`."""
        from .checkpoint import check_state_dict

        check_state_dict(self.config, state)
        if self.config.tie_word_embeddings:
            state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
        self.load_state_dict(state, strict=True, assign=True)
        if self.config.tie_word_embeddings:  # `assign` replaced the shared Parameter: tie again
            self.lm_head.weight = self.model.embed_tokens.weight

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of an HF checkpoint: no `lm_head.weight` when tied."""
        state = dict(self.state_dict())
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]
        return state

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, trace: bool = False) -> torch.Tensor | Trace:
        """input_ids [B, S] -> logits [B, S, V]; with trace=True, a `Trace` of every stage."""
        S = input_ids.shape[1]
        cos, sin = rope_cos_sin(S, self.config.head_dim, self.config.rope_theta)  # [S, D] each
        x = self.model.embed_tokens(input_ids)  # [B, S, H]
        result = Trace(embeddings=x)
        for layer in self.model.layers:
            layer_trace = layer(x, cos, sin)
            result.layers.append(layer_trace)
            x = layer_trace.output
        result.final_norm = self.model.norm(x)  # [B, S, H]
        result.logits = self.lm_head(result.final_norm)  # [B, S, V]
        return result if trace else result.logits
