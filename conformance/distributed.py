"""The Megatron side of a property, on one rank or on every rank of a `RankPool`.

`rank_task` is what each rank runs: initialise model-parallel state for the case's layout, let
the bridge load the checkpoint, then do one action. A layout of one rank runs in this process;
a larger one runs on the session's pool (set by the pytest plugin), every rank doing the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["INIT_SEEDS", "rank_task", "run_on_ranks", "set_pool", "named_state"]

# Seeds for Megatron's own initialisation; two different ones reveal parameters left unloaded.
INIT_SEEDS = (1234, 4321)

_POOL: Any = None  # a conformance.rank_pool.RankPool, when the session has one


def set_pool(pool: Any) -> None:
    global _POOL
    _POOL = pool


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
    "state" -> this rank's named tensors; "export" -> export into out_dir; "trace" -> the forward
    record; "refuse" -> the error load raised, or None if it accepted the checkpoint."""
    from .megatron_runtime import init_model_parallel
    from .megatron_trace import record_forward

    layout = case.layout
    init_model_parallel(layout.tp, layout.pp, layout.ep, layout.vpp if layout.vpp > 1 else None, seed=init_seed)
    torch.manual_seed(init_seed)
    try:
        chunks = bridge.load(hf_dir, layout)
    except Exception as e:  # noqa: BLE001 - for "refuse", any exception is the expected answer
        if action == "refuse":
            return f"{type(e).__name__}: {e}"
        raise
    if action == "refuse":
        return None
    if action == "state":
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return named_state(chunks, prefix=f"rank{rank}." if layout.world_size > 1 else "")
    if action == "export":
        bridge.export(chunks, out_dir)
        return None
    if action == "trace":
        return record_forward(chunks, case.inputs.input_ids(case.config.vocab_size))
    raise ValueError(f"unknown action {action!r}")


def run_on_ranks(action: str, bridge: Any, case: Any, hf_dir: Path, out_dir: Path | None = None,
                 init_seed: int = INIT_SEEDS[0]) -> list[Any]:
    """`rank_task` on every rank of the case's layout; results in rank order."""
    if case.layout.world_size == 1:
        return [rank_task(action, bridge, case, hf_dir, out_dir, init_seed)]
    if _POOL is None:
        raise RuntimeError(f"layout {case.layout} needs {case.layout.world_size} ranks and no rank pool is running")
    if case.layout.world_size > _POOL.world_size or _POOL.world_size % case.layout.world_size:
        raise RuntimeError(f"layout {case.layout} does not fit a pool of {_POOL.world_size} ranks")
    return _POOL.run(rank_task, action, bridge, case, hf_dir, out_dir, init_seed)
