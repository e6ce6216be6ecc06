"""The conformance properties, as plain functions of (bridge, case, working directory).

Each raises `PropertyFailure` with a message that can be read without the test: the property,
the config in one line, the seeds and layout, and the first tensor or layer that differs with
its error. The pytest modules of the suite (`conformance/suite/`) draw cases and call these.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ernie_ref import ErnieMoeConfig, ErnieMoeForCausalLM, Trace, random_checkpoint
from ernie_ref.checkpoint import CONFIG_NAME, TensorReader, iter_tensors, read_config, tensor_shapes
from ernie_ref.layout import Layout

from .bridge import Bridge
from .hf_transformers import load_transformers_model, run_transformers
from .distributed import INIT_SEEDS, run_on_ranks
from .megatron_trace import merge_traces
from .numerics import FP32_RTOL, Tolerance, relative_error, tolerance
from .strategies import Inputs

__all__ = [
    "Case",
    "PropertyFailure",
    "NearTie",
    "PROPERTIES",
    "prepare_checkpoint",
    "run_property",
    "stage_errors",
    "check_import",
    "check_round_trip",
    "check_equivalence",
    "check_interop",
    "check_refusal",
    "Corruption",
    "corrupt_checkpoint",
    "diff_checkpoints",
]


@dataclass(frozen=True)
class Corruption:
    """One way to break a checkpoint: `kind` in missing, extra, misshaped, config; `target` names it."""

    kind: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.target}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Case:
    """One drawn example: everything needed to rebuild it exactly.

    `weights_seed` draws the weights of a random checkpoint; with `checkpoint` set instead, the
    example runs on that directory (a user's own checkpoint) and `config` is read from it.
    `corruption` is used by the refusal property only.
    """

    config: ErnieMoeConfig
    weights_seed: int | None
    inputs: Inputs
    layout: Layout = Layout()
    corruption: Corruption | None = None
    checkpoint: str | None = None
    dtype: str = "float32"  # of the drawn weights (the router stays fp32); a user's checkpoint has its own

    def describe(self) -> str:
        weights = (f"checkpoint {self.checkpoint}" if self.checkpoint
                   else f"{self.dtype} weights seed {self.weights_seed}")
        return (
            f"config: {self.config.one_line()}\n"
            f"  {weights}, layout {self.layout}, "
            f"inputs batch {self.inputs.batch} x seq {self.inputs.seq_len} seed {self.inputs.seed}"
            + (f", corruption: {self.corruption}" if self.corruption else "")
        )


class PropertyFailure(AssertionError):
    """A property does not hold for `case`. `evidence` carries what localises it (stage errors,
    the checkpoint diff) for reports; `replay` is the command that reproduces it, once saved."""

    def __init__(self, prop: str, case: Case, detail: str, evidence: dict | None = None, replay: str | None = None):
        self.prop, self.case, self.detail, self.evidence, self.replay = prop, case, detail, evidence or {}, replay
        message = f"[{prop}] {detail}\n  {case.describe()}"
        if replay:
            message += f"\n  reproduce with: {replay}"
        super().__init__(message)

    def with_replay(self, command: str) -> PropertyFailure:
        return PropertyFailure(self.prop, self.case, self.detail, self.evidence, command)


class NearTie(Exception):
    """The oracle's routing has a near-tie: the example says nothing about the bridge."""


PROPERTIES = ("import", "round_trip", "equivalence", "interop", "refusal")


def prepare_checkpoint(case: Case, workdir: Path) -> Path:
    """The checkpoint directory the example runs on: a seeded random one written into `workdir`,
    or the user's own. For a corrupted user checkpoint, a copy of config.json beside links to its
    weight files, so that a config corruption never touches the original."""
    if case.checkpoint is None:
        hf = workdir / "hf"
        random_checkpoint(case.config, hf, seed=case.weights_seed, dtype=getattr(torch, case.dtype))
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


def run_property(prop: str, bridge: Bridge, case: Case) -> None:
    """Run one property on one case in a scratch directory; raises PropertyFailure or NearTie."""
    if prop not in PROPERTIES:
        raise ValueError(f"unknown property {prop!r}: expected one of {', '.join(PROPERTIES)}")
    with tempfile.TemporaryDirectory(prefix="ernie-conformance-") as root:
        workdir = Path(root)
        hf = prepare_checkpoint(case, workdir)
        try:
            _run_checks(prop, bridge, case, hf, workdir / "export")
        except (PropertyFailure, NearTie):
            raise
        except Exception as e:  # noqa: BLE001 - a bridge that raises on a valid checkpoint fails the property
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise PropertyFailure(prop, case, f"the bridge raised {type(e).__name__} on a valid checkpoint: {last}"
                                  + (f"\n{e}" if "\n" in str(e) else "")) from e


def _run_checks(prop: str, bridge: Bridge, case: Case, hf: Path, out: Path) -> None:
    if prop == "import":
        check_import(bridge, case, hf)
    elif prop == "round_trip":
        check_round_trip(bridge, case, hf, out)
    elif prop == "equivalence":
        check_equivalence(bridge, case, hf)
    elif prop == "interop":
        check_interop(bridge, case, hf, out)
    elif case.corruption is None:
        raise ValueError("the refusal property needs a case with a corruption")
    else:
        check_refusal(bridge, case, hf, case.corruption)


# ---------------------------------------------------------------------------- 1. import
def check_import(bridge: Bridge, case: Case, hf_dir: Path) -> None:
    """Every parameter and persistent buffer is set from the checkpoint.

    Two loads under different init seeds must agree everywhere (what differs kept its random
    init), and no tensor may be constant where the checkpoint has no constant tensor (what is
    constant kept a constant init such as ones for norms or zeros for the expert bias).
    """
    first, second = ({k: v for part in run_on_ranks("state", bridge, case, hf_dir, init_seed=seed) for k, v in part.items()}
                     for seed in INIT_SEEDS)
    for name, a in first.items():
        b = second.get(name)
        if b is None or a.shape != b.shape or not torch.equal(a, b):
            raise PropertyFailure(
                "import", case,
                f"{name} {list(a.shape)} differs between two loads under init seeds {INIT_SEEDS}: "
                f"it was not set from the checkpoint (max diff {(a.float() - b.float()).abs().max().item() if b is not None and a.shape == b.shape else 'n/a'})",
            )
    for name, a in first.items():
        if a.numel() > 1 and a.is_floating_point() and torch.all(a == a.flatten()[0]):
            raise PropertyFailure(
                "import", case,
                f"{name} {list(a.shape)} is constant ({a.flatten()[0].item():g} everywhere): it kept its "
                "initial value, while every tensor of the checkpoint is random",
            )


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
        raise PropertyFailure("round_trip", case, f"export wrote no {CONFIG_NAME} into {out_dir}")
    diff = diff_checkpoints(hf_dir, out_dir)
    if diff:
        raise PropertyFailure("round_trip", case, f"exported checkpoint differs from the original: {diff.summary()}",
                              evidence={"checkpoint_diff": dataclasses.asdict(diff)})


# ---------------------------------------------------------------------------- 3. equivalence
def oracle_trace(case: Case, hf_dir: Path, routing_margin: float) -> Trace:
    """The oracle's trace, computed in fp32 whatever the checkpoint's dtype; raises NearTie when a
    routing decision is closer than `routing_margin`."""
    oracle = ErnieMoeForCausalLM.from_pretrained(hf_dir).float()
    trace = oracle(case.inputs.input_ids(case.config.vocab_size), trace=True)
    margins = [layer.routing.margin.min().item() for layer in trace.layers if layer.routing is not None]
    if min(margins, default=math.inf) < routing_margin:
        raise NearTie(f"routing margin {min(margins):.3g} < {routing_margin}")
    return trace


def stage_errors(actual: Trace, expected: Trace, cfg: ErnieMoeConfig) -> list[tuple[str, float]]:
    """(stage, relative error) in forward order: embedding; per layer attention, router choice
    (fraction of tokens routed to other experts), router weights, and output; final norm; logits.
    A stage whose shapes disagree gets inf; stages after a missing layer are left out."""

    def err(a: torch.Tensor, e: torch.Tensor) -> float:
        return relative_error(a, e) if a.shape == e.shape else math.inf

    errors = [("embedding", err(actual.embeddings, expected.embeddings))]
    for i, (a, e) in enumerate(zip(actual.layers, expected.layers)):
        kind = cfg.layer_types[i]
        errors.append((f"layer {i} attention", err(a.after_attention, e.after_attention)))
        if (a.routing is None) != (e.routing is None):
            errors.append((f"layer {i} kind: {'MoE' if a.routing is not None else 'dense'} in the bridge's model, "
                           f"{'MoE' if e.routing is not None else 'dense'} in the oracle", math.inf))
        elif e.routing is not None:
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


def first_divergence(errors: list[tuple[str, float]], rtol: float = FP32_RTOL) -> str | None:
    """The first stage, in forward order, whose error is over `rtol`."""
    for stage, error in errors:
        if error > rtol:
            if ": " in stage:  # a structural difference, described by the stage itself
                return stage
            return f"{stage}: relative error {error:.3g} > {rtol:g}" if "router choice" not in stage else (
                f"{stage}: {error:.1%} of tokens routed to other experts")
    return None


def check_equivalence(bridge: Bridge, case: Case, hf_dir: Path) -> None:
    """Megatron logits, every layer's hidden states and the routing decisions match the oracle:
    within `FP32_RTOL` for fp32 checkpoints, `BF16_RTOL` for bf16 ones (the model in bf16, the
    oracle in fp32 on the same weights)."""
    tol: Tolerance = tolerance(case.dtype)
    expected = oracle_trace(case, hf_dir, tol.routing_margin)
    actual = merge_traces(run_on_ranks("trace", bridge, case, hf_dir))
    errors = stage_errors(actual, expected, case.config)
    if (where := first_divergence(errors, tol.rtol)) is not None:
        raise PropertyFailure(
            "equivalence", case, f"first divergence at {where}; logits relative error {errors[-1][1]:.3g}",
            evidence={"stage_errors": errors},
        )


# ---------------------------------------------------------------------------- 4. interop
def check_interop(bridge: Bridge, case: Case, hf_dir: Path, out_dir: Path) -> None:
    """The exported directory loads in transformers, keys exactly right, and gives the oracle's logits.
    Both run in fp32 on the exported weights (transformers upcasts a bf16 export), so the fp32
    tolerance holds for every dtype."""
    expected = oracle_trace(case, hf_dir, tolerance("float32").routing_margin)
    run_on_ranks("export", bridge, case, hf_dir, out_dir)
    try:
        model = load_transformers_model(out_dir)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        raise PropertyFailure("interop", case, f"transformers cannot load the export: {type(e).__name__}: {e}") from e
    logits = run_transformers(model, case.inputs.input_ids(case.config.vocab_size)).logits
    err = relative_error(logits, expected.logits)
    if err > FP32_RTOL:
        raise PropertyFailure("interop", case, f"transformers on the export: logits relative error {err:.3g} > {FP32_RTOL}")


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


def check_refusal(bridge: Bridge, case: Case, hf_dir: Path, corruption: Corruption) -> None:
    """A corrupt checkpoint must make `load` raise; accepting it silently is a failure."""
    corrupt_checkpoint(hf_dir, corruption)
    answers = run_on_ranks("refuse", bridge, case, hf_dir)
    accepted = [rank for rank, error in enumerate(answers) if error is None]
    if accepted:
        where = "" if len(answers) == 1 else f" on rank{'s' if len(accepted) > 1 else ''} {', '.join(map(str, accepted))}"
        raise PropertyFailure("refusal", case, f"load accepted a corrupt checkpoint without error{where}: {corruption}")
