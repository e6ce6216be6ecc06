"""The suite's session: the bridge under test and the choices every test of the suite shares.

`SuiteSession` is what the suite's tests get (the plugin's `suite` fixture builds it); the
functions here turn the command line's choices into it: the layouts to draw from, those that fit a
user's checkpoint or a launched world, the drawn configs' bounds. `conformance.cli` uses them too,
to write into a certificate what applied.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["SuiteSession", "DEFAULT_BRIDGE", "DTYPE_OPTIONS", "parse_layouts", "check_layouts_fit_world",
           "checkpoint_layouts_and_dtypes", "config_limits"]

DEFAULT_BRIDGE = "reference"
# --dtype -> the dtypes drawn, fp32 first so that a failure shrinks towards full precision.
DTYPE_OPTIONS = {"fp32": ["float32"], "bf16": ["bfloat16"], "any": ["float32", "bfloat16"]}


@dataclass
class SuiteSession:
    """What every test of the suite needs: the bridge under test and where things go."""

    bridge: Any
    bridge_spec: str
    bridge_version: str
    counterexamples: Path
    layouts: list
    checkpoint: Path | None
    dtypes: list[str]  # drawn checkpoints' dtypes; a user's checkpoint has its own
    max_shrinks: int = 50  # examples run to shrink a round's failure, at most (see suite.drawing.search)
    max_findings: int = 10  # findings searched for per property, at most
    isolate_triggers: bool = True  # False (--no-triggers): stop at the first failure, its trigger unknown
    known_findings: dict[str, str] = field(default_factory=dict)  # finding id -> comment (known-failures file)
    # Bounds of drawn configs (strategies.ConfigLimits; None: the defaults). Each dtype's minimum
    # hidden sizes are applied on top (numerics.Tolerance.min_hidden_size, min_published_hidden_size).
    config_limits: Any = None


def parse_layouts(text: str, max_ranks: int) -> list:
    """The layouts to draw from: every one of up to `max_ranks` ranks for 'any', else the list."""
    from ernie_ref.layout import Layout

    from .strategies import all_layouts

    if text.strip() == "any":
        if max_ranks < 1:
            raise pytest.UsageError(f"--max-ranks {max_ranks}: expected at least 1")
        return all_layouts(max_ranks)
    try:
        layouts = [Layout.parse(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise pytest.UsageError(f"--layouts: {e}") from e
    if not layouts:
        raise pytest.UsageError(f"--layouts {text!r}: no layout given")
    return layouts


def check_layouts_fit_world(layouts: list, world_size: int, layouts_option: str, max_ranks: int) -> None:
    """Raise a usage error unless every layout's ranks divide a launched world of `world_size` ranks.

    Every example runs on every rank of such a world (a layout of fewer ranks is replicated,
    data-parallel), so a layout of 3 ranks cannot run on 4, nor one of 4 ranks on 2.
    """
    misfits = [layout for layout in layouts if world_size % layout.world_size]
    if not misfits:
        return
    needed = math.lcm(*(layout.world_size for layout in layouts))
    if layouts_option.strip() == "any":
        raise pytest.UsageError(
            f"--max-ranks {max_ranks} does not fit the torchrun world of {world_size} ranks: the layouts of "
            f"--layouts any need {needed} ranks (or a multiple); use --max-ranks {world_size} or a divisor of it, "
            f"or torchrun --nproc-per-node {needed}"
        )
    names = ", ".join(f"{layout} ({layout.world_size} ranks)" for layout in misfits)
    raise pytest.UsageError(
        f"--layouts: {names} do{'es' if len(misfits) == 1 else ''} not fit the torchrun world of {world_size} "
        f"ranks: a layout's ranks must divide the world size"
    )


def checkpoint_layouts_and_dtypes(checkpoint: str | Path, layouts: list) -> tuple[list, list[str]]:
    """With --checkpoint: the layouts of `layouts` that can split the checkpoint's model, and its
    dtype (a user's checkpoint has its own); ValueError naming what does not fit."""
    from ernie_ref.checkpoint import CheckpointError, TensorReader, checkpoint_dtype, read_config

    if not Path(checkpoint, "config.json").is_file():
        raise ValueError(f"--checkpoint {checkpoint}: no config.json there")
    cfg = read_config(checkpoint)
    fitting = [layout for layout in layouts if layout.problem(cfg) is None]
    if not fitting:
        raise ValueError(f"--checkpoint {checkpoint}: no layout of --layouts fits it: {layouts[-1].problem(cfg)}")
    try:
        dtype = str(checkpoint_dtype(cfg, TensorReader(checkpoint).dtypes)).removeprefix("torch.")
    except (CheckpointError, ValueError) as e:
        raise ValueError(f"--checkpoint {checkpoint}: {e}") from e
    return fitting, [dtype]


def config_limits(published_in_ten: int | None, device: str):
    from .strategies import ConfigLimits

    """The bounds of drawn configs: the defaults, with --published-in-ten and --device applied."""
    limits = ConfigLimits() if published_in_ten is None else ConfigLimits(published_in_ten=published_in_ten)
    # A GPU runs sequences of the published models' training length; a CPU takes minutes beyond 1024.
    return dataclasses.replace(limits, max_long_seq_len=4096) if device == "cuda" else limits
