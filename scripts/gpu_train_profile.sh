#!/usr/bin/env bash
# Issue 35 on one GPU: where the training step's time goes (scripts/profile_train.py: device time per category,
# host gap, MFU, XLA temporaries, peak memory) for the 125M and the 1.3B at B=8, S=2048 with the Triton backend.
#   bash scripts/gpu_train_profile.sh [SET] [OUT_DIR]      (OUT_DIR default: $OUT)
# SET: loss        plain and fused loss, no remat, both sizes (4 runs; the default)
#      remat       the fused loss with --remat dots and --remat block, both sizes (4 runs)
#      throughput  scripts/train_throughput.py, both sizes, plain and fused loss, no remat (one process)
#      peer        the PyTorch xLSTMLarge (scripts/train_peer_torch.py) and ours (train_throughput.py, fused loss),
#                  each size in its own process, side by side (issue 35's table)
# Every run is its own process (its own peak memory) under a timeout, so one failure does not stop the rest; no
# run starts once BUDGET_S seconds (default 330) have passed. Each run writes NAME.json and NAME.log; summary.txt
# gets one line per run. BATCH (default 8) and BACKEND (default triton_limit_chunk) change the step; EXTRA adds
# options to every profile run (EXTRA=--tiny BACKEND=native_chunkwise: a dry run of the script on a CPU).
set -uo pipefail
set_name=${1:-loss}
out=${2:-${OUT:?give OUT_DIR or set OUT}}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=${BUDGET_S:-330}
batch=${BATCH:-8}
backend=${BACKEND:-triton_limit_chunk}
start=$SECONDS

run() {  # NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 30 ]; then
    echo "$name: not started, the budget of ${budget} s is spent" | tee -a "$out/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local head
  head=$(grep -m1 -E "tokens/s" "$out/$name.log")
  echo "$name: exit $rc after $((SECONDS - start)) s: ${head:-no result (see $name.log)}" | tee -a "$out/summary.txt"
}

profile() {  # SIZE LOSS REMAT TIMEOUT_S
  run "profile-$1-$2-$3" "$4" python3 scripts/profile_train.py --size "$1" --batch "$batch" --backend "$backend" \
    --loss "$2" --remat "$3" --json "$out/profile-$1-$2-$3.json" ${EXTRA:-}
}

case "$set_name" in
  loss)
    profile 125m plain none 110
    profile 125m fused none 110
    profile 1.3b plain none 160
    profile 1.3b fused none 160 ;;
  remat)
    profile 125m fused dots 110
    profile 1.3b fused dots 160
    profile 125m fused block 110
    profile 1.3b fused block 160 ;;
  throughput)
    run throughput 320 python3 scripts/train_throughput.py --sizes 125m 1.3b --backends "$backend" --batch "$batch" \
      --loss plain fused --json "$out/throughput.json" ;;
  peer)
    for size in 125m 1.3b; do
      run "peer-$size" 150 python3 scripts/train_peer_torch.py --size "$size" --batch "$batch" --json "$out/peer-$size.json"
      run "ours-$size" 150 python3 scripts/train_throughput.py --sizes "$size" --backends "$backend" --batch "$batch" \
        --loss fused --json "$out/ours-$size.json"
    done ;;
  *)
    echo "unknown set $set_name: loss, remat, throughput or peer" >&2
    exit 2 ;;
esac
echo "done in $((SECONDS - start)) s; results in $out"
