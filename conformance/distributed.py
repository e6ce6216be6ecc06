"""The Megatron side of a property, on one rank or on every rank of a `RankPool`.

`rank_task` is what each rank runs: initialise model-parallel state for the case's layout, let
the bridge load the checkpoint, then do one action. A layout of one rank runs in this process;
a larger one runs on the session's pool (set by the pytest plugin), every rank doing the same.

Under a launcher such as torchrun (`conformance.torchrun`) the pool is the launched world itself,
this process being its rank 0. There every layout runs on every rank, one-rank layouts included:
creating Megatron's process groups is collective over the whole world, so this process cannot set
up a layout alone; the ranks a layout does not need are data-parallel replicas.

When one rank's `load` raises, the others must not go on into the action's collectives (they
would wait there for the failed rank forever): every rank first tells the others whether its
load succeeded, and a rank whose peers failed returns `PeerLoadFailed` instead of acting. The
caller then reports the failed ranks' errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bridge import BridgeError, bridge_call

__all__ = [
    "bridge_failure",
    "HUNG_EXCEPTION",
    "INIT_SEEDS",
    "PeerLoadFailed",
    "launcher_world",
    "named_state",
    "rank_task",
    "refusal_errors",
    "run_on_ranks",
    "set_control_group",
    "set_pool",
]

# Seeds for Megatron's own initialisation; two different ones reveal parameters left unloaded.
INIT_SEEDS = (1234, 4321)

_POOL: Any = None  # a conformance.rank_pool.RankPool, or the launched world of conformance.torchrun
_POOL_IS_LAUNCHED_WORLD = False  # True for a launcher's world: one-rank layouts run on it too
# The group over which ranks agree on whether load succeeded; None: the default group. A launcher
# whose default group is NCCL sets a gloo group here (the agreement is a CPU tensor).
_CONTROL_GROUP: Any = None


def set_pool(pool: Any, *, launched: bool = False) -> None:
    """Make `pool` (anything with `world_size` and `run(fn, *args, timeout_s=None)`) run the
    layouts of more than one rank; None removes it.

    `launched=True` says that the pool is the world a launcher such as torchrun started, this
    process being one of its ranks: then every layout, one-rank layouts included, runs on it,
    since this process cannot create process groups alone.
    """
    global _POOL, _POOL_IS_LAUNCHED_WORLD
    _POOL = pool
    _POOL_IS_LAUNCHED_WORLD = pool is not None and launched


def launcher_world() -> Any:
    """The launched world set with `set_pool(..., launched=True)`, or None."""
    return _POOL if _POOL_IS_LAUNCHED_WORLD else None


def set_control_group(group: Any) -> None:
    """Use `group` (a gloo process group over every rank) for the ranks' agreement after load."""
    global _CONTROL_GROUP
    _CONTROL_GROUP = group


@dataclass(frozen=True)
class PeerLoadFailed:
    """What a rank returns instead of acting when `load` raised on other ranks (`ranks`).

    The failed ranks raise their own errors, so the pool reports those: this value only keeps
    the healthy ranks from waiting in the action's collectives for ranks that never come.
    """

    ranks: tuple[int, ...]


