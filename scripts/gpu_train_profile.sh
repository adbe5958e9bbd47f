#!/usr/bin/env bash
# Issue 35 on one GPU: where the training step's time goes (scripts/profile_train.py: device time per category,
# host gap, MFU, XLA temporaries, peak memory) for the 125M and the 1.3B at B=8, S=2048 with the Triton backend.
#   bash scripts/gpu_train_profile.sh [SET] [OUT_DIR]      (OUT_DIR default: $OUT)
# SET: loss        plain and fused loss, no remat, both sizes (4 runs; the default)
#      remat       the fused loss with --remat dots and --remat block, both sizes (4 runs)
#      throughput  scripts/train_throughput.py, plain and fused loss, no remat (one process per size)
#      peer        the PyTorch xLSTMLarge (scripts/train_peer_torch.py) and ours (profile_train.py, fused loss: the
#                  pipelined step and its device time by category), each size in its own process, side by side
#                  (issue 35's table)
#      ab          profile_train.py (fused loss) for the tree in BASE_DIR (e.g. `mkdir -p .ab_base && git archive
#                  REV xlstm_jax scripts | tar -x -C .ab_base`, carried; each tree runs its own script) and the
#                  working tree, alternating, each size and tree in its own process: a before/after table within one
#                  machine, with both trees' device time by category (SIZES: default 1.3b 125m; TREES: default base new)
#                  and the working tree's compiled HLO (ab-new-SIZE.hlo.xz: the fusions behind the kernel names)
#      batches     profile_train.py (fused loss) at larger batches, each its own process: BATCHES (SIZE:ROWS, default
#                  125m:16 125m:32 1.3b:12 1.3b:16; the 1.3B at B=16 wants an H200's memory): issue 35 reports tokens/s
#                  and MFU at the largest batch that fits (the optimizer's and the host's fixed cost per step spread
#                  over more tokens)
#      flags       profile_train.py (fused loss) for the working tree with XLA_FLAGS=$FLAGS (e.g.
#                  --xla_gpu_enable_triton_gemm=false), SIZES (default: 1.3b 125m) each in its own process
#      queue       the queued measurements in one call, in the order of QUEUE (default "ab batches peer") while
#                  BUDGET_S lasts (each set in OUT_DIR/SET): ab (SIZES 125m 1.3b: BASE_DIR against the working tree,
#                  which needs BASE_DIR), batches (BATCHES: default 125m:32 1.3b:12), peer. On an H200, issue 35's
#                  table: QUEUE="peer batches" BATCHES="125m:32 1.3b:16"
#      curve       `xlstm-jax train` for 200 steps on the Python standard library's bytes (vocabulary 50304, the
#                  125M at B=8, S=2048, fused loss), for BASE_DIR and the working tree: the loss curves
#                  (metrics.jsonl) of the same seed and data, copied to OUT_DIR as curve-base.jsonl, curve-new.jsonl
#                  (TREES=new: the working tree's only)
# Every run is its own process (its own peak memory) under a timeout, so one failure does not stop the rest; no
# run starts once BUDGET_S seconds (default 330) have passed. Each run writes NAME.json and NAME.log; summary.txt
# gets one line per run. BATCH (default 8) and BACKEND (default triton_limit_chunk) change the step; EXTRA adds
# options to every profile_train run (EXTRA=--tiny BACKEND=native_chunkwise: a dry run of the script on a CPU).
set -uo pipefail
set_name=${1:-loss}
out=${2:-${OUT:?give OUT_DIR or set OUT}}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
  throughput)  # each size in its own process (one process for both ran out of memory at the 1.3B on an H100)
    for size in 125m 1.3b; do
      run "throughput-$size" 200 python3 scripts/train_throughput.py --sizes "$size" --backends "$backend" \
        --batch "$batch" --loss plain fused --json "$out/throughput-$size.json"
    done ;;
  peer)
    for size in 125m 1.3b; do
      run "peer-$size" 150 python3 scripts/train_peer_torch.py --size "$size" --batch "$batch" --json "$out/peer-$size.json"
      run "ours-$size" 200 python3 scripts/profile_train.py --size "$size" --batch "$batch" --backend "$backend" \
        --loss fused --remat none --json "$out/ours-$size.json"
    done ;;
  ab)
    base=$(cd "${BASE_DIR:?BASE_DIR with an older tree (xlstm_jax and scripts)}" && pwd)
    for size in ${SIZES:-1.3b 125m}; do
      for tree in ${TREES:-base new}; do
        path=$PWD hlo=(--hlo "$out/ab-new-$size.hlo"); [ "$tree" = base ] && path=$base hlo=()
        PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" run "ab-$tree-$size" 200 \
          python3 "$path/scripts/profile_train.py" --size "$size" --batch "$batch" --backend "$backend" --loss fused \
          --remat none --json "$out/ab-$tree-$size.json" "${hlo[@]}" ${EXTRA:-}
        [ -f "$out/ab-new-$size.hlo" ] && xz -6 -f "$out/ab-new-$size.hlo"  # 12-22 MB of text, 0.5-0.7 MB packed
      done
    done ;;
  batches)
    for run in ${BATCHES:-125m:16 125m:32 1.3b:12 1.3b:16}; do
      size=${run%:*} rows=${run#*:}
      run "batch-$size-$rows" 200 python3 scripts/profile_train.py --size "$size" --batch "$rows" --backend "$backend" \
        --loss fused --remat none --json "$out/batch-$size-$rows.json" ${EXTRA:-}
    done ;;
  flags)
    for size in ${SIZES:-1.3b 125m}; do
      XLA_FLAGS="${FLAGS:?FLAGS: the XLA flags to try}" run "flags-$size" 200 python3 scripts/profile_train.py \
        --size "$size" --batch "$batch" --backend "$backend" --loss fused --remat none --json "$out/flags-$size.json" \
        ${EXTRA:-}
    done ;;
  curve)
    base=$(cd "${BASE_DIR:?BASE_DIR with an older xlstm_jax package}" && pwd)
    python3 -c "
