"""Build Megatron-Core GPTModel chunks for an ERNIE 4.5 MoE config: TransformerConfig, the layer
spec with ERNIE's router, and the model itself."""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from ernie_ref.config import ErnieMoeConfig
from ernie_ref.layout import Layout

from .router import ErnieRouter

__all__ = ["transformer_config", "decoder_block_spec", "build_chunks", "FP32_PARAMETER_SUFFIXES",
           "transformer_engine_available", "RoutedExperts", "SharedExperts"]

# The router's tensors, which real checkpoints keep in fp32 (HF `mlp.gate.weight` and
# `mlp.moe_statics.e_score_correction_bias`): kept in fp32 in the model too, so that a bf16
# conversion loses nothing and routes on the checkpoint's own numbers.
FP32_PARAMETER_SUFFIXES = ("mlp.router.weight", "mlp.router.expert_bias")


def transformer_engine_available() -> bool:
    """Transformer Engine's PyTorch layers can run here: the package imports and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (no CUDA libraries, say) is the same as none
        return False
    return True


def transformer_config(cfg: ErnieMoeConfig, layout: Layout, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        # use_bias: biases on q, k, v, o, the dense MLP, the shared experts and (build_chunks) lm_head.
        # add_bias_linear would put them on the routed experts and the router too: the layer spec
        # takes them off there (RoutedExperts, ErnieRouter).
        add_bias_linear=cfg.use_bias,
        add_qkv_bias=cfg.use_bias,
        rotary_interleaved=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # MoE: which layers (transformers' rule, via is_moe_layer), experts, shared experts.
        moe_layer_freq=[1 if cfg.is_moe_layer(i) else 0 for i in range(cfg.num_hidden_layers)],
        num_moe_experts=cfg.moe_num_experts,
        moe_router_topk=cfg.moe_k,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.shared_intermediate_size or None,
        moe_router_dtype="fp32",
        # ERNIE takes the softmax over all experts before choosing (ErnieRouter does the routing;
        # this flag only keeps TransformerConfig's k = 1 check truthful).
        moe_router_pre_softmax=True,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather",
        # Parallel layout; experts are whole on one rank (expert tensor parallel 1).
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=1,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # CPU: no fused kernels exist there, and weights must be created on the CPU.
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


class RoutedExperts(SequentialMLP):
    """Megatron-Core's SequentialMLP without biases: ERNIE's routed experts have none, even under
    use_bias, where add_bias_linear puts them on every other linear layer."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, *args, **kwargs):
        config = copy.copy(config)
        config.add_bias_linear = False
        super().__init__(num_local_experts, config, *args, **kwargs)


