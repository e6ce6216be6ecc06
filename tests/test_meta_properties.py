"""Meta-tests: each property of the suite catches a deliberately broken bridge (tests/broken_bridges.py)
and passes the reference bridge. The suite runs exactly as a user runs it: pytest --pyargs conformance."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent

# broken bridge -> (the property test that must fail, what its failure message must say)
CAUGHT_BY = {
    "ExpertBiasNotLoaded": ("test_import", ".mlp.router.expert_bias"),
    "GateUpSwappedOnExport": ("test_round_trip", "[round_trip] exported checkpoint differs from the original: value: "),
    "ExpertBiasWeighsExperts": ("test_equivalence", "router weights: relative error"),
    "ConfigWithoutModelType": ("test_interop", "[interop] transformers cannot load the export"),
    "LenientLoader": ("test_refusal", "[refusal] load accepted a corrupt checkpoint without error"),
}


# Bridges right on one rank and wrong only under one kind of split: the layouts they are given
# include one rank, so each is caught only by drawing the split layout.
CAUGHT_UNDER_LAYOUT = {
    "GateUpSplitContiguouslyUnderTP": ("tp1-pp1-ep1-vpp1,tp2-pp1-ep1-vpp1", "test_equivalence", "layout tp2-pp1-ep1-vpp1"),
    "ExpertOffsetIgnoredUnderEP": ("tp1-pp1-ep1-vpp1,tp1-pp1-ep2-vpp1", "test_round_trip", "layout tp1-pp1-ep2-vpp1"),
    "LayerOffsetIgnoredUnderPP": ("tp1-pp1-ep1-vpp1,tp1-pp2-ep1-vpp1", "test_round_trip", "layout tp1-pp2-ep1-vpp1"),
}


def run_suite(pytester: pytest.Pytester, bridge: str, test: str, *options: str) -> pytest.RunResult:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    return pytester.runpytest_subprocess(
        "--pyargs", "conformance", "--bridge", bridge, "-k", test,
        "--hypothesis-profile=ci", "--no-shrink", "-p", "no:cacheprovider", "-W", "ignore", *options,
    )


@pytest.mark.parametrize("broken", list(CAUGHT_BY))
def test_property_catches_broken_bridge(pytester: pytest.Pytester, broken: str) -> None:
    test, message = CAUGHT_BY[broken]
    result = run_suite(pytester, f"broken_bridges:{broken}", test)
    output = result.stdout.str()
    result.assert_outcomes(failed=1)
    assert message in output, f"{test} failed for {broken} without saying {message!r}:\n{output[-3000:]}"


@pytest.mark.parametrize("broken", list(CAUGHT_UNDER_LAYOUT))
def test_layouts_catch_bridges_wrong_only_when_split(pytester: pytest.Pytester, broken: str) -> None:
    layouts, test, message = CAUGHT_UNDER_LAYOUT[broken]
    single = run_suite(pytester, f"broken_bridges:{broken}", test, "--layouts", "tp1-pp1-ep1-vpp1")
    single.assert_outcomes(passed=1)  # right on one rank
    result = run_suite(pytester, f"broken_bridges:{broken}", test, "--layouts", layouts)
    output = result.stdout.str()
    result.assert_outcomes(failed=1)
    assert message in output, f"{test} failed for {broken} without naming {message!r}:\n{output[-3000:]}"


def test_reference_bridge_passes_every_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "reference", "test_")
    result.assert_outcomes(passed=5)
    assert "bridge reference" in result.stdout.str(), "the report header names the bridge"
