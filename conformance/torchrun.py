"""Run the conformance suite under torchrun, one process per rank, instead of the built-in pool.

    torchrun --nproc-per-node 4 -m conformance.torchrun --bridge reference --layouts any --max-ranks 4 [pytest args]

Every process joins the default process group from torchrun's environment (NCCL with
``--device cuda`` on a machine with CUDA, gloo otherwise) and a separate gloo *control* group,
over which rank 0 sends work and the others answer (object collectives need a CPU backend).

Rank 0 runs pytest on the suite (``pytest --pyargs conformance`` with the remaining arguments)
with the session's rank pool replaced by :class:`TorchrunWorld`: each time a property needs the
Megatron side, rank 0 broadcasts the task, runs it itself as well, and gathers every rank's
result. The other ranks only follow: receive a task, run it, answer, until rank 0 says stop.
Every example runs on every rank, one-rank layouts included (creating Megatron's process
groups is collective over the whole world); ranks a layout does not need are data-parallel
replicas, so every layout's rank count must divide the world size. Rank 0's exit status is
pytest's (torchrun itself exits 1 when any rank exits non-zero).

Failures. If a task raises on some ranks, the example fails with
:class:`conformance.rank_pool.RankFailure` naming those ranks, with their tracebacks, and the
run goes on with the next example. That needs the ranks to stay in step in their collectives,
which holds when the error is raised identically on every rank, or when the bridge's ``load``
raises on some ranks (every rank reports whether its load succeeded before the action's
collectives start; see :mod:`conformance.distributed`). A rank that raises later, between
collectives, leaves its peers waiting in a collective it never joins: that is a hang.

Hangs. Unlike the built-in pool, which kills and restarts its workers, a torchrun world cannot
be repaired from inside. A task that has not finished after ``--task-timeout-s`` on some rank
ends that rank's process with status 124, after printing why and every thread's Python stack
to its stderr; torchrun then stops the other ranks and the job ends, without pytest's summary.
The default process group's own timeout is set a minute longer, so that this watchdog, with
its stacks, speaks first.

Files. Rank 0 writes each example's checkpoint into a temporary directory that the other ranks
read, and the bridge under test writes exports wherever it does: on several nodes, point
TMPDIR at a filesystem every node shares. Counterexamples are saved as usual, but
``ernie-conformance replay`` reruns one outside torchrun, so a failure that shows only beside
the world's extra ranks (a one-rank layout that fails only with replicas) may not reproduce there.

How a rank replies to a task (and how ranks are named in messages) is shared with the built-in pool
in :mod:`conformance.rank_protocol`; hiding GPUs and megatron-core's warning filters are in
:mod:`conformance.process_setup`, gloo's loopback setting in :mod:`conformance.parallel` and the
CPU stand-ins for CUDA-only calls in :mod:`conformance.cpu_patches`.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from .process_setup import hide_gpus, ignore_megatron_warnings
from .rank_pool import RankFailure
from .rank_protocol import ERROR, OK, encode_reply, encode_task, error_reply, exception_of, ok_reply, rank_list

__all__ = ["DEFAULT_TASK_TIMEOUT_S", "HANG_EXIT_CODE", "LaunchOptions", "TorchrunWorld", "choose_backend",
           "failure_message", "follow", "main", "parse_options"]

# Longer than any one task of the suite on its small models, with room for a slow cluster node.
DEFAULT_TASK_TIMEOUT_S = 300.0
# Exit status of a rank whose task did not finish in time (as timeout(1) uses).
HANG_EXIT_CODE = 124
# Followers wait on the control group while rank 0 runs pytest between tasks (the oracle,
# transformers, Hypothesis shrinking), for however long that takes; so its timeout is long. A
# rank 0 that dies is noticed by torchrun, which stops the job, not by this timeout.
_CONTROL_TIMEOUT = datetime.timedelta(days=7)
# The default group's timeout exceeds the task watchdog's by this much (see the module docstring).
_GROUP_TIMEOUT_MARGIN_S = 60.0
# How long a rank that gives up on a hung task waits before it exits (see _HangWatchdog).
_LINGER_BEFORE_EXIT_S = 3.0
# Kinds of message rank 0 broadcasts on the control group.
_TASK, _STOP = "task", "stop"


@dataclass(frozen=True)
class LaunchOptions:
    """This module's own options; everything else on the command line goes to pytest."""

    device: str
    task_timeout_s: float
    pytest_args: list[str]


