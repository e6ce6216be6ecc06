"""The catalogue of mutants as plain data: for each mutant of this package, its name, its class,
the part of a conversion it breaks, the property expected to kill it, its bug in words, and what
reveals it. Readers that only list the mutants (the kill matrix, which runs each in a pytest
process of its own) take them from here, without importing torch or megatron as the mutants'
classes do.

The classes stay the source of truth: `tests/test_mutant_catalogue.py` requires this listing to
equal the registered mutants' attributes (`MUTANTS`), in order, so that the two cannot drift. A new
mutant is listed here too, in its part, in the order its module registers it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOGUE", "PARTS", "Listing", "bridge_spec"]

# The parts of a conversion, in the order the kill matrix lists them.
PARTS = ("config", "routing", "mapping", "layout", "precision and export", "refusal")


def bridge_spec(class_name: str) -> str:
    """The --bridge value of the mutant class called `class_name` (the package re-exports every class)."""
    return f"{__package__}:{class_name}"


@dataclass(frozen=True)
class Listing:
    """One mutant as the catalogue lists it; each field is the class attribute of the same name
    (`bug` is `Mutant.bug()`, its docstring on one line)."""

    name: str
    class_name: str
    part: str
    killed_by: str
    bug: str
    reveals_under: str | None = None
    reveals_in: str | None = None
    reveals_in_published_structures: bool = False

    @property
    def spec(self) -> str:
        """The mutant's --bridge value."""
        return bridge_spec(self.class_name)


