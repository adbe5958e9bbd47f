#!/usr/bin/env bash
# The GPU-machine checks, one step per call so each fits a bounded session; logs and results go to OUT_DIR.
#   bash scripts/gpu_checks.sh STEP OUT_DIR [PRESET ...]
# STEP: tests       the launch layer's and the decode step's tests, the GPU-marked tests (kernel parity at realistic
#                   shapes, extreme gates) and `xlstm-jax doctor`
#       bench       the issue shapes (16-head and 7B-head, 65536 tokens) for every backend and chunk size, with peers
#       presets     the four H100/H200 presets of docs/benchmarks.md (in-process; one subprocess per peer), or the
#                   ones named after OUT_DIR; results files grow case by case, and running the step again with the
#                   same OUT_DIR continues a cut sweep (--resume). PEERS (comma-separated) picks the peers
#       tune        scripts/tune_launch.py for both families at the 16-head shape; the winners go into a copy of
#                   launch_table.json in OUT_DIR (copy it back over xlstm_jax/kernels/triton/ and commit)
#       profile     scripts/profile_stages.py: each fw / bw stage of both families timed alone at the 16-head shape
#       xltiles     the same for xl-chunk tilings (chunk:tile_q:tile_kv[:inter_chunk_size]) next to limit L=64: is
#                   a larger tile or chunk than the default (64 x 64 tiles) faster? (issue 5)
#       xlblocks    sweeps of the xl launch parameters at both head shapes (xl L=128): the bw kernels' output column
#                   tiles and warps on bw.parallel, the forward's output tile and warps on fw.total
#       serve       issue 36: the serving engine's steps (scripts/profile_serve_step.py: decode, decode + a
#                   240-token chunk) and scripts/serve_bench.py with --prefill-chunk 240 at half load and saturation
#       limitknobs  issue 33: profile_stages.py sweeps (KNOBS, default limit.tma, limit.out_v_block and limit.warps:
#                   token tiles through host-made TMA descriptors, one output column block of 256 in place of two
#                   of 128, 8 warps; with descriptors, 256 columns and 8 warps the forward holds 182 registers and
#                   nothing spills offline: scripts/kernel_resources.py) at SHAPES (default both issue head shapes;
#                   8 points each, possibly more than one call), then the descriptor tests on the GPU (inside
#                   XLA's CUDA graphs too)
#       servegraphs the engine's steps (profile_serve_step.py) with XLA's defaults and with command buffers (CUDA
#                   graphs) forced for fusions, GEMMs and custom calls (jaxlib >= 0.10.1 marks jax-triton's FFI kernel
#                   call graph-compatible), each in its own process: is the step's wall time above its device time
#                   the host launching ~700-1000 kernels one by one?
#       throughput  scripts/train_throughput.py (125M xLSTM, S=2048) for the Triton backends and native_chunkwise
#       train       the training job on one GPU: the step on the plain path against --mesh data=1 (125M and 1.3B,
#                   two alternating rounds), a 60-step `xlstm-jax train --data` run on random tokens (tokens/s and
#                   MFU with the host data pipeline), and a mesh run equal to the plain one with the Triton backend
#       ab          both Triton families at the 16-head issue shape (fw and fw+bw, 30 runs), the package in BASE_DIR
#                   and the working tree alternating, two rounds each, every run in its own process: a before/after
#                   table within one machine. BASE_DIR holds an older xlstm_jax package, e.g.
#                   `mkdir -p .ab_base && git archive REV xlstm_jax | tar -x -C .ab_base` (name .ab_base in carry)
#       scaling     issue 22 on a several-GPU machine (NVLink multicast kept off): the multi-device tests on the
#                   GPUs (XLSTM_JAX_TEST_DEVICES=real; a test needing more devices than there are skips), the
#                   context-parallel mLSTM over 1..8 of the visible GPUs (scripts/context_parallel_scaling.py), then
#                   the training step's weak scaling with data, fsdp and tensor meshes of 1, 2, 4, 8 GPUs
#                   (scripts/train_throughput.py --batch-per-device; each GPU count in its own process that sees
#                   only those GPUs)
# Needs jax with CUDA, triton and jax-triton importable (without network, jax-triton from a wheel downloaded beforehand into .whl/: docs/benchmarks.md).
set -uo pipefail
step=${1:?step}
out=${2:?output folder}
shift 2
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
BACKENDS=${BACKENDS:-triton_limit_chunk,triton_xl_chunk,native_chunkwise}
# upstream's JAX limit-chunk backward is pathological (354 ms at the 7B heads) and its PyTorch xl-chunk aborts in
# the compiler: left out by default (name them in PEERS to include them)
PEERS=${PEERS:-cudnn_attention,mk_jax_xl_chunk,mk_jax_native,mk_torch_limit_chunk,mk_jax_native_step,mk_jax_triton_step}
case "$step" in
  tests)
    # the launch layer and the decode step at small shapes run on the GPU unmarked (they also run on CPU)
    python3 -m pytest -q tests/kernels/test_launch.py tests/op/test_mlstm_step.py 2>&1 | tee "$out/launch_tests.log"
    python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
    python3 -m xlstm_jax.cli doctor 2>&1 | tee "$out/doctor.log" ;;
  bench)
    python3 -m xlstm_jax.cli bench --shape 8,16,8192,128,256 --shape 8,8,8192,256,512 --chunk-sizes 64,128,256 \
      --backends native_chunkwise,triton_limit_chunk,triton_xl_chunk --reps 20 --out "$out/issue_shapes" 2>&1 \
      | tee "$out/bench.log" ;;
  presets)
    presets=("$@")
    [ ${#presets[@]} -eq 0 ] && presets=(tfla-const-tokens 7b head-dims decode)
    for preset in "${presets[@]}"; do
      python3 -m xlstm_jax.cli bench --preset "$preset" --backends "$BACKENDS" --peers "$PEERS" --timeout 120 \
        --reps 20 --resume --out "$out/$preset" 2>&1 | tee -a "$out/$preset.log"
    done ;;
  tune)
    cp xlstm_jax/kernels/triton/launch_table.json "$out/launch_table.json"
    python3 scripts/tune_launch.py --runs limit:64 xl:128 --out "$out/tune.json" --write-table \
      --table "$out/launch_table.json" 2>&1 | tee "$out/tune.log" ;;
  profile)
    python3 scripts/profile_stages.py --runs limit:64 xl:128 --out "$out/stages.json" 2>&1 | tee "$out/stages.log" ;;
  xltiles)
    python3 scripts/profile_stages.py --runs limit:64 xl:64 xl:128 xl:128:128:64 xl:128:64:128 xl:128:128:128 \
      xl:128:128:128:128 xl:256:128:128 --stages fw.total bw.parallel --out "$out/xltiles.json" 2>&1 \
      | tee "$out/xltiles.log" ;;
  xlblocks)
    sweep() { python3 scripts/profile_stages.py --runs xl:128 "$@" 2>&1 | tee -a "$out/xlblocks.log"; }
    sweep --shape 8,16,8192,128,256 --stages bw.parallel --out "$out/xlblocks_bw_dh256.json" \
      --sweep xl.dq_block=64,128 xl.dv_block=128,256 xl.bw_warps=4,8
    sweep --shape 8,8,8192,256,512 --stages bw.parallel --out "$out/xlblocks_bw_dh512.json" \
      --sweep xl.dq_block=128,256 xl.dk_block=128,256 xl.dv_block=128,256 xl.bw_warps=4,8
    sweep --shape 8,16,8192,128,256 --stages fw.total --out "$out/xlblocks_fw_dh256.json" \
      --sweep xl.out_block=128,256 xl.warps=4,8
    sweep --shape 8,8,8192,256,512 --stages fw.total --out "$out/xlblocks_fw_dh512.json" \
      --sweep xl.out_block=128,256 xl.warps=4,8 ;;
  limitknobs)
    # issue 33 items 2 and 3: the limit per-chunk kernels' TMA descriptor reads and the one-kernel backward, at both
    # issue head shapes (every stage point checked against the table's own configuration), then their gpu tests
    for shape in ${SHAPES:-8,16,8192,128,256 8,8,8192,256,512}; do
      python3 scripts/profile_stages.py --runs limit:64 --shape "$shape" --stages fw.total bw.parallel fwbw \
        --sweep ${KNOBS:-limit.tma=0,1 limit.out_v_block=128,256 limit.warps=4,8} \
        --out "$out/limitknobs_${shape//,/x}.json" 2>&1 | tee -a "$out/limitknobs.log"
    done
    python3 -m pytest -q tests/kernels/test_tma_reads.py tests/kernels/test_triton_limit_chunk.py -k "gpu" 2>&1 \
      | tee "$out/limitknobs_tests.log" ;;
  servegraphs)
    graphs="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,DYNAMIC_SLICE_FUSION"
    for name in defaults graphs graphs1; do
      case $name in
        defaults) flags="" ;;
        graphs) flags="$graphs" ;;
        graphs1) flags="$graphs --xla_gpu_graph_min_graph_size=1" ;;
      esac
      XLA_FLAGS="$flags" python3 scripts/profile_serve_step.py --calls 2 --reps 5 --variants decode,mixed:240 \
        --json "$out/serve_step_$name.json" 2>&1 | tee "$out/serve_step_$name.log"
    done ;;
  throughput)
    python3 scripts/train_throughput.py --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log" ;;
  train)
    for size in 125m 1.3b; do  # each size in its own process: after the 125M the 1.3B's temporaries did not fit an H100
      python3 scripts/train_throughput.py --sizes "$size" --backends triton_limit_chunk --meshes none data=1 \
        --rounds 2 --json "$out/mesh_overhead_$size.json" 2>&1 | tee -a "$out/mesh_overhead.log"
    done
    python3 scripts/train_throughput.py --sizes 125m --backends triton_xl_chunk native_chunkwise \
      --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log"
    python3 -c "import numpy as np; np.save('/tmp/tokens.npy', np.random.default_rng(0).integers(0, 50304, 20_000_000, dtype=np.int32))"
    python3 -m xlstm_jax.cli train --data /tmp/tokens.npy --vocab-size 50304 --seq-len 2048 --batch-size 8 \
      --embedding-dim 768 --num-heads 4 --num-blocks 12 --steps 60 --log-every 10 --eval-every 60 --eval-batches 2 \
      --output-dir "$out/job" --no-progress --json 2>&1 | tee "$out/job.log"
    python3 -c "
