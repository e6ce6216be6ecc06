"""The five conformance properties, each over drawn configs, weights, inputs and layouts.

1. import       every parameter and persistent buffer is set from the checkpoint
2. round_trip   export(load(ckpt)) == ckpt: names, shapes, dtypes, bits, config
3. equivalence  Megatron logits, hidden states and routing match the oracle (fp32, 1e-5)
4. interop      the export loads in transformers and gives the oracle's logits
5. refusal      a corrupt checkpoint makes load raise
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conformance.plugin import suite_settings
from conformance.suite.drawing import check, draw_case

# The suite's own profile (ernie-ci, ...), applied to its tests alone: see conformance.plugin.
SETTINGS = suite_settings()


@SETTINGS
@given(data=st.data())
def test_import(suite, data: st.DataObject) -> None:
    check("import", suite, draw_case(data, suite, "import"))


@SETTINGS
@given(data=st.data())
def test_round_trip(suite, data: st.DataObject) -> None:
    check("round_trip", suite, draw_case(data, suite, "round_trip"))


@SETTINGS
@given(data=st.data())
def test_equivalence(suite, data: st.DataObject) -> None:
    check("equivalence", suite, draw_case(data, suite, "equivalence"))


@SETTINGS
@given(data=st.data())
def test_interop(suite, data: st.DataObject) -> None:
    check("interop", suite, draw_case(data, suite, "interop"))


@SETTINGS
@given(data=st.data())
def test_refusal(suite, data: st.DataObject) -> None:
    check("refusal", suite, draw_case(data, suite, "refusal"))
