"""HuggingFace checkpoint directories for ERNIE 4.5 MoE, in the real on-disk format.

A directory holds `config.json` and either `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Experts are stored one
tensor per expert and projection (`model.layers.N.mlp.experts.E.gate_proj.weight`), as the
published checkpoints are; transformers merges them into fused tensors when it loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import TRANSFORMERS_DEFAULTS, ConfigError, ErnieMoeConfig
from .published import PUBLISHED_EXTRA_KEYS

__all__ = [
    "CheckpointError",
    "CheckpointFormat",
    "mtp_keys",
    "expected_keys",
    "check_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "open_checkpoint",
    "read_config",
    "iter_tensors",
    "tensor_shapes",
    "TensorReader",
    "random_checkpoint",
    "random_state_dict",
    "FP32_TENSOR_SUFFIXES",
    "SUPPORTED_DTYPES",
    "checkpoint_dtype",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "INDEX_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Real ERNIE 4.5 checkpoints keep the router in fp32 whatever the dtype of the rest
# (transformers' `_keep_in_fp32_modules_strict`).
FP32_TENSOR_SUFFIXES = ("mlp.gate.weight", "mlp.moe_statics.e_score_correction_bias")

# The dtypes of the published checkpoints (bf16) and of full-precision ones (fp32).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

# safetensors' header names for dtypes, so that a checkpoint's dtypes are known before reading data.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}

# Tensors that transformers ignores when it loads (`_keys_to_ignore_on_load_unexpected`):
# multi-token-prediction heads of the published checkpoints. They are not part of the model.
IGNORED_KEY_FRAGMENT = "mtp"

# Where each multi-token-prediction (MTP) tensor of a published checkpoint goes: one MTP layer
# (num_nextn_predict_layers 1) stored after the model, `model.mtp_block.0.` holding a decoder layer.
MTP_PREFIXES = ("model.mtp_block.0.", "model.mtp_linear_proj.0.", "model.mtp_hidden_norm.0.", "model.mtp_emb_norm.0.")

# Default shard size: small enough that tests with a few MB exercise sharding when they ask to.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its config.json."""


@dataclass(frozen=True)
class CheckpointFormat:
    """How a checkpoint spells its config and what it carries beside the model, as the published
    ones may; none of it changes the model that transformers builds. The default is the canonical
    spelling (`ErnieMoeConfig.to_hf`) and the model's tensors alone."""

    legacy_rope_theta: bool = False  # a top-level `rope_theta`, no `rope_parameters`
    omitted: tuple[str, ...] = ()  # keys left out of config.json; each holds transformers' default
    published_extra_keys: bool = False  # PUBLISHED_EXTRA_KEYS and `torch_dtype`, which transformers does not read
    mtp: bool = False  # the published multi-token-prediction tensors, with `num_nextn_predict_layers: 1`

    def __str__(self) -> str:
        parts = (["legacy top-level rope_theta"] if self.legacy_rope_theta else []) + \
                ([f"config.json omits {', '.join(self.omitted)}"] if self.omitted else []) + \
                (["published extra config keys"] if self.published_extra_keys else []) + (["MTP tensors"] if self.mtp else [])
        return "; ".join(parts) or "canonical"

    def config_json(self, cfg: ErnieMoeConfig, dtype: str | None) -> dict[str, Any]:
        """The config.json dict of `cfg` in this format (`dtype`: of the model's tensors, if one)."""
        hf = cfg.to_hf()
        if dtype is not None:
            hf["dtype"] = dtype
        if self.legacy_rope_theta:
            del hf["rope_parameters"]
            hf["rope_theta"] = cfg.rope_theta
        omittable = omittable_keys(cfg)
        for key in self.omitted:
            if key not in omittable:
                raise ValueError(f"config.json may omit {key!r} only where it holds transformers' default; "
                                 f"{key}={getattr(cfg, key)!r} in {cfg.one_line()}")
            for spelled in (("rope_parameters", "rope_theta") if key == "rope_theta" else (key,)):
                hf.pop(spelled, None)
        if self.published_extra_keys:
            hf.update(PUBLISHED_EXTRA_KEYS)
            if dtype is not None:
                hf["torch_dtype"] = dtype
        if self.mtp:
            hf["num_nextn_predict_layers"] = 1
        return hf


