"""Findings: each distinct defect that a property reveals, with its trigger and smallest example.

A failing example says *that* a bridge is wrong; a finding says *what* is wrong and *when*. The
suite reduces a (shrunk) failing example to its **trigger**: it moves each coordinate of the
example (a config field, a layout dimension, the dtype, the input shape, the corruption) on its
own to other valid values, runs the property again, and keeps the coordinates whose change cures
the failure. A trigger reads in words (`moe_num_shared_experts = 0`, `rope_theta != 500000`,
`tp > 1`, `bf16 checkpoint`, `missing routed-expert tensor`). The MoE layer pattern is a
coordinate as a whole too (every layer from the start index to the last is MoE, or not), so that
a defect of the pattern reads as one trigger however the gap is made (`_pattern_conditions_to_drop`).

What "cures" means, exactly (`cure`): the moved example passes, or it fails later than the
original did (a divergence at a later stage, a crash in export instead of load). A moved example
that fails earlier or otherwise says nothing: that failure may hide this one (a crash on another
field's value, say), so the coordinate is not judged, and not kept. A cure must also hold under
other weights and inputs (`REDRAWS`): a move of a config field draws other weights, and a defect
that shows only for some weights (an expert bias ignored changes a token's choice only where the
bias outweighs the scores' gap) would otherwise be "cured" by whichever field was moved, and one
defect would read as many triggers.

A finding's **signature** is its kind of failure with what distinguishes one defect from another
of that kind: the exception and the call that raised it, or the first diverging stage. Its id is
the signature and the trigger's fields, not their values, so two failures with the same kind and
trigger are one finding, in one property or across several.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ernie_ref import CheckpointFormat, ErnieMoeConfig, expected_keys
from ernie_ref.checkpoint import omittable_keys
from ernie_ref.config import ConfigError
from ernie_ref.layout import Layout

from .cases import Case, Corruption
from .numerics import tolerance
from .properties import PropertyFailure
from .strategies import contradicting_changes, misshaped, plausible_extra_tensors

__all__ = ["Condition", "Trigger", "Finding", "signature", "cure", "isolate_trigger", "tensor_part", "MoveContext",
           "merge_findings", "finding_id", "same_defect", "Variant", "redraws", "REDRAWS",
           "UNJUDGED"]

# What running a moved example can give besides a PropertyFailure or the observed dict of a pass.
UNJUDGED = "unjudged"  # an ill-conditioned example, a config the bridge declares unsupported


# ------------------------------------------------------------------------------ signatures
def signature(failure: PropertyFailure) -> str:
    """The kind of failure and what tells one defect of that kind from another."""
    kind, facts = failure.kind, failure.facts
    if kind == "bridge raised":
        return f"{facts.get('call')} raises {facts.get('exception')}"
    if kind == "not loaded":
        return f"not loaded ({facts.get('how')})"
    if kind == "checkpoint differs":
        return f"export differs ({', '.join(facts.get('diff', []))})"
    if kind == "divergence":
        return f"diverges at {_ROUTING.get(facts.get('stage_kind'), facts.get('stage_kind'))}"
    if kind == "transformers cannot load":
        return f"transformers cannot load the export ({facts.get('exception')})"
    return kind  # "logits differ", "accepted corruption"


# How far a property got before it failed: its checks run in this order.
_CALL_ORDER = {"unsupported": 0, "load": 1, "forward": 3, "export": 4}
_KIND_ORDER = {"not loaded": 2, "divergence": 3, "checkpoint differs": 5, "transformers cannot load": 5,
               "accepted corruption": 5, "logits differ": 6}
# The router's choice and its weights are one stage: a wrong routing function changes the weights of
# every example but the choice only of some (by the weights drawn), so that a moved example shows
# the same defect at either.
_ROUTING = {"router choice": "routing", "router weights": "routing"}
_STAGE_ORDER = {"attention": 0, "layer kind": 1, "router choice": 2, "router weights": 2, "mlp": 4, "experts": 4}
_END = 10**6  # after every layer


def _stage_position(stage: str) -> tuple[int, int]:
    from .properties import stage_kind

    if stage_kind(stage) == "layer kind":  # the structure is compared before any number
        return (-2, int(re.match(r"layer (\d+) ", stage).group(1)))
    if stage == "embedding":
        return (-1, 0)
    if stage.startswith("decoder has"):
        return (_END, -1)
    if stage == "final norm":
        return (_END, 0)
    if stage == "output logits":
        return (_END, 1)
    match = re.match(r"layer (\d+) ", stage)
    return (int(match.group(1)) if match else _END, _STAGE_ORDER.get(stage_kind(stage), 5))


def progress(failure: PropertyFailure) -> tuple[int, int, int]:
    """How far the property got before `failure`; a later failure means the earlier check held."""
    if failure.kind == "bridge raised":
        return (_CALL_ORDER.get(failure.facts.get("call", ""), 1), 0, 0)
    if failure.kind == "divergence":
        return (_KIND_ORDER["divergence"], *_stage_position(failure.facts.get("stage", "")))
    if failure.kind == "checkpoint differs":  # files written at all, then their contents
        wrote_nothing = any(d.startswith("no ") for d in failure.facts.get("diff", []))
        return (_KIND_ORDER["checkpoint differs"], 0 if wrote_nothing else 1, 0)
    return (_KIND_ORDER.get(failure.kind, 5), 0, 0)


def cure(original: PropertyFailure, moved: Case, outcome: PropertyFailure | dict[str, Any] | str) -> bool | None:
    """Whether a moved example's `outcome` (a failure, the observed dict of a pass, or UNJUDGED)
    cures `original`: True, False, or None (cannot tell).

    A crash or a failed check is all or nothing: the moved example cures it when it passes or fails
    later in the property. A divergence is a size: an example may fail later, or pass, with the
    same error under the tolerance, so it is cured only where every stage up to the original's
    diverging stage is at rounding level (a tenth of the tolerance)."""
    if original.kind == "divergence":
        return _divergence_cured(original, moved, outcome)
    if isinstance(outcome, dict):
        return True
    if not isinstance(outcome, PropertyFailure):
        return None
    if signature(outcome) == signature(original):
        return False
    return True if progress(outcome) > progress(original) else None


def _divergence_cured(original: PropertyFailure, moved: Case, outcome: Any) -> bool | None:
    if isinstance(outcome, PropertyFailure) and signature(outcome) == signature(original):
        return False
    errors = (outcome.get("stage_errors") if isinstance(outcome, dict)
              else outcome.evidence.get("stage_errors") if isinstance(outcome, PropertyFailure) else None)
    if errors is None:
        return None  # a crash, or no trace: the stages were not seen
    noise = tolerance(moved.dtype).rtol / 10
    until = _stage_position(original.facts.get("stage", ""))
    for stage, error in errors:
        if _stage_position(stage) > until:
            continue
        if (error > 0) if ("router choice" in stage and ": " not in stage) else not error <= noise:
            return None  # still off before the original's stage, if within tolerance: cannot tell
    return True


# ------------------------------------------------------------------------------ triggers
@dataclass(frozen=True)
class Condition:
    """One coordinate of a trigger: `coordinate` `op` `value`, op "=" (the example's value) or "!="
    (anything but the value that cured it) or "not in" (anything but the values that cured it)."""

    coordinate: str
    op: str
    value: Any

    def matches(self, case: Case) -> bool:
        coordinate = COORDINATES[self.coordinate]
        actual = coordinate.value(case)
        if actual is None:
            return False
        if coordinate.holds is not None:
            return coordinate.holds(self.op, self.value, actual)
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        return actual not in self.value

    def words(self) -> str:
        return COORDINATES[self.coordinate].words(self.op, self.value)

    def to_json(self) -> dict[str, Any]:
        return {"coordinate": self.coordinate, "op": self.op, "value": self.value, "words": self.words()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Condition:
        return cls(d["coordinate"], d["op"], d["value"])


@dataclass(frozen=True)
class Trigger:
    """What a failure needs: every condition holds (no condition: any example)."""

    conditions: tuple[Condition, ...] = ()

    def matches(self, case: Case) -> bool:
        return all(c.matches(case) for c in self.conditions)

    @property
    def fields(self) -> list[str]:
        return sorted(c.coordinate for c in self.conditions)

    def words(self, stage_kind: str | None = None) -> str:
        parts = [c.words() for c in self.conditions if not c.coordinate.startswith("corrupt")]
        corruption = {c.coordinate: c for c in self.conditions if c.coordinate.startswith("corrupt")}
        if corruption:
            parts.append(_corruption_words(corruption))
        if parts:
            return " and ".join(parts)
        # No coordinate cures it: it happens on every example drawn, and every drawn config has an
        # MoE layer; say so where the failing stage is one of an MoE layer.
        return "any MoE layer" if stage_kind in ("router choice", "router weights", "experts") else "any example"


def _corruption_words(conditions: dict[str, Condition]) -> str:
    kind, part = conditions.get("corruption_kind"), conditions.get("corrupted_part")
    kinds = [kind.value] if kind is not None and kind.op == "=" else None
    if kind is not None and kind.op != "=":  # the kinds that did not cure it ("missing or extra")
        cured = kind.value if isinstance(kind.value, list) else [kind.value]
        kinds = [k for k in _CORRUPTION_ADJECTIVE if k not in cured]
        if "config" in kinds and len(kinds) > 1:
            return " and ".join(c.words() for c in conditions.values())
    noun = "config.json field" if kinds == ["config"] else "tensor"
    where = f"{part.value} " if part is not None and part.op == "=" else ""
    what = " or ".join(_CORRUPTION_ADJECTIVE.get(k, k) for k in kinds) if kinds else "corrupted"
    text = f"{what} {where}{noun}"
    if part is not None and part.op != "=":
        text += f" ({part.words()})"
    return text


_CORRUPTION_ADJECTIVE = {"missing": "missing", "extra": "extra", "misshaped": "misshaped", "config": "contradicting"}


# ------------------------------------------------------------------------------ coordinates
@dataclass(frozen=True)
class MoveContext:
    """What a moved example must stay within: the suite's layouts and dtypes, and the bridge's
    declared support (`unsupported`, reason or None)."""

    layouts: tuple[Layout, ...]
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class Coordinate:
    """A coordinate of an example: how to read it, the values to move it to, and how a condition
    on it reads. `reference`: the usual value (published configs, one rank, fp32), which a
    condition names with != when it alone cures."""

    name: str
    value: Callable[[Case], Any]
    moves: Callable[[Case, MoveContext], Iterator[tuple[Any, Case]]]
    words: Callable[[str, Any], str]
    reference: Callable[[Case], Any] = lambda case: None
    # Whether a condition (op, value) holds for an example's value, where that is not equality.
    holds: Callable[[str, Any, Any], bool] | None = None


def _config_moves(case: Case, changes: list[dict[str, Any]]) -> Iterator[Case]:
    """The example with each set of config changes, where the changed config is valid, keeps an
    MoE layer, fits the layout and is wide enough for the dtype."""
    for change in changes:
        try:
            cfg = case.config.replace(**change)
        except (ConfigError, TypeError, ValueError):
            continue
        if not cfg.moe_layers or case.layout.problem(cfg) is not None:
            continue
        if not tolerance(case.dtype).admits(cfg):
            continue
        corruption = _corruption_for(case.corruption, cfg)
        if case.corruption is not None and corruption is None:
            continue  # the corrupted tensor has no counterpart in the moved config
        yield replace(case, config=cfg, corruption=corruption, checkpoint_format=_format_for(case.checkpoint_format, cfg))


def _format_for(fmt: CheckpointFormat, cfg: ErnieMoeConfig) -> CheckpointFormat:
    """The same checkpoint format for a moved config, less the omitted keys that no longer hold
    transformers' default there (config.json must then spell them)."""
    allowed = omittable_keys(cfg)
    return replace(fmt, omitted=tuple(k for k in fmt.omitted if k in allowed))


def _format_flag(name: str, words: str) -> Coordinate:
    """A yes/no part of a drawn checkpoint's format, moved to no (the canonical format)."""

    def value(case: Case) -> Any:
        return getattr(case.checkpoint_format, name) if case.checkpoint is None else None

    def moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
        if getattr(case.checkpoint_format, name):
            yield False, replace(case, checkpoint_format=replace(case.checkpoint_format, **{name: False}))

    return Coordinate(name, value, moves, lambda op, v: words if (op == "=") == bool(v) else f"not {words}",
                      lambda case: False)


def _omitted_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    """Each omitted config.json key written out again."""
    fmt = case.checkpoint_format
    for key in fmt.omitted:
        yield key, replace(case, checkpoint_format=replace(fmt, omitted=tuple(k for k in fmt.omitted if k != key)))


def _omitted_named(value: Any) -> list[str]:
    """The keys whose omission an omitted-keys condition needs: its value is all omitted ones
    ("="), the one whose writing cured it ("!="), or those that did ("not in")."""
    return [value] if isinstance(value, str) else list(value)


def _omitted_holds(op: str, value: Any, omitted: Any) -> bool:
    return all(key in omitted for key in _omitted_named(value))


def _omitted_words(op: str, value: Any) -> str:
    return f"config.json omits {' and '.join(_omitted_named(value))} (transformers' default)"


def _corruption_for(corruption: Corruption | None, cfg: ErnieMoeConfig) -> Corruption | None:
    """The same corruption on a config moved elsewhere, rebuilt where its target or detail depends
    on the config (a misshaped tensor's shape, an extra tensor, a contradicting value)."""
    if corruption is None:
        return None
    keys = expected_keys(cfg)
    if corruption.kind in ("missing", "misshaped"):
        target = corruption.target if corruption.target in keys else _first_of_part(keys, tensor_part(corruption.target))
        if target is None:
            return None
        return Corruption(corruption.kind, target, "" if corruption.kind == "missing" else json.dumps(misshaped(keys[target], 0, 1)))
    if corruption.kind == "extra":
        plausible = plausible_extra_tensors(cfg)
        target = corruption.target if corruption.target in plausible else _first_of_part(plausible, tensor_part(corruption.target))
        return Corruption("extra", target, json.dumps(plausible[target])) if target else None
    changes = contradicting_changes(cfg)
    target = corruption.target if corruption.target in changes else sorted(changes)[0]
    return Corruption("config", target, json.dumps(changes[target]))


def _first_of_part(names: dict[str, Any], part: str) -> str | None:
    return next((n for n in sorted(names) if tensor_part(n) == part), None)


def _field(name: str, alternatives: Callable[[Case, Any], list[Any]], reference: Any = None,
           words: Callable[[str, Any], str] | None = None) -> Coordinate:
    """A config field moved to `alternatives(case, value)`."""

    def moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
        value = getattr(case.config, name)
        for alt in alternatives(case, value):
            if alt == value:
                continue
            for moved in _config_moves(case, [{name: alt}]):
                yield alt, moved

    return Coordinate(name, lambda case: getattr(case.config, name) if case.checkpoint is None else None, moves,
                      words or _plain_words(name), lambda case: reference)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(_show(v) for v in value) + "}"
    return str(value)


def _layers_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    cfg, stages = case.config, case.layout.pp * case.layout.vpp
    last = cfg.moe_layer_end_index == cfg.num_hidden_layers - 1
    for n in (cfg.num_hidden_layers + stages, cfg.num_hidden_layers - stages):
        if n < 1:
            continue
        # The end index keeps its place (the last layer, or before it): that is a coordinate of its own.
        end = n - 1 if last else min(cfg.moe_layer_end_index, n - 2)
        if end < 0:
            continue
        for moved in _config_moves(case, [{"num_hidden_layers": n, "moe_layer_end_index": end}]):
            yield n, moved


def _heads_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    """Query heads per key/value head, one more (or one fewer)."""
    cfg = case.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for g in (group + 1, group - 1):
        if g >= 1:
            for moved in _config_moves(case, [{"num_attention_heads": cfg.num_key_value_heads * g}]):
                yield cfg.num_key_value_heads * g, moved


def _kv_heads_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    cfg, tp = case.config, case.layout.tp
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for kv in (cfg.num_key_value_heads + tp, cfg.num_key_value_heads - tp):
        if kv >= 1:
            for moved in _config_moves(case, [{"num_key_value_heads": kv, "num_attention_heads": kv * group}]):
                yield kv, moved


# The MoE layer pattern as a whole: every layer from moe_layer_start_index to the last is MoE
# (CONTIGUOUS), or not (GAPPED: the end index stops early, or the interval skips layers). A bridge
# that builds the pattern from the start index alone fails exactly on GAPPED configs, however the gap
# is made; no single field's move shows that where two fields make gaps.
PATTERN_FIELDS = ("num_hidden_layers", "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")
CONTIGUOUS, GAPPED = "every layer from start to last", "not every layer from start to last"


def _pattern_value(case: Case) -> Any:
    if case.checkpoint is not None:
        return None
    cfg = case.config
    return CONTIGUOUS if cfg.moe_layers == list(range(cfg.moe_layer_start_index, cfg.num_hidden_layers)) else GAPPED


def _pattern_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    cfg = case.config
    last = cfg.num_hidden_layers - 1
    change = ({"moe_layer_end_index": last, "moe_layer_interval": 1} if _pattern_value(case) == GAPPED
              else {"moe_layer_end_index": last - 1})
    for moved in _config_moves(case, [change]):
        if _pattern_value(moved) != _pattern_value(case):
            yield _pattern_value(moved), moved


def _pattern_words(op: str, value: Any) -> str:
    gapped = (op == "=") == (value == GAPPED)
    return ("MoE layers not every layer from moe_layer_start_index to the last" if gapped
            else "MoE layers every layer from moe_layer_start_index to the last")


def _end_index_value(case: Case) -> Any:
    if case.checkpoint is not None:
        return None
    return "last" if case.config.moe_layer_end_index == case.config.num_hidden_layers - 1 else "before last"


def _end_index_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    cfg = case.config
    if cfg.moe_layer_end_index < cfg.num_hidden_layers - 1:
        for moved in _config_moves(case, [{"moe_layer_end_index": cfg.num_hidden_layers - 1}]):
            yield "last", moved
    elif cfg.num_hidden_layers > 1:
        for moved in _config_moves(case, [{"moe_layer_end_index": cfg.num_hidden_layers - 2}]):
            yield "before last", moved


def _end_index_words(op: str, value: Any) -> str:
    before = (op == "=") == (value == "before last")
    return "moe_layer_end_index < num_hidden_layers - 1" if before else "moe_layer_end_index = num_hidden_layers - 1"


# moe_k reads relative to the number of experts where it equals it: every expert chosen is where
# no routing defect (an expert bias dropped, scores mis-ranked) can change which experts a token
# gets, so a routing divergence reads "moe_k < moe_num_experts" on every config, not "moe_k != 4"
# on the configs of 4 experts.
EVERY_EXPERT = "moe_num_experts"


def _moe_k_value(case: Case) -> Any:
    if case.checkpoint is not None:
        return None
    return EVERY_EXPERT if case.config.moe_k == case.config.moe_num_experts else case.config.moe_k


def _moe_k_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    cfg = case.config
    for k in dict.fromkeys((cfg.moe_k + 1, cfg.moe_k - 1, cfg.moe_num_experts)):  # and to every expert
        if k != cfg.moe_k:
            for moved in _config_moves(case, [{"moe_k": k}]):
                yield _moe_k_value(moved), moved


def _moe_k_words(op: str, value: Any) -> str:
    if value == EVERY_EXPERT and op in ("=", "!="):
        return f"moe_k {'=' if op == '=' else '<'} moe_num_experts"
    return f"moe_k {op} {_show(value)}"


def _greater_words(name: str, reference: int) -> Callable[[str, Any], str]:
    def words(op: str, value: Any) -> str:
        if op == "!=" and value == reference:
            return f"{name} > {reference}"
        return f"{name} {op} {_show(value)}"

    return words


def _layout_coordinate(dim: str) -> Coordinate:
    def moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
        value = getattr(case.layout, dim)
        for alt in ([1] if value > 1 else [2]):
            sizes = {"tp": case.layout.tp, "pp": case.layout.pp, "ep": case.layout.ep, "vpp": case.layout.vpp, dim: alt}
            if sizes["pp"] == 1:
                sizes["vpp"] = 1
            try:
                layout = Layout(**sizes)
            except ValueError:
                continue
            if layout in ctx.layouts and layout.problem(case.config) is None:
                yield alt, replace(case, layout=layout)

    return Coordinate(dim, lambda case: getattr(case.layout, dim), moves, _greater_words(dim, 1), lambda case: 1)


def _dtype_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    if case.checkpoint is not None:
        return
    for dtype in ctx.dtypes:
        if dtype != case.dtype and tolerance(dtype).admits(case.config):
            yield dtype, replace(case, dtype=dtype)


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def _dtype_words(op: str, value: Any) -> str:
    if op == "=":
        return f"{_DTYPE_NAMES.get(value, value)} checkpoint"
    others = [d for d in _DTYPE_NAMES if d not in (value if isinstance(value, list) else [value])]
    return f"{_DTYPE_NAMES.get(others[0], others[0])} checkpoint" if len(others) == 1 else f"dtype {op} {_show(value)}"


def _inputs_coordinate(dim: str) -> Coordinate:
    def moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
        value = getattr(case.inputs, dim)
        alt = 1 if value > 1 else 2
        yield alt, replace(case, inputs=replace(case.inputs, **{dim: alt}))

    return Coordinate(dim, lambda case: getattr(case.inputs, dim), moves, _greater_words(dim, 1), lambda case: 1)


def tensor_part(name: str) -> str:
    """Which part of the model an HF tensor name belongs to, in words."""
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith("model.norm"):
        return "final-norm"
    for marker, part in ((".mlp.experts.", "routed-expert"), (".mlp.shared_experts.", "shared-expert"),
                         (".mlp.gate.", "router"), ("moe_statics", "expert-bias"), (".self_attn.", "attention"),
                         ("layernorm", "norm"), (".mlp.", "dense-MLP")):
        if marker in name:
            return part
    return "other"


def _corruption_part(case: Case) -> Any:
    if case.corruption is None:
        return None
    return "config" if case.corruption.kind == "config" else tensor_part(case.corruption.target)


def _corruption_kind_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    c, cfg = case.corruption, case.config
    if c is None:
        return
    keys = expected_keys(cfg)
    tensor = c.target if c.target in keys else sorted(keys)[0]
    candidates = {
        "missing": Corruption("missing", tensor),
        "misshaped": Corruption("misshaped", tensor, json.dumps(misshaped(keys[tensor], 0, 1))),
    }
    if case.checkpoint is None:
        extra = plausible_extra_tensors(cfg)
        name = _first_of_part(extra, tensor_part(c.target)) or sorted(extra)[0]
        candidates["extra"] = Corruption("extra", name, json.dumps(extra[name]))
    changes = contradicting_changes(cfg)
    first = sorted(changes)[0]
    candidates["config"] = Corruption("config", first, json.dumps(changes[first]))
    for kind, corruption in candidates.items():
        if kind != c.kind:
            yield kind, replace(case, corruption=corruption)


def _corruption_part_moves(case: Case, ctx: MoveContext) -> Iterator[tuple[Any, Case]]:
    """The same kind of corruption on up to three other parts of the model (or config fields)."""
    c, cfg = case.corruption, case.config
    if c is None:
        return
    if c.kind == "config":
        return  # every contradicting field is "config": the part coordinate does not apply
    names: dict[str, Any] = plausible_extra_tensors(cfg) if c.kind == "extra" else dict(expected_keys(cfg))
    by_part: dict[str, str] = {}
    for name in sorted(names):
        by_part.setdefault(tensor_part(name), name)
    here = tensor_part(c.target)
    for part, name in list((p, n) for p, n in by_part.items() if p != here)[:3]:
        detail = {"missing": "", "extra": json.dumps(names[name]),
                  "misshaped": json.dumps(misshaped(tuple(names[name]), 0, 1))}[c.kind]
        yield part, replace(case, corruption=Corruption(c.kind, name, detail))


def _plain_words(name: str) -> Callable[[str, Any], str]:
    return lambda op, value: f"{name} {op} {_show(value)}"


def _coordinates() -> dict[str, Coordinate]:
    def plus(step: Callable[[Case], int]) -> Callable[[Case, Any], list[Any]]:
        return lambda case, v: [v + step(case)]

    tp = lambda case: case.layout.tp  # noqa: E731 - widths stay multiples of tp
    ep = lambda case: case.layout.ep  # noqa: E731
    coordinates = [
        Coordinate("num_hidden_layers", lambda case: case.config.num_hidden_layers if case.checkpoint is None else None,
                   _layers_moves, _plain_words("num_hidden_layers")),
        _field("hidden_size", plus(lambda case: 2)),
        Coordinate("num_key_value_heads", lambda case: case.config.num_key_value_heads if case.checkpoint is None else None,
                   _kv_heads_moves, _plain_words("num_key_value_heads")),
        Coordinate("num_attention_heads", lambda case: case.config.num_attention_heads if case.checkpoint is None else None,
                   _heads_moves, _plain_words("num_attention_heads")),
        _field("head_dim", lambda case, v: [v + 2, v - 2]),
        _field("intermediate_size", plus(tp)),
        _field("vocab_size", plus(tp)),
        _field("moe_num_experts", plus(ep)),
        Coordinate("moe_k", _moe_k_value, _moe_k_moves, _moe_k_words),
        _field("moe_intermediate_size", plus(tp)),
        _field("moe_num_shared_experts", lambda case, v: [0, 1, 2]),
        _field("tie_word_embeddings", lambda case, v: [not v]),
        _field("use_bias", lambda case, v: [not v]),
        _field("rms_norm_eps", lambda case, v: [1e-5 if v != 1e-5 else 1e-6, v * 2], reference=1e-5),
        _field("rope_theta", lambda case, v: [500000.0 if v != 500000.0 else 10000.0, v * 2], reference=500000.0),
        _field("moe_norm_min", lambda case, v: [1e-12 if v != 1e-12 else 0.5, v * 2], reference=1e-12),
        _field("moe_layer_start_index", lambda case, v: [v + 1, v - 1], reference=0,
               words=_greater_words("moe_layer_start_index", 0)),
        Coordinate("moe_layer_end_index", _end_index_value, _end_index_moves, _end_index_words,
                   lambda case: "last"),
        _field("moe_layer_interval", lambda case, v: [1] if v > 1 else [2], reference=1,
               words=_greater_words("moe_layer_interval", 1)),
        Coordinate("moe_layer_pattern", _pattern_value, _pattern_moves, _pattern_words, lambda case: CONTIGUOUS),
        *(_layout_coordinate(dim) for dim in ("tp", "pp", "ep", "vpp")),
        Coordinate("dtype", lambda case: case.dtype, _dtype_moves, _dtype_words, lambda case: "float32"),
        Coordinate("omitted_keys", lambda case: case.checkpoint_format.omitted if case.checkpoint is None else None,
                   _omitted_moves, _omitted_words, holds=_omitted_holds),
        _format_flag("legacy_rope_theta", "legacy top-level rope_theta (no rope_parameters)"),
        _format_flag("published_extra_keys", "published extra config keys (moe_capacity, moe_gate, auto_map, ...)"),
        _format_flag("mtp", "MTP tensors in the checkpoint"),
        _inputs_coordinate("batch"),
        _inputs_coordinate("seq_len"),
        Coordinate("corruption_kind", lambda case: case.corruption.kind if case.corruption else None,
                   _corruption_kind_moves, _plain_words("corruption")),
        Coordinate("corrupted_part", _corruption_part, _corruption_part_moves, _plain_words("corrupted part")),
    ]
    return {c.name: c for c in coordinates}


COORDINATES = _coordinates()


def decide(coordinate: Coordinate, case: Case, judged: list[tuple[Any, bool]]) -> Condition | None:
    """The condition on `coordinate` that the failure needs, from the moves that could be judged
    (value moved to, cured?): none if no move cures it; `= value` if every move cures it (unless
    the one move was to the reference value: then `!= reference`); `!= v` if only the move to v
    cures it; `not in` the curing values otherwise."""
    cured = [alt for alt, c in judged if c]
    if not cured:
        return None
    value = coordinate.value(case)
    reference = coordinate.reference(case)
    if len(cured) == len(judged) and not (len(judged) == 1 and reference is not None and cured[0] == reference):
        return Condition(coordinate.name, "=", value)
    if len(cured) == 1:
        return Condition(coordinate.name, "!=", cured[0])
    return Condition(coordinate.name, "not in", sorted(cured, key=str))


# Other weights and inputs under which a moved example's cure must hold too (see the module's
# docstring). A defect that shows in a fraction q of draws survives as a chance cure with
# probability (1 - q) ** (REDRAWS + 1) per curing move: 1 in 32 at q = 1/2, 1 in 243 at q = 2/3.
REDRAWS = 4


def redraws(case: Case) -> list[Case]:
    """`case` with other weights (a drawn checkpoint's seed; a user's checkpoint keeps its own)
    and other inputs of the same shape, REDRAWS of them, the same every time."""
    def seed(base: int | None, i: int) -> int | None:
        return None if base is None else (base + i) % 2**31

    return [replace(case, weights_seed=seed(case.weights_seed, i),
                    inputs=replace(case.inputs, seed=seed(case.inputs.seed, i)))
            for i in range(1, REDRAWS + 1)]


def isolate_trigger(failure: PropertyFailure, ctx: MoveContext,
                    run: Callable[[Case], PropertyFailure | str]) -> tuple[Trigger, int]:
    """The trigger of `failure` (see the module's docstring) and how many moved examples ran.
    `run(case)` runs the property on a moved example: what it observed (a pass), UNJUDGED or its
    PropertyFailure."""
    case, runs = failure.case, 0
    conditions: dict[str, Condition] = {}
    # Moves of a layer-pattern field that cured and also closed the pattern's gaps
    # (see `_pattern_conditions_to_drop`).
    closing: dict[str, list[Case]] = {}
    gapped = _pattern_value(case) == GAPPED

    def judge(moved: Case) -> bool | None:
        nonlocal runs
        runs += 1
        verdict = cure(failure, moved, run(moved))
        if not verdict:
            return verdict
        for other in redraws(moved):  # cured by the move, or by the weights it drew?
            runs += 1
            if cure(failure, other, run(other)) is False:
                return False
        return True

    for coordinate in COORDINATES.values():
        if coordinate.value(case) is None:
            continue
        judged = []
        for alt, moved in coordinate.moves(case, ctx):
            verdict = judge(moved)
            if verdict and gapped and coordinate.name in PATTERN_FIELDS and _pattern_value(moved) == CONTIGUOUS:
                closing.setdefault(coordinate.name, []).append(moved)
            if verdict is not None:
                judged.append((alt, verdict))
        condition = decide(coordinate, case, judged)
        if condition is not None:
            conditions[coordinate.name] = condition
    if "moe_layer_pattern" in conditions:
        for name in _pattern_conditions_to_drop(closing, judge):
            conditions.pop(name, None)
    return Trigger(tuple(conditions.values())), runs


def _pattern_conditions_to_drop(closing: dict[str, list[Case]], judge: Callable[[Case], bool | None]) -> list[str]:
    """Which conditions to drop when the failure needs the MoE layer pattern to have gaps.

    A move of one pattern field (the end index to the last layer, the interval to 1, ...) that
    cures may cure because of that field, or only because it also closed the pattern's gaps. Probe
    each such field at its curing value with a gap made by another field: if a probe still fails,
    the field was incidental and the gap is the trigger; if every field's probe is cured, the
    fields are the trigger and the gap condition (which they imply) is dropped."""
    incidental, specific = [], []
    for name, moves in closing.items():
        probes = [probe for moved in moves if (probe := _gap_elsewhere(moved, name)) is not None]
        verdicts = [v for v in map(judge, probes) if v is not None]
        (specific if verdicts and all(verdicts) else incidental).append(name)
    return incidental + (["moe_layer_pattern"] if specific else [])


def _gap_elsewhere(moved: Case, name: str) -> Case | None:
    """`moved` with a gap in its MoE layer pattern made by a field other than `name` (None if no
    valid example has one)."""
    last = moved.config.num_hidden_layers - 1
    field = COORDINATES[name]
    for change in ({"moe_layer_end_index": last - 1}, {"moe_layer_interval": 2, "moe_layer_end_index": last}):
        for probe in _config_moves(moved, [change]):
            if _pattern_value(probe) == GAPPED and field.value(probe) == field.value(moved):
                return probe
    return None


# ------------------------------------------------------------------------------ findings
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Variant:
    """One way a finding shows: its signature and trigger."""

    signature: str
    trigger: Trigger
    stage_kind: str | None = None

    def words(self) -> str:
        return self.trigger.words(self.stage_kind)


@dataclass
class Finding:
    """One distinct defect: its id, what fails, when (`trigger`; `variants` for more ways the same
    defect shows, see `same_defect`), the property that found it, its smallest example, and how
    many examples hit it."""

    prop: str
    signature: str
    kind: str
    facts: dict[str, Any]
    trigger: Trigger | None  # None: not isolated (--no-triggers)
    message: str  # the shrunk example's failure, in the property's words
    variants: list[Variant] = field(default_factory=list)
    counterexample: str | None = None  # file
    report: str = ""  # the smallest example's whole failure: detail, example, the bridge's traceback
    hits: int = 0
    isolation_runs: int = 0

    @property
    def id(self) -> str:
        return finding_id(self.signature, self.trigger)

    def _all(self) -> list[Variant]:
        return [Variant(self.signature, self.trigger or Trigger(), self.facts.get("stage_kind")), *self.variants]

    def covers(self, failure: PropertyFailure) -> bool:
        """Whether `failure` is this defect again: a signature of it, on an example that the
        trigger of that signature matches."""
        sig = signature(failure)
        return any(v.signature == sig and v.trigger.matches(failure.case) for v in self._all())

    def when(self) -> str:
        if self.trigger is None:
            return "(trigger not isolated)"
        words = self._all()[0].words()
        others = [f"{v.words()} ({v.signature})" if v.signature != self.signature else v.words() for v in self.variants]
        return words + "".join(f"; also {o}" for o in others)

    @property
    def summary(self) -> str:
        return f"{_what(self.prop, self.kind, self.facts)} when {self.when()}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "property": self.prop, "summary": self.summary, "what": _what(self.prop, self.kind, self.facts),
            "signature": self.signature,
            "kind": self.kind, "facts": self.facts, "when": self.when(),
            "trigger": None if self.trigger is None else [c.to_json() for c in self.trigger.conditions],
            "variants": [{"signature": v.signature, "trigger": [c.to_json() for c in v.trigger.conditions]}
                         for v in self.variants],
            "message": self.message, "counterexample": self.counterexample, "hits": self.hits,
            "isolation_runs": self.isolation_runs,
        }


