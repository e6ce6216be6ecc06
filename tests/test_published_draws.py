"""The published ERNIE 4.5 structures in the drawn space: the strategies draw them (every structural
field as published, widths narrowed) in their share of examples, on the layouts that split them, and
the reference bridge converts them exactly, near-ties in their 64-expert routing included."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.cases import Case, Inputs
from conformance.properties import run_property
from conformance.recorder import LONG_POSITIONS
from conformance.strategies import ConfigLimits, all_layouts, configs, fitting_structures, inputs, published_configs
from ernie_ref import ErnieMoeConfig
from ernie_ref.checkpoint import expected_keys
from ernie_ref.layout import Layout
from ernie_ref.megatron import ReferenceBridge
from ernie_ref.published import PUBLISHED_STRUCTURES, STRUCTURAL_FIELDS, published_config, structure_of

CI = settings(max_examples=100, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def test_layouts_that_split_each_structure() -> None:
    """28 layers split into 2, 4 (pp 2 with vpp 2) and 4 stages, not 8; 54 into 2 only."""
    assert fitting_structures(Layout(pp=2, vpp=2, ep=4)) == ["ERNIE-4.5-21B-A3B"]
    assert fitting_structures(Layout(pp=4)) == ["ERNIE-4.5-21B-A3B"]
    assert fitting_structures(Layout(pp=2, tp=2)) == ["ERNIE-4.5-21B-A3B", "ERNIE-4.5-300B-A47B"]
    assert fitting_structures(Layout(pp=4, vpp=2)) == []


@pytest.mark.parametrize("name", list(PUBLISHED_STRUCTURES))
@pytest.mark.parametrize("dtype_min_hidden", [2, 16])
def test_published_draws_keep_every_structural_field(name: str, dtype_min_hidden: int) -> None:
    published = published_config(name)
    fitting = [layout for layout in all_layouts(4) if name in fitting_structures(layout)]

    @CI
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        layout = data.draw(st.sampled_from(fitting), label="layout")
        cfg = data.draw(published_configs(name, ConfigLimits(min_hidden=dtype_min_hidden), layout), label="config")
        differ = {f: (getattr(cfg, f), getattr(published, f)) for f in STRUCTURAL_FIELDS if getattr(cfg, f) != getattr(published, f)}
        assert not differ, f"{name} drawn with {differ} (drawn, published)"
        assert structure_of(cfg) == name
        assert 16 <= cfg.hidden_size <= 64 and cfg.hidden_size >= dtype_min_hidden, cfg.one_line()
        assert cfg.vocab_size <= 256 and cfg.moe_intermediate_size <= 16 and cfg.intermediate_size <= 32, cfg.one_line()
        for width in (cfg.vocab_size, cfg.intermediate_size, cfg.moe_intermediate_size):
            assert width % layout.tp == 0, f"{cfg.one_line()} under {layout}: width {width} does not split"
        assert len(expected_keys(cfg)) > 64 * (cfg.num_hidden_layers - cfg.moe_layer_start_index)

    check()


def test_ci_draws_published_structures_and_long_inputs_in_their_share() -> None:
    """At least one draw in ten of the derandomized draws is a published structure (each of them
    drawn), and one in twenty has positions beyond 256 (the small configs' long inputs, nominally
    one in ten)."""
    structures: Counter[str | None] = Counter()
    long_inputs = 0

    @settings(CI, max_examples=300)
    @given(data=st.data())
    def draw(data: st.DataObject) -> None:
        nonlocal long_inputs
        layout = data.draw(st.sampled_from(all_layouts(4)), label="layout")
        structures[structure_of(data.draw(configs(ConfigLimits(), layout=layout), label="config"))] += 1
        long_inputs += data.draw(inputs(), label="inputs").seq_len > LONG_POSITIONS

    draw()
    total = sum(structures.values())
    published = total - structures[None]
    assert published * 10 >= total and all(structures[name] for name in PUBLISHED_STRUCTURES), structures
    assert long_inputs * 20 >= total, f"{long_inputs} of {total} draws with positions beyond {LONG_POSITIONS}"


def test_long_inputs_reach_4096_tokens_on_a_gpu_and_1024_on_a_cpu() -> None:
    """--device cuda raises the longest drawn input from 1024 to 4096 tokens (the ConfigLimits of
    the session, which the certificate records)."""
    from conformance.session import config_limits

    def limits(device: str) -> ConfigLimits:
        return config_limits(published_in_ten=None, device=device)

    assert limits("cpu").max_long_seq_len == 1024 and limits("cuda").max_long_seq_len == 4096
    lengths: list[int] = []

    @settings(CI, max_examples=300)
    @given(data=st.data())
    def draw(data: st.DataObject) -> None:
        for bound in (1024, 4096):
            lengths.append((bound, data.draw(inputs(max_long_seq_len=bound), label=f"inputs up to {bound}").seq_len))

    draw()
    for bound in (1024, 4096):
        longest = max(n for b, n in lengths if b == bound)
        assert longest <= bound, f"an input of {longest} tokens drawn with max_long_seq_len {bound}"
    assert any(n > 1024 for b, n in lengths if b == 4096), "no input beyond 1024 tokens drawn with a bound of 4096"


def test_small_draws_only_when_fields_are_fixed_or_the_share_is_zero() -> None:
    @CI
    @given(data=st.data())
    def draw(data: st.DataObject) -> None:
        assert structure_of(data.draw(configs(ConfigLimits(published_in_ten=0)), label="config")) is None
        assert data.draw(configs(moe_k=1), label="fixed").moe_k == 1

    draw()


@pytest.mark.parametrize("name", list(PUBLISHED_STRUCTURES))
def test_reference_bridge_converts_a_published_structure_exactly(megatron_runtime, name: str) -> None:
    """One narrowed example per structure, all four properties that load it, fp32: 64 experts in
    top-6 or top-8 routing have near-ties in most examples, which the oracle decides as the
    bridge's model does."""
    narrowed = {"hidden_size": 32, "intermediate_size": 16, "moe_intermediate_size": 8, "vocab_size": 128}
    cfg = ErnieMoeConfig.from_hf({**PUBLISHED_STRUCTURES[name], **narrowed})
    assert structure_of(cfg) == name
    case = Case(cfg, weights_seed=5, inputs=Inputs(2, 8, 5))
    for prop in ("import", "round_trip", "equivalence", "interop"):
        observed = run_property(prop, ReferenceBridge(), case)
        if prop == "equivalence":
            errors = dict(observed["stage_errors"])
            assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda e: -e[1])[:3]
