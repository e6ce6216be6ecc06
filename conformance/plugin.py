"""pytest plugin of the conformance suite: its options, hooks and fixtures, and the report header.

Loaded in every pytest session of an environment where ernie-conformance is installed
(entry point `pytest11`), so `pytest --pyargs conformance --bridge NAME` works anywhere. It
changes nothing in a session that does not run the suite: only when `--bridge` is given or the
suite's modules (`conformance.suite`) are collected does it hide GPUs, apply its warning filters
(to the suite's tests alone) and record results. Its Hypothesis profiles have names of their own
(`ernie-dev`, `ernie-ci`, `ernie-thorough`) and are applied to the suite's tests alone, so a
project's own `ci` profile stays as it is.

The rooms beside it: the profiles and the session's choice of one in `profiles`; the session the
suite's tests get, and the layouts, dtypes and config bounds it is built from, in `session`; what
each test saw in `recorder`; the known-failures file in `known_failures`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from .independent_draws import make_draws_independent
from .process_setup import hide_gpus, megatron_warning_lines
from .known_failures import known_findings_report, property_of_test_id, read_known_findings
from .profiles import MAX_FINDINGS, MAX_SHRINKS, choose, chosen, default_profile, max_shrinks, suite_settings
from .recorder import RECORDER, SessionRecord
from .session import (DEFAULT_BRIDGE, DTYPE_OPTIONS, SuiteSession, check_layouts_fit_world, checkpoint_layouts_and_dtypes,
                      config_limits, parse_layouts)
from .versions import package_version

ENV_HYPOTHESIS_DB = "ERNIE_CONFORMANCE_HYPOTHESIS_DB"
SUITE_PACKAGE = "conformance.suite"
SUITE_DIR = Path(__file__).parent / "suite"

_SESSION = SessionRecord()  # the controlling process's results, one per test of the suite
_STATE: dict[str, Any] = {"suite": False, "worker": False, "progress": None, "results_json": None, "total": 0}


class Inconclusive(AssertionError):
    """A property held on fewer valid examples than the profile asks for: no verdict was earned."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ernie-conformance")
    group.addoption("--bridge", default=None,
                    help="bridge under test: a registered name or package.module:attribute (default: reference); "
                         "giving it makes the session run the suite")
    group.addoption("--max-examples", type=int, default=None,
                    help="Hypothesis examples per property (overrides the profile's count)")
    group.addoption("--max-shrinks", type=int, default=None,
                    help="examples run to shrink a test's first failure, at most (default: the profile's, "
                         + ", ".join(f"{p} {n}" for p, n in MAX_SHRINKS.items()) + ")")
    group.addoption("--xfails-file", default=None,
                    help="known-failures file: finding ids, one per line (# comments). A property whose findings "
                         "are all listed is a known failure; a finding not listed fails it; a listed finding that "
                         "no longer reproduces fails the run")
    group.addoption("--max-findings", type=int, default=None,
                    help=f"findings searched for per property, at most (default {MAX_FINDINGS}); 1 stops at the first")
    group.addoption("--no-triggers", action="store_true",
                    help="stop each property at its first failure without isolating its trigger (one finding, its id "
                         "ending in @not-isolated): a kill check, not a diagnosis")
    group.addoption("--counterexamples", default=None,
                    help="directory for shrunk counterexamples (default: $ERNIE_CONFORMANCE_COUNTEREXAMPLES "
                         "or ./counterexamples)")
    group.addoption("--hypothesis-db", default=None,
                    help=f"Hypothesis example database directory (default: ${ENV_HYPOTHESIS_DB}, else the "
                         "profile's; keep it between CI runs to replay past failures first)")
    group.addoption("--checkpoint", default=None,
                    help="run the properties on this HF checkpoint directory, with drawn inputs and layouts "
                         "instead of drawn weights")
    group.addoption("--layouts", default="any",
                    help="parallel layouts to draw from: 'any' (every layout of up to --max-ranks ranks) or a "
                         "comma-separated list such as tp1-pp1-ep1-vpp1,tp2-pp2-ep2-vpp1")
    group.addoption("--max-ranks", type=int, default=4,
                    help="ranks for --layouts any (default 4); multi-rank layouts run on a pool of this many processes")
    group.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the bridge's models run: cpu (default; a GPU, if any, is hidden from the suite) or "
                         "cuda (one GPU; several ranks need torchrun, see conformance.torchrun)")
    group.addoption("--dtype", default="any", choices=sorted(DTYPE_OPTIONS),
                    help="dtype of the drawn checkpoints: fp32, bf16 (the router stays fp32, as in the published "
                         "checkpoints), or any (both; default)")
    group.addoption("--published-in-ten", type=int, default=None, choices=range(11), metavar="N",
                    help="of ten drawn configs, about how many take a published ERNIE 4.5 structure with narrowed "
                         "widths (default 2; 0: small configs alone, which tests the suite's own machinery faster "
                         "and says so in the certificate's config limits)")
    group.addoption("--results-json", default=None, help="write each test's outcome, record and counterexample here")
    group.addoption("--no-shrink", action="store_true",
                    help="report the first failing example as found, without shrinking it (faster, larger)")
    group.addoption("--progress", default=None, help="append a line per finished test to this file (for certify)")


