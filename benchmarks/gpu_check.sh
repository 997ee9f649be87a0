#!/usr/bin/env bash
# rayscale's GPU checks in one call of the device tool (a lent GPU machine: no Ray there, no registry).
#
# Here first:   .venv/bin/python -m benchmarks.gpu_wheels      # .whl/: Ray and what that machine lacks (~49 MiB)
# Then:         the device tool's run, carry [".whl"], timeout_s 540, command: bash benchmarks/gpu_check.sh
# Compiled:     the same call with command: bash benchmarks/gpu_check.sh compiled
#
# 1. installs the carried wheels beside the machine's own PyTorch (its Python 3.12, into /tmp/site);
# 2. the CUDA tests: tests/test_gpu.py (page-locked batches, no host sync in a step, bf16) and fp16's GradScaler;
# 3. benchmarks.gpu_mfu at full size: MFU and rayscale / raw PyTorch (issue 7's GPU targets).
# With the argument `compiled`, instead of 2 and 3: benchmarks.gpu_mfu --compile, the GPT benchmark in bf16 with
# train.compile (inductor) against the raw eager loop (issue 30's targets: MFU >= 55%, >= 1.0x raw), its own call
# because compiling the 440M model adds minutes; the JSON is gpu_mfu.compiled.json.
# The log and gpu_mfu.json go to $OUT (what the device tool brings back); the table is printed last.
# Inner limits (120 s of tests, 360 s of gpu_mfu, whose full run is estimated at ~2-3 min) stay inside the 540 s of
# the call, so a hang ends here with the log in $OUT instead of the whole call being killed.
set -uo pipefail
MODE=${1:-eager}
case "$MODE" in eager|compiled) ;; *) echo "gpu_check: expected no argument or 'compiled', got '$MODE'" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: no .whl/*.whl: run python -m benchmarks.gpu_wheels here first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check: installing .whl/ failed" >&2; exit 3; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  status=0
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  df -h /tmp | tail -1
  python3 -c "import sys, torch, ray; print('python', sys.version.split()[0], 'torch', torch.__version__,
    'cuda', torch.version.cuda, 'ray', ray.__version__,
    'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  if [ "$MODE" = compiled ]; then
    echo "== benchmarks.gpu_mfu --compile"
    timeout 480 python3 -m benchmarks.gpu_mfu --compile --results-dir "$OUT" || status=1
    exit $status
  fi
  echo "== CUDA tests"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    "tests/test_step.py::test_fp16_gradscaler_on_gpu" || status=1
  echo "== benchmarks.gpu_mfu"
  timeout 360 python3 -m benchmarks.gpu_mfu --results-dir "$OUT" || status=1
  exit $status
} 2>&1 | tee "$OUT/gpu_check$([ "$MODE" = compiled ] && echo .compiled).log"
exit "${PIPESTATUS[0]}"
