#!/usr/bin/env bash
# The Hopper prefill module (tileattn/kernels/hopper.py) on an H100 / H200, in one command from the repo root:
#   OUT=<output folder> bash benchmarks/hopper/validate_module.sh
# versions and whether the Hopper kernel applies here, tests/test_hopper.py (~93 GPU cases, 8 workers), then the
# TFLOP/s table of benchmarks/hopper/time_module.py (markdown + json into $OUT). Estimated under 300 s in all.
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/hopper-module}
mkdir -p "$OUT"
echo "== versions"
git log --oneline -1 2>/dev/null; git status --short 2>/dev/null | head -10
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
python - <<'PY'
import torch
from tileattn.kernels.hopper import GLUON_MISSING, hopper_unsupported_reason
x = torch.empty(1, 1, 2048, 128, device="cuda", dtype=torch.bfloat16)
print("gluon import:", GLUON_MISSING or "ok", "| Hopper kernel here:", hopper_unsupported_reason(x, x, x, window=(-1, -1)) or "applies")
PY
echo "== tests (timeout 240 s)"
start=$SECONDS
timeout 240 python -m pytest -q --maxfail=15 -n 8 tests/test_hopper.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? in $((SECONDS - start)) s (124 = timed out)"
tail -30 "$OUT/tests.log"
echo "== timing (timeout 200 s)"
start=$SECONDS
timeout 200 python -u benchmarks/hopper/time_module.py --out "$OUT" > "$OUT/timing.log" 2>&1
echo "timing rc=$? in $((SECONDS - start)) s"
cat "$OUT/timing.log"
