"""pytest plugin of the conformance suite: options, Hypothesis profiles and the report header.

Loaded in every pytest session of an environment where ernie-conformance is installed
(entry point `pytest11`), so `pytest --pyargs conformance --bridge NAME` works anywhere.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Profiles: dev explores (random, small), ci is reproducible (derandomized), thorough digs.
# No deadline anywhere: one example builds models, and a slow machine is not a failure.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("dev", max_examples=20, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)


def default_profile() -> str:
    return "ci" if os.environ.get("CI") else "dev"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ernie-conformance")
    group.addoption(
        "--max-examples",
        type=int,
        default=None,
        help="Hypothesis examples per property (overrides the profile's count)",
    )


def pytest_configure(config: pytest.Config) -> None:
    profile = config.getoption("hypothesis_profile", None) or default_profile()
    max_examples = config.getoption("max_examples")
    if max_examples is not None:
        settings.register_profile(f"{profile}-n{max_examples}", settings.get_profile(profile), max_examples=max_examples)
        profile = f"{profile}-n{max_examples}"
    settings.load_profile(profile)
