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


def run_suite(pytester: pytest.Pytester, bridge: str, test: str) -> pytest.RunResult:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    return pytester.runpytest_subprocess(
        "--pyargs", "conformance", "--bridge", bridge, "-k", test,
        "--hypothesis-profile=ci", "-p", "no:cacheprovider", "-W", "ignore",
    )


@pytest.mark.parametrize("broken", list(CAUGHT_BY))
def test_property_catches_broken_bridge(pytester: pytest.Pytester, broken: str) -> None:
    test, message = CAUGHT_BY[broken]
    result = run_suite(pytester, f"broken_bridges:{broken}", test)
    output = result.stdout.str()
    result.assert_outcomes(failed=1)
    assert message in output, f"{test} failed for {broken} without saying {message!r}:\n{output[-3000:]}"


def test_reference_bridge_passes_every_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "reference", "test_")
    result.assert_outcomes(passed=5)
    assert "bridge reference" in result.stdout.str(), "the report header names the bridge"
