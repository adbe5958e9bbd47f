#!/usr/bin/env bash
# Weight-only int8 / fp8 decoding on one GPU (issue 34, item 4), each piece in its own process with a time limit;
# logs and JSON go to OUT (default $OUT, else ./quant-check). At most 9 minutes (the limits), about 5 expected.
#   bash scripts/gpu_quant_check.sh [OUT]
# 1. the tests of the quantized matmul and model on the GPU, the GPU-marked one included (the kernel at the 7B's
#    decode shapes against float64 and XLA);
# 2. scripts/quant_gemv_bench.py: each 7B decode projection at M = 1 and 16, bf16 XLA against int8 / fp8 through
#    the kernel and through XLA (us and weight GB/s per matmul); SWEEP=1 adds a sweep of the kernel's launch
#    parameters (up to 9 more minutes: run it on its own);
# 3. scripts/decode_bench.py: the Generator loop (128-token prompts, 128 new tokens) of the random-weight 7B at
#    batch 1 and 16 with bf16, int8 and fp8 weights (one process, one model).
set -uo pipefail
out=${1:-${OUT:-quant-check}}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
status=0
timeout 120 python3 -m pytest -q tests/kernels/test_quantized_matmul.py tests/model/test_quantize_xlstm_large.py \
  2>&1 | tee "$out/gpu_tests.log" || status=1
sweep=() limit=180
if [ "${SWEEP:-0}" = 1 ]; then sweep=(--sweep) limit=540; fi
timeout $limit python3 scripts/quant_gemv_bench.py --json "$out/gemv.json" "${sweep[@]}" 2>&1 \
  | tee "$out/gemv.log" || status=1
timeout 240 python3 scripts/decode_bench.py --parts generate --weights bf16 int8 fp8 --json "$out/decode.json" \
  2>&1 | tee "$out/decode.log" || status=1
exit $status
