#!/usr/bin/env bash
# One call on a GPU node: the CUDA tests, then benchmarks.training_stall and benchmarks.e2e_every10 with the model
# on the GPU.
#
#   E2E_ARGS="--rounds 8" benchmarks/gpu_node.sh OUT_DIR [training_stall options]
#
# Runs from the repository root with the node's own python3 and torch (no .venv: the node's torch has CUDA).
# Packages the node lacks can be installed into /tmp/site first (PYTHONPATH is extended, not replaced): the H200
# image of 2026-11 had everything but zstandard, whose cp312 manylinux wheel travelled with the call. Writes
# OUT_DIR/tests.log (the node and the tests), OUT_DIR/run.log, OUT_DIR/stall/training_stall.{json,md,png} and,
# unless E2E_ARGS=skip, OUT_DIR/e2e/e2e_every10.{json,md,png}. STALL_TIMEOUT and E2E_TIMEOUT bound each (seconds).
set -u
OUT=${1:?usage: benchmarks/gpu_node.sh OUT_DIR [training_stall options]}
shift
mkdir -p "$OUT/stall" "$OUT/e2e"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  nproc; free -g | head -2; df -h /tmp | tail -1
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_checkpointer_cuda.py; } > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
{ timeout "${STALL_TIMEOUT:-400}" python3 -m benchmarks.training_stall --device cuda --out "$OUT/stall" "$@"
  if [ "${E2E_ARGS:-}" != skip ]; then
    # shellcheck disable=SC2086  # E2E_ARGS is a list of options
    timeout "${E2E_TIMEOUT:-200}" python3 -m benchmarks.e2e_every10 --device cuda --out "$OUT/e2e" ${E2E_ARGS:-}
  fi; } 2>&1 | grep -v " - root - INFO - " > "$OUT/run.log"
grep -A12 "^| method | every" "$OUT/stall/training_stall.md"; grep -A4 "^| background_priority | overhead" "$OUT/e2e/e2e_every10.md"
grep -B2 -A3 "Traceback\|FAILED" "$OUT/run.log" | tail -30