def parse_options(argv: list[str]) -> LaunchOptions:
    """Split the command line into this module's options and pytest's arguments."""
    parser = argparse.ArgumentParser(
        prog="torchrun ... -m conformance.torchrun",
        description="Run the conformance suite on a torchrun world: rank 0 runs pytest, every rank runs the "
                    "Megatron side of each example. Arguments not listed here go to pytest (--bridge, --layouts, "
                    "--max-ranks, -k, ...).",
        allow_abbrev=False,  # a pytest option must never be taken for an abbreviation of ours
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default): gloo, and GPUs hidden from the suite; cuda: NCCL, one GPU per local "
                             "rank (falls back to gloo on CPU, with a warning, where CUDA is not available)")
    parser.add_argument("--task-timeout-s", type=float, default=DEFAULT_TASK_TIMEOUT_S,
                        help=f"end the job when one task (one example's Megatron side) takes longer on some rank "
                             f"(default {DEFAULT_TASK_TIMEOUT_S:g}): a hang cannot be recovered under torchrun")
    options, pytest_args = parser.parse_known_args(argv)
    if options.task_timeout_s <= 0:
        parser.error(f"--task-timeout-s must be > 0, got {options.task_timeout_s:g}")
    return LaunchOptions(device=options.device, task_timeout_s=options.task_timeout_s, pytest_args=pytest_args)


def choose_backend(device: str, cuda_available: bool) -> str:
    """NCCL when CUDA was asked for and is there; gloo otherwise."""
    return "nccl" if device == "cuda" and cuda_available else "gloo"


def failure_message(tracebacks: dict[int, str]) -> str:
    """"rank 1 raised under torchrun", then each distinct traceback once, headed by its ranks.

    The last line is the last line of a traceback (the exception itself): the suite reports a
    bridge's error by that line.
    """
    by_text: dict[str, list[int]] = {}
    for rank in sorted(tracebacks):
        by_text.setdefault(tracebacks[rank], []).append(rank)
    message = f"{rank_list(tracebacks)} raised under torchrun"
    for text, ranks in by_text.items():
        message += f"\n--- {rank_list(ranks)} ---\n{text.rstrip()}"
    return message


# --------------------------------------------------------------------------------------------
# one task on one rank
# --------------------------------------------------------------------------------------------


class _HangWatchdog:
    """Within a `with` block: if the block has not finished after `seconds`, say why and dump
    every thread's stack to `stream`, then exit this process (torchrun then stops the others).

    A rank blocked in a collective that a failed peer never joins cannot be freed otherwise.
    The timer thread gets the GIL while the main thread waits: torch.distributed releases it in
    collectives. `own_error`, when the block sets it, is this rank's own failure in the task,
    printed too: often the root cause, which would otherwise be lost with the process.
    """

    def __init__(self, seconds: float, rank: int, stream: TextIO) -> None:
        self.seconds = seconds
        self.rank = rank
        self.own_error: str | None = None
        self._stream = stream
        self._timer = threading.Timer(seconds, self._give_up)
        self._timer.daemon = True

    def __enter__(self) -> _HangWatchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._timer.cancel()

    def _give_up(self) -> None:
        stream = self._stream
        stream.write(
            f"\nconformance.torchrun: rank {self.rank}: a task did not finish within {self.seconds:g} s "
            "(--task-timeout-s). Most likely a rank raised or stopped between collectives and the others wait "
            "for it forever; a torchrun world cannot recover from that, so the job ends here.\n"
        )
        if self.own_error is not None:
            stream.write(f"This rank's task raised, then waited for the others:\n{self.own_error}")
        stream.write("Stacks of this rank:\n")
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.flush()
        # The other ranks' watchdogs fire about now as well: once one rank exits, torchrun
        # terminates the rest, so each lingers a moment to let the others print theirs (the
        # rank whose task raised holds the root cause).
        time.sleep(_LINGER_BEFORE_EXIT_S)
        os._exit(HANG_EXIT_CODE)


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """An ok reply with the result, or an error reply. Only `Exception`s are caught: a
    KeyboardInterrupt or SystemExit ends this rank, and torchrun the job."""
    try:
        return ok_reply(fn(*args))
    except Exception as exc:  # noqa: BLE001 - any error of the task is the task's answer
        return error_reply(exc)


