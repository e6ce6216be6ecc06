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


def assert_only_revealed_by(pytester: pytest.Pytester, name: str, right: tuple[str, ...], revealing: tuple[str, ...],
                            named: str) -> None:
    """The mutant passes its killing property with options `right` and dies with `revealing`,
    in a failure message that names what revealed it (`named`)."""
    test = f"test_{MUTANTS[name].killed_by}"
    passing = run_suite(pytester, mutant_spec(name), test, *right)
    assert passing.parseoutcomes().get("passed") == 1, f"{name} should pass {test} with {right}:\n{passing.stdout.str()[-3000:]}"
    result = run_suite(pytester, mutant_spec(name), test, *revealing)
    output = result.stdout.str()
    assert result.parseoutcomes().get("failed") == 1, f"{test} missed {name} with {revealing}:\n{output[-3000:]}"
    assert named in output and MUTANTS[name].says in output, (
        f"{test} failed for {name} without saying {named!r} and {MUTANTS[name].says!r}:\n{output[-3000:]}")


LAYOUT_MUTANTS = [name for name, mutant in MUTANTS.items() if mutant.reveals_under]


@pytest.mark.catalogue
@pytest.mark.parametrize("name", LAYOUT_MUTANTS)
def test_layouts_reveal_bugs_of_split_models(pytester: pytest.Pytester, name: str) -> None:
    """Right on one rank; drawing the one split layout that the bug needs is what kills it."""
    split = MUTANTS[name].reveals_under
    assert_only_revealed_by(pytester, name, ("--layouts", SINGLE_RANK), ("--layouts", f"{SINGLE_RANK},{split}"),
                            f"layout {split}")


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


DTYPE_MUTANTS = [name for name, mutant in MUTANTS.items() if mutant.reveals_in]


@pytest.mark.catalogue
@pytest.mark.parametrize("name", DTYPE_MUTANTS)
def test_bf16_checkpoints_reveal_bugs_of_bf16_conversions(pytester: pytest.Pytester, name: str) -> None:
    """Right for fp32 checkpoints; drawing bf16 ones is what kills it."""
    assert_only_revealed_by(pytester, name, ("--dtype", "fp32", "--layouts", SINGLE_RANK),
                            ("--dtype", "bf16", "--layouts", SINGLE_RANK), "bfloat16 weights seed")


EQUIVALENCE_MUTANTS = [name for name, mutant in MUTANTS.items()
                       if mutant.killed_by == "equivalence" and not mutant.reveals_under]


@pytest.mark.parametrize("name", EQUIVALENCE_MUTANTS)
def test_bf16_tolerance_is_tight_enough_to_kill(megatron_runtime, name: str) -> None:
    """The bf16 tolerance (BF16_RTOL, BF16_ROUTING_MARGIN) still kills what equivalence kills in
    fp32: on bf16 checkpoints alone, within the ci profile's 100 examples (one rank, in process)."""
    from hypothesis import HealthCheck, Phase, given, reject, settings
    from hypothesis import strategies as st

    from conformance.numerics import tolerance
    from conformance.properties import Case, NearTie, PropertyFailure, run_property
    from conformance.strategies import ConfigLimits, configs, inputs, seeds

    bridge = MUTANTS[name]()

    @settings(max_examples=100, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def equivalence_on_bf16(data: st.DataObject) -> None:
        limits = ConfigLimits(allow_bias=False, min_hidden=tolerance("bfloat16").min_hidden_size)
        cfg = data.draw(configs(limits), label="config")
        case = Case(config=cfg, weights_seed=data.draw(seeds(), label="weights seed"),
                    inputs=data.draw(inputs(), label="inputs"), dtype="bfloat16")
        try:
            run_property("equivalence", bridge, case)
        except NearTie:
            reject()

    with pytest.raises(PropertyFailure) as killed:
        equivalence_on_bf16()
    assert "bfloat16 weights seed" in str(killed.value), str(killed.value)
