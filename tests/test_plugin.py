"""The pytest plugin as a user meets it: --bridge, --max-examples, --xfails-file, the header."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.bridge import BridgeNotFound, registered_bridges, resolve_bridge
from ernie_ref.megatron import ReferenceBridge

HERE = Path(__file__).parent


def run_suite(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    return pytester.runpytest_subprocess("--pyargs", "conformance", "-p", "no:cacheprovider", "-W", "ignore", *args)


def test_reference_is_registered_and_importable_by_path() -> None:
    assert registered_bridges()["reference"] == "ernie_ref.megatron:ReferenceBridge"
    assert isinstance(resolve_bridge("reference"), ReferenceBridge)
    assert isinstance(resolve_bridge("ernie_ref.megatron:ReferenceBridge"), ReferenceBridge)


@pytest.mark.parametrize("name, message", [
    ("nonesuch", "not a registered bridge"),
    ("nonesuch.module:Bridge", "cannot import 'nonesuch.module:Bridge'"),
    ("ernie_ref.config:ErnieMoeConfig.from_hf", "cannot import"),
    ("ernie_ref:ErnieMoeForCausalLM", "lacks"),
])
def test_unknown_bridges_are_named(name: str, message: str) -> None:
    with pytest.raises(BridgeNotFound, match=message):
        resolve_bridge(name)


def test_unknown_bridge_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "--bridge", "nonesuch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--bridge 'nonesuch': not a registered bridge*"])


def test_header_names_bridge_and_versions_and_max_examples_applies(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "--bridge", "reference", "-k", "test_import", "--max-examples", "7",
                       "--hypothesis-show-statistics")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "ernie-conformance *: bridge reference *",
        "megatron-core *, transformers *, torch *; hypothesis profile *-n7 (7 examples)",
        "*7 passing*",
    ])


def test_xfails_file_expects_failures_strictly(pytester: pytest.Pytester) -> None:
    xfails = pytester.path / "xfails.txt"
    xfails.write_text("# known failures of this bridge\nsuite/test_properties.py::test_round_trip\n")
    broken = run_suite(pytester, "--bridge", "conformance.mutants:GateUpSwappedOnExport", "-k", "round_trip",
                       "--xfails-file", str(xfails), "--hypothesis-profile=ernie-ci")
    broken.assert_outcomes(xfailed=1)
    fixed = run_suite(pytester, "--bridge", "reference", "-k", "round_trip", "--xfails-file", str(xfails),
                      "--hypothesis-profile=ernie-ci")
    fixed.assert_outcomes(failed=1)
    fixed.stdout.fnmatch_lines(["*XPASS(strict)*"])