_LISTINGS = (
    # ------------------------------------------------------------------------------- config
    Listing('eps-dropped', 'EpsDropped', 'config', 'equivalence',
            "rms_norm_eps is not translated: Megatron's default layernorm_epsilon 1e-5 is used instead."),
    Listing('head-dim-from-hidden', 'HeadDimFromHidden', 'config', 'import',
            "head_dim assumed to be hidden_size / num_attention_heads, ignoring config.json's head_dim."),
    Listing('tie-assumed', 'TieAssumed', 'config', 'equivalence',
            'tie_word_embeddings ignored: the output layer always shares the embedding (as in ERNIE 4.5 '
            '0.3B), so an untied lm_head is never loaded.'),
    Listing('top-k-off-by-one', 'TopKOffByOne', 'config', 'equivalence',
            'moe_k translated off by one (k - 1, or k + 1 when k is 1).'),
    Listing('rope-theta-default', 'RopeThetaDefault', 'config', 'equivalence',
            "rope_theta not translated: Megatron's default rotary_base 10000 is used."),
    Listing('rope-not-interleaved', 'RopeNotInterleaved', 'config', 'equivalence',
            'Rotary embedding applied to halves (GPT-NeoX style) instead of interleaved pairs.'),
    Listing('moe-layers-by-interval-only', 'MoeLayersByIntervalOnly', 'config', 'import',
            'The MoE layer pattern taken from moe_layer_interval alone, ignoring the start and end indices.'),
    Listing('moe-layers-from-start-only', 'MoeLayersFromStartOnly', 'config', 'equivalence',
            'Every layer from moe_layer_start_index on is built as MoE, ignoring the end index and the '
            'interval; a parameter the checkpoint has no tensor for keeps its initial value with a warning, '
            'and a checkpoint tensor with no parameter is dropped, so the load goes through.'),
    Listing('shared-expert-count-ignored', 'SharedExpertCountIgnored', 'config', 'import',
            "The shared experts' width taken as moe_intermediate_size, whatever moe_num_shared_experts."),
    Listing('absent-shared-experts-read-as-none', 'AbsentSharedExpertsReadAsNone', 'config', 'equivalence',
            "A config.json without moe_num_shared_experts read as no shared experts (the key's absence taken "
            'for 0, as `config.get("moe_num_shared_experts", 0)` does), where transformers reads 2.'),
    Listing('moe-width-from-dense', 'MoeWidthFromDense', 'config', 'import',
            "The routed experts' width taken from intermediate_size instead of moe_intermediate_size."),
    # ------------------------------------------------------------------------------- routing
    Listing('expert-bias-weighs-experts', 'ExpertBiasWeighsExperts', 'routing', 'equivalence',
            'The expert bias enters the mixing weights (p + bias), as in sigmoid routers, not only the '
            'selection.'),
    Listing('no-renormalisation', 'NoRenormalisation', 'routing', 'equivalence',
            'The chosen experts are weighted by their softmax probabilities without dividing by their sum.'),
    Listing('expert-bias-ignored', 'ExpertBiasIgnored', 'routing', 'equivalence',
            'Experts chosen by probability alone: the expert bias is loaded but never used.'),
    Listing('bfloat16-routes-one-token-in-twenty-elsewhere', 'Bfloat16RoutesOneTokenInTwentyElsewhere',
            'routing', 'equivalence',
            'In bf16, one token in twenty (one at least) goes to its (k+1)-th expert instead of its k-th, '
            'outside any tie (the closest call above the bf16 routing margin): in a batch of twenty tokens or'
            ' more the values stay within the bf16 tolerance, so only an exact comparison of routing '
            'decisions catches it (a tolerance of 10% of tokens routed elsewhere would not).',
            reveals_in='bfloat16'),
    Listing('softmax-over-chosen', 'SoftmaxOverChosen', 'routing', 'equivalence',
            "Weights are a softmax over the chosen experts' logits (Mixtral style): equal to the renormalised"
            ' probabilities except that moe_norm_min never clamps the denominator.'),
    Listing('norm-min-ignored', 'NormMinIgnored', 'routing', 'equivalence',
            "moe_norm_min not passed on: the router clamps the weights' denominator at 1e-12."),
    Listing('expert-bias-not-loaded', 'ExpertBiasNotLoaded', 'routing', 'import',
            'The expert bias keeps its initial zeros, as when a mapping forgets the buffer (it is not a '
            'parameter).'),
    # ------------------------------------------------------------------------------- mapping
    Listing('qkv-concatenated', 'QKVConcatenated', 'mapping', 'equivalence',
            'linear_qkv built as [q; k; v] instead of grouped per key/value head (right only for one kv '
            'head).'),
    Listing('key-value-swapped', 'KeyValueSwapped', 'mapping', 'equivalence',
            'k_proj and v_proj trade places inside linear_qkv.'),
    Listing('gate-up-swapped-on-load', 'GateUpSwappedOnLoad', 'mapping', 'equivalence',
            'linear_fc1 built as [up; gate] instead of [gate; up].'),
    Listing('gate-up-swapped-on-export', 'GateUpSwappedOnExport', 'mapping', 'round_trip',
            "Writes linear_fc1's halves back as up, gate: loads right, exports wrong."),
    Listing('experts-shifted', 'ExpertsShifted', 'mapping', 'equivalence',
            'Routed expert e loaded from HF expert e + 1 (an off-by-one in expert numbering); the router is '
            'not permuted.'),
    Listing('layer-index-read-as-one-digit', 'LayerIndexReadAsOneDigit', 'mapping', 'equivalence',
            "A layer's index read as one digit (a pattern `layers\\.(\\d)\\.`): layers 10 and up load the "
            'weights of the layer named by their first digit. Models of up to 10 layers convert exactly; only'
            ' a deep one (the published structures) shows it.',
            reveals_in_published_structures=True),
    Listing('norms-swapped', 'NormsSwapped', 'mapping', 'equivalence',
            'input_layernorm and post_attention_layernorm trade places.'),
    Listing('output-projection-transposed', 'OutputProjectionTransposed', 'mapping', 'import',
            'o_proj loaded transposed (HF Linear weights are [out, in]; the author assumed [in, out]).'),
    Listing('lm-head-from-embedding', 'LmHeadFromEmbedding', 'mapping', 'equivalence',
            'An untied lm_head loaded from embed_tokens, as if every model tied them.'),
    # ------------------------------------------------------------------------------- layout
    Listing('gate-up-split-contiguously-under-tp', 'GateUpSplitContiguouslyUnderTP', 'layout', 'equivalence',
            'tp > 1: linear_fc1 = [gate; up] cut into contiguous pieces, so rank 0 gets gate only.',
            reveals_under='tp2-pp1-ep1-vpp1'),
    Listing('row-parallel-split-on-rows', 'RowParallelSplitOnRows', 'layout', 'import',
            'tp > 1: the row-parallel layers (linear_proj, linear_fc2) split along their output dimension.',
            reveals_under='tp2-pp1-ep1-vpp1'),
    Listing('expert-offset-ignored-under-ep', 'ExpertOffsetIgnoredUnderEP', 'layout', 'round_trip',
            'ep > 1: every expert-parallel rank loads experts 0.. instead of its own slice.',
            reveals_under='tp1-pp1-ep2-vpp1'),
    Listing('layer-offset-ignored-under-pp', 'LayerOffsetIgnoredUnderPP', 'layout', 'round_trip',
            'pp > 1: every pipeline stage loads layers 0.. instead of its own (where the layer types allow).',
            reveals_under='tp1-pp2-ep1-vpp1'),
    Listing('virtual-stage-offset-ignored', 'VirtualStageOffsetIgnored', 'layout', 'round_trip',
            "vpp > 1: a stage's layer offset computed as pp_rank x layers per chunk, the same for every "
            'virtual chunk, as if there were one chunk per stage (where the layer types allow).',
            reveals_under='tp1-pp2-ep1-vpp2'),
    # ------------------------------------------------------------------------------- precision and export
    Listing('mtp-tensors-dropped', 'MtpTensorsDropped', 'precision and export', 'round_trip',
            "The published checkpoint's multi-token-prediction tensors are dropped on the way: the export "
            "holds the model's tensors alone."),
    Listing('export-cast-to-bfloat16', 'ExportCastToBfloat16', 'precision and export', 'round_trip',
            'Export casts every tensor to bfloat16 ("checkpoints are bf16"), the fp32 router included.'),
    Listing('router-exported-in-half', 'RouterExportedInHalf', 'precision and export', 'round_trip',
            'Export writes the router weight and expert bias in float16, the precision the author assumed for'
            ' every tensor; real ERNIE checkpoints keep the router in fp32.'),
    Listing('router-in-model-dtype', 'RouterInModelDtype', 'precision and export', 'round_trip',
            "The router weight is held in the model's dtype, as Megatron-Core creates it (only its expert "
            "bias is kept in fp32): a bf16 checkpoint's fp32 router weight is rounded to bf16 on load and "
            'exported so.',
            reveals_in='bfloat16'),
    Listing('export-in-float32', 'ExportInFloat32', 'precision and export', 'round_trip',
            "Export writes every tensor in fp32, the precision of training's master weights, whatever the "
            'dtype of the checkpoint that was loaded: a bf16 checkpoint comes back twice as large.',
            reveals_in='bfloat16'),
    Listing('bfloat16-read-as-float16', 'Bfloat16ReadAsFloat16', 'precision and export', 'equivalence',
            "A bf16 checkpoint's bytes read as float16 (a reader that maps every 2-byte dtype to half): each "
            'value is reinterpreted, not converted, and the model is built in float16.',
            reveals_in='bfloat16'),
    Listing('expert-bias-dropped-on-export', 'ExpertBiasDroppedOnExport', 'precision and export', 'round_trip',
            'Export forgets moe_statics.e_score_correction_bias (a buffer, not a parameter).'),
    Listing('lm-head-written-when-tied', 'LmHeadWrittenWhenTied', 'precision and export', 'round_trip',
            'Export always writes lm_head.weight, also for tied models (transformers would then untie on '
            'save).'),
    Listing('export-config-from-defaults', 'ExportConfigFromDefaults', 'precision and export', 'round_trip',
            "Export writes config.json from a template: rope_theta and moe_norm_min at ERNIE 4.5's published "
            'defaults.'),
    Listing('config-without-model-type', 'ConfigWithoutModelType', 'precision and export', 'interop',
            'config.json written without model_type and architectures: our own reader shrugs, transformers '
            'cannot load it.'),
    # ------------------------------------------------------------------------------- refusal
    Listing('load-always-raises', 'LoadAlwaysRaises', 'refusal', 'refusal',
            'load raises on every checkpoint (a dependency it cannot import, say). When any error of load '
            'counted as refusing a corruption, such a bridge passed the refusal property.'),
    Listing('lenient-loader', 'LenientLoader', 'refusal', 'refusal',
            'Takes what it finds: missing or misshaped tensors become zeros, extra tensors are ignored.'),
    Listing('extra-tensors-ignored', 'ExtraTensorsIgnored', 'refusal', 'refusal',
            'Checks that every expected tensor is present and well shaped, but not that nothing else is.'),
    Listing('biases-dropped', 'BiasesDropped', 'refusal', 'round_trip',
            "use_bias read as false without saying so: the checkpoint's biases are skipped."),
)

# Mutant name -> its listing, in the order the package registers the mutants.
CATALOGUE: dict[str, Listing] = {listing.name: listing for listing in _LISTINGS}
