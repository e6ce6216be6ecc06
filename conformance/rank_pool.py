"""A persistent pool of worker processes, one per ``torch.distributed`` rank.

A conformance property that splits a Megatron model over 2-4 ranks needs one process
per rank.  Spawning them costs seconds (each imports torch and megatron-core), far
more than one Hypothesis example, so :class:`RankPool` spawns them once, joins them
into a gloo process group on loopback, and then runs any number of functions on
every rank:

>>> with RankPool(2) as pool:                                   # doctest: +SKIP
...     pool.run(my_top_level_function, arg1, arg2)             # -> [rank0_result, rank1_result]

``fn`` and its arguments travel to the workers by pickling (so ``fn`` must be a
top-level, importable function), and each rank's result comes back the same way.
``fn`` learns its rank from ``torch.distributed.get_rank()``.

Failure handling
----------------
If any rank raises, :meth:`RankPool.run` raises :class:`RankFailure` carrying every
failing rank's formatted traceback.  The other ranks may by then be blocked in a
collective that will never complete, so before raising, the pool kills every worker
and spawns a fresh set on a new port: the next ``run`` on the same object works.  A
rank that does not answer within the timeout is handled the same way and reported as
:class:`RankTimeout`, with the Python stacks of the ranks that did not answer.

Lifetime
--------
Workers stop on :meth:`RankPool.close` (also called by ``__exit__`` and by an
``atexit`` hook).  They also exit on their own when the owning process dies, even
while blocked in a collective: a watchdog thread in each worker waits for end-of-file
on a "lifeline" pipe whose write end only the owner holds.

Start method
------------
By default workers are forked from multiprocessing's fork server, which imports torch
and megatron-core once per session (see :func:`default_start_method`); a (re)start then
takes a fraction of a second instead of seconds.  ``start_method="spawn"`` gives every
worker a fresh interpreter instead.  Either way a worker gets the parent's ``sys.path``
and working directory as of the pool's start; under the fork server it gets the
environment variables of the moment the fork server started, and functions defined in
a script's ``__main__`` cannot be sent (put them in an importable module).

This module is independent of pytest and imports torch only inside the workers. How a rank
replies (and how ranks are named in messages) is shared with :mod:`conformance.torchrun` in
:mod:`conformance.rank_protocol`; the workers set themselves up with
:mod:`conformance.process_setup`, :mod:`conformance.cpu_patches` and :mod:`conformance.parallel`.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any, Callable

from .process_setup import ignore_megatron_warnings, megatron_warning_options
from .rank_protocol import (ERROR, encode_reply, encode_task, error_reply, exception_of, ok_reply, pick_free_port,
                            rank_list)

__all__ = ["RankFailure", "RankTimeout", "RankPool"]

# Seconds to wait for the other ranks after one rank raised: long enough for ranks that
# are merely still computing to finish (and report their own error, if any); ranks
# blocked in a collective with the failed rank would never answer.
DEFAULT_FAILURE_GRACE_S = 1.0
# Seconds a worker gets to exit after the polite stop message before it is terminated.
_STOP_GRACE_S = 2.0
# Message that tells a worker to exit (a task is never empty: it is a pickle).
_STOP = b""


class RankFailure(Exception):
    """One or more ranks raised (or their worker process died) during a pool call.

    Attributes
    ----------
    tracebacks:
        rank -> formatted traceback, for every rank that raised.
    exceptions:
        rank -> the exception object itself, where it could be pickled back to the
        parent (else that rank is absent); lets a caller re-raise e.g. an
        ``AssertionError`` from a property.
    stacks:
        rank -> the Python stacks (all threads) of a rank that did not answer, as dumped
        by ``faulthandler`` just before the pool killed it: shows where it was stuck.
    """

    def __init__(
        self,
        message: str,
        tracebacks: dict[int, str] | None = None,
        exceptions: dict[int, BaseException] | None = None,
        stacks: dict[int, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.tracebacks: dict[int, str] = dict(tracebacks or {})
        self.exceptions: dict[int, BaseException] = dict(exceptions or {})
        self.stacks: dict[int, str] = dict(stacks or {})


class RankTimeout(RankFailure):
    """Some ranks did not answer within the timeout (and none raised).

    ``missing`` lists the ranks that did not answer; ``stacks`` shows where they were.
    """

    def __init__(
        self,
        message: str,
        missing: list[int],
        tracebacks: dict[int, str] | None = None,
        exceptions: dict[int, BaseException] | None = None,
        stacks: dict[int, str] | None = None,
    ) -> None:
        super().__init__(message, tracebacks, exceptions, stacks)
        self.missing: list[int] = list(missing)


# --------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------


def _watch_owner(lifeline: Any, stack_path: str) -> None:
    """Exit this worker as soon as the process that owns the pool is gone.

    ``lifeline`` is the read end of a pipe whose only write end the owner holds and
    never writes to: when the owner dies (however: SIGKILL included) the kernel closes it
    and this read ends with EOF.  The task pipe's EOF only wakes a worker that is waiting
    for a task; a worker blocked in a collective (whose peer died with the owner) would
    otherwise wait out gloo's 5-minute timeout.  Polling the owner's pid is not enough:
    a dead owner can stay a zombie for as long as its own parent does not reap it, and
    under 'forkserver' this worker's parent is the fork server, which itself lives as
    long as any worker does.
    """
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    try:
        os.unlink(stack_path)  # the owner, which would have removed it, is gone
    except OSError:
        pass
    os._exit(3)


def _reply(conn: Any, reply: tuple[Any, ...]) -> None:
    """Send `reply` to the parent; one that does not pickle is sent as this rank's error instead
    (pickled before anything is written, so the pipe stays clean)."""
    conn.send_bytes(encode_reply(reply))


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    conn: Any,
    lifeline: Any,
    stack_path: str,
    sys_path: list[str],
    cwd: str,
) -> None:
    """Body of one rank's process: set up torch.distributed, then serve tasks until told to stop."""
    # 'spawn' already gives the child the parent's sys.path and cwd; a fork-server child
    # has the fork server's, from whenever it started.  Functions to run are pickled by
    # module name, so the worker must be able to import what the parent can now.
    sys.path[:] = sys_path
    try:
        os.chdir(cwd)
    except OSError:
        pass
    threading.Thread(target=_watch_owner, args=(lifeline, stack_path), daemon=True).start()
    # The pool kills a rank that does not answer; SIGUSR1 first makes it write every
    # thread's stack to a file, so the timeout report can show where it was stuck.
    stack_file = open(stack_path, "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        # Before torch is imported: one intra-op thread per rank (several ranks share
        # few cores; oversubscription makes collectives crawl).
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        # What torchrun gives each process of a one-node launch, which is how users start a
        # bridge: some read their rank from it rather than from torch.distributed (mcore-bridge
        # writes its export on the process whose RANK is 0 or unset).
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size))
        # megatron-core warns about itself on import and on every build (no Apex / TE,
        # deprecations): noise on the test session's stderr.
        ignore_megatron_warnings()
        from conformance.parallel import start_megatron_process

        start_megatron_process(world_size, rank)
    except BaseException as exc:  # report, then exit: the parent raises RankFailure
        _reply(conn, error_reply(exc))
        return
    _reply(conn, ("ready", os.getpid()))

    while True:
        try:
            task = conn.recv_bytes()
        except (EOFError, OSError):  # parent closed the pipe or died
            break
        if task == _STOP:
            break
        try:
            fn, args = pickle.loads(task)
            result = fn(*args)
        except BaseException as exc:
            _reply(conn, error_reply(exc))
            continue
        _reply(conn, ok_reply(result))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's destructors can block on peers that already
    # exited, and there is nothing to clean up that the OS does not.
    os._exit(0)


