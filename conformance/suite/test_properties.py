"""The five conformance properties, each over drawn configs, weights and inputs.

1. import       every parameter and persistent buffer is set from the checkpoint
2. round_trip   export(load(ckpt)) == ckpt: names, shapes, dtypes, bits, config
3. equivalence  Megatron logits, hidden states and routing match the oracle (fp32, 1e-5)
4. interop      the export loads in transformers and gives the oracle's logits
5. refusal      a corrupt checkpoint makes load raise
"""

from __future__ import annotations

from hypothesis import given, reject
from hypothesis import strategies as st

from conformance.properties import (
    NearTie,
    check_equivalence,
    check_import,
    check_interop,
    check_refusal,
    check_round_trip,
    write_checkpoint,
)
from conformance.strategies import corruptions
from conformance.suite.drawing import draw_case, scratch_dirs


@given(data=st.data())
def test_import(bridge, megatron_runtime, data: st.DataObject) -> None:
    case = draw_case(data, bridge)
    with scratch_dirs("hf") as (hf,):
        write_checkpoint(case, hf)
        check_import(bridge, case, hf)


@given(data=st.data())
def test_round_trip(bridge, megatron_runtime, data: st.DataObject) -> None:
    case = draw_case(data, bridge)
    with scratch_dirs("hf", "export") as (hf, out):
        write_checkpoint(case, hf)
        check_round_trip(bridge, case, hf, out)


@given(data=st.data())
def test_equivalence(bridge, megatron_runtime, data: st.DataObject) -> None:
    case = draw_case(data, bridge)
    with scratch_dirs("hf") as (hf,):
        write_checkpoint(case, hf)
        try:
            check_equivalence(bridge, case, hf)
        except NearTie:
            reject()


@given(data=st.data())
def test_interop(bridge, megatron_runtime, data: st.DataObject) -> None:
    case = draw_case(data, bridge)
    with scratch_dirs("hf", "export") as (hf, out):
        write_checkpoint(case, hf)
        try:
            check_interop(bridge, case, hf, out)
        except NearTie:
            reject()


@given(data=st.data())
def test_refusal(bridge, megatron_runtime, data: st.DataObject) -> None:
    case = draw_case(data, bridge)
    corruption = data.draw(corruptions(case.config), label="corruption")
    with scratch_dirs("hf") as (hf,):
        write_checkpoint(case, hf)
        check_refusal(bridge, case, hf, corruption)