from xlstm_jax.train import TrainConfig, train
base = dict(steps=10, batch_size=8, eval_batches=2, progress=False, compute_dtype='bfloat16', seq_len=256,
            backend='triton_limit_chunk', embedding_dim=256, num_heads=4, num_blocks=2)
one, mesh = train(TrainConfig(**base)), train(TrainConfig(**base, mesh='data=1'))
print('plain', one.eval_loss, 'mesh data=1', mesh.eval_loss, 'rel', abs(one.eval_loss - mesh.eval_loss) / one.eval_loss)
" 2>&1 | tee "$out/mesh_parity.log" ;;
  scaling)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    gpus=$(nvidia-smi -L | wc -l)
    XLSTM_JAX_TEST_DEVICES=real python3 -m pytest -q -rs tests/distributed/test_context_parallel.py \
      tests/distributed/test_sharding.py tests/op/test_segments.py tests/distributed/test_train_mesh.py 2>&1 \
      | tee "$out/parity.log"
    python3 scripts/context_parallel_scaling.py --devices 1 2 4 8 --json "$out/context_parallel.json" 2>&1 \
      | tee "$out/context_parallel.log"
    for n in 1 2 4 8; do
      [ "$n" -le "$gpus" ] || continue
      meshes="data=$n fsdp=$n tensor=$n"; [ "$n" = 1 ] && meshes="none $meshes"
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) python3 scripts/train_throughput.py --sizes 125m 1.3b \
        --backends triton_limit_chunk --meshes $meshes --batch-per-device 4 --seq-len 2048 \
        --json "$out/weak_scaling_$n.json" 2>&1 | tee -a "$out/weak_scaling.log"
    done ;;
  serve)
    python3 scripts/profile_serve_step.py --calls 2 --reps 5 --variants decode,mixed:240 --json "$out/serve_step.json" \
      2>&1 | tee "$out/serve_step.log"
    python3 scripts/serve_bench.py --loads 0.5 --prefill-chunk 240 --out "$out/serve_bench" 2>&1 \
      | tee "$out/serve_bench.log" ;;
  ab)
    base=$(cd "${1:?BASE_DIR with an older xlstm_jax package}" && pwd); root=$PWD
    for round in 1 2; do
      for side in base new; do
        tree=$root; [ "$side" = base ] && tree=$base
        (cd "$tree" && python3 -m xlstm_jax.cli bench --shape 8,16,8192,128,256 \
          --backends triton_limit_chunk,triton_xl_chunk --mode both --chunk-sizes 64 --reps 30 --no-peers \
          --out "$out/$side$round" 2>&1 | tail -8 | tee -a "$out/ab.log")
      done
    done ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