# --------------------------------------------------------------------------------------------
# rank 0: the RankPool interface over the world
# --------------------------------------------------------------------------------------------


class TorchrunWorld:
    """On rank 0: runs a function on every rank of the torchrun world, as `RankPool.run` does.

    `run` broadcasts the task over the control group, runs it here too, gathers every rank's
    answer, and returns the results in rank order, or raises `RankFailure` with the traceback
    of every rank that raised. Ranks other than 0 must be in :func:`follow`.
    """

    def __init__(self, control_group: Any, task_timeout_s: float, diagnostics: TextIO) -> None:
        import torch.distributed as dist

        self.world_size: int = dist.get_world_size()
        self.task_timeout_s = task_timeout_s
        # False from a task's broadcast until its gather: a task interrupted in between (e.g. by
        # Ctrl-C) leaves the followers in a collective that rank 0 will not join any more.
        self.in_step = True
        self._control = control_group
        self._diagnostics = diagnostics

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """`fn(*args)` on every rank; the results in rank order.

        `timeout_s` (default: the world's task timeout) bounds the whole call on every rank;
        past it the job ends (see the module docstring). `fn` and `args` are pickled before any
        rank is told anything, so an unpicklable task raises here and leaves the world in step.
        """
        import torch.distributed as dist

        if not self.in_step:
            raise RuntimeError("the torchrun world is out of step: a task was interrupted while other ranks ran it")
        limit = self.task_timeout_s if timeout_s is None else timeout_s
        payload = encode_task(fn, args)
        replies: list[Any] = [None] * self.world_size
        self.in_step = False
        with _HangWatchdog(limit, 0, self._diagnostics) as watchdog:
            dist.broadcast_object_list([(_TASK, payload, limit)], src=0, group=self._control)
            mine = _call(fn, args)
            if mine[0] == ERROR:
                watchdog.own_error = mine[1]
            dist.gather_object(b"", replies, dst=0, group=self._control)
        self.in_step = True
        replies[0] = mine  # rank 0's own answer needs no round trip through pickle
        return self._results(replies)

    def stop(self) -> None:
        """Tell the followers to return from :func:`follow`."""
        import torch.distributed as dist

        dist.broadcast_object_list([(_STOP, b"", 0.0)], src=0, group=self._control)

    def _results(self, replies: list[Any]) -> list[Any]:
        """Unpack each rank's reply; raise RankFailure if any rank raised."""
        results: list[Any] = []
        tracebacks: dict[int, str] = {}
        exceptions: dict[int, BaseException] = {}
        for rank, reply in enumerate(replies):
            if rank > 0:
                try:
                    reply = pickle.loads(reply)
                except Exception as exc:  # noqa: BLE001 - e.g. a class rank 0 cannot import
                    reply = error_reply(exc)
            if reply[0] == OK:
                results.append(reply[1])
                continue
            tracebacks[rank] = reply[1]
            if (exception := exception_of(reply)) is not None:
                exceptions[rank] = exception
        if tracebacks:
            raise RankFailure(failure_message(tracebacks), tracebacks, exceptions)
        return results


# --------------------------------------------------------------------------------------------
# ranks 1..n-1
# --------------------------------------------------------------------------------------------


