"""Adapter for modelscope's mcore-bridge (the converter behind ms-swift's Megatron training),
registered as `--bridge mcore-bridge`.

It drives the package as its README's quick start and ms-swift do: `hf_to_mcore_config(hf_config)`,
`ModelConfig(params_dtype=..., <parallel sizes>, **kwargs)`, `get_mcore_model(config)` and
`config.bridge.load_weights(models, hf_dir)`; export is `config.bridge.save_weights(models, out_dir)`,
which writes the weights, and `hf_config.save_pretrained(out_dir)` on rank 0, which writes
config.json as the quick start does. Nothing of the conversion is ours: no mapping, check or
router is added, so what the bridge gets wrong shows.

mcore-bridge is built for GPUs with Transformer Engine. Where the package cannot run on a CPU
without it as shipped, the adapter changes the least it must, and each change is listed in
`DEVIATIONS`, printed in the report header and written into the certificate. Where Transformer
Engine is installed (a GPU machine), those deviations are not made.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ernie_ref.layout import Layout

from ..cpu_patches import CudaDevicesOnCpu
from .package import PackageAdapter
from .te_placeholder import HAVE_TE, show_placeholders_to

__all__ = ["McoreBridgeAdapter", "DEVIATIONS"]

DEVIATIONS_WITHOUT_TE = (
    "transformer_engine: mcore_bridge imports it unconditionally (its package __init__ runs apply_patch(), "
    "whose _patch_transformer_engine imports it; tuners/lora.py and model/modules/mtp_layer.py import it at "
    "module level). mcore_bridge's modules alone are given a placeholder module whose classes refuse to be "
    "built; nothing enters sys.modules, so megatron-core still sees no Transformer Engine.",
    "megatron-core's TE wrapper classes: without Transformer Engine megatron-core leaves some of them None "
    "(TEGroupedLinear) or a mock (TELinear, TELayerNormColumnParallelLinear in 0.16), which mcore_bridge patches "
    "at import (patcher._patch_TEGroupedLinear) and tests with isinstance "
    "(model/register.py ModelLoader._set_linear_is_expert). mcore_bridge's modules see them as classes that no "
    "object is an instance of, so the patch lands on a class nothing uses and the isinstance tests are False, "
    "as they are for a model without TE modules.",
    "layer spec: ModelLoader.get_transformer_layer_spec hard-codes use_transformer_engine=True; the same "
    "megatron-core get_gpt_decoder_block_spec call is made with use_transformer_engine=False (local layers: "
    "separate RMSNorm modules, SequentialMLP experts), with ModelConfig(moe_grouped_gemm=False, "
    "persist_layer_norm=False), which the local spec needs. The local spec's norms (torch.nn.RMSNorm) are "
    "created in fp32 whatever params_dtype, where Transformer Engine's are created in params_dtype; their "
    "weights are cast to params_dtype after the model is built, as Transformer Engine would have made them.",
    "name shim (changes the bridge's own mapping): mcore-bridge's weight mapping (bridge/gpt_bridge.py) "
    "addresses Transformer Engine's names only, with no fallback to megatron-core's local ones: the fused norms "
    "self_attention.linear_qkv.layer_norm_weight and (dense layers) mlp.linear_fc1.layer_norm_weight, and the "
    "grouped experts' mlp.experts.linear_fc1.weight{i} / linear_fc2.weight{i}. Each local layer gets these "
    "names as aliases of the same parameters (input_layernorm.weight, pre_mlp_layernorm.weight, "
    "mlp.experts.local_experts.{i}.linear_fc1.weight / linear_fc2.weight); the aliases are plain attributes, "
    "not registered, so the model's state dict and parameters are unchanged.",
)
DEVIATIONS_ALWAYS = (
    "undeclared dependencies: mcore_bridge imports datasets (utils/torch_utils.py) and, in the releases that "
    "have model/modules/kernels (1.6.5; not 1.5.2), triton at import, but declares neither; both are installed "
    "beside it (tox.ini).",
    "CPU runtime: megatron-core runs on CPU (fp32, gloo) through conformance.cpu_patches.apply_cpu_patches(), "
    "as for every bridge; ModelConfig gets use_cpu_initialization=True, and the export (save_weights) runs under "
    "conformance.cpu_patches.CudaDevicesOnCpu, which turns the CUDA device it names for its buffers "
    "(device='cuda', .to('cuda')) into the CPU.",
    "EP-PP group: bridge/gpt_bridge.py caches the expert-and-pipeline process group in module globals "
    "(EP_PP_GROUP, EP_PP_RANK, EP_PP_SIZE) on first use, for the life of the process. The suite's rank processes "
    "run one layout after another, so the cache is cleared before each load (a user's process has one layout).",
)
DEVIATIONS = DEVIATIONS_ALWAYS + (() if HAVE_TE else DEVIATIONS_WITHOUT_TE)


def _is_mcore_bridge_module(name: str) -> bool:
    return name == "mcore_bridge" or name.startswith("mcore_bridge.")


def import_mcore_bridge() -> types.ModuleType:
    """The `mcore_bridge` package, imported with the placeholders in place where TE is absent, and
    (without TE) its model loader building megatron-core's local layer spec."""
    show_placeholders_to(_is_mcore_bridge_module, megatron_te_classes=True)
    import mcore_bridge
    import mcore_bridge.model.register as register

    if not HAVE_TE and not getattr(register.get_gpt_decoder_block_spec, "_local_layers", False):
        te_spec = register.get_gpt_decoder_block_spec

        def local_decoder_block_spec(*args: Any, **kwargs: Any) -> Any:
            return te_spec(*args, **{**kwargs, "use_transformer_engine": False})

        local_decoder_block_spec._local_layers = True  # type: ignore[attr-defined]
        register.get_gpt_decoder_block_spec = local_decoder_block_spec
    return mcore_bridge


