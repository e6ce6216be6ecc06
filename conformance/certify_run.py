"""One certification as a run that may be interrupted and resumed (`certify --resume`).

A thorough certification over every layout of up to 4 ranks takes hours on a small machine. The
suite writes its results after each test (plugin `--results-json`), so what finished survives an
interruption; `certify --resume` runs only the tests that did not finish and builds the
certificate from both. That is sound only if both runs tested the same thing: `RunIdentity` holds
what decides that (the bridge and its version, the command's options, the installed versions), is
saved beside the results, and a resume with any of it changed is refused, naming the field.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .versions import package_version

__all__ = ["RunIdentity", "ResumeRefused", "IDENTITY_FILE", "RESULTS_FILE", "PARTIAL_RESULTS_FILE", "new_run",
           "fold_partial_results", "finished_tests", "merge_results"]

IDENTITY_FILE = "run.json"
RESULTS_FILE = "results.json"  # the finished runs' results
PARTIAL_RESULTS_FILE = "results.partial.json"  # the running run's, written after each test
# The packages whose versions decide what a run draws and how the bridge behaves.
_PACKAGES = ("ernie-conformance", "hypothesis", "megatron-core", "transformers", "torch")


class ResumeRefused(ValueError):
    """The directory holds no run to resume, or one of other options or versions."""


@dataclass(frozen=True)
class RunIdentity:
    """What a certification tested with: a resumed run must match it field for field."""

    bridge: str  # the --bridge spec
    bridge_version: str
    profile: str
    layouts: str
    device: str
    dtype: str
    max_examples: int | None
    max_shrinks: int | None
    published_in_ten: int | None
    checkpoint: str | None  # resolved path
    xfails_file: str | None  # resolved path
    versions: dict[str, str]  # package -> version, and python
    suite_sources: str  # `suite_sources_digest()`: the package version stays 0.1.0 while the code changes

    @staticmethod
    def installed_versions() -> dict[str, str]:
        return {**{name: package_version(name) for name in _PACKAGES}, "python": platform.python_version()}

    def save(self, out: Path, runs: list[dict[str, Any]]) -> None:
        (out / IDENTITY_FILE).write_text(json.dumps({"identity": asdict(self), "runs": runs}, indent=2))

    @staticmethod
    def saved(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The identity (as saved) and the runs recorded in `out`; ResumeRefused if there is none."""
        path = out / IDENTITY_FILE
        if not path.is_file():
            raise ResumeRefused(f"--resume: {out} holds no certification to resume ({IDENTITY_FILE} is missing); "
                                f"run certify without --resume first")
        saved = json.loads(path.read_text())
        return saved["identity"], saved["runs"]

    def check_matches(self, saved: dict[str, Any], out: Path) -> None:
        """ResumeRefused naming each field that differs from the run saved in `out`."""
        now = asdict(self)
        differ = [f"{key}: {saved.get(key)!r} there, {now[key]!r} now" for key in now if saved.get(key) != now[key]]
        if differ:
            raise ResumeRefused(f"--resume: the certification in {out} was run with other options or versions, so "
                                f"its results cannot be merged with this run's ({'; '.join(differ)}); resume with "
                                f"the same command and environment, or certify into another --out")


def new_run() -> dict[str, Any]:
    """A run's entry in run.json: when it started and (filled in at its end) the tests it ran."""
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tests": []}


def fold_partial_results(out: Path, xfails_file: str | None, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the results the last run wrote as it went (PARTIAL_RESULTS_FILE, there if the run was
    interrupted or has just ended) to the earlier runs' RESULTS_FILE, and return them: a results
    file as the plugin writes it, with one result per test, the newest. The tests the last run
    finished go into its entry of `runs`."""
    results_file, partial_file = out / RESULTS_FILE, out / PARTIAL_RESULTS_FILE
    finished = json.loads(results_file.read_text()) if results_file.is_file() else {"results": []}
    if not partial_file.is_file():
        return finished
    partial = json.loads(partial_file.read_text())
    runs[-1]["tests"] = [r["test"] for r in partial["results"]]
    merged = merge_results(finished["results"], partial, xfails_file)
    results_file.write_text(json.dumps(merged, indent=2))
    partial_file.unlink()
    return merged


def finished_tests(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The results a resumed run keeps: every one but a suite error (which says nothing about the
    bridge, so that test runs again)."""
    return [r for r in results["results"] if r["verdict"] != "error"]


def merge_results(kept: list[dict[str, Any]], new: dict[str, Any], xfails_file: str | None) -> dict[str, Any]:
    """The results file `new` with the `kept` results of earlier runs put first (a test in both:
    `new`'s), and the declared refusals and the comparison with the known failures recomputed over
    all of them."""
    from .known_failures import known_findings_report
    from .recorder import SessionRecord

    new_tests = {r["test"] for r in new["results"]}
    results = [r for r in kept if r["test"] not in new_tests] + new["results"]
    known = known_findings_report(xfails_file, results) if xfails_file and results else None
    return {**new, "refusals": dict(SessionRecord(results).refusals()), "known_failures": known, "results": results}
