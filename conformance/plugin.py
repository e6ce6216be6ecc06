"""pytest plugin of the conformance suite: options, Hypothesis profiles, fixtures, report header.

Loaded in every pytest session of an environment where ernie-conformance is installed
(entry point `pytest11`), so `pytest --pyargs conformance --bridge NAME` works anywhere.
"""

from __future__ import annotations

import os
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Profiles: dev explores (random, small), ci is reproducible (derandomized), thorough digs.
# No deadline anywhere: one example builds models, and a slow machine is not a failure.
_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)

DEFAULT_BRIDGE = "reference"

# Declared refusals seen in this session: reason -> number of drawn configs it refused.
DECLARED_REFUSALS: Counter[str] = Counter()


def default_profile() -> str:
    return "ci" if os.environ.get("CI") else "dev"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ernie-conformance")
    group.addoption("--bridge", default=DEFAULT_BRIDGE,
                    help="bridge under test: a registered name or package.module:attribute (default: reference)")
    group.addoption("--max-examples", type=int, default=None,
                    help="Hypothesis examples per property (overrides the profile's count)")
    group.addoption("--xfails-file", default=None,
                    help="file of test ids expected to fail, one per line (# comments); an unexpected pass fails")


# Warnings that megatron-core raises about itself on every import or build (deprecations, no
# Apex or Transformer Engine): noise in a report about a bridge.
_IGNORED_WARNINGS = (
    "ignore::DeprecationWarning:megatron",
    "ignore::FutureWarning:megatron",
    "ignore::UserWarning:megatron",
    "ignore:MLP requires ffn_hidden_size:DeprecationWarning",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in _IGNORED_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
    profile = config.getoption("hypothesis_profile", None) or default_profile()
    max_examples = config.getoption("max_examples")
    if max_examples is not None:
        settings.register_profile(f"{profile}-n{max_examples}", settings.get_profile(profile), max_examples=max_examples)
        profile = f"{profile}-n{max_examples}"
    settings.load_profile(profile)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _in_suite(config: pytest.Config) -> bool:
    """Whether this session collects the suite's own modules (the header is noise otherwise)."""
    suite = str(Path(__file__).parent / "suite")
    args = [str(Path(a.split("::")[0]).resolve()) for a in config.args]
    return any(a.startswith(suite) or suite.startswith(a) for a in args) or bool(config.getoption("pyargs"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not _in_suite(config):
        return []
    from .bridge import BridgeNotFound, resolve_bridge

    try:
        bridge = resolve_bridge(config.getoption("bridge"))
    except BridgeNotFound as e:
        raise pytest.UsageError(str(e)) from e
    return [
        f"ernie-conformance {_package_version('ernie-conformance')}: bridge {bridge.name} {bridge.version()}",
        f"megatron-core {_package_version('megatron-core')}, transformers {_package_version('transformers')}, "
        f"torch {_package_version('torch')}; hypothesis profile {settings.get_current_profile_name()} "
        f"({settings.default.max_examples} examples)",
    ]


def _read_xfails(path: str) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("xfails_file")
    if not path:
        return
    for expected in _read_xfails(path):
        for item in items:
            if item.nodeid == expected or item.nodeid.endswith("/" + expected) or item.name == expected:
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"listed in {path}"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if DECLARED_REFUSALS:
        terminalreporter.section("declared unsupported by the bridge (not failures)")
        for reason, count in DECLARED_REFUSALS.most_common():
            terminalreporter.write_line(f"{count:5d} drawn configs: {reason}")


@pytest.fixture(scope="session")
def bridge(pytestconfig: pytest.Config):
    from .bridge import resolve_bridge

    return resolve_bridge(pytestconfig.getoption("bridge"))


@pytest.fixture(scope="session")
def megatron_runtime():
    """CPU patches applied and a one-rank gloo process group, once per session."""
    from .megatron_runtime import apply_cpu_patches, destroy_model_parallel, init_process_group_once

    apply_cpu_patches()
    init_process_group_once(world_size=1, rank=0)
    yield
    destroy_model_parallel()
