"""Drawing cases for the bridge under test, and searching a property for findings the suite's way."""

from __future__ import annotations

import dataclasses

from typing import Any

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import FailedHealthCheck, Unsatisfiable

from ernie_ref import CheckpointFormat
from ernie_ref.checkpoint import read_config
from ernie_ref.published import structure_of

from ..bridge import BridgeError, bridge_call
from ..cases import Case
from ..counterexample import Counterexample, replay_command
from ..findings import UNJUDGED, Finding, MoveContext, Variant, isolate_trigger, same_defect, signature
from ..numerics import tolerance
from ..properties import PropertyFailure, SetAside, run_property
from ..profiles import suite_settings
from ..recorder import RECORDER
from ..session import SuiteSession
from ..strategies import ConfigLimits, checkpoint_formats, configs, corruptions, inputs, seeds


def draw_case(data: st.DataObject, suite: SuiteSession, prop: str, earlier: set[str] | None = None,
              this_round: set[str] | None = None) -> Case:
    """Draw a layout, the weights' dtype, a config (or read the user's checkpoint), the weights
    seed, inputs, for the refusal property a corruption, and the drawn checkpoint's format.

    A config the bridge declares unsupported is recorded as a declared refusal and the example is
    rejected: it is not a failure, but it is not a valid example either (see `verdict_of`). A case
    drawn in an earlier round of the search (`earlier`) is not counted again; each case drawn is
    added to `this_round`. (Within a round every draw counts, as Hypothesis counts them.)
    """
    layout = data.draw(st.sampled_from(suite.layouts), label="layout")
    dtype = data.draw(st.sampled_from(suite.dtypes), label="dtype")  # a user's checkpoint: its own
    session_limits = suite.config_limits or ConfigLimits()
    if suite.checkpoint is not None:
        cfg = read_config(suite.checkpoint)  # the suite fixture kept only layouts that fit it
    else:
        tol = tolerance(dtype)  # bf16 needs wider models
        limits = dataclasses.replace(session_limits, min_hidden=tol.min_hidden_size,
                                     min_published_hidden=tol.min_published_hidden_size)
        RECORDER.note_limits(dtype, dataclasses.asdict(limits))
        cfg = data.draw(configs(limits, layout=layout), label="config")
    # A published structure's examples keep to short inputs: its many layers and experts already
    # cost seconds each on a CPU (long sequences are drawn with the small configs).
    published = structure_of(cfg) is not None
    case = Case(
        config=cfg,
        weights_seed=data.draw(seeds(), label="weights seed") if suite.checkpoint is None else None,
        inputs=data.draw(inputs(max_batch=2, max_seq_len=16, long_in_ten=0) if published
                         else inputs(max_long_seq_len=session_limits.max_long_seq_len),
                         label="inputs"),
        layout=layout,
        corruption=(data.draw(corruptions(cfg, config_only=suite.checkpoint is not None), label="corruption")
                    if prop == "refusal" else None),
        checkpoint=str(suite.checkpoint) if suite.checkpoint is not None else None,
        dtype=dtype,
        # Drawn last, so that adding it left the earlier draws of a derandomized profile as they were.
        checkpoint_format=(data.draw(checkpoint_formats(cfg), label="checkpoint format")
                           if suite.checkpoint is None else CheckpointFormat()),
    )
    first_draw = earlier is None or repr(case) not in earlier
    if this_round is not None:
        this_round.add(repr(case))
    if first_draw:
        RECORDER.count_draw()
    try:
        reason = bridge_call("unsupported", suite.bridge.unsupported, cfg)
    except BridgeError as e:
        raise PropertyFailure(prop, case, f"the bridge's unsupported() raised {e.exception}: {e.message}",
                              kind="bridge raised", facts={"call": "unsupported", "exception": e.exception},
                              evidence={"traceback": e.traceback_text}) from e
    if reason is not None:
        if first_draw:
            RECORDER.count_refusal(reason)
        reject()
    return case


