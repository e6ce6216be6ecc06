"""Certificates: the verdict of one certify run for one bridge version, as JSON and Markdown.

`certificate.json` follows `certificate.schema.json` (versioned by its `schema` field);
`certificate.md` is rendered from it. For an equivalence failure the error of every stage,
layer by layer, is plotted to a PNG beside them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import textwrap
from datetime import datetime, timezone
from collections import Counter
from pathlib import Path
from typing import Any

from ernie_ref import ErnieMoeConfig
from ernie_ref.layout import Layout

from .counterexample import Counterexample, replay_command
from .numerics import FP32_CONDITION_SHARE, FP32_RTOL, tolerance
from .properties import PROPERTIES
from .versions import package_version, suite_sources_digest

__all__ = ["SCHEMA", "build_certificate", "validate", "write_certificate", "plot_stage_errors", "render_markdown"]

SCHEMA = "ernie-conformance/certificate/v4"
SCHEMA_FILE = Path(__file__).with_name("certificate.schema.json")


def _test_name(test_id: str) -> str:
    return test_id.rsplit("::", 1)[-1]


def _property_of(test_id: str) -> str | None:
    prop = _test_name(test_id).split("[")[0].removeprefix("test_")
    return prop if prop in PROPERTIES else None


def _structure_of(test_id: str) -> str | None:
    name = _test_name(test_id)
    if name.startswith("test_published_structure_is_supported["):
        return name.split("[", 1)[1].rstrip("]")
    return None


def relative(path: str | Path, base: Path) -> str:
    """`path` relative to `base` (the certificate's directory), with forward slashes."""
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def build_certificate(
    *,
    bridge: Any,
    bridge_spec: str,
    results: dict[str, Any],
    profile: str,
    layouts: list[str],
    device: str,
    dtypes: list[str],
    checkpoint: str | None,
    out_dir: Path,
    runs: list[dict[str, Any]] | None = None,
    suite_sources: str | None = None,
) -> dict[str, Any]:
    """Turn the suite's results (`--results-json`) into a certificate dict: what was drawn and
    what held, with every path relative to `out_dir`."""
    required = results["required_examples"]
    properties: dict[str, Any] = {p: _not_run() for p in PROPERTIES}
    published: dict[str, Any] = {}
    for result in results["results"]:
        if (structure := _structure_of(result["test"])) is not None:
            reason = result["why"] if result["verdict"] != "pass" else ""
            published[structure] = {"verdict": "supported" if result["verdict"] == "pass" else result["verdict"],
                                    "reason": reason}
            continue
        prop = _property_of(result["test"])
        if prop is None:
            continue
        record = result["record"]
        entry = {
            "verdict": result["verdict"],
            "why": result["why"],
            "examples": record.get("valid", 0),
            "draws": record.get("draws", 0),
            "ties": record.get("ties", 0),
            "ill_conditioned": record.get("ill_conditioned", 0),
            "refusals": record.get("refusals", {}),
            "layouts": record.get("layouts", {}),
            "dtypes": record.get("dtypes", {}),
            "structures": record.get("structures", {}),
            "long_inputs": record.get("long_inputs", 0),
            "shrink_calls": record.get("shrink_calls", 0),
            "isolation_calls": record.get("isolation_calls", 0),
            "duration_s": result["duration_s"],
            "failure": None,
        }
        if prop == "refusal":
            named = record.get("refusal_named", {})
            entry["errors_naming_the_corruption"] = {"named": named.get("named", 0), "unnamed": named.get("unnamed", 0)}
        if result["verdict"] in ("fail", "known failure", "error"):
            entry["failure"] = _failure_entry(result, out_dir, prop)
        properties[prop] = entry
    records = [r["record"] for r in results["results"] if _property_of(r["test"])]
    draws = sum(r.get("draws", 0) for r in records)
    refusals = results.get("refusals", {})
    verdicts = [p["verdict"] for p in properties.values()]
    certificate = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bridge": {"name": bridge.name, "spec": bridge_spec, "version": bridge.version()},
        "versions": {
            "ernie-conformance": package_version("ernie-conformance"),
            # The digest the run recorded when it started (a resumed run checked it again), not
            # the sources' digest at the end: they may have changed while it ran.
            "ernie-conformance sources": suite_sources or suite_sources_digest(),
            "megatron-core": package_version("megatron-core"),
            "transformers": package_version("transformers"),
            "torch": package_version("torch"),
            "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count() or 1,
                    "device": device},
        "profile": {"name": profile, "required_examples": required, "max_shrinks": results.get("max_shrinks", 0)},
        "requested": {"layouts": layouts, "dtypes": dtypes},
        "tested": {
            "examples": sum(r.get("valid", 0) for r in records),
            "draws": draws,
            "ties": sum(r.get("ties", 0) for r in records),
            "ill_conditioned": sum(r.get("ill_conditioned", 0) for r in records),
            "declared_unsupported": sum(refusals.values()),
            "layouts": dict(_summed(r.get("layouts", {}) for r in records)),
            "dtypes": dict(_summed(r.get("dtypes", {}) for r in records)),
            "structures": dict(_summed(r.get("structures", {}) for r in records)),
            "long_inputs": sum(r.get("long_inputs", 0) for r in records),
            "config_limits": _limits(records),
        },
        "checkpoint": relative(checkpoint, out_dir) if checkpoint else None,
        "runs": [{"started": run["started"], "tests": [_test_name(test) for test in run["tests"]]} for run in runs or []],
        "deviations": list(getattr(bridge, "deviations", lambda: [])()),
        "refusals": {reason: {"draws": n, "share": round(n / max(draws, 1), 4)} for reason, n in refusals.items()},
        "published": published,
        "properties": properties,
        "known_failures": [p for p, e in properties.items() if e["verdict"] == "known failure"],
        "findings": certificate_findings(results, out_dir),
        "known_findings": _known_findings(results.get("known_failures"), out_dir),
        "conforms": all(v == "pass" for v in verdicts) and bool(published)
                    and all(e["verdict"] == "supported" for e in published.values()),
    }
    certificate["headline"] = headline(certificate)
    return certificate