def _ranks_whose_load_failed(failed_here: bool) -> list[int]:
    """Every rank's answer to "did your load raise?", exchanged in one small all-reduce.

    Collective: every rank of the world calls it once per task (after load, before the action).
    """
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size(_CONTROL_GROUP) == 1:
        return [0] if failed_here else []
    flags = torch.zeros(dist.get_world_size(_CONTROL_GROUP), dtype=torch.int32)
    flags[dist.get_rank(_CONTROL_GROUP)] = int(failed_here)
    dist.all_reduce(flags, group=_CONTROL_GROUP)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def named_state(chunks: list[torch.nn.Module], prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of every chunk, keyed `<prefix>chunk<i>.<name>`."""
    state = {}
    for i, chunk in enumerate(chunks):
        for name, value in chunk.state_dict(keep_vars=False).items():
            if isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
                state[f"{prefix}chunk{i}.{name}"] = value.detach().clone()
    return state


def rank_task(action: str, bridge: Any, case: Any, hf_dir: Path, out_dir: Path | None, init_seed: int) -> Any:
    """On this rank: set up the layout, load, then `action`:
    "load" -> None; "state" -> this rank's named tensors; "checkpoint_values" -> how this rank's
    tensors differ from the checkpoint's values (`loaded_values.compare_with_checkpoint`);
    "export" -> export into out_dir; "trace" -> the forward record; "refuse" -> None if load
    accepted the checkpoint; its error, raised at once, if it refused.

    The bridge's own calls (load, export, its model's forward) raise `BridgeError`; anything else
    raised here is an error of the suite."""
    from .megatron_trace import record_forward
    from .parallel import init_model_parallel

    layout = case.layout
    init_model_parallel(layout.tp, layout.pp, layout.ep, layout.vpp if layout.vpp > 1 else None, seed=init_seed)
    torch.manual_seed(init_seed)
    load_error: BridgeError | None = None
    try:
        chunks = bridge_call("load", bridge.load, hf_dir, layout)
    except BridgeError as e:
        if action == "refuse":
            # Raised, not returned: under torchrun a rank's exception ends the job, and peers the
            # bridge left waiting for this rank (in its own collectives) would wait forever. The
            # pool then gives them its short failure grace, not its timeout.
            raise
        load_error = e
    if action == "refuse":
        return None  # accepted; no collective follows
    failed_ranks = _ranks_whose_load_failed(load_error is not None)
    if load_error is not None:
        raise load_error
    if failed_ranks:
        return PeerLoadFailed(tuple(failed_ranks))
    if action == "load":
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if action == "state":
        return named_state(chunks, prefix=f"rank{rank}." if layout.world_size > 1 else "")
    if action == "checkpoint_values":
        from .loaded_values import compare_with_checkpoint

        return compare_with_checkpoint(chunks, hf_dir, prefix=f"rank{rank}." if layout.world_size > 1 else "")
    if action == "export":
        bridge_call("export", bridge.export, chunks, out_dir)
        return None
    if action == "trace":
        return record_forward(chunks, case.inputs.input_ids(case.config.vocab_size))
    raise ValueError(f"unknown action {action!r}")


def run_on_ranks(action: str, bridge: Any, case: Any, hf_dir: Path, out_dir: Path | None = None,
                 init_seed: int = INIT_SEEDS[0]) -> list[Any]:
    """`rank_task` on every rank of the case's layout; results in rank order.

    A one-rank layout runs in this process, unless the pool is a launched world (see `set_pool`).
    Raises `BridgeError` when the bridge raised on some ranks (or some ranks hung inside the
    bridge, the others waiting for them); any other failure of a rank is the suite's.
    """
    if case.layout.world_size == 1 and not _POOL_IS_LAUNCHED_WORLD:
        return [rank_task(action, bridge, case, hf_dir, out_dir, init_seed)]
    if _POOL is None:
        raise RuntimeError(f"layout {case.layout} needs {case.layout.world_size} ranks and no rank pool is running")
    if case.layout.world_size > _POOL.world_size or _POOL.world_size % case.layout.world_size:
        raise RuntimeError(f"layout {case.layout} does not fit a pool of {_POOL.world_size} ranks")
    from .rank_pool import RankFailure

    try:
        return _POOL.run(rank_task, action, bridge, case, hf_dir, out_dir, init_seed)
    except RankFailure as failure:
        blamed = bridge_failure(failure)
        if blamed is None:
            raise
        raise blamed from failure


# The `exception` of the BridgeError that stands for ranks hung inside the bridge (`bridge_failure`).
HUNG_EXCEPTION = "RankTimeout"


def refusal_errors(refusal: BridgeError) -> list[str]:
    """"Exception: message" of every rank whose call raised `refusal` (`run_on_ranks` raises the
    first rank's, from the pool's failure that holds them all)."""
    raised = getattr(refusal.__cause__, "exceptions", None) or {0: refusal}
    return [f"{e.exception}: {e.message}" for e in raised.values()]


def bridge_failure(failure: Any) -> BridgeError | None:
    """The `BridgeError` that a pool failure amounts to, or None when it is not the bridge's.

    It is the bridge's when every rank that raised raised a `BridgeError`, or, when ranks hung,
    every stuck rank's stack was inside a bridge call (`bridge_call`): a rank that hangs in the
    bridge's collectives leaves the others waiting, and that is a defect of the bridge.
    """
    raised = {rank: failure.exceptions.get(rank) for rank in failure.tracebacks}
    if raised:
        if not all(isinstance(e, BridgeError) for e in raised.values()):
            return None
        first = raised[min(raised)]
        return first.with_ranks(tuple(sorted(raised)))
    missing = list(getattr(failure, "missing", []))
    stacks = {rank: failure.stacks.get(rank, "") for rank in missing}
    if not missing or not all("bridge_call" in stack for stack in stacks.values()):
        return None
    first = min(missing)
    return BridgeError("load, export or forward (hung)", HUNG_EXCEPTION, str(failure).splitlines()[0],
                       stacks[first], tuple(missing))
