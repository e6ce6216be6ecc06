"""Drawing one case for the bridge under test, and running a property on it the suite's way."""

from __future__ import annotations

import dataclasses

from hypothesis import reject
from hypothesis import strategies as st

from ernie_ref.checkpoint import read_config

from ..bridge import BridgeError, bridge_call
from ..cases import Case
from ..counterexample import Counterexample, replay_command
from ..numerics import tolerance
from ..properties import NearTie, PropertyFailure, run_property
from ..recorder import RECORDER
from ..session import SuiteSession
from ..strategies import ConfigLimits, configs, corruptions, inputs, seeds


def draw_case(data: st.DataObject, suite: SuiteSession, prop: str) -> Case:
    """Draw a layout, the weights' dtype, a config (or read the user's checkpoint), the weights
    seed, inputs and, for the refusal property, a corruption.

    A config the bridge declares unsupported is recorded as a declared refusal and the example is
    rejected: it is not a failure, but it is not a valid example either (see `verdict_of`).
    """
    layout = data.draw(st.sampled_from(suite.layouts), label="layout")
    dtype = data.draw(st.sampled_from(suite.dtypes), label="dtype")  # a user's checkpoint: its own
    if suite.checkpoint is not None:
        cfg = read_config(suite.checkpoint)  # the suite fixture kept only layouts that fit it
    else:
        limits = ConfigLimits(min_hidden=tolerance(dtype).min_hidden_size)  # bf16 needs wider models
        RECORDER.note_limits(dtype, dataclasses.asdict(limits))
        cfg = data.draw(configs(limits, layout=layout), label="config")
    case = Case(
        config=cfg,
        weights_seed=data.draw(seeds(), label="weights seed") if suite.checkpoint is None else None,
        inputs=data.draw(inputs(), label="inputs"),
        layout=layout,
        corruption=(data.draw(corruptions(cfg, config_only=suite.checkpoint is not None), label="corruption")
                    if prop == "refusal" else None),
        checkpoint=str(suite.checkpoint) if suite.checkpoint is not None else None,
        dtype=dtype,
    )
    RECORDER.count_draw()
    try:
        reason = bridge_call("unsupported", suite.bridge.unsupported, cfg)
    except BridgeError as e:
        raise PropertyFailure(prop, case, f"the bridge's unsupported() raised {e.exception}: {e.message}",
                              kind="bridge raised", facts={"call": "unsupported", "exception": e.exception},
                              evidence={"traceback": e.traceback_text}) from e
    if reason is not None:
        RECORDER.count_refusal(reason)
        reject()
    return case


def check(prop: str, suite: SuiteSession, case: Case) -> None:
    """Run `prop` on `case`; on failure save the counterexample and name its replay command.

    Shrinking is bounded (`suite.max_shrinks` examples after the first failure): past it, an
    example that has not failed before is set aside, so Hypothesis ends with the smallest failure
    found so far, and a failure seen before is raised again without running the bridge (Hypothesis
    runs its final example once more to report it). A bridge that fails everything thus gets its
    verdict in seconds, not minutes of shrinking.
    """
    tally = RECORDER.tally
    failure = tally.failed_cases.get(repr(case))
    replayed = failure is not None
    if failure is None:
        if tally.failing and tally.shrink_calls >= suite.max_shrinks:
            reject()
        try:
            observed = run_property(prop, suite.bridge, case)
        except NearTie:
            RECORDER.count_tie()
            reject()
        except PropertyFailure as found:
            failure = found
        else:
            RECORDER.count_valid(case, observed)
            return
    RECORDER.note_failure(case, failure, replayed)
    example = Counterexample.from_failure(failure, suite.bridge_spec, suite.bridge_version, RECORDER.test)
    path = example.save(suite.counterexamples)
    RECORDER.tally.counterexample = str(path)
    raise failure.with_replay(replay_command(path))