class SharedExperts(MLP):
    """ERNIE's shared experts under use_bias: one Megatron-Core MLP of width
    moe_intermediate_size x moe_num_shared_experts, with biases, whose output includes its last
    bias. (Megatron-Core's SharedExpertMLP refuses biases; without use_bias the spec keeps it.)"""

    def __init__(self, config: TransformerConfig, submodules, gate: bool, pg_collection=None, **kwargs):
        if gate:
            raise ValueError("ERNIE's shared experts have no gate: moe_shared_expert_gate must be False")
        # The width both as config.ffn_hidden_size (which Megatron-Core 0.16 reads for fc2) and as
        # the argument (0.19 warns without it).
        config = copy.copy(config)
        config.ffn_hidden_size = config.moe_shared_expert_intermediate_size
        super().__init__(config=config, submodules=submodules, ffn_hidden_size=config.ffn_hidden_size,
                         tp_group=pg_collection.tp if pg_collection is not None else None, **kwargs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output, bias = super().forward(hidden_states)  # fc2 hands its bias back unadded
        return output if bias is None else output + bias


def _spec_class(spec):
    """The module class a layer spec builds. megatron-core 0.16 describes a module as
    ModuleSpec(module=..., submodules=...), 0.19 as functools.partial(module, submodules=...)."""
    return spec.func if isinstance(spec, functools.partial) else getattr(spec, "module", None)


def _with_class(spec, cls: type):
    """The same spec (submodules and arguments) building `cls` instead."""
    if isinstance(spec, functools.partial):
        return functools.partial(cls, *spec.args, **spec.keywords)
    return dataclasses.replace(spec, module=cls)


def _ernie_moe(mlp_spec, router, use_bias: bool):
    """An MoE layer's MLP spec with ERNIE's router and, under use_bias, routed experts without
    biases and shared experts with them; a dense layer's spec comes back unchanged."""
    moe = _spec_class(mlp_spec)
    if not (isinstance(moe, type) and issubclass(moe, MoELayer)):
        return mlp_spec
    subs = mlp_spec.keywords["submodules"] if isinstance(mlp_spec, functools.partial) else mlp_spec.submodules
    changes = {"router": router}
    if use_bias:
        changes["experts"] = _with_class(subs.experts, RoutedExperts)
        if subs.shared_experts is not None:
            changes["shared_experts"] = _with_class(subs.shared_experts, SharedExperts)
    subs = dataclasses.replace(subs, **changes)
    if isinstance(mlp_spec, functools.partial):
        return functools.partial(mlp_spec.func, *mlp_spec.args, **{**mlp_spec.keywords, "submodules": subs})
    return dataclasses.replace(mlp_spec, submodules=subs)


def _require_transformer_engine(transformer_engine: bool) -> None:
    if transformer_engine and not transformer_engine_available():
        raise RuntimeError("the Transformer Engine layer spec needs transformer_engine and a CUDA GPU; "
                           "use the local spec (transformer_engine=False) here")


def decoder_block_spec(
    cfg: ErnieMoeConfig, tconfig: TransformerConfig, vp_stage: int | None = None, router_class: type = ErnieRouter,
    transformer_engine: bool = False,
):
    """The local or Transformer Engine spec, one layer spec per layer so that dense and MoE mix.
    Routed experts are one MLP each (no grouped GEMM), so that their names are the same in both."""
    _require_transformer_engine(transformer_engine)
    block = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=transformer_engine, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    router = functools.partial(router_class, norm_min=cfg.moe_norm_min)
    layers = [
        dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, mlp=_ernie_moe(spec.submodules.mlp, router, cfg.use_bias)))
        for spec in block.layer_specs
    ]
    return dataclasses.replace(block, layer_specs=layers)


def build_chunks(
    cfg: ErnieMoeConfig, tconfig: TransformerConfig, layout: Layout, router_class: type = ErnieRouter,
    transformer_engine: bool = False,
) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), inside an initialised parallel state."""
    # Refused before the parallel state is asked anything, so that the refusal does not depend on it.
    _require_transformer_engine(transformer_engine)
    chunks = []
    for vp_stage in range(layout.vpp):
        vp = vp_stage if layout.vpp > 1 else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        chunks.append(
            GPTModel(
                config=tconfig,
                transformer_layer_spec=decoder_block_spec(cfg, tconfig, vp, router_class, transformer_engine),
                vocab_size=cfg.vocab_size,
                max_sequence_length=4096,
                pre_process=pre,
                post_process=post,
                parallel_output=False,
                share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=cfg.rope_theta,
                vp_stage=vp,
            )
        )
        if post and cfg.use_bias:
            _add_output_bias(chunks[-1].output_layer)
        _set_dtypes(chunks[-1], tconfig.params_dtype)
    return chunks


def _add_output_bias(layer: ColumnParallelLinear) -> None:
    """lm_head's bias (use_bias) on the output layer, which GPTModel always creates without one: a
    bias as ColumnParallelLinear makes its own (zeros, split with the vocabulary across
    tensor-parallel ranks), which its forward then adds to the logits."""
    bias = torch.nn.Parameter(torch.zeros(layer.output_size_per_partition, dtype=layer.config.params_dtype))
    set_tensor_model_parallel_attributes(bias, True, 0, 1)
    layer.bias = bias


def _set_dtypes(chunk: GPTModel, dtype: torch.dtype) -> None:
    """Every tensor in `dtype` but the router's, in fp32. Megatron-Core creates linear layers in
    params_dtype but its local norms in fp32 and the router weight in params_dtype; in training,
    its Float16Module casts the whole model. Here each tensor gets the dtype the checkpoint
    stores it in, so that a conversion holds every tensor exactly and writes it back as it was."""
    # Parameters and persistent buffers only: the rotary frequencies and other working buffers
    # keep the precision Megatron computes them in.
    for name, tensor in chunk.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        wanted = torch.float32 if name.endswith(FP32_PARAMETER_SUFFIXES) else dtype
        if tensor.dtype != wanted:
            tensor.data = tensor.data.to(wanted)
