"""Where the time of one training step goes: device time per category from a JAX profiler trace.

The step is the training job's own (`xlstm_jax.train.benchmark.synthetic_step`: AdamW, packed documents, random
tokens) at a benchmark size, with the job's `--loss` and `--remat` choices. It is compiled, timed without the
profiler as the training loop runs it (params and optimizer state donated and carried, BACK_TO_BACK steps
dispatched before one wait: the step time and tokens/s; and once with a wait after every step: the blocked step
time, where the host's dispatch of each step's kernels adds to it), then `--steps` steps are traced
(`jax.profiler.trace`); the device events of the trace (`xlstm_jax.bench.trace.device_events`) are matched to the
compiled HLO (`hlo_op` of each event, or its kernel name) and summed per category:

- mlstm_fw, mlstm_bw: the mLSTM Triton kernels (kernel names with "mlstm"; "_bw" for the backward);
- lm_head_matmul, loss: the LM head's matmuls and the rest of the final norm, head and loss (the step's
  "lm_head_loss" named scope: logsumexp, soft cap, their gradients);
- optimizer: the "optimizer" scope (clipping, AdamW, the finite check);
- matmul: other matmuls (dot / convolution HLO, cuBLAS, cutlass, nvjet or XLA Triton GEMM kernels);
- collective: all-reduce, all-gather, reduce-scatter and other collectives (NCCL kernels);
- transpose_copy: transposes, copies, memcpy / memset; other_fusion: the other XLA fusions (norms, gates,
  activations, residual adds, converts); other: the rest.

Also printed: device busy time (the union of the events' intervals) and the host gap (step time minus busy time, for
both timings), per step, the kernels and op names (JAX name stacks) that take the most time, XLA's temporary memory
and the device's peak memory, and the matmuls' rate: the module's matmul floating-point operations per step
(`bench.hlo.module_matmul_flops`: dots, GEMM custom calls, Triton GEMM fusions, loop bodies times their trip
counts) over the matmul kernels' device time (`matmul_tflops`), and per op name where an event names its HLO
instruction (`top_matmuls`; None where it does not). The JSON also lists the kernels matched to no HLO instruction
("unmapped", with their trace events' `hlo_op` and `tf_op`): their scope is unknown, so their category comes from
the kernel name alone. On an H100 with jax 0.11.2 that was every cuBLAS and Triton custom call (the events carry a
`cuda_graph_id`: XLA ran them from command buffers). On a CPU (`--tiny`) the
events are XLA's CPU thunks, possibly on several threads at once and slowed down by the profiler: the categories
are coarse there and the host gap meaningless.

    python scripts/profile_train.py --size 1.3b --batch 8 --loss fused --remat dots --json profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import tempfile

import jax

from xlstm_jax.bench.hlo import (MATMUL_KERNELS, busy_us, instruction_of, is_matmul, matmul_flops, module_matmul_flops,
                                 op_name, parse_hlo)
from xlstm_jax.bench.measure import timing_stats
from xlstm_jax.bench.trace import traced_events
from xlstm_jax.train.benchmark import BACK_TO_BACK, SIZES, synthetic_step
from xlstm_jax.train.config import LOSS_CHOICES, REMAT_CHOICES, WEIGHT_MODES
from xlstm_jax.train.metrics import model_flops_per_token, peak_flops

CATEGORIES = ("matmul", "mlstm_fw", "mlstm_bw", "lm_head_matmul", "loss", "optimizer", "collective",
              "transpose_copy", "other_fusion", "other")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "nccl")


def category(event: dict, hlo: dict[str, dict], name: str | None) -> tuple[str, str]:
    """(category, op name) of a device event (`CATEGORIES`) that ran HLO instruction `name` (None: unknown)."""
    kernel = event["name"].lower()
    info = hlo.get(name, {"opcode": "", "target": ""})
    scope = op_name(hlo, name) if name else ""
    opcode = info["opcode"]
    if any(c in opcode or c in kernel for c in COLLECTIVES):
        return "collective", scope
    if "mlstm" in kernel:
        return ("mlstm_bw" if "_bw" in kernel else "mlstm_fw"), scope
    matmul = any(k in kernel for k in MATMUL_KERNELS) or (name is not None and is_matmul(hlo, name))
    if "/optimizer/" in scope:
        return "optimizer", scope
    if "lm_head_loss" in scope:
        return ("lm_head_matmul" if matmul else "loss"), scope
    if matmul:
        return "matmul", scope
    root = hlo.get(hlo.get(f"computation:{(info.get('calls') or [''])[0]}", {}).get("root") or "", {})
    if opcode in ("transpose", "copy", "copy-start", "copy-done") or root.get("opcode") in ("transpose", "copy") \
            or any(k in kernel for k in ("transpose", "copy", "memcpy", "memset")):
        return "transpose_copy", scope
    if opcode == "fusion" or "fusion" in kernel:
        return "other_fusion", scope
    return "other", scope


def profile(args: argparse.Namespace) -> dict:
    step = synthetic_step(args.size, args.backend, args.batch, args.seq_len, args.dtype, args.mesh, args.loss,
                          args.remat, args.loss_block, args.weight_mode)
    compiled, compile_s = step.compile()
    text = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as fh:
            fh.write(text)
    hlo = parse_hlo(text)
    timing = timing_stats(step.seconds(compiled, args.reps, BACK_TO_BACK))
    blocked = timing_stats(step.seconds(compiled, args.reps, 1))

    def run():
        for _ in range(args.steps):
            out = step.run(compiled)
        return out

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_train-")
    events = traced_events(run, os.path.join(trace_dir, f"{args.size}-{args.loss}-{args.remat}"))
    if jax.default_backend() == "cpu":  # every event of the process: keep XLA's thunks
        events = [e for e in events if "hlo_op" in e.get("args", {})]
    per_category = collections.defaultdict(float)
    kernels, ops = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(float)
    unmapped, unmapped_args = collections.defaultdict(float), {}
    gemms = collections.defaultdict(lambda: [0.0, 0.0, True])  # matmul op name -> [ms, flops, flops known] a step
    for event in events:
        instruction = instruction_of(event, hlo)
        kind, scope = category(event, hlo, instruction)
        ms = float(event["dur"]) / 1e3 / args.steps
        if kind in ("matmul", "lm_head_matmul"):
            gemm = gemms[re.sub(r"^jit\(train_step\)/", "", scope)[:120]]
            gemm[0] += ms
            gemm[1] += (matmul_flops(hlo, instruction) if instruction else 0) / args.steps
            gemm[2] = gemm[2] and instruction is not None
        if instruction is None:  # no HLO instruction found: its scope is unknown
            unmapped[event["name"][:90]] += ms
            unmapped_args.setdefault(event["name"][:90], {key: str(event.get("args", {}).get(key))[:120]
                                                          for key in ("hlo_op", "tf_op", "hlo_module")})
        per_category[kind] += ms
        kernels[(event["name"][:90], kind)][0] += ms
        kernels[(event["name"][:90], kind)][1] += 1
        ops[(kind, re.sub(r"^jit\(train_step\)/", "", scope)[:120])] += ms
    busy = busy_us(events) / 1e3 / args.steps
    memory, stats = compiled.memory_analysis(), jax.devices()[0].memory_stats()
    tokens_per_s = args.batch * args.seq_len / (timing["ms_median"] / 1e3)
    peak = peak_flops(jax.devices()[0], args.dtype)
    flops = model_flops_per_token(step.model_config, step.model_config.chunk_size or 64)
    return {
        "size": args.size, "backend": args.backend, "mesh": args.mesh, "batch": args.batch, "seq_len": args.seq_len,
        "dtype": args.dtype, "loss": args.loss, "remat": args.remat, "loss_block": args.loss_block,
        "weight_mode": args.weight_mode,
        "params_M": step.n_params / 1e6, "step_ms": timing["ms_median"], "step_iqr_ms": timing["ms_iqr"],
        "blocked_step_ms": blocked["ms_median"],
        "tokens_per_s": tokens_per_s, "mfu": None if peak is None else tokens_per_s * flops / peak,
        "device_busy_ms": busy, "host_gap_ms": timing["ms_median"] - busy,
        "blocked_host_gap_ms": blocked["ms_median"] - busy,
        "category_ms": {kind: per_category.get(kind, 0.0) for kind in CATEGORIES},
        "top_kernels": [{"kernel": k, "category": c, "ms": v[0], "calls": v[1] / args.steps}
                        for (k, c), v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]],
        "top_ops": [{"op_name": o, "category": c, "ms": v}
                    for (c, o), v in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]],
        "compile_s": compile_s, "temp_mb": memory.temp_size_in_bytes / 2**20,
        "peak_mb": None if not stats else stats.get("peak_bytes_in_use", 0) / 2**20,
        "events_per_step": len(events) / args.steps,
        "matmul_tflops": module_matmul_flops(hlo) / max(sum(g[0] for g in gemms.values()), 1e-9) / 1e9,
        "top_matmuls": [{"op_name": o, "ms": ms, "tflops": flops / max(ms, 1e-9) / 1e9 if known else None}
                        for o, (ms, flops, known) in sorted(gemms.items(), key=lambda kv: -kv[1][0])[:args.top]],
        "unmapped": [{"kernel": k, "ms": v, "event_args": unmapped_args[k]}
                     for k, v in sorted(unmapped.items(), key=lambda kv: -kv[1])[:args.top]],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="125m", choices=sorted(SIZES),
                        help="125m: D 768, 12 blocks, 4 heads; 1.3b: D 2048, 24 blocks, 8 heads (vocab 50304)")
    parser.add_argument("--tiny", action="store_true",
                        help="size tiny (D 64, 2 blocks, vocab 256), B 2, S 64, float32: a check on a CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--backend", default="auto", help="mLSTM backend (auto: Triton on a CUDA GPU)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--mesh", help="a device mesh, as xlstm-jax train --mesh (default: one device)")
    parser.add_argument("--loss", default="plain", choices=LOSS_CHOICES)
    parser.add_argument("--remat", default="none", choices=REMAT_CHOICES)
    parser.add_argument("--loss-block", type=int, help="vocabulary columns per block of the fused loss")
    parser.add_argument("--weight-mode", default="single", choices=WEIGHT_MODES,
                        help="the projections as one matmul each or one per group (xlstm-jax train --weight-mode)")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--reps", type=int, default=10, help="timed steps (wall time, untraced)")
    parser.add_argument("--top", type=int, default=60,
                        help="kernels and op names listed (the 125M's small fusions, 13 ms on an H100, need about 60)")
    parser.add_argument("--trace-dir", help="keep the traces here (default: a new temporary folder)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--hlo", help="also write the compiled step's HLO text (its fusions' bodies) to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.seq_len, args.dtype = "tiny", 2, 64, "float32"
    row = profile(args)
    step = row["step_ms"]
    mfu = "" if row["mfu"] is None else f" (MFU {100 * row['mfu']:.1f}%)"
    memory = "" if row["peak_mb"] is None else f", peak {row['peak_mb']:,.0f} MB"
    print(f"{row['size']} B={row['batch']} S={row['seq_len']} {row['dtype']} backend {row['backend']} loss "
          f"{row['loss']} remat {row['remat']}: step {step:.2f} ms (± {row['step_iqr_ms']:.2f}), "
          f"{row['tokens_per_s']:,.0f} tokens/s{mfu}, device busy {row['device_busy_ms']:.2f} ms, host gap "
          f"{row['host_gap_ms']:.2f} ms (blocked step {row['blocked_step_ms']:.2f} ms, gap "
          f"{row['blocked_host_gap_ms']:.2f} ms), XLA temporaries {row['temp_mb']:,.0f} MB{memory}", flush=True)
    for kind, ms in row["category_ms"].items():
        print(f"  {kind:15s} {ms:9.3f} ms  {100 * ms / step:5.1f}%")
    print("top kernels:")
    for k in row["top_kernels"]:
        print(f"  {k['ms']:9.3f} ms  {k['calls']:5.0f}x  {k['category']:15s} {k['kernel']}")
    print(f"matmuls: {row['matmul_tflops']:.1f} TFLOP/s (the module's matmul flops over their kernels' device time); "
          f"by op name:")
    for m in row["top_matmuls"]:
        rate = "      ?" if m["tflops"] is None else f"{m['tflops']:7.1f}"
        print(f"  {m['ms']:9.3f} ms  {rate} TFLOP/s  {m['op_name'] or '(no op name)'}")
    print("top op names:")
    for o in row["top_ops"]:
        print(f"  {o['ms']:9.3f} ms  {o['category']:15s} {o['op_name']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, **row}, fh, indent=1)
    return row


if __name__ == "__main__":
    main()
