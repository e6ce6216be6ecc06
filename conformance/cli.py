"""`ernie-conformance` (also `python -m conformance`): certify, replay, compare, bridges, kill-matrix.

    ernie-conformance certify [--bridge NAME] [--profile ci|thorough] [--layouts L,...]
                              [--device cpu] [--out DIR] [--checkpoint DIR] [--xfails-file F] [--resume]
    ernie-conformance replay FILE
    ernie-conformance compare OLD NEW [--format text|markdown]
    ernie-conformance bridges
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .process_setup import ignore_megatron_warnings

__all__ = ["main"]


def _bridges(args: argparse.Namespace) -> int:
    from .bridge import BridgeNotFound, registered_bridges, resolve_bridge

    rows = []
    for name, target in sorted(registered_bridges().items()):
        try:
            bridge = resolve_bridge(name)
            rows.append((name, target, bridge.version(), "yes"))
        except BridgeNotFound as e:
            rows.append((name, target, "-", f"no: {e}"))
    width = max(len(r[0]) for r in rows) if rows else 4
    print(f"{'name'.ljust(width)}  version  importable  target")
    for name, target, ver, ok in rows:
        print(f"{name.ljust(width)}  {ver}  {ok}  {target}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .bridge import resolve_bridge
    from .counterexample import Counterexample
    from .parallel import start_megatron_process

    example = Counterexample.load(args.file)
    case = example.case()
    bridge = resolve_bridge(example.bridge)
    print(f"replaying {example.property} for bridge {example.bridge} {bridge.version()} "
          f"(saved with {example.bridge_version})")
    print(f"  {case.describe()}")
    print(f"  saved failure: {example.message.splitlines()[0]}")
    start_megatron_process()
    with contextlib.ExitStack() as stack:
        if case.layout.world_size > 1:  # the layout's ranks, each a process of a pool, as in the suite
            from . import distributed
            from .rank_pool import RankPool

            pool = stack.enter_context(RankPool(case.layout.world_size,
                                                preload=tuple(getattr(bridge, "worker_imports", ()))))
            distributed.set_pool(pool)
            stack.callback(distributed.set_pool, None)
        return _replay_property(example.property, bridge, case)


def _replay_property(prop: str, bridge: Any, case: Any) -> int:
    from .properties import PropertyFailure, SetAside, run_property

    try:
        run_property(prop, bridge, case)
    except PropertyFailure as failure:
        print(f"STILL FAILS: {failure.detail}")
        errors = failure.evidence.get("stage_errors")
        if errors:
            print("  error by stage:")
            for stage, error in errors:
                print(f"    {stage:<32} {error:.3g}")
        return 1
    except SetAside as set_aside:
        print(f"INCONCLUSIVE: set aside as {set_aside.reason}: {set_aside}")
        return 2
    print("PASSES now")
    return 0


def _certify(args: argparse.Namespace) -> int:
    from .bridge import BridgeNotFound, resolve_bridge

    try:
        bridge = resolve_bridge(args.bridge)
    except BridgeNotFound as e:
        print(f"certify: {e}", file=sys.stderr)
        return 2
    from .certify_run import (PARTIAL_RESULTS_FILE, RESULTS_FILE, ResumeRefused, RunIdentity, finished_tests,
                              fold_partial_results, new_run)
    from .versions import suite_sources_digest

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The suite writes this run's results to the partial file after every test; they join the
    # earlier runs' in results.json when the run ends, or when an interrupted run is resumed.
    results_path, partial_path = out / RESULTS_FILE, out / PARTIAL_RESULTS_FILE
    identity = RunIdentity(
        bridge=args.bridge, bridge_version=bridge.version(), profile=args.profile, layouts=args.layouts,
        device=args.device, dtype=args.dtype, max_examples=args.max_examples, max_shrinks=args.max_shrinks,
        published_in_ten=args.published_in_ten,
        checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        xfails_file=str(Path(args.xfails_file).resolve()) if args.xfails_file else None,
        versions=RunIdentity.installed_versions(), suite_sources=suite_sources_digest())
    kept: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    if args.resume:
        try:
            saved, runs = RunIdentity.saved(out)
            identity.check_matches(saved, out)
        except ResumeRefused as e:
            print(f"certify: {e}", file=sys.stderr)
            return 2
        kept = finished_tests(fold_partial_results(out, identity.xfails_file, runs))
    else:
        results_path.unlink(missing_ok=True)
        partial_path.unlink(missing_ok=True)
    runs.append(new_run())
    identity.save(out, runs)
    # Multi-rank layouts run on one pool of rank processes per pytest process: one pytest process
    # unless there are cores for several pools.
    # Two processes at least: a process spends most of a multi-rank example waiting on its rank pool.
    jobs = args.jobs if args.jobs is not None else max(2, min((os.cpu_count() or 1) // 4, 5))
    command = [
        sys.executable, "-m", "pytest", "--pyargs", "conformance.suite",
        "--bridge", args.bridge, f"--hypothesis-profile=ernie-{args.profile}",
        "--counterexamples", str(out / "counterexamples"), "--results-json", str(partial_path),
        "--layouts", args.layouts, "--device", args.device, "--dtype", args.dtype, "--progress", str(out / "progress.log"), "-p", "no:cacheprovider", "-q",
    ]
    if jobs > 1:
        command += ["-n", str(jobs)]
    if args.max_examples:
        command += ["--max-examples", str(args.max_examples)]
    if args.max_shrinks is not None:
        command += ["--max-shrinks", str(args.max_shrinks)]
    if args.published_in_ten is not None:
        command += ["--published-in-ten", str(args.published_in_ten)]
    if args.checkpoint:
        command += ["--checkpoint", str(Path(args.checkpoint).resolve())]
    if args.xfails_file:
        command += ["--xfails-file", str(Path(args.xfails_file).resolve())]
    for result in kept:  # finished in an earlier run
        command += ["--deselect", result["test"]]
    log, progress = out / "pytest.log", out / "progress.log"
    if not args.resume:
        progress.write_text("")
    print(f"certifying {bridge.name} {bridge.version()} with profile {args.profile} "
          f"({'1 process' if jobs <= 1 else f'{jobs} processes'}); pytest output in {log}", flush=True)
    if args.resume:
        print(f"  resuming run {len(runs)} in {out}: {len(kept)} finished tests kept"
              + (f" ({', '.join(r['test'].rsplit('::', 1)[-1] for r in kept)})" if kept else ""), flush=True)
    shown = len(progress.read_text().splitlines()) if progress.is_file() else 0
    with log.open("a" if args.resume else "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=out)
        while True:
            finished = proc.poll() is not None
            lines = progress.read_text().splitlines()
            for line in lines[shown:]:
                print(f"  {line}", flush=True)
            shown = len(lines)
            if finished:
                break
            time.sleep(0.5)
    if not partial_path.is_file():
        print(f"certify: the suite did not run (pytest exit {proc.returncode}); see {log}", file=sys.stderr)
        return 2
    results = fold_partial_results(out, identity.xfails_file, runs)
    identity.save(out, runs)

    from .certificate import build_certificate, write_certificate
    from .session import DTYPE_OPTIONS, checkpoint_layouts_and_dtypes, parse_layouts

    layouts, dtypes = parse_layouts(args.layouts, max_ranks=4), DTYPE_OPTIONS[args.dtype]
    if args.checkpoint:  # what applied to it, not what the command line allowed
        layouts, dtypes = checkpoint_layouts_and_dtypes(args.checkpoint, layouts)
    certificate = build_certificate(
        bridge=bridge, bridge_spec=args.bridge, results=results,
        profile=f"ernie-{args.profile}", layouts=[str(layout) for layout in layouts], device=args.device,
        dtypes=dtypes, checkpoint=args.checkpoint, out_dir=out, runs=runs, suite_sources=identity.suite_sources,
    )
    write_certificate(certificate, out)
    verdict = "CONFORMS" if certificate["conforms"] else "DOES NOT CONFORM"
    print(f"{bridge.name} {bridge.version()}: {verdict}; certificate: {out / 'certificate.md'}")
    print(f"  {certificate['headline']}")
    for structure, entry in certificate["published"].items():
        print(f"  {structure:<22} {entry['verdict']}" + (f": {entry['reason']}" if entry["reason"] else ""))
    for finding in certificate["findings"]:
        print(f"  finding {finding['id']}: {finding['summary']}"
              + (f"  (reproduce, in {out}: {finding['replay']})" if finding["replay"] else ""))
    for prop, entry in certificate["properties"].items():
        ce = (entry["failure"] or {}).get("counterexample")
        print(f"  {prop:<12} {entry['verdict']:<13} {entry['examples']} valid examples"
              + (f"  ({entry['why']})" if entry["why"] else "")
              + (f"  (reproduce, in {out}: {ce['replay']})" if ce else ""))
    return 0 if certificate["conforms"] else 1


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, load_certificate, render_markdown, render_text

    try:
        comparison = compare(load_certificate(args.old), load_certificate(args.new))
    except ValueError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(render_markdown(comparison) if args.format == "markdown" else render_text(comparison), end="")
    return 1 if comparison.regressed else 0


def _kill_matrix(args: argparse.Namespace) -> int:
    from .kill_matrix import kill_matrix, render_markdown, update_markdown

    names = [n.strip() for n in args.mutants.split(",") if n.strip()] if args.mutants else None

    def progress(run) -> None:
        if run.error:
            print(f"{run.mutant}: ERROR {run.error[-500:]}", flush=True)
            return
        fastest = run.fastest()
        verdict = (f"killed by {fastest.prop} at example {fastest.examples} in {fastest.seconds:.1f}s" if fastest
                   else "SURVIVED")
        print(f"{run.mutant}: {verdict}", flush=True)

    if args.update and (not names or args.out == "-" or not Path(args.out).is_file()):
        print("error: --update re-measures the --mutants named in an existing --out file", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        runs = kill_matrix(names, jobs=args.jobs, profile=args.profile, progress=progress)
        text = (update_markdown(Path(args.out).read_text(), runs, args.profile) if args.update
                else render_markdown(runs, args.profile, time.perf_counter() - start))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return 0 if all(run.killed and not run.error for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    # megatron-core warns about its own optional dependencies on import: noise here.
    ignore_megatron_warnings()
    parser = argparse.ArgumentParser(prog="ernie-conformance", description="ERNIE 4.5 MoE bridge conformance suite")
    sub = parser.add_subparsers(dest="command")

    certify = sub.add_parser("certify", help="run the suite against a bridge and write a certificate")
    certify.add_argument("--bridge", default="reference", help="registered name or package.module:attribute")
    certify.add_argument("--profile", default="ci", choices=["dev", "ci", "thorough"])
    certify.add_argument("--layouts", default="any",
                         help="'any' (every layout of up to 4 ranks) or comma-separated layouts such as tp2-pp1-ep1-vpp1")
    certify.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                         help="where the bridge's models run (cuda: one GPU, single-rank layouts)")
    certify.add_argument("--dtype", default="any", choices=["fp32", "bf16", "any"],
                         help="dtype of the drawn checkpoints (default: both)")
    certify.add_argument("--out", default="certificate", help="directory for the certificate (default ./certificate)")
    certify.add_argument("--checkpoint", default=None, help="certify on this HF checkpoint instead of drawn weights")
    certify.add_argument("--xfails-file", default=None, help="known failures of this bridge (finding ids)")
    certify.add_argument("--max-examples", type=int, default=None, help="override the profile's examples per property")
    certify.add_argument("--published-in-ten", type=int, default=None, choices=range(11), metavar="N",
                         help="of ten drawn configs, about how many take a published structure (default 2)")
    certify.add_argument("--max-shrinks", type=int, default=None,
                         help="examples run to shrink a failure, at most (default: the profile's)")
    certify.add_argument("--jobs", type=int, default=None, help="pytest-xdist processes (default: CPUs / 4, at least 2, at most 5)")
    certify.add_argument("--resume", action="store_true",
                         help="go on with an interrupted certification in --out: the tests that finished there are "
                              "kept and the others run (refused if the options or installed versions differ)")
    certify.set_defaults(run=_certify)

    replay = sub.add_parser("replay", help="re-run one saved counterexample exactly")
    replay.add_argument("file")
    replay.set_defaults(run=_replay)

    comparison = sub.add_parser("compare", help="compare two certificates: findings fixed, new and unchanged, "
                                                 "verdicts changed (exit 1 when NEW has a finding OLD lacks)")
    comparison.add_argument("old", help="the last release's certificate directory or certificate.json")
    comparison.add_argument("new", help="the new release's certificate directory or certificate.json")
    comparison.add_argument("--format", default="text", choices=["text", "markdown"])
    comparison.set_defaults(run=_compare)

    bridges = sub.add_parser("bridges", help="list registered bridges, their versions, and whether each imports")
    bridges.set_defaults(run=_bridges)

    matrix = sub.add_parser("kill-matrix", help="run every property against every mutant (broken bridge) and "
                                                "write the kill matrix")
    matrix.add_argument("--out", default="docs/kill-matrix.md", help="markdown file to write ('-': print only)")
    matrix.add_argument("--mutants", default=None, help="comma-separated mutant names (default: all)")
    matrix.add_argument("--profile", default="ci", choices=["dev", "ci", "thorough"],
                        help="the suite's Hypothesis profile ernie-PROFILE")
    matrix.add_argument("--jobs", type=int, default=1, help="mutants run at once (each a pytest process)")
    matrix.add_argument("--update", action="store_true",
                        help="measure only --mutants and replace or add their rows in the existing --out file, "
                             "which then says which rows were measured when")
    matrix.set_defaults(run=_kill_matrix)

    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["certify", *argv]  # no command: certify (by default the reference bridge, on CPU)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
