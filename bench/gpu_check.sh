#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (the device tool runs it from the repo root):
# versions, then the CUDA tests of the decode path (CUDA-graph capture included), then
# bench/gpu.py under a time budget. Everything it writes lands in $OUT:
#   versions.txt, tests.log, gpu.md (the table to copy into bench/RESULTS.md), gpu.log.
# About 8 minutes at most: tests <= 120 s, gpu.py <= 420 s (it skips rows past --budget-s 300).
#   device run:  bash bench/gpu_check.sh            (with $OUT set by the tool)
#   anywhere:    OUT=/tmp/x bash bench/gpu_check.sh --small   (CPU, tiny config, seconds)
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BLIP2_TESTS_ENGINE_ONLY=1
"$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/versions.txt"
timeout 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/integration/test_stepgraphs.py tests/integration/test_greedy.py 2>&1 | tee "$OUT/tests.log"
timeout 420 "$PY" bench/gpu.py --budget-s 300 --out "$OUT/gpu.md" "$@" 2>&1 | tee "$OUT/gpu.log"
