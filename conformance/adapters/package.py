"""What the adapters of installed converter packages share."""

from __future__ import annotations

import importlib.util
from typing import Any

from ernie_ref.config import ErnieMoeConfig

from ..versions import package_version

__all__ = ["PackageAdapter"]


class PackageAdapter:
    """An adapter of the converter in an installed package (`distribution`, imported as `module`).

    A load keeps what the same rank's export needs in attributes listed in `load_state`; they are
    left out when the adapter is sent to the ranks of a pool with each example, since a load's state
    belongs to the rank that made it, and unpickling it would import the package unprepared.
    """

    name: str
    distribution: str  # the package's distribution name, whose installed version is the bridge's
    module: str  # the package's import name
    tox_env: str  # the tox environment that installs it
    declared_deviations: tuple[str, ...] = ()
    load_state: tuple[str, ...] = ()

    def __init__(self) -> None:
        if importlib.util.find_spec(self.module) is None:
            raise ImportError(f"{self.distribution} is not installed (see tox.ini, environment {self.tox_env})")
        for attribute in self.load_state:
            setattr(self, attribute, None)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **dict.fromkeys(self.load_state)}

    def version(self) -> str:
        # The distribution's version, not the package's __version__ (megatron.bridge's appends the
        # git commit of whatever repository the package happens to sit in).
        return package_version(self.distribution)

    def deviations(self) -> list[str]:
        return list(self.declared_deviations)

    def unsupported(self, config: ErnieMoeConfig) -> str | None:
        return None  # the package declares no limits; what it gets wrong is for the suite to find