import glob, sysconfig, numpy as np
files = sorted(glob.glob(sysconfig.get_paths()['stdlib'] + '/**/*.py', recursive=True))
np.save('/tmp/stdlib_bytes.npy', np.frombuffer(b''.join(open(f, 'rb').read() for f in files), np.uint8).astype(np.int32))"
    for tree in ${TREES:-base new}; do
      path=$PWD; [ "$tree" = base ] && path=$base
      rm -rf "/tmp/curve-$tree"  # this script's scratch run: a leftover would be refused as a run to resume
      PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" run "curve-$tree" 150 python3 -m xlstm_jax.cli train \
        --data /tmp/stdlib_bytes.npy --vocab-size 50304 --seq-len 2048 --batch-size "$batch" --embedding-dim 768 \
        --num-heads 4 --num-blocks 12 --steps 200 --log-every 10 --eval-every 50 --eval-batches 4 --loss fused \
        --backend "$backend" --output-dir "/tmp/curve-$tree" --no-progress --json
      cp "/tmp/curve-$tree/metrics.jsonl" "$out/curve-$tree.jsonl" 2>/dev/null
    done ;;
  queue)
    sub() {  # SET DIR [VAR=VALUE ...]: one set in OUT_DIR/DIR with what is left of the budget
      local set_run=$1 dir=$2 left=$((budget - (SECONDS - start)))
      shift 2
      if [ "$left" -lt 60 ]; then
        echo "$dir: not started, the budget of ${budget} s is spent" | tee -a "$out/summary.txt"
        return
      fi
      env BUDGET_S="$left" SIZES="${SIZES:-125m 1.3b}" "$@" bash "$0" "$set_run" "$out/$dir"
      cat "$out/$dir/summary.txt" >> "$out/summary.txt" 2>/dev/null
    }
    for set_run in ${QUEUE:-ab batches peer}; do
      case $set_run in
        batches) sub batches batches BATCHES="${BATCHES:-125m:32 1.3b:12}" ;;
        *) sub "$set_run" "$set_run" ;;
      esac
    done ;;
  *)
    echo "unknown set $set_name: loss, remat, throughput, peer, ab, batches, flags, queue or curve" >&2
    exit 2 ;;
esac
echo "done in $((SECONDS - start)) s; results in $out"
