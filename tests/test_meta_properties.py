"""Meta-tests: the suite kills every mutant of the catalogue (`conformance/mutants.py`) with the
property the mutant names, at the ci profile, and passes the reference bridge. The suite runs
exactly as a user runs it: `pytest --pyargs conformance --bridge ...`, in a fresh process."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.mutants import MUTANTS, mutant_spec

HERE = Path(__file__).parent
SINGLE_RANK = "tp1-pp1-ep1-vpp1"


def run_suite(pytester: pytest.Pytester, bridge: str, test: str, *options: str) -> pytest.RunResult:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    return pytester.runpytest_subprocess(
        "--pyargs", "conformance", "--bridge", bridge, "-k", test,
        "--hypothesis-profile=ci", "--no-shrink", "-p", "no:cacheprovider", "-W", "ignore", *options,
    )


@pytest.mark.catalogue
@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_killed(pytester: pytest.Pytester, name: str) -> None:
    """Layouts drawn as by default (every layout of up to 4 ranks), within the ci profile's examples."""
    mutant = MUTANTS[name]
    result = run_suite(pytester, mutant_spec(name), f"test_{mutant.killed_by}")
    output = result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1, (
        f"mutant {name} ({mutant.bug()}) survived test_{mutant.killed_by}: {outcomes}\n{output[-3000:]}")
    assert mutant.says in output, (
        f"test_{mutant.killed_by} killed {name} without saying {mutant.says!r}:\n{output[-3000:]}")


LAYOUT_MUTANTS = [name for name, mutant in MUTANTS.items() if mutant.reveals_under]


@pytest.mark.catalogue
@pytest.mark.parametrize("name", LAYOUT_MUTANTS)
def test_layouts_reveal_bugs_of_split_models(pytester: pytest.Pytester, name: str) -> None:
    """Right on one rank; drawing the one split layout that the bug needs is what kills it."""
    mutant = MUTANTS[name]
    test = f"test_{mutant.killed_by}"
    single = run_suite(pytester, mutant_spec(name), test, "--layouts", SINGLE_RANK)
    assert single.parseoutcomes().get("passed") == 1, (
        f"{name} should be right on one rank:\n{single.stdout.str()[-3000:]}")
    result = run_suite(pytester, mutant_spec(name), test, "--layouts", f"{SINGLE_RANK},{mutant.reveals_under}")
    output = result.stdout.str()
    assert result.parseoutcomes().get("failed") == 1, f"{test} missed {name} under {mutant.reveals_under}:\n{output[-3000:]}"
    assert f"layout {mutant.reveals_under}" in output, f"{test} failed for {name} without naming the layout:\n{output[-3000:]}"


def test_catalogue_covers_every_part_of_a_conversion() -> None:
    from conformance.mutants import PARTS
    from conformance.properties import PROPERTIES

    parts = {mutant.part for mutant in MUTANTS.values()}
    killers = {mutant.killed_by for mutant in MUTANTS.values()}
    assert len(MUTANTS) >= 25 and parts == set(PARTS) and killers == set(PROPERTIES), (len(MUTANTS), parts, killers)


def test_reference_bridge_passes_every_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "reference", "test_")
    result.assert_outcomes(passed=5)
    assert "bridge reference" in result.stdout.str(), "the report header names the bridge"