# Warnings that megatron-core raises about itself on every import or build (deprecations, no
# Apex or Transformer Engine): noise in a report about a bridge. Applied to the suite's tests only.
_IGNORED_WARNINGS = megatron_warning_lines()


def _names_the_suite(config: pytest.Config) -> bool:
    """Whether the command line asks for the suite: --bridge, or an argument naming its package
    (`--pyargs conformance`, `conformance.suite...`) or a path inside it."""
    if config.getoption("bridge", None) is not None:
        return True
    for arg in config.args:
        target = arg.split("::")[0]
        if config.getoption("pyargs", False) and (target == "conformance" or target.startswith(SUITE_PACKAGE)):
            return True
        path = Path(target).resolve()
        if path == SUITE_DIR or SUITE_DIR in path.parents or (path == SUITE_DIR.parent):
            return True
    return False


def _enter_suite_mode(config: pytest.Config) -> None:
    """What only a session that runs the suite gets: GPUs hidden (for --device cpu), a launcher's
    world checked against the layouts."""
    if _STATE["suite"]:
        return
    _STATE["suite"] = True
    make_draws_independent()
    _select_device(config.getoption("device", "cpu"))
    world = _launcher_world()
    if world is not None:
        check_layouts_fit_world(parse_layouts(config.getoption("layouts"), config.getoption("max_ranks")),
                                world.world_size, config.getoption("layouts"), config.getoption("max_ranks"))


@pytest.hookimpl(trylast=True)  # after Hypothesis' plugin has read --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    _STATE["worker"] = hasattr(config, "workerinput")
    _STATE["progress"] = config.getoption("progress", None)
    _STATE["results_json"] = config.getoption("results_json", None)
    profile = config.getoption("hypothesis_profile", None) or default_profile()
    overrides: dict[str, Any] = {}
    if (max_examples := config.getoption("max_examples", None)) is not None:
        overrides["max_examples"] = max_examples
    if db := (config.getoption("hypothesis_db", None) or os.environ.get(ENV_HYPOTHESIS_DB)):
        from hypothesis.database import DirectoryBasedExampleDatabase

        overrides["database"] = DirectoryBasedExampleDatabase(db)
    if config.getoption("no_shrink", False):
        from hypothesis import Phase

        overrides["phases"] = [p for p in Phase if p not in (Phase.shrink, Phase.explain)]
    try:
        choose(profile, overrides, config.getoption("max_shrinks", None), config.getoption("max_findings", None))
    except Exception as e:  # noqa: BLE001 - Hypothesis' own error names the profile
        raise pytest.UsageError(f"--hypothesis-profile {profile}: {e}") from e
    if _names_the_suite(config):
        _enter_suite_mode(config)