class FindingsFailure(AssertionError):
    """A property does not hold: the findings of its search (`findings`), each with its trigger and
    counterexample; `new` are those the known-failures file does not list."""

    def __init__(self, prop: str, findings: list[Finding], new: list[Finding], unclassified: int = 0):
        self.prop, self.findings, self.new = prop, findings, new
        lines = [f"[{prop}] {len(findings)} finding{'s' if len(findings) != 1 else ''}"
                 + (f", {len(new)} not in the known-failures file" if len(new) != len(findings) else "") + ":"]
        for finding in findings:
            mark = "NEW " if finding in new and len(new) != len(findings) else ""
            lines.append(f"  - {mark}{finding.id}: {finding.summary} ({finding.hits} examples hit it)")
            lines += ["    " + line for line in (finding.report or finding.message).splitlines()]
            if finding.counterexample:
                lines.append(f"    reproduce with: {replay_command(finding.counterexample)}")
        if unclassified:
            lines.append(f"  ({unclassified} failing examples matched none of these: the search stopped at "
                         f"{len(findings)} findings)")
        super().__init__("\n".join(lines))


class _Search:
    """One property's search for findings: every example run once (a cache by case, across
    rounds), the findings so far, and the current round's shrinking budget."""

    def __init__(self, prop: str, suite: SuiteSession):
        self.prop, self.suite = prop, suite
        # repr(case) -> observed dict, the reason it was set aside (str), or PropertyFailure
        self.outcomes: dict[str, Any] = {}
        self.findings: list[Finding] = []
        # Cases drawn in earlier rounds (a derandomized round replays the last one's draws: they
        # are not counted again) and in this one.
        self.earlier: set[str] = set()
        self.this_round: set[str] = set()
        self.round_failing = False
        self.round_shrinks = 0
        # (repr(case), error, its traceback): the first error of the suite itself (neither a verdict nor set aside).
        # It is reported as it came, unshrunk: shrinking it says nothing about the bridge, and
        # Hypothesis would run examples for it without the shrinking budget.
        self.suite_error: tuple[str, Exception, Any] | None = None

    def known(self, failure: PropertyFailure) -> Finding | None:
        return next((f for f in self.findings if f.covers(failure)), None)

    def outcome(self, case: Case, shrinking: bool, isolating: bool = False) -> Any:
        """The property on `case`, run once; counted as a search, shrinking or isolation example."""
        key = repr(case)
        if key in self.outcomes:
            return self.outcomes[key]
        try:
            outcome: Any = run_property(self.prop, self.suite.bridge, case)
        except SetAside as set_aside:
            outcome = set_aside.reason
        except PropertyFailure as failure:
            outcome = failure
        if not isolating:  # a moved example of trigger isolation counts by RECORDER.count_isolation alone
            if isinstance(outcome, str):
                RECORDER.count_set_aside(outcome, shrinking)
            elif isinstance(outcome, PropertyFailure):
                RECORDER.note_failure(case, outcome, shrinking)
            else:
                RECORDER.count_valid(case, outcome, shrinking)
        self.outcomes[key] = outcome
        return outcome

    def check(self, case: Case) -> None:
        """Hypothesis' test function of a round: a failure that is not a finding yet fails it."""
        key = repr(case)
        if self.suite_error is not None:
            if key == self.suite_error[0]:
                # Hypothesis' replay of the failing example, for its report: the error as first raised
                raise self.suite_error[1].with_traceback(self.suite_error[2])
            reject()
        if key not in self.outcomes and self.round_failing and self.round_shrinks >= self.suite.max_shrinks:
            reject()  # past the shrinking budget: Hypothesis ends with the smallest failure so far
        if key not in self.outcomes and self.round_failing:
            self.round_shrinks += 1
        cached = key in self.outcomes
        try:
            outcome = self.outcome(case, shrinking=self.round_failing)
        except Exception as error:  # noqa: BLE001 - any error but a verdict is the suite's
            self.suite_error = (key, error, error.__traceback__)
            raise
        if cached and not self.round_failing and key not in self.earlier:
            # Drawn again in this round (or run first to isolate a trigger): Hypothesis counts the
            # example, and so does the verdict; a case of an earlier round is not counted twice.
            if isinstance(outcome, str):
                RECORDER.count_set_aside(outcome)
            elif isinstance(outcome, dict):
                RECORDER.count_valid(case, outcome)
        if isinstance(outcome, str):
            reject()
        if isinstance(outcome, PropertyFailure) and self.known(outcome) is None:
            self.round_failing = True
            raise outcome

    def run_moved(self, case: Case) -> Any:
        """A moved example of trigger isolation: what it observed (a pass), UNJUDGED, or its failure."""
        try:
            if bridge_call("unsupported", self.suite.bridge.unsupported, case.config) is not None:
                return UNJUDGED
        except BridgeError:
            return UNJUDGED
        RECORDER.count_isolation()
        outcome = self.outcome(case, shrinking=False, isolating=True)
        if isinstance(outcome, str):  # set aside: it says nothing about the bridge
            return UNJUDGED
        return outcome

    def add(self, failure: PropertyFailure) -> Finding:
        """Isolate the trigger of a round's (shrunk) failure and keep it as a finding (or as one
        more trigger of a finding with the same id)."""
        sig, trigger, runs = signature(failure), None, 0
        if self.suite.isolate_triggers:
            ctx = MoveContext(layouts=tuple(self.suite.layouts), dtypes=tuple(self.suite.dtypes))
            trigger, runs = isolate_trigger(failure, ctx, self.run_moved)
            same = next((f for f in self.findings if same_defect(f, sig, trigger, self.prop)), None)
            if same is not None:
                same.variants.append(Variant(sig, trigger, failure.facts.get("stage_kind")))
                return same
        finding = Finding(prop=self.prop, signature=sig, kind=failure.kind, facts=failure.facts, trigger=trigger,
                          message=failure.detail, report=str(failure), isolation_runs=runs)
        example = Counterexample.from_failure(failure, self.suite.bridge_spec, self.suite.bridge_version,
                                              RECORDER.test, finding=finding.id, trigger=finding.when())
        path = example.save(self.suite.counterexamples)
        finding.counterexample = str(path)
        if not self.findings:  # the first finding stands for the property in reports of one failure
            RECORDER.note_counterexample(str(path))
        self.findings.append(finding)
        return finding

    def uncovered(self) -> PropertyFailure | None:
        """The first failing example run so far that no finding covers."""
        return next((o for o in self.outcomes.values() if isinstance(o, PropertyFailure) and self.known(o) is None),
                    None)

    def count_hits(self) -> int:
        """Examples that hit each finding; returns how many failing examples hit none."""
        unclassified = 0
        for outcome in self.outcomes.values():
            if isinstance(outcome, PropertyFailure):
                finding = self.known(outcome)
                if finding is None:
                    unclassified += 1
                else:
                    finding.hits += 1
        return unclassified



