"""Adapter for NVIDIA Megatron-Bridge's ERNIE 4.5 bridge (`megatron.bridge.models.ernie.
ernie_45_bridge.Ernie45Bridge`), registered as `--bridge megatron-bridge`.

It drives the bridge as its users do: `AutoBridge.from_hf_pretrained(dir)`, the provider from
`to_megatron_provider(load_weights=False)` given the layout's parallel sizes,
`provide_distributed_model`, `load_hf_weights`, and `save_hf_pretrained` for export. Nothing
of the conversion is ours: no check, mapping or router is added, so what the bridge gets wrong
shows. Where the bridge cannot run on a CPU without Transformer Engine as shipped, the adapter
changes the least it must; each change is listed in `DEVIATIONS`, printed in the report header
and written into the certificate. Where Transformer Engine is installed (a GPU machine), the
Transformer Engine deviations are not made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ernie_ref.layout import Layout

from .package import PackageAdapter
from .te_placeholder import HAVE_TE, show_placeholders_to

__all__ = ["MegatronBridgeAdapter", "DEVIATIONS"]

# Modules of megatron-bridge that import Transformer Engine without a guard; the LoRA code they
# hold never runs during a conversion. 0.6.2: peft/lora_layers.py; 0.5.1: peft/lora.py.
_UNGUARDED_TE_IMPORTERS = frozenset({"megatron.bridge.peft.lora_layers", "megatron.bridge.peft.lora"})

DEVIATIONS_WITHOUT_TE = (
    "transformer_engine: megatron.bridge.peft (lora_layers.py / lora.py) imports it unconditionally although "
    "conversion never uses LoRA; those two modules alone are given a placeholder module whose classes refuse "
    "to be built. Nothing enters sys.modules, so megatron-core and the bridge still see no Transformer Engine.",
    "layer spec: the bridge's ERNIE spec hard-codes use_transformer_engine=True; the same megatron-core GPT "
    "decoder block spec is used with use_transformer_engine=False (the bridge's name mapping has fallbacks for "
    "the local names).",
    "moe_permute_fusion: the provider sets True, which megatron-core refuses without Transformer Engine; set to "
    "False (the unfused permutation computes the same).",
)
DEVIATIONS_ALWAYS = (
    "CPU runtime: megatron-core runs on CPU (fp32, gloo) through conformance.cpu_patches.apply_cpu_patches(), "
    "as for every bridge; the model is built with provide_distributed_model(use_cpu_initialization=True, "
    "wrap_with_ddp=False) inside the suite's parallel state.",
    "save_hf_pretrained: the tokenizer artifact is set to None, since the suite's checkpoints have no tokenizer "
    "files (the bridge lists the tokenizer as a required artifact).",
)
DEVIATIONS = DEVIATIONS_ALWAYS + (() if HAVE_TE else DEVIATIONS_WITHOUT_TE)


def _import_megatron_bridge() -> Any:
    """`megatron.bridge.AutoBridge`, imported with the placeholder in place where TE is absent."""
    show_placeholders_to(_UNGUARDED_TE_IMPORTERS.__contains__)
    from megatron.bridge import AutoBridge

    return AutoBridge


def _local_decoder_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    """megatron-core's GPT decoder block spec with local (non-TE) layers: the bridge's own spec
    function with use_transformer_engine=False."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config=config, use_transformer_engine=False, vp_stage=vp_stage)


class MegatronBridgeAdapter(PackageAdapter):
    """`Ernie45Bridge` of megatron-bridge through AutoBridge, as shipped but for `DEVIATIONS`."""

    name = "megatron-bridge"
    distribution, module, tox_env = "megatron-bridge", "megatron.bridge", "py312-mbridge062"
    declared_deviations = DEVIATIONS
    load_state = ("_auto_bridge",)  # the AutoBridge of the last load, for export on the same rank

    def load(self, hf_dir: Path, layout: Layout) -> list[torch.nn.Module]:
        AutoBridge = _import_megatron_bridge()
        bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
        provider = bridge.to_megatron_provider(load_weights=False)
        if not HAVE_TE:
            provider.transformer_layer_spec = _local_decoder_block_spec
            provider.moe_permute_fusion = False
        provider.tensor_model_parallel_size = layout.tp
        provider.pipeline_model_parallel_size = layout.pp
        provider.virtual_pipeline_model_parallel_size = layout.vpp if layout.vpp > 1 else None
        provider.expert_model_parallel_size = layout.ep
        provider.expert_tensor_parallel_size = 1  # as the suite's layouts define: experts whole on a rank
        if layout.pp > 1:
            provider.pipeline_dtype = provider.params_dtype
        provider.finalize()
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                                    mixed_precision_wrapper=None)
        bridge.load_hf_weights(chunks)
        self._auto_bridge = bridge
        return list(chunks)

    def export(self, chunks: list[torch.nn.Module], out_dir: Path) -> None:
        if self._auto_bridge is None:
            raise RuntimeError("megatron-bridge adapter: export before load")
        self._auto_bridge.hf_pretrained.tokenizer = None
        self._auto_bridge.save_hf_pretrained(chunks, str(out_dir), show_progress=False)
