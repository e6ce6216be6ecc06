"""`ErnieMoeConfig`: every field of an ERNIE 4.5 MoE `config.json` that changes the forward pass.

The parsing rules follow transformers' `Ernie4_5_MoeConfig` (5.x): the same defaults for the
fields real checkpoints omit, the same aliases, and `moe_layer_end_index == -1` meaning the last
layer. What transformers would accept but compute something else for (a rope type other than
"default", an activation other than SiLU) is refused here, and every impossible value raises a
`ValueError` that names the field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ErnieMoeConfig", "ConfigError", "TRANSFORMERS_DEFAULTS"]


class ConfigError(ValueError):
    """A `config.json` that does not describe a valid ERNIE 4.5 MoE model."""


# Keys that real config.json files may omit, with transformers' defaults for them. Applying a
# default is recorded in `ErnieMoeConfig.defaulted` so that a report can show it.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_bias": False,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": -1,
    "moe_layer_interval": 1,
    "moe_norm_min": 1e-12,
}

# transformers' `attribute_map`: alternative spellings of two fields.
_ALIASES = {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"}

# Keys that this class writes itself in `to_hf`; the rest of an input dict is kept as `extra`.
_OWN_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters",
    "rope_scaling", "tie_word_embeddings", "use_bias", "moe_num_experts", "moe_k",
    "moe_num_shared_experts", "moe_intermediate_size", "moe_layer_start_index",
    "moe_layer_end_index", "moe_layer_interval", "moe_norm_min", "hidden_act", "model_type",
    "architectures", *_ALIASES,
}

MODEL_TYPE = "ernie4_5_moe"
ARCHITECTURE = "Ernie4_5_MoeForCausalLM"


@dataclass(frozen=True)
class ErnieMoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the dense (non-MoE) MLP
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # resolved: hidden_size // num_attention_heads when config.json has none
    moe_num_experts: int
    moe_k: int
    moe_intermediate_size: int  # width of one routed expert
    rms_norm_eps: float = TRANSFORMERS_DEFAULTS["rms_norm_eps"]
    rope_theta: float = TRANSFORMERS_DEFAULTS["rope_theta"]
    tie_word_embeddings: bool = TRANSFORMERS_DEFAULTS["tie_word_embeddings"]
    use_bias: bool = TRANSFORMERS_DEFAULTS["use_bias"]
    moe_num_shared_experts: int = TRANSFORMERS_DEFAULTS["moe_num_shared_experts"]
    moe_layer_start_index: int = TRANSFORMERS_DEFAULTS["moe_layer_start_index"]
    moe_layer_end_index: int = TRANSFORMERS_DEFAULTS["moe_layer_end_index"]  # resolved: never -1
    moe_layer_interval: int = TRANSFORMERS_DEFAULTS["moe_layer_interval"]
    moe_norm_min: float = TRANSFORMERS_DEFAULTS["moe_norm_min"]
    # Keys of config.json that do not change the forward pass (token ids, dtype, ...): kept so
    # that `to_hf` writes them back, and left out of equality.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Names of the fields that config.json omitted and that took transformers' default.
    defaulted: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.moe_layer_end_index == -1:
            object.__setattr__(self, "moe_layer_end_index", self.num_hidden_layers - 1)
        self._validate()
        for name in ("rms_norm_eps", "rope_theta", "moe_norm_min"):  # JSON may spell 500000 as an int
            object.__setattr__(self, name, float(getattr(self, name)))

    # ------------------------------------------------------------------ layer pattern
    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: layer i is MoE iff (i + 1) % interval == 0 and start <= i <= end."""
        return (
            (i + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        )

    @property
    def layer_types(self) -> list[str]:
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the shared-expert MLP; 0 means there is none."""
        return self.moe_intermediate_size * self.moe_num_shared_experts

    # ------------------------------------------------------------------ HF dicts
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ErnieMoeConfig:
        """Parse a `config.json` dict. Raises `ConfigError` naming the field on bad input."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        for alias, name in _ALIASES.items():
            if alias in d:
                if name in d and d[name] != d[alias]:
                    raise ConfigError(
                        f"config field {name!r}={d[name]!r} contradicts its alias {alias!r}={d[alias]!r}"
                    )
                d.setdefault(name, d[alias])
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"config field 'model_type'={d['model_type']!r}: expected {MODEL_TYPE!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act'={d['hidden_act']!r}: only 'silu' is supported")

        values: dict[str, Any] = {"rope_theta": _rope_theta(d)}
        defaulted = [] if values["rope_theta"] is not None else ["rope_theta"]
        if values["rope_theta"] is None:
            values["rope_theta"] = TRANSFORMERS_DEFAULTS["rope_theta"]
        for f in dataclasses.fields(cls):
            if f.name in ("extra", "defaulted", "rope_theta"):
                continue
            if f.name in d and d[f.name] is not None:
                values[f.name] = d[f.name]
            elif f.name == "head_dim":
                heads = _positive_int("num_attention_heads", d.get("num_attention_heads"))
                values["head_dim"] = _positive_int("hidden_size", d.get("hidden_size")) // heads
            elif f.name in TRANSFORMERS_DEFAULTS:
                values[f.name] = TRANSFORMERS_DEFAULTS[f.name]
                defaulted.append(f.name)
            else:
                raise ConfigError(f"config field {f.name!r} is missing: it is required")
        extra = {k: v for k, v in d.items() if k not in _OWN_KEYS}
        return cls(**values, extra=extra, defaulted=tuple(sorted(defaulted)))

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' `Ernie4_5_MoeConfig` reads back to this config."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=[ARCHITECTURE],
            model_type=MODEL_TYPE,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "defaulted", "rope_theta"):
                d[f.name] = getattr(self, f.name)
        return d

    def replace(self, **changes: Any) -> ErnieMoeConfig:
        """A copy with some fields changed (validated again); `extra` is kept."""
        return dataclasses.replace(self, **changes)

    def one_line(self) -> str:
        """The config in one line, for failure messages and reports."""
        shared = self.moe_num_shared_experts
        return (
            f"L={self.num_hidden_layers} types={''.join('M' if t == 'moe' else 'd' for t in self.layer_types)} "
            f"H={self.hidden_size} heads={self.num_attention_heads}/{self.num_key_value_heads} "
            f"head_dim={self.head_dim} ffn={self.intermediate_size} V={self.vocab_size} "
            f"E={self.moe_num_experts} k={self.moe_k} moe_ffn={self.moe_intermediate_size} "
            f"shared={shared} moe[{self.moe_layer_start_index}:{self.moe_layer_end_index}"
            f"/{self.moe_layer_interval}] tie={self.tie_word_embeddings} bias={self.use_bias} "
            f"theta={self.rope_theta:g} eps={self.rms_norm_eps:g} norm_min={self.moe_norm_min:g}"
        )

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "moe_num_experts",
            "moe_k", "moe_intermediate_size", "moe_layer_interval",
        ):
            _positive_int(name, getattr(self, name))
        for name in ("moe_num_shared_experts", "moe_layer_start_index"):
            _int(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ConfigError(f"config field {name!r}={getattr(self, name)!r}: expected >= 0")
        _int("moe_layer_end_index", self.moe_layer_end_index)
        if not 0 <= self.moe_layer_end_index < self.num_hidden_layers:
            raise ConfigError(
                f"config field 'moe_layer_end_index'={self.moe_layer_end_index!r}: expected -1 or a "
                f"layer index in [0, {self.num_hidden_layers - 1}]"
            )
        for name in ("rms_norm_eps", "rope_theta", "moe_norm_min"):
            _positive_float(name, getattr(self, name))
        for name in ("tie_word_embeddings", "use_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name!r}={getattr(self, name)!r}: expected true or false")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads'={self.num_key_value_heads}: must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.moe_k > self.moe_num_experts:
            raise ConfigError(
                f"config field 'moe_k'={self.moe_k}: must be at most moe_num_experts={self.moe_num_experts}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim'={self.head_dim}: rotary embedding needs an even head_dim")


def _rope_theta(d: dict[str, Any]) -> float | None:
    """rope theta from `rope_parameters` (transformers 5) or the legacy top-level `rope_theta`."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(f"config field {key!r}={block!r}: expected an object")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"config field '{key}.rope_type'={rope_type!r}: only the 'default' rope type is supported"
            )
    theta = params.get("rope_theta") if params else None
    legacy = d.get("rope_theta")
    if theta is not None and legacy is not None and theta != legacy:
        raise ConfigError(
            f"config field 'rope_parameters.rope_theta'={theta!r} contradicts 'rope_theta'={legacy!r}"
        )
    return theta if theta is not None else legacy


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field {name!r}={value!r}: expected an integer")
    return value


def _positive_int(name: str, value: Any) -> int:
    if value is None:
        raise ConfigError(f"config field {name!r} is missing: it is required")
    if _int(name, value) <= 0:
        raise ConfigError(f"config field {name!r}={value!r}: expected a positive integer")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config field {name!r}={value!r}: expected a positive finite number")
    return value
