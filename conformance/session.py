"""The suite's session: the bridge under test and the choices every test of the suite shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SuiteSession"]


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
