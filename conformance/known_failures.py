"""The known-failures file: the findings a bridge is known to have, by id, one per line.

A run given the file (`--xfails-file`) turns a property whose findings are all listed into a known
failure, fails on a finding it does not list, and fails when one it lists no longer reproduces
(every property having run): a fix shows up as loudly as a new defect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

__all__ = ["read_known_findings", "known_findings_report", "property_of_test_id"]


def read_known_findings(path: str | Path) -> dict[str, str]:
    """The known-failures file: finding id -> its comment (the `#` text on its line, else the
    comment lines just above it). Test ids are refused: known failures are findings, so that a new
    defect behind an already failing property still fails the run."""
    known: dict[str, str] = {}
    above: list[str] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        entry, _, comment = line.partition("#")
        entry = entry.strip()
        if not entry:
            above = above + [comment.strip()] if comment.strip() else []
            continue
        if "::" in entry or entry.startswith("test_") or "@" not in entry:
            raise pytest.UsageError(
                f"{path}:{number}: {entry!r} is not a finding id (such as 'load-raises-valueerror@moe_num_shared_experts'): "
                "the known-failures file lists findings, not tests; see the findings of a certificate")
        known[entry] = comment.strip() or " ".join(above)
        above = []
    return known


def known_findings_report(xfails_file: str | Path, results: list[dict[str, Any]]) -> dict[str, Any]:
    """How the findings of `results` compare with the known-failures file: the findings it does
    not list (`new`), and its entries that no finding matched (`not_reproduced`; they fail the run
    when every property ran, as a fix then shows up)."""
    from .findings import merge_findings
    from .properties import PROPERTIES

    known = read_known_findings(xfails_file)
    found = {f["id"] for f in merge_findings(results)}
    ran = {property_of_test_id(r["test"]) for r in results if r["verdict"] not in ("error", "not run")}
    return {
        "file": str(xfails_file),
        "new": sorted(found - set(known)),
        "not_reproduced": sorted(set(known) - found),
        "all_properties_ran": set(PROPERTIES) <= ran,
    }


def property_of_test_id(test_id: str) -> str:
    """The property a suite test id names: ".../test_properties.py::test_round_trip" -> "round_trip"."""
    return test_id.rsplit("::", 1)[-1].split("[")[0].removeprefix("test_")