def omittable_keys(cfg: ErnieMoeConfig) -> list[str]:
    """The config.json keys that `cfg` may leave out: those whose value is transformers' default
    (head_dim where it is hidden_size // num_attention_heads)."""
    keys = [k for k, v in TRANSFORMERS_DEFAULTS.items() if k != "moe_layer_end_index" and getattr(cfg, k) == v]
    if cfg.moe_layer_end_index == cfg.num_hidden_layers - 1:  # the default -1 means the last layer
        keys.append("moe_layer_end_index")
    if cfg.hidden_size // cfg.num_attention_heads == cfg.head_dim:
        keys.append("head_dim")
    return sorted(keys)


def mtp_keys(cfg: ErnieMoeConfig) -> dict[str, tuple[int, ...]]:
    """The published checkpoints' multi-token-prediction tensors for `cfg`, with their shapes: a
    decoder layer shaped as the model's last, the projection of [embedding; hidden] back to the
    hidden size, and its two norms. transformers skips every key with "mtp"."""
    H, last = cfg.hidden_size, cfg.num_hidden_layers - 1
    layer = f"model.layers.{last}."
    keys = {MTP_PREFIXES[0] + k[len(layer):]: shape for k, shape in expected_keys(cfg).items() if k.startswith(layer)}
    keys[MTP_PREFIXES[1] + "weight"] = (H, 2 * H)
    keys[MTP_PREFIXES[2] + "weight"] = (H,)
    keys[MTP_PREFIXES[3] + "weight"] = (H,)
    return keys


