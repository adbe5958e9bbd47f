"""Training-step throughput (tokens/s, MFU) of xLSTM language models with each mLSTM backend, measured in one run.

The step is the training job's own (`xlstm_jax.train.steps`: AdamW with clipping, masked next-token cross-entropy,
packed documents), on random tokens; compiled once, warmed up, and timed as the training loop runs it (parameters
and optimizer state donated and carried, BACK_TO_BACK steps dispatched before one wait;
`xlstm_jax.train.benchmark.SyntheticStep.seconds`): median of >= 10 timed runs. `--mesh data=1` (repeatable with
other meshes) runs the same step placed on a device mesh, as `xlstm-jax train --mesh` does; "none" is the plain
one-device path. `--batch-per-device` scales the batch with the mesh's device count (weak scaling, issue 22). MFU
counts the model FLOPs of `xlstm_jax.train.metrics.model_flops_per_token` against the device's bf16 peak
(recomputation under --remat is not counted). `--loss` and `--remat` (each taking several values) measure the
training job's choices.

    python scripts/train_throughput.py --sizes 125m 1.3b --backends triton_limit_chunk native_chunkwise \\
        --meshes none data=1 --loss plain fused --remat none dots

`--tiny` runs a small model at S=64 (a check that the script works, e.g. on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math

import jax

from xlstm_jax.bench.measure import memory_mb, peak_bytes, timing_stats
from xlstm_jax.train.benchmark import BACK_TO_BACK, SIZES, synthetic_step
from xlstm_jax.train.config import LOSS_CHOICES, REMAT_CHOICES
from xlstm_jax.train.mesh import parse_mesh
from xlstm_jax.train.metrics import model_flops_per_token, peak_flops


def measure(size: str, backend: str, mesh_text: str | None, batch: int, seq_len: int, dtype: str, reps: int,
            loss: str = "plain", remat: str = "none", loss_block: int | None = None) -> dict:
    before = peak_bytes()
    step = synthetic_step(size, backend, batch, seq_len, dtype, mesh_text, loss, remat, loss_block)
    compiled, compile_s = step.compile()
    with jax.set_mesh(step.mesh) if step.mesh is not None else contextlib.nullcontext():
        timing = {**timing_stats(step.seconds(compiled, reps, BACK_TO_BACK)), "compile_s": compile_s}
    timing.update(memory_mb(before, compiled))
    tokens_per_s = batch * seq_len / (timing["ms_median"] / 1e3)
    peak = peak_flops(jax.devices()[0], dtype)
    flops = model_flops_per_token(step.model_config, step.model_config.chunk_size or 64)
    return {"size": size, "backend": backend, "mesh": mesh_text or "none", "batch": batch, "loss": loss,
            "remat": remat, "params_M": step.n_params / 1e6, "step_ms": timing["ms_median"],
            "step_iqr_ms": timing["ms_iqr"], "tokens_per_s": tokens_per_s,
            "mfu": None if peak is None else tokens_per_s * flops / peak, "compile_s": timing["compile_s"],
            "peak_mb": timing["peak_mb"], "xla_mb": timing["xla_mb"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["125m"], choices=sorted(SIZES))
    parser.add_argument("--backends", nargs="+", default=["triton_limit_chunk", "triton_xl_chunk", "native_chunkwise"])
    parser.add_argument("--meshes", nargs="+", default=["none"], help='"none" (one device) or --mesh values')
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (all devices together)")
    parser.add_argument("--batch-per-device", type=int,
                        help="weak scaling: sequences per device, the step's batch then grows with each mesh")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole table (alternating runs)")
    parser.add_argument("--loss", nargs="+", default=["plain"], choices=LOSS_CHOICES,
                        help="training losses to measure (xlstm-jax train --loss)")
    parser.add_argument("--remat", nargs="+", default=["none"], choices=REMAT_CHOICES,
                        help="remat choices to measure (xlstm-jax train --remat)")
    parser.add_argument("--loss-block", type=int, help="vocabulary columns per block of the fused loss "
                                                       "(default: automatic)")
    parser.add_argument("--tiny", action="store_true", help="D=64, 2 blocks, vocab 256, S=64, B=2")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    sizes, batch, seq_len = args.sizes, args.batch, args.seq_len
    if args.tiny:
        sizes, batch, seq_len = ["tiny"], 2, 64
    results = []
    for _ in range(args.rounds):
        for size in sizes:
            for backend in args.backends:
                for mesh, loss, remat in itertools.product(args.meshes, args.loss, args.remat):
                    mesh_text = None if mesh == "none" else mesh
                    step_batch = batch if args.batch_per_device is None else args.batch_per_device * (
                        1 if mesh_text is None else math.prod(parse_mesh(mesh_text).values()))
                    row = measure(size, backend, mesh_text, step_batch, seq_len, args.dtype, args.reps, loss, remat,
                                  args.loss_block)
                    mfu = "" if row["mfu"] is None else f"  MFU {100 * row['mfu']:.1f}%"
                    peak = "" if row["peak_mb"] is None else f"  peak {row['peak_mb']:,.0f} MB"
                    print(f"{size:5s} {backend:20s} mesh {row['mesh']:10s} loss {loss:5s} remat {remat:5s} "
                          f"{row['params_M']:.1f}M params  step {row['step_ms']:.1f} ms (± {row['step_iqr_ms']:.1f})  "
                          f"{row['tokens_per_s']:,.0f} tokens/s{mfu}{peak}", flush=True)
                    results.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": batch,
                       "seq_len": seq_len, "results": results}, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
