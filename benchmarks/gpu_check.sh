#!/usr/bin/env bash
# The suite on a GPU: the reference bridge on cuda, fp32 and bf16 checkpoints, one rank; prints a
# table; then equivalence and round trip at the real ERNIE-4.5-21B-A3B widths in bf16 with
# 4096-token inputs (benchmarks/real_widths.py). Meant to finish within 12 minutes on one NVIDIA GPU.
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
#   LAYERS          layers of the real-width 21B-A3B run (benchmarks/real_widths.py; default 4)
#   SEQ_LEN         its input length (default 4096)
#   REAL_LIMIT_S    seconds allowed for it (default 240)
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

set +e
timeout "${REAL_LIMIT_S:-240}" "$PYTHON" benchmarks/real_widths.py --device cuda --layers "${LAYERS:-4}" \
  --seq-len "${SEQ_LEN:-4096}" > "$OUT/real-widths.log" 2>&1
echo "real widths: exit $?"
set -e
cat "$OUT/real-widths.log"
