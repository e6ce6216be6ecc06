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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ernie_ref import ErnieMoeConfig
from ernie_ref.layout import Layout

from .counterexample import Counterexample, replay_command
from .numerics import FP32_RTOL, tolerance
from .properties import PROPERTIES

__all__ = ["SCHEMA", "build_certificate", "validate", "write_certificate", "plot_stage_errors", "render_markdown"]

SCHEMA = "ernie-conformance/certificate/v1"
SCHEMA_FILE = Path(__file__).with_name("certificate.schema.json")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _property_of(test_id: str) -> str | None:
    name = test_id.rsplit("::", 1)[-1].split("[")[0]
    prop = name.removeprefix("test_")
    return prop if prop in PROPERTIES else None


def build_certificate(
    *,
    bridge: Any,
    bridge_spec: str,
    results: dict[str, Any],
    profile: str,
    max_examples: int,
    layouts: list[str],
    device: str,
    dtypes: list[str] | None = None,
    checkpoint: str | None,
    out_dir: Path,
) -> dict[str, Any]:
    """Turn the suite's results (`--results-json`) into a certificate dict."""
    properties: dict[str, Any] = {p: {"verdict": "not run", "examples": 0, "duration_s": 0.0, "failure": None} for p in PROPERTIES}
    for result in results["results"]:
        prop = _property_of(result["test"])
        if prop is None:
            continue
        verdict = {"passed": "pass", "failed": "fail", "xfailed": "known failure", "skipped": "not run"}.get(
            result["outcome"], result["outcome"])
        entry = {"verdict": verdict, "examples": result["examples"], "duration_s": result["duration_s"], "failure": None}
        if verdict in ("fail", "known failure"):
            entry["failure"] = _failure_entry(result, out_dir, prop)
        properties[prop] = entry
    deviations = list(getattr(bridge, "deviations", lambda: [])())
    verdicts = [p["verdict"] for p in properties.values()]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bridge": {"name": bridge.name, "spec": bridge_spec, "version": bridge.version()},
        "versions": {
            "ernie-conformance": _version("ernie-conformance"),
            "megatron-core": _version("megatron-core"),
            "transformers": _version("transformers"),
            "torch": _version("torch"),
            "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count() or 1,
                    "device": device},
        "profile": {"name": profile, "max_examples": max_examples},
        "layouts": layouts,
        **({"dtypes": dtypes} if dtypes else {}),
        "checkpoint": checkpoint,
        "deviations": deviations,
        "refusals": results.get("refusals", {}),
        "properties": properties,
        "known_failures": [p for p, e in properties.items() if e["verdict"] == "known failure"],
        "conforms": all(v == "pass" for v in verdicts),
    }


def _failure_entry(result: dict[str, Any], out_dir: Path, prop: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"message": _first_lines(result["message"]), "counterexample": None}
    path = result.get("counterexample")
    if not path or not Path(path).is_file():
        return entry
    example = Counterexample.load(path)
    entry["counterexample"] = {
        "file": str(Path(path).resolve()),
        "replay": replay_command(Path(path).resolve()),
        "config": ErnieMoeConfig.from_hf(example.config).one_line(),
        "weights_seed": example.weights_seed,
        "checkpoint": example.checkpoint,
        "inputs": example.inputs,
        "layout": str(Layout(**example.layout)),
        "dtype": example.dtype,
        "corruption": example.corruption,
        "message": example.message,
    }
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


def _first_lines(text: str, limit: int = 20) -> str:
    """What the failure said: the exception lines of pytest's long report, without the traceback
    and without Hypothesis' dump of the example (the counterexample entry has it, shorter)."""
    lines = [line[2:] for line in text.splitlines() if line.startswith("E ")] or text.splitlines()[-limit:]
    for i, line in enumerate(lines):
        if line.strip().startswith(("Failing test case", "Falsifying example")):
            lines = lines[:i]
            break
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
    b, v, m = c["bridge"], c["versions"], c["machine"]
    verdict = "**CONFORMS**" if c["conforms"] else "**DOES NOT CONFORM**"
    lines = [
        f"# Conformance certificate: {b['name']} {b['version']}",
        "",
        f"{verdict} (ernie-conformance {v['ernie-conformance']}, {c['created']})",
        "",
        "| | |", "|---|---|",
        f"| bridge | `{b['spec']}` version {b['version']} |",
        f"| megatron-core / transformers / torch | {v['megatron-core']} / {v['transformers']} / {v['torch']} |",
        f"| python, machine | {v['python']}, {m['platform']} ({m['processor']}, {m['cpus']} CPUs), device {m['device']} |",
        f"| profile | {c['profile']['name']} ({c['profile']['max_examples']} examples per property) |",
        f"| layouts | {', '.join(c['layouts'])} |",
        *([f"| dtypes of drawn checkpoints | {', '.join(c['dtypes'])} |"] if c.get("dtypes") else []),
    ]
    if c["checkpoint"]:
        lines.append(f"| checkpoint | `{c['checkpoint']}` |")
    lines += ["", "## Verdicts", "", "| property | verdict | examples | seconds |", "|---|---|---:|---:|"]
    for prop, e in c["properties"].items():
        lines.append(f"| {prop} | {e['verdict']} | {e['examples']} | {e['duration_s']:.1f} |")
    lines += ["", "## Declared deviations", ""]
    lines += [f"- {d}" for d in c["deviations"]] or ["None."]
    lines += ["", "## Declared refusals (configs the bridge says it does not support)", ""]
    lines += [f"- {reason} ({count} drawn configs)" for reason, count in c["refusals"].items()] or ["None."]
    for title, wanted in (("Failures", "fail"), ("Known failures", "known failure")):
        failing = {p: e for p, e in c["properties"].items() if e["verdict"] == wanted}
        if not failing:
            continue
        lines += ["", f"## {title}"]
        for prop, e in failing.items():
            f = e["failure"]
            lines += ["", f"### {prop}", "", "```", f["message"], "```"]
            ce = f.get("counterexample")
            if ce:
                weights = (f"checkpoint `{ce['checkpoint']}`" if ce["checkpoint"]
                           else f"{ce.get('dtype', 'float32')} weights seed {ce['weights_seed']}")
                lines += ["", f"Shrunk counterexample: config `{ce['config']}`, {weights}, layout {ce['layout']}, "
                              f"inputs {ce['inputs']}" + (f", corruption {ce['corruption']}" if ce["corruption"] else ""),
                          "", f"Reproduce: `{ce['replay']}`"]
            if f.get("plot"):
                lines += ["", f"![error by stage]({f['plot']})"]
            if f.get("stage_errors"):
                lines += ["", "| stage | relative error |", "|---|---:|"]
                lines += [f"| {s} | {err if isinstance(err, str) else format(err, '.3g')} |" for s, err in f["stage_errors"]]
    return "\n".join(lines) + "\n"


def write_certificate(certificate: dict[str, Any], out_dir: Path) -> None:
    validate(certificate)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "certificate.json").write_text(json.dumps(certificate, indent=2) + "\n")
    (out_dir / "certificate.md").write_text(render_markdown(certificate))
