"""RankPool: one worker process per torch.distributed rank, reused across calls.

The functions the workers run are top-level in this module: they travel by pickling, by
module name, and the workers import this module (tests/ is on their sys.path).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conformance.rank_pool import RankFailure, RankPool, RankTimeout

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# functions run on the ranks
# --------------------------------------------------------------------------------------


def get_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def all_reduce_rank_tensors():
    import torch
    import torch.distributed as dist

    t = torch.arange(3, dtype=torch.float32) + 10.0 * dist.get_rank()
    dist.all_reduce(t)
    return t


def scaled_by_rank(t, k: int):
    import torch.distributed as dist

    return t * k * (dist.get_rank() + 1)


def raise_on_rank1(message: str) -> str:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError(message)
    return "rank 0 fine"


def raise_on_rank1_before_all_reduce(message: str):
    """Rank 0 reaches the all_reduce, rank 1 never does: rank 0 is stuck for good."""
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError(message)
    t = torch.ones(2)
    dist.all_reduce(t)
    return t


def sleep_on_rank(rank: int, seconds: float) -> int:
    import torch.distributed as dist

    if dist.get_rank() == rank:
        time.sleep(seconds)
    return dist.get_rank()


def megatron_ranks(tp: int, pp: int) -> tuple[int, int, int]:
    from megatron.core import parallel_state

    from conformance.parallel import init_model_parallel

    init_model_parallel(tp=tp, pp=pp, ep=1, vpp=None, seed=0)
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def unpicklable_result():
    return lambda: None


def exit_on_rank1() -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(7)
    return 0


# --------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running at the deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    # Not started here: the first run() starts it (lazy start).
    p = RankPool(2, timeout_s=60.0)
    yield p
    p.close()


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


def test_all_reduce_two_ranks(pool: RankPool) -> None:
    results = pool.run(all_reduce_rank_tensors)
    assert len(results) == 2
    expected = [0.0 + 10.0, 2.0 + 10.0, 4.0 + 10.0]  # sum over ranks of arange(3) + 10 * rank
    for r in results:
        assert r.tolist() == expected
    assert pool.run(get_rank) == [0, 1]


def test_arguments_and_results_travel_by_pickle(pool: RankPool) -> None:
    import torch

    results = pool.run(scaled_by_rank, torch.tensor([1.0, 2.0]), 3)
    assert [r.tolist() for r in results] == [[3.0, 6.0], [6.0, 12.0]]
    assert pool.run(sleep_on_rank, 5, 0.0) == [0, 1]  # no rank 5: nobody sleeps


def rank1_failure(pool: RankPool, fn: Any, message: str) -> RankFailure:
    """The RankFailure of `fn(message)`, which raises on rank 1 alone: a traceback of rank 1's only."""
    with pytest.raises(RankFailure) as info:
        pool.run(fn, message)
    failure = info.value
    assert type(failure) is RankFailure
    assert set(failure.tracebacks) == {1}
    return failure


def test_raise_on_one_rank_without_collective(pool: RankPool) -> None:
    pool.start()
    old_pids = pool.pids
    failure = rank1_failure(pool, raise_on_rank1, "rank one broke")
    assert "ValueError: rank one broke" in failure.tracebacks[1]
    assert "raise_on_rank1" in failure.tracebacks[1]
    assert isinstance(failure.exceptions[1], ValueError)
    assert "rank 1" in str(failure) and "rank one broke" in str(failure)
    # restarted: fresh workers, and the same object works
    assert pool.pids != old_pids
    assert not any(alive(p) for p in old_pids)
    assert pool.run(get_rank) == [0, 1]
    assert [t.tolist() for t in pool.run(all_reduce_rank_tensors)] == [[10.0, 12.0, 14.0]] * 2


def test_raise_on_one_rank_while_other_waits_in_collective(pool: RankPool) -> None:
    failure = rank1_failure(pool, raise_on_rank1_before_all_reduce, "rank one broke first")
    assert "rank one broke first" in failure.tracebacks[1]
    assert "rank 0 did not answer" in str(failure)
    # where rank 0 was stuck, from its stack dump
    assert "raise_on_rank1_before_all_reduce" in failure.stacks.get(0, "")
    assert pool.run(get_rank) == [0, 1]
    assert [t.tolist() for t in pool.run(all_reduce_rank_tensors)] == [[10.0, 12.0, 14.0]] * 2