def _select_device(device: str) -> None:
    """cpu: hide any GPU, before CUDA starts, from this process and the rank processes it starts
    (the bridges' model code puts models on a GPU whenever it sees one). cuda: one must be there."""
    if device == "cpu":
        hide_gpus()
        return
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _is_suite_item(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and module.__name__.startswith(SUITE_PACKAGE)


def _property_of(item: pytest.Item) -> str | None:
    from .properties import PROPERTIES

    name = property_of_test_id(item.nodeid)
    return name if name in PROPERTIES else None


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not _names_the_suite(config):
        return []
    from .bridge import BridgeNotFound, resolve_bridge

    try:
        bridge = resolve_bridge(config.getoption("bridge") or DEFAULT_BRIDGE)
    except BridgeNotFound as e:
        raise pytest.UsageError(str(e)) from e
    layouts = parse_layouts(config.getoption("layouts"), config.getoption("max_ranks"))
    deviations = list(getattr(bridge, "deviations", lambda: [])())
    return [
        f"ernie-conformance {package_version('ernie-conformance')}: bridge {bridge.name} {bridge.version()}",
        f"megatron-core {package_version('megatron-core')}, transformers {package_version('transformers')}, "
        f"torch {package_version('torch')}; hypothesis profile {chosen().label} "
        f"({suite_settings().max_examples} examples, at most {max_shrinks()} to shrink a failure)",
        f"layouts: {len(layouts)} ({', '.join(map(str, layouts[:6]))}{', ...' if len(layouts) > 6 else ''}), "
        f"up to {max(layout.world_size for layout in layouts)} ranks; dtypes: "
        f"{', '.join(DTYPE_OPTIONS[config.getoption('dtype')])}; device {config.getoption('device')}",
        *([f"declared deviations of the adapter from the bridge as shipped ({len(deviations)}):"]
          + [f"  - {d}" for d in deviations] if deviations else []),
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    suite_items = [item for item in items if _is_suite_item(item)]
    if not suite_items:
        return
    _enter_suite_mode(config)
    for item in suite_items:
        for line in _IGNORED_WARNINGS:
            item.add_marker(pytest.mark.filterwarnings(line))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Record the suite's tests; a property that held on too few valid examples is inconclusive."""
    if not _is_suite_item(item):
        return (yield)
    RECORDER.start(item.nodeid)
    try:
        result = yield
    finally:
        RECORDER.stop()
    tally, required = RECORDER.tallies[item.nodeid], suite_settings().max_examples
    if _property_of(item) is not None and tally.valid < required:
        raise Inconclusive(
            f"inconclusive: the property held on {tally.valid} valid examples, fewer than the {required} the profile "
            f"asks for: of {tally.draws} draws, {sum(tally.refusals.values())} were declared unsupported by the bridge"
            + "".join(f" ({n}: {reason})" for reason, n in tally.refusals.most_common())
            + f", {tally.ill_conditioned} set aside as ill-conditioned")
    return result


def _status(excinfo: pytest.ExceptionInfo | None) -> tuple[str, str]:
    """(status, why) of a suite test from what it raised: see recorder.verdict_of."""
    from hypothesis.errors import FailedHealthCheck

    from _pytest.outcomes import XFailed

    from .properties import PropertyFailure, StructureRefused
    from .suite.drawing import FindingsFailure

    if excinfo is None:
        return "passed", ""
    error = excinfo.value
    if isinstance(error, XFailed):  # every finding is in the known-failures file
        return "failed", str(error)
    if isinstance(error, FindingsFailure):
        return "failed", ""
    if isinstance(error, Inconclusive):
        return "inconclusive", str(error)
    if isinstance(error, FailedHealthCheck):
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return "inconclusive", f"Hypothesis gave up on the draws (health check): {first}"
    errors = list(error.exceptions) if isinstance(error, BaseExceptionGroup) else [error]
    if isinstance(error, StructureRefused):
        return "failed", error.reason
    if all(isinstance(e, (PropertyFailure, StructureRefused)) for e in errors):
        return "failed", ""
    odd = next(e for e in errors if not isinstance(e, (PropertyFailure, StructureRefused)))
    return "suite error", f"an error of the suite, not a verdict on the bridge: {type(odd).__name__}: {odd}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.when == "call" and _is_suite_item(item):
        status, why = _status(call.excinfo)
        tally = RECORDER.pop(item.nodeid)
        report.user_properties.append(("status", status))
        report.user_properties.append(("why", why))
        if tally is not None:
            report.user_properties.append(("record", tally.to_json()))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the controlling process (with or without xdist): keep what each test of the suite reported."""
    if _STATE["worker"]:
        return
    props = dict(report.user_properties)
    if report.when == "call" and "status" in props:
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        message = report.longreprtext if report.failed or outcome == "xfailed" else ""
        _SESSION.add(report.nodeid, outcome, props["status"], props["why"], report.duration,
                     props.get("record") or {}, message)
        _write_progress()
        # Written after every test, so that an interrupted certify keeps what finished
        # (`certify --resume`); the session's end adds the comparison with the known failures.
        _write_results(known=None)


def pytest_collection_finish(session: pytest.Session) -> None:
    _STATE["total"] = _STATE["total"] or sum(_is_suite_item(item) for item in session.items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    _STATE["total"] = len(ids)


def _write_progress() -> None:
    if _STATE["progress"]:
        with open(_STATE["progress"], "a") as f:
            f.write(_SESSION.progress_line(_STATE["total"]) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _SESSION.results:
        return
    draws = sum(r["record"].get("draws", 0) for r in _SESSION.results)
    refusals = _SESSION.refusals()
    if refusals:
        terminalreporter.section("declared unsupported by the bridge (not failures; not valid examples either)")
        for reason, count in refusals.most_common():
            terminalreporter.write_line(f"{count:5d} of {draws} drawn configs ({count / max(draws, 1):.0%}): {reason}")
    unearned = [r for r in _SESSION.results if r["verdict"] in ("inconclusive", "error")]
    if unearned:
        terminalreporter.section("no verdict earned")
        for r in unearned:
            terminalreporter.write_line(f"{r['test']}: {r['verdict']}: {r['why']}")
    from .findings import merge_findings

    findings = merge_findings(_SESSION.results)
    if findings:
        known = _known_findings(config)
        terminalreporter.section(f"findings: {len(findings)} distinct defects (replay with: ernie-conformance replay FILE)")
        for f in findings:
            mark = "known" if f["id"] in known else "NEW"
            terminalreporter.write_line(f"{mark:5} {f['id']}")
            terminalreporter.write_line(f"      {f['summary']}")
            terminalreporter.write_line(f"      properties: " + ", ".join(f"{p} ({n} examples)" for p, n in f["hits"].items()))
            terminalreporter.write_line(f"      smallest example: {f['counterexample']}")
    if xfails_file := config.getoption("xfails_file", None):
        report = known_findings_report(xfails_file, _SESSION.results)
        if report["not_reproduced"]:
            terminalreporter.section("known-failures entries that matched no finding")
            for entry in report["not_reproduced"]:
                terminalreporter.write_line(entry + ("" if report["all_properties_ran"]
                                                     else " (not every property ran: not counted against the run)"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _STATE["worker"]:  # the controlling process only
        return
    known = None
    if (xfails_file := session.config.getoption("xfails_file", None)) and _SESSION.results:
        known = known_findings_report(xfails_file, _SESSION.results)
        if known["not_reproduced"] and known["all_properties_ran"]:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # strict: a listed finding no longer reproduces
    _write_results(known)


def _write_results(known: dict[str, Any] | None) -> None:
    """The session's results so far into --results-json, if given (the controlling process)."""
    if not _STATE["results_json"]:
        return
    profile = chosen()
    Path(_STATE["results_json"]).write_text(json.dumps(_SESSION.to_json(
        profile.label, profile.settings.max_examples, profile.max_shrinks, profile.max_findings, known), indent=2))


@pytest.fixture(scope="session")
def bridge(pytestconfig: pytest.Config):
    from .bridge import resolve_bridge

    return resolve_bridge(pytestconfig.getoption("bridge") or DEFAULT_BRIDGE)


@pytest.fixture(scope="session")
def megatron_runtime():
    """One intra-op thread, CPU patches applied and a one-rank gloo process group, once per session."""
    from .parallel import destroy_model_parallel, start_megatron_process

    start_megatron_process()
    yield
    destroy_model_parallel()


def _launcher_world() -> Any:
    """The world a launcher (conformance.torchrun) set up before it started pytest, or None.

    Looked up without importing conformance.distributed, which imports torch: a session that
    has no launcher (most sessions this plugin is loaded in) need not pay for it.
    """
    distributed = sys.modules.get("conformance.distributed")
    return distributed.launcher_world() if distributed is not None else None


@pytest.fixture(scope="session")
def rank_pool(pytestconfig: pytest.Config, bridge):
    """A pool of worker processes, one per rank, for layouts of more than one rank; started on
    first use, closed at the end of the session.

    Under a launcher (`python -m conformance.torchrun` under torchrun) the launched world is the
    pool: this session starts no processes of its own, and the launcher owns the world's lifetime.
    """
    import math

    from . import distributed
    from .rank_pool import RankPool

    world = distributed.launcher_world()
    if world is not None:
        yield world
        return
    layouts = parse_layouts(pytestconfig.getoption("layouts"), pytestconfig.getoption("max_ranks"))
    world = math.lcm(*(layout.world_size for layout in layouts))
    if world == 1:
        yield None
        return
    pool = RankPool(world, preload=tuple(getattr(bridge, "worker_imports", ())))
    distributed.set_pool(pool)
    try:
        yield pool
    finally:
        distributed.set_pool(None)
        pool.close()


@pytest.fixture(scope="session")
def suite(pytestconfig: pytest.Config, bridge, megatron_runtime, rank_pool) -> SuiteSession:
    from .counterexample import counterexample_dir

    checkpoint = pytestconfig.getoption("checkpoint")
    layouts = parse_layouts(pytestconfig.getoption("layouts"), pytestconfig.getoption("max_ranks"))
    dtypes = DTYPE_OPTIONS[pytestconfig.getoption("dtype")]
    if checkpoint is not None:
        try:
            layouts, dtypes = checkpoint_layouts_and_dtypes(checkpoint, layouts)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from e
    return SuiteSession(
        bridge=bridge,
        bridge_spec=pytestconfig.getoption("bridge") or DEFAULT_BRIDGE,
        bridge_version=bridge.version(),
        counterexamples=counterexample_dir(pytestconfig.getoption("counterexamples")).resolve(),
        layouts=layouts,
        checkpoint=Path(checkpoint).resolve() if checkpoint else None,
        dtypes=dtypes,
        max_shrinks=max_shrinks(),
        max_findings=chosen().max_findings,
        known_findings=_known_findings(pytestconfig),
        isolate_triggers=not pytestconfig.getoption("no_triggers"),
        config_limits=config_limits(pytestconfig.getoption("published_in_ten"), pytestconfig.getoption("device")),
    )


def _known_findings(config: pytest.Config) -> dict[str, str]:
    path = config.getoption("xfails_file", None)
    return read_known_findings(path) if path else {}


