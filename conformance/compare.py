"""Comparing two certificates (`ernie-conformance compare OLD NEW`): the findings fixed, new and
unchanged, and the verdicts that changed. The way to certify a bridge release against the last one:
a finding that NEW has and OLD lacks is a regression (exit status 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Comparison", "compare", "load_certificate", "render_text", "render_markdown"]


def load_certificate(path: str | Path) -> dict[str, Any]:
    """certificate.json, given it or its directory; ValueError when it has no findings (schema v1, v2)."""
    path = Path(path)
    file = path / "certificate.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no certificate.json there")
    certificate = json.loads(file.read_text())
    if "findings" not in certificate:
        raise ValueError(f"{file}: schema {certificate.get('schema')!r} has no findings; certify the bridge again "
                         "with this version of ernie-conformance")
    return certificate


@dataclass
class Comparison:
    old: dict[str, Any]
    new: dict[str, Any]
    fixed: list[dict[str, Any]]  # findings of OLD that NEW lacks
    added: list[dict[str, Any]]  # findings of NEW that OLD lacks
    unchanged: list[tuple[dict[str, Any], dict[str, Any]]]  # (OLD's, NEW's)
    verdicts: list[tuple[str, str, str]]  # (property, OLD verdict, NEW verdict), those that changed

    @property
    def regressed(self) -> bool:
        return bool(self.added)


def compare(old: dict[str, Any], new: dict[str, Any]) -> Comparison:
    old_ids = {f["id"]: f for f in old["findings"]}
    new_ids = {f["id"]: f for f in new["findings"]}
    verdicts = [(prop, entry["verdict"], new["properties"].get(prop, {}).get("verdict", "not run"))
                for prop, entry in old["properties"].items()]
    return Comparison(
        old=old, new=new,
        fixed=[f for i, f in old_ids.items() if i not in new_ids],
        added=[f for i, f in new_ids.items() if i not in old_ids],
        unchanged=[(f, new_ids[i]) for i, f in old_ids.items() if i in new_ids],
        verdicts=[v for v in verdicts if v[1] != v[2]],
    )


def _name(c: dict[str, Any]) -> str:
    return f"{c['bridge']['name']} {c['bridge']['version']}"


def _tested(c: dict[str, Any]) -> str:
    return (f"profile {c['profile']['name']}, {c['tested']['examples']} valid examples, "
            f"ernie-conformance {c['versions']['ernie-conformance']}")


def render_text(comparison: Comparison) -> str:
    old, new = comparison.old, comparison.new
    lines = [f"{_name(old)} -> {_name(new)}",
             f"  old: {_tested(old)}", f"  new: {_tested(new)}", ""]
    for title, findings in (("new findings", comparison.added), ("fixed findings", comparison.fixed)):
        lines.append(f"{title}: {len(findings)}")
        lines += [f"  {f['id']}\n      {f['summary']}" for f in findings]
    lines.append(f"unchanged findings: {len(comparison.unchanged)}")
    lines += [f"  {o['id']}" for o, _ in comparison.unchanged]
    lines.append(f"verdicts changed: {len(comparison.verdicts)}")
    lines += [f"  {prop}: {a} -> {b}" for prop, a, b in comparison.verdicts]
    lines.append("")
    lines.append("REGRESSION: the new version has findings the old one lacks" if comparison.regressed
                 else "no new findings")
    return "\n".join(lines) + "\n"


def render_markdown(comparison: Comparison) -> str:
    old, new = comparison.old, comparison.new
    lines = [f"## {_name(old)} -> {_name(new)}", "",
             f"- old: {_tested(old)}", f"- new: {_tested(new)}", "",
             "| finding | status | what fails, when |", "|---|---|---|"]
    rows = ([(f, "new") for f in comparison.added] + [(f, "fixed") for f in comparison.fixed]
            + [(n, "unchanged") for _, n in comparison.unchanged])
    lines += [f"| `{f['id']}` | {status} | {f['summary']} |" for f, status in rows] or ["| (none) | | |"]
    lines += ["", "| property | old verdict | new verdict |", "|---|---|---|"]
    lines += [f"| {prop} | {a} | {b} |" for prop, a, b in comparison.verdicts] or ["| (no verdict changed) | | |"]
    lines += ["", "**Regression**: the new version has findings the old one lacks." if comparison.regressed
              else "No new findings."]
    return "\n".join(lines) + "\n"
