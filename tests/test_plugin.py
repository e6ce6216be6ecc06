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



_DRAWS = """
import sys
sys.path.insert(0, sys.argv[1])
if "import" in sys.argv:
    import constants_of_a_local_module  # noqa: F401
if "independent" in sys.argv:
    from conformance.independent_draws import make_draws_independent
    make_draws_independent()
from hypothesis import given, settings, strategies as st
drawn = []
@settings(derandomize=True, max_examples=300, database=None)
@given(st.integers(0, 10**6), st.lists(st.integers(0, 9), min_size=4, max_size=8))
def draw(first, rest):
    drawn.append(first)
draw()
print(drawn)
"""


def test_suite_examples_are_independent_draws(tmp_path: Path) -> None:
    """Hypothesis draws constants from the source of imported local modules, and mutates each fresh
    example a few times keeping its first draws; the suite turns both off, so that its
    derandomized examples (and a bridge's known findings) do not depend on what a process imported
    before (under xdist: which test a worker ran first), and each example draws its layout, dtype
    and config afresh."""
    (tmp_path / "constants_of_a_local_module.py").write_text(
        "CONSTANTS = [" + ", ".join(str(31337 + 7919 * i) for i in range(40)) + "]\n")
    script = tmp_path / "draws.py"
    script.write_text(_DRAWS)

    def draws(*mode: str) -> list[int]:
        run = subprocess.run([sys.executable, str(script), str(tmp_path), *mode], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    def repeats(drawn: list[int]) -> int:
        """Examples whose first draw is the one before's (a mutation keeps it)."""
        return sum(a == b for a, b in zip(drawn, drawn[1:]))

    plain = draws()
    assert plain != draws("import") and repeats(plain) > len(plain) // 2, (
        f"Hypothesis no longer mixes local constants in, or mutates examples ({repeats(plain)} repeats of "
        f"{len(plain)}): this test shows nothing")
    independent, after_import = draws("independent"), draws("independent", "import")
    assert independent == after_import, (
        f"with make_draws_independent() an imported module still changed the draws: "
        f"{sum(a != b for a, b in zip(independent, after_import))} of {len(independent)} differ")
    # Hypothesis' first tenth of examples are small ones, each preceded by its simplest extension
    # (a repeat); 223 of 300 repeated the one before when this was written, 17 without mutations.
    assert repeats(independent) <= len(independent) // 10, (
        f"{repeats(independent)} of {len(independent)} examples repeat the one before ({repeats(plain)} with "
        f"Hypothesis' mutations)")
