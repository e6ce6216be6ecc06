"""pytest plugin for the torchrun tests (`-p torchrun_probe`): on rank 0 of a torchrun world,
appends one JSON line per completed task to $TORCHRUN_PROBE_LOG: the action, the case's layout,
and how many ranks answered. Shows which layouts really ran, and on how many ranks."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

PROBE_LOG = "TORCHRUN_PROBE_LOG"


def pytest_configure(config: pytest.Config) -> None:
    distributed = sys.modules.get("conformance.distributed")
    world = distributed.launcher_world() if distributed is not None else None
    if world is None or PROBE_LOG not in os.environ:
        return
    path = os.environ[PROBE_LOG]
    run = world.run

    def recording_run(fn: Any, *args: Any, timeout_s: float | None = None) -> list[Any]:
        results = run(fn, *args, timeout_s=timeout_s)
        action, case = args[0], args[2]  # rank_task(action, bridge, case, ...)
        with open(path, "a") as log:
            log.write(json.dumps({"action": action, "layout": str(case.layout), "ranks": len(results)}) + "\n")
        return results

    world.run = recording_run
