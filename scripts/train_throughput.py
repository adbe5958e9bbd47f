"""Training-step throughput (tokens/s, MFU) of xLSTM language models with each mLSTM backend, measured in one run.

The step is the training job's own (`xlstm_jax.train.steps`: AdamW with clipping, masked next-token cross-entropy,
packed documents), on random tokens; jitted once, warmed up, median of >= 10 timed steps
(`xlstm_jax.bench.measure.time_jax`). `--mesh data=1` (repeatable with other meshes) runs the same step placed on a
device mesh, as `xlstm-jax train --mesh` does; "none" is the plain one-device path. `--batch-per-device` scales
the batch with the mesh's device count (weak scaling, issue 22). MFU counts the model FLOPs of
`xlstm_jax.train.metrics.model_flops_per_token` against the device's bf16 peak.

    python scripts/train_throughput.py --sizes 125m 1.3b --backends triton_limit_chunk native_chunkwise \\
        --meshes none data=1

`--tiny` runs a small model at S=64 (a check that the script works, e.g. on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from xlstm_jax.bench.measure import time_jax
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train.mesh import batch_sharding, build_mesh, parse_mesh
from xlstm_jax.train.metrics import model_flops_per_token, peak_flops
from xlstm_jax.train.steps import build_steps, init_params, make_optimizer

SIZES = {  # tied embeddings, vocab 50304
    "125m": dict(embedding_dim=768, num_heads=4, num_blocks=12),
    "1.3b": dict(embedding_dim=2048, num_heads=8, num_blocks=24),
    "tiny": dict(embedding_dim=64, num_heads=2, num_blocks=2),
}


def measure(size: str, backend: str, mesh_text: str | None, batch: int, seq_len: int, dtype: str, reps: int
            ) -> dict:
    vocab = 256 if size == "tiny" else 50304
    config = TrainConfig(**SIZES[size], vocab_size=vocab, seq_len=seq_len, batch_size=batch, backend=backend,
                         compute_dtype=dtype, mesh=mesh_text, steps=100, progress=False)
    model_config = dataclasses.replace(config.model_config(), tie_word_embeddings=True)
    tx = make_optimizer(config)
    mesh = sizes = None
    if mesh_text is not None:
        sizes = parse_mesh(mesh_text)
        mesh = build_mesh(sizes)
    graphdef, params, opt_state, placement = init_params(model_config, 0, tx, mesh, sizes)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, vocab)
    segment_ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(2), 1 / 1024, (batch, seq_len)), axis=1)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids.astype(jnp.int32),
            "mask": jnp.ones((batch, seq_len), jnp.float32)}
    if mesh is not None:
        data = jax.device_put(data, batch_sharding(mesh))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        train_step, _ = build_steps(graphdef, tx, placement)
        timing = time_jax(train_step, lambda: (params, opt_state, data), reps)
    tokens_per_s = batch * seq_len / (timing["ms_median"] / 1e3)
    peak = peak_flops(jax.devices()[0], dtype)
    flops = model_flops_per_token(model_config, config.chunk_size or 64)
    return {"size": size, "backend": backend, "mesh": mesh_text or "none", "batch": batch, "params_M": n_params / 1e6,
            "step_ms": timing["ms_median"], "step_iqr_ms": timing["ms_iqr"], "tokens_per_s": tokens_per_s,
            "mfu": None if peak is None else tokens_per_s * flops / peak, "compile_s": timing["compile_s"],
            "peak_mb": timing["peak_mb"]}


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
                for mesh in args.meshes:
                    mesh_text = None if mesh == "none" else mesh
                    step_batch = batch if args.batch_per_device is None else args.batch_per_device * (
                        1 if mesh_text is None else math.prod(parse_mesh(mesh_text).values()))
                    row = measure(size, backend, mesh_text, step_batch, seq_len, args.dtype, args.reps)
                    mfu = "" if row["mfu"] is None else f"  MFU {100 * row['mfu']:.1f}%"
                    print(f"{size:5s} {backend:20s} mesh {row['mesh']:10s} {row['params_M']:.1f}M params  step "
                          f"{row['step_ms']:.1f} ms (± {row['step_iqr_ms']:.1f})  {row['tokens_per_s']:,.0f} "
                          f"tokens/s{mfu}", flush=True)
                    results.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": batch,
                       "seq_len": seq_len, "results": results}, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
