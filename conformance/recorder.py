"""What the suite saw, test by test: draws, declared refusals, ties, valid examples by layout and
dtype, refusal errors that named the corruption, the failure and its counterexample.

One `Recorder` lives in each pytest process (an xdist worker, or the only process). The test
that is running updates its `Tally`; when the test ends the tally travels to the controlling
process in the report's user_properties, where `SessionRecord` keeps one result per test. The
certificate is built from those results alone, so it says what was drawn, not what was asked.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from ernie_ref.published import structure_of

# Positions beyond this are "long" in the certificate: past where short-context bugs hide (rotary
# angles at a large theta, attention over many keys).
LONG_POSITIONS = 256

__all__ = ["Tally", "Recorder", "SessionRecord", "RECORDER", "STATUSES", "verdict_of"]


@dataclass
class Tally:
    """One test's record in this process."""

    draws: int = 0  # configs drawn and put to the bridge's unsupported()
    refusals: Counter[str] = field(default_factory=Counter)  # declared unsupported, by reason
    ties: int = 0  # valid examples with a routing near-tie that the oracle decided as the model under test did
    ill_conditioned: int = 0  # examples set aside: they amplify fp32 rounding past the tolerance
    valid: int = 0  # examples that ran to a verdict
    layouts: Counter[str] = field(default_factory=Counter)  # valid examples per layout
    dtypes: Counter[str] = field(default_factory=Counter)  # valid examples per checkpoint dtype
    structures: Counter[str] = field(default_factory=Counter)  # valid examples per published structure (narrowed)
    long_inputs: int = 0  # valid examples with positions beyond LONG_POSITIONS
    refusal_named: Counter[str] = field(default_factory=Counter)  # refusal errors: "named" / "unnamed"
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)  # config limits in force, per dtype
    first_failure: dict[str, float] | None = None  # before shrinking: example number, seconds
    shrink_calls: int = 0  # examples run after a round's first failure (shrinking)
    isolation_calls: int = 0  # moved examples run to isolate triggers (counted apart from shrinking)
    rounds: int = 0  # searches run (one more than the findings, unless the cap stopped it)
    failure: dict[str, Any] | None = None  # the first failure's kind, facts and message
    counterexample: str | None = None  # the first finding's
    findings: list[dict[str, Any]] = field(default_factory=list)  # see conformance.findings.Finding.to_json
    unclassified: int = 0  # failing examples that no finding covers (the search stopped at its cap)
    started: float = field(default_factory=time.perf_counter)

    def to_json(self) -> dict[str, Any]:
        """The record without what is only needed while the test runs. (Not `asdict`, which
        would rebuild each Counter from its items.)"""
        return {f.name: dict(value) if isinstance(value, Counter) else value
                for f in fields(self) if f.name != "started"
                for value in (getattr(self, f.name),)}


class Recorder:
    """The current test's tally, in this process."""

    def __init__(self) -> None:
        self.test = ""
        self.tallies: dict[str, Tally] = {}

    def start(self, test: str) -> None:
        self.test = test
        self.tallies[test] = Tally()

    def stop(self) -> None:
        self.test = ""

    @property
    def tally(self) -> Tally:
        """The running test's tally (a scratch one outside a test, so that direct calls work)."""
        return self.tallies.setdefault(self.test, Tally())

    def pop(self, test: str) -> Tally | None:
        return self.tallies.pop(test, None)

    # What drawing and checking an example report.
    def count_draw(self) -> None:
        self.tally.draws += 1

    def count_refusal(self, reason: str) -> None:
        self.tally.refusals[reason] += 1

    # `shrinking`: the example was run to shrink a failure, not drawn by the search; it counts as
    # such, not as a valid example. (A moved example of trigger isolation counts by count_isolation
    # alone.)
    def count_set_aside(self, reason: str, shrinking: bool = False) -> None:
        """An example set aside (properties.SetAside) for `reason`: "ill-conditioned"."""
        if shrinking:
            self.tally.shrink_calls += 1
        elif reason == "ill-conditioned":
            self.tally.ill_conditioned += 1
        else:
            raise ValueError(f"unknown reason {reason!r} to set an example aside")

    def count_valid(self, case: Any, observed: dict[str, Any], shrinking: bool = False) -> None:
        tally = self.tally
        if shrinking:
            tally.shrink_calls += 1
            return
        self._count_example(case)
        if "named" in observed:
            tally.refusal_named["named" if observed["named"] else "unnamed"] += 1
        if observed.get("near_tie_tokens"):
            tally.ties += 1

    def _count_example(self, case: Any) -> None:
        tally = self.tally
        tally.valid += 1
        tally.layouts[str(case.layout)] += 1
        tally.dtypes[case.dtype] += 1
        if (structure := structure_of(case.config)) is not None:
            tally.structures[structure] += 1
        if case.inputs.seq_len > LONG_POSITIONS:
            tally.long_inputs += 1

    def count_isolation(self) -> None:
        self.tally.isolation_calls += 1

    def count_round(self) -> None:
        self.tally.rounds += 1

    def note_limits(self, dtype: str, limits: dict[str, Any]) -> None:
        self.tally.limits.setdefault(dtype, limits)

    def note_failure(self, case: Any, failure: Any, shrinking: bool = False) -> None:
        """A failing example (run once: the search keeps its outcome)."""
        tally = self.tally
        if shrinking:
            tally.shrink_calls += 1
        else:
            self._count_example(case)
        if tally.first_failure is None:
            tally.first_failure = {"example": tally.valid, "seconds": round(time.perf_counter() - tally.started, 3)}
            tally.failure = {"kind": failure.kind, "facts": failure.facts,
                             "message": str(failure).split("\n  reproduce with:")[0]}

    def note_counterexample(self, path: str) -> None:
        self.tally.counterexample = path

    def note_findings(self, findings: list[dict[str, Any]], unclassified: int) -> None:
        self.tally.findings, self.tally.unclassified = findings, unclassified