def expected_keys(cfg: ErnieMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF checkpoint for `cfg`, with its shape, in model order."""
    H, D = cfg.hidden_size, cfg.head_dim
    keys: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, H)}

    def linear(prefix: str, n_in: int, n_out: int, bias: bool) -> None:
        keys[f"{prefix}.weight"] = (n_out, n_in)
        if bias:
            keys[f"{prefix}.bias"] = (n_out,)

    def mlp(prefix: str, width: int, bias: bool) -> None:
        linear(f"{prefix}.gate_proj", H, width, bias)
        linear(f"{prefix}.up_proj", H, width, bias)
        linear(f"{prefix}.down_proj", width, H, bias)

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        keys[f"{p}.input_layernorm.weight"] = (H,)
        linear(f"{p}.self_attn.q_proj", H, cfg.num_attention_heads * D, cfg.use_bias)
        linear(f"{p}.self_attn.k_proj", H, cfg.num_key_value_heads * D, cfg.use_bias)
        linear(f"{p}.self_attn.v_proj", H, cfg.num_key_value_heads * D, cfg.use_bias)
        linear(f"{p}.self_attn.o_proj", cfg.num_attention_heads * D, H, cfg.use_bias)
        keys[f"{p}.post_attention_layernorm.weight"] = (H,)
        if cfg.is_moe_layer(i):
            keys[f"{p}.mlp.gate.weight"] = (cfg.moe_num_experts, H)
            keys[f"{p}.mlp.moe_statics.e_score_correction_bias"] = (1, cfg.moe_num_experts)
            for e in range(cfg.moe_num_experts):
                mlp(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size, bias=False)
            if cfg.moe_num_shared_experts > 0:
                mlp(f"{p}.mlp.shared_experts", cfg.shared_intermediate_size, cfg.use_bias)
        else:
            mlp(f"{p}.mlp", cfg.intermediate_size, cfg.use_bias)
    keys["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        keys["lm_head.weight"] = (cfg.vocab_size, H)
    if cfg.use_bias:
        keys["lm_head.bias"] = (cfg.vocab_size,)
    return keys


# config.json fields that decide which tensors a checkpoint has, and their shapes.
_STRUCTURAL_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "moe_num_experts", "moe_intermediate_size", "moe_num_shared_experts",
    "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "tie_word_embeddings", "use_bias",
)


def fields_behind(cfg: ErnieMoeConfig, tensor: str) -> list[str]:
    """The config.json fields that decide whether `tensor` exists and what shape it has: those
    whose change (one up or down, or a flipped flag) changes it. Error messages name them, so
    that a config that contradicts the weights names the field as well as the tensor."""
    expected = expected_keys(cfg).get(tensor)
    found = []
    for name in _STRUCTURAL_FIELDS:
        value = getattr(cfg, name)
        for changed in ([not value] if isinstance(value, bool) else [value - 1, value + 1]):
            try:
                other = expected_keys(cfg.replace(**{name: changed})).get(tensor)
            except (ValueError, TypeError):
                continue  # the change makes no valid config
            if other != expected:
                found.append(f"{name}={value!r}")
                break
    return found


def _behind(cfg: ErnieMoeConfig, tensor: str) -> str:
    fields = fields_behind(cfg, tensor)
    return f" (config.json: {', '.join(fields)})" if fields else ""


def check_state_dict(cfg: ErnieMoeConfig, shapes: Mapping[str, torch.Tensor | tuple[int, ...]]) -> None:
    """Raise `CheckpointError` naming the first missing, extra or misshaped tensor.

    `shapes` maps names to tensors or to shapes, so a caller can check a checkpoint before
    reading its data.
    """
    expected = expected_keys(cfg)
    present = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    missing = [k for k in expected if k not in present]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing: expected shape {list(expected[missing[0]])}{_behind(cfg, missing[0])}"
            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + f"; config: {cfg.one_line()}"
        )
    extra = [k for k in present if k not in expected and IGNORED_KEY_FRAGMENT not in k]
    if extra:
        raise CheckpointError(
            f"tensor {extra[0]!r} is not part of the model described by config.json{_behind(cfg, extra[0])}"
            + (f" ({len(extra) - 1} more unexpected)" if len(extra) > 1 else "")
            + f"; config: {cfg.one_line()}"
        )
    for k, shape in expected.items():
        if present[k] != shape:
            raise CheckpointError(
                f"tensor {k!r} has shape {list(present[k])}: expected {list(shape)}{_behind(cfg, k)}; "
                f"config: {cfg.one_line()}"
            )


def read_config(path: str | Path) -> ErnieMoeConfig:
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: a checkpoint directory needs config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file} is not valid JSON: {e}") from e
    return ErnieMoeConfig.from_hf(raw)


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{index} names shard {f!r}, which is missing")
        return [path / f for f in files]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


class TensorReader(Mapping[str, torch.Tensor]):
    """A checkpoint directory as a read-only mapping: each tensor is read when it is looked up,
    so a caller holds one at a time instead of the whole checkpoint."""

    def __init__(self, path: str | Path):
        self._files = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype | str] = {}  # a dtype torch lacks stays safetensors' name
        for file in _weight_files(Path(path)):
            handle = safe_open(file, framework="pt")
            for name in handle.keys():
                self._files[name] = handle
                header = handle.get_slice(name)
                self.shapes[name] = tuple(header.get_shape())
                self.dtypes[name] = _SAFETENSORS_DTYPES.get(header.get_dtype(), header.get_dtype())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(name)
        return self._files[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs, one tensor in memory at a time."""
    yield from TensorReader(path).items()


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor, read from the safetensors headers only."""
    return TensorReader(path).shapes


def open_checkpoint(path: str | Path) -> tuple[ErnieMoeConfig, TensorReader]:
    """The config and a lazy reader of the tensors, after checking every name and shape against
    `expected_keys(config)` (from the safetensors headers, before reading any data)."""
    cfg = read_config(path)
    reader = TensorReader(path)
    check_state_dict(cfg, reader.shapes)
    return cfg, reader


def checkpoint_dtype(cfg: ErnieMoeConfig, dtypes: Mapping[str, torch.dtype | str]) -> torch.dtype:
    """The dtype of a checkpoint's model: one of `SUPPORTED_DTYPES`, shared by every tensor but the
    router's (`FP32_TENSOR_SUFFIXES`, always fp32), and the one config.json names if it names one.

    Raises `CheckpointError` naming the first tensor or field that breaks this: a checkpoint of
    mixed dtypes has no one dtype to convert in, and a bf16 router has lost what fp32 keeps.
    """
    model = {k: d for k, d in dtypes.items() if not k.endswith(FP32_TENSOR_SUFFIXES) and IGNORED_KEY_FRAGMENT not in k}
    if not model:
        raise CheckpointError("the checkpoint has no tensors")
    first, dtype = next(iter(model.items()))
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"tensor {first!r} is {dtype}: expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    for name, d in model.items():
        if d != dtype:
            raise CheckpointError(f"tensor {name!r} is {d}: expected {dtype}, the dtype of {first!r} "
                                  "(every tensor but the router's has one dtype)")
    for name, d in dtypes.items():
        if name.endswith(FP32_TENSOR_SUFFIXES) and d != torch.float32:
            raise CheckpointError(f"tensor {name!r} is {d}: expected torch.float32 (ERNIE 4.5 keeps the router "
                                  "weight and expert bias in fp32 whatever the dtype of the rest)")
    for key in ("dtype", "torch_dtype"):
        named = cfg.extra.get(key)
        if named is not None and named != str(dtype).removeprefix("torch."):
            raise CheckpointError(f"config.json {key} {named!r} contradicts the tensors, which are {dtype}")
    return dtype


def load_checkpoint(path: str | Path) -> tuple[ErnieMoeConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint directory; the tensors must be exactly those of `expected_keys(config)`."""
    cfg, reader = open_checkpoint(path)
    return cfg, {k: v for k, v in reader.items() if IGNORED_KEY_FRAGMENT not in k}


def save_checkpoint(
    path: str | Path,
    cfg: ErnieMoeConfig,
    state_dict: Mapping[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    fmt: CheckpointFormat = CheckpointFormat(),
) -> None:
    """Write config.json (spelled as `fmt` says) and the safetensors files (sharded with an index
    past `max_shard_bytes`). Tensors with "mtp" in their name are written as they are."""
    check_state_dict(cfg, state_dict)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for k, t in state_dict.items() if not k.endswith(FP32_TENSOR_SUFFIXES)}
    hf = fmt.config_json(cfg, str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None)
    (path / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    for stale in [*path.glob("model*.safetensors"), path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    # safetensors refuses views of shared storage (a tied lm_head) and non-contiguous tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def random_state_dict(cfg: ErnieMoeConfig, seed: int, dtype: torch.dtype = torch.float32,
                      mtp: bool = False) -> dict[str, torch.Tensor]:
    """Seeded weights at scales where every part of the math shows in the logits.

    transformers' init (zero expert bias, unit norm weights, tiny router) would hide bugs in
    exactly the places bridges get wrong, so:
    - the residual stream is kept small (embeddings and output projections ~0.02), so that
      `rms_norm_eps` changes the normalised values by far more than the comparison tolerance;
    - norm weights are drawn in [0.5, 1.5], so swapping two norms or dropping one shows;
    - router logits are O(1), so softmax probabilities spread, and the expert bias is of the
      order of the gaps between probabilities, so it changes which experts win for many tokens;
    - linear layers reading normalised input use 1/sqrt(fan_in), so activations stay O(1).
    With `mtp`, the published multi-token-prediction tensors follow (`mtp_keys`), drawn after the
    model's so that these are the same with or without them.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in {**expected_keys(cfg), **(mtp_keys(cfg) if mtp else {})}.items():
        state[name] = _random_tensor(name, shape, cfg, gen).to(
            torch.float32 if name.endswith(FP32_TENSOR_SUFFIXES) else dtype
        )
    return state


def _random_tensor(name: str, shape: tuple[int, ...], cfg: ErnieMoeConfig, gen: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 0.5 + torch.rand(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        # Of the order of the gaps between routing probabilities, which are ~1/E apart.
        return normal(0.5 / cfg.moe_num_experts)
    if name.endswith("mlp.gate.weight"):
        return normal(2.0 / math.sqrt(cfg.hidden_size))
    if name == "model.embed_tokens.weight":
        return normal(0.02)
    writes_residual = name.endswith(("o_proj.weight", "down_proj.weight"))
    if name.endswith(".bias"):
        return normal(0.005 if name.endswith(("o_proj.bias", "down_proj.bias")) else 0.1)
    fan_in = shape[-1]
    return normal((0.02 if writes_residual else 1.0) / math.sqrt(fan_in))


def random_checkpoint(
    cfg: ErnieMoeConfig,
    path: str | Path,
    seed: int,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    fmt: CheckpointFormat = CheckpointFormat(),
) -> dict[str, torch.Tensor]:
    """Write a seeded random checkpoint for `cfg` to `path`, in format `fmt`; returns the tensors written."""
    state = random_state_dict(cfg, seed, dtype, mtp=fmt.mtp)
    save_checkpoint(path, cfg, state, max_shard_bytes=max_shard_bytes, fmt=fmt)
    return state
