#!/usr/bin/env bash
# The conformance suite on a GPU machine: torch and JAX on CUDA against the
# numpy reference (CPU). Expects torch and jax preinstalled (no TensorFlow,
# no network); installs nothing; finds the project through PYTHONPATH.
# Writes report.txt, report.json, stderr.txt and env.txt to $OUT (default:
# ./conformance-gpu-out). Exit status: the suite's (0 = every check passed).
# Usage, from anywhere:  OUT=/some/dir bash conformance/gpu_run.sh [extra args]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/conformance-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT:$ROOT/backends${PYTHONPATH:+:$PYTHONPATH}"
export SOPHIA_DEVICE=cuda
PY="${PYTHON:-python}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" - <<'PYEOF' 2>&1 || true
import torch, jax
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
print("jax", jax.__version__, jax.devices())
PYEOF
} > "$OUT/env.txt"

# 9 minutes at most, so that the 10-minute slot always gets a report back.
timeout 540 "$PY" -m conformance --backends torch,jax --device cuda \
  --json "$OUT/report.json" -v "$@" > "$OUT/report.txt" 2> "$OUT/stderr.txt"
status=$?
tail -n 5 "$OUT/report.txt"
echo "exit status $status; report in $OUT/report.txt"
exit $status
