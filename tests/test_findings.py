"""Findings: trigger isolation on defects whose trigger is known (a property stand-in that fails
exactly where a planted condition holds), the words of triggers, ids and merging, the
known-failures file by finding id, `compare`, and, end to end, bridges with two and three
independent planted defects, each reported as its own finding with its own trigger."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conformance.cases import Case, Corruption, Inputs
from conformance.compare import compare, load_certificate, render_markdown, render_text
from conformance.findings import (
    REDRAWS, UNJUDGED, Condition, Finding, MoveContext, Trigger, cure, finding_id, isolate_trigger, merge_findings,
    redraws, same_defect, signature,
)
from conformance.mutants import ThreePlantedDefects, TwoPlantedDefects
from conformance.known_failures import read_known_findings
from conformance.properties import PropertyFailure
from ernie_ref import CheckpointFormat, ErnieMoeConfig
from ernie_ref.layout import Layout

ONE_RANK = Layout()
TP2 = Layout(tp=2)
CONTEXT = MoveContext(layouts=(ONE_RANK, TP2, Layout(ep=2), Layout(pp=2)), dtypes=("float32", "bfloat16"))


def small_case(**changes: Any) -> Case:
    """A valid two-layer MoE example, fp32 on one rank, with `changes` to its config."""
    cfg = ErnieMoeConfig(vocab_size=16, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, moe_num_experts=4, moe_k=2,
                         moe_intermediate_size=4, moe_num_shared_experts=1, moe_layer_start_index=0,
                         moe_layer_end_index=1, rope_theta=500000.0, tie_word_embeddings=True)
    return Case(config=cfg.replace(**changes), weights_seed=0, inputs=Inputs(batch=2, seq_len=4, seed=0))


# ------------------------------------------------------------------------------ a planted property
def crash(case: Case) -> PropertyFailure:
    return PropertyFailure("import", case, "load raised ValueError: planted", kind="bridge raised",
                           facts={"call": "load", "exception": "ValueError"})


def divergence(case: Case, stage: str = "layer 0 attention", stage_kind: str = "attention") -> PropertyFailure:
    return PropertyFailure("equivalence", case, f"diverges at {stage}", kind="divergence",
                           facts={"stage": stage, "stage_kind": stage_kind},
                           evidence={"stage_errors": [("embedding", 0.0), (stage, 0.5)]})


def planted(defect: Callable[[Case], bool], failure: Callable[[Case], PropertyFailure] = crash,
            earlier: Callable[[Case], bool] = lambda case: False) -> Callable[[Case], Any]:
    """A property that fails with `failure` exactly where `defect(case)` holds, and that raises
    earlier (at load) where `earlier(case)` holds, hiding whatever comes after."""
    runs: list[Case] = []

    def run(case: Case) -> Any:
        runs.append(case)
        if earlier(case):
            return PropertyFailure("equivalence", case, "load raised RuntimeError", kind="bridge raised",
                                   facts={"call": "load", "exception": "RuntimeError"})
        if defect(case):
            return failure(case)
        return {"stage_errors": [("embedding", 0.0), ("layer 0 attention", 0.0), ("output logits", 0.0)]}

    run.runs = runs  # type: ignore[attr-defined]
    return run


def trigger_of(case: Case, defect: Callable[[Case], bool], failure: Callable[[Case], PropertyFailure] = crash,
               **kw: Any) -> Trigger:
    assert defect(case), "the example must show the defect"
    run = planted(defect, failure, **kw)
    trigger, runs = isolate_trigger(failure(case), CONTEXT, run)
    assert runs == len(run.runs) > 0, (runs, len(run.runs))
    for moved in run.runs:  # every moved example is a valid example of the suite's space
        assert moved.layout in CONTEXT.layouts and moved.config.moe_layers, moved.describe()
    return trigger


def gapped(case: Case) -> bool:
    cfg = case.config
    return cfg.moe_layers != list(range(cfg.moe_layer_start_index, cfg.num_hidden_layers))


@pytest.mark.parametrize(("changes", "layout", "dtype", "defect", "words"), [
    ({"moe_num_shared_experts": 0}, ONE_RANK, "float32", lambda c: c.config.moe_num_shared_experts == 0,
     "moe_num_shared_experts = 0"),
    ({"rope_theta": 10000.0}, ONE_RANK, "float32", lambda c: c.config.rope_theta != 500000.0,
     "rope_theta != 500000"),
    ({"num_hidden_layers": 3, "moe_layer_end_index": 1}, ONE_RANK, "float32",
     lambda c: c.config.moe_layer_end_index < c.config.num_hidden_layers - 1,
     "moe_layer_end_index < num_hidden_layers - 1"),
    ({"moe_k": 1}, ONE_RANK, "float32", lambda c: c.config.moe_k == 1, "moe_k = 1"),
    # A routing defect that every expert chosen hides (an expert bias dropped), whether moe_k is
    # next to the number of experts or not.
    ({}, ONE_RANK, "float32", lambda c: c.config.moe_k < c.config.moe_num_experts, "moe_k < moe_num_experts"),
    ({"moe_k": 3}, ONE_RANK, "float32", lambda c: c.config.moe_k < c.config.moe_num_experts,
     "moe_k < moe_num_experts"),
    ({}, TP2, "float32", lambda c: c.layout.tp > 1, "tp > 1"),
    ({}, ONE_RANK, "bfloat16", lambda c: c.dtype == "bfloat16", "bf16 checkpoint"),
    ({"num_hidden_layers": 4, "moe_layer_end_index": 3, "moe_layer_interval": 2}, ONE_RANK, "float32",
     lambda c: c.config.moe_layer_interval > 1, "moe_layer_interval > 1"),
    ({"tie_word_embeddings": False}, ONE_RANK, "float32",
     lambda c: not c.config.tie_word_embeddings and c.inputs.seq_len > 1,
     "tie_word_embeddings = false and seq_len > 1"),
    # A bridge that builds MoE layers from the start index to the last (Megatron-Bridge 0.6.2): one
    # trigger however the gap is made, by the end index, the interval, or both at once (where
    # neither field's move alone closes the gap).
    ({"num_hidden_layers": 3, "moe_layer_end_index": 1}, ONE_RANK, "float32", gapped,
     "MoE layers not every layer from moe_layer_start_index to the last"),
    ({"num_hidden_layers": 4, "moe_layer_end_index": 3, "moe_layer_interval": 2}, ONE_RANK, "float32", gapped,
     "MoE layers not every layer from moe_layer_start_index to the last"),
    ({"num_hidden_layers": 4, "moe_layer_end_index": 2, "moe_layer_interval": 3}, ONE_RANK, "float32", gapped,
     "MoE layers not every layer from moe_layer_start_index to the last"),
])
def test_isolation_finds_exactly_the_planted_trigger(changes, layout, dtype, defect, words) -> None:
    case = replace(small_case(**changes), layout=layout, dtype=dtype)
    trigger = trigger_of(case, defect)
    assert trigger.words() == words, f"planted {words!r}, isolated {trigger.words()!r} ({trigger})"


@pytest.mark.parametrize(("fmt", "defect", "words"), [
    (CheckpointFormat(mtp=True, published_extra_keys=True), lambda c: c.checkpoint_format.mtp,
     "MTP tensors in the checkpoint"),
    (CheckpointFormat(legacy_rope_theta=True, mtp=True), lambda c: c.checkpoint_format.legacy_rope_theta,
     "legacy top-level rope_theta (no rope_parameters)"),
    # A key read wrongly when absent: it needs the key omitted, which needs the default value.
    (CheckpointFormat(omitted=("moe_layer_end_index", "tie_word_embeddings")),
     lambda c: "tie_word_embeddings" in c.checkpoint_format.omitted,
     "tie_word_embeddings = true and config.json omits tie_word_embeddings (transformers' default)"),
])
def test_isolation_finds_a_checkpoint_format_trigger(fmt: CheckpointFormat, defect, words: str) -> None:
    trigger = trigger_of(replace(small_case(), checkpoint_format=fmt), defect)
    assert trigger.words() == words, f"planted {words!r}, isolated {trigger.words()!r} ({trigger})"
    for later in (replace(small_case(), checkpoint_format=replace(fmt, published_extra_keys=True)),
                  replace(small_case(rms_norm_eps=1e-6), checkpoint_format=fmt)):
        assert trigger.matches(later), f"{trigger.words()} must cover {later.describe()}"
    assert not trigger.matches(small_case()), "the canonical format is not covered"


def test_a_defect_on_every_example_reads_any_moe_layer_at_the_router() -> None:
    def router(case: Case) -> PropertyFailure:
        return divergence(case, "layer 0 router choice", "router choice")

    trigger = trigger_of(small_case(), lambda c: True, router)
    assert trigger.conditions == () and trigger.words("router choice") == "any MoE layer", trigger
    assert Trigger().words("output logits") == "any example"


def test_a_moved_example_that_fails_earlier_judges_nothing() -> None:
    """Moving moe_num_shared_experts to 0 crashes the load, which hides the rope divergence: the
    crash says nothing about whether the divergence needs the field, so it is not in the trigger."""
    trigger = trigger_of(small_case(rope_theta=10000.0), lambda c: c.config.rope_theta != 500000.0, divergence,
                         earlier=lambda c: c.config.moe_num_shared_experts == 0)
    assert trigger.words() == "rope_theta != 500000", trigger


def test_a_cure_that_other_weights_undo_is_no_cure() -> None:
    """A defect that shows only for some weights (a dropped expert bias changes a token's choice only
    where the bias outweighs the scores' gap): here moving hidden_size to 34 happens to draw weights
    on which it does not show, while under other weights, at the same hidden_size, it shows again.
    The field is not in the trigger; the planted condition is."""
    def shows(case: Case) -> bool:
        lucky = case.config.hidden_size == 34 and case.weights_seed == 0 and case.inputs.seed == 0
        return case.config.moe_num_shared_experts == 0 and not lucky

    def router(case: Case) -> PropertyFailure:
        return divergence(case, "layer 0 router choice", "router choice")

    run = planted(shows, router)
    trigger, runs = isolate_trigger(router(small_case(moe_num_shared_experts=0)), CONTEXT, run)
    moves_to_34 = [c for c in run.runs if c.config.hidden_size == 34]  # the lucky move, then its redraws
    assert trigger.words("router choice") == "moe_num_shared_experts = 0", (
        f"isolated {trigger.words('router choice')!r} ({trigger}); the move of hidden_size to 34 cures only under "
        f"weights seed 0, and its first redraw {[c.describe() for c in redraws(moves_to_34[0])[:1]]} shows the defect again")
    lucky = [(c.weights_seed, c.inputs.seed) for c in moves_to_34]
    assert lucky == [(0, 0), (1, 1)], f"the lucky move, then its first redraw (which shows the defect again): {lucky}"
    cured = [(c.weights_seed, c.inputs.seed) for c in run.runs if c.config.moe_num_shared_experts == 1]
    assert cured == [(i, i) for i in range(REDRAWS + 1)], f"a move that cures, then each redraw (all cured): {cured}"
    assert runs == len(run.runs), (runs, len(run.runs))


def test_a_corruption_trigger_reads_as_the_kind_and_part_of_the_tensor() -> None:
    case = small_case()
    target = "model.layers.0.mlp.experts.1.down_proj.weight"
    corrupt = replace(case, corruption=Corruption("missing", target))

    def accepted(c: Case) -> PropertyFailure:
        return PropertyFailure("refusal", c, "load accepted it", kind="accepted corruption",
                               facts={"corruption": c.corruption.kind})

    def defect(c: Case) -> bool:
        return c.corruption is not None and c.corruption.kind == "missing" and ".mlp.experts." in c.corruption.target

    trigger = trigger_of(corrupt, defect, accepted)
    assert trigger.words() == "missing routed-expert tensor", trigger


@pytest.mark.parametrize(("conditions", "words"), [
    ((Condition("corruption_kind", "not in", ["config", "misshaped"]),), "missing or extra tensor"),
    ((Condition("corruption_kind", "=", "config"),), "contradicting config.json field"),
    ((Condition("corruption_kind", "=", "extra"), Condition("corrupted_part", "!=", "router")),
     "extra tensor (corrupted part != router)"),
    ((Condition("moe_layer_end_index", "=", "before last"), Condition("dtype", "=", "bfloat16")),
     "moe_layer_end_index < num_hidden_layers - 1 and bf16 checkpoint"),
    ((Condition("dtype", "!=", "float32"),), "bf16 checkpoint"),
])
def test_triggers_read_in_words(conditions, words) -> None:
    assert Trigger(conditions).words() == words


def test_a_divergence_is_cured_only_where_the_stages_are_at_rounding_level() -> None:
    original = divergence(small_case())
    moved = small_case(rope_theta=20000.0)
    quiet = {"stage_errors": [("embedding", 0.0), ("layer 0 attention", 1e-8), ("output logits", 2e-8)]}
    loud = {"stage_errors": [("embedding", 0.0), ("layer 0 attention", 3e-6), ("output logits", 5e-6)]}
    assert cure(original, moved, quiet) is True
    assert cure(original, moved, loud) is None, "a pass within tolerance but above noise cannot tell"
    assert cure(original, moved, divergence(moved)) is False
    assert cure(original, moved, UNJUDGED) is None
    later = divergence(moved, "layer 1 experts", "experts")
    assert cure(original, moved, later) is True, "it fails later, with attention at rounding level"
    later.evidence["stage_errors"] = [("layer 0 attention", 3e-6), ("layer 1 experts", 0.5)]
    assert cure(original, moved, later) is None, "its attention error is not shown to be at rounding level"


def test_a_crash_is_cured_by_a_pass_or_a_later_failure_not_an_earlier_one() -> None:
    original = PropertyFailure("round_trip", small_case(), "export raised", kind="bridge raised",
                               facts={"call": "export", "exception": "KeyError"})
    moved = small_case(moe_num_shared_experts=2)
    assert cure(original, moved, {}) is True
    assert cure(original, moved, crash(moved)) is None, "load comes before export: it hides the export"
    assert cure(original, moved, original) is False
    differs = PropertyFailure("round_trip", moved, "differs", kind="checkpoint differs", facts={"diff": ["value"]})
    assert cure(original, moved, differs) is True


def test_an_export_that_writes_files_cures_one_that_wrote_no_weights() -> None:
    """round_trip checks that export wrote its files before it compares their contents: a moved
    example whose export differs only in a dtype got past the original's failure (Megatron-Bridge
    0.5.1 writes no weights with use_bias; its bf16 router dtype must not hide that trigger)."""
    original = PropertyFailure("round_trip", small_case(use_bias=True), "export wrote no weights",
                               kind="checkpoint differs", facts={"diff": ["no weights file"]})
    moved = small_case()
    dtype = PropertyFailure("round_trip", moved, "differs", kind="checkpoint differs", facts={"diff": ["dtype"]})
    assert cure(original, moved, dtype) is True
    assert cure(dtype, moved, original) is None, "wrote nothing: earlier than the original's content check"


# ------------------------------------------------------------------------------ ids and merging
def test_ids_name_the_kind_and_the_trigger_fields_not_their_values() -> None:
    zero = Trigger((Condition("moe_num_shared_experts", "=", 0),))
    two = Trigger((Condition("moe_num_shared_experts", "=", 2),))
    sig = signature(crash(small_case()))
    assert sig == "load raises ValueError"
    assert finding_id(sig, zero) == finding_id(sig, two) == "load-raises-valueerror@moe_num_shared_experts"
    assert finding_id(sig, Trigger()) == "load-raises-valueerror@any"
    assert finding_id(sig, None) == "load-raises-valueerror@not-isolated"


def test_a_finding_covers_its_trigger_only() -> None:
    trigger = Trigger((Condition("moe_num_shared_experts", "=", 0),))
    failure = crash(small_case(moe_num_shared_experts=0))
    finding = Finding(prop="import", signature=signature(failure), kind=failure.kind, facts=failure.facts,
                      trigger=trigger, message=failure.detail)
    assert finding.covers(failure)
    assert not finding.covers(crash(small_case(moe_num_shared_experts=2))), "outside the trigger: another defect"
    assert not finding.covers(divergence(small_case(moe_num_shared_experts=0))), "another kind of failure"
    assert finding.summary == "load raises ValueError when moe_num_shared_experts = 0"


def test_divergences_with_nested_triggers_are_one_defect_in_one_property() -> None:
    rope = Trigger((Condition("rope_theta", "!=", 500000.0), Condition("seq_len", "!=", 1)))
    failure = divergence(small_case(rope_theta=10000.0))
    finding = Finding(prop="equivalence", signature=signature(failure), kind="divergence", facts=failure.facts,
                      trigger=rope, message="")
    assert same_defect(finding, "diverges at experts", Trigger((Condition("rope_theta", "!=", 500000.0),)),
                       "equivalence")
    assert not same_defect(finding, "diverges at experts", Trigger((Condition("tie_word_embeddings", "=", False),)),
                           "equivalence")
    assert not same_defect(finding, "diverges at experts", Trigger(), "equivalence"), "'any' hides nothing"


def test_merging_keeps_one_entry_per_id_across_properties() -> None:
    def result(prop: str, hits: int) -> dict:
        return {"record": {"findings": [{"id": "load-raises-valueerror@moe_num_shared_experts", "property": prop,
                                          "hits": hits, "counterexample": f"{prop}.json"}]}}

    [merged] = merge_findings([result("import", 3), result("round_trip", 5), {"record": {}}])
    assert merged["properties"] == ["import", "round_trip"]
    assert merged["hits"] == {"import": 3, "round_trip": 5}
    assert merged["counterexamples"] == {"import": "import.json", "round_trip": "round_trip.json"}


# ------------------------------------------------------------------------------ known failures
def test_the_known_failures_file_lists_finding_ids_with_their_comments(tmp_path: Path) -> None:
    path = tmp_path / "known.txt"
    path.write_text("# crash of the provider\nload-raises-valueerror@moe_num_shared_experts\n\n"
                    "diverges-at-attention@rope_theta  # rope_theta fixed\n")
    assert read_known_findings(path) == {"load-raises-valueerror@moe_num_shared_experts": "crash of the provider",
                                         "diverges-at-attention@rope_theta": "rope_theta fixed"}
    path.write_text("suite/test_properties.py::test_round_trip\n")
    with pytest.raises(pytest.UsageError, match=r"known.txt:1: .*test_round_trip.* is not a finding id"):
        read_known_findings(path)


def run_suite(pytester: pytest.Pytester, bridge: str, *options: str) -> pytest.RunResult:
    pytester._monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=":")
    return pytester.runpytest_subprocess(
        "--pyargs", "conformance", "--bridge", bridge, "--results-json", str(pytester.path / "results.json"),
        "--counterexamples", str(pytester.path / "counterexamples"), "--hypothesis-profile=ernie-ci",
        "--published-in-ten", "0", "-p", "no:cacheprovider", "-W", "ignore", *options)


def results(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "results.json").read_text())


def findings_of(pytester: pytest.Pytester) -> list[dict]:
    return merge_findings(results(pytester)["results"])


ONE_PROPERTY = ("--layouts", "tp1-pp1-ep1-vpp1", "--dtype", "fp32")


def test_known_findings_make_a_known_failure_and_a_new_one_fails(pytester: pytest.Pytester) -> None:
    """A property whose findings are all listed is a known failure (xfail, exit 0); one more
    defect behind the same failing property fails the run, named as NEW."""
    bridge = "conformance.mutants:SharedExpertCountIgnored"
    first = run_suite(pytester, bridge, "-k", "import", *ONE_PROPERTY)
    [finding] = findings_of(pytester)
    assert finding["id"] == "load-raises-runtimeerror@moe_num_shared_experts", (finding, first.stdout.str()[-2000:])
    known = pytester.path / "known.txt"
    known.write_text(f"{finding['id']}  # the shared experts' width ignores their count\n")
    listed = run_suite(pytester, bridge, "-k", "import", "--xfails-file", str(known), *ONE_PROPERTY)
    listed.assert_outcomes(xfailed=1)
    assert results(pytester)["known_failures"]["new"] == []

    two = run_suite(pytester, "conformance.mutants:TwoPlantedDefects", "-k", "equivalence", "--xfails-file",
                    str(known), *ONE_PROPERTY)
    two.assert_outcomes(failed=1)
    new = results(pytester)["known_failures"]["new"]
    assert len(new) == 1 and new[0].startswith("diverges-at-attention@") and "rope_theta" in new[0], new
    two.stdout.fnmatch_lines([f"NEW   {new[0]}"])
    two.stdout.fnmatch_lines([f"known {finding['id']}"])


def test_a_listed_finding_that_no_longer_reproduces_fails_the_run(pytester: pytest.Pytester) -> None:
    known = pytester.path / "known.txt"
    known.write_text("load-raises-runtimeerror@moe_num_shared_experts  # fixed since\n")
    fixed = run_suite(pytester, "reference", "--max-examples", "5", "--xfails-file", str(known), *ONE_PROPERTY)
    assert fixed.ret == pytest.ExitCode.TESTS_FAILED, fixed.stdout.str()[-2000:]
    fixed.assert_outcomes(passed=7)  # every property (and published structure) passes: the entry fails the run
    fixed.stdout.fnmatch_lines(["*known-failures entries that matched no finding*",
                                "load-raises-runtimeerror@moe_num_shared_experts"])
    assert results(pytester)["known_failures"]["not_reproduced"] == ["load-raises-runtimeerror@moe_num_shared_experts"]
    # With only some properties run, an entry may belong to one that did not run: reported, not failed.
    some = run_suite(pytester, "reference", "--max-examples", "5", "--xfails-file", str(known), "-k", "import",
                     *ONE_PROPERTY)
    assert some.ret == pytest.ExitCode.OK, some.stdout.str()[-2000:]
    some.stdout.fnmatch_lines(["*(not every property ran: not counted against the run)"])


def test_test_ids_in_the_known_failures_file_are_refused(pytester: pytest.Pytester) -> None:
    known = pytester.path / "known.txt"
    known.write_text("suite/test_properties.py::test_round_trip\n")
    refused = run_suite(pytester, "reference", "--max-examples", "1", "--xfails-file", str(known))
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*is not a finding id*lists findings, not tests*"])


# ------------------------------------------------------------------------------ planted defects
def assert_each_planted_defect_is_its_own_finding(pytester: pytest.Pytester, bridge: type, result,
                                                  ran: tuple[str, ...]) -> None:
    """Each planted defect is exactly one finding of its kind whose trigger has the planted
    condition, hit by its property (where that property ran, `ran`; else by any that did)."""
    findings = findings_of(pytester)
    summary = "\n".join(f"{f['id']}: {f['summary']} [{', '.join(f['properties'])}]" for f in findings)
    for prop, kind, words in bridge.planted:
        matching = [f for f in findings if f["kind"] == kind and (prop in f["properties"] or prop not in ran)
                    and any(c["words"] == words for c in f["trigger"])]
        assert len(matching) == 1, (f"{bridge.name}: planted {kind} in {prop} when {words!r} should be exactly one "
                                    f"finding; the findings:\n{summary}\n{result.stdout.str()[-3000:]}")
    # One defect may show as several kinds (a wrong lm_head: an export that differs, a divergence at
    # the logits): one finding per kind and trigger, never two with the same id.
    ids = [f["id"] for f in findings]
    assert len(set(ids)) == len(ids), f"two findings with one id:\n{summary}"
    for f in findings:
        assert Path(f["counterexample"]).is_file(), f
        example = json.loads(Path(f["counterexample"]).read_text())
        assert example["finding"] == f["id"] and example["trigger"] == f["when"], (example["finding"], f["id"])


@pytest.mark.whole_runs
def test_two_planted_defects_are_two_findings(pytester: pytest.Pytester) -> None:
    """Equivalence sees both (the crash at load hides the rope divergence where both hold)."""
    result = run_suite(pytester, "conformance.mutants:TwoPlantedDefects", "-k", "equivalence", *ONE_PROPERTY)
    result.assert_outcomes(failed=1)
    assert_each_planted_defect_is_its_own_finding(pytester, TwoPlantedDefects, result, ("equivalence",))


@pytest.mark.whole_runs
def test_three_planted_defects_are_three_findings_across_the_properties(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "conformance.mutants:ThreePlantedDefects", "-n", "2", *ONE_PROPERTY)
    assert_each_planted_defect_is_its_own_finding(pytester, ThreePlantedDefects, result,
                                                  ("import", "round_trip", "equivalence", "interop", "refusal"))
    [crash_finding] = [f for f in findings_of(pytester) if f["kind"] == "bridge raised"]
    assert set(crash_finding["properties"]) == {"import", "round_trip", "equivalence", "interop", "refusal"}, (
        "one crash, one finding, hit by every property", crash_finding)
    result.stdout.fnmatch_lines(["*findings: * distinct defects*"])


# ------------------------------------------------------------------------------ compare
def certificate(version: str, findings: list[str], verdict: str) -> dict:
    return {
        "bridge": {"name": "planted", "version": version}, "profile": {"name": "ci"},
        "tested": {"examples": 100}, "versions": {"ernie-conformance": "0.1.0"},
        "properties": {"import": {"verdict": verdict}},
        "findings": [{"id": i, "summary": f"{i} summary"} for i in findings],
    }


def test_compare_names_fixed_new_and_unchanged_findings(tmp_path: Path) -> None:
    old = certificate("1", ["a@x", "b@y"], "fail")
    new = certificate("2", ["b@y", "c@z"], "fail")
    result = compare(old, new)
    assert [f["id"] for f in result.fixed] == ["a@x"] and [f["id"] for f in result.added] == ["c@z"]
    assert [o["id"] for o, _ in result.unchanged] == ["b@y"] and result.regressed
    text = render_text(result)
    assert "new findings: 1\n  c@z" in text and "fixed findings: 1\n  a@x" in text and "REGRESSION" in text, text
    assert "| `c@z` | new |" in render_markdown(result)
    better = compare(old, certificate("3", [], "pass"))
    assert not better.regressed and better.verdicts == [("import", "fail", "pass")]
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "certificate.json").write_text(json.dumps({"schema": "ernie-conformance/certificate/v1"}))
    with pytest.raises(ValueError, match="has no findings"):
        load_certificate(tmp_path / "v1")


def test_compare_cli_exits_1_on_a_new_finding(tmp_path: Path) -> None:
    import subprocess
    import sys

    for version, ids in (("1", ["a@x"]), ("2", ["a@x", "c@z"])):
        (tmp_path / version).mkdir()
        (tmp_path / version / "certificate.json").write_text(json.dumps(certificate(version, ids, "fail")))
    cli = [sys.executable, "-m", "conformance.cli", "compare"]
    worse = subprocess.run([*cli, str(tmp_path / "1"), str(tmp_path / "2")], capture_output=True, text=True)
    assert worse.returncode == 1 and "new findings: 1" in worse.stdout, worse
    same = subprocess.run([*cli, str(tmp_path / "2"), str(tmp_path / "2"), "--format", "markdown"],
                          capture_output=True, text=True)
    assert same.returncode == 0 and "No new findings." in same.stdout, same


def test_a_wrong_layer_kind_is_the_first_divergence_whatever_diverges_before_it(tmp_path: Path) -> None:
    """A model built with the wrong layer pattern is wrong whatever its numbers: a divergence in an
    earlier layer must not hide it (else the pattern's trigger isolates as a numerical one)."""
    import copy

    from conformance.properties import first_divergence, stage_errors
    from ernie_ref import ErnieMoeForCausalLM, random_checkpoint

    cfg = ErnieMoeConfig.from_hf(dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, moe_num_experts=3, moe_k=2,
                                      moe_intermediate_size=4, moe_layer_start_index=1))
    random_checkpoint(cfg, tmp_path, seed=0)
    expected = ErnieMoeForCausalLM.from_pretrained(tmp_path)(torch.tensor([[1, 2, 3]]), trace=True)
    actual = copy.deepcopy(expected)
    actual.layers[0].after_attention = actual.layers[0].after_attention * 1.5  # diverges first in forward order
    actual.layers[1].routing = None  # layer 1 built dense
    stage, description = first_divergence(stage_errors(actual, expected, cfg))
    assert stage.startswith("layer 1 kind"), (stage, description)
    assert description == "layer 1 kind: dense in the bridge's model, MoE in the oracle", description
    actual.layers[1].routing = expected.layers[1].routing  # the right kinds: the attention comes first
    assert first_divergence(stage_errors(actual, expected, cfg))[0] == "layer 0 attention"
