"""``torch.distributed`` process groups and Megatron-Core's model-parallel state for the suite's
processes: gloo on loopback, and model-parallel state re-initialised cheaply per example.

The CPU stand-ins for Megatron-Core's CUDA-only calls are in :mod:`conformance.cpu_patches`
(apply them before building a model); the free port a launcher hands every rank is picked by
:func:`conformance.rank_protocol.pick_free_port`.

Public API
----------
``init_process_group_once(world_size=1, rank=0)``
    gloo process group on loopback; no-op if already initialised.
``init_model_parallel(tp, pp, ep, vpp, seed)`` / ``destroy_model_parallel()``
    (Re-)initialise Megatron's model-parallel state and RNG tracker cheaply, so
    one process can re-initialise per test example without respawning.
``loopback_gloo_env()``
    Point gloo at the loopback interface (also used by :mod:`conformance.torchrun` on one host).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import inspect
import os
import sys
import threading
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "start_megatron_process",
    "init_process_group_once",
    "init_model_parallel",
    "destroy_model_parallel",
    "loopback_gloo_env",
]

# Serialises model-parallel (re-)initialisation, which swaps torch.distributed.new_group for a while.
_LOCK = threading.RLock()
# process groups that existed before init_model_parallel created Megatron's groups
_PG_SNAPSHOT: set[Any] | None = None


def loopback_gloo_env() -> None:
    """Make gloo use the loopback interface unless the user chose one already."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    elif sys.platform == "darwin":
        os.environ["GLOO_SOCKET_IFNAME"] = "lo0"


def start_megatron_process(world_size: int = 1, rank: int = 0) -> None:
    """What every process that runs the Megatron side does first: one intra-op thread
    (`cpu_patches.one_thread_per_process`), the CPU patches where there is no CUDA
    (`cpu_patches.apply_cpu_patches`) and the default gloo process group of `world_size` ranks
    (`init_process_group_once`)."""
    from .cpu_patches import apply_cpu_patches, one_thread_per_process

    one_thread_per_process()
    apply_cpu_patches()
    init_process_group_once(world_size, rank)


def init_process_group_once(world_size: int = 1, rank: int = 0) -> None:
    """Initialise the default ``torch.distributed`` process group (gloo, loopback).

    No-op if a default group already exists.  For ``world_size == 1`` the TCP store binds
    port 0 and the OS picks a free port (no race).  For ``world_size > 1`` every rank must
    see the same ``MASTER_PORT`` (and optionally ``MASTER_ADDR``, default 127.0.0.1) in its
    environment -- e.g. the parent sets ``MASTER_PORT=str(pick_free_port())`` (see
    :mod:`conformance.rank_protocol`) before ``torch.multiprocessing.spawn``; rank 0 hosts
    the store.
    """
    if dist.is_initialized():
        return
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad world_size/rank: {world_size}/{rank}")
    loopback_gloo_env()
    timeout = datetime.timedelta(minutes=5)
    if world_size == 1:
        host, port = "127.0.0.1", 0
    else:
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            raise RuntimeError(
                "world_size > 1 needs MASTER_PORT in the environment of every rank "
                "(the launcher can use pick_free_port())"
            )
        port = int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(
        host, port, world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False
    )
    dist.init_process_group(
        backend="gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
    )


def _process_groups() -> set[Any]:
    """Every live process group object (private torch API; empty set if unavailable)."""
    world = getattr(dist.distributed_c10d, "_world", None)
    pg_map = getattr(world, "pg_map", None)
    if pg_map is None:
        return set()
    return set(pg_map.keys())


# Process groups Megatron asked for, kept for the life of the default group and handed
# out again on re-initialisation.  Key: the new_group() arguments.  A gloo group owns two
# C++ worker threads and takes ~5-10 ms to free, and initialize_model_parallel creates
# ~17 of them even at world size 1, so destroying and recreating them per test example
# would dominate re-initialisation time (and back up thread teardown).
_PG_POOL: dict[tuple[Any, ...], Any] = {}
_PG_POOL_OWNER: Any = None  # the default group the pool belongs to


