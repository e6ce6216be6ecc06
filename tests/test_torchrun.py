"""The suite under torchrun (`python -m torch.distributed.run ... -m conformance.torchrun`), for real:
two processes on gloo, rank 0 running pytest and rank 1 following. Plus the pieces that need no
launch: option parsing, messages, layout checks, routing, and the ranks' agreement after load.

NCCL (`--device cuda`) needs GPUs and is not exercised here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from torchrun_bridges import HangsOnAMissingNorm, LoadRaisesOnRank1, RefusesOnRank1WhileRank0WaitsForIt

from conformance import distributed
from conformance.cases import Case, Corruption, Inputs
from conformance.properties import PropertyFailure, check_refusal, prepare_checkpoint
from conformance.rank_pool import RankFailure, RankPool
from conformance.rank_protocol import pick_free_port
from conformance.session import check_layouts_fit_world, parse_layouts
from conformance.torchrun import HANG_EXIT_CODE, choose_backend, failure_message, parse_options
from ernie_ref import ErnieMoeConfig
from ernie_ref.layout import Layout

HERE = Path(__file__).resolve().parent
# One launch imports torch and megatron-core in two processes on a small machine (~15 s), then
# runs a few examples; well under this unless something hangs.
LAUNCH_TIMEOUT_S = 240


def torchrun_suite(workdir: Path, *args: str, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """`torchrun -m conformance.torchrun ARGS` in `workdir`, with tests/ importable on every rank."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
               TORCHRUN_PROBE_LOG=str(workdir / "probe.jsonl"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(pick_free_port()),
               "-m", "conformance.torchrun", *args,
               "-p", "no:cacheprovider", "-W", "ignore", "--counterexamples", str(workdir / "counterexamples")]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def results_by_test(path: Path) -> dict[str, dict[str, Any]]:
    return {r["test"].rsplit("::", 1)[-1]: r for r in json.loads(path.read_text())["results"]}


def probed_tasks(workdir: Path) -> list[dict[str, Any]]:
    log = workdir / "probe.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------------------------------
# launched for real: 2 ranks, gloo, CPU
# --------------------------------------------------------------------------------------------


def test_suite_passes_under_torchrun_with_every_layout_on_both_ranks(tmp_path: Path) -> None:
    run = torchrun_suite(tmp_path, "--bridge", "reference", "--layouts", "tp1-pp1-ep1-vpp1,tp2-pp1-ep1-vpp1",
                         "--max-examples", "5", "-k", "round_trip or equivalence",
                         "--results-json", str(tmp_path / "results.json"), "-p", "torchrun_probe")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "a world of 2 ranks on gloo" in run.stdout
    results = results_by_test(tmp_path / "results.json")
    assert {name: r["outcome"] for name, r in results.items()} == {"test_round_trip": "passed",
                                                                    "test_equivalence": "passed"}
    tasks = probed_tasks(tmp_path)
    ran = {(task["action"], task["layout"]) for task in tasks}
    # tp2 needs both ranks; the one-rank layout runs on both too (rank 1 a data-parallel replica).
    assert {("export", "tp2-pp1-ep1-vpp1"), ("trace", "tp2-pp1-ep1-vpp1")} <= ran, tasks
    assert {("export", "tp1-pp1-ep1-vpp1"), ("trace", "tp1-pp1-ep1-vpp1")} <= ran, tasks
    assert all(task["ranks"] == 2 for task in tasks)


def failing_run(tmp_path: Path, bridge: str, layouts: str) -> dict[str, dict[str, Any]]:
    """round_trip and equivalence of `bridge` on 2 ranks, 3 examples each, first failure as found:
    the run must fail; its results by test."""
    run = torchrun_suite(tmp_path, "--bridge", bridge, "--layouts", layouts, "--max-examples", "3", "--no-shrink",
                         "--no-triggers", "-k", "round_trip or equivalence", "--results-json", str(tmp_path / "results.json"))
    assert run.returncode != 0, run.stdout[-2000:]
    return results_by_test(tmp_path / "results.json")


def test_bridge_wrong_only_on_several_ranks_fails_round_trip(tmp_path: Path) -> None:
    # Right in one process: only because every example runs on 2 ranks here is it caught, even
    # with a one-rank layout. Equivalence does not export, passes, and runs after the failure.
    results = failing_run(tmp_path, "torchrun_bridges:CorruptsExportWhenDistributed", "tp1-pp1-ep1-vpp1")
    assert results["test_round_trip"]["outcome"] == "failed"
    assert "[round_trip] exported checkpoint differs from the original" in results["test_round_trip"]["message"]
    assert "model.norm.weight" in results["test_round_trip"]["message"]
    assert results["test_equivalence"]["outcome"] == "passed"


