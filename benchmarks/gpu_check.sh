#!/usr/bin/env bash
# The suite on a GPU: the reference bridge on cuda, fp32 and bf16 checkpoints, one rank; prints a
# table. Meant to finish within 10 minutes on one NVIDIA GPU.
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# Environment:
#   PYTHON          the interpreter of an environment with this project, torch (CUDA build) and
#                   megatron-core installed (default: python3)
#   TE_WHEEL_DIR    a directory of wheels to install Transformer Engine from, offline, when it is
#                   not installed (optional; without TE the reference bridge uses the local spec)
#   EXAMPLES        Hypothesis examples per property and dtype (default 30)
#   TIME_LIMIT_S    seconds allowed for each dtype's run (default 240)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-gpu-check}
EXAMPLES=${EXAMPLES:-30}
TIME_LIMIT_S=${TIME_LIMIT_S:-240}
mkdir -p "$OUT"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | sed 's/^/gpu: /' || echo "gpu: nvidia-smi not found"
if [ -n "${TE_WHEEL_DIR:-}" ] && ! "$PYTHON" -c "import transformer_engine.pytorch" 2>/dev/null; then
  "$PYTHON" -m pip install --no-index --find-links "$TE_WHEEL_DIR" transformer_engine transformer_engine_torch \
    > "$OUT/te-install.log" 2>&1 || echo "Transformer Engine: install from $TE_WHEEL_DIR failed (see $OUT/te-install.log)"
fi
"$PYTHON" -W ignore - <<'EOF'
import torch
from ernie_ref.megatron import ReferenceBridge
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
spec = "Transformer Engine" if ReferenceBridge().transformer_engine else "local (Transformer Engine not usable here)"
print(f"reference bridge layer spec: {spec}")
EOF

for dtype in fp32 bf16; do
  start=$(date +%s)
  set +e
  timeout "$TIME_LIMIT_S" "$PYTHON" -m pytest --pyargs conformance --bridge reference --device cuda --dtype "$dtype" \
    --layouts tp1-pp1-ep1-vpp1 --max-examples "$EXAMPLES" --results-json "$OUT/results-$dtype.json" \
    --counterexamples "$OUT/counterexamples" -p no:cacheprovider -q -W ignore > "$OUT/pytest-$dtype.log" 2>&1
  echo $? > "$OUT/exit-$dtype"
  set -e
  echo $(( $(date +%s) - start )) > "$OUT/seconds-$dtype"
done

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n| dtype | property | outcome | examples | seconds |")
print("|---|---|---|---:|---:|")
for dtype in ("fp32", "bf16"):
    results = out / f"results-{dtype}.json"
    if not results.is_file():
        code = (out / f"exit-{dtype}").read_text().strip()
        print(f"| {dtype} | (all) | did not run: exit {code}{' (time limit)' if code == '124' else ''}, see pytest-{dtype}.log | | |")
        continue
    for r in json.loads(results.read_text())["results"]:
        prop = r["test"].rsplit("test_", 1)[-1]
        print(f"| {dtype} | {prop} | {r['outcome']} | {r.get('examples', 0)} | {r.get('duration_s', 0):.1f} |")
for dtype in ("fp32", "bf16"):
    print(f"{dtype}: exit {(out / f'exit-{dtype}').read_text().strip()}, {(out / f'seconds-{dtype}').read_text().strip()} s")
EOF