def _pool_key(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    ranks = kwargs.get("ranks")
    timeout = kwargs.get("timeout")
    return (
        tuple(int(r) for r in ranks) if ranks is not None else None,
        str(kwargs.get("backend")),
        kwargs.get("group_desc"),
        bool(kwargs.get("use_local_synchronization", False)),
        repr(kwargs.get("pg_options")),
        timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout,
    )


@contextlib.contextmanager
def _pooled_new_group() -> Iterator[None]:
    """While Megatron initialises, serve ``torch.distributed.new_group`` from the pool.

    Scoped to the ``initialize_model_parallel`` call: ``torch.distributed.new_group`` is
    restored on exit.  Every rank runs the same deterministic sequence of new_group calls
    (a collective), so every rank hits or misses the pool identically.
    """
    global _PG_POOL_OWNER
    default = dist.distributed_c10d._get_default_group()
    if _PG_POOL_OWNER is not default:
        _PG_POOL.clear()
        _PG_POOL_OWNER = default
    original = dist.new_group

    def new_group(*args: Any, **kwargs: Any) -> Any:
        if args:  # positional use: bind to names so the key is well defined
            bound = inspect.signature(original).bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
        key = _pool_key(kwargs)
        group = _PG_POOL.get(key)
        live = _process_groups()
        if group is not None and (group in live or group is dist.GroupMember.NON_GROUP_MEMBER):
            return group
        group = original(**kwargs)
        _PG_POOL[key] = group
        return group

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = original


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel state (safe to call when none exists).

    Calls Megatron's ``destroy_model_parallel`` and resets the RNG tracker.  The process
    groups Megatron obtained through :func:`init_model_parallel` stay in a per-process pool
    for reuse; any other group created during initialisation is destroyed here.
    """
    global _PG_SNAPSHOT
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker = getattr(rnd, "_CUDA_RNG_STATE_TRACKER", None)
    if tracker is not None:
        tracker.reset()
    if _PG_SNAPSHOT is not None and dist.is_initialized():
        default = dist.distributed_c10d._get_default_group()
        pooled = {id(g) for g in _PG_POOL.values()}
        for pg in _process_groups() - _PG_SNAPSHOT:
            if pg is default or id(pg) in pooled:
                continue
            with contextlib.suppress(Exception):
                dist.destroy_process_group(pg)
    _PG_SNAPSHOT = None


def _supported_kwargs(fn: Callable[..., Any], wanted: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in wanted.items() if k in params}


def init_model_parallel(tp: int, pp: int, ep: int, vpp: int | None, seed: int, etp: int = 1) -> None:
    """(Re-)initialise Megatron's model-parallel state, then seed all RNGs.

    Destroys any existing model-parallel state first (see :func:`destroy_model_parallel`),
    so a test process may call this once per example.  Requires the default process group
    (:func:`init_process_group_once`).  ``world_size`` must be a multiple of
    ``tp * pp`` and of ``etp * ep * pp``. Expert tensor parallelism ``etp`` is 1 by default
    (each expert whole on one rank, as `ernie_ref.layout.Layout` assumes); Megatron's own
    default would be ``tp``. Context parallel is 1.

    Process groups are reused across calls (see ``_pooled_new_group``): the first call at
    world size 1 takes ~10 ms (17 gloo groups), later ones ~0.5 ms and create no threads.
    With world size > 1 every rank must make the same sequence of calls (group creation
    is collective).

    Seeding: ``torch.manual_seed(seed)`` (Megatron's CPU initialisation draws weights from
    the CPU default generator) and ``model_parallel_cuda_manual_seed(seed)``, which adds the
    data-parallel, model-parallel (seed + 2718 + tp_rank) and expert-parallel states to the
    RNG tracker (CPU-backed after :func:`apply_cpu_patches`).
    """
    global _PG_SNAPSHOT
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("call init_process_group_once() first")
    destroy_model_parallel()
    _PG_SNAPSHOT = _process_groups()
    kwargs = _supported_kwargs(
        parallel_state.initialize_model_parallel,
        {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": vpp,
            "expert_model_parallel_size": ep,
            "expert_tensor_parallel_size": etp,
            # The backend already is gloo, so Megatron's *extra* gloo copies of the
            # data-parallel groups would only add groups.
            "create_gloo_process_groups": False,
        },
    )
    with _LOCK, _pooled_new_group():
        parallel_state.initialize_model_parallel(**kwargs)
    torch.manual_seed(seed)
    seed_fn = tensor_parallel.model_parallel_cuda_manual_seed
    seed_fn(seed, **_supported_kwargs(seed_fn, {"force_reset_rng": True}))