# --------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------

# Pools not yet closed, closed by one atexit hook (weak: a dropped pool can be collected).
_LIVE_POOLS: weakref.WeakSet[RankPool] = weakref.WeakSet()


def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


# Registered after multiprocessing's own exit hook, so (atexit is LIFO) it runs first.
atexit.register(_close_live_pools)


def default_start_method() -> str:
    """'forkserver' where the platform has it (POSIX), else 'spawn'.

    Measured on a 2-core machine: with 'spawn' every worker imports torch and
    megatron-core itself (~3.5 s CPU each, 7-11 s wall for 2-4 ranks, and again on every
    restart after a failure).  The fork server imports them once per session (~3 s); a
    start or restart then forks ready-made workers in ~0.1-0.7 s, which keeps a failing
    Hypothesis property (one restart per failing example while shrinking) affordable.
    The fork server only imports modules and starts no threads, so forking it is safe.
    """
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


# Imported once by the fork server, so forked workers start with them loaded: torch,
# the CPU patches, the process-group set-up and the megatron-core modules a GPT model split
# over ranks needs.
_PRELOAD = (
    "torch",
    "conformance.cpu_patches",
    "conformance.parallel",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.pipeline_parallel.schedules",
)


def _ensure_forkserver(preload: tuple[str, ...] = ()) -> None:
    """Start the (process-wide) fork server with megatron (and `preload`) preloaded, if not
    running yet.

    The fork server is multiprocessing's singleton: if someone else started it already,
    its preload stays as it was and workers import what they miss themselves (slower,
    still correct).  It exits when this process exits.
    """
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload([*_PRELOAD, *preload])
    # The fork server's command line copies this process's -W options
    # (sys.warnoptions); the parent's own warning filters are not affected.
    saved = list(sys.warnoptions)
    sys.warnoptions.extend(megatron_warning_options())
    try:
        forkserver.ensure_running()
    finally:
        sys.warnoptions[:] = saved


