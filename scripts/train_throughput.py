"""Training-step throughput (tokens/s) of an xLSTM language model with each mLSTM backend, measured in one run.

One AdamW step (forward, backward, update) on random tokens, next-token cross-entropy; jitted once, warmed up,
median of >= 10 timed steps (`xlstm_jax.bench.measure.time_jax`). The default is a ~125M-parameter model
(D=768, 12 blocks, 4 heads, vocab 50304, tied embeddings: 125.4M) at S=2048, bf16 compute, float32 parameters:

    python scripts/train_throughput.py --backends triton_limit_chunk triton_xl_chunk native_chunkwise

`--tiny` runs a small model at S=64 (a check that the script works, e.g. on a CPU).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from xlstm_jax.bench.measure import time_jax
from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig


def step_fn(graphdef, tx):
    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def measure(config: xLSTMLargeConfig, batch: int, seq_len: int, reps: int) -> dict:
    graphdef, params = nnx.split(xLSTMLarge(config, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tx = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = tx.init(params)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len + 1), 0, config.vocab_size)
    timing = time_jax(step_fn(graphdef, tx), lambda: (params, opt_state, tokens), reps)
    return {"backend": config.backend, "chunk_size": config.chunk_size, "params_M": n_params / 1e6,
            "step_ms": timing["ms_median"], "step_iqr_ms": timing["ms_iqr"],
            "tokens_per_s": batch * seq_len / (timing["ms_median"] / 1e3), "compile_s": timing["compile_s"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["triton_limit_chunk", "triton_xl_chunk", "native_chunkwise"])
    parser.add_argument("--chunk-size", type=int, default=None, help="None: each backend's default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="D=64, 2 blocks, vocab 256, S=64, B=2")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    size = dict(embedding_dim=768, num_heads=4, num_blocks=12, vocab_size=50304, tie_word_embeddings=True)
    batch, seq_len = args.batch, args.seq_len
    if args.tiny:
        size, batch, seq_len = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256), 2, 64
    results = []
    for backend in args.backends:
        config = xLSTMLargeConfig(**size, backend=backend, chunk_size=args.chunk_size, compute_dtype=args.dtype)
        row = measure(config, batch, seq_len, args.reps)
        print(f"{backend:20s} {row['params_M']:.1f}M params  step {row['step_ms']:.1f} ms "
              f"(± {row['step_iqr_ms']:.1f})  {row['tokens_per_s']:,.0f} tokens/s", flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "batch": batch, "seq_len": seq_len,
                       "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
