"""Hypothesis strategies: valid ERNIE 4.5 MoE configs (small ones, and the published structures
with narrowed widths), checkpoint formats, weights seeds and inputs.

Everything is valid by construction: divisors are drawn rather than filtered, and the MoE layer
pattern is drawn around a layer that is sure to be MoE. The suite's tests draw these with
`data.draw(strategy, label=...)`, so a shrunk counterexample reads as a list of named values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from ernie_ref import CheckpointFormat, ErnieMoeConfig
from ernie_ref.checkpoint import omittable_keys
from ernie_ref.layout import Layout
from ernie_ref.published import PUBLISHED_STRUCTURES

from .cases import Corruption, Inputs
from .recorder import LONG_POSITIONS

__all__ = ["ConfigLimits", "configs", "published_configs", "fitting_structures", "layouts", "layer_patterns",
           "checkpoint_formats", "seeds", "inputs", "corruptions", "misshaped", "plausible_extra_tensors",
           "contradicting_changes"]


@dataclass(frozen=True)
class ConfigLimits:
    """Bounds for drawn configs. The small draws (the bounds below) keep one example well under a
    second and shrink well; `published_in_ten` of every ten config draws take a published
    structure instead (`published_configs`), whose widths are narrowed to `narrow_*`."""

    max_layers: int = 4
    max_kv_heads: int = 3
    max_group: int = 3  # query heads per key/value head
    max_head_dim: int = 16
    max_hidden: int = 48
    min_hidden: int = 2  # bf16 examples need more: see numerics.Tolerance.min_hidden_size
    min_published_hidden: int = 16  # and for published structures: numerics.Tolerance.min_published_hidden_size
    max_experts: int = 6
    max_vocab: int = 96
    allow_bias: bool = True
    published_in_ten: int = 2  # 0: small draws only
    max_long_seq_len: int = 1024  # the longest drawn input: 1024 tokens on a CPU, 4096 on a GPU (see `inputs`)
    structures: tuple[str, ...] = tuple(PUBLISHED_STRUCTURES)  # the published structures drawn
    narrow_hidden: int = 64  # the narrowed widths of published structures: hidden (from min_published_hidden),
    narrow_intermediate: int = 32  # the dense MLP,
    narrow_moe_intermediate: int = 16  # one routed expert (at least 4),
    narrow_vocab: int = 256  # and the vocabulary (at least 64)


@st.composite
def layer_patterns(draw: st.DrawFn, num_layers: int) -> dict[str, int]:
    """moe_layer_start_index, moe_layer_end_index (maybe -1) and moe_layer_interval with >= 1 MoE layer.

    Draw the interval, then one layer that the interval allows to be MoE, then a start at or
    before it and an end at or after it.
    """
    interval = draw(st.integers(1, num_layers))
    candidates = list(range(interval - 1, num_layers, interval))  # (i + 1) % interval == 0
    anchor = draw(st.sampled_from(candidates))
    start = draw(st.integers(0, anchor))
    end = draw(st.integers(anchor, num_layers - 1))
    if end == num_layers - 1 and draw(st.booleans()):
        end = -1
    return {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def all_layouts(max_world: int) -> list[Layout]:
    """Every layout whose world (pp * lcm(tp, ep)) divides `max_world`, smallest worlds first (so
    that Hypothesis shrinks towards one rank); vpp 2 wherever there are pipeline stages."""
    found = {
        Layout(tp=tp, pp=pp, ep=ep, vpp=vpp)
        for pp in _divisors(max_world)
        for tp in _divisors(max_world // pp)
        for ep in _divisors(max_world // pp)
        for vpp in ((1, 2) if pp > 1 else (1,))
    }
    return sorted(found, key=lambda l: (l.world_size, l.pp, l.vpp, l.tp, l.ep))


def layouts(max_world: int) -> st.SearchStrategy[Layout]:
    return st.sampled_from(all_layouts(max_world))


def fitting_structures(layout: Layout) -> list[str]:
    """The published structures that `layout` splits as published: whole layers per pipeline stage
    (and virtual stage), key/value heads across tensor-parallel ranks, experts across expert-
    parallel ranks. (21B-A3B's 28 layers take pp 2 with vpp 2 and pp 4; 300B-A47B's 54, pp 2.)"""
    return [name for name, hf in PUBLISHED_STRUCTURES.items()
            if hf["num_hidden_layers"] % (layout.pp * layout.vpp) == 0
            and hf["num_key_value_heads"] % layout.tp == 0 and hf["moe_num_experts"] % layout.ep == 0]


@st.composite
def published_configs(draw: st.DrawFn, name: str, limits: ConfigLimits = ConfigLimits(),
                      layout: Layout = Layout()) -> ErnieMoeConfig:
    """The published structure `name` (every structural field as published: layers, heads, key/
    value heads, head_dim, experts, k, shared experts, layer pattern, tie) with the widths that
    cost time on a CPU narrowed: hidden size (head_dim stays 128, so config.json keeps head_dim),
    the MLP widths and the vocabulary, in multiples of `layout`'s tp."""
    tp = layout.tp

    def width(low: int, high: int) -> st.SearchStrategy[int]:
        return st.integers(max(1, -(-low // tp)), max(1, high // tp)).map(lambda n: n * tp)

    low_hidden = max(16, limits.min_hidden, limits.min_published_hidden)
    hf = dict(PUBLISHED_STRUCTURES[name])
    hf.update(
        hidden_size=draw(st.integers(low_hidden // 2, max(low_hidden, limits.narrow_hidden) // 2).map(lambda n: 2 * n)),
        intermediate_size=draw(width(8, limits.narrow_intermediate)),
        moe_intermediate_size=draw(width(4, limits.narrow_moe_intermediate)),
        vocab_size=draw(width(64, limits.narrow_vocab)),
    )
    return ErnieMoeConfig.from_hf(hf)


@st.composite
def configs(draw: st.DrawFn, limits: ConfigLimits = ConfigLimits(), layout: Layout = Layout(), **fixed: Any) -> ErnieMoeConfig:
    """A valid `ErnieMoeConfig` that `layout` can split: in `limits.published_in_ten` of ten draws
    a published structure that fits the layout (`published_configs`), else a small one. Keyword
    arguments fix HF config keys instead of drawing them (and then the config is a small one).

    The layout's divisibility rules are met by construction: layers in multiples of pp * vpp,
    key/value heads, vocab and MLP widths in multiples of tp (routed experts are whole on one
    rank, but the shared-expert width moe_intermediate_size * shared must split), experts in
    multiples of ep.
    """

    structures = [name for name in fitting_structures(layout) if name in limits.structures] \
        if limits.published_in_ten and not fixed else []
    if structures:
        # Ten slots, the published ones last, so that a failure shrinks towards a small config.
        # (Hypothesis draws an integer's bounds more often than the values between them: the share
        # comes out a little above the nominal one; tests/test_published_draws.py measures it.)
        if draw(st.integers(0, 9)) >= 10 - limits.published_in_ten:
            return draw(published_configs(draw(st.sampled_from(structures)), limits, layout))

    def pick(name: str, strategy: st.SearchStrategy[Any]) -> Any:
        return fixed[name] if name in fixed else draw(strategy)

    tp, stages = layout.tp, layout.pp * layout.vpp
    num_layers = pick("num_hidden_layers", st.integers(1, max(1, limits.max_layers // stages)).map(lambda n: n * stages))
    kv_heads = pick("num_key_value_heads", st.integers(1, max(1, limits.max_kv_heads // tp)).map(lambda n: n * tp))
    group = draw(st.integers(1, limits.max_group))
    heads = pick("num_attention_heads", st.just(kv_heads * group))
    # head_dim (even) large enough that heads * head_dim reaches min_hidden.
    min_half_dim = min(limits.max_head_dim // 2, max(1, -(-limits.min_hidden // (2 * heads))))
    head_dim = pick("head_dim", st.integers(min_half_dim, limits.max_head_dim // 2).map(lambda n: 2 * n))
    if draw(st.booleans()):
        # config.json without head_dim: transformers uses hidden // heads, so draw hidden for it.
        hidden = heads * head_dim + draw(st.integers(0, heads - 1))
        explicit_head_dim = False
    else:
        hidden = pick("hidden_size", st.integers(max(1, limits.min_hidden // 2), limits.max_hidden // 2).map(lambda n: 2 * n))
        explicit_head_dim = True
    min_experts = max(1, 2 // layout.ep)  # at least two experts, so that routing chooses
    experts = pick("moe_num_experts", st.integers(min_experts, max(min_experts, limits.max_experts // layout.ep)).map(lambda n: n * layout.ep))
    hf: dict[str, Any] = {
        "vocab_size": pick("vocab_size", st.integers(max(1, 8 // tp), limits.max_vocab // tp).map(lambda n: n * tp)),
        "hidden_size": hidden,
        "intermediate_size": pick("intermediate_size", st.integers(max(1, 4 // tp), 64 // tp).map(lambda n: n * tp)),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "moe_num_experts": experts,
        "moe_k": pick("moe_k", st.integers(1, experts)),
        "moe_intermediate_size": pick("moe_intermediate_size", st.integers(max(1, 2 // tp), 32 // tp).map(lambda n: n * tp)),
        "moe_num_shared_experts": pick("moe_num_shared_experts", st.integers(0, 2)),
        "tie_word_embeddings": pick("tie_word_embeddings", st.booleans()),
        # One draw in four: bridges commonly declare use_bias unsupported, which rejects the example.
        "use_bias": pick("use_bias", st.sampled_from([False, False, False, True]) if limits.allow_bias else st.just(False)),
        "rms_norm_eps": pick("rms_norm_eps", st.sampled_from([1e-5, 1e-6]) | st.floats(1e-7, 1e-3)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": pick("rope_theta", st.sampled_from([500000.0, 10000.0]) | st.floats(10.0, 1e6)),
        },
        "moe_norm_min": pick("moe_norm_min", st.sampled_from([1e-12]) | st.floats(0.05, 1.0)),
    }
    if explicit_head_dim:
        hf["head_dim"] = head_dim
    pattern_keys = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")
    if any(k in fixed for k in pattern_keys):
        hf.update({k: fixed[k] for k in pattern_keys if k in fixed})
    else:
        hf.update(draw(layer_patterns(num_layers)))
    return ErnieMoeConfig.from_hf(hf)


@st.composite
def checkpoint_formats(draw: st.DrawFn, cfg: ErnieMoeConfig) -> CheckpointFormat:
    """How a drawn checkpoint spells its config and what it carries beside the model, as published
    ones may: keys left out where they hold transformers' default, a legacy top-level rope_theta,
    the keys transformers does not read, and multi-token-prediction tensors. Shrinks towards the
    canonical format."""
    omittable = omittable_keys(cfg)
    omitted = draw(st.sets(st.sampled_from(omittable))) if omittable else set()
    return CheckpointFormat(
        legacy_rope_theta="rope_theta" not in omitted and draw(st.booleans()),
        omitted=tuple(sorted(omitted)),
        published_extra_keys=draw(st.booleans()),
        # One draw in four, as use_bias: a bridge that fails on them fails on a quarter of the draws,
        # and the rest still reach defects that other draws hide.
        mtp=draw(st.sampled_from([False, False, False, True])),
    )


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


# Sequences: short ones (they shrink well), and in about `long_in_ten` of ten draws one sequence
# with positions beyond 256 and up to `max_long_seq_len` (ConfigLimits: 1024 on a CPU, 4096 on a
# GPU), where rotary embeddings at a large theta and attention over many keys differ from short
# ones. (A long batch of 4 costs ten times as much on a CPU and adds nothing that a short batch of
# 4 does not.)
@st.composite
def inputs(draw: st.DrawFn, max_batch: int = 4, max_seq_len: int = 8, long_in_ten: int = 1,
           max_long_seq_len: int = 1024) -> Inputs:
    if long_in_ten and draw(st.integers(0, 9)) >= 10 - long_in_ten:
        return Inputs(batch=1, seq_len=draw(st.integers(LONG_POSITIONS + 1, max_long_seq_len)), seed=draw(seeds()))
    return Inputs(batch=draw(st.integers(1, max_batch)), seq_len=draw(st.integers(1, max_seq_len)), seed=draw(seeds()))


@st.composite
def corruptions(draw: st.DrawFn, cfg: ErnieMoeConfig, config_only: bool = False) -> Corruption:
    """A way to make a checkpoint of `cfg` wrong: a tensor missing, extra or misshaped, or a
    config.json field that contradicts the weights (only the latter with `config_only`, which
    leaves the weight files untouched)."""
    import json

    from ernie_ref import expected_keys

    keys = expected_keys(cfg)
    kind = "config" if config_only else draw(st.sampled_from(["missing", "extra", "misshaped", "config"]))
    if kind == "missing":
        return Corruption("missing", draw(st.sampled_from(sorted(keys))))
    if kind == "misshaped":
        name = draw(st.sampled_from(sorted(keys)))
        dim = draw(st.integers(0, len(keys[name]) - 1))
        return Corruption("misshaped", name, json.dumps(misshaped(keys[name], dim, draw(st.sampled_from([-1, 1])))))
    if kind == "extra":
        plausible = plausible_extra_tensors(cfg)
        name = draw(st.sampled_from(sorted(plausible)))
        return Corruption("extra", name, json.dumps(plausible[name]))
    changes = contradicting_changes(cfg)
    name = draw(st.sampled_from(sorted(changes)))
    return Corruption("config", name, json.dumps(changes[name]))


def misshaped(shape: tuple[int, ...], dim: int, delta: int) -> list[int]:
    """`shape` with dimension `dim` one larger or smaller (never below 1)."""
    wrong = list(shape)
    wrong[dim] += delta if wrong[dim] > 1 else 1
    return wrong


def plausible_extra_tensors(cfg: ErnieMoeConfig) -> dict[str, list[int]]:
    """Tensors a checkpoint of `cfg` must not have, named and shaped as a real one would be."""
    H, L, E = cfg.hidden_size, cfg.num_hidden_layers, cfg.moe_num_experts
    moe = cfg.moe_layers[0]
    plausible = {
        f"model.layers.{L}.input_layernorm.weight": [H],  # one layer too many
        f"model.layers.{moe}.mlp.experts.{E}.up_proj.weight": [cfg.moe_intermediate_size, H],  # one expert too many
        "model.layers.0.self_attn.q_proj.bias" if not cfg.use_bias else "model.layers.0.self_attn.q_norm.weight":
            [cfg.num_attention_heads * cfg.head_dim],
    }
    dense = [i for i, t in enumerate(cfg.layer_types) if t == "dense"]
    if dense:  # router weights on a layer that is dense
        plausible[f"model.layers.{dense[0]}.mlp.gate.weight"] = [E, H]
    return plausible


def contradicting_changes(cfg: ErnieMoeConfig) -> dict[str, Any]:
    """config.json fields of `cfg`, each with a value that contradicts the weights' shapes.

    Only fields whose change reshapes some tensor: a field that no tensor depends on (the dense
    width when every layer is MoE, say) could change without contradicting anything."""
    changes: dict[str, Any] = {
        "vocab_size": cfg.vocab_size + 1,
        "moe_intermediate_size": cfg.moe_intermediate_size + 1,
        "moe_num_experts": cfg.moe_num_experts + 1,
        "num_hidden_layers": cfg.num_hidden_layers + 1,
        "head_dim": cfg.head_dim + 2,
        "tie_word_embeddings": not cfg.tie_word_embeddings,
    }
    if cfg.moe_num_shared_experts > 0:
        changes["moe_num_shared_experts"] = cfg.moe_num_shared_experts + 1
    if "dense" in cfg.layer_types:
        changes["intermediate_size"] = cfg.intermediate_size + 1
    return changes
