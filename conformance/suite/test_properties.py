"""The five conformance properties, each over drawn configs, weights, inputs and layouts.

1. import       every parameter and persistent buffer is set from the checkpoint
2. round_trip   export(load(ckpt)) == ckpt: names, shapes, dtypes, bits, config
3. equivalence  Megatron logits, hidden states and routing match the oracle (fp32, 1e-5)
4. interop      the export loads in transformers and gives the oracle's logits
5. refusal      a corrupt checkpoint makes load raise

Each test searches its property for findings (`conformance.suite.drawing.search`): Hypothesis
draws the examples under the suite's profile (ernie-ci, ...; see conformance.plugin), shrinks a
failure, and the search isolates its trigger and looks again for defects it does not cover.
"""

from __future__ import annotations

from conformance.suite.drawing import search


def test_import(suite) -> None:
    search("import", suite)


def test_round_trip(suite) -> None:
    search("round_trip", suite)


def test_equivalence(suite) -> None:
    search("equivalence", suite)


def test_interop(suite) -> None:
    search("interop", suite)


def test_refusal(suite) -> None:
    search("refusal", suite)