RECORDER = Recorder()


# How a test of the suite ended, as its process saw it (`status`), and the verdict on the bridge.
STATUSES = ("passed", "failed", "inconclusive", "suite error")


def verdict_of(outcome: str, status: str) -> str:
    """The verdict on a property from pytest's outcome and the test's status.

    pass: the property held on every example the profile asks for. inconclusive: it held, but on
    fewer valid examples (the rest declared unsupported or set aside as ties), or Hypothesis gave
    up on the draws. fail: it does not hold. error: the suite itself failed, which says nothing
    about the bridge. A known failure (listed in the known-failures file) that still fails is
    "known failure"; one that passed is a fail (the list is strict)."""
    if outcome == "xfailed":
        return "known failure"
    if outcome == "xpassed":
        return "fail"
    if outcome == "skipped":
        return "not run"
    return {"passed": "pass", "failed": "fail", "inconclusive": "inconclusive", "suite error": "error"}[status]


@dataclass
class SessionRecord:
    """In the controlling process: one result per finished test."""

    results: list[dict[str, Any]] = field(default_factory=list)

    def add(self, test: str, outcome: str, status: str, why: str, duration_s: float, record: dict[str, Any],
            message: str) -> dict[str, Any]:
        """Keep one finished test's result: pytest's `outcome` (xfailed/xpassed for known failures),
        the test's `status` and `why`, its process's `record` (`Tally.to_json`)."""
        result = {
            "test": test,
            "outcome": outcome,
            "status": status,
            "verdict": verdict_of(outcome, status),
            "why": why,
            "duration_s": round(duration_s, 3),
            "examples": record.get("valid", 0),
            "record": record,
            "counterexample": record.get("counterexample"),
            "first_failure": record.get("first_failure"),
            "message": message,
        }
        self.results.append(result)
        return result

    def refusals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for result in self.results:
            total.update(result.get("record", {}).get("refusals", {}))
        return total

    def progress_line(self, total: int) -> str:
        """One line on the latest result and the session so far (certify's progress.log)."""
        result = self.results[-1]
        examples = sum(r["examples"] for r in self.results)
        failures = sum(r["verdict"] == "fail" for r in self.results)
        name = result["test"].rsplit("::", 1)[-1]
        return (f"[{len(self.results)}/{total or '?'}] {name}: {result['verdict']}, {result['examples']} valid examples "
                f"in {result['duration_s']:.1f}s (so far: {examples} examples, {failures} failures)")

    def to_json(self, profile: str, required_examples: int, max_shrinks: int, max_findings: int,
                known_failures: dict[str, Any] | None) -> dict[str, Any]:
        """The results file (--results-json), from which certify builds the certificate."""
        return {
            "profile": profile, "required_examples": required_examples, "max_shrinks": max_shrinks,
            "max_findings": max_findings, "refusals": dict(self.refusals()), "known_failures": known_failures,
            "results": self.results,
        }
