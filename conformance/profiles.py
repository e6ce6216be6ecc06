"""The suite's Hypothesis profiles, and the settings a session chose from them.

The profiles have names of their own (`ernie-dev`, `ernie-ci`, `ernie-thorough`) and are applied
to the suite's tests alone (by `suite.drawing`, through `suite_settings()`), so a project's own
`ci` profile stays as it is. The plugin (`conformance.plugin`) chooses one per session from the
command line (`choose`); the options themselves are declared there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings

__all__ = ["PROFILES", "MAX_SHRINKS", "MAX_FINDINGS", "ChosenProfile", "default_profile", "choose",
           "suite_settings", "max_shrinks", "chosen"]

# Profiles: dev explores (random, small), ci is reproducible (derandomized), thorough digs.
# No deadline anywhere: one example builds models, and a slow machine is not a failure.
# filter_too_much is not suppressed: a bridge that declares most draws unsupported makes
# Hypothesis give up, and the certificate calls the property inconclusive, saying why.
_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,  # a counterexample file and its replay command say how to reproduce
)
PROFILES = {"ernie-dev": 30, "ernie-ci": 100, "ernie-thorough": 500}
settings.register_profile("ernie-dev", max_examples=PROFILES["ernie-dev"], **_COMMON)
settings.register_profile("ernie-ci", max_examples=PROFILES["ernie-ci"], derandomize=True, database=None, **_COMMON)
settings.register_profile("ernie-thorough", max_examples=PROFILES["ernie-thorough"], **_COMMON)
# Examples run after a test's first failure (shrinking it), at most; see suite.drawing.check.
MAX_SHRINKS = {"ernie-dev": 50, "ernie-ci": 50, "ernie-thorough": 400}
# Findings searched for per property: after each, the property is searched again without it.
MAX_FINDINGS = 10


@dataclass(frozen=True)
class ChosenProfile:
    """What a session runs the suite's tests with."""

    settings: settings
    label: str  # the profile's name, with an overridden example count: "ernie-ci max_examples=10"
    max_shrinks: int
    max_findings: int


_CHOSEN: ChosenProfile | None = None  # set by choose(), once per pytest process


def default_profile() -> str:
    return "ernie-ci" if os.environ.get("CI") else "ernie-dev"


def choose(profile: str, overrides: dict[str, Any], max_shrinks: int | None, max_findings: int | None) -> ChosenProfile:
    """Make `profile` with `overrides` (Hypothesis settings) this process's choice. ValueError (from
    Hypothesis, naming the profile) for a profile that is not registered."""
    global _CHOSEN
    base = settings.get_profile(profile)
    _CHOSEN = ChosenProfile(
        settings=settings(base, **overrides),
        label=profile + "".join(f" {k}={v}" for k, v in overrides.items() if k == "max_examples"),
        max_shrinks=max_shrinks or MAX_SHRINKS.get(profile, 100),
        max_findings=max_findings or MAX_FINDINGS,
    )
    return _CHOSEN


def chosen() -> ChosenProfile:
    """This process's choice; the default profile where nothing chose (imported outside pytest)."""
    if _CHOSEN is None:
        profile = default_profile()
        return ChosenProfile(settings.get_profile(profile), profile, MAX_SHRINKS[profile], MAX_FINDINGS)
    return _CHOSEN


def suite_settings() -> settings:
    """The settings of the suite's tests: the chosen profile with the command line's overrides.
    The suite's test modules apply them to each test, so no global profile is loaded."""
    return chosen().settings


def max_shrinks() -> int:
    return chosen().max_shrinks
