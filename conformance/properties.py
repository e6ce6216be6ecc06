"""The conformance properties, as plain functions of (bridge, case, working directory).

Each raises `PropertyFailure` with a message that can be read without the test: the property,
the config in one line, the seeds and layout, and the first tensor or layer that differs with
its error. The pytest modules of the suite (`conformance/suite/`) draw cases and call these.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ernie_ref import ErnieMoeConfig, ErnieMoeForCausalLM, Trace, random_checkpoint
from ernie_ref.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, TensorReader, iter_tensors, read_config, tensor_shapes

from .bridge import Bridge, BridgeError, on_ranks
from .cases import Case, Corruption
from .distributed import HUNG_EXCEPTION, INIT_SEEDS, refusal_errors, run_on_ranks
from .hf_transformers import load_transformers_model, run_transformers
from .megatron_trace import merge_traces
from .numerics import FP32_RTOL, NearTieFollower, Tolerance, relative_error, tolerance

__all__ = [
    "PropertyFailure",
    "SetAside",
    "IllConditioned",
    "StructureRefused",
    "check_published_structure",
    "PROPERTIES",
    "FAILURE_KINDS",
    "prepare_checkpoint",
    "run_property",
    "stage_errors",
    "stage_kind",
    "check_import",
    "check_round_trip",
    "check_equivalence",
    "check_interop",
    "check_refusal",
    "corrupt_checkpoint",
    "diff_checkpoints",
]

# What a failure can be, for reports and for meta-tests that check a mutant died for its bug.
# Each PropertyFailure has one `kind` and `facts` that say more (see PropertyFailure).
FAILURE_KINDS = (
    "bridge raised",             # load, export or the model's forward raised on a valid checkpoint
    "not loaded",                # import: a tensor kept its initial value, or holds other values
    "checkpoint differs",        # round_trip: the export is not the checkpoint
    "divergence",                # equivalence: a stage of the forward differs from the oracle
    "transformers cannot load",  # interop
    "logits differ",             # interop
    "accepted corruption",       # refusal
)


class PropertyFailure(AssertionError):
    """A property does not hold for `case`.

    `kind` (one of FAILURE_KINDS) and `facts` say what failed in a form a program can check:
    the bridge call and exception type, the first diverging stage, the tensors or fields that
    differ, the corruption accepted. `evidence` carries what localises it for reports (stage
    errors, the checkpoint diff, the bridge's traceback); `replay` is the command that
    reproduces it, once saved."""

    def __init__(self, prop: str, case: Case, detail: str, kind: str, facts: dict[str, Any] | None = None,
                 evidence: dict | None = None, replay: str | None = None):
        assert kind in FAILURE_KINDS, kind
        self.prop, self.case, self.detail, self.kind = prop, case, detail, kind
        self.facts, self.evidence, self.replay = dict(facts or {}), dict(evidence or {}), replay
        message = f"[{prop}] {detail}\n  {case.describe()}"
        if replay:
            message += f"\n  reproduce with: {replay}"
        if "traceback" in self.evidence:
            message += "\n  the bridge's traceback:\n" + _indent(self.evidence["traceback"])
        super().__init__(message)

    def with_replay(self, command: str) -> PropertyFailure:
        return PropertyFailure(self.prop, self.case, self.detail, self.kind, self.facts, self.evidence, command)

    def with_detail(self, detail: str) -> PropertyFailure:
        return PropertyFailure(self.prop, self.case, detail, self.kind, self.facts, self.evidence, self.replay)


def _indent(text: str, limit: int = 40) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) > limit:
        lines = [f"... ({len(lines) - limit} lines above)"] + lines[-limit:]
    return "\n".join("    " + line for line in lines)


class StructureRefused(AssertionError):
    """The bridge declares a published ERNIE 4.5 structure unsupported (`structure`, `reason`)."""

    def __init__(self, structure: str, reason: str, config_line: str):
        self.structure, self.reason = structure, reason
        super().__init__(f"[published] the bridge declares {structure} unsupported: {reason}\n  config: {config_line}")


def check_published_structure(bridge: Bridge, structure: str) -> None:
    """The bridge does not declare the published structure `structure` unsupported."""
    from ernie_ref.published import published_config

    cfg = published_config(structure)
    reason = bridge.unsupported(cfg)
    if reason is not None:
        raise StructureRefused(structure, reason, cfg.one_line())


class SetAside(Exception):
    """The example says nothing about the bridge: the oracle's own result is not sharp enough to
    judge it. Counted (by `reason`), never a failure and never a valid example."""

    reason = ""


class IllConditioned(SetAside):
    """The example amplifies fp32 rounding so much that a right fp32 bridge may differ from the
    fp32 oracle by more than the tolerance (numerics.FP32_CONDITION_SHARE)."""

    reason = "ill-conditioned"


PROPERTIES = ("import", "round_trip", "equivalence", "interop", "refusal")


def prepare_checkpoint(case: Case, workdir: Path) -> Path:
    """The checkpoint directory the example runs on: a seeded random one written into `workdir` in
    the case's checkpoint format, or the user's own. For a corrupted user checkpoint, a copy of config.json beside links to its
    weight files, so that a config corruption never touches the original."""
    if case.checkpoint is None:
        hf = workdir / "hf"
        random_checkpoint(case.config, hf, seed=case.weights_seed, dtype=getattr(torch, case.dtype),
                          fmt=case.checkpoint_format)
        return hf
    source = Path(case.checkpoint)
    if case.corruption is None:
        return source
    hf = workdir / "hf"
    hf.mkdir(parents=True)
    for f in source.iterdir():
        if f.name == CONFIG_NAME:
            shutil.copy(f, hf / f.name)
        else:
            (hf / f.name).symlink_to(f.resolve())
    return hf


def run_property(prop: str, bridge: Bridge, case: Case) -> dict[str, Any]:
    """Run one property on one case in a scratch directory.

    Returns what the example observed beyond passing (the refusal property: whether the error
    named the corruption). Raises PropertyFailure when the property does not hold, SetAside when
    the example cannot judge the bridge (an ill-conditioned example); any other
    exception is an error of the suite, not of the bridge.
    """
    if prop not in PROPERTIES:
        raise ValueError(f"unknown property {prop!r}: expected one of {', '.join(PROPERTIES)}")
    with tempfile.TemporaryDirectory(prefix="ernie-conformance-") as root:
        workdir = Path(root)
        hf = prepare_checkpoint(case, workdir)
        try:
            return _run_checks(prop, bridge, case, hf, workdir / "export") or {}
        except BridgeError as e:
            failure = _bridge_raised(prop, case, e, f"the bridge raised {e.exception} in {e.call}{on_ranks(e.ranks)} "
                                                   f"on a valid checkpoint: {_last_line(e.message)}")
            raise _without_scratch(failure, workdir) from e
        except PropertyFailure as failure:
            raise _without_scratch(failure, workdir) from failure.__cause__


def _bridge_raised(prop: str, case: Case, error: BridgeError, detail: str) -> PropertyFailure:
    """The failure of `prop` that the bridge's own `error` is, described by `detail`."""
    return PropertyFailure(prop, case, detail, kind="bridge raised",
                           facts={"call": error.call, "exception": error.exception},
                           evidence={"traceback": error.traceback_text})


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _without_scratch(failure: PropertyFailure, workdir: Path) -> PropertyFailure:
    """The failure with the example's scratch directory written as <scratch>: it is gone when the
    example ends, and a saved counterexample must not name one machine's temporary paths."""
    pattern = re.compile(re.escape(str(workdir)) + "|" + re.escape(str(workdir.resolve())))
    detail = pattern.sub("<scratch>", failure.detail)
    if "traceback" in failure.evidence:
        failure.evidence["traceback"] = pattern.sub("<scratch>", failure.evidence["traceback"])
    return failure.with_detail(detail)


def _run_checks(prop: str, bridge: Bridge, case: Case, hf: Path, out: Path) -> dict[str, Any] | None:
    if prop == "import":
        return check_import(bridge, case, hf)
    if prop == "round_trip":
        return check_round_trip(bridge, case, hf, out)
    if prop == "equivalence":
        return check_equivalence(bridge, case, hf)
    if prop == "interop":
        return check_interop(bridge, case, hf, out)
    if case.corruption is None:
        raise ValueError("the refusal property needs a case with a corruption")
    return check_refusal(bridge, case, hf, case.corruption)


# ---------------------------------------------------------------------------- 1. import
def check_import(bridge: Bridge, case: Case, hf_dir: Path) -> None:
    """Every parameter and persistent buffer is set from the checkpoint.

    Drawn weights: two loads under different init seeds must agree everywhere (what differs kept
    its random init), and no tensor may be constant, since no tensor of a drawn checkpoint is (what
    is constant kept a constant init such as ones for norms or zeros for the expert bias).
    A user's checkpoint may hold constant tensors (a zero expert bias, unit norms): there each
    loaded tensor is compared with the checkpoint's values instead (`loaded_values`).
    """
    if case.checkpoint is not None:
        return _check_import_against_checkpoint(bridge, case, hf_dir)
    first, second = ({k: v for part in run_on_ranks("state", bridge, case, hf_dir, init_seed=seed) for k, v in part.items()}
                     for seed in INIT_SEEDS)
    for name, a in first.items():
        b = second.get(name)
        if b is None or a.shape != b.shape or not torch.equal(a, b):
            raise PropertyFailure(
                "import", case,
                f"{name} {list(a.shape)} differs between two loads under init seeds {INIT_SEEDS}: "
                f"it was not set from the checkpoint (max diff {(a.float() - b.float()).abs().max().item() if b is not None and a.shape == b.shape else 'n/a'})",
                kind="not loaded", facts={"tensor": name, "how": "differs between init seeds"},
            )
    for name, a in first.items():
        if a.numel() > 1 and a.is_floating_point() and torch.all(a == a.flatten()[0]):
            raise PropertyFailure(
                "import", case,
                f"{name} {list(a.shape)} is constant ({a.flatten()[0].item():g} everywhere): it kept its "
                "initial value, while every tensor of the checkpoint is random",
                kind="not loaded", facts={"tensor": name, "how": "constant"},
            )


def _check_import_against_checkpoint(bridge: Bridge, case: Case, hf_dir: Path) -> None:
    reports = [run_on_ranks("checkpoint_values", bridge, case, hf_dir, init_seed=seed) for seed in INIT_SEEDS]
    for report in reports[0]:
        for name, what in report["mismatches"]:
            raise PropertyFailure("import", case, f"{name}: {what}",
                                  kind="not loaded", facts={"tensor": name, "how": "differs from the checkpoint"})
    first = {k: v for report in reports[0] for k, v in report["unmapped"].items()}
    second = {k: v for report in reports[1] for k, v in report["unmapped"].items()}
    for name, digest in first.items():
        if second.get(name) != digest:
            raise PropertyFailure(
                "import", case, f"{name} differs between two loads under init seeds {INIT_SEEDS}: it was not set "
                                "from the checkpoint", kind="not loaded", facts={"tensor": name, "how": "differs between init seeds"})
    for report in reports[0]:
        for name, value in report["constant_unmapped"]:
            raise PropertyFailure(
                "import", case, f"{name} is constant ({value:g} everywhere) and its name is not one of Megatron-Core's "
                                "GPTModel tensors, so it cannot be compared with the checkpoint: it kept its initial value",
                kind="not loaded", facts={"tensor": name, "how": "constant"})


# ---------------------------------------------------------------------------- 2. round trip
@dataclass
class CheckpointDiff:
    """How two checkpoint directories differ, grouped by kind."""

    config: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    shape: list[str] = field(default_factory=list)
    dtype: list[str] = field(default_factory=list)
    value: list[tuple[str, float]] = field(default_factory=list)  # (name, max abs difference)

    def __bool__(self) -> bool:
        return any((self.config, self.missing, self.extra, self.shape, self.dtype, self.value))

    def facts(self) -> dict[str, Any]:
        """The kinds of difference, and the tensors or config fields of each, by kind."""
        names = {
            "config": [entry.split("=", 1)[0] for entry in self.config],
            "missing": self.missing,
            "extra": self.extra,
            "shape": [entry.split(" ", 1)[0] for entry in self.shape],
            "dtype": [entry.split(" ", 1)[0] for entry in self.dtype],
            "value": [name for name, _ in self.value],
        }
        return {"diff": [kind for kind, items in names.items() if items],
                "names": sorted({n for items in names.values() for n in items})}

    def summary(self, limit: int = 3) -> str:
        parts = []
        for kind in ("config", "missing", "extra", "shape", "dtype"):
            items = getattr(self, kind)
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{kind}: {', '.join(items[:limit])}{more}")
        if self.value:
            worst = sorted(self.value, key=lambda nv: -nv[1])
            more = f" (+{len(worst) - limit} more)" if len(worst) > limit else ""
            parts.append("value: " + ", ".join(f"{n} (max abs diff {d:.3g})" for n, d in worst[:limit]) + more)
        return "; ".join(parts)


def diff_checkpoints(expected_dir: Path, actual_dir: Path) -> CheckpointDiff:
    diff = CheckpointDiff()
    expected_cfg = read_config(expected_dir)
    try:
        actual_cfg = read_config(actual_dir)
    except ValueError as e:
        diff.config.append(f"exported config.json unreadable: {e}")
    else:
        for name in expected_cfg.__dataclass_fields__:
            if name in ("extra", "defaulted"):
                continue
            a, b = getattr(actual_cfg, name), getattr(expected_cfg, name)
            if a != b:
                diff.config.append(f"{name}={a!r} (expected {b!r})")
    # Tensor by tensor, so that a large checkpoint is never held twice.
    expected_shapes, actual_shapes = tensor_shapes(expected_dir), tensor_shapes(actual_dir)
    diff.missing = [k for k in expected_shapes if k not in actual_shapes]
    diff.extra = [k for k in actual_shapes if k not in expected_shapes]
    actual = TensorReader(actual_dir)
    for name, e in iter_tensors(expected_dir):
        if name not in actual_shapes:
            continue
        a = actual[name]
        if a.shape != e.shape:
            diff.shape.append(f"{name} {list(a.shape)} (expected {list(e.shape)})")
        elif a.dtype != e.dtype:
            diff.dtype.append(f"{name} {a.dtype} (expected {e.dtype})")
        elif not torch.equal(a, e):
            diff.value.append((name, (a.double() - e.double()).abs().max().item()))
    return diff


def check_round_trip(bridge: Bridge, case: Case, hf_dir: Path, out_dir: Path) -> None:
    """export(load(checkpoint)) is the checkpoint: names, shapes, dtypes, bits, and the config."""
    run_on_ranks("export", bridge, case, hf_dir, out_dir)
    if not (out_dir / CONFIG_NAME).is_file():
        raise PropertyFailure("round_trip", case, f"export wrote no {CONFIG_NAME} into {out_dir}",
                              kind="checkpoint differs", facts={"diff": ["no config file"], "names": [CONFIG_NAME]})
    if not (out_dir / WEIGHTS_NAME).is_file() and not (out_dir / INDEX_NAME).is_file():
        raise PropertyFailure("round_trip", case, f"export wrote no weights ({WEIGHTS_NAME} or {INDEX_NAME}) into "
                              f"{out_dir}", kind="checkpoint differs", facts={"diff": ["no weights file"], "names": [WEIGHTS_NAME]})
    diff = diff_checkpoints(hf_dir, out_dir)
    if diff:
        raise PropertyFailure("round_trip", case, f"exported checkpoint differs from the original: {diff.summary()}",
                              kind="checkpoint differs", facts=diff.facts(),
                              evidence={"checkpoint_diff": dataclasses.asdict(diff)})


# ---------------------------------------------------------------------------- 3. equivalence
def oracle_trace(case: Case, hf_dir: Path, tol: Tolerance, other: dict[int, torch.Tensor],
                 router_inputs_of: Trace | None = None) -> tuple[Trace, int]:
    """The oracle's trace, computed in fp32 whatever the checkpoint's dtype, to compare with a
    model held to `tol` that chose the experts `other` (per MoE layer index, [T, K]): each near-tie
    is decided as that model decided it, where its choice is right up to the routing margin
    (`numerics.NearTieFollower`). Returns the trace and how many tokens were decided that way.
    Raises IllConditioned when the tolerance has a conditioning rule (fp32's) and the example
    amplifies rounding past its share of the tolerance.

    With `router_inputs_of` (that model's trace), each MoE layer's router weights in the returned
    trace are the ones the oracle's router gives its chosen experts on that model's own router
    input (`router_weights_on`): a router is judged on the input it was given."""
    oracle = ErnieMoeForCausalLM.from_pretrained(hf_dir).float()
    follower = NearTieFollower(other, tol.routing_margin)
    follower.attach(oracle)
    input_ids = case.inputs.input_ids(case.config.vocab_size)
    trace = oracle(input_ids, trace=True)
    if tol.condition_share is not None and (
            condition := conditioning_error(oracle, input_ids, trace, tol.routing_margin)) > tol.condition_share * tol.rtol:
        raise IllConditioned(f"the fp32 oracle differs from float64 by {condition:.3g} "
                             f"> {tol.condition_share:g} x {tol.rtol:g}")
    if router_inputs_of is not None:
        router_weights_on(oracle, router_inputs_of, trace)
    return trace, follower.followed


@torch.no_grad()
def router_weights_on(oracle: ErnieMoeForCausalLM, compared: Trace, trace: Trace) -> None:
    """Set each MoE layer's router weights in `trace` (the oracle's) to those the oracle's router
    gives the same experts on `compared`'s router input: `compared`'s residual stream after
    attention, normed by the oracle.

    Why: a router's weights renormalise softmax(logits) over the chosen experts, so their error is
    the logits' absolute error, which is the input's relative error times the logits' scale. Judged
    against the oracle's own stream, a right bf16 model's weights erred by up to 0.14 at 28 layers
    while no hidden state erred by more than 0.08 (benchmarks/calibrate_bf16.py, README
    "Precision"): the depth's rounding, not the router. On the model's own input a wrong router
    still differs by its whole error. A layer whose hidden states have another shape is left as
    it is (its attention stage already differs)."""
    for layer, ours, theirs in zip(oracle.model.layers, trace.layers, compared.layers):
        if ours.routing is None or theirs.routing is None or theirs.after_attention.shape != ours.after_attention.shape:
            continue
        tokens = layer.post_attention_layernorm(theirs.after_attention.float()).reshape(-1, ours.after_attention.shape[-1])
        chosen = ours.routing.expert_ids  # [T, K]: the same experts, in the same order
        follow = layer.mlp.decide_near_ties
        layer.mlp.decide_near_ties = lambda selection, own: chosen
        try:
            ours.routing.weights = layer.mlp.route(tokens).weights  # [T, K]
        finally:
            layer.mlp.decide_near_ties = follow


def chosen_experts(trace: Trace) -> dict[int, torch.Tensor]:
    """{MoE layer index: chosen experts [T, K]} of a trace."""
    return {i: layer.routing.expert_ids for i, layer in enumerate(trace.layers) if layer.routing is not None}


def conditioning_error(oracle: ErnieMoeForCausalLM, input_ids: torch.Tensor, trace: Trace, margin: float) -> float:
    """How far `trace`, the fp32 `oracle`'s on `input_ids`, is from the same weights computed in
    float64 (near-ties within `margin` decided as in `trace`): the worst stage error, inf when some
    token's routing differs. It measures how much fp32 rounding the example amplifies (see
    numerics.FP32_CONDITION_SHARE). The oracle runs in float64 in place and is back in fp32 after
    (exact: every fp32 value is a float64 value; a copy of 28 layers of 64 experts costs seconds),
    deciding near-ties as `trace` did from then on."""
    NearTieFollower(chosen_experts(trace), margin).attach(oracle)
    try:
        exact = oracle.double()(input_ids, trace=True)
    finally:
        oracle.float()
    return worst_stage_error(stage_errors(trace, exact, oracle.config))


def worst_stage_error(errors: list[tuple[str, float]]) -> float:
    """The largest error of `stage_errors`; a router choice that sends any token elsewhere counts
    as inf (its value is a share of tokens, not a relative error)."""
    return max(math.inf if "router choice" in stage and error > 0 else error for stage, error in errors)


def stage_errors(actual: Trace, expected: Trace, cfg: ErnieMoeConfig) -> list[tuple[str, float]]:
    """(stage, relative error): each layer whose kind (dense or MoE) differs from the oracle's,
    then in forward order: embedding; per layer attention, router choice (fraction of tokens routed
    to other experts), router weights, and output; final norm; logits. A stage whose shapes
    disagree gets inf; stages after a missing layer are left out."""

    def err(a: torch.Tensor, e: torch.Tensor) -> float:
        return relative_error(a, e) if a.shape == e.shape else math.inf

    # The layers' kinds first: a model built with a wrong layer pattern is wrong whatever its numbers,
    # and a numerical divergence in an earlier layer must not hide it.
    errors = [(f"layer {i} kind: {'MoE' if a.routing is not None else 'dense'} in the bridge's model, "
               f"{'MoE' if e.routing is not None else 'dense'} in the oracle", math.inf)
              for i, (a, e) in enumerate(zip(actual.layers, expected.layers)) if (a.routing is None) != (e.routing is None)]
    errors.append(("embedding", err(actual.embeddings, expected.embeddings)))
    for i, (a, e) in enumerate(zip(actual.layers, expected.layers)):
        kind = cfg.layer_types[i]
        errors.append((f"layer {i} attention", err(a.after_attention, e.after_attention)))
        if a.routing is not None and e.routing is not None:  # a kind that differs is listed above
            ours, theirs = a.routing.expert_ids.sort(-1).values, e.routing.expert_ids.sort(-1).values
            if ours.shape != theirs.shape:
                errors.append((f"layer {i} router choice: {ours.shape[-1]} experts per token, "
                               f"the oracle {theirs.shape[-1]}", math.inf))
            else:
                errors.append((f"layer {i} router choice", (ours != theirs).any(-1).float().mean().item()))
                wa = a.routing.weights.gather(-1, a.routing.expert_ids.argsort(-1))
                we = e.routing.weights.gather(-1, e.routing.expert_ids.argsort(-1))
                errors.append((f"layer {i} router weights", err(wa, we)))
        errors.append((f"layer {i} {'experts' if kind == 'moe' else 'mlp'}", err(a.output, e.output)))
    if len(actual.layers) != len(expected.layers):
        errors.append((f"decoder has {len(actual.layers)} layers, expected {len(expected.layers)}", math.inf))
        return errors
    errors.append(("final norm", err(actual.final_norm, expected.final_norm)))
    errors.append(("output logits", err(actual.logits, expected.logits)))
    return errors


def stage_kind(stage: str) -> str:
    """"layer 3 router weights" -> "router weights"; a structural stage ("layer 1 kind: MoE in the
    bridge's model, dense in the oracle") -> "layer kind"; others as they are."""
    kind = re.sub(r"^layer \d+ ", "", stage.split(": ", 1)[0])
    if kind == "kind":
        return "layer kind"
    if stage.startswith("decoder has"):
        return "layer count"
    return kind


def first_divergence(errors: list[tuple[str, float]], rtol: float = FP32_RTOL) -> tuple[str, str] | None:
    """(stage, description) of the first stage, in forward order, that differs: a value stage
    whose relative error is over `rtol`, or a router choice that sends any token elsewhere.

    Routing outside the tie margin must match exactly, in every dtype: a tolerance on the share of
    tokens routed elsewhere would let a bridge misroute that share of every batch."""
    for stage, error in errors:
        if "router choice" in stage and ": " not in stage:
            if error > 0:
                return stage, f"{stage}: {error:.1%} of tokens routed to other experts"
        elif error > rtol:
            if ": " in stage:  # a structural difference, described by the stage itself
                return stage, stage
            return stage, f"{stage}: relative error {error:.3g} > {rtol:g}"
    return None


def check_equivalence(bridge: Bridge, case: Case, hf_dir: Path) -> dict[str, Any]:
    """Megatron logits, every layer's hidden states and the routing decisions match the oracle:
    within `FP32_RTOL` for fp32 checkpoints, `BF16_RTOL` for bf16 ones (the model in bf16, the
    oracle in fp32 on the same weights). Router weights are judged on the model's own router input
    (`router_weights_on`). Returns {"stage_errors": ...} (the findings' trigger
    isolation reads how far below the tolerance a passing example is)."""
    tol: Tolerance = tolerance(case.dtype)
    actual = merge_traces(run_on_ranks("trace", bridge, case, hf_dir))
    expected, followed = oracle_trace(case, hf_dir, tol, chosen_experts(actual), router_inputs_of=actual)
    errors = stage_errors(actual, expected, case.config)
    if (divergence := first_divergence(errors, tol.rtol)) is not None:
        stage, where = divergence
        raise PropertyFailure(
            "equivalence", case, f"first divergence at {where}; logits relative error {errors[-1][1]:.3g}",
            kind="divergence", facts={"stage": stage, "stage_kind": stage_kind(stage)},
            evidence={"stage_errors": errors},
        )
    return {"stage_errors": errors, "near_tie_tokens": followed}


# ---------------------------------------------------------------------------- 4. interop
def check_interop(bridge: Bridge, case: Case, hf_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The exported directory loads in transformers, keys exactly right, and gives the oracle's logits
    (near-ties decided as transformers decided them). Both run in fp32 on the exported weights
    (transformers upcasts a bf16 export), so the fp32 tolerance holds for every dtype."""
    run_on_ranks("export", bridge, case, hf_dir, out_dir)
    try:
        model = load_transformers_model(out_dir)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        raise PropertyFailure("interop", case, f"transformers cannot load the export: {type(e).__name__}: {e}",
                              kind="transformers cannot load", facts={"exception": type(e).__name__}) from e
    run = run_transformers(model, case.inputs.input_ids(case.config.vocab_size))
    del model  # its outputs are all that is compared: freed before the oracle's fp32 and float64 runs
    expected, followed = oracle_trace(case, hf_dir, tolerance("float32"), run.selected_experts)
    err = relative_error(run.logits, expected.logits)
    if err > FP32_RTOL:
        raise PropertyFailure("interop", case, f"transformers on the export: logits relative error {err:.3g} > {FP32_RTOL}",
                              kind="logits differ")
    return {"near_tie_tokens": followed}


# ---------------------------------------------------------------------------- 5. refusal
def corrupt_checkpoint(hf_dir: Path, corruption: Corruption) -> None:
    """Apply `corruption` to the single-file checkpoint in `hf_dir`, in place."""
    from safetensors.torch import load_file, save_file

    if corruption.kind == "config":
        path = hf_dir / CONFIG_NAME
        hf = json.loads(path.read_text())
        field_name, value = corruption.target, json.loads(corruption.detail)
        hf[field_name] = value
        path.write_text(json.dumps(hf))
        return
    weights = hf_dir / "model.safetensors"
    tensors = load_file(str(weights))
    if corruption.kind == "missing":
        del tensors[corruption.target]
    elif corruption.kind == "extra":
        like = next(iter(tensors.values()))
        tensors[corruption.target] = torch.randn(json.loads(corruption.detail) or [2], dtype=like.dtype)
    elif corruption.kind == "misshaped":
        t = tensors[corruption.target]
        shape = json.loads(corruption.detail)
        tensors[corruption.target] = torch.randn(shape, dtype=t.dtype)
    else:
        raise ValueError(f"unknown corruption kind {corruption.kind!r}")
    save_file(tensors, str(weights), metadata={"format": "pt"})


def check_refusal(bridge: Bridge, case: Case, hf_dir: Path, corruption: Corruption) -> dict[str, Any]:
    """The same checkpoint loads uncorrupted, and corrupted makes `load` raise: accepting it
    silently is a failure. (Loading the intact checkpoint first keeps a bridge that cannot load
    anything from passing: its every error would otherwise count as a refusal.)

    On several ranks the corrupt checkpoint is refused when some rank's load raises: under
    torchrun that exception ends the job, whatever the other ranks did (ranks that hold none of
    the corrupted part may load, or wait in the bridge's collectives for the refusing ones). A
    load that hangs on every rank it has not finished on, with no rank refusing, is a failure.

    Returns {"named": whether every refusing rank's error names the corrupted tensor or field}."""
    run_on_ranks("load", bridge, case, hf_dir)  # raises BridgeError: the bridge fails a valid checkpoint
    corrupt_checkpoint(hf_dir, corruption)
    try:
        answers = run_on_ranks("refuse", bridge, case, hf_dir)
    except BridgeError as refusal:
        if refusal.exception == HUNG_EXCEPTION:
            raise _bridge_raised("refusal", case, refusal, f"load hung{on_ranks(refusal.ranks)} on a corrupt "
                                                          f"checkpoint, no rank refusing it: {corruption}") from refusal
        return {"named": all(corruption.target in error for error in refusal_errors(refusal))}
    where = "" if len(answers) == 1 else " on every rank"
    raise PropertyFailure("refusal", case, f"load accepted a corrupt checkpoint without error{where}: {corruption}",
                          kind="accepted corruption", facts={"corruption": corruption.kind, "target": corruption.target})
