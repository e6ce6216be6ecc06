"""The suite's session: the bridge under test and the choices every test of the suite shares."""

from __future__ import annotations

from dataclasses import dataclass
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
    max_shrinks: int = 50  # examples run after a test's first failure, at most (see suite.drawing.check)
