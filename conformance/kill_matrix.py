"""The kill matrix: which property of the suite kills which mutant (`conformance.mutants`), after
how many examples and how many seconds.

Each mutant gets one pytest session of the suite, exactly as a user runs it
(`pytest --pyargs conformance.suite --bridge conformance.mutants:X`, ci profile), with every
property; the plugin records for each failing test the first failing example (its number and the
seconds since the test started, before shrinking). `ernie-conformance kill-matrix` prints the
matrix and writes it to docs/kill-matrix.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from .mutants import MUTANTS, PARTS, mutant_spec
from .properties import PROPERTIES

__all__ = ["Kill", "MutantRun", "run_mutant", "kill_matrix", "render_markdown"]


@dataclass(frozen=True)
class Kill:
    """One property against one mutant: killed or not, and what it took."""

    prop: str
    killed: bool
    examples: int  # killed: the number of the first failing example; else examples run
    seconds: float  # killed: seconds to the first failing example; else the test's duration
    total_seconds: float  # the whole test, shrinking included when it ran
    message: str = ""


@dataclass(frozen=True)
class MutantRun:
    mutant: str
    kills: dict[str, Kill]
    error: str = ""  # the session itself failed (collection, usage): nothing was measured

    @property
    def killed(self) -> bool:
        return any(k.killed for k in self.kills.values())

    def fastest(self) -> Kill | None:
        killed = [k for k in self.kills.values() if k.killed]
        return min(killed, key=lambda k: k.seconds) if killed else None


def suite_command(bridge: str, props: tuple[str, ...], results: Path, counterexamples: Path, profile: str = "ci",
                  shrink: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The pytest command line that runs `props` of the suite against `bridge`."""
    return [
        sys.executable, "-m", "pytest", "--pyargs", "conformance.suite", "--bridge", bridge,
        "-k", " or ".join(f"test_{p}" for p in props), f"--hypothesis-profile=ernie-{profile}",
        "--results-json", str(results), "--counterexamples", str(counterexamples),
        "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "-W", "ignore", *([] if shrink else ["--no-shrink"]),
        "--no-triggers", *extra,  # a kill needs the first failure, not every finding
    ]


def run_mutant(name: str, props: tuple[str, ...] = PROPERTIES, profile: str = "ci", shrink: bool = False,
               extra: tuple[str, ...] = (), timeout_s: float = 1800) -> MutantRun:
    """Run the suite's `props` against mutant `name` in a fresh pytest process."""
    with tempfile.TemporaryDirectory(prefix="ernie-kill-") as tmp:
        results = Path(tmp) / "results.json"
        command = suite_command(mutant_spec(name), props, results, Path(tmp) / "counterexamples", profile, shrink, extra)
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if not results.is_file():
            return MutantRun(name, {}, error=f"exit {run.returncode}: {(run.stdout + run.stderr)[-2000:]}")
        kills = {}
        for r in json.loads(results.read_text())["results"]:
            prop = r["test"].rsplit("::test_", 1)[-1]
            if prop not in PROPERTIES:
                continue  # the published-structure checks are not properties
            first = r.get("first_failure")
            killed = r["verdict"] == "fail"
            kills[prop] = Kill(
                prop=prop, killed=killed,
                examples=first["example"] if killed and first else r["examples"],
                seconds=first["seconds"] if killed and first else r["duration_s"],
                total_seconds=r["duration_s"],
                message=(r["record"].get("failure") or {}).get("message", "").splitlines()[0][:300] if killed else "",
            )
        return MutantRun(name, kills)


def kill_matrix(names: list[str] | None = None, jobs: int = 1, profile: str = "ci",
                progress=None) -> list[MutantRun]:
    """Every property against every mutant named (default: the whole catalogue)."""
    names = names or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        raise ValueError(f"unknown mutants {unknown}: expected names from conformance.mutants.MUTANTS")

    def one(name: str) -> MutantRun:
        run = run_mutant(name, profile=profile)
        if progress:
            progress(run)
        return run

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, names))


def _cell(kill: Kill | None) -> str:
    if kill is None:
        return "n/a"
    if kill.killed:
        return f"**killed** #{kill.examples}, {kill.seconds:.1f}s"
    return f"survived {kill.examples}"


def render_markdown(runs: list[MutantRun], profile: str, wall_s: float) -> str:
    """The kill matrix as a markdown document."""
    from .versions import package_version

    times = [k.seconds for run in runs if (k := run.fastest()) is not None]
    survivors = [run.mutant for run in runs if not run.killed]
    lines = [
        "# Kill matrix",
        "",
        f"Every property of the suite against every mutant of `conformance/mutants.py` ({len(runs)} broken",
        f"bridges), {profile} profile, layouts drawn from every layout of up to 4 ranks, fp32 and bf16 checkpoints. A cell gives the",
        "number of the first failing example and the seconds to it (before shrinking), or the",
        "examples a property ran without failing (drawn examples, including those set aside for a",
        "routing near-tie). Regenerate with `ernie-conformance kill-matrix`.",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with ernie-conformance {package_version('ernie-conformance')}, "
        f"megatron-core {package_version('megatron-core')}, transformers {package_version('transformers')}, "
        f"torch {version('torch')}, on {os.cpu_count()} CPU cores; {wall_s / 60:.1f} minutes in all.",
        "",
        f"**{len(runs) - len(survivors)} of {len(runs)} killed**"
        + (f"; survivors: {', '.join(survivors)}" if survivors else "")
        + (f". Time to kill (fastest property): median {statistics.median(times):.1f}s, "
           f"max {max(times):.1f}s." if times else "."),
        "",
        "| mutant | part | expected killer | " + " | ".join(PROPERTIES) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in PROPERTIES) + " |",
    ]
    order = {part: i for i, part in enumerate(PARTS)}
    for run in sorted(runs, key=lambda r: (order[MUTANTS[r.mutant].part], r.mutant)):
        cls = MUTANTS[run.mutant]
        if run.error:
            lines.append(f"| `{run.mutant}` | {cls.part} | {cls.killed_by} | error: {run.error[-200:]!r} |")
            continue
        lines.append(f"| `{run.mutant}` | {cls.part} | {cls.killed_by} | "
                     + " | ".join(_cell(run.kills.get(p)) for p in PROPERTIES) + " |")
    lines += ["", "## The bugs", ""]
    for run in sorted(runs, key=lambda r: (order[MUTANTS[r.mutant].part], r.mutant)):
        cls = MUTANTS[run.mutant]
        where = f" Right on one rank; revealed under {cls.reveals_under}." if cls.reveals_under else ""
        where += f" Right for fp32 checkpoints; revealed by {cls.reveals_in} ones." if cls.reveals_in else ""
        lines.append(f"- `{run.mutant}` ({cls.part}): {cls.bug()}{where}")
    return "\n".join(lines) + "\n"