def test_error_on_rank_1_fails_the_example_with_its_traceback_and_the_run_goes_on(tmp_path: Path) -> None:
    results = failing_run(tmp_path, "torchrun_bridges:LoadRaisesOnRank1", "tp1-pp1-ep1-vpp1,tp2-pp1-ep1-vpp1")
    for name in ("test_round_trip", "test_equivalence"):  # the second ran after the first failed
        message = results[name]["message"]
        assert results[name]["outcome"] == "failed"
        assert "the bridge raised ValueError in load on rank 1 on a valid checkpoint: load refused on rank 1" in message
        assert "the bridge's traceback" in message
        assert 'torchrun_bridges.py", line' in message  # rank 1's own traceback


def test_error_raised_alike_on_every_rank_is_reported_once_for_all(tmp_path: Path) -> None:
    results = failing_run(tmp_path, "torchrun_bridges:ExportRaisesOnEveryRank", "tp1-pp1-ep1-vpp1,tp2-pp1-ep1-vpp1")
    message = results["test_round_trip"]["message"]
    assert results["test_round_trip"]["outcome"] == "failed"
    assert ("the bridge raised NotImplementedError in export on ranks 0, 1 on a valid checkpoint: export is not "
            "written yet (world of 2 ranks)") in message
    # One traceback for both ranks, rather than the same one twice.
    assert "the bridge's traceback" in message and "--- rank" not in message
    assert results["test_equivalence"]["outcome"] == "passed"  # the world is in step after the failure


def test_hang_after_a_rank_failed_mid_task_ends_the_job_with_stacks(tmp_path: Path) -> None:
    # Rank 1 raises in export while rank 0 waits in export's collectives: a hang, by design fatal.
    run = torchrun_suite(tmp_path, "--task-timeout-s", "5", "--bridge", "torchrun_bridges:ExportRaisesOnRank1",
                         "--layouts", "tp1-pp1-ep1-vpp1", "--max-examples", "2", "-k", "round_trip")
    assert run.returncode != 0
    assert "rank 0: a task did not finish within 5 s (--task-timeout-s)" in run.stderr
    assert "Stacks of this rank" in run.stderr and "in export" in run.stderr  # where rank 0 waits
    # Rank 1, which waits for rank 0's answer in turn, shows the root cause before it ends.
    assert "This rank's task raised, then waited for the others" in run.stderr
    assert "ValueError: export refused on rank 1 (deliberately)" in run.stderr
    assert f"exitcode  : {HANG_EXIT_CODE}" in run.stderr  # torchrun's report of the rank's exit status


def test_layouts_larger_than_the_world_are_a_usage_error_naming_both(tmp_path: Path) -> None:
    run = torchrun_suite(tmp_path, "--bridge", "reference", "--layouts", "any", "--max-ranks", "4")
    assert run.returncode != 0
    assert "--max-ranks 4 does not fit the torchrun world of 2 ranks" in run.stdout + run.stderr
    assert "exitcode  : 4" in run.stderr  # pytest's usage error, as rank 0's exit status


# --------------------------------------------------------------------------------------------
# without a launch
# --------------------------------------------------------------------------------------------


def test_own_options_are_taken_and_the_rest_goes_to_pytest_in_order() -> None:
    options = parse_options(["--bridge", "reference", "--device", "cuda", "-k", "round_trip or equivalence",
                             "--task-timeout-s", "30", "--max-ranks", "4"])
    assert (options.device, options.task_timeout_s) == ("cuda", 30.0)
    assert options.pytest_args == ["--bridge", "reference", "-k", "round_trip or equivalence", "--max-ranks", "4"]
    assert parse_options([]).device == "cpu"


@pytest.mark.parametrize("device, cuda_available, backend", [
    ("cpu", False, "gloo"), ("cpu", True, "gloo"), ("cuda", True, "nccl"), ("cuda", False, "gloo"),
])
def test_backend_is_nccl_only_for_cuda_where_there_is_cuda(device: str, cuda_available: bool, backend: str) -> None:
    assert choose_backend(device, cuda_available) == backend


def test_failure_message_shows_each_distinct_traceback_once_and_ends_with_the_error() -> None:
    same = "Traceback (most recent call last):\nValueError: same\n"
    message = failure_message({0: same, 1: same, 3: "Traceback (most recent call last):\nKeyError: 'x'\n"})
    assert message.splitlines()[0] == "ranks 0, 1, 3 raised under torchrun"
    assert message.count("ValueError: same") == 1
    assert "--- ranks 0, 1 ---" in message and "--- rank 3 ---" in message
    assert message.splitlines()[-1] == "KeyError: 'x'"