def certificate_findings(results: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """The session's findings, one per id across properties (`findings.merge_findings`), with
    paths relative to `out_dir` and whether the known-failures file lists each."""
    from .findings import merge_findings

    known = results.get("known_failures") or {}
    new = set(known.get("new", [])) if known else None
    entries = []
    for f in merge_findings(results["results"]):
        files = {prop: relative(path, out_dir) if path else None for prop, path in f["counterexamples"].items()}
        main = files.get(f["properties"][0])
        entries.append({
            "id": f["id"], "summary": f["summary"], "what": f["what"], "kind": f["kind"], "signature": f["signature"], "when": f["when"],
            "trigger": f["trigger"], "variants": f.get("variants", []), "properties": f["properties"],
            "hits": f["hits"], "counterexample": main, "counterexamples": files,
            "replay": replay_command(main) if main else None, "message": f["message"],
            "stage": f["facts"].get("stage"), "exception": f["facts"].get("exception"),
            "known": new is not None and f["id"] not in new,
        })
    return entries


def _not_run() -> dict[str, Any]:
    return {"verdict": "not run", "why": "", "examples": 0, "draws": 0, "ties": 0, "ill_conditioned": 0, "refusals": {}, "layouts": {},
            "dtypes": {}, "shrink_calls": 0, "isolation_calls": 0, "duration_s": 0.0, "failure": None}


def _summed(counters: Any) -> Counter[str]:
    total: Counter[str] = Counter()
    for counts in counters:
        total.update(counts)
    return total


def _limits(records: list[dict[str, Any]]) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    for record in records:
        for dtype, values in record.get("limits", {}).items():
            limits.setdefault(dtype, values)
    return limits


def headline(c: dict[str, Any]) -> str:
    """One paragraph: the verdict, what it rests on, and what the bridge declared unsupported."""
    t = c["tested"]
    verdict = "CONFORMS" if c["conforms"] else "DOES NOT CONFORM"
    counts = {v: sum(e["verdict"] == v for e in c["properties"].values())
              for v in ("pass", "fail", "inconclusive", "error", "known failure", "not run")}
    parts = [f"{verdict}: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + " of 5 properties"]
    if c["findings"]:
        parts.append(f"{len(c['findings'])} distinct finding{'s' if len(c['findings']) != 1 else ''}")
    source = f"the checkpoint {c['checkpoint']}" if c["checkpoint"] else "drawn checkpoints"
    parts.append(f"on {t['examples']} valid examples of {source} "
                 f"({', '.join(f'{n} {d}' for d, n in sorted(t['dtypes'].items())) or 'none'}; "
                 f"{len(t['layouts'])} layout{'s' if len(t['layouts']) != 1 else ''})")
    refused = [s for s, e in c["published"].items() if e["verdict"] != "supported"]
    if refused:
        parts.append("declares published structures unsupported: " + ", ".join(refused))
    elif c["published"]:
        parts.append("supports the published structures " + ", ".join(c["published"]))
    if c["refusals"]:
        parts.append("declared unsupported: " + "; ".join(
            f"{reason} ({e['share']:.0%} of {t['draws']} draws)" for reason, e in c["refusals"].items()))
    else:
        parts.append("declared nothing unsupported")
    return "; ".join(parts) + "."


def _known_findings(known: dict[str, Any] | None, out_dir: Path) -> dict[str, Any] | None:
    """The known-failures report with its file relative to the certificate, as every other path."""
    if not known or not known.get("file"):
        return known
    return {**known, "file": relative(Path(known["file"]), out_dir)}


def _failure_entry(result: dict[str, Any], out_dir: Path, prop: str) -> dict[str, Any]:
    """What failed, in the property's own words, from the counterexample file (never pytest's or
    Hypothesis's raw report, whose lines name this machine's files)."""
    path = result.get("counterexample")
    if result["verdict"] == "error" or not path or not Path(path).is_file():
        return {"message": result["why"] or _exception_lines(result["message"]), "kind": "suite error"
                if result["verdict"] == "error" else "", "facts": {}, "counterexample": None}
    example = Counterexample.load(path)
    entry: dict[str, Any] = {"message": example.message, "kind": example.kind, "facts": example.facts}
    entry["counterexample"] = {
        "file": relative(path, out_dir),
        "replay": replay_command(relative(path, out_dir)),
        "config": ErnieMoeConfig.from_hf(example.config).one_line(),
        "weights_seed": example.weights_seed,
        "checkpoint": relative(example.checkpoint_path(), out_dir) if example.checkpoint else None,
        "inputs": example.inputs,
        "layout": str(Layout(**example.layout)),
        "dtype": example.dtype,
        "corruption": example.corruption,
    }
    if "traceback" in example.evidence:
        entry["traceback"] = example.evidence["traceback"]
    if "stage_errors" in example.evidence:
        errors = [(stage, float(err)) for stage, err in example.evidence["stage_errors"]]
        entry["stage_errors"] = [[s, e if math.isfinite(e) else str(e)] for s, e in errors]
        plot = out_dir / f"localisation-{prop}.png"
        plot_stage_errors(errors, plot, title=f"{prop}: error by stage, {example.bridge}",
                          rtol=tolerance(example.dtype).rtol)
        entry["plot"] = plot.name
    if "checkpoint_diff" in example.evidence:
        entry["checkpoint_diff"] = example.evidence["checkpoint_diff"]
    return entry


def _exception_lines(text: str, limit: int = 20) -> str:
    """The exception lines of pytest's long report ("E ..."), without the traceback."""
    lines = [line[2:] for line in text.splitlines() if line.startswith("E ")] or text.splitlines()[-limit:]
    return textwrap.dedent("\n".join(lines[:limit])).strip()


def plot_stage_errors(errors: list[tuple[str, float]], path: Path, title: str, rtol: float = FP32_RTOL) -> None:
    """Relative error per stage (log scale), with the tolerance `rtol`; the stages over it marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s, _ in errors]
    floor = 1e-12
    values = [max(e, floor) if math.isfinite(e) else 1e3 for _, e in errors]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(stages)), 4))
    colours = ["tab:red" if v > rtol else "tab:blue" for v in values]
    ax.bar(range(len(stages)), values, color=colours)
    ax.axhline(rtol, color="black", linestyle="--", linewidth=1, label=f"tolerance {rtol:g}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(stages)), stages, rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("relative error")
    ax.set_title(f"{title}\n(router choice: fraction of tokens routed elsewhere; zero drawn at 1e-12)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validate(certificate: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if the certificate does not follow the schema."""
    import jsonschema

    jsonschema.validate(certificate, json.loads(SCHEMA_FILE.read_text()))


def render_markdown(c: dict[str, Any]) -> str:
    b, v, m, t = c["bridge"], c["versions"], c["machine"], c["tested"]
    verdict = "**CONFORMS**" if c["conforms"] else "**DOES NOT CONFORM**"
    lines = [
        f"# Conformance certificate: {b['name']} {b['version']}",
        "",
        f"{verdict} (ernie-conformance {v['ernie-conformance']}"
        + (f", sources {v['ernie-conformance sources']}" if "ernie-conformance sources" in v else "") + f", {c['created']})",
        "",
        c["headline"],
        "",
        "| | |", "|---|---|",
        f"| bridge | `{b['spec']}` version {b['version']} |",
        f"| megatron-core / transformers / torch | {v['megatron-core']} / {v['transformers']} / {v['torch']} |",
        f"| python, machine | {v['python']}, {m['platform']} ({m['processor']}, {m['cpus']} CPUs), device {m['device']} |",
        f"| profile | {c['profile']['name']} ({c['profile']['required_examples']} valid examples per property required; "
        f"at most {c['profile']['max_shrinks']} to shrink a failure) |",
        f"| checkpoints | {'`' + c['checkpoint'] + '`' if c['checkpoint'] else 'drawn'}; dtypes requested "
        f"{', '.join(c['requested']['dtypes'])} |",
        f"| layouts requested | {', '.join(c['requested']['layouts'])} |",
    ]
    if len(runs := c.get("runs", [])) > 1:
        lines += [f"| runs | {len(runs)} (an interrupted run resumed with the same options and versions): "
                  + "; ".join(f"{run['started']}: {', '.join(run['tests']) or 'none'}" for run in runs) + " |"]
    lines += ["", "## What was tested", "",
              f"{t['examples']} valid examples over the five properties, from {t['draws']} draws: "
              f"{t['declared_unsupported']} declared unsupported by the bridge, "
              f"{t.get('ill_conditioned', 0)} set aside as ill-conditioned (the fp32 oracle differs from float64 by "
              f"more than {FP32_CONDITION_SHARE:g} x {FP32_RTOL:g}). In {t['ties']} valid examples the oracle decided a "
              f"routing near-tie as the model under test did (a choice right up to the routing margin).",
              "", "| valid examples per layout | |", "|---|---:|"]
    lines += [f"| {layout} | {n} |" for layout, n in sorted(t["layouts"].items())]
    lines += ["", "| valid examples per checkpoint dtype | |", "|---|---:|"]
    lines += [f"| {dtype} | {n} |" for dtype, n in sorted(t["dtypes"].items())]
    if t["config_limits"]:
        lines += ["", "Config limits in force (`conformance.strategies.ConfigLimits`), by dtype:", ""]
        lines += [f"- {dtype}: " + ", ".join(f"{k}={val}" for k, val in limits.items())
                  for dtype, limits in t["config_limits"].items()]
    covered = t.get("structures", {})
    lines += ["", f"{t.get('long_inputs', 0)} valid examples had positions beyond 256."]
    lines += ["", "## Published structures", "",
              "Declared support, and the valid examples drawn with the structure (every structural field as "
              "published; hidden size, MLP widths and vocabulary narrowed: `strategies.published_configs`).", "",
              "| structure | verdict | reason | valid examples |", "|---|---|---|---:|"]
    lines += [f"| {s} | {e['verdict']} | {e['reason']} | {covered.get(s, 0)} |" for s, e in c["published"].items()] \
        or ["| (not run) | | | |"]
    lines += [f"| {s} | (not checked) | | {n} |" for s, n in covered.items() if s not in c["published"]]
    lines += findings_markdown(c["findings"])
    lines += ["", "## Verdicts", "",
              "| property | verdict | valid examples | draws | declared unsupported | near-ties followed | ill-conditioned | seconds | why |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for prop, e in c["properties"].items():
        lines.append(f"| {prop} | {e['verdict']} | {e['examples']} | {e['draws']} | {sum(e['refusals'].values())} | "
                     f"{e['ties']} | {e.get('ill_conditioned', 0)} | {e['duration_s']:.1f} | {e['why']} |")
    named = c["properties"]["refusal"].get("errors_naming_the_corruption")
    if named:
        lines += ["", f"Refusal errors that name the corrupted tensor or field: {named['named']} of "
                      f"{named['named'] + named['unnamed']}."]
    lines += ["", "## Declared deviations", ""]
    lines += [f"- {d}" for d in c["deviations"]] or ["None."]
    lines += ["", "## Declared refusals (configs the bridge says it does not support)", ""]
    lines += [f"- {reason}: {e['draws']} draws ({e['share']:.0%})" for reason, e in c["refusals"].items()] or ["None."]
    for title, wanted in (("Failures", "fail"), ("Errors of the suite", "error"), ("Known failures", "known failure")):
        failing = {p: e for p, e in c["properties"].items() if e["verdict"] == wanted and e["failure"]}
        if not failing:
            continue
        lines += ["", f"## {title}"]
        for prop, e in failing.items():
            f = e["failure"]
            lines += ["", f"### {prop}", "", "```", f["message"], "```"]
            ce = f.get("counterexample")
            if ce:
                weights = (f"checkpoint `{ce['checkpoint']}`" if ce["checkpoint"]
                           else f"{ce['dtype']} weights seed {ce['weights_seed']}")
                lines += ["", f"Shrunk counterexample: config `{ce['config']}`, {weights}, layout {ce['layout']}, "
                              f"inputs {ce['inputs']}" + (f", corruption {ce['corruption']}" if ce["corruption"] else ""),
                          "", f"Reproduce (from this directory): `{ce['replay']}`"]
            if f.get("plot"):
                lines += ["", f"![error by stage]({f['plot']})"]
            if f.get("stage_errors"):
                lines += ["", "| stage | relative error |", "|---|---:|"]
                lines += [f"| {s} | {err if isinstance(err, str) else format(err, '.3g')} |" for s, err in f["stage_errors"]]
    return "\n".join(lines) + "\n"


def findings_markdown(findings: list[dict[str, Any]]) -> list[str]:
    """The findings table: one row per distinct defect, then each finding's smallest example."""
    if not findings:
        return ["", "## Findings", "", "None: no property failed."]
    lines = ["", "## Findings", "",
             f"{len(findings)} distinct defects. A finding's trigger is what its failure needs (each coordinate of "
             "the shrunk example moved on its own; those whose change cures it are kept); its id is its kind and "
             "the trigger's fields. Reproduce one from this directory with its replay command.", "",
             "| id | what fails | when (trigger) | properties (examples hitting it) | known |", "|---|---|---|---|---|"]
    for f in findings:
        hits = ", ".join(f"{p} ({n})" for p, n in f["hits"].items())
        lines.append(f"| `{f['id']}` | {_what_fails(f)} | {f['when']} | {hits} | {'yes' if f['known'] else 'no'} |")
    for f in findings:
        lines += ["", f"### `{f['id']}`", "", f"{f['summary']}.", "", "```", f["message"], "```"]
        if f["replay"]:
            lines += ["", f"Smallest example: `{f['counterexample']}`; reproduce: `{f['replay']}`"]
    return lines


def _what_fails(f: dict[str, Any]) -> str:
    return f["what"].replace("|", "\\|")


def write_certificate(certificate: dict[str, Any], out_dir: Path) -> None:
    validate(certificate)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "certificate.json").write_text(json.dumps(certificate, indent=2) + "\n")
    (out_dir / "certificate.md").write_text(render_markdown(certificate))
