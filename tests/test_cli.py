"""certify, replay and bridges end to end, as a user runs them; localisation; counterexample files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.certificate import validate
from conformance.counterexample import ENV_DIR, Counterexample
from conformance.cases import Case, Inputs
from conformance.properties import PropertyFailure, run_property
from ernie_ref.megatron import ReferenceBridge
from ernie_ref import ErnieMoeConfig, random_checkpoint
from ernie_ref.published import PUBLISHED_STRUCTURES

HERE = Path(__file__).parent
# The machinery under test, not the drawn space: small configs alone (the tox command certifies the
# reference bridge on the published structures too).
SMALL = ["--max-examples", "10", "--jobs", "1", "--published-in-ten", "0"]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout_s: int = 600) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "conformance", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.whole_runs
def test_certify_reference_conforms(tmp_path: Path) -> None:
    run = cli("certify", "--out", "cert", *SMALL, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[7/7]" in run.stdout and "CONFORMS" in run.stdout, run.stdout
    certificate = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    validate(certificate)
    assert certificate["conforms"] and certificate["bridge"]["name"] == "reference"
    assert {p: e["verdict"] for p, e in certificate["properties"].items()} == dict.fromkeys(certificate["properties"], "pass")
    assert all(e["examples"] >= 10 for e in certificate["properties"].values())
    assert certificate["refusals"] == {} and certificate["deviations"] == [], (certificate["refusals"], certificate["deviations"])  # it refuses nothing transformers loads
    assert {s: e["verdict"] for s, e in certificate["published"].items()} == {
        "ERNIE-4.5-21B-A3B": "supported", "ERNIE-4.5-300B-A47B": "supported"}
    assert sum(certificate["tested"]["dtypes"].values()) == certificate["tested"]["examples"] >= 50
    named = certificate["properties"]["refusal"]["errors_naming_the_corruption"]
    assert named["unnamed"] == 0 and named["named"] == certificate["properties"]["refusal"]["examples"], named
    assert "**CONFORMS**" in (tmp_path / "cert" / "certificate.md").read_text()
    assert_no_absolute_paths(tmp_path / "cert", tmp_path)


def assert_no_absolute_paths(cert: Path, root: Path) -> None:
    """certificate.json, certificate.md and counterexample files name no path of this machine."""
    files = [cert / "certificate.json", cert / "certificate.md", *sorted((cert / "counterexamples").glob("*.json"))]
    for f in files:
        text = f.read_text()
        assert str(root) not in text and str(root.resolve()) not in text and "/tmp/" not in text, (
            f"{f.name} names a path of this machine: "
            f"{[line for line in text.splitlines() if str(root.resolve()) in line or '/tmp/' in line][:3]}")


@pytest.mark.whole_runs
def test_no_arguments_certifies_the_reference_bridge(tmp_path: Path) -> None:
    """The README's first line, and CI's one run of the suite on the reference bridge with the
    published structures' share of draws (see tox.ini)."""
    # No arguments at all: the reference bridge, ci profile, into ./certificate. With the published
    # structures' share of draws this takes over 10 minutes on 2 busy cores.
    run = cli(cwd=tmp_path, timeout_s=2400)
    assert run.returncode == 0, run.stdout + run.stderr
    certificate = json.loads((tmp_path / "certificate" / "certificate.json").read_text())
    assert certificate["bridge"]["spec"] == "reference" and certificate["conforms"], certificate["headline"]
    for prop, entry in certificate["properties"].items():
        published = sum(entry["structures"].values())
        assert published * 10 >= entry["examples"], f"{prop}: {entry['structures']} of {entry['examples']} examples"
    assert set(certificate["tested"]["structures"]) == set(PUBLISHED_STRUCTURES), certificate["tested"]["structures"]
    assert certificate["tested"]["long_inputs"] > 0, certificate["tested"]


