"""Meta-tests: the suite kills every mutant of the catalogue (`conformance/mutants/`) with the
property the mutant names, at the ci profile. (That the same suite passes the reference bridge is
the README's first line, tests/test_cli.py::test_no_arguments_certifies_the_reference_bridge.) The
suite runs exactly as a user runs it: `pytest --pyargs conformance --bridge ...`, in a fresh
process, and each kill is checked on its structured result (results JSON and counterexample): the
property, and the failure's kind and facts that the mutant's bug must cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conformance.counterexample import Counterexample
from conformance.mutants import MUTANTS, mutant_spec
from ernie_ref.layout import Layout

HERE = Path(__file__).parent
SINGLE_RANK = "tp1-pp1-ep1-vpp1"
# The catalogue's bugs show on small configs (one example of a published structure costs 2 to 10 s,
# as much as a mutant's whole run), so its meta-tests draw those alone; a later option wins, and
# the test of deep models draws the published structures' share as the suite does by default.
SMALL_CONFIGS = ("--published-in-ten", "0")
DEFAULT_SHARE = ("--published-in-ten", "2")


def run_suite(pytester: pytest.Pytester, bridge: str, test: str, *options: str) -> pytest.RunResult:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    return pytester.runpytest_subprocess(
        "--pyargs", "conformance", "--bridge", bridge, "-k", test, "--results-json", str(pytester.path / "results.json"),
        "--counterexamples", str(pytester.path / "counterexamples"),
        "--hypothesis-profile=ernie-ci", "--no-shrink", "--no-triggers", "-p", "no:cacheprovider", "-W", "ignore",
        *SMALL_CONFIGS, *options,
    )


def recorded_result(pytester: pytest.Pytester, test: str) -> dict:
    """The structured result of `test` (results JSON) of the last run_suite."""
    results = json.loads((pytester.path / "results.json").read_text())["results"]
    [result] = [r for r in results if r["test"].endswith(f"::{test}")]
    return result


def assert_killed_for_its_bug(pytester: pytest.Pytester, name: str, result: pytest.RunResult) -> Counterexample:
    """The mutant's killing property failed, with the failure its bug causes (kind and facts, not
    a phrase any failure would contain); returns the counterexample."""
    mutant = MUTANTS[name]
    test = f"test_{mutant.killed_by}"
    outcome = recorded_result(pytester, test)
    assert outcome["verdict"] == "fail", (
        f"mutant {name} ({mutant.bug()}) was not killed by {test}: verdict {outcome['verdict']} {outcome['why']}\n"
        f"{result.stdout.str()[-3000:]}")
    problem = mutant.mismatch(outcome["record"]["failure"])
    assert problem is None, f"{test} killed {name} for another reason than its bug: {problem}"
    return Counterexample.load(outcome["counterexample"])


@pytest.mark.catalogue
@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_killed(pytester: pytest.Pytester, name: str) -> None:
    """Layouts drawn as by default (every layout of up to 4 ranks), within the ci profile's examples.

    fp32 checkpoints, except for the mutants that only bf16 reveals: the check of the failure's
    stage needs fp32's tight tolerance (in bf16 a bug's error may stay under the tolerance at its
    own stage and pass it later); that bf16 kills them too is test_bf16_tolerance_is_tight_enough_to_kill."""
    dtype = () if MUTANTS[name].reveals_in else ("--dtype", "fp32")
    share = DEFAULT_SHARE if MUTANTS[name].reveals_in_published_structures else ()
    result = run_suite(pytester, mutant_spec(name), f"test_{MUTANTS[name].killed_by}", *dtype, *share)
    assert_killed_for_its_bug(pytester, name, result)


def assert_only_revealed_by(pytester: pytest.Pytester, name: str, right: tuple[str, ...],
                            revealing: tuple[str, ...]) -> Counterexample:
    """The mutant passes its killing property with options `right` and dies with `revealing`,
    for its bug; returns the counterexample of the kill."""
    test = f"test_{MUTANTS[name].killed_by}"
    passing = run_suite(pytester, mutant_spec(name), test, *right)
    assert recorded_result(pytester, test)["verdict"] == "pass", (
        f"{name} should pass {test} with {right}:\n{passing.stdout.str()[-3000:]}")
    return assert_killed_for_its_bug(pytester, name, run_suite(pytester, mutant_spec(name), test, *revealing))


LAYOUT_MUTANTS = [name for name, mutant in MUTANTS.items() if mutant.reveals_under]


@pytest.mark.catalogue
@pytest.mark.parametrize("name", LAYOUT_MUTANTS)
def test_layouts_reveal_bugs_of_split_models(pytester: pytest.Pytester, name: str) -> None:
    """Right on one rank; drawing the one split layout that the bug needs is what kills it."""
    split = MUTANTS[name].reveals_under
    killed = assert_only_revealed_by(pytester, name, ("--layouts", SINGLE_RANK), ("--layouts", f"{SINGLE_RANK},{split}"))
    assert str(Layout(**killed.layout)) == split, f"{name} was killed under {killed.layout}, not under {split}"


DEEP_MUTANTS = [name for name, mutant in MUTANTS.items() if mutant.reveals_in_published_structures]


@pytest.mark.catalogue
@pytest.mark.parametrize("name", DEEP_MUTANTS)
def test_published_structures_reveal_bugs_of_deep_models(pytester: pytest.Pytester, name: str) -> None:
    """Right for every small config (at most 8 layers, 6 experts); dies on a published structure,
    which the default draws include."""
    test = f"test_{MUTANTS[name].killed_by}"
    passing = run_suite(pytester, mutant_spec(name), test, "--dtype", "fp32")
    assert recorded_result(pytester, test)["verdict"] == "pass", passing.stdout.str()[-3000:]
    killed = assert_killed_for_its_bug(pytester, name, run_suite(pytester, mutant_spec(name), test, "--dtype", "fp32",
                                                                 *DEFAULT_SHARE))
    assert killed.case().config.num_hidden_layers > 10, killed.case().config.one_line()


def test_catalogue_covers_every_part_of_a_conversion() -> None:
    from conformance.mutants import PARTS
    from conformance.properties import FAILURE_KINDS, PROPERTIES

    parts = {mutant.part for mutant in MUTANTS.values()}
    killers = {mutant.killed_by for mutant in MUTANTS.values()}
    assert parts == set(PARTS) and killers == set(PROPERTIES), (parts, killers)
    for name, mutant in MUTANTS.items():  # a kind, or a tuple of the kinds allowed
        kinds = mutant.expect["kind"] if isinstance(mutant.expect["kind"], tuple) else (mutant.expect["kind"],)
        assert set(kinds) <= set(FAILURE_KINDS), f"{name}: {kinds}"


def test_catalogue_size_is_the_documented_one() -> None:
    """The README and the kill matrix speak of the catalogue as it is."""
    readme = (HERE.parent / "README.md").read_text()
    assert f"a catalogue of {len(MUTANTS)} broken bridges" in readme, "README's catalogue size"
    matrix = (HERE.parent / "docs" / "kill-matrix.md").read_text()
    listed = {name for name in MUTANTS if f"| `{name}` |" in matrix}
    assert listed == set(MUTANTS), f"docs/kill-matrix.md lacks {sorted(set(MUTANTS) - listed)}"


def test_kill_matrix_update_replaces_only_the_rows_it_measured() -> None:
    """`kill-matrix --mutants ... --update`: the rows measured anew replace or join the others, the
    summary is recounted from every row, and the document says which rows were measured when."""
    from conformance.kill_matrix import Kill, MutantRun, render_markdown, update_markdown

    first, second, third = list(MUTANTS)[:3]

    def killed(name: str, seconds: float) -> MutantRun:
        prop = MUTANTS[name].killed_by
        return MutantRun(name, {prop: Kill(prop, True, 2, seconds, seconds)})

    whole = render_markdown([killed(first, 1.0), killed(second, 2.0)], "ci", 60.0)
    updated = update_markdown(whole, [MutantRun(second, {}), killed(third, 4.0)], "ci")
    rows = {line.split("`")[1]: line for line in updated.splitlines() if line.startswith("| `")}
    assert set(rows) == {first, second, third}, rows
    assert rows[first] == next(line for line in whole.splitlines() if line.startswith(f"| `{first}`")), "kept as it was"
    assert "**killed**" not in rows[second] and "#2, 4.0s" in rows[third], rows
    assert f"**2 of 3 killed**; survivors: {second}. Time to kill (fastest property): median 2.5s, max 4.0s." in updated
    assert f"Rows of `{second}`, `{third}` measured" in updated and "(3 broken" in updated, updated[:800]


DTYPE_MUTANTS = [name for name, mutant in MUTANTS.items() if mutant.reveals_in]


@pytest.mark.catalogue
@pytest.mark.parametrize("name", DTYPE_MUTANTS)
def test_bf16_checkpoints_reveal_bugs_of_bf16_conversions(pytester: pytest.Pytester, name: str) -> None:
    """Right for fp32 checkpoints; drawing bf16 ones is what kills it."""
    killed = assert_only_revealed_by(pytester, name, ("--dtype", "fp32", "--layouts", SINGLE_RANK),
                                     ("--dtype", "bf16", "--layouts", SINGLE_RANK))
    assert killed.dtype == "bfloat16", killed


EQUIVALENCE_MUTANTS = [name for name, mutant in MUTANTS.items()
                       if mutant.killed_by == "equivalence" and not mutant.reveals_under]


@pytest.mark.parametrize("name", EQUIVALENCE_MUTANTS)
def test_bf16_tolerance_is_tight_enough_to_kill(megatron_runtime, name: str) -> None:
    """The bf16 tolerance (BF16_RTOL, BF16_ROUTING_MARGIN) still kills what equivalence kills in
    fp32: on bf16 checkpoints alone, within the ci profile's 100 examples (one rank, in process)."""
    from hypothesis import HealthCheck, Phase, given, reject, settings
    from hypothesis import strategies as st

    from conformance.numerics import tolerance
    from conformance.cases import Case
    from conformance.properties import PropertyFailure, SetAside, run_property
    from conformance.strategies import ConfigLimits, checkpoint_formats, configs, inputs, seeds

    bridge = MUTANTS[name]()

    @settings(max_examples=100, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def equivalence_on_bf16(data: st.DataObject) -> None:
        limits = ConfigLimits(min_hidden=tolerance("bfloat16").min_hidden_size)
        cfg = data.draw(configs(limits), label="config")
        case = Case(config=cfg, weights_seed=data.draw(seeds(), label="weights seed"),
                    inputs=data.draw(inputs(), label="inputs"), dtype="bfloat16",
                    checkpoint_format=data.draw(checkpoint_formats(cfg), label="checkpoint format"))
        try:
            run_property("equivalence", bridge, case)
        except SetAside:
            reject()

    with pytest.raises(PropertyFailure) as killed:
        equivalence_on_bf16()
    assert "bfloat16 weights seed" in str(killed.value), str(killed.value)
