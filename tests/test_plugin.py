"""The pytest plugin as a user meets it: --bridge, --max-examples, the header (--xfails-file: see
test_findings.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.bridge import BridgeNotFound, registered_bridges, resolve_bridge
from ernie_ref.megatron import ReferenceBridge

HERE = Path(__file__).parent


def run_suite(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    return pytester.runpytest_subprocess("--pyargs", "conformance", "-p", "no:cacheprovider", "-W", "ignore",
                                         "--published-in-ten", "0", *args)


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
    results = pytester.path / "results.json"
    result = run_suite(pytester, "--bridge", "reference", "-k", "test_import", "--max-examples", "7",
                       "--results-json", str(results))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "ernie-conformance *: bridge reference *",
        "megatron-core *, transformers *, torch *; hypothesis profile * max_examples=7 (7 examples, *",
    ])
    [record] = [r["record"] for r in json.loads(results.read_text())["results"]]
    assert record["valid"] == 7 and record["rounds"] == 1, record


UNRELATED_TESTS = '''
import os

from hypothesis import given, settings, strategies as st

# A project's own "ci" profile, as many projects have.
settings.register_profile("ci", max_examples=7)
settings.load_profile("ci")
RUNS = []


def test_the_plugin_is_loaded_and_changes_nothing(pytestconfig, request):
    assert pytestconfig.pluginmanager.has_plugin("ernie_conformance")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "0", "GPUs stay visible"
    assert settings.get_current_profile_name() == "ci" and settings.default.max_examples == 7
    assert not [f for f in pytestconfig.getini("filterwarnings") if "megatron" in f]
    assert not list(request.node.iter_markers("filterwarnings"))


@given(st.integers())
def test_hypothesis_runs_with_the_projects_profile(n):
    RUNS.append(n)


def test_that_it_ran_seven_examples():
    assert len(RUNS) == 7, RUNS
'''


def test_an_unrelated_session_is_untouched(tmp_path: Path) -> None:
    """Installing the package registers the plugin in every pytest session of the environment; a
    session that does not run the suite keeps its GPUs, its Hypothesis profile and its warnings."""
    (tmp_path / "test_unrelated.py").write_text(UNRELATED_TESTS)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "CI": "true"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_unrelated.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout and "ernie-conformance" not in run.stdout, run.stdout