def test_layouts_must_divide_the_launched_world() -> None:
    check_layouts_fit_world(parse_layouts("any", 2), 4, "any", 2)  # 1- and 2-rank layouts on 4: replicas
    check_layouts_fit_world(parse_layouts("tp2-pp2-ep1-vpp1", 4), 8, "tp2-pp2-ep1-vpp1", 4)
    with pytest.raises(pytest.UsageError, match="--max-ranks 4 does not fit the torchrun world of 2 ranks"):
        check_layouts_fit_world(parse_layouts("any", 4), 2, "any", 4)
    with pytest.raises(pytest.UsageError, match=r"tp1-pp3-ep1-vpp1 \(3 ranks\) does not fit the torchrun world "
                                                r"of 4 ranks"):
        check_layouts_fit_world([Layout(), Layout(pp=3)], 4, "tp1-pp1-ep1-vpp1,tp1-pp3-ep1-vpp1", 4)


class RecordingWorld:
    """Stands in for a launched world: records what it was asked to run."""

    world_size = 2

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def run(self, fn: Any, *args: Any, timeout_s: float | None = None) -> list[Any]:
        self.calls.append(args)
        return ["rank 0 result", "rank 1 result"]


@pytest.fixture
def restore_pool() -> Any:
    yield
    distributed.set_pool(None)


def test_one_rank_layouts_run_on_a_launched_world(restore_pool: None) -> None:
    world = RecordingWorld()
    distributed.set_pool(world, launched=True)
    case = SimpleNamespace(layout=Layout())
    assert distributed.run_on_ranks("export", "bridge", case, Path("hf"), Path("out")) == ["rank 0 result",
                                                                                         "rank 1 result"]
    assert [call[0] for call in world.calls] == ["export"]
    assert distributed.launcher_world() is world
    distributed.set_pool(world)  # a pool of this session's own: one-rank layouts stay in this process
    assert distributed.launcher_world() is None


# --------------------------------------------------------------------------------------------
# the agreement after load, as the built-in pool runs it (the same rank_task)
# --------------------------------------------------------------------------------------------


def small_moe_config() -> ErnieMoeConfig:
    return ErnieMoeConfig.from_hf(dict(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=8, moe_num_experts=2,
                                       moe_k=1, moe_intermediate_size=8, moe_layer_start_index=1))


def corrupt_two_rank_case(tmp_path: Path) -> tuple[Case, Path]:
    """A refusal example on tp=2 (the final norm missing) and its intact checkpoint."""
    case = Case(small_moe_config(), 3, Inputs(1, 4, 0), Layout(tp=2),
                corruption=Corruption("missing", "model.norm.weight"))
    return case, prepare_checkpoint(case, tmp_path)


def test_a_refusal_on_one_rank_is_a_refusal_while_the_other_waits_for_it(tmp_path: Path, restore_pool: None) -> None:
    """Rank 1 refuses the corrupt checkpoint; rank 0 waits for it in a collective of the bridge. Under
    torchrun rank 1's exception ends the job: a refusal, answered within the pool's failure grace,
    not a hang blamed on the bridge after the pool's timeout."""
    case, hf = corrupt_two_rank_case(tmp_path)
    with RankPool(2, timeout_s=60.0) as pool:
        distributed.set_pool(pool)
        observed = check_refusal(RefusesOnRank1WhileRank0WaitsForIt(), case, hf, case.corruption)
        restarts = pool.restarts
    assert observed == {"named": True}, observed
    assert restarts == 1, f"the pool restarted {restarts} times: once, after rank 1's refusal, is expected"


def test_a_load_that_hangs_on_a_corrupt_checkpoint_with_no_rank_refusing_fails_refusal(
        tmp_path: Path, restore_pool: None) -> None:
    case, hf = corrupt_two_rank_case(tmp_path)
    with RankPool(2, timeout_s=30.0) as pool:
        distributed.set_pool(pool)
        with pytest.raises(PropertyFailure) as failure:
            check_refusal(HangsOnAMissingNorm(), case, hf, case.corruption)
    assert failure.value.kind == "bridge raised" and failure.value.facts["exception"] == "RankTimeout", failure.value
    assert "load hung on ranks 0, 1 on a corrupt checkpoint, no rank refusing it" in str(failure.value), \
        str(failure.value)


def test_load_failing_on_one_rank_does_not_leave_the_other_in_a_collective(tmp_path: Path) -> None:
    cfg = small_moe_config()
    case = Case(cfg, 3, Inputs(1, 4, 0), Layout(tp=2))
    hf = prepare_checkpoint(case, tmp_path)
    with RankPool(2, failure_grace_s=30.0) as pool:
        with pytest.raises(RankFailure) as failure:
            pool.run(distributed.rank_task, "export", LoadRaisesOnRank1(), case, hf, tmp_path / "out", 0)
    # Rank 0 answered at once (with PeerLoadFailed) instead of waiting out the grace in export's
    # all-gather: only rank 1 is reported, as the one that raised.
    assert set(failure.value.tracebacks) == {1}
    assert "load refused on rank 1" in failure.value.tracebacks[1]
    assert "did not answer" not in str(failure.value)
