"""pytest plugin of the conformance suite: options, Hypothesis profiles, fixtures, report header.

Loaded in every pytest session of an environment where ernie-conformance is installed
(entry point `pytest11`), so `pytest --pyargs conformance --bridge NAME` works anywhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Profiles: dev explores (random, small), ci is reproducible (derandomized), thorough digs.
# No deadline anywhere: one example builds models, and a slow machine is not a failure.
_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)

DEFAULT_BRIDGE = "reference"
# --dtype -> the dtypes drawn, fp32 first so that a failure shrinks towards full precision.
DTYPE_OPTIONS = {"fp32": ["float32"], "bf16": ["bfloat16"], "any": ["float32", "bfloat16"]}
ENV_HYPOTHESIS_DB = "ERNIE_CONFORMANCE_HYPOTHESIS_DB"

# Per-test tallies in this process (an xdist worker, or the only process). They travel to the
# controlling process in each report's user_properties, where `_SESSION` sums them up.
_CURRENT_TEST = ""
_EXAMPLES: Counter[str] = Counter()
_REFUSALS: dict[str, Counter[str]] = {}
_COUNTEREXAMPLES: dict[str, str] = {}
# The first failing example of each test, before any shrinking: (examples drawn, seconds since
# the test started). The kill matrix reads it as "examples and time to kill".
_FIRST_FAILURE: dict[str, tuple[int, float]] = {}
_TEST_STARTED = {"at": 0.0}


@dataclass
class _SessionTotals:
    refusals: Counter[str] = field(default_factory=Counter)
    results: list[dict[str, Any]] = field(default_factory=list)


_SESSION = _SessionTotals()


def current_test() -> str:
    return _CURRENT_TEST


def count_example() -> None:
    _EXAMPLES[_CURRENT_TEST] += 1


def count_refusal(reason: str) -> None:
    _REFUSALS.setdefault(_CURRENT_TEST, Counter())[reason] += 1


def note_failure() -> None:
    """Called on every failing example; keeps the first one of the current test."""
    _FIRST_FAILURE.setdefault(_CURRENT_TEST, (_EXAMPLES[_CURRENT_TEST], time.perf_counter() - _TEST_STARTED["at"]))


def note_counterexample(path: Path) -> None:
    _COUNTEREXAMPLES[_CURRENT_TEST] = str(path)


def default_profile() -> str:
    return "ci" if os.environ.get("CI") else "dev"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ernie-conformance")
    group.addoption("--bridge", default=DEFAULT_BRIDGE,
                    help="bridge under test: a registered name or package.module:attribute (default: reference)")
    group.addoption("--max-examples", type=int, default=None,
                    help="Hypothesis examples per property (overrides the profile's count)")
    group.addoption("--xfails-file", default=None,
                    help="file of test ids expected to fail, one per line (# comments); an unexpected pass fails")
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
    group.addoption("--results-json", default=None, help="write each test's outcome, examples and counterexample here")
    group.addoption("--no-shrink", action="store_true",
                    help="report the first failing example as found, without shrinking it (faster, larger)")
    group.addoption("--progress", default=None, help="append a line per finished test to this file (for certify)")


# Warnings that megatron-core raises about itself on every import or build (deprecations, no
# Apex or Transformer Engine): noise in a report about a bridge.
_IGNORED_WARNINGS = (
    "ignore::DeprecationWarning:megatron",
    "ignore::FutureWarning:megatron",
    "ignore::UserWarning:megatron",
    "ignore:MLP requires ffn_hidden_size:DeprecationWarning",
)


@pytest.hookimpl(trylast=True)  # after Hypothesis' plugin has loaded --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    _select_device(config.getoption("device", "cpu"))
    _PROGRESS["path"] = config.getoption("progress", None)
    _PROGRESS["worker"] = hasattr(config, "workerinput")
    for line in _IGNORED_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
    profile = config.getoption("hypothesis_profile", None) or default_profile()
    max_examples = config.getoption("max_examples")
    db = config.getoption("hypothesis_db") or os.environ.get(ENV_HYPOTHESIS_DB)
    no_shrink = config.getoption("no_shrink", False)
    if max_examples is not None or db or no_shrink:
        from hypothesis.database import DirectoryBasedExampleDatabase

        overrides: dict[str, Any] = {}
        if max_examples is not None:
            overrides["max_examples"] = max_examples
        if db:
            overrides["database"] = DirectoryBasedExampleDatabase(db)
        if no_shrink:
            from hypothesis import Phase

            overrides["phases"] = [p for p in Phase if p != Phase.shrink]
        name = (profile + (f"-n{max_examples}" if max_examples is not None else "") + ("-db" if db else "")
                + ("-noshrink" if no_shrink else ""))
        settings.register_profile(name, settings.get_profile(profile), **overrides)
        profile = name
    settings.load_profile(profile)
    world = _launcher_world()
    if world is not None:
        check_layouts_fit_world(parse_layouts(config.getoption("layouts"), config.getoption("max_ranks")),
                                world.world_size, config.getoption("layouts"), config.getoption("max_ranks"))


def _select_device(device: str) -> None:
    """cpu: hide any GPU, before CUDA starts, from this process and the rank processes it starts
    (the bridges' model code puts models on a GPU whenever it sees one). cuda: one must be there."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _in_suite(config: pytest.Config) -> bool:
    """Whether this session collects the suite's own modules (the header is noise otherwise)."""
    suite = str(Path(__file__).parent / "suite")
    args = [str(Path(a.split("::")[0]).resolve()) for a in config.args]
    return any(a.startswith(suite) or suite.startswith(a) for a in args) or bool(config.getoption("pyargs"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not _in_suite(config):
        return []
    from .bridge import BridgeNotFound, resolve_bridge

    try:
        bridge = resolve_bridge(config.getoption("bridge"))
    except BridgeNotFound as e:
        raise pytest.UsageError(str(e)) from e
    layouts = parse_layouts(config.getoption("layouts"), config.getoption("max_ranks"))
    deviations = list(getattr(bridge, "deviations", lambda: [])())
    return [
        f"ernie-conformance {_package_version('ernie-conformance')}: bridge {bridge.name} {bridge.version()}",
        f"megatron-core {_package_version('megatron-core')}, transformers {_package_version('transformers')}, "
        f"torch {_package_version('torch')}; hypothesis profile {settings.get_current_profile_name()} "
        f"({settings.default.max_examples} examples)",
        f"layouts: {len(layouts)} ({', '.join(map(str, layouts[:6]))}{', ...' if len(layouts) > 6 else ''}), "
        f"up to {max(layout.world_size for layout in layouts)} ranks; dtypes: "
        f"{', '.join(DTYPE_OPTIONS[config.getoption('dtype')])}; device {config.getoption('device')}",
        *([f"declared deviations of the adapter from the bridge as shipped ({len(deviations)}):"]
          + [f"  - {d}" for d in deviations] if deviations else []),
    ]


def _read_xfails(path: str) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("xfails_file")
    if not path:
        return
    for expected in _read_xfails(path):
        for item in items:
            if item.nodeid == expected or item.nodeid.endswith("/" + expected) or item.name == expected:
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"listed in {path}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    global _CURRENT_TEST
    _CURRENT_TEST = item.nodeid
    _TEST_STARTED["at"] = time.perf_counter()
    yield
    _CURRENT_TEST = ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and (item.nodeid in _EXAMPLES or item.nodeid in _REFUSALS):
        report.user_properties.append(("examples", _EXAMPLES.pop(item.nodeid, 0)))
        report.user_properties.append(("refusals", dict(_REFUSALS.pop(item.nodeid, {}))))
        if item.nodeid in _COUNTEREXAMPLES:
            report.user_properties.append(("counterexample", _COUNTEREXAMPLES.pop(item.nodeid)))
        if item.nodeid in _FIRST_FAILURE:
            example, seconds = _FIRST_FAILURE.pop(item.nodeid)
            report.user_properties.append(("first_failure", {"example": example, "seconds": round(seconds, 3)}))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the controlling process (with or without xdist): sum up what each test reported."""
    if _PROGRESS["worker"]:
        return
    props = dict(report.user_properties)
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _SESSION.refusals.update(props.get("refusals", {}))
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        _SESSION.results.append({
            "test": report.nodeid,
            "outcome": outcome,
            "duration_s": round(report.duration, 3),
            "examples": props.get("examples", 0),
            "counterexample": props.get("counterexample"),
            "first_failure": props.get("first_failure"),
            "message": report.longreprtext if report.failed else "",
        })
        _write_progress(_SESSION.results[-1])


_PROGRESS: dict[str, Any] = {"path": None, "total": 0, "worker": False}


def pytest_collection_finish(session: pytest.Session) -> None:
    _PROGRESS["total"] = _PROGRESS["total"] or len(session.items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    _PROGRESS["total"] = len(ids)


def _write_progress(result: dict[str, Any]) -> None:
    if not _PROGRESS["path"]:
        return
    done = len(_SESSION.results)
    examples = sum(r["examples"] for r in _SESSION.results)
    failures = sum(r["outcome"] == "failed" for r in _SESSION.results)
    name = result["test"].rsplit("::", 1)[-1]
    line = (f"[{done}/{_PROGRESS['total'] or '?'}] {name}: {result['outcome']}, {result['examples']} examples "
            f"in {result['duration_s']:.1f}s (so far: {examples} examples, {failures} failures)")
    with open(_PROGRESS["path"], "a") as f:
        f.write(line + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _SESSION.refusals:
        terminalreporter.section("declared unsupported by the bridge (not failures)")
        for reason, count in _SESSION.refusals.most_common():
            terminalreporter.write_line(f"{count:5d} drawn configs: {reason}")
    counterexamples = [r["counterexample"] for r in _SESSION.results if r["counterexample"]]
    if counterexamples:
        terminalreporter.section("counterexamples (replay with: ernie-conformance replay FILE)")
        for path in counterexamples:
            terminalreporter.write_line(path)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("results_json", None)
    if path and not hasattr(session.config, "workerinput"):  # the controlling process only
        Path(path).write_text(json.dumps({"refusals": dict(_SESSION.refusals), "results": _SESSION.results}, indent=2))


@dataclass
class SuiteSession:
    """What every test of the suite needs: the bridge under test and where things go."""

    bridge: Any
    bridge_spec: str
    bridge_version: str
    counterexamples: Path
    layouts: list
    checkpoint: Path | None
    dtypes: list[str]  # drawn checkpoints' dtypes; a user's checkpoint has its own


@pytest.fixture(scope="session")
def bridge(pytestconfig: pytest.Config):
    from .bridge import resolve_bridge

    return resolve_bridge(pytestconfig.getoption("bridge"))


@pytest.fixture(scope="session")
def megatron_runtime():
    """CPU patches applied and a one-rank gloo process group, once per session."""
    from .megatron_runtime import apply_cpu_patches, destroy_model_parallel, init_process_group_once

    apply_cpu_patches()
    init_process_group_once(world_size=1, rank=0)
    yield
    destroy_model_parallel()


def parse_layouts(text: str, max_ranks: int) -> list:
    """The layouts to draw from: every one of up to `max_ranks` ranks for 'any', else the list."""
    from ernie_ref.layout import Layout

    from .strategies import all_layouts

    if text.strip() == "any":
        if max_ranks < 1:
            raise pytest.UsageError(f"--max-ranks {max_ranks}: expected at least 1")
        return all_layouts(max_ranks)
    try:
        layouts = [Layout.parse(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise pytest.UsageError(f"--layouts: {e}") from e
    if not layouts:
        raise pytest.UsageError(f"--layouts {text!r}: no layout given")
    return layouts


def check_layouts_fit_world(layouts: list, world_size: int, layouts_option: str, max_ranks: int) -> None:
    """Raise a usage error unless every layout's ranks divide a launched world of `world_size` ranks.

    Every example runs on every rank of such a world (a layout of fewer ranks is replicated,
    data-parallel), so a layout of 3 ranks cannot run on 4, nor one of 4 ranks on 2.
    """
    import math

    misfits = [layout for layout in layouts if world_size % layout.world_size]
    if not misfits:
        return
    needed = math.lcm(*(layout.world_size for layout in layouts))
    if layouts_option.strip() == "any":
        raise pytest.UsageError(
            f"--max-ranks {max_ranks} does not fit the torchrun world of {world_size} ranks: the layouts of "
            f"--layouts any need {needed} ranks (or a multiple); use --max-ranks {world_size} or a divisor of it, "
            f"or torchrun --nproc-per-node {needed}"
        )
    names = ", ".join(f"{layout} ({layout.world_size} ranks)" for layout in misfits)
    raise pytest.UsageError(
        f"--layouts: {names} do{'es' if len(misfits) == 1 else ''} not fit the torchrun world of {world_size} "
        f"ranks: a layout's ranks must divide the world size"
    )


def _launcher_world() -> Any:
    """The world a launcher (conformance.torchrun) set up before it started pytest, or None.

    Looked up without importing conformance.distributed, which imports torch: a session that
    has no launcher (most sessions this plugin is loaded in) need not pay for it.
    """
    distributed = sys.modules.get("conformance.distributed")
    return distributed.launcher_world() if distributed is not None else None


@pytest.fixture(scope="session")
def rank_pool(pytestconfig: pytest.Config):
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
    pool = RankPool(world)
    distributed.set_pool(pool)
    try:
        yield pool
    finally:
        distributed.set_pool(None)
        pool.close()


@pytest.fixture(scope="session")
def suite(pytestconfig: pytest.Config, bridge, megatron_runtime, rank_pool) -> SuiteSession:
    from ernie_ref.checkpoint import CheckpointError, TensorReader, checkpoint_dtype, read_config

    from .counterexample import counterexample_dir

    checkpoint = pytestconfig.getoption("checkpoint")
    layouts = parse_layouts(pytestconfig.getoption("layouts"), pytestconfig.getoption("max_ranks"))
    dtypes = DTYPE_OPTIONS[pytestconfig.getoption("dtype")]
    if checkpoint is not None:
        if not Path(checkpoint, "config.json").is_file():
            raise pytest.UsageError(f"--checkpoint {checkpoint}: no config.json there")
        cfg = read_config(checkpoint)
        fitting = [layout for layout in layouts if layout.problem(cfg) is None]
        if not fitting:
            raise pytest.UsageError(f"--checkpoint {checkpoint}: no layout of --layouts fits it: {layouts[-1].problem(cfg)}")
        layouts = fitting
        try:
            dtypes = [str(checkpoint_dtype(cfg, TensorReader(checkpoint).dtypes)).removeprefix("torch.")]
        except (CheckpointError, ValueError) as e:
            raise pytest.UsageError(f"--checkpoint {checkpoint}: {e}") from e
    return SuiteSession(
        bridge=bridge,
        bridge_spec=pytestconfig.getoption("bridge"),
        bridge_version=bridge.version(),
        counterexamples=counterexample_dir(pytestconfig.getoption("counterexamples")).resolve(),
        layouts=layouts,
        checkpoint=Path(checkpoint).resolve() if checkpoint else None,
        dtypes=dtypes,
    )
