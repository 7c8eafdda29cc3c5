#!/usr/bin/env bash
# GPU validation of the Triton kernel over fp8 KV caches (issue 16), from the repository root:
#
#     OUT=<dir> bash benchmarks/fp8/validate.sh
#
# 1. tests/test_fp8_kvcache.py on the GPU (its GPU-only tests included: every byte the kernel writes);
# 2. benchmarks/fp8/check_bytes.py: serving-sized calls, every format / granularity / layout, bytes against
#    tileattn.quant.quantize;
# 3. benchmarks/fp8/time_decode.py: decode step bf16 cache vs fp8 cache, and the write overhead (issue 16's bars).
# Each part runs under its own timeout (405 s in all) and its log goes to $OUT; a part that fails or times
# out is reported and the next one still runs. Exit status: the number of parts that failed.
set -u
OUT=${OUT:-/tmp/fp8_validate}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
failed=0

part() {  # part NAME SECONDS LOG COMMAND...: run under timeout, keep the log, show its tail
    local name=$1 seconds=$2 log=$3
    shift 3
    echo "== $name (timeout ${seconds}s)"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$seconds" "$@" > "$OUT/$log" 2>&1
    local status=$?
    tail -n 40 "$OUT/$log"
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "-- $name: TIMED OUT after $((SECONDS - start)) s (log: $OUT/$log)"
        failed=$((failed + 1))
    elif [ "$status" -eq 2 ] && [ "$log" = time_decode.log ]; then
        echo "-- $name: measured, but some rows MISSED their bar (see the table; $((SECONDS - start)) s)"
        failed=$((failed + 1))
    elif [ "$status" -ne 0 ]; then
        echo "-- $name: FAILED (exit $status, $((SECONDS - start)) s; log: $OUT/$log)"
        failed=$((failed + 1))
    else
        echo "-- $name: ok ($((SECONDS - start)) s)"
    fi
}

python -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton',
triton.__version__)" | tee "$OUT/environment.txt"

part "GPU tests: tests/test_fp8_kvcache.py" 125 tests.log \
    python -m pytest -q -n 8 -p no:cacheprovider tests/test_fp8_kvcache.py
part "bytes written vs quant.quantize" 40 check_bytes.log python benchmarks/fp8/check_bytes.py
part "decode timing: bf16 vs fp8 cache, write overhead" 240 time_decode.log \
    python benchmarks/fp8/time_decode.py --out "$OUT"

echo "== $failed part(s) failed; results in $OUT (fp8_decode.md, fp8_decode.json, *.log)"
exit "$failed"