class _Worker:
    """Parent-side handle of one rank: its process, pipe end and stack-dump file."""

    def __init__(self, rank: int, process: Any, conn: Any, stack_path: str) -> None:
        self.rank = rank
        self.process = process
        self.conn = conn
        self.stack_path = stack_path


class RankPool:
    """``world_size`` worker processes joined in one gloo process group, reused across calls.

    Parameters
    ----------
    world_size:
        Number of ranks (processes).
    timeout_s:
        Default limit, in seconds, for :meth:`start` and for each :meth:`run` (a call
        can pass its own ``timeout_s``).
    failure_grace_s:
        After one rank raised, how long to wait for the others to answer before
        declaring them stuck.
    preload:
        Modules the fork server imports besides megatron-core's, so that workers start
        (and restart, once per failing example) with them loaded: a bridge's
        `worker_imports`.

    Not reentrant: one :meth:`run` at a time (a lock serialises threads).
    """

    def __init__(
        self,
        world_size: int,
        timeout_s: float = 120.0,
        *,
        failure_grace_s: float = DEFAULT_FAILURE_GRACE_S,
        start_method: str | None = None,
        preload: tuple[str, ...] = (),
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.world_size: int = world_size
        self.timeout_s: float = timeout_s
        self.failure_grace_s: float = failure_grace_s
        self.restarts: int = 0  # how often the pool replaced its workers after a failure
        self.start_seconds: float | None = None  # duration of the latest start
        self._workers: list[_Worker] = []
        self._lifeline: Any = None  # write end of the workers' lifeline pipe (never written)
        self._lock = threading.RLock()
        if start_method is None:
            start_method = default_start_method()
        if start_method not in ("forkserver", "spawn"):
            # 'fork' would copy the parent's threads' locks and torch state mid-flight.
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.start_method: str = start_method
        self.preload: tuple[str, ...] = tuple(preload)
        self._ctx = multiprocessing.get_context(start_method)
        self._owner_pid = os.getpid()  # a forked copy of this object must not close it

    # ---- public API ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True while workers are running."""
        return bool(self._workers)

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers, in rank order (empty when stopped)."""
        return [w.process.pid for w in self._workers]

    def start(self) -> None:
        """Spawn the workers and wait until every rank has joined the process group.

        No-op if already started.  Raises :class:`RankFailure` if a rank fails to start
        (e.g. an import error) or :class:`RankTimeout` if one does not report ready
        within ``timeout_s``; the pool is then left stopped.
        """
        with self._lock:
            if self._workers:
                return
            try:
                self._spawn()
            except RankFailure as exc:
                # pick_free_port() releases the port before rank 0 binds it: another
                # process can take it in between.  Retry once on a new port.  (The OS says
                # "Address already in use"; torch 2.13's TCPStore "EADDRINUSE ... address
                # already in use".)
                if not any("address already in use" in tb.lower() for tb in exc.tracebacks.values()):
                    raise
                self._spawn()

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Call ``fn(*args)`` on every rank; return the results in rank order.

        Starts the pool if needed.  Raises :class:`RankFailure` if any rank raised and
        :class:`RankTimeout` if a rank did not answer within ``timeout_s`` (default: the
        pool's); in both cases the pool has restarted itself before raising.  Errors in
        pickling ``fn``/``args`` are raised as is, before any rank sees the task.
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        # Pickle once, here: an unpicklable argument fails before any rank starts (a
        # rank that got the task while its peer did not would wait in a collective),
        # and every rank gets the same bytes.
        payload = encode_task(fn, args)
        with self._lock:
            if self._workers and not all(w.process.is_alive() for w in self._workers):
                # A worker died between calls (its fn left a thread behind that crashed,
                # or someone killed it): the group is broken, start afresh.
                self._kill_all()
                self.restarts += 1
            self.start()
            try:
                return self._run_payload(payload, limit)
            except RankFailure as failure:
                self._restart_after(failure)
                raise
            except BaseException:
                # Interrupted (e.g. KeyboardInterrupt): answers may still be in flight,
                # so these workers cannot be trusted; the next run starts fresh ones.
                self._kill_all()
                raise

    def close(self) -> None:
        """Stop every worker and wait for it; idempotent.

        Workers get a stop message and ``_STOP_GRACE_S`` seconds to exit; any that are
        still running (e.g. blocked in a collective) are terminated, then killed.
        """
        with self._lock:
            if os.getpid() != self._owner_pid or not self._workers:
                return
            workers, self._workers = self._workers, []
            _LIVE_POOLS.discard(self)
            for w in workers:
                try:
                    w.conn.send_bytes(_STOP)
                except OSError:  # already dead
                    pass
            deadline = time.monotonic() + _STOP_GRACE_S
            for w in workers:
                w.process.join(max(0.0, deadline - time.monotonic()))
            for w in workers:
                if w.process.is_alive():
                    w.process.terminate()
            for w in workers:
                w.process.join(1.0)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
            self._release(workers)

    def __enter__(self) -> RankPool:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pids={self.pids}" if self._workers else "stopped"
        return f"RankPool(world_size={self.world_size}, {state})"

    # ---- internals -------------------------------------------------------------------

    def _spawn(self) -> None:
        """Start ``world_size`` fresh workers on a new port and wait until all are ready."""
        t0 = time.perf_counter()
        if self.start_method == "forkserver":
            _ensure_forkserver(self.preload)
        port = pick_free_port()  # a new port every time: the old one may still be in TIME_WAIT
        # Workers exit when this pipe reaches EOF, i.e. when this process closes the write
        # end (after stopping them) or dies.  The read end goes to the workers only.
        lifeline_r, lifeline_w = self._ctx.Pipe(duplex=False)
        self._lifeline = lifeline_w
        workers: list[_Worker] = []
        self._workers = workers  # filled as they start, so _kill_all sees every one
        _LIVE_POOLS.add(self)
        try:
            self._start_workers(port, lifeline_r)
        except BaseException:
            self._kill_all()
            raise
        finally:
            lifeline_r.close()
        try:
            replies = self._collect(self.timeout_s, what="start")
        except BaseException:
            self._kill_all()
            raise
        if any(tag != "ready" for tag, _ in replies):  # pragma: no cover - protocol guard
            self._kill_all()
            raise RankFailure(f"unexpected start replies: {replies!r}")
        self.start_seconds = time.perf_counter() - t0

    def _start_workers(self, port: int, lifeline_r: Any) -> None:
        """Start one process per rank, appending each to ``self._workers`` as it starts."""
        for rank in range(self.world_size):
            parent_conn, child_conn = self._ctx.Pipe(duplex=True)
            fd, stack_path = tempfile.mkstemp(prefix=f"rank_pool_{rank}_", suffix=".stack")
            os.close(fd)
            process = self._ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    self.world_size,
                    port,
                    child_conn,
                    lifeline_r,
                    stack_path,
                    list(sys.path),
                    os.getcwd(),
                ),
                name=f"RankPool-rank{rank}",
                # multiprocessing's own exit hook terminates daemonic children: a second
                # line of defence behind our atexit hook.
                daemon=True,
            )
            try:
                process.start()
            except BaseException:
                parent_conn.close()
                os.unlink(stack_path)
                raise
            finally:
                # The child has its own copy now; dropping ours makes the parent see EOF
                # if the child dies.
                child_conn.close()
            self._workers.append(_Worker(rank, process, parent_conn, stack_path))

    def _run_payload(self, payload: bytes, limit: float) -> list[Any]:
        for w in self._workers:
            try:
                w.conn.send_bytes(payload)
            except OSError:
                pass  # died: _collect sees EOF on its pipe and reports the rank
        return [value for _, value in self._collect(limit, what="run")]

    def _collect(self, limit: float, what: str) -> list[tuple[str, Any]]:
        """Wait for one reply per rank; raise RankFailure/RankTimeout as described in run()."""
        deadline = time.monotonic() + limit
        pending = {w.conn: w for w in self._workers}
        replies: dict[int, tuple[str, Any]] = {}
        tracebacks: dict[int, str] = {}
        exceptions: dict[int, BaseException] = {}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in multiprocessing.connection.wait(list(pending), timeout=remaining):
                w = pending.pop(conn)  # type: ignore[call-overload]
                try:
                    reply = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    w.process.join(1.0)
                    tracebacks[w.rank] = (
                        f"worker process of rank {w.rank} (pid {w.process.pid}) died "
                        f"(exit code {w.process.exitcode})\n"
                    )
                    continue
                except Exception as exc:  # the result does not unpickle in the parent
                    tracebacks[w.rank] = "".join(traceback.format_exception(exc))
                    continue
                if reply[0] == ERROR:
                    tracebacks[w.rank] = reply[1]
                    if (exception := exception_of(reply)) is not None:
                        exceptions[w.rank] = exception
                else:
                    replies[w.rank] = (reply[0], reply[1])
            if tracebacks:
                # Someone failed: the rest get a short grace to finish, no more.
                deadline = min(deadline, time.monotonic() + self.failure_grace_s)
        if not tracebacks and not pending:
            return [replies[r] for r in range(self.world_size)]

        missing = sorted(w.rank for w in pending.values())
        stacks = self._dump_stacks(list(pending.values()))
        if tracebacks:
            first = min(tracebacks)
            message = f"{rank_list(tracebacks)} raised during {what}"
            if missing:
                message += (
                    f" ({rank_list(missing)} did not answer within "
                    f"{self.failure_grace_s:g} s after the failure)"
                )
            message += f"\n--- rank {first} ---\n{tracebacks[first]}"
            raise RankFailure(message, tracebacks, exceptions, stacks)
        message = f"{rank_list(missing)} did not answer within {limit:g} s during {what}"
        first = missing[0]
        if stacks.get(first):
            message += f"\n--- rank {first} stack ---\n{stacks[first]}"
        raise RankTimeout(message, missing, tracebacks, exceptions, stacks)

    def _dump_stacks(self, workers: list[_Worker]) -> dict[int, str]:
        """Ask unresponsive workers for their stacks (SIGUSR1 -> faulthandler file)."""
        alive = [w for w in workers if w.process.is_alive()]
        if not alive:
            return {}
        for w in alive:
            try:
                os.kill(w.process.pid, signal.SIGUSR1)
            except OSError:
                pass
        time.sleep(0.2)  # faulthandler writes from the signal handler at once
        stacks: dict[int, str] = {}
        for w in alive:
            try:
                with open(w.stack_path) as f:
                    text = f.read()
            except OSError:
                continue
            if text:
                stacks[w.rank] = text
        return stacks

    def _restart_after(self, failure: RankFailure) -> None:
        """Replace every worker (some may be stuck in a collective) so the next run works."""
        self._kill_all()
        self.restarts += 1
        try:
            self._spawn()
        except Exception as exc:
            # Leave the pool stopped: the next run() tries to start it again.
            failure.add_note(f"restarting the pool failed as well: {exc}")

    def _kill_all(self) -> None:
        """Kill every worker at once, no questions asked (their state is unusable)."""
        workers, self._workers = self._workers, []
        _LIVE_POOLS.discard(self)
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
        for w in workers:
            w.process.join()
        self._release(workers)

    def _release(self, workers: list[_Worker]) -> None:
        """Free the handles of workers that have been joined."""
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        for w in workers:
            w.conn.close()
            w.process.close()
            try:
                os.unlink(w.stack_path)
            except OSError:
                pass