def _forget_ep_pp_group() -> None:
    import mcore_bridge.bridge.gpt_bridge as gpt_bridge

    gpt_bridge.EP_PP_GROUP = gpt_bridge.EP_PP_RANK = gpt_bridge.EP_PP_SIZE = None


def _as_te_layers(chunks: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """The local layers as `DEVIATIONS_WITHOUT_TE` says: norms in params_dtype, and Transformer
    Engine's names for the local layers' parameters as unregistered attributes (object.__setattr__
    bypasses nn.Module's registration)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for chunk in chunks:
        for layer in chunk.modules():
            if isinstance(layer, torch.nn.RMSNorm):
                layer.weight.data = layer.weight.data.to(dtype)
            if not isinstance(layer, TransformerLayer):
                continue
            object.__setattr__(layer.self_attention.linear_qkv, "layer_norm_weight", layer.input_layernorm.weight)
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                object.__setattr__(layer.mlp.linear_fc1, "layer_norm_weight", layer.pre_mlp_layernorm.weight)
                continue
            for fc in ("linear_fc1", "linear_fc2"):
                grouped = {f"weight{i}": getattr(expert, fc).weight for i, expert in enumerate(experts.local_experts)}
                object.__setattr__(experts, fc, types.SimpleNamespace(**grouped))


class McoreBridgeAdapter(PackageAdapter):
    """mcore-bridge's GPTBridge for `ernie4_5_moe`, as shipped but for `DEVIATIONS`."""

    name = "mcore-bridge"
    distribution, module, tox_env = "mcore-bridge", "mcore_bridge", "py311-mcorebridge165"
    declared_deviations = DEVIATIONS
    load_state = ("_hf_config", "_model_config")  # of the last load, for export on the same rank
    worker_imports = ("conformance.adapters.mcore_bridge_preload",)

    def load(self, hf_dir: Path, layout: Layout) -> list[torch.nn.Module]:
        mcore_bridge = import_mcore_bridge()
        from transformers import AutoConfig

        _forget_ep_pp_group()
        # Without trust_remote_code (the quick start passes it): the published checkpoints' auto_map
        # names Baidu's remote code, which the suite's checkpoints do not ship; transformers' own
        # Ernie4_5_MoeConfig reads them.
        hf_config = AutoConfig.from_pretrained(str(hf_dir))
        # ms-swift's --torch_dtype defaults to the checkpoint's; transformers reads a config that
        # names no dtype as float32.
        dtype = hf_config.dtype or torch.float32
        without_te = {} if HAVE_TE else {"moe_grouped_gemm": False, "persist_layer_norm": False}
        model_config = mcore_bridge.ModelConfig(
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=1,  # as the suite's layouts define: experts whole on a rank
            use_cpu_initialization=not torch.cuda.is_available(),
            **without_te,
            **mcore_bridge.hf_to_mcore_config(hf_config),
        )
        chunks = mcore_bridge.get_mcore_model(model_config)
        if not HAVE_TE:
            _as_te_layers(chunks, dtype)
        model_config.bridge.load_weights(chunks, str(hf_dir))
        self._hf_config, self._model_config = hf_config, model_config
        return list(chunks)

    def export(self, chunks: list[torch.nn.Module], out_dir: Path) -> None:
        if self._model_config is None:
            raise RuntimeError("mcore-bridge adapter: export before load")
        with CudaDevicesOnCpu() if not torch.cuda.is_available() else contextlib.nullcontext():
            self._model_config.bridge.save_weights(chunks, str(out_dir))
        if not dist.is_initialized() or dist.get_rank() == 0:
            self._hf_config.save_pretrained(str(out_dir))

