"""Verdicts must be earned: each test breaks one thing a verdict may not rest on, and checks the
verdict that the suite (or `certify`) gives for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conformance.cases import Case, Inputs
from conformance.mutants import ExpertBiasNotLoaded, LoadAlwaysRaises
from conformance.properties import PropertyFailure, SetAside, first_divergence, run_property
from conformance.strategies import configs, corruptions, inputs, seeds
from ernie_ref import ErnieMoeConfig, random_checkpoint
from ernie_ref.megatron import ReferenceBridge

HERE = Path(__file__).parent
ONE_RANK = "tp1-pp1-ep1-vpp1"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "conformance", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.whole_runs
def test_a_bridge_that_refuses_almost_everything_does_not_conform(tmp_path: Path) -> None:
    run = cli("certify", "--bridge", "verdict_bridges:RefusesAlmostEverything", "--out", "cert", "--max-examples", "10",
              "--published-in-ten", "0",
              "--jobs", "1", "--layouts", ONE_RANK, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    c = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    assert not c["conforms"] and "DOES NOT CONFORM" in run.stdout, run.stdout
    assert {s: e["verdict"] for s, e in c["published"].items()} == {
        "ERNIE-4.5-21B-A3B": "fail", "ERNIE-4.5-300B-A47B": "fail"}, c["published"]
    assert all("only one-layer models" in e["reason"] for e in c["published"].values()), c["published"]
    verdicts = {p: (e["verdict"], e["why"]) for p, e in c["properties"].items()}
    assert all(v == "inconclusive" and why for v, why in verdicts.values()), verdicts
    reason = "only one-layer models with two experts and top-1 routing"
    assert c["refusals"][reason]["share"] > 0.9, c["refusals"]
    assert "declares published structures unsupported" in c["headline"] and reason in c["headline"], c["headline"]
    assert c["headline"] in (tmp_path / "cert" / "certificate.md").read_text()


def test_refusal_first_loads_the_intact_checkpoint(megatron_runtime) -> None:
    """A bridge whose load always raises does not pass refusal: the intact checkpoint must load."""
    cfg = ErnieMoeConfig.from_hf(dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, moe_num_experts=2, moe_k=1,
                                      moe_intermediate_size=4))
    from conformance.cases import Corruption

    case = Case(cfg, weights_seed=1, inputs=Inputs(1, 2, 0), corruption=Corruption("missing", "model.norm.weight"))
    with pytest.raises(PropertyFailure) as failed:
        run_property("refusal", LoadAlwaysRaises(), case)
    failure = failed.value
    assert failure.kind == "bridge raised" and failure.facts == {"call": "load", "exception": "ModuleNotFoundError"}, failure
    traceback = failure.evidence["traceback"]
    assert "mutants/refusal.py" in traceback and "in load" in traceback, failure.evidence
    assert "the bridge's traceback" in str(failure), str(failure)
    assert run_property("refusal", ReferenceBridge(), case) == {"named": True}


def test_an_error_of_the_suite_is_not_a_verdict_on_the_bridge(pytester: pytest.Pytester) -> None:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    results = pytester.path / "results.json"
    run = pytester.runpytest_subprocess(
        "-p", "break_the_oracle", "--pyargs", "conformance", "--bridge", "reference", "-k", "equivalence or interop",
        "--max-examples", "3", "--layouts", ONE_RANK, "--results-json", str(results), "-p", "no:cacheprovider",
        "--published-in-ten", "0",
        "-W", "ignore", "--counterexamples", str(pytester.path / "ce"))
    assert run.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = {r["test"].rsplit("::", 1)[-1]: r for r in json.loads(results.read_text())["results"]}
    for test in ("test_equivalence", "test_interop"):
        r = outcomes[test]
        assert r["verdict"] == "error" and "OSError: break_the_oracle" in r["why"], r
        assert "not a verdict on the bridge" in r["why"] and r["counterexample"] is None, r
    assert "break_the_oracle" in run.stdout.str(), "pytest shows the suite's traceback"
    assert not (pytester.path / "ce").exists(), "no counterexample blames the bridge"
    # Reported as it came: not shrunk (which would run examples past the shrinking budget).
    calls = (pytester.path / "oracle_calls.txt").read_text().count("called")
    assert calls == 2, f"the broken oracle ran {calls} times for 2 tests: an error of the suite was shrunk"


def test_routing_outside_ties_must_match_exactly_in_every_dtype() -> None:
    errors = [("embedding", 0.0), ("layer 0 attention", 1e-3), ("layer 0 router choice", 1 / 16),
              ("layer 0 router weights", 1e-3), ("layer 0 experts", 1e-3), ("final norm", 1e-3), ("output logits", 1e-3)]
    assert first_divergence(errors, rtol=0.1) == (
        "layer 0 router choice", "layer 0 router choice: 6.2% of tokens routed to other experts")
    assert first_divergence([e if "choice" not in e[0] else (e[0], 0.0) for e in errors], rtol=0.1) is None


def _constant_checkpoint(path: Path, seed: int) -> ErnieMoeConfig:
    """A user checkpoint with what real ones hold: a zero expert bias and unit norms."""
    cfg = ErnieMoeConfig.from_hf(dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, moe_num_experts=3, moe_k=2,
                                      moe_intermediate_size=8, moe_layer_start_index=1, tie_word_embeddings=False))
    random_checkpoint(cfg, path, seed=seed)
    tensors = load_file(str(path / "model.safetensors"))
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros_like(tensor)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones_like(tensor)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return cfg


def test_import_on_a_users_checkpoint_compares_with_its_values(megatron_runtime, tmp_path: Path) -> None:
    constant = tmp_path / "constant"
    cfg = _constant_checkpoint(constant, seed=3)
    user = Case(cfg, weights_seed=None, inputs=Inputs(1, 2, 0), checkpoint=str(constant))
    run_property("import", ReferenceBridge(), user)  # constant tensors that are the file's values pass
    # A bias left at its (zero) initial value is right only where the file's bias is zero too.
    run_property("import", ExpertBiasNotLoaded(), user)
    random_checkpoint(cfg, tmp_path / "random", seed=3)
    with pytest.raises(PropertyFailure) as failed:
        run_property("import", ExpertBiasNotLoaded(), Case(cfg, None, Inputs(1, 2, 0), checkpoint=str(tmp_path / "random")))
    assert failed.value.kind == "not loaded" and failed.value.facts["how"] == "differs from the checkpoint", failed.value
    assert failed.value.facts["tensor"].endswith("mlp.router.expert_bias"), failed.value.facts


def test_reference_refusal_errors_name_the_corrupted_tensor_or_field(megatron_runtime) -> None:
    bridge = ReferenceBridge()
    unnamed = []

    @settings(max_examples=60, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def refusal_names_the_corruption(data: st.DataObject) -> None:
        cfg = data.draw(configs(), label="config")
        case = Case(cfg, data.draw(seeds(), label="weights seed"), data.draw(inputs(), label="inputs"),
                    corruption=data.draw(corruptions(cfg), label="corruption"))
        try:
            observed = run_property("refusal", bridge, case)
        except SetAside:
            reject()
        if not observed["named"]:
            unnamed.append(str(case.corruption))

    refusal_names_the_corruption()
    assert not unnamed, f"the reference bridge's refusal did not name: {unnamed}"


@pytest.mark.whole_runs
def test_a_bridge_whose_load_always_raises_fails_every_property(tmp_path: Path) -> None:
    """What certify says of it: five failures, each the bridge's own error with its traceback, and a
    counterexample shrunk within the bound on shrinking (so this takes seconds per property). One
    rank: a failing example of any layout is shrunk towards one rank anyway."""
    run = cli("certify", "--bridge", "conformance.mutants:LoadAlwaysRaises", "--out", "cert", "--max-examples", "10",
              "--published-in-ten", "0", "--layouts", ONE_RANK, "--jobs", "1", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    c = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    for prop, entry in c["properties"].items():
        failure = entry["failure"]
        assert entry["verdict"] == "fail" and failure["kind"] == "bridge raised", (prop, entry)
        assert failure["facts"] == {"call": "load", "exception": "ModuleNotFoundError"}, (prop, failure["facts"])
        assert 'File "conformance/mutants/refusal.py"' in failure["traceback"], failure["traceback"]
        assert entry["shrink_calls"] <= c["profile"]["max_shrinks"], entry
        assert (tmp_path / "cert" / failure["counterexample"]["file"]).is_file(), failure["counterexample"]


def _ill_conditioned_case(rms_norm_eps: float) -> Case:
    """A drawn example (benchmarks/calibrate_fp32.py, seed 1) with hidden size 4 and eps 1e-6: its
    norms amplify fp32 rounding, so that the fp32 oracle differs from float64 by 1.2e-5, and the
    reference bridge at tp2-pp2 differed from the fp32 oracle by 1.4e-4 (a right bridge, other
    rounding)."""
    cfg = ErnieMoeConfig.from_hf(dict(
        vocab_size=54, hidden_size=4, intermediate_size=4, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, moe_num_experts=6, moe_k=6, moe_intermediate_size=20,
        moe_num_shared_experts=0, moe_layer_start_index=3, moe_layer_end_index=3, moe_layer_interval=2,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=rms_norm_eps, moe_norm_min=0.558041))
    return Case(cfg, weights_seed=98, inputs=Inputs(2, 8, 1024))


def test_ill_conditioned_fp32_examples_are_set_aside(tmp_path: Path) -> None:
    """The conditioning rule looks at the oracle alone (float64 against fp32 on the same weights),
    so a bridge cannot move it; it sets aside the example whose own rounding error is near the
    tolerance and keeps the same structure with a sane eps, and it applies to fp32 only."""
    from conformance.numerics import FP32_CONDITION_SHARE, FP32_RTOL, tolerance
    from conformance.numerics import ROUTING_MARGIN
    from conformance.properties import IllConditioned, conditioning_error, oracle_trace, prepare_checkpoint
    from ernie_ref import ErnieMoeForCausalLM

    ill, sane = _ill_conditioned_case(1e-6), _ill_conditioned_case(1e-2)
    for case, name in ((ill, "ill"), (sane, "sane")):
        hf = prepare_checkpoint(case, tmp_path / name)
        oracle = ErnieMoeForCausalLM.from_pretrained(hf).float()
        ids = case.inputs.input_ids(case.config.vocab_size)
        condition = conditioning_error(oracle, ids, oracle(ids, trace=True), ROUTING_MARGIN)
        if case is ill:
            assert condition > FP32_CONDITION_SHARE * FP32_RTOL, condition
            with pytest.raises(IllConditioned, match="differs from float64 by"):
                oracle_trace(case, hf, tolerance("float32"), {})
            oracle_trace(case, hf, tolerance("bfloat16"), {})  # a bf16 model's tolerance includes its rounding
        else:
            assert condition < FP32_CONDITION_SHARE * FP32_RTOL, condition
            oracle_trace(case, hf, tolerance("float32"), {})
