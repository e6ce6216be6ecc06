"""Installed package versions and the suite's own sources, for report headers and certificates."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["package_version", "suite_sources_digest"]


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def suite_sources_digest() -> str:
    """A digest of the Python sources of the suite and its oracle (`conformance`, `ernie_ref`): what
    the package version does not tell, as the code changes under one version (the draws and the
    judgement with it)."""
    import ernie_ref

    digest = hashlib.sha256()
    for package in (Path(__file__).parent, Path(ernie_ref.__file__).parent):
        for source in sorted(package.rglob("*.py")):
            digest.update(source.relative_to(package.parent).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]