def search(prop: str, suite: SuiteSession) -> None:
    """Search `prop` for findings: run the profile's examples; on a failure, shrink it (bounded),
    isolate its trigger, and search again with every example a finding covers counted as that
    finding, until a round finds nothing new (or `suite.max_findings`); then each failing example
    that shrinking or isolation ran and no finding covers is a finding too. Fails with every finding;
    when the known-failures file lists them all, the test is a known failure."""
    __tracebackhide__ = True  # the report is the findings, not this function's source
    state = _Search(prop, suite)

    def one_round(data: st.DataObject) -> None:
        state.check(draw_case(data, suite, prop, earlier=state.earlier, this_round=state.this_round))

    cap = suite.max_findings if suite.isolate_triggers else 1  # without triggers a finding covers nothing more
    while len(state.findings) < cap:
        state.round_failing, state.round_shrinks = False, 0
        state.earlier |= state.this_round
        state.this_round = set()
        # Only the first round uses the example database: it saves the first failure there, and a
        # later round, which counts that failure as a finding, would delete it as passing.
        first = {} if not state.findings else {"database": None}
        found: PropertyFailure | None = None
        try:
            settings(suite_settings(), report_multiple_bugs=False, **first)(given(data=st.data())(one_round))()
        except PropertyFailure as failure:
            found = failure
        except (FailedHealthCheck, Unsatisfiable):
            if not state.findings:
                raise  # no verdict: see plugin._status
        RECORDER.count_round()
        if found is None:
            break
        # Outside the except block: an exception the bridge raises while the trigger is isolated
        # must not carry Hypothesis' report of this failure as its context.
        state.add(found)
    # Failing examples that shrinking or trigger isolation ran (valid examples of the suite's space,
    # already small) and that no finding covers: another defect, which the rounds' draws did not
    # reach. Each becomes a finding of its own, in the order it was seen.
    while state.findings and len(state.findings) < cap and (leftover := state.uncovered()) is not None:
        state.add(leftover)
    if not state.findings:
        return
    unclassified = state.count_hits()
    RECORDER.note_findings([f.to_json() for f in state.findings], unclassified)
    new = [f for f in state.findings if f.id not in suite.known_findings]
    if not new:
        pytest.xfail("known findings: " + ", ".join(f.id for f in state.findings))
    raise FindingsFailure(prop, state.findings, new, unclassified)
