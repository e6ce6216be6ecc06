"""The kill matrix: which property of the suite kills which mutant (`conformance.mutants`), after
how many examples and how many seconds. The mutants are read from their catalogue
(`conformance.mutants.catalogue`), plain data: this process only starts the pytest sessions, and
imports no mutant class (nor megatron with it).

Each mutant gets one pytest session of the suite, exactly as a user runs it
(`pytest --pyargs conformance.suite --bridge conformance.mutants:X`, ci profile), with every
property; the plugin records for each failing test the first failing example (its number and the
seconds since the test started, before shrinking). `ernie-conformance kill-matrix` prints the
matrix and writes it to docs/kill-matrix.md.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .mutants.catalogue import CATALOGUE, PARTS
from .properties import PROPERTIES

__all__ = ["Kill", "MutantRun", "run_mutant", "kill_matrix", "render_markdown", "update_markdown"]


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
        command = suite_command(CATALOGUE[name].spec, props, results, Path(tmp) / "counterexamples", profile, shrink, extra)
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
    names = names or list(CATALOGUE)
    unknown = [n for n in names if n not in CATALOGUE]
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


def _measured_with() -> str:
    from .versions import package_version

    return (f"ernie-conformance {package_version('ernie-conformance')}, megatron-core {package_version('megatron-core')}, "
            f"transformers {package_version('transformers')}, torch {package_version('torch')}, on {os.cpu_count()} CPU cores")


def _row(run: MutantRun) -> str:
    listing = CATALOGUE[run.mutant]
    if run.error:
        return f"| `{run.mutant}` | {listing.part} | {listing.killed_by} | error: {run.error[-200:]!r} |"
    return (f"| `{run.mutant}` | {listing.part} | {listing.killed_by} | "
            + " | ".join(_cell(run.kills.get(p)) for p in PROPERTIES) + " |")


def _bug_line(name: str) -> str:
    listing = CATALOGUE[name]
    where = f" Right on one rank; revealed under {listing.reveals_under}." if listing.reveals_under else ""
    where += f" Right for fp32 checkpoints; revealed by {listing.reveals_in} ones." if listing.reveals_in else ""
    return f"- `{name}` ({listing.part}): {listing.bug}{where}"


def _summary(rows: dict[str, str]) -> str:
    """The killed count and times to kill, read back from the rows' cells."""
    times = [min(float(t) for t in found) for row in rows.values() if (found := re.findall(r"\*\*killed\*\* #\d+, ([\d.]+)s", row))]
    survivors = [name for name, row in rows.items() if "**killed**" not in row]
    return (f"**{len(rows) - len(survivors)} of {len(rows)} killed**"
            + (f"; survivors: {', '.join(survivors)}" if survivors else "")
            + (f". Time to kill (fastest property): median {statistics.median(times):.1f}s, max {max(times):.1f}s."
               if times else "."))


def update_markdown(existing: str, runs: list[MutantRun], profile: str) -> str:
    """`existing` (a kill matrix this module wrote) with the rows of `runs` measured anew and added
    or replaced; the summary is recounted, a line says which rows were measured when, and the bugs
    are described as the catalogue now does."""
    lines = existing.rstrip("\n").split("\n")
    rows = {line.split("`")[1]: line for line in lines if line.startswith("| `")}
    for run in runs:
        rows[run.mutant] = _row(run)
    unknown = sorted(set(rows) - set(CATALOGUE))
    if unknown:
        raise ValueError(f"{unknown} are in the kill matrix but not in the catalogue: regenerate it whole")
    order = {part: i for i, part in enumerate(PARTS)}
    names = sorted(rows, key=lambda n: (order[CATALOGUE[n].part], n))
    head = lines[:lines.index(next(l for l in lines if l.startswith("| mutant |")))]
    head = [l for l in head if not l.startswith("**")]
    head = [re.sub(r"\((\d+) broken", f"({len(rows)} broken", line) for line in head]
    while head and not head[-1]:
        head.pop()
    head += [f"Rows of {', '.join(f'`{r.mutant}`' for r in runs)} measured {time.strftime('%Y-%m-%d')} "
             f"({profile} profile) with {_measured_with()} (`ernie-conformance kill-matrix --mutants ...`).",
             "", _summary(rows), ""]
    table = ["| mutant | part | expected killer | " + " | ".join(PROPERTIES) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in PROPERTIES) + " |"]
    return "\n".join(head + table + [rows[n] for n in names] + ["", "## The bugs", ""] + [_bug_line(n) for n in names]) + "\n"


def render_markdown(runs: list[MutantRun], profile: str, wall_s: float) -> str:
    """The kill matrix as a markdown document."""
    lines = [
        "# Kill matrix",
        "",
        f"Every property of the suite against every mutant of `conformance/mutants/` ({len(runs)} broken",
        f"bridges), {profile} profile, layouts drawn from every layout of up to 4 ranks, fp32 and bf16 checkpoints. A cell gives the",
        "number of the first failing example and the seconds to it (before shrinking), or the",
        "examples a property ran without failing (drawn examples, including those set aside as",
        "ill-conditioned). Regenerate with `ernie-conformance kill-matrix`.",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with {_measured_with()}; {wall_s / 60:.1f} minutes in all.",
        "",
        _summary({run.mutant: _row(run) for run in runs}),
        "",
        "| mutant | part | expected killer | " + " | ".join(PROPERTIES) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in PROPERTIES) + " |",
    ]
    order = {part: i for i, part in enumerate(PARTS)}
    ordered = sorted(runs, key=lambda r: (order[CATALOGUE[r.mutant].part], r.mutant))
    lines += [_row(run) for run in ordered]
    lines += ["", "## The bugs", ""] + [_bug_line(run.mutant) for run in ordered]
    return "\n".join(lines) + "\n"
