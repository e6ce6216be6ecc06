"""The benchmarks run: each with an example or two, so that a change of the suite's API cannot
leave them broken (their tables are in the README). Nothing here measures speed. Small configs
alone where a benchmark draws them: one published structure's example costs seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.whole_runs
@pytest.mark.parametrize("script, args, header", [
    ("bench_properties.py", ["--examples", "2", "--structure", "small"],
     "| property | examples | seconds | examples/min | peak RSS MB |"),
    ("bench_layouts.py", ["--examples", "1", "--layouts", "tp1-pp1-ep1-vpp1,tp2-pp1-ep1-vpp1"],
     "| layout | ranks | pool ranks | property | examples | seconds | examples/min |"),
    ("bench_verdicts.py", ["--bridges", "conformance.mutants:LoadAlwaysRaises", "--max-examples", "2", "--published-in-ten", "0"],
     "| bridge | all verdicts s | max shrinks |"),
    ("bench_findings.py", ["--bridges", "conformance.mutants:LoadAlwaysRaises", "--max-examples", "2", "--jobs", "1",
                           "--published-in-ten", "0",
                           "--layouts", "tp1-pp1-ep1-vpp1"],
     "| bridge | seconds to all findings | findings | planted found |"),
    ("bench_real_scale.py", ["--moe-intermediate", "4,8", "--vocab", "256", "--layers", "2", "--max-examples", "1"],
     "| moe_intermediate | parameters | on disk GiB | write s |"),
])
def test_benchmark_runs(tmp_path: Path, script: str, args: list[str], header: str) -> None:
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert header in run.stdout, run.stdout