def test_timeout_names_the_silent_rank_and_recovers(pool: RankPool) -> None:
    t0 = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        pool.run(sleep_on_rank, 1, 60.0, timeout_s=3.0)
    assert time.monotonic() - t0 < 10.0
    timeout = info.value
    assert timeout.missing == [1]
    assert "rank 1 did not answer within 3 s" in str(timeout)
    assert timeout.tracebacks == {}
    assert "sleep_on_rank" in timeout.stacks.get(1, "")
    assert pool.run(get_rank) == [0, 1]


def test_unpicklable_result_is_a_rank_failure(pool: RankPool) -> None:
    with pytest.raises(RankFailure) as info:
        pool.run(unpicklable_result)
    assert set(info.value.tracebacks) == {0, 1}
    assert pool.run(get_rank) == [0, 1]


def test_unpicklable_function_fails_before_any_rank_runs(pool: RankPool) -> None:
    pool.start()
    pids = pool.pids
    with pytest.raises(Exception) as info:
        pool.run(lambda: 0)
    assert not isinstance(info.value, RankFailure)
    assert pool.pids == pids  # no restart needed
    assert pool.run(get_rank) == [0, 1]


def test_dead_worker_is_a_rank_failure(pool: RankPool) -> None:
    with pytest.raises(RankFailure) as info:
        pool.run(exit_on_rank1)
    assert set(info.value.tracebacks) == {1}
    assert "died (exit code 7)" in info.value.tracebacks[1]
    assert pool.run(get_rank) == [0, 1]


def test_init_model_parallel_in_the_pool(pool: RankPool) -> None:
    # (tp rank, pp rank, tp size) per rank
    assert pool.run(megatron_ranks, 2, 1) == [(0, 0, 2), (1, 0, 2)]
    assert pool.run(megatron_ranks, 1, 2) == [(0, 0, 1), (0, 1, 1)]
    assert pool.run(megatron_ranks, 2, 1) == [(0, 0, 2), (1, 0, 2)]


def test_four_ranks() -> None:
    with RankPool(4) as pool4:
        assert pool4.run(get_rank) == [0, 1, 2, 3]
        results = pool4.run(all_reduce_rank_tensors)
        assert [r.tolist() for r in results] == [[60.0, 64.0, 68.0]] * 4


def test_lazy_start_and_close_leaves_no_processes() -> None:
    # Children from before (the module pool's workers, or a session pool's) may exist;
    # after close() there must be no others.
    before = {c.pid for c in multiprocessing.active_children()}
    p = RankPool(2)
    assert not p.started
    assert p.run(get_rank) == [0, 1]
    assert p.started
    pids = p.pids
    assert all(alive(pid) for pid in pids)
    p.close()
    assert not p.started
    assert not any(alive(pid) for pid in pids)
    assert {c.pid for c in multiprocessing.active_children()} <= before
    p.close()  # idempotent


def test_context_manager_closes() -> None:
    with RankPool(1) as p:
        assert p.run(get_rank) == [0]
        pids = p.pids
    assert not p.started
    assert not any(alive(pid) for pid in pids)


def test_spawn_start_method() -> None:
    with RankPool(2, start_method="spawn") as p:
        assert [t.tolist() for t in p.run(all_reduce_rank_tensors)] == [[10.0, 12.0, 14.0]] * 2
        pids = p.pids
    assert not any(alive(pid) for pid in pids)


_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    sys.path.insert(0, {tests!r})
    from conformance.rank_pool import RankPool
    import test_rank_pool as t

    pool = RankPool(2)
    pool.start()
    print(" ".join(map(str, pool.pids)), flush=True)
    if {busy!r}:
        # rank 0 waits in an all_reduce that rank 1 (asleep) never joins
        threading.Thread(target=pool.run, args=(t.sleep_on_rank, 1, 600.0), daemon=True).start()
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no close()
    """
)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_workers_exit_when_parent_dies(busy: bool) -> None:
    script = _ORPHAN_SCRIPT.format(tests=str(Path(__file__).parent), busy=busy)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert wait_gone(pids, 10.0) == []