def same_defect(finding: Finding, sig: str, trigger: Trigger, prop: str) -> bool:
    """Whether a new (signature, trigger) is one more way `finding` shows: the same id, or, in the
    same property, nested non-empty trigger fields with the same signature (a trigger isolated on
    one example can need one more coordinate than on another: the bf16 router's error shows in
    the logits only where moe_k > 1) or, for divergences, at another stage (a defect whose error is
    near the tolerance shows first at one stage or at a later one, by the config: rope_theta
    ignored diverges first at attention, or at the experts where attention's error is small)."""
    if finding.trigger is None:
        return False
    if finding_id(sig, trigger) == finding.id:
        return True
    if prop != finding.prop:
        return False
    if sig != finding.signature and not (finding.kind == "divergence" and sig.startswith("diverges at")):
        return False
    ours, theirs = set(finding.trigger.fields), set(trigger.fields)
    return bool(ours) and bool(theirs) and (ours <= theirs or theirs <= ours)


def finding_id(sig: str, trigger: Trigger | None) -> str:
    if trigger is None:
        return f"{_slug(sig)}@not-isolated"
    return f"{_slug(sig)}@{'+'.join(trigger.fields) or 'any'}"


def _what(prop: str, kind: str, facts: dict[str, Any]) -> str:
    """What goes wrong, in words."""
    if kind == "bridge raised":
        return f"{facts.get('call')} raises {facts.get('exception')}"
    if kind == "not loaded":
        return f"a parameter is not loaded from the checkpoint ({facts.get('how')}: {facts.get('tensor')})"
    if kind == "checkpoint differs":
        names = facts.get("names", [])
        return (f"the export differs from the checkpoint ({', '.join(facts.get('diff', []))}: "
                f"{', '.join(names[:2])}{' ...' if len(names) > 2 else ''})")
    if kind == "divergence":
        stage = facts.get("stage_kind")
        routing = f"routing ({stage})" if stage in _ROUTING else stage
        return f"the model diverges from the oracle, first at {routing}"
    if kind == "transformers cannot load":
        return f"transformers cannot load the export ({facts.get('exception')})"
    if kind == "logits differ":
        return "transformers on the export gives other logits than the oracle"
    return "load accepts a corrupt checkpoint"


def merge_findings(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per finding id over the results of a session's tests (each result's
    record["findings"]), in the order first found: the properties that hit it, with the examples
    that hit it and the counterexample of each."""
    merged: dict[str, dict[str, Any]] = {}
    for result in results:
        for found in result.get("record", {}).get("findings", []):
            entry = merged.setdefault(found["id"], {**found, "properties": [], "hits": {}, "counterexamples": {}})
            entry["properties"].append(found["property"])
            entry["hits"][found["property"]] = found["hits"]
            entry["counterexamples"][found["property"]] = found["counterexample"]
    return list(merged.values())