@pytest.mark.whole_runs
def test_an_interrupted_certification_resumes_where_it_stopped(tmp_path: Path) -> None:
    """A certify killed after its first test resumes with --resume: the finished test is kept, the
    others run, and the certificate covers all of them and names both runs. A resume with other
    options is refused, naming the option."""
    command = [sys.executable, "-m", "conformance", "certify", "--out", "cert", *SMALL]
    environ = {**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}"}
    first = subprocess.Popen(command, cwd=tmp_path, env=environ, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    progress = tmp_path / "cert" / "progress.log"
    deadline = time.monotonic() + 600
    while not (progress.is_file() and progress.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, f"certify ended ({first.returncode}) or stalled"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # as a lost machine would: nothing runs at the end
    first.wait()
    partial = json.loads((tmp_path / "cert" / "results.partial.json").read_text())
    finished = [r["test"] for r in partial["results"]]
    assert 1 <= len(finished) < 7 and not (tmp_path / "cert" / "certificate.json").exists(), finished

    refused = cli("certify", "--out", "cert", "--resume", *SMALL[:1], "11", *SMALL[2:], cwd=tmp_path)
    assert refused.returncode == 2 and "max_examples: 10 there, 11 now" in refused.stderr, refused.stderr
    nothing = cli("certify", "--out", "elsewhere", "--resume", *SMALL, cwd=tmp_path)
    assert nothing.returncode == 2 and "run.json is missing" in nothing.stderr, nothing.stderr

    run = cli("certify", "--out", "cert", "--resume", *SMALL, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"resuming run 2 in {tmp_path / 'cert'}: {len(finished)} finished tests kept" in run.stdout, run.stdout
    certificate = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    validate(certificate)
    assert certificate["conforms"], certificate["headline"]
    assert all(e["verdict"] == "pass" and e["examples"] >= 10 for e in certificate["properties"].values()), \
        certificate["properties"]
    runs = certificate["runs"]
    assert [len(r["tests"]) for r in runs] == [len(finished), 7 - len(finished)], runs
    assert sorted(runs[0]["tests"] + runs[1]["tests"]) == sorted(
        [*(f"test_{p}" for p in certificate["properties"]),
         *(f"test_published_structure_is_supported[{s}]" for s in certificate["published"])]), runs
    assert "| runs | 2 (an interrupted run resumed" in (tmp_path / "cert" / "certificate.md").read_text()
    assert not (tmp_path / "cert" / "results.partial.json").exists()


@pytest.mark.whole_runs
def test_certify_broken_bridge_fails_and_replay_reproduces(tmp_path: Path) -> None:
    run = cli("certify", "--bridge", "conformance.mutants:ExpertBiasWeighsExperts", "--out", "cert", *SMALL, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    certificate = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    validate(certificate)
    assert not certificate["conforms"]
    failure = certificate["properties"]["equivalence"]["failure"]
    assert certificate["properties"]["equivalence"]["verdict"] == "fail"
    assert "router weights" in failure["message"], failure["message"]
    assert (tmp_path / "cert" / failure["plot"]).is_file()
    assert f"![error by stage]({failure['plot']})" in (tmp_path / "cert" / "certificate.md").read_text()
    assert_no_absolute_paths(tmp_path / "cert", tmp_path)
    saved = tmp_path / "cert" / failure["counterexample"]["file"]
    assert failure["counterexample"]["replay"] == f"ernie-conformance replay {failure['counterexample']['file']}"
    replay = cli("replay", failure["counterexample"]["file"], cwd=tmp_path / "cert")
    assert replay.returncode == 1, replay.stdout + replay.stderr
    first_line = Counterexample.load(saved).message.splitlines()[0].removeprefix("[equivalence] ")
    assert f"STILL FAILS: {first_line}" in replay.stdout, replay.stdout
    # The same counterexample against the reference bridge: passes, exit 0.
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**json.loads(saved.read_text()), "bridge": "reference"}))
    replay = cli("replay", str(fixed), cwd=tmp_path)
    assert replay.returncode == 0 and "PASSES now" in replay.stdout, replay.stdout + replay.stderr


@pytest.mark.whole_runs
def test_certify_on_a_users_sharded_checkpoint(tmp_path: Path) -> None:
    cfg = ErnieMoeConfig.from_hf(dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
        tie_word_embeddings=False))
    random_checkpoint(cfg, tmp_path / "ckpt", seed=1, max_shard_bytes=20_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    run = cli("certify", "--checkpoint", str(tmp_path / "ckpt"), "--out", "cert", *SMALL, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    certificate = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    assert certificate["checkpoint"] == "../ckpt" and certificate["conforms"], certificate["checkpoint"]
    assert set(certificate["tested"]["dtypes"]) == {"float32"} and certificate["requested"]["dtypes"] == ["float32"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir())[0] == "config.json", "the checkpoint is untouched"


@pytest.mark.whole_runs
def test_certify_on_a_checkpoint_the_bridge_gets_wrong(tmp_path: Path) -> None:
    cfg = ErnieMoeConfig.from_hf(dict(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, moe_num_experts=3, moe_k=1, moe_intermediate_size=8, tie_word_embeddings=True))
    random_checkpoint(cfg, tmp_path / "ckpt", seed=2)
    run = cli("certify", "--checkpoint", str(tmp_path / "ckpt"), "--bridge", "conformance.mutants:GateUpSwappedOnExport",
              "--out", "cert", *SMALL, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    certificate = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    failure = certificate["properties"]["round_trip"]["failure"]
    assert failure["counterexample"]["checkpoint"] == "../ckpt", failure["counterexample"]
    assert failure["checkpoint_diff"]["value"], failure
    assert_no_absolute_paths(tmp_path / "cert", tmp_path)
    # The committed certificate replays from anywhere: move it, with the checkpoint beside it.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "cert").rename(moved / "cert")
    (tmp_path / "ckpt").rename(moved / "ckpt")
    replay = cli("replay", str(moved / "cert" / failure["counterexample"]["file"]), cwd=tmp_path)
    assert replay.returncode == 1 and "STILL FAILS" in replay.stdout, replay.stdout + replay.stderr


def test_bridges_lists_the_reference_bridge(tmp_path: Path) -> None:
    run = cli("bridges", cwd=tmp_path)
    assert run.returncode == 0
    line = next(line for line in run.stdout.splitlines() if line.startswith("reference"))
    assert "yes" in line and "ernie_ref.megatron:ReferenceBridge" in line, run.stdout


def test_plain_pytest_failure_saves_a_counterexample_named_in_the_message(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester._monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=":")
    pytester._monkeypatch.setenv(ENV_DIR, str(tmp_path / "ce"))
    db = tmp_path / "db"
    result = pytester.runpytest_subprocess(
        "--pyargs", "conformance", "--bridge", "conformance.mutants:GateUpSwappedOnExport", "-k", "round_trip",
        "--hypothesis-profile=ernie-dev", "--hypothesis-db", str(db), "--published-in-ten", "0", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    [saved] = list((tmp_path / "ce").iterdir())
    result.stdout.fnmatch_lines([f"*reproduce with: ernie-conformance replay {saved}*"])
    example = Counterexample.load(saved)
    assert example.property == "round_trip" and example.evidence["checkpoint_diff"]["value"]
    assert any(db.rglob("*")), "the failing example went into the Hypothesis database"


class NormScaledAtOneLayer(ReferenceBridge):
    """Localisation: a norm weight of one known layer loaded scaled by 2 (`layer`, `norm` set by tests)."""

    name = "norm-scaled-at-one-layer"
    layer = 1
    norm = "input_layernorm"  # or "pre_mlp_layernorm"

    def to_megatron(self, cfg, hf):
        mg = dict(super().to_megatron(cfg, hf))
        key = f"decoder.layers.{self.layer}.{self.norm}.weight"
        mg[key] = mg[key] * 2
        return mg


@pytest.mark.parametrize("layer, norm, expected", [
    (0, "input_layernorm", "layer 0 attention"),
    (1, "pre_mlp_layernorm", "layer 1 router"),  # the MoE norm feeds the router first
    (2, "input_layernorm", "layer 2 attention"),
    (2, "pre_mlp_layernorm", "layer 2 mlp"),
])
def test_localisation_names_the_broken_layer(megatron_runtime, layer: int, norm: str, expected: str) -> None:
    bridge = NormScaledAtOneLayer()
    bridge.layer, bridge.norm = layer, norm
    cfg = ErnieMoeConfig.from_hf(dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_layer_start_index=1,
        moe_layer_end_index=1, tie_word_embeddings=False))
    assert cfg.layer_types == ["dense", "moe", "dense"]
    with pytest.raises(PropertyFailure) as info:
        run_property("equivalence", bridge, Case(cfg, weights_seed=5, inputs=Inputs(2, 6, 0)))
    assert f"first divergence at {expected}" in info.value.detail, info.value.detail
    stages = [stage for stage, _ in info.value.evidence["stage_errors"]]
    assert stages[0] == "embedding" and stages[-1] == "output logits"