def follow(control_group: Any, diagnostics: TextIO) -> None:
    """On ranks other than 0: run each task rank 0 broadcasts and answer it, until told to stop."""
    import torch.distributed as dist

    rank = dist.get_rank()
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=control_group)
        kind, payload, limit = message[0]
        if kind == _STOP:
            return
        with _HangWatchdog(limit, rank, diagnostics) as watchdog:
            try:
                fn, args = pickle.loads(payload)
            except Exception as exc:  # noqa: BLE001 - e.g. a bridge module missing on this node
                # The ranks that could unpickle it run the task and will wait for this one in
                # its collectives: a hang, which the watchdog ends, showing this error.
                reply: tuple[Any, ...] = error_reply(exc)
            else:
                reply = _call(fn, args)
            if reply[0] == ERROR:
                watchdog.own_error = reply[1]
            # Pickled before the gather: a result that does not pickle becomes this rank's error
            # instead of an exception that would keep this rank out of the gather.
            dist.gather_object(encode_reply(reply), None, dst=0, group=control_group)


# --------------------------------------------------------------------------------------------
# every rank
# --------------------------------------------------------------------------------------------


def _join_world(device: str, task_timeout_s: float, diagnostics: TextIO) -> str:
    """Initialise the default process group from torchrun's environment; returns the backend."""
    import torch
    import torch.distributed as dist

    from .parallel import loopback_gloo_env

    backend = choose_backend(device, torch.cuda.is_available())
    if device == "cuda" and backend != "nccl" and os.environ.get("RANK") == "0":
        diagnostics.write("conformance.torchrun: --device cuda but CUDA is not available: running on CPU with gloo\n")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        loopback_gloo_env()  # one host: gloo on loopback, as the built-in pool does
    timeout = datetime.timedelta(seconds=task_timeout_s + _GROUP_TIMEOUT_MARGIN_S)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return backend


def _lead(control_group: Any, options: LaunchOptions, backend: str, diagnostics: TextIO) -> int:
    """Rank 0: pytest on the suite with the world as its rank pool; pytest's exit status."""
    import pytest

    from . import distributed

    world = TorchrunWorld(control_group, options.task_timeout_s, diagnostics)
    print(f"conformance.torchrun: a world of {world.world_size} ranks on {backend}; rank 0 runs pytest", flush=True)
    distributed.set_pool(world, launched=True)
    try:
        # This process imported conformance before pytest started, too early for pytest to
        # rewrite its asserts (the suite's own test modules are imported later, and rewritten).
        status = int(pytest.main(["--pyargs", "conformance", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                                  "--device", options.device, *options.pytest_args]))
    finally:
        distributed.set_pool(None)
    if not world.in_step:
        # The followers wait in a collective of the interrupted task: they cannot be stopped
        # politely. Exiting non-zero makes torchrun stop them.
        diagnostics.write("conformance.torchrun: a task was interrupted on rank 0; ending the job\n")
        diagnostics.flush()
        sys.stdout.flush()
        os._exit(status or 1)
    world.stop()
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point on every rank: join the world, then lead (rank 0) or follow (the others)."""
    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options.device == "cpu":
        # The models stay on the CPU (gloo, and the same code paths as the built-in pool): before
        # torch starts CUDA, see hide_gpus.
        hide_gpus()
    # megatron-core warns about itself on import and on every model build: noise on every rank's stderr.
    ignore_megatron_warnings()
    # pytest captures file descriptor 2 during tests: the hang watchdog writes to a copy of it.
    diagnostics = os.fdopen(os.dup(2), "w", buffering=1)
    faulthandler.enable(file=diagnostics)  # a rank that crashes shows where
    import torch.distributed as dist

    from . import distributed
    from .cpu_patches import apply_cpu_patches

    backend = _join_world(options.device, options.task_timeout_s, diagnostics)
    control_group = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    apply_cpu_patches()
    distributed.set_control_group(control_group)
    if dist.get_rank() == 0:
        status = _lead(control_group, options, backend, diagnostics)
    else:
        follow(control_group, diagnostics)
        status = 0
    dist.destroy_process_group()
    return status


def _exit_without_finalizing(status: int) -> NoReturn:
    """Flush, then end this process at once with `status`.

    The interpreter's own finalization, after the process groups were destroyed, now and then
    aborts (SIGABRT, "terminate called without an active exception") while it frees gloo
    objects that Megatron's reused process groups still reference, turning a finished run into
    a failed job. Nothing is left to clean up by then; the built-in pool's workers end the same
    way.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _exit_without_finalizing(main())
