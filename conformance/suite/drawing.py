"""Drawing one case for the bridge under test, and running a property on it the suite's way."""

from __future__ import annotations

from hypothesis import reject
from hypothesis import strategies as st

from ernie_ref.checkpoint import read_config

from .. import plugin
from ..counterexample import Counterexample, replay_command
from ..properties import Case, NearTie, PropertyFailure, run_property
from ..numerics import tolerance
from ..strategies import ConfigLimits, configs, corruptions, inputs, seeds


def draw_case(data: st.DataObject, suite: plugin.SuiteSession, with_corruption: bool = False) -> Case:
    """Draw a config (or read the user's checkpoint), weights dtype and seed, inputs and layout.

    A config the bridge declares unsupported is recorded as a declared refusal and the example is
    rejected: it is not a failure.
    """
    layout = data.draw(st.sampled_from(suite.layouts), label="layout")
    dtype = data.draw(st.sampled_from(suite.dtypes), label="dtype")  # a user's checkpoint: its own
    if suite.checkpoint is not None:
        cfg = read_config(suite.checkpoint)  # the suite fixture kept only layouts that fit it
    else:
        limits = ConfigLimits(min_hidden=tolerance(dtype).min_hidden_size)  # bf16 needs wider models
        cfg = data.draw(configs(limits, layout=layout), label="config")
    weights_seed = None
    reason = suite.bridge.unsupported(cfg)
    if reason is not None:
        plugin.count_refusal(reason)
        reject()
    if suite.checkpoint is None:
        weights_seed = data.draw(seeds(), label="weights seed")
    corruption = None
    if with_corruption:
        corruption = data.draw(corruptions(cfg, config_only=suite.checkpoint is not None), label="corruption")
    case = Case(
        config=cfg,
        weights_seed=weights_seed,
        inputs=data.draw(inputs(), label="inputs"),
        layout=layout,
        corruption=corruption,
        checkpoint=str(suite.checkpoint) if suite.checkpoint is not None else None,
        dtype=dtype,
    )
    plugin.count_example()
    return case


def check(prop: str, suite: plugin.SuiteSession, case: Case) -> None:
    """Run `prop` on `case`; on failure save the counterexample and name its replay command."""
    try:
        run_property(prop, suite.bridge, case)
    except NearTie:
        reject()
    except PropertyFailure as failure:
        plugin.note_failure()
        example = Counterexample.from_failure(failure, suite.bridge_spec, suite.bridge_version, plugin.current_test())
        path = example.save(suite.counterexamples)
        plugin.note_counterexample(path)
        raise failure.with_replay(replay_command(path)) from None
