"""Counterexamples: a failing (shrunk) example saved as a small JSON file that replays exactly.

The file holds everything `run_property` needs to rebuild the case: the bridge as it was named
on the command line, the property, the HF config, the weights seed (or the user checkpoint),
the inputs, the layout and the corruption; plus what was seen (the failure's kind and facts, its
message and evidence). A user checkpoint is named relative to the file's own directory, so that a
committed counterexample replays on any machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ernie_ref import CheckpointFormat, ErnieMoeConfig
from ernie_ref.layout import Layout

from .cases import Case, Corruption, Inputs
from .properties import PropertyFailure

__all__ = ["Counterexample", "SCHEMA", "counterexample_dir", "ENV_DIR", "replay_command"]

SCHEMA = "ernie-conformance/counterexample/v2"
SCHEMA_V1 = "ernie-conformance/counterexample/v1"  # still read: the committed certificates of earlier versions
ENV_DIR = "ERNIE_CONFORMANCE_COUNTEREXAMPLES"
DEFAULT_DIR = "counterexamples"


def counterexample_dir(option: str | None = None) -> Path:
    """Where counterexamples go: the option, else $ERNIE_CONFORMANCE_COUNTEREXAMPLES, else ./counterexamples."""
    return Path(option or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class Counterexample:
    property: str
    bridge: str  # as given to --bridge: a registered name or package.module:attribute
    bridge_version: str
    config: dict[str, Any]  # config.json of the case
    weights_seed: int | None
    inputs: dict[str, int]
    layout: dict[str, int]
    corruption: dict[str, str] | None = None
    checkpoint: str | None = None  # relative to this file's directory once saved
    dtype: str = "float32"
    checkpoint_format: dict[str, Any] | None = None  # ernie_ref.CheckpointFormat; None: canonical
    kind: str = ""  # properties.FAILURE_KINDS
    facts: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    test: str = ""
    finding: str = ""  # the id of the finding this example is the smallest of (conformance.findings)
    trigger: str = ""  # that finding's trigger, in words
    schema: str = SCHEMA
    _directory: Path | None = field(default=None, repr=False, compare=False)  # where it was loaded from

    @classmethod
    def from_failure(cls, failure: PropertyFailure, bridge: str, bridge_version: str, test: str = "",
                     finding: str = "", trigger: str = "") -> Counterexample:
        case = failure.case
        return cls(
            property=failure.prop,
            bridge=bridge,
            bridge_version=bridge_version,
            config=case.config.to_hf(),
            weights_seed=case.weights_seed,
            inputs=asdict(case.inputs),
            layout=asdict(case.layout),
            corruption=asdict(case.corruption) if case.corruption else None,
            checkpoint=case.checkpoint,
            dtype=case.dtype,
            checkpoint_format=asdict(case.checkpoint_format) if case.checkpoint_format != CheckpointFormat() else None,
            kind=failure.kind,
            facts=_finite(failure.facts),
            message=str(failure).split("\n  reproduce with:")[0],
            evidence=_finite(failure.evidence),
            test=test,
            finding=finding,
            trigger=trigger,
        )

    def checkpoint_path(self) -> Path | None:
        """The user checkpoint, resolved against the directory this file was loaded from."""
        if self.checkpoint is None:
            return None
        return (self._directory or Path.cwd()) / self.checkpoint

    def case(self) -> Case:
        checkpoint = self.checkpoint_path()
        return Case(
            config=ErnieMoeConfig.from_hf(self.config),
            weights_seed=self.weights_seed,
            inputs=Inputs(**self.inputs),
            layout=Layout(**self.layout),
            corruption=Corruption(**self.corruption) if self.corruption else None,
            checkpoint=str(checkpoint) if checkpoint is not None else None,
            dtype=self.dtype,
            checkpoint_format=CheckpointFormat(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in (self.checkpoint_format or {}).items()}),
        )

    def file_name(self) -> str:
        """Stable for the same bridge, property and finding: a later run of the same search
        overwrites it."""
        key = hashlib.sha1(f"{self.bridge}|{self.test or self.property}|{self.finding}".encode()).hexdigest()[:8]
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.bridge.split(":")[-1])
        return f"{safe}-{self.property}-{key}.json"

    def save(self, directory: Path) -> Path:
        """Write into `directory`; an absolute checkpoint path becomes relative to it, in the
        message too."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.file_name()
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        if self.checkpoint is not None and Path(self.checkpoint).is_absolute():
            rel = Path(os.path.relpath(self.checkpoint, directory.resolve())).as_posix()
            data["checkpoint"] = rel
            data["message"] = self.message.replace(self.checkpoint, rel)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Counterexample:
        data = json.loads(Path(path).read_text())
        if data.get("schema") not in (SCHEMA, SCHEMA_V1):
            raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
        data["schema"] = SCHEMA  # v1 lacks kind and facts, which default to empty
        return cls(**data, _directory=Path(path).resolve().parent)


def replay_command(path: str | Path) -> str:
    return f"ernie-conformance replay {path}"
